"""Run a recipe on SLURM: `python -m slurm RECIPE.yaml` renders slurm/train.sbatch per stage and
submits the stages as a chain of jobs (submit.py); on every node srun starts slurm/launch.py
(torchrun); localhost.py starts a real single-node SLURM for the tests. See slurm/README.md."""

EXIT_PREEMPTED = 75  # = trainer.loop.EXIT_PREEMPTED, which cannot be imported without DeepSpeed (slow)
