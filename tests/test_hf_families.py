"""Exports of the routers Mixtral cannot express (model/hf_families.py): each loads in its transformers
family with our logits and imports back exactly; a router no family carries is refused by name."""

import pytest
import torch

from model import Mixtral
from model.config import model_config
from model.hf import HFCheckpointError, export_hf, import_hf

FAMILIES = {  # transformers class: our options
    "Glm4MoeForCausalLM": dict(router_score="sigmoid", router_scale=2.5,
                               shared_expert_dim=256, dense_layers=1, dense_dim=200),
    "Qwen2MoeForCausalLM": dict(router_norm_topk=False, shared_expert_dim=96, shared_expert_gate=True,
                                dense_layers=1),
}


@pytest.mark.parametrize("architecture", list(FAMILIES))
def test_export_loads_in_its_family_with_equal_logits_and_imports_back(architecture, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = model_config("debug", vocab_size=500, num_layers=3, **FAMILIES[architecture])
    model = Mixtral(cfg)
    model.init_weights(0)
    for layer in model.layers[cfg.dense_layers:]:
        if layer.moe.router.expert_bias is not None:  # sigmoid routers: large enough to change the choice
            layer.moe.router.expert_bias = torch.randn(cfg.num_experts) * 0.05
    export_hf(model.state_dict(), cfg, tmp_path / "hf", dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == architecture
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ours = model(tokens)[0]
        assert (hf(tokens).logits - ours).abs().max() < 1e-4

    back_cfg, state = import_hf(tmp_path / "hf")
    for key in FAMILIES[architecture]:
        assert getattr(back_cfg, key) == getattr(cfg, key), key
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("options, feature", [
    (dict(router_bias_rate=1e-3), "model.router_bias_rate > 0 with model.router_score=softmax"),
    (dict(router_scale=2.0), "model.router_scale=2.0 with model.router_score=softmax"),
    (dict(shared_expert_dim=64), "ungated or no shared expert"),
    (dict(router_score="sigmoid", shared_expert_dim=128, shared_expert_gate=True), "model.shared_expert_gate"),
    (dict(router_score="sigmoid", shared_expert_dim=100), "model.shared_expert_dim=100"),
])
def test_export_refuses_a_router_no_family_carries(options, feature, tmp_path):
    cfg = model_config("debug", vocab_size=500, **options)
    model = Mixtral(cfg)
    with pytest.raises(HFCheckpointError, match="no transformers family carries") as e:
        export_hf(model.state_dict(), cfg, tmp_path / "hf")
    assert feature in str(e.value) and not (tmp_path / "hf").exists()
