"""The launcher srun starts on every node: torchrun, with the trainer's "preempted" exit code kept.

    python -m slurm.launch [torchrun options] -m trainer RECIPE --stage S [key=value ...]

torchrun reports any failed worker as exit code 1, but the batch script must know that the ranks
saved a checkpoint and left with EXIT_PREEMPTED (75) to requeue the job. So this exits 75 when every
failed worker exited 75, or when torchrun was itself stopped by a signal that it forwarded to the
workers (the batch script passes --signals-to-handle with SIGUSR1: the trainer checkpoints on USR1
and TERM, and torchrun waits --shutdown-timeout seconds for it). Anything else is torchrun's own.
"""

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

from . import EXIT_PREEMPTED


def main(argv=None) -> int:
    try:
        torchrun(argv)
    except ChildFailedError as e:
        if all(f.exitcode == EXIT_PREEMPTED for f in e.failures.values()):
            return EXIT_PREEMPTED
        raise
    except SignalException as e:
        print(f"[slurm.launch] {e}; the workers were told to checkpoint", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
