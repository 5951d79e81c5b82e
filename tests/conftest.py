"""Shared fixtures: a small tokenized corpus and a way to run the trainer's CLI for real."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, nproc: int = 1, check: bool = True, timeout: int = 600, env=None):
    """`python -m trainer ...` (or under torchrun with nproc ranks) from the repository root."""
    launcher = [sys.executable, "-m", "trainer"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "trainer"]
    # an in-process test may have set up torch.distributed here: its rank variables must not leak
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    full_env = dict(inherited, WANDB_MODE="disabled", OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(launcher + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_folder) -> list[dict]:
    return [json.loads(line) for line in (Path(run_folder) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """The shipped corpus' first plays, tokenized with the Mixtral tokenizer: an indexed dataset prefix."""
    from data.indexed import tokenize_files
    from data.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("corpus")
    records = (ROOT / "data/corpus/shakespeare.jsonl").read_text().splitlines()[:2]
    (folder / "small.jsonl").write_text("\n".join(records) + "\n")
    tokenize_files([str(folder / "small.jsonl")], str(folder / "small"), load_tokenizer("mistral-v1"))
    return str(folder / "small")
