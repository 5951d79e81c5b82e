"""The trainer end to end through its CLI: bad input, exact resume, every layout equal to one process."""

import math

import pytest

from conftest import read_metrics, run_cli

RECIPE = "recipes/quickstart.yaml"


def pretrain_args(corpus, run_dir, steps=10, **extra):
    args = dict({"stages": "[pretrain]", "run_dir": run_dir, "model.preset": "debug",
                 "pretrain.data": corpus, "pretrain.steps": steps, "pretrain.seq_len": 64,
                 "pretrain.micro_batch_size": 2, "pretrain.global_batch_size": 4,
                 "pretrain.lr": 1e-3, "pretrain.warmup_steps": 2, "pretrain.log_every": 1,
                 "pretrain.save_every": 100, "logging.progress": "false"}, **extra)
    return [RECIPE] + [f"{k}={v}" for k, v in args.items()]


def losses(run_dir):
    return [m["loss"] for m in read_metrics(f"{run_dir}/pretrain") if "loss" in m]


@pytest.mark.parametrize("overrides, message", [
    (["pretrain.lrr=1"], "unknown config key 'pretrain.lrr'"),
    (["model.preset=mixtral-1x1"], "unknown preset 'mixtral-1x1'"),
    (["pretrain.lr=fast"], "pretrain.lr"),
    (["stages=[pretrain,finetune]"], "unknown stage 'finetune'"),
    (["model.num_heads=3"], "num_heads (3) is not divisible by num_kv_heads (2)"),
    (["parallel.ep=2", "parallel.zero_stage=0"], "parallel.ep=2 needs parallel.zero_stage 1 or 2"),
    (["pretrain.dtype=bf16", "parallel.zero_stage=0"], "pretrain.dtype=bf16 needs parallel.zero_stage 1 or 2"),
])
def test_bad_config_is_named_before_work(overrides, message):
    proc = run_cli(RECIPE, *overrides, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_bad_data_is_named_before_work(tmp_path):
    missing = tmp_path / "nope.jsonl"
    proc = run_cli(RECIPE, f"tokenize.inputs=[{missing}]", f"run_dir={tmp_path}", check=False)
    assert proc.returncode == 2 and str(missing) in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    proc = run_cli(RECIPE, f"tokenize.inputs=[{bad}]", f"run_dir={tmp_path}", check=False)
    assert proc.returncode == 2 and f"{bad}:2" in proc.stderr.replace(", line ", ":")


def test_resume_reproduces_the_uninterrupted_run(corpus, tmp_path):
    run_cli(*pretrain_args(corpus, tmp_path / "full", steps=8))
    run_cli(*pretrain_args(corpus, tmp_path / "cut", steps=8, **{"pretrain.stop_after": 3}))
    assert not (tmp_path / "cut/pretrain/DONE").exists()
    run_cli(*pretrain_args(corpus, tmp_path / "cut", steps=8))
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert len(full) == len(cut) == 8
    assert max(abs(a - b) for a, b in zip(full, cut)) < 1e-6, (full, cut)


LAYOUTS = {  # name: (ranks, overrides)
    "dp2-zero1": (2, {"parallel.zero_stage": 1}),
    "dp2-zero2": (2, {"parallel.zero_stage": 2}),
    "tp2": (2, {"parallel.tp": 2}),
    "tp2-sp": (2, {"parallel.tp": 2, "parallel.sp": "true"}),
    "ep2": (2, {"parallel.ep": 2}),
    "tp2-ep2": (4, {"parallel.tp": 2, "parallel.ep": 2}),
}


@pytest.fixture(scope="module")
def single_process_curve(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    run_cli(*pretrain_args(corpus, run_dir, **{"parallel.zero_stage": 0}))
    return losses(run_dir)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_like_one_process(layout, corpus, tmp_path, single_process_curve):
    ranks, overrides = LAYOUTS[layout]
    run_cli(*pretrain_args(corpus, tmp_path, **overrides), nproc=ranks)
    curve = losses(tmp_path)
    assert len(curve) == len(single_process_curve) == 10
    assert all(math.isfinite(x) for x in curve)
    diff = max(abs(a - b) for a, b in zip(curve, single_process_curve))
    assert diff < 1e-4, f"{layout}: {curve} vs {single_process_curve}"
