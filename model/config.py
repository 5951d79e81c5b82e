"""Model shapes: one typed config and the named presets.

`ModelConfig` is an OmegaConf structured config; a recipe selects a preset with `model.preset=tiny`
and may override any field (`model.num_layers=2`): the config loader merges the preset's values
under the recipe's. `validate_model_config` runs before any tensor is allocated.
"""

from dataclasses import dataclass, replace
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
    max_seq_len: int = 4096
    rope_theta: float = 1e6
    sliding_window: Optional[int] = None  # None: full causal attention
    norm_eps: float = 1e-5
    init_std: float = 0.02
    router_aux_loss_coef: float = 0.02  # Mixtral's load-balancing loss weight
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss weight (0: off)
    attention: str = "auto"  # auto | flash | sdpa | reference

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.num_heads


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


def model_config(preset: Optional[str] = None, **overrides) -> ModelConfig:
    """A validated config: the preset's values, then `overrides` (tests and scripts use this)."""
    check_preset(preset)
    cfg = replace(ModelConfig(preset=preset), **{**PRESETS.get(preset, {}), **overrides})
    validate_model_config(cfg)
    return cfg


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
