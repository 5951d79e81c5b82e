"""python -m trainer RECIPE.yaml [--stage NAME] [--force] [key=value ...]

Runs the recipe's stages in order (or the one named); on several processes under torchrun or SLURM.
Bad input (config, data files) is reported as one line naming the file, line or key, exit code 2.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="YAML recipe (recipes/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. pretrain.lr=1e-3 parallel.tp=2")
    parser.add_argument("--stage", help="run only this stage")
    parser.add_argument("--force", action="store_true", help="redo stages already marked done")
    args = parser.parse_intermixed_args(argv)

    from data.readers import DataError
    from parallel.layout import LayoutError
    from .checkpoint import CheckpointError
    from .config import STAGES, ConfigError, load_config

    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.stage is not None and args.stage not in STAGES:
            raise ConfigError(f"--stage: unknown stage {args.stage!r}; choose from {list(STAGES)}")
        from .stages import run_recipe
        run_recipe(cfg, only=args.stage, force=args.force)
    except (ConfigError, DataError, LayoutError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
