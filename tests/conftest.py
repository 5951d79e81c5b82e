"""Shared fixtures and helpers: a small tokenized corpus, a way to run the trainer's CLI for real, the
pretraining arguments the end-to-end tests share, curve comparisons and transformers' MoE weight names."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist each worker gets its share of the cores for in-process torch work, so two
    workers do not oversubscribe them (subprocesses set their own OMP_NUM_THREADS)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(items):
    """With --dist=loadgroup: the tests that start a SLURM cluster on localhost run on one worker, one
    after another (one cluster at a time on the machine); the others are dealt out test by test."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))


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


def pretrain_args(corpus, run_dir, steps=10, **extra) -> list[str]:
    """CLI arguments of a short pretraining run of the debug preset on `corpus` (overrides in extra)."""
    args = dict({"stages": "[pretrain]", "run_dir": run_dir, "model.preset": "debug",
                 "pretrain.data": corpus, "pretrain.steps": steps, "pretrain.seq_len": 64,
                 "pretrain.micro_batch_size": 2, "pretrain.global_batch_size": 4,
                 "pretrain.lr": 1e-3, "pretrain.warmup_steps": 2, "pretrain.log_every": 1,
                 "pretrain.save_every": 100, "pretrain.valid_fraction": 0, "logging.progress": "false"}, **extra)
    return ["recipes/quickstart.yaml"] + [f"{k}={v}" for k, v in args.items()]


# bf16 keeps 8 significant bits: one rounding moves a value by up to 2^-9 relative (2e-3). Weights,
# activations and the gradients DeepSpeed reduces are bf16, and a layout sums the same products in
# another order (tp all-reduces, dp averages, expert partial sums), so single elements differ by a few
# roundings; the loss (a mean over 256 tokens) and the grad norm (over 4 M elements) average most of
# that out. Measured over 4 steps: loss <= 1.6e-5, grad norm <= 4.1e-4 relative. Tolerances: loss 1e-3,
# grad norm 2^-8 = 3.9e-3 (two roundings of one bf16 value): a gradient summed twice or missing a rank
# moves the norm by far more.
BF16_LOSS_TOL, BF16_GRAD_NORM_TOL = 1e-3, 2.0 ** -8


def training_steps(run_folder) -> list[dict]:
    """The metrics of each optimizer step (rows with a grad_norm; evaluation rows have none)."""
    return [m for m in read_metrics(run_folder) if "grad_norm" in m]


def assert_same_curves(run, reference, loss_tol: float, grad_norm_tol: float) -> None:
    """The stage folders `run` and `reference` logged the same steps, and at every step the same loss
    and grad_norm within the relative tolerances. grad_norm is compared as closely as loss: Adam
    hides a wrong gradient scale from the loss curve, not from the norm (and clipping uses it)."""
    got, want = training_steps(run), training_steps(reference)
    assert [m["step"] for m in got] == [m["step"] for m in want], (run, reference)
    assert got, f"{run}: no training step logged"
    for key, tol in (("loss", loss_tol), ("grad_norm", grad_norm_tol)):
        a, b = [m[key] for m in got], [m[key] for m in want]
        errors = [abs(x - y) / abs(y) for x, y in zip(a, b)]
        assert all(e <= tol for e in errors), (  # also false for NaN
            f"{key}: worst relative difference {max(errors):.2e} > {tol:.0e}\n{run}: {a}\n{reference}: {b}")


def sparse_moe_state(moe) -> dict:
    """Our model.moe.MoE's weights in the names of transformers' MixtralSparseMoeBlock."""
    import torch

    ex = moe.experts
    return {"gate.weight": moe.router.gate.weight.detach(),
            "experts.gate_up_proj": torch.cat([ex.w1.transpose(1, 2), ex.w3.transpose(1, 2)], 1).detach(),
            "experts.down_proj": ex.w2.transpose(1, 2).detach()}


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
