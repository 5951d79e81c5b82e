"""Checkpoints: loadable at any layout, exact resume after SIGTERM, atomic writes, corruption detected,
HF export from a sharded checkpoint equal to the single-process export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (BF16_GRAD_NORM_TOL, BF16_LOSS_TOL, ROOT, assert_same_curves, pretrain_args, run_cli,
                      training_steps)
from distributed import run_ranks

STEPS = 8


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """The reference: 8 steps at TP2 x EP2 (4 ranks), ZeRO-1, without a break."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_cli(*pretrain_args(corpus, run_dir, steps=STEPS, **SAVED_AT), nproc=4)
    return run_dir / "pretrain"


SAVED_AT = {"parallel.tp": 2, "parallel.ep": 2, "parallel.zero_stage": 1}
RESUMED_AT = {  # name: (ranks, layout)
    "single": (1, {"parallel.zero_stage": 0}),
    "tp2": (2, {"parallel.tp": 2, "parallel.zero_stage": 1}),
    "ep2-dp2-zero2": (2, {"parallel.ep": 2, "parallel.zero_stage": 2}),
}


@pytest.fixture(scope="module")
def saved_run(corpus, tmp_path_factory):
    """The same run stopped after step 4 (checkpoint saved at TP2 x EP2 ZeRO-1)."""
    run_dir = tmp_path_factory.mktemp("saved")
    run_cli(*pretrain_args(corpus, run_dir, steps=STEPS, **SAVED_AT, **{"pretrain.stop_after": 4}), nproc=4)
    return run_dir


def _copy(src: Path, dst: Path):
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)


def check_loaded_state(rank, world, ckpt, overrides):
    """Build the engine at another layout, load, and compare every local slice with the saved tensors."""
    from trainer.checkpoint import CheckpointReader, load_checkpoint, local_slice, _master, _moment
    from trainer.config import load_config, model_config_of
    from trainer.engine import build_engine, build_model
    from parallel.layout import Layout
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = load_config(str(ROOT / "recipes/quickstart.yaml"), overrides)
    mcfg = model_config_of(cfg)
    layout = Layout.build(cfg.parallel, mcfg, cfg.pretrain, world, rank)
    engine = build_engine(build_model(mcfg, None, 99, layout, cfg.parallel), cfg.pretrain, cfg.parallel, layout)
    load_checkpoint(ckpt, engine)
    reader = CheckpointReader(ckpt)
    worst = 0.0
    for name, p in engine.module.named_parameters():
        _, offsets = local_slice(p)
        for kind, value in (("model", _master(engine, p)), ("exp_avg", _moment(engine, p, "exp_avg")),
                            ("exp_avg_sq", _moment(engine, p, "exp_avg_sq"))):
            saved = reader.read(f"{kind}/{name}", offsets, list(p.shape))
            worst = max(worst, (value - saved).abs().max().item())
    return worst


@pytest.mark.parametrize("name", list(RESUMED_AT))
def test_checkpoint_loads_at_another_layout_and_training_continues(name, saved_run, uninterrupted, tmp_path,
                                                                    corpus):
    ranks, layout = RESUMED_AT[name]
    ckpt = Path(saved_run) / "pretrain/checkpoints/step_00000004"
    base = ["model.preset=debug", "pretrain.seq_len=64", "pretrain.micro_batch_size=2",
            "pretrain.global_batch_size=4"] + [f"{k}={v}" for k, v in layout.items()]
    assert max(run_ranks(ranks, check_loaded_state, str(ckpt), base)) == 0.0

    run_dir = tmp_path / name
    _copy(Path(saved_run), run_dir)
    run_cli(*pretrain_args(corpus, run_dir, steps=STEPS, **layout), nproc=ranks)
    assert_same_curves(run_dir / "pretrain", uninterrupted, 1e-6, 1e-6)


def test_bf16_checkpoint_resumes_at_another_layout_bit_exact(corpus, tmp_path):
    """bf16 saved at EP2 ZeRO-1 after step 2: at TP2 ZeRO-2 every rank reads back the fp32 master weights
    and Adam moments bit for bit, and the resumed run continues the uninterrupted bf16 curve (bf16 layout
    tolerances: tests/conftest.py)."""
    saved, resumed = {"pretrain.dtype": "bf16", "parallel.ep": 2}, {"parallel.tp": 2, "parallel.zero_stage": 2}
    run_cli(*pretrain_args(corpus, tmp_path / "full", steps=4, **saved), nproc=2)
    run_cli(*pretrain_args(corpus, tmp_path / "cut", steps=4, **saved, **{"pretrain.stop_after": 2}), nproc=2)
    base = ["model.preset=debug", "pretrain.seq_len=64", "pretrain.micro_batch_size=2",
            "pretrain.global_batch_size=4", "pretrain.dtype=bf16"] + [f"{k}={v}" for k, v in resumed.items()]
    ckpt = tmp_path / "cut/pretrain/checkpoints/step_00000002"
    assert max(run_ranks(2, check_loaded_state, str(ckpt), base)) == 0.0
    run_cli(*pretrain_args(corpus, tmp_path / "cut", steps=4, **{"pretrain.dtype": "bf16"}, **resumed), nproc=2)
    assert [m["step"] for m in training_steps(tmp_path / "cut/pretrain")] == [1, 2, 3, 4]
    assert_same_curves(tmp_path / "cut/pretrain", tmp_path / "full/pretrain", BF16_LOSS_TOL, BF16_GRAD_NORM_TOL)


def test_sigterm_saves_and_the_restart_continues_the_curve(corpus, tmp_path):
    reference = tmp_path / "reference"
    run_cli(*pretrain_args(corpus, reference, steps=30, **{"pretrain.save_every": 1000}), nproc=2)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "trainer",
           *pretrain_args(corpus, killed, steps=30, **{"pretrain.save_every": 1000})]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = killed / "pretrain/metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to the ranks
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out
    stopped = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 5 <= stopped < 30, out
    latest = (killed / "pretrain/checkpoints/latest").read_text().strip()
    assert latest == f"step_{stopped:08d}"
    run_cli(*pretrain_args(corpus, killed, steps=30, **{"pretrain.save_every": 1000}), nproc=2)
    assert [m["step"] for m in training_steps(killed / "pretrain")] == list(range(1, 31))
    assert_same_curves(killed / "pretrain", reference / "pretrain", 1e-6, 1e-6)


def _engine(tmp_path):
    from trainer import distributed as D
    from trainer.config import load_config, model_config_of
    from trainer.engine import build_engine, build_model
    from parallel.layout import Layout

    D.init_distributed()
    cfg = load_config(str(ROOT / "recipes/quickstart.yaml"),
                      ["model.preset=debug", "model.vocab_size=512", "pretrain.micro_batch_size=2",
                       "pretrain.global_batch_size=2"])
    mcfg = model_config_of(cfg)
    layout = Layout.build(cfg.parallel, mcfg, cfg.pretrain, 1, 0)
    engine = build_engine(build_model(mcfg, None, 0, layout, cfg.parallel), cfg.pretrain, cfg.parallel, layout)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, _ = engine(tokens)
    engine.backward(logits.float().logsumexp(-1).mean())
    engine.step()
    return engine


def test_interrupted_write_leaves_latest_loadable(tmp_path, monkeypatch):
    from trainer import checkpoint as C

    engine = _engine(tmp_path)
    root = tmp_path / "checkpoints"
    C.save_checkpoint(root, 1, engine, {}, "x: 1\n")
    real_replace = os.replace

    def crash_before_rename(src, dst):
        if str(src).endswith(".tmp") and "step_" in str(src):
            raise KeyboardInterrupt("killed between writing and renaming")
        real_replace(src, dst)

    monkeypatch.setattr(C.os, "replace", crash_before_rename)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(root, 2, engine, {}, "x: 2\n")
    monkeypatch.setattr(C.os, "replace", real_replace)
    assert C.latest_checkpoint(root).name == "step_00000001"
    assert (root / "step_00000002.tmp").exists() and not (root / "step_00000002").exists()
    assert C.load_checkpoint(C.latest_checkpoint(root), engine)["step"] == 1


def test_corruption_and_truncation_are_named(tmp_path):
    from trainer import checkpoint as C

    engine = _engine(tmp_path)
    path = C.save_checkpoint(tmp_path / "c", 1, engine, {}, "")
    shard = path / "rank00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor's bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(C.CheckpointError, match=r"rank00000.safetensors: tensor '.*' is corrupted"):
        C.load_checkpoint(path, engine)
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(C.CheckpointError, match=r"rank00000.safetensors: cannot read tensor"):
        C.load_checkpoint(path, engine)


def test_keep_last_and_every(tmp_path):
    from trainer import checkpoint as C

    engine = _engine(tmp_path)
    for step in range(1, 8):
        C.save_checkpoint(tmp_path / "k", step, engine, {}, "", keep_last=2, keep_every=3)
    kept = sorted(p.name for p in (tmp_path / "k").glob("step_*"))
    assert kept == ["step_00000003", "step_00000006", "step_00000007"]


def test_hf_export_of_a_sharded_checkpoint_equals_the_single_process_export(saved_run, corpus, tmp_path):
    """Export the TP2 x EP2 checkpoint and that of the same 4 steps on one process: same logits."""
    from transformers import MixtralForCausalLM
    from trainer.export import export_checkpoint

    single = tmp_path / "single"
    run_cli(*pretrain_args(corpus, single, steps=STEPS, **{"parallel.zero_stage": 0, "pretrain.stop_after": 4}))
    export_checkpoint(single / "pretrain", tmp_path / "hf-single", dtype="fp32")
    export_checkpoint(Path(saved_run) / "pretrain", tmp_path / "hf-sharded", dtype="fp32")
    tokens = torch.randint(0, 32000, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = MixtralForCausalLM.from_pretrained(tmp_path / "hf-single").eval()(tokens).logits
        b = MixtralForCausalLM.from_pretrained(tmp_path / "hf-sharded").eval()(tokens).logits
    assert (a - b).abs().max() < 1e-4
