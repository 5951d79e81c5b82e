"""python -m trainer RECIPE.yaml [--stage NAME] [--force] [key=value ...]
   python -m trainer RECIPE.yaml --dry-run [--rank R] [--world-size N] [--stage NAME] [key=value ...]

Runs the recipe's stages in order (or the one named); on several processes under torchrun or SLURM.
--dry-run builds one rank of the real layout on the meta device in this process (trainer/dry_run.py).
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
    parser.add_argument("--dry-run", action="store_true", help="build one rank of the layout, allocate no weights")
    parser.add_argument("--rank", type=int, default=0, help="--dry-run: the rank to build")
    parser.add_argument("--world-size", type=int, help="--dry-run: ranks in all (default: the SLURM job's)")
    args = parser.parse_intermixed_args(argv)

    from data.readers import DataError
    from model.hf import HFCheckpointError
    from parallel.layout import LayoutError
    from .checkpoint import CheckpointError
    from .config import STAGES, ConfigError, load_config

    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.stage is not None and args.stage not in STAGES:
            raise ConfigError(f"--stage: unknown stage {args.stage!r}; choose from {list(STAGES)}")
        if args.dry_run:
            from .dry_run import dry_run
            dry_run(cfg, args.recipe, args.overrides, args.rank, args.world_size, args.stage)
        else:
            from .stages import run_recipe
            run_recipe(cfg, only=args.stage, force=args.force)
    except (ConfigError, DataError, LayoutError, CheckpointError, HFCheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
