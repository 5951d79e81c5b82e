"""Parameter counts and training FLOPs per token of a Mixtral config, by formula (no allocation).

Training FLOPs per token follow torchtitan's MoE count (`get_moe_model_nparams_and_flops`):
    6 * (dense non-embedding params + router params + expert params * top_k / num_experts)
  + 12 * layers * heads * head_dim * attended_keys
- 6 = 2 FLOPs per multiply-add x (1 forward + 2 backward) matmuls per weight.
- "Dense non-embedding" is every parameter outside the experts and the router except the token
  embedding (a lookup, not a matmul); the LM head `output` is a matmul and IS counted, and so are the
  RMSNorm weights (as torchtitan counts them; 2*D per layer, negligible).
- Attention scores and values: 2 matmuls x 2 FLOPs x 3 (fwd + bwd) = 12 per (query, key, head, dim).
  Like torchtitan we do NOT halve it for the causal mask (each query is charged the full sequence),
  and we do not count flash attention's backward recomputation. With a sliding window a query sees
  at most `window` keys, so attended_keys = min(window, seq_len).
"""

from .config import ModelConfig


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of Mixtral(cfg) by group: embedding, attention, norms, router, experts (routed), ffn
    (always-on feed-forward: the shared experts and their gates, the dense layers' MLPs), output."""
    D, L, Dh = cfg.dim, cfg.num_layers, cfg.head_size
    moe_layers = L - cfg.dense_layers
    attention = D * cfg.num_heads * Dh * 2 + D * cfg.num_kv_heads * Dh * 2  # wq, wo; wk, wv
    shared = 3 * D * cfg.shared_expert_dim + (D if cfg.shared_expert_gate else 0)
    return {
        "embedding": cfg.vocab_size * D,
        "attention": L * attention,
        "norms": L * 2 * D + D,
        "router": moe_layers * cfg.num_experts * D,
        "experts": moe_layers * cfg.num_experts * 3 * D * cfg.expert_dim,  # w1, w3 (D, F); w2 (F, D)
        "ffn": moe_layers * shared + cfg.dense_layers * 3 * D * cfg.dense_size,
        "output": cfg.vocab_size * D,
    }


def total_params(cfg: ModelConfig) -> int:
    return sum(param_counts(cfg).values())


def active_params(cfg: ModelConfig) -> int:
    """Parameters one token uses (embeddings included): the experts count top_k / num_experts."""
    c = param_counts(cfg)
    return total_params(cfg) - c["experts"] + c["experts"] * cfg.top_k // cfg.num_experts


def expert_share(cfg: ModelConfig) -> float:
    """Share of the expert weights one token's FLOPs use: top_k / num_experts, or with Mixture of Tokens
    (model/mot.py) 1 / mot_group_size: E mixed tokens per group of G tokens, each through one expert."""
    return 1 / cfg.mot_group_size if cfg.moe_type == "tokens" else cfg.top_k / cfg.num_experts


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training (forward + backward) FLOPs per token at sequence length `seq_len`, by part:
    {"dense", "router", "experts", "attention", "total"} (see the module docstring)."""
    c = param_counts(cfg)
    window = cfg.sliding_window
    keys = min(window, seq_len) if window is not None else seq_len
    parts = {
        "dense": 6 * (c["attention"] + c["norms"] + c["ffn"] + c["output"]),
        "router": 6 * c["router"],
        "experts": 6 * c["experts"] * expert_share(cfg),
        "attention": 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * keys,
    }
    return parts | {"total": sum(parts.values())}


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over peak. tokens_per_second and peak_flops must
    cover the same devices (global throughput with the sum of all devices' peaks)."""
    return tokens_per_second * flops_per_token / peak_flops
