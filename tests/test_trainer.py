"""The trainer end to end through its CLI: bad input, exact resume, every layout equal to one process
(loss and grad norm, fp32 and bf16)."""

import pytest

from conftest import BF16_GRAD_NORM_TOL, BF16_LOSS_TOL, assert_same_curves, pretrain_args, read_metrics, run_cli

RECIPE = "recipes/quickstart.yaml"


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
    "tp2-expert_tp": (2, {"parallel.tp": 2, "parallel.expert_tp": "true"}),
    # DeepSpeed's capacity-based MoE: capacity = ceil(k N / E x C) with C = E / k = 2 is N, the rank's
    # 128 tokens, more than any expert can receive: nothing is dropped, so it equals dropless routing
    "ep2-deepspeed-moe": (2, {"parallel.ep": 2, "parallel.moe_impl": "deepspeed",
                              "parallel.capacity_factor": 2.0}),
}
FP32_TOL = 1e-6  # relative, loss and grad norm: the layouts only sum in another order

BF16_STEPS = 4
BF16_LAYOUTS = ["dp2-zero1", "dp2-zero2", "tp2-sp", "ep2", "tp2-ep2"]


@pytest.fixture(scope="module")
def single_process(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    run_cli(*pretrain_args(corpus, run_dir, **{"parallel.zero_stage": 0}))
    return run_dir / "pretrain"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_like_one_process(layout, corpus, tmp_path, single_process):
    ranks, overrides = LAYOUTS[layout]
    run_cli(*pretrain_args(corpus, tmp_path, **overrides), nproc=ranks)
    assert_same_curves(tmp_path / "pretrain", single_process, FP32_TOL, FP32_TOL)


@pytest.fixture(scope="module")
def single_process_bf16(corpus, tmp_path_factory):
    """One bf16 process (ZeRO-1 over a data-parallel group of one: bf16's fp32 master weights and Adam
    state live in ZeRO's optimizer)."""
    run_dir = tmp_path_factory.mktemp("single-bf16")
    run_cli(*pretrain_args(corpus, run_dir, steps=BF16_STEPS, **{"pretrain.dtype": "bf16"}))
    return run_dir / "pretrain"


@pytest.mark.parametrize("layout", BF16_LAYOUTS)
def test_bf16_layout_trains_like_one_bf16_process(layout, corpus, tmp_path, single_process_bf16):
    ranks, overrides = LAYOUTS[layout]
    run_cli(*pretrain_args(corpus, tmp_path, steps=BF16_STEPS, **overrides, **{"pretrain.dtype": "bf16"}),
            nproc=ranks)
    assert_same_curves(tmp_path / "pretrain", single_process_bf16, BF16_LOSS_TOL, BF16_GRAD_NORM_TOL)
