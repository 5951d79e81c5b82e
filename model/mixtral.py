"""The Mixtral architecture for one device. parallel/ rewrites it for many; nothing here knows that.

    tokens (B, T) -> tok_embeddings -> L x [x + attention(norm(x)); x + moe(norm(x))] -> norm -> output
Attention and MoE read their local sizes from their weights (`view(B, T, -1, Dh)`), so a tensor-
parallel rewrite that shards the projections needs no change here.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, pick_backend
from .config import ModelConfig
from .init import RandomInit
from .moe import MoE, RouterStats, SwiGLU
from .mot import MixtureOfTokens


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, scale in the input dtype (as Mixtral does)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype):
    """(B, T) positions -> cos, sin (B, 1, T, Dh) in the half-rotation layout of transformers."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_size
        self.window = cfg.sliding_window
        self.backend = cfg.attention
        self.wq = nn.Linear(cfg.dim, cfg.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, position_ids: Optional[torch.Tensor]):
        B, T, _ = x.shape
        heads = lambda t: t.view(B, T, -1, self.head_dim).transpose(1, 2)  # noqa: E731  (B, h, T, Dh)
        q, k, v = heads(self.wq(x)), heads(self.wk(x)), heads(self.wv(x))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention(q, k, v, position_ids, self.window, pick_backend(self.backend, x.device))
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    """Layer `layer`: attention, then its feed-forward: the MoE, or a dense SwiGLU (`mlp`) in the first
    cfg.dense_layers layers, which have no router and give no router stats."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mixes_tokens = cfg.moe_type == "tokens"
        self.dense = layer < cfg.dense_layers
        if self.dense:
            self.mlp = SwiGLU(cfg.dim, cfg.dense_size)
            return
        self.moe = MixtureOfTokens(cfg.dim, cfg.num_experts, cfg.expert_dim, cfg.mot_group_size, cfg.mot_temperature,
                                   cfg.mot_learnable_temperature) if self.mixes_tokens else \
            MoE.from_config(cfg)

    def forward(self, x, cos, sin, position_ids, mix_mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, position_ids)
        if self.dense:
            return (x + self.mlp(self.ffn_norm(x)),)
        out, stats = self.moe(self.ffn_norm(x), mix_mask) if self.mixes_tokens else self.moe(self.ffn_norm(x))
        return x + out, *stats


class Mixtral(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # how a block runs: parallel/ may set a function (block, *inputs) -> outputs (activation checkpointing)
        self.run_block: Optional[Callable] = None

    @torch.no_grad()
    def init_weights(self, seed: int):
        """Normal(0, init_std) for matrices, ones for norms (transformers' Mixtral init), drawn per
        row block (model/init.py) so that any shard of any layout can be generated alone and equal."""
        source = RandomInit(self.cfg.init_std, seed)
        for name, p in self.named_parameters():
            p.copy_(source.read(name, p.shape, [0] * p.dim(), p.shape))

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                mix_mask: Optional[torch.Tensor] = None):
        """tokens (B, T) -> logits (B, T, V) and RouterStats over all layers.

        position_ids (B, T) restart at 0 at each packed document; None means 0..T-1 per row.
        mix_mask (B, T) bool: the positions a Mixture of Tokens layer mixes (None: all); others are
        padding to it (model/mot.py). The sparse layer routes each token alone and ignores it.
        """
        h, stats = self.hidden(tokens, position_ids, mix_mask)
        return self.output(h), stats

    def hidden(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
               mix_mask: Optional[torch.Tensor] = None):
        """Everything before the LM head: tokens (B, T) -> final-normed hidden states (B, T, D) and
        RouterStats. `output(hidden)` are the logits; model/loss.py fuses that matmul with the loss."""
        B, T = tokens.shape
        positions = position_ids if position_ids is not None else \
            torch.arange(T, device=tokens.device).expand(B, T)
        h = self.tok_embeddings(tokens)
        cos, sin = rotary_cos_sin(positions, self.cfg.head_size, self.cfg.rope_theta, h.dtype)
        per_layer = []  # (counts, prob_sum, z_sum, entropy_sum) of each layer
        for layer in self.layers:
            h, *stats = (self.run_block or Block.__call__)(layer, h, cos, sin, position_ids, mix_mask)
            if stats:  # dense layers have none
                per_layer.append(stats)
        counts, prob_sums, z_sums, entropy_sums = (torch.stack(s) for s in zip(*per_layer))
        stats = RouterStats(counts, prob_sums, z_sums, torch.tensor(float(B * T), device=tokens.device),
                            entropy_sums)
        return self.norm(h), stats
