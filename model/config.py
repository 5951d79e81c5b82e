"""Model shapes: one typed config and the named presets.

`ModelConfig` is an OmegaConf structured config; a recipe selects a preset with `model.preset=tiny`
and may override any field (`model.num_layers=2`): the config loader merges the preset's values
under the recipe's. `validate_model_config` runs before any tensor is allocated.
"""

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelConfig:
    preset: Optional[str] = None  # name in PRESETS; explicit fields below override it
    vocab_size: int = 32000
    dim: int = 64  # hidden size
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention: num_heads % num_kv_heads == 0
    head_dim: Optional[int] = None  # default dim // num_heads
    num_experts: int = 4
    top_k: int = 2
    expert_dim: int = 128  # hidden size of each SwiGLU expert (fine-grained MoE: small and many)
    granularity: Optional[int] = None  # G: each expert split in G (G x experts, expert_dim / G, G x top_k)
    expansion: Optional[int] = None  # E: experts at granularity 1, instead of num_experts
    max_seq_len: int = 4096
    rope_theta: float = 1e6
    sliding_window: Optional[int] = None  # None: full causal attention
    norm_eps: float = 1e-5
    init_std: float = 0.02
    router_aux_loss_coef: float = 0.02  # Mixtral's load-balancing loss weight
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss weight (0: off)
    router_score: str = "softmax"  # softmax (Mixtral) | sigmoid (DeepSeek-V3) scores over the experts
    router_norm_topk: bool = True  # renormalise the k selected scores to sum 1
    router_scale: float = 1.0  # factor on the routed experts' weights (routed_scaling_factor)
    router_bias_rate: float = 0.0  # aux-loss-free balancing: expert-bias update per step (0: off; DeepSeek-V3 1e-3)
    shared_expert_dim: int = 0  # hidden size of the always-on shared SwiGLU expert (0: none)
    shared_expert_gate: bool = False  # scale the shared expert by sigmoid(x w_gate) (Qwen2-MoE)
    dense_layers: int = 0  # the first k layers have a dense SwiGLU feed-forward instead of the MoE
    dense_dim: Optional[int] = None  # its hidden size; default top_k * expert_dim (the active MoE size)
    attention: str = "auto"  # auto | flash | sdpa | reference
    moe_type: str = "sparse"  # sparse: token-choice top-k router (model/moe.py) | tokens: Mixture of Tokens (model/mot.py)
    mot_group_size: int = 8  # moe_type=tokens: rows of a micro-batch mixed together at each position
    mot_temperature: float = 1.0  # moe_type=tokens: temperature of the controller's softmax over a group
    mot_learnable_temperature: bool = False  # moe_type=tokens: also learn a scale of the logits (starts at 1)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.num_heads

    @property
    def dense_size(self) -> int:
        return self.dense_dim or self.top_k * self.expert_dim


PRESETS: dict[str, dict] = {
    # a few million parameters, the real Mixtral vocabulary; used by tests
    "debug": dict(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, top_k=2,
                  expert_dim=128, max_seq_len=512),
    # the quickstart: trains on 2 CPU cores in minutes
    "tiny": dict(dim=128, num_layers=4, num_heads=4, num_kv_heads=2, num_experts=8, top_k=2,
                 expert_dim=256, max_seq_len=1024),
    # 330 M parameters, 92 % of them in the experts (16 of hidden 2048, top-2): memory measurements
    # of expert parallelism on one machine (bench/memory.py)
    "mid": dict(dim=384, num_layers=8, num_heads=8, num_kv_heads=4, num_experts=16, top_k=2,
                expert_dim=2048, max_seq_len=2048),
    # published shapes (mistralai/Mixtral-8x7B-v0.1 and Mixtral-8x22B-v0.1 config.json)
    "mixtral-8x7b": dict(dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, num_experts=8,
                         top_k=2, expert_dim=14336, max_seq_len=32768, rope_theta=1e6,
                         router_aux_loss_coef=0.02),
    "mixtral-8x22b": dict(vocab_size=32768, dim=6144, num_layers=56, num_heads=48, num_kv_heads=8,
                          num_experts=8, top_k=2, expert_dim=16384, max_seq_len=65536,
                          rope_theta=1e6, router_aux_loss_coef=0.001),
}

ATTENTION_BACKENDS = ("auto", "flash", "sdpa", "reference")
ROUTER_SCORES = ("softmax", "sigmoid")
MOE_TYPES = ("sparse", "tokens")


def model_config(preset: Optional[str] = None, **overrides) -> ModelConfig:
    """A validated config: the preset's values, then `overrides` (tests and scripts use this)."""
    check_preset(preset)
    values = resolve_granularity({**vars(ModelConfig(preset=preset)), **PRESETS.get(preset, {}), **overrides},
                                 explicit=set(overrides))
    cfg = ModelConfig(**values)
    validate_model_config(cfg)
    return cfg


def resolve_granularity(values: dict, explicit: set) -> dict:
    """The fine-grained form (Krajewski et al. 2024) as raw counts: with `expansion` E (experts at
    granularity 1) and `granularity` G, num_experts = E * G, expert_dim / G and top_k * G, so active and
    total parameters do not change with G. `explicit` names the fields the user set (not a preset's):
    expansion and an explicit num_experts are one way or the other, not both. The result holds the raw
    counts and no granularity/expansion, so resolving it again changes nothing."""
    G, E = values.get("granularity"), values.get("expansion")
    if G is None and E is None:
        return values
    if E is not None and "num_experts" in explicit:
        raise ValueError("model config: model.expansion and model.num_experts are two ways to give the "
                         "expert count; set one of them")
    G = 1 if G is None else G
    E = values["num_experts"] if E is None else E
    if G < 1 or E < 1:
        raise ValueError(f"model config: model.granularity ({G}) and model.expansion ({E}) must be >= 1")
    if values["expert_dim"] % G:
        raise ValueError(f"model config: model.granularity={G} does not divide model.expert_dim="
                         f"{values['expert_dim']} (the size of an expert at granularity 1)")
    return {**values, "num_experts": E * G, "expert_dim": values["expert_dim"] // G,
            "top_k": values["top_k"] * G, "granularity": None, "expansion": None}


def check_preset(preset: Optional[str]) -> None:
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")


def validate_model_config(c: ModelConfig) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise ValueError(f"model config: {msg}")

    for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "num_experts",
                 "top_k", "expert_dim", "max_seq_len"):
        need(getattr(c, name) > 0, f"{name} must be positive, got {getattr(c, name)}")
    need(c.num_heads % c.num_kv_heads == 0,
         f"num_heads ({c.num_heads}) is not divisible by num_kv_heads ({c.num_kv_heads})")
    need(c.head_dim is not None or c.dim % c.num_heads == 0,
         f"dim ({c.dim}) is not divisible by num_heads ({c.num_heads}); set head_dim")
    need(c.head_size % 2 == 0, f"head_dim ({c.head_size}) must be even for rotary embeddings")
    need(c.top_k <= c.num_experts, f"top_k ({c.top_k}) exceeds num_experts ({c.num_experts})")
    need(c.sliding_window is None or c.sliding_window > 0,
         f"sliding_window must be positive or null, got {c.sliding_window}")
    need(c.attention in ATTENTION_BACKENDS,
         f"attention {c.attention!r} is not one of {ATTENTION_BACKENDS}")
    need(c.router_score in ROUTER_SCORES, f"router_score {c.router_score!r} is not one of {ROUTER_SCORES}")
    need(c.router_scale > 0, f"router_scale must be positive, got {c.router_scale}")
    need(c.router_bias_rate >= 0, f"router_bias_rate must be >= 0, got {c.router_bias_rate}")
    need(c.shared_expert_dim >= 0, f"shared_expert_dim must be >= 0, got {c.shared_expert_dim}")
    need(not c.shared_expert_gate or c.shared_expert_dim > 0,
         "shared_expert_gate needs shared_expert_dim > 0")
    need(0 <= c.dense_layers < c.num_layers,
         f"dense_layers ({c.dense_layers}) must be in [0, num_layers ({c.num_layers}))")
    need(c.dense_dim is None or c.dense_dim > 0, f"dense_dim must be positive or null, got {c.dense_dim}")
    need(c.moe_type in MOE_TYPES, f"moe_type {c.moe_type!r} is not one of {MOE_TYPES}")
    need(c.mot_group_size > 0, f"mot_group_size must be positive, got {c.mot_group_size}")
    need(c.mot_temperature > 0, f"mot_temperature must be positive, got {c.mot_temperature}")
    need(c.moe_type == "sparse" or (c.router_score == "softmax" and c.router_bias_rate == 0
                                    and c.shared_expert_dim == 0),
         "moe_type=tokens has no router: router_score, router_bias_rate and shared_expert_dim are the sparse "
         "layer's options")
