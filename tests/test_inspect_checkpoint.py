"""python -m trainer.inspect_checkpoint: the summary matches the run, --verify finds an altered slice."""

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, pretrain_args, run_cli


def inspect(*args):
    return subprocess.run([sys.executable, "-m", "trainer.inspect_checkpoint", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def test_inspect_and_verify(corpus, tmp_path):
    run_cli(*pretrain_args(corpus, tmp_path, steps=2))
    ok = inspect(tmp_path / "pretrain", "--verify", "--tensors")
    assert ok.returncode == 0, ok.stderr
    assert "step 2 of stage pretrain" in ok.stdout and "every slice verified" in ok.stdout
    assert "model/layers.1.moe.experts.w2" in ok.stdout and "[4, 128, 64]" in ok.stdout  # debug: E=4, F=128, D=64

    shard = next(Path(tmp_path / "pretrain/checkpoints").glob("step_*/rank00000.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # flip a byte of the last tensor's data
    shard.write_bytes(bytes(data))
    bad = inspect(tmp_path / "pretrain", "--verify")
    assert bad.returncode == 1 and str(shard) in bad.stderr and "corrupted" in bad.stderr, bad.stderr
