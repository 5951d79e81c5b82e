"""Mixture of Tokens (model/mot.py) on one device: the layer against a plain loop over groups, positions and
experts; causality and padding through the whole model; the group-size rules; the conversion to the sparse
layer that transition tuning starts from."""

import pytest
import torch
import torch.nn.functional as F

from model import Mixtral, model_config
from model.init import StateDictSource
from model.mot import MixtureOfTokens
from trainer.config import ConfigError, load_config
from trainer.transition import SparseFromMixtureOfTokens


def reference_mixture(x, mask, controller, logit_scale, temperature, w1, w3, w2, group_size):
    """The paper's formula, one group, position and expert at a time."""
    B, T, D = x.shape
    E = controller.shape[0]
    G = min(B, group_size)
    y = torch.zeros_like(x)
    for first in range(0, B, G):
        rows = range(first, first + G)
        for t in range(T):
            kept = [i for i in rows if mask is None or mask[i, t]]
            for e in range(E):
                logits = torch.stack([x[i, t] @ controller[e] * logit_scale / temperature for i in kept])
                weights = torch.softmax(logits, 0)
                mixed = sum(w * x[i, t] for w, i in zip(weights, kept))
                out = (F.silu(mixed @ w1[e]) * (mixed @ w3[e])) @ w2[e]
                for w, i in zip(weights, kept):
                    y[i, t] += w * out
    return y


@pytest.mark.parametrize("batch, group_size, learnable, masked", [
    (6, 2, False, False),
    (4, 4, True, True),
    (3, 8, True, False),  # a micro-batch below the group size: one group of all its rows
])
def test_layer_equals_the_formula(batch, group_size, learnable, masked):
    torch.manual_seed(0)
    D, E, F_ = 8, 5, 6
    layer = MixtureOfTokens(D, E, F_, group_size, temperature=0.7, learnable_temperature=learnable)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.5)
    x = torch.randn(batch, 3, D, requires_grad=True)
    mask = torch.rand(batch, 3) > 0.3 if masked else None
    y, stats = layer(x, mask)

    scale = layer.logit_scale if learnable else torch.ones(())
    params = [layer.controller.weight, layer.experts.w1, layer.experts.w3, layer.experts.w2]
    leaves = [x, *params] + ([scale] if learnable else [])
    exact = [t.detach().double().requires_grad_() for t in leaves]  # the reference runs in fp64
    x64, *p64 = exact
    s64 = p64.pop() if learnable else torch.ones((), dtype=torch.float64)
    want = reference_mixture(x64, mask, p64[0], s64.squeeze(), 0.7, *p64[1:], group_size)
    # The layer accumulates in fp32 (grouped GEMMs, softmax over a group): fp32 error against the exact value.
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, want.float(), **close)
    if masked:
        assert (y[~mask] == 0).all()
    g = torch.randn_like(y)
    got_grads = torch.autograd.grad(y, leaves, g)
    want_grads = torch.autograd.grad(want, exact, g.double())
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b.float(), **close)
    assert stats[0].tolist() == [batch // min(batch, group_size) * 3.0] * E  # one mixture per group and position


def test_batch_not_divisible_by_the_group_is_named():
    layer = MixtureOfTokens(4, 2, 4, group_size=4)
    with pytest.raises(ValueError, match="model.mot_group_size"):
        layer(torch.randn(6, 2, 4))
    with pytest.raises(ConfigError, match=r"pretrain.micro_batch_size \(6\) is not divisible by model.mot_group_size \(4\)"):
        load_config("recipes/mot_quickstart.yaml", ["pretrain.micro_batch_size=6", "pretrain.global_batch_size=6"])


@pytest.mark.parametrize("overrides, message", [
    (["model.moe_type=dense"], "moe_type 'dense' is not one of"),
    (["model.mot_group_size=0"], "mot_group_size must be positive"),
    (["stages=[pretrain,sft]", "sft.data=x.jsonl"], "model.moe_type=tokens in stage 'sft'"),
    (["parallel.moe_impl=deepspeed"], "model.moe_type=tokens needs parallel.moe_impl=dropless"),
    (["transition.valid_fraction=0"], "transition.valid_fraction must be > 0"),
])
def test_bad_mixture_of_tokens_config_is_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("recipes/mot_quickstart.yaml", overrides)


def small_model(**overrides):
    cfg = model_config("debug", vocab_size=300, num_layers=2, moe_type="tokens", **overrides)
    torch.manual_seed(0)
    model = Mixtral(cfg).eval()
    model.init_weights(seed=1)
    with torch.no_grad():  # larger controller logits: mixtures far from uniform
        for layer in model.layers:
            layer.moe.controller.weight.normal_(std=0.5)
    return model


def test_no_output_depends_on_a_later_token_of_any_row():
    model = small_model(mot_group_size=2)
    tokens = torch.randint(0, 300, (4, 12))
    changed = tokens.clone()
    changed[1, 7] = (tokens[1, 7] + 1) % 300
    with torch.no_grad():
        a, b = model(tokens)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)  # every row, every earlier position
    assert (a[0, 7:] - b[0, 7:]).abs().max() > 1e-4  # row 0 shares the group of row 1: it mixes with it
    torch.testing.assert_close(a[2:], b[2:], rtol=0, atol=1e-6)  # rows 2, 3: another group


def test_masked_positions_leak_into_no_other_row():
    """Row 3 is padding from position 4 on: whatever its tokens there, rows 0-2 see the same outputs."""
    model = small_model(mot_group_size=4)
    tokens = torch.randint(0, 300, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[3, 4:] = False
    other = tokens.clone()
    other[3, 4:] = torch.randint(0, 300, (6,))
    with torch.no_grad():
        a, b = model(tokens, mix_mask=mask)[0], model(other, mix_mask=mask)[0]
        unmasked = model(tokens)[0], model(other)[0]
    torch.testing.assert_close(a[:3], b[:3], rtol=0, atol=1e-6)
    assert (unmasked[0][:3, 4:] - unmasked[1][:3, 4:]).abs().max() > 1e-4  # without the mask it would leak


def test_transition_source_is_the_same_experts_with_the_controller_as_router():
    mot = small_model(mot_group_size=2, mot_temperature=0.5, mot_learnable_temperature=True)
    with torch.no_grad():
        for layer in mot.layers:
            layer.moe.logit_scale.fill_(1.5)
    source = SparseFromMixtureOfTokens(StateDictSource(mot.state_dict()), mot.cfg)
    sparse = Mixtral(model_config("debug", vocab_size=300, num_layers=2))
    for name, p in sparse.named_parameters():
        p.data.copy_(source.read(name, p.shape, [0] * p.dim(), p.shape))
    for old, new in zip(mot.layers, sparse.layers):
        torch.testing.assert_close(new.moe.router.gate.weight, old.moe.controller.weight * 1.5 / 0.5)
        for w in ("w1", "w3", "w2"):
            assert torch.equal(getattr(new.moe.experts, w), getattr(old.moe.experts, w))
    assert torch.equal(sparse.output.weight, mot.output.weight)


def test_quickstart_recipe_pretrains_switches_to_sparse_and_exports_a_mixtral(tmp_path):
    """recipes/mot_quickstart.yaml shortened (debug shapes, a few steps): the transition's export is a
    Mixtral that transformers computes like our sparse model read from the transition's checkpoint."""
    import json

    from omegaconf import OmegaConf
    from transformers import MixtralForCausalLM

    from conftest import run_cli
    from trainer.checkpoint import CheckpointError, CheckpointReader, latest_checkpoint
    from trainer.export import export_checkpoint

    short = {f"{stage}.{k}": v for stage in ("pretrain", "transition")
             for k, v in dict(steps=3, seq_len=64, micro_batch_size=4, global_batch_size=4, eval_batches=2,
                              eval_every=0).items()}
    run_cli("recipes/mot_quickstart.yaml", f"run_dir={tmp_path}", "model.preset=debug", "export.sample_prompt=null",
            "stages=[tokenize,pretrain,transition,export]",
            "logging.progress=false", *[f"{k}={v}" for k, v in short.items()], timeout=600)
    for marker in ("data/corpus.idx.DONE", "pretrain/DONE", "transition/DONE", "hf/DONE"):
        assert (tmp_path / marker).is_file(), marker
    losses = json.loads((tmp_path / "transition/transition.json").read_text())
    assert set(losses) >= {"eval_loss_mixture_of_tokens", "eval_loss_switched", "eval_loss_tuned"}
    with pytest.raises(CheckpointError, match="transition stage"):
        export_checkpoint(tmp_path / "pretrain", tmp_path / "refused")

    ckpt = latest_checkpoint(tmp_path / "transition/checkpoints")
    saved = OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml").model)
    assert saved["moe_type"] == "sparse"
    ours = Mixtral(model_config(**{k: v for k, v in saved.items() if k != "preset"})).eval()
    reader = CheckpointReader(ckpt)
    ours.load_state_dict({n: reader.read(f"model/{n}") for n in reader.names("model")})
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, 32000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens)[0], rtol=1e-4, atol=1e-4)
