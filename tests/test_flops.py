"""model/flops.py against arithmetic done by hand and against the parameters of the real module."""

import pytest
import torch

from model import Mixtral, model_config
from model.flops import active_params, flops_per_token, mfu, param_counts, total_params

SMALL = dict(vocab_size=10, dim=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, num_experts=4,
             top_k=2, expert_dim=6)


def test_small_config_by_hand():
    cfg = model_config(**SMALL)
    # embedding 10*8 = 80; output (LM head) 10*8 = 80
    # attention per layer: wq 8*(2*4) = 64, wk 8*(1*4) = 32, wv 32, wo 64 -> 192; 2 layers -> 384
    # norms: 2 per layer * 8 * 2 layers + final 8 = 40
    # router: 4 experts * 8 * 2 layers = 64
    # experts: 2 layers * 4 experts * 3 matrices * 8 * 6 = 1152; no shared expert, no dense layer
    expected = dict(embedding=80, attention=384, norms=40, router=64, experts=1152, ffn=0, output=80)
    assert param_counts(cfg) == expected
    assert total_params(cfg) == 80 + 384 + 40 + 64 + 1152 + 80 == 1800
    assert active_params(cfg) == 1800 - 1152 + 1152 * 2 // 4 == 1224

    f = flops_per_token(cfg, seq_len=16)
    assert f["dense"] == 6 * (384 + 40 + 80) == 3024  # LM head counted, token embedding not
    assert f["router"] == 6 * 64 == 384
    assert f["experts"] == 6 * 1152 * 2 / 4 == 3456
    assert f["attention"] == 12 * 2 * 2 * 4 * 16 == 3072  # 12 * layers * heads * head_dim * seq, no halving
    assert f["total"] == 3024 + 384 + 3456 + 3072 == 9936

    # layer 0 dense (MLP of hidden top_k * expert_dim = 12), layer 1 with a gated shared expert of hidden 5
    mixed = model_config(**SMALL, dense_layers=1, shared_expert_dim=5, shared_expert_gate=True)
    c = param_counts(mixed)
    assert (c["router"], c["experts"]) == (32, 576)  # one MoE layer left
    assert c["ffn"] == 3 * 8 * 12 + (3 * 8 * 5 + 8) == 416
    assert flops_per_token(mixed, seq_len=16)["dense"] == 6 * (384 + 40 + 416 + 80)

    windowed = flops_per_token(model_config(**SMALL, sliding_window=4), seq_len=16)
    assert windowed["attention"] == 12 * 2 * 2 * 4 * 4 == 768  # min(window 4, seq 16) keys per query
    assert windowed["total"] == 9936 - 3072 + 768
    assert flops_per_token(model_config(**SMALL, sliding_window=64), seq_len=16)["total"] == 9936

    assert mfu(tokens_per_second=1000, flops_per_token=9936, peak_flops=1e8) == pytest.approx(0.09936)


@pytest.mark.parametrize("overrides", [SMALL, dict(preset="tiny"), dict(preset="debug"),
                                       dict(SMALL, dense_layers=1, shared_expert_dim=5, shared_expert_gate=True)])
def test_total_params_equal_the_module(overrides):
    cfg = model_config(**overrides)
    model = Mixtral(cfg)
    assert total_params(cfg) == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".moe.experts." in n)
    assert active_params(cfg) == total_params(cfg) - experts + experts * cfg.top_k // cfg.num_experts


def test_mixtral_8x7b():
    cfg = model_config("mixtral-8x7b")
    with torch.device("meta"):
        assert total_params(cfg) == sum(p.numel() for p in Mixtral(cfg).parameters()) == 46_702_792_704
    assert round(active_params(cfg) / 1e9, 1) == 12.9
    # torchtitan's expression: 6 * (active params - token embedding) + 12 * l * h * q * t
    f = flops_per_token(cfg, seq_len=4096)
    assert f["total"] == 6 * (active_params(cfg) - 32000 * 4096) + 12 * 32 * 32 * 128 * 4096
