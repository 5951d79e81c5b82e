"""Causal attention over packed documents, with three interchangeable backends.

Shapes: q (B, H, T, Dh), k and v (B, KV, T, Dh) with H % KV == 0 (grouped-query attention).
`position_ids` (B, T) restart at 0 where a document starts; a query attends to keys of its own
document, at or before its position, and (with `window`) fewer than `window` positions back:
    allowed(i, j) = doc(i) == doc(j) and 0 <= i - j < window
(the rule of transformers' sliding-window causal mask). position_ids=None means one document per row.

- "flash": flash_attn_varlen_func (CUDA only; documents become variable-length sequences)
- "sdpa": torch.nn.functional.scaled_dot_product_attention with a boolean mask (is_causal when it can)
- "reference": plain softmax(q k^T / sqrt(Dh) + mask) v, the definition the tests compare against
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

try:  # optional: only builds with CUDA
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None


def pick_backend(name: str, device: torch.device) -> str:
    if name != "auto":
        if name == "flash" and flash_attn_varlen_func is None:
            raise ValueError("model.attention=flash but the flash_attn package is not importable")
        return name
    return "flash" if flash_attn_varlen_func is not None and device.type == "cuda" else "sdpa"


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T) index of the document each token belongs to, counted within its row."""
    starts = position_ids == 0
    starts[:, 0] = True  # a row that begins inside a document still begins a segment
    return starts.cumsum(dim=1)


def attention_mask(position_ids: Optional[torch.Tensor], seq_len: int, window: Optional[int],
                   device: torch.device) -> torch.Tensor:
    """Boolean mask (B or 1, 1, T, T), True where attention is allowed."""
    i = torch.arange(seq_len, device=device)
    distance = i[:, None] - i[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    allowed = allowed[None, None]
    if position_ids is not None:
        doc = document_ids(position_ids)
        allowed = allowed & (doc[:, None, :, None] == doc[:, None, None, :])
    return allowed


def attention(q, k, v, position_ids: Optional[torch.Tensor], window: Optional[int], backend: str):
    """Returns (B, H, T, Dh)."""
    if backend == "flash":
        return _flash(q, k, v, position_ids, window)
    T = q.shape[2]
    if backend == "sdpa":
        if position_ids is None and window is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        mask = attention_mask(position_ids, T, window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if backend == "reference":
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        mask = attention_mask(position_ids, T, window, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
    raise ValueError(f"unknown attention backend {backend!r}")


def _flash(q, k, v, position_ids, window):
    B, H, T, Dh = q.shape
    if position_ids is None:
        position_ids = torch.arange(T, device=q.device).expand(B, T)
    starts = (document_ids(position_ids).diff(dim=1, prepend=torch.zeros_like(position_ids[:, :1])) > 0)
    begin = starts.flatten().nonzero().flatten()
    cu_seqlens = torch.cat([begin, begin.new_tensor([B * T])]).to(torch.int32)
    max_len = int(cu_seqlens.diff().max())
    flat = lambda x: x.transpose(1, 2).reshape(B * T, x.shape[1], Dh)  # noqa: E731
    out = flash_attn_varlen_func(
        flat(q), flat(k), flat(v), cu_seqlens, cu_seqlens, max_len, max_len, causal=True,
        window_size=(window - 1, 0) if window is not None else (-1, -1))
    return out.reshape(B, T, H, Dh).transpose(1, 2)
