"""The transformers families that carry routers MixtralForCausalLM cannot express, both directions.

Which family a model exports to (`hf_family`), the first that computes exactly our forward pass:
    mixtral     softmax scores, top-k renormalised, scale 1, no balancing bias, no shared expert, no
                dense layer (model/hf.py)
    qwen2_moe   Qwen2MoeForCausalLM: softmax scores, top-k renormalised or not (norm_topk_prob), scale 1,
                no balancing bias, one shared expert behind a sigmoid gate (shared_expert_gate), the
                first k layers dense (mlp_only_layers, intermediate_size), no q/k/v bias
    glm4_moe    Glm4MoeForCausalLM: sigmoid scores, the balancing bias (e_score_correction_bias, fp32),
                norm_topk_prob, routed_scaling_factor, ungated shared experts of n x expert_dim
                (n_shared_experts), the first k layers dense (first_k_dense_replace); one expert group
                (n_group = topk_group = 1), full rotary (partial_rotary_factor 1), no qk-norm, no
                attention bias, no multi-token-prediction layer
Anything else (softmax scores with a balancing bias or a scaling factor, an ungated shared expert on
softmax scores, a gated one on sigmoid scores, a sliding window outside Mixtral) is refused by an
HFCheckpointError naming the feature. DeepSeek-V3 carries the same router as GLM-4-MoE but its
attention is multi-head latent attention, which ours is not.

Tensor names (the Hub layout: per-expert tensors, which transformers 5 fuses on load), per layer i:
    layers.i.moe.router.gate.weight      model.layers.i.mlp.gate.weight
    layers.i.moe.router.expert_bias      model.layers.i.mlp.gate.e_score_correction_bias     (glm4_moe)
    layers.i.moe.experts.w1 / w3 / w2    model.layers.i.mlp.experts.E.gate_proj / up_proj / down_proj.weight
    layers.i.moe.shared.w1 / w3 / w2     ...mlp.shared_expert(s).gate_proj / up_proj / down_proj.weight
    layers.i.moe.shared_gate.weight      model.layers.i.mlp.shared_expert_gate.weight        (qwen2_moe)
    layers.i.mlp.w1 / w3 / w2            model.layers.i.mlp.gate_proj / up_proj / down_proj.weight (dense)
"""

from typing import Optional

from .config import ModelConfig

SWIGLU = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
ARCHITECTURES = {"qwen2_moe": "Qwen2MoeForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}


def hf_family(cfg: ModelConfig) -> str:
    """The model_type our model exports to, or HFCheckpointError naming what no family carries."""
    from .hf import HFCheckpointError

    def refuse(feature: str):
        raise HFCheckpointError(f"export: no transformers family carries {feature}")

    plain = not (cfg.router_bias_rate or cfg.shared_expert_dim or cfg.dense_layers)
    if cfg.router_score == "softmax":
        if plain and cfg.router_norm_topk and cfg.router_scale == 1.0:
            return "mixtral"
        if cfg.router_bias_rate:
            refuse("model.router_bias_rate > 0 with model.router_score=softmax (a selection bias on softmax "
                   "scores); use router_score=sigmoid (exports as glm4_moe)")
        if cfg.router_scale != 1.0:
            refuse(f"model.router_scale={cfg.router_scale} with model.router_score=softmax")
        if not cfg.shared_expert_gate:
            refuse("model.router_score=softmax with an ungated or no shared expert beyond Mixtral's "
                   "(qwen2_moe needs model.shared_expert_gate=true)")
        family = "qwen2_moe"
    else:
        if cfg.shared_expert_gate:
            refuse("model.shared_expert_gate with model.router_score=sigmoid")
        if cfg.shared_expert_dim % cfg.expert_dim:
            refuse(f"model.shared_expert_dim={cfg.shared_expert_dim} with model.router_score=sigmoid "
                   f"(glm4_moe needs a multiple of expert_dim={cfg.expert_dim})")
        family = "glm4_moe"
    if cfg.sliding_window is not None:
        refuse(f"model.sliding_window with the {family} router")
    return family


def family_config(cfg: ModelConfig, family: str, bos_token_id: int, eos_token_id: int):
    """The transformers config of `family` for our model."""
    import transformers

    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.dense_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_size, moe_intermediate_size=cfg.expert_dim,
        num_experts_per_tok=cfg.top_k, max_position_embeddings=cfg.max_seq_len, norm_topk_prob=cfg.router_norm_topk,
        rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std, tie_word_embeddings=False,
        hidden_act="silu", bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common, num_experts=cfg.num_experts, shared_expert_intermediate_size=cfg.shared_expert_dim,
            mlp_only_layers=list(range(cfg.dense_layers)), decoder_sparse_step=1, qkv_bias=False,
            use_sliding_window=False, router_aux_loss_coef=cfg.router_aux_loss_coef,
            rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)})
    return transformers.Glm4MoeConfig(
        **common, n_routed_experts=cfg.num_experts, n_shared_experts=cfg.shared_expert_dim // cfg.expert_dim,
        routed_scaling_factor=cfg.router_scale, n_group=1, topk_group=1, first_k_dense_replace=cfg.dense_layers,
        use_qk_norm=False, attention_bias=False, num_mtp_layers=0,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta), "partial_rotary_factor": 1.0})


def model_config_from_family(d: dict, source: str) -> ModelConfig:
    """A qwen2_moe or glm4_moe config.json dict -> ModelConfig; what we cannot compute is an
    HFCheckpointError naming `source` and the key."""
    import transformers

    from .hf import HFCheckpointError

    family = d["model_type"]
    c = (transformers.Qwen2MoeConfig if family == "qwen2_moe" else transformers.Glm4MoeConfig).from_dict(d)
    rope = c.rope_parameters or {}
    checks = [("rope_parameters.rope_type", rope.get("rope_type", "default"), "default"),
              ("tie_word_embeddings", c.tie_word_embeddings, False), ("hidden_act", c.hidden_act, "silu")]
    if family == "qwen2_moe":
        dense = sorted(c.mlp_only_layers or [])
        checks += [("qkv_bias", c.qkv_bias, False), ("use_sliding_window", c.use_sliding_window, False),
                   ("decoder_sparse_step", c.decoder_sparse_step, 1),
                   ("mlp_only_layers", dense, list(range(len(dense))))]
    else:
        checks += [("n_group", c.n_group, 1), ("topk_group", c.topk_group, 1), ("use_qk_norm", c.use_qk_norm, False),
                   ("attention_bias", c.attention_bias, False),
                   ("rope_parameters.partial_rotary_factor", rope.get("partial_rotary_factor", 1.0), 1.0)]
    for key, value, supported in checks:
        if value != supported:
            raise HFCheckpointError(f"{source}: {key}={value!r} is not supported (only {supported!r})")
    head_dim = getattr(c, "head_dim", None)
    head_dim = head_dim if head_dim and head_dim * c.num_attention_heads != c.hidden_size else None
    fields = dict(
        vocab_size=c.vocab_size, dim=c.hidden_size, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads, head_dim=head_dim, top_k=c.num_experts_per_tok,
        expert_dim=c.moe_intermediate_size, max_seq_len=c.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", 1e6)), norm_eps=c.rms_norm_eps, init_std=c.initializer_range,
        router_norm_topk=c.norm_topk_prob, dense_dim=c.intermediate_size)
    if family == "qwen2_moe":
        fields |= dict(num_experts=c.num_experts, shared_expert_dim=c.shared_expert_intermediate_size,
                       shared_expert_gate=True, dense_layers=len(dense), router_aux_loss_coef=c.router_aux_loss_coef)
    else:
        fields |= dict(num_experts=c.n_routed_experts, router_score="sigmoid", router_scale=c.routed_scaling_factor,
                       shared_expert_dim=c.n_shared_experts * c.moe_intermediate_size,
                       dense_layers=c.first_k_dense_replace)
    return ModelConfig(**fields)


def family_hub_names(cfg: ModelConfig, family: str) -> dict[str, tuple[str, Optional[int]]]:
    """Hub name -> (our name, expert index or None), in the Hub's order; an expert's Hub tensor is our
    stacked tensor's row `expert`, transposed (model/hf.py's hub_tensor)."""
    from .hf import OUR_TO_HF, TOP_LEVEL

    shared = "shared_expert" if family == "qwen2_moe" else "shared_experts"
    out = {TOP_LEVEL["tok_embeddings.weight"]: ("tok_embeddings.weight", None)}
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out |= {q + hf: (p + ours, None) for ours, hf in OUR_TO_HF.items()}
        if i < cfg.dense_layers:
            out |= {f"{q}mlp.{hf}.weight": (f"{p}mlp.{w}.weight", None) for w, hf in SWIGLU.items()}
            continue
        out[q + "mlp.gate.weight"] = (p + "moe.router.gate.weight", None)
        if family == "glm4_moe":
            out[q + "mlp.gate.e_score_correction_bias"] = (p + "moe.router.expert_bias", None)
        for e in range(cfg.num_experts):
            out |= {f"{q}mlp.experts.{e}.{hf}.weight": (f"{p}moe.experts.{w}", e) for w, hf in SWIGLU.items()}
        if cfg.shared_expert_dim:
            out |= {f"{q}mlp.{shared}.{hf}.weight": (f"{p}moe.shared.{w}.weight", None) for w, hf in SWIGLU.items()}
        if family == "qwen2_moe":
            out[q + "mlp.shared_expert_gate.weight"] = (p + "moe.shared_gate.weight", None)
    return out | {TOP_LEVEL[k]: (k, None) for k in ("norm.weight", "output.weight")}
