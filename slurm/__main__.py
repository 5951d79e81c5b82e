"""python -m slurm RECIPE.yaml [--stages a,b] [--dry-run] [key=value ...]

Submits the recipe's stages (or --stages) as a chain of SLURM jobs, one per stage, each started only
after the previous one succeeded; prints the job ids, one per line. --dry-run prints the batch
scripts instead. Bad input (recipe, overrides, slurm section, layout, stage names) is one line
naming the key, exit code 2, and nothing is submitted.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="YAML recipe (recipes/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="config overrides, passed on to every job")
    parser.add_argument("--stages", help="comma-separated stages to submit (default: the recipe's)")
    parser.add_argument("--dry-run", action="store_true", help="print the batch scripts, submit nothing")
    args = parser.parse_intermixed_args(argv)

    from trainer.config import ConfigError
    from .submit import submit

    try:
        submit(args.recipe, args.overrides, args.stages.split(",") if args.stages else None, args.dry_run)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, FileNotFoundError) as e:  # sbatch missing or refusing the job
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
