"""Router variants (model/moe.py) against independent references: transformers' GLM-4-MoE and Qwen2-MoE
blocks, the sign rule written out, a plain fp32 matmul under bf16; bad keys named; and through the
trainer: tp2+sp and ep2 (two data-parallel ranks) give one process's loss, grad norm and balancing bias."""

import pytest
import torch

from conftest import assert_same_curves, pretrain_args, run_cli
from model.config import model_config
from model.moe import MoE, update_expert_bias

D, E, K, F = 32, 8, 2, 24


def moe_with_random_weights(**options) -> MoE:
    torch.manual_seed(0)
    moe = MoE(D, E, K, F, **options)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    if moe.router.expert_bias is not None:  # large enough to change which experts are chosen
        moe.router.expert_bias = torch.randn(E) * 0.3
    return moe


def swiglu_state(mlp) -> dict:
    return {"gate_proj.weight": mlp.w1.weight, "up_proj.weight": mlp.w3.weight, "down_proj.weight": mlp.w2.weight}


def experts_state(moe) -> dict:
    ex = moe.experts
    return {"experts.gate_up_proj": torch.cat([ex.w1.transpose(1, 2), ex.w3.transpose(1, 2)], 1),
            "experts.down_proj": ex.w2.transpose(1, 2), "gate.weight": moe.router.gate.weight}


def compare_with_block(moe, block):
    """Output, input gradient and router gradient of our layer and transformers' block on the same tokens."""
    x = torch.randn(1, 40, D)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = moe(x_ours)[0], block(x_ref)
    g = torch.randn_like(ours)
    (ours * g).sum().backward()
    (ref * g).sum().backward()
    assert (ours - ref).abs().max() < 1e-5
    assert (x_ours.grad - x_ref.grad).abs().max() < 1e-5
    assert (moe.router.gate.weight.grad - block.gate.weight.grad).abs().max() < 1e-5


def test_sigmoid_bias_scale_and_shared_expert_equal_glm4_moe():
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    moe = moe_with_random_weights(score="sigmoid", scale=2.5, balance_bias=True, shared_dim=2 * F)
    block = Glm4MoeMoE(Glm4MoeConfig(hidden_size=D, moe_intermediate_size=F, n_routed_experts=E,
                                     num_experts_per_tok=K, n_shared_experts=2, routed_scaling_factor=2.5,
                                     norm_topk_prob=True, n_group=1, topk_group=1))
    state = experts_state(moe) | {"gate.e_score_correction_bias": moe.router.expert_bias}
    state |= {f"shared_experts.{k}": v for k, v in swiglu_state(moe.shared).items()}
    block.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    compare_with_block(moe, block)


def test_softmax_unnormalised_with_gated_shared_expert_equals_qwen2_moe():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    moe = moe_with_random_weights(norm_topk=False, shared_dim=40, shared_gate=True)
    block = Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E,
                                                  num_experts_per_tok=K, shared_expert_intermediate_size=40,
                                                  norm_topk_prob=False))
    state = experts_state(moe) | {"shared_expert_gate.weight": moe.shared_gate.weight}
    state |= {f"shared_expert.{k}": v for k, v in swiglu_state(moe.shared).items()}
    block.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    compare_with_block(moe, block)


def test_router_computes_in_fp32_in_a_bf16_model():
    moe = moe_with_random_weights(score="sigmoid", balance_bias=True).bfloat16()
    x = torch.randn(64, D).bfloat16()
    logits, weights, _ = moe.router(x)
    w = moe.router.gate.weight
    assert logits.dtype == weights.dtype == torch.float32
    assert torch.allclose(logits, x.float() @ w.float().t(), rtol=0, atol=1e-6)
    assert not torch.equal(logits, (x @ w.t()).float())  # a bf16 matmul rounds
    update_expert_bias(moe, [[1.0] * E], 1e-3)  # a bf16 cast of the module does not stick
    assert moe.router.expert_bias.dtype == torch.float32


def test_bias_update_is_the_sign_of_mean_minus_load():
    moe = moe_with_random_weights(balance_bias=True)
    before = moe.router.expert_bias.clone()
    counts = [30, 10, 20, 20, 25, 15, 20, 20]  # mean 20: under-, over- and exactly loaded experts
    update_expert_bias(moe, [[c / 160 for c in counts]], 0.01)
    expected = [b + (0.01 if c < 20 else -0.01 if c > 20 else 0.0) for b, c in zip(before.tolist(), counts)]
    assert torch.allclose(moe.router.expert_bias, torch.tensor(expected), rtol=0, atol=1e-7)


@pytest.mark.parametrize("overrides, key", [
    (dict(top_k=9), "top_k (9) exceeds num_experts (8)"),
    (dict(router_score="tanh"), "router_score 'tanh'"),
    (dict(router_bias_rate=-1.0), "router_bias_rate"),
    (dict(shared_expert_gate=True), "shared_expert_gate needs shared_expert_dim"),
    (dict(dense_layers=4), "dense_layers (4)"),
])
def test_bad_router_config_names_the_key(overrides, key):
    with pytest.raises(ValueError, match="model config: .*") as e:
        model_config("tiny", **overrides)
    assert key in str(e.value)


def test_bad_router_config_is_one_error_line_before_work():
    proc = run_cli("recipes/quickstart.yaml", "model.router_score=tanh", check=False)
    assert proc.returncode == 2 and "router_score 'tanh'" in proc.stderr


# all the new options at once: one dense layer, sigmoid scores, scale, balancing bias, gated shared expert
VARIANTS = {"model.router_score": "sigmoid", "model.router_scale": 2.0, "model.router_bias_rate": 0.01,
            "model.shared_expert_dim": 64, "model.shared_expert_gate": "true", "model.dense_layers": 1}
LAYOUTS = {"tp2-sp": {"parallel.tp": 2, "parallel.sp": "true"}, "ep2": {"parallel.ep": 2}}
STEPS = 6


def final_bias(stage_folder) -> torch.Tensor:
    from trainer.checkpoint import CheckpointReader, latest_checkpoint

    return CheckpointReader(latest_checkpoint(stage_folder / "checkpoints")).read(
        "model/layers.1.moe.router.expert_bias")


@pytest.fixture(scope="module")
def single_process_variants(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single-variants")
    run_cli(*pretrain_args(corpus, run_dir, steps=STEPS, **VARIANTS, **{"parallel.zero_stage": 0}))
    return run_dir / "pretrain"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_router_variants_train_like_one_process(layout, corpus, tmp_path, single_process_variants):
    """ep2 runs two data-parallel ranks of half the batch each: the bias, updated from the global load of
    the step (both ranks, both micro-batches of the single process), must be the single process's."""
    run_cli(*pretrain_args(corpus, tmp_path, steps=STEPS, **VARIANTS, **LAYOUTS[layout]), nproc=2)
    assert_same_curves(tmp_path / "pretrain", single_process_variants, 1e-6, 1e-6)
    bias, reference = final_bias(tmp_path / "pretrain"), final_bias(single_process_variants)
    assert reference.abs().max() > 0 and torch.equal(bias, reference), (bias, reference)
