"""Look into a checkpoint without launching a job: what it holds, where it came from, is it intact.

    python -m trainer.inspect_checkpoint runs/quickstart/pretrain [--tensors] [--verify]

Prints the step, the stage, the layout it was saved at, the number of logical tensors and slices and
their size; --tensors lists every tensor with its full shape and slice count; --verify reads every
slice and checks its sha256 (exit code 1 and the file and tensor named on a mismatch). There is no
offline resharding step: the tensors are stored whole-and-sliced by logical name, and a run started
at any layout reads the boxes it needs (trainer/checkpoint.py).
"""

import argparse
import sys

from .checkpoint import CheckpointError, CheckpointReader
from .export import resolve_checkpoint


def summary(path) -> dict:
    reader = CheckpointReader(resolve_checkpoint(path))
    state, tensors = reader.trainer_state(), reader.manifest["tensors"]
    files = {s["file"] for t in tensors.values() for s in t["slices"]}
    return dict(path=str(reader.path), step=state["step"], stage=state.get("stage"),
                layout=state.get("layout"), tensors=len(tensors),
                slices=sum(len(t["slices"]) for t in tensors.values()),
                bytes=sum((reader.path / f).stat().st_size for f in files), reader=reader)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.inspect_checkpoint", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint folder, or a stage folder (its latest checkpoint)")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--verify", action="store_true", help="read every slice and check its sha256")
    a = p.parse_args(argv)
    try:
        info = summary(a.checkpoint)
        reader = info.pop("reader")
        print(f"{info['path']}: step {info['step']} of stage {info['stage']}, saved at {info['layout']}")
        print(f"{info['tensors']} tensors in {info['slices']} slices, {info['bytes'] / 2 ** 20:.1f} MiB")
        for key, meta in reader.manifest["tensors"].items():
            if a.tensors:
                print(f"  {key:60s} {meta['dtype']:8s} {meta['full_shape']} ({len(meta['slices'])} slices)")
            if a.verify:
                reader.read(key)
        if a.verify:
            print("every slice verified (sha256)")
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
