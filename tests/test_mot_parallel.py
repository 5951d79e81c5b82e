"""Mixture of Tokens under every parallelism through the trainer's CLI: loss and grad norm of each step equal
one process. Data parallelism forms the groups inside each rank's micro-batch, which are the micro-batches
one process accumulates (data/stream.py), so every layout computes the same mixtures; ep2 (dp = 2, each
rank's own micro-batch) checks that with the expert-parallel exchange."""

import pytest

from conftest import assert_same_curves, pretrain_args, read_metrics, run_cli

STEPS = 4
MOT = {"model.moe_type": "tokens", "model.mot_group_size": 2, "model.mot_learnable_temperature": "true",
       "pretrain.valid_fraction": 0.5, "pretrain.eval_batches": 2}
LAYOUTS = {  # name: (ranks, overrides)
    "tp2-expert_tp": (2, {"parallel.tp": 2, "parallel.expert_tp": "true"}),
    "tp2-sp-expert_tp": (2, {"parallel.tp": 2, "parallel.sp": "true", "parallel.expert_tp": "true"}),
    "ep2": (2, {"parallel.ep": 2}),
}
FP32_TOL = 1e-6


def held_out_loss(run) -> float:
    return [m for m in read_metrics(run) if "eval/loss" in m][-1]["eval/loss"]


@pytest.fixture(scope="module")
def single_process(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mot-single")
    run_cli(*pretrain_args(corpus, run_dir, steps=STEPS, **MOT, **{"parallel.zero_stage": 0}))
    return run_dir / "pretrain"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mixture_of_tokens_layout_trains_like_one_process(layout, corpus, tmp_path, single_process):
    ranks, overrides = LAYOUTS[layout]
    run_cli(*pretrain_args(corpus, tmp_path, steps=STEPS, **MOT, **overrides), nproc=ranks)
    assert_same_curves(tmp_path / "pretrain", single_process, FP32_TOL, FP32_TOL)
    if "tp" in layout:  # the same evaluation micro-batches (dp deals the held-out rows over its ranks)
        assert held_out_loss(tmp_path / "pretrain") == pytest.approx(held_out_loss(single_process), rel=FP32_TOL)
