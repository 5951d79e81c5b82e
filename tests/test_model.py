"""The single-device model against independent references: documents run alone, the reference
attention, transformers' Mixtral (MoE block, load-balancing loss), hand formulas."""

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

from conftest import sparse_moe_state

from model import Mixtral, load_balancing_loss, model_config, router_z_loss
from model.attention import flash_attn_varlen_func
from model.moe import MoE

CFG = model_config("debug", vocab_size=1000, rope_theta=5000.0, attention="reference")


def build(cfg=CFG, seed=0) -> Mixtral:
    m = Mixtral(cfg)
    m.init_weights(seed)
    return m.eval()


def set_backend(model, backend):
    for layer in model.layers:
        layer.attention.backend = backend


def randint(*shape, high=CFG.vocab_size, seed=1):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def hf_twin(model: Mixtral) -> MixtralForCausalLM:
    """transformers' Mixtral with our weights, mapped here by hand (independent of model/hf.py)."""
    c = model.cfg
    hf = MixtralForCausalLM(MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.expert_dim,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        num_local_experts=c.num_experts, num_experts_per_tok=c.top_k, sliding_window=c.sliding_window,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, rms_norm_eps=c.norm_eps))
    sd = model.state_dict()
    hd = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
          "lm_head.weight": sd["output.weight"]}
    for i in range(c.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        hd[q + "input_layernorm.weight"] = sd[p + "attention_norm.weight"]
        hd[q + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
        for ours, theirs in zip(("wq", "wk", "wv", "wo"), ("q_proj", "k_proj", "v_proj", "o_proj")):
            hd[q + f"self_attn.{theirs}.weight"] = sd[p + f"attention.{ours}.weight"]
        moe_state = sparse_moe_state(model.layers[i].moe)
        hd |= {q + "mlp." + k: v for k, v in moe_state.items()}
    hf.load_state_dict(hd, strict=True)
    return hf.eval()


# ---- attention ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("window", [None, 3])
def test_packed_documents_equal_documents_alone(backend, window):
    model = build(model_config("debug", vocab_size=1000, sliding_window=window, attention=backend))
    lengths = [5, 7, 4]
    docs = [randint(1, n, seed=s) for s, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids)[0]
        alone = torch.cat([model(d)[0] for d in docs], dim=1)
    assert (logits - alone).abs().max() < 1e-5


HAS_FLASH = flash_attn_varlen_func is not None and torch.cuda.is_available()


@pytest.mark.parametrize("backend", ["sdpa", pytest.param("flash", marks=pytest.mark.skipif(
    not HAS_FLASH, reason="flash_attn needs CUDA"))])
@pytest.mark.parametrize("window", [None, 4])
def test_backend_agrees_with_reference(backend, window):
    flash = backend == "flash"
    device, dtype, tol = ("cuda", torch.bfloat16, 2e-2) if flash else ("cpu", torch.float32, 1e-5)
    model = build(model_config("debug", vocab_size=1000, sliding_window=window)).to(device, dtype)
    tokens = randint(2, 16).to(device)
    packed = torch.tensor([list(range(6)) + list(range(10)), list(range(3)) + list(range(13))], device=device)
    for position_ids in (None, packed):
        outputs = []
        for b in (backend, "reference"):
            set_backend(model, b)
            with torch.no_grad():
                outputs.append(model(tokens, position_ids=position_ids)[0].float())
        assert (outputs[0] - outputs[1]).abs().max() < tol


def test_sliding_window_limits_what_a_position_sees():
    # one layer: token j can influence position i only when 0 <= i - j < window
    window, T = 4, 10
    model = build(model_config(vocab_size=1000, num_layers=1, sliding_window=window))
    tokens = randint(1, T)
    changed = tokens.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 1000
    with torch.no_grad():
        moved = (model(tokens)[0] - model(changed)[0]).abs().amax(-1)[0]
    # beyond the window only rounding moves (the MoE's grouped GEMMs see a different token order)
    assert (moved[:2] < 1e-6).all() and (moved[2 + window:] < 1e-6).all()
    assert (moved[2:2 + window] > 1e-3).all()
    full = build(model_config(vocab_size=1000, num_layers=1))
    with torch.no_grad():
        assert (full(tokens)[0] - full(changed)[0]).abs().amax(-1)[0, -1] > 1e-4


# ---- MoE ------------------------------------------------------------------------------------------

def test_router_weights_are_softmax_over_selected_logits():
    moe = MoE(dim=16, num_experts=6, top_k=3, expert_dim=8)
    x = torch.randn(20, 16)
    logits, weights, indices = moe.router(x)
    assert torch.equal(indices.sort(-1).values, logits.topk(3, -1).indices.sort(-1).values)
    expected = torch.softmax(logits.gather(-1, indices), dim=-1)
    assert torch.allclose(weights, expected, atol=1e-6)


@pytest.mark.parametrize("dim,expert_dim", [(64, 128), (64, 32), (20, 10)],  # weight on output / hidden rows
                         ids=["grouped_mm", "grouped_mm-fine", "unaligned-loop"])
def test_moe_equals_transformers_sparse_moe_block(dim, expert_dim):
    torch.manual_seed(0)
    E, k = 6, 2
    moe = MoE(dim, E, k, expert_dim)
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():  # experts 4 and 5 get negative logits for positive inputs: they stay idle
        moe.router.gate.weight.abs_()
        moe.router.gate.weight[4:] *= -1
    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=dim, intermediate_size=expert_dim,
                                                num_local_experts=E, num_experts_per_tok=k))
    block.load_state_dict(sparse_moe_state(moe), strict=True)
    x = torch.randn(3, 7, dim).abs().requires_grad_()
    x_hf = x.detach().clone().requires_grad_()
    out, (counts, *_) = moe(x)
    expected = block(x_hf)
    assert counts[4:].sum() == 0 and counts.sum() == 3 * 7 * k
    assert (out - expected).abs().max() < 1e-5
    out.square().sum().backward()
    expected.square().sum().backward()
    assert (x.grad - x_hf.grad).abs().max() < 1e-4
    assert (moe.router.gate.weight.grad - block.gate.weight.grad).abs().max() < 1e-4
    down_grad = moe.experts.w2.grad.transpose(1, 2)
    assert (down_grad - block.experts.down_proj.grad).abs().max() < 1e-4 and down_grad[4:].abs().max() == 0


@pytest.mark.parametrize("dim,out", [(64, 32), (20, 10)], ids=["grouped_mm", "unaligned-loop"])
def test_grouped_mm_traces_under_torch_compile(dim, out):
    """model.moe.grouped_mm wraps the private torch._grouped_mm as a custom op: torch.compile traces it
    (fullgraph, fp32: the built-in op's meta function refuses fp32) and its backward equals a plain loop,
    an empty group included."""
    from model.moe import grouped_mm

    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 9, 2])
    x, w = torch.randn(16, dim, requires_grad=True), torch.randn(4, dim, out, requires_grad=True)
    bounds = [0] + counts.cumsum(0).tolist()
    plain = torch.cat([x[bounds[e]:bounds[e + 1]] @ w[e] for e in range(4)])
    compiled = torch.compile(grouped_mm, backend="aot_eager", fullgraph=True)
    got = compiled(x, w, counts.cumsum(0).to(torch.int32))
    torch.testing.assert_close(got, plain)
    g = torch.randn_like(plain)
    for a, b in zip(torch.autograd.grad(got, (x, w), g), torch.autograd.grad(plain, (x, w), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dim,hidden", [(64, 32), (32, 64)], ids=["weight-on-hidden", "weight-on-output"])
def test_experts_trace_under_torch_compile_and_equal_a_token_loop(dim, hidden):
    """The routed experts (gather, w1|w3 GEMM, SwiGLU, w2 GEMM, weighted sum) trace whole (fullgraph)
    and equal, with their gradients, a loop over tokens and choices:
    y_t = sum_j weight_tj * (silu(x_t w1[e]) * (x_t w3[e])) w2[e], e = expert_tj."""
    torch.manual_seed(0)
    moe = MoE(dim, 4, 2, hidden)
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=dim ** -0.5)
    x = torch.randn(24, dim, requires_grad=True)
    _, weights, indices = moe.router(x)
    weights = weights.detach()
    ex = moe.experts
    loop = torch.stack([sum(weights[t, j] * (F.silu(x[t] @ ex.w1[e]) * (x[t] @ ex.w3[e])) @ ex.w2[e]
                            for j, e in enumerate(indices[t].tolist())) for t in range(len(x))])
    compiled = torch.compile(ex, backend="aot_eager", fullgraph=True)
    got = compiled(x, indices, weights)
    torch.testing.assert_close(got, loop)
    g = torch.randn_like(loop)
    params = (x, ex.w1, ex.w3, ex.w2)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(loop, params, g)):
        torch.testing.assert_close(a, b)


def test_aux_loss_equals_transformers_and_z_loss_equals_formula():
    model = build()
    hf = hf_twin(model)
    tokens = randint(2, 12)
    router_logits = []
    hooks = [layer.moe.router.register_forward_hook(lambda m, i, o: router_logits.append(o[0]))
             for layer in model.layers]
    with torch.no_grad():
        logits, stats = model(tokens)
        out = hf(tokens, output_router_logits=True)
    for h in hooks:
        h.remove()
    assert (logits - out.logits).abs().max() < 1e-4
    expected = load_balancing_loss_func(out.router_logits, CFG.num_experts, CFG.top_k)
    assert abs(load_balancing_loss(stats).item() - expected.item()) < 1e-6
    # z-loss (ST-MoE): mean over layers and tokens of log(sum_e exp(logit_e))^2
    z = torch.stack([torch.log(torch.exp(lg.double()).sum(-1)).square().mean() for lg in router_logits])
    z = z.mean()
    assert abs(router_z_loss(stats).item() - z.item()) < 1e-5 * z.item()


# ---- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(preset="mixtral-9x9b"), r"model\.preset: unknown preset 'mixtral-9x9b'"),
    (dict(num_heads=6, num_kv_heads=4), r"num_heads \(6\) is not divisible by num_kv_heads \(4\)"),
    (dict(dim=64, num_heads=6, num_kv_heads=2), r"dim \(64\) is not divisible by num_heads \(6\)"),
    (dict(num_experts=4, top_k=5), r"top_k \(5\) exceeds num_experts \(4\)"),
    (dict(expert_dim=0), r"expert_dim must be positive, got 0"),
    (dict(sliding_window=0), r"sliding_window must be positive"),
    (dict(attention="xformers"), r"attention 'xformers'"),
])
def test_model_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        model_config(**kwargs)


def test_overrides_replace_preset_values():
    cfg = model_config("debug", num_layers=1, top_k=1)
    assert (cfg.num_layers, cfg.top_k, cfg.dim) == (1, 1, 64)


def test_mixtral_8x7b_parameter_counts_on_meta_device():
    cfg = model_config("mixtral-8x7b")
    with torch.device("meta"):
        model = Mixtral(cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".moe.experts." in n)
    active = total - experts + experts * cfg.top_k // cfg.num_experts
    # published: 46.7B total (the Hub index: total_size 93,405,585,408 bytes in bf16), ~12.9B active
    assert total == 93_405_585_408 // 2
    assert round(active / 1e9, 1) == 12.9
