"""The Pixtral vision encoder (arXiv 2410.07073) for one device: images at their native resolution and
aspect ratio, no parallel code (like model/mixtral.py).

    images [(C, H_i, W_i)] -> 16x16 patches, row-major per image, all images packed into one sequence
        (N = sum_i H_i W_i / P^2, C P P) -> patch_embed (a bias-free linear: the patch convolution)
        -> patch_norm -> L x [x + attention(norm(x)); x + SwiGLU(norm(x))] -> (N, D) patch features
Attention is bidirectional inside an image and blocked between images (a block-diagonal mask), so
packing changes nothing: an image's features are those it gets alone. Positions are RoPE-2D: a patch
at (row, col) rotates its query/key pairs by row * f for the even frequencies f of the usual 1-D RoPE
and by col * f for the odd ones; no learned position table, so any size runs. The layout of the
rotated pairs is transformers' (half rotation, model/mixtral.py's `apply_rotary`), so its
PixtralVisionModel weights load unpermuted (model/hf_vision.py).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .init import RandomInit
from .mixtral import RMSNorm, apply_rotary
from .moe import SwiGLU

NORM_EPS = 1e-5  # Pixtral's, fixed (transformers hard-codes it too)


@dataclass
class VisionConfig:
    preset: Optional[str] = None  # name in VISION_PRESETS; explicit fields below override it
    dim: int = 32  # hidden size
    num_layers: int = 2
    num_heads: int = 2  # head_dim = dim // num_heads, a multiple of 4 (RoPE-2D splits its pairs in two)
    ffn_dim: int = 64  # hidden size of the gated (SwiGLU) feed-forward
    patch_size: int = 16
    num_channels: int = 3
    rope_theta: float = 10000.0
    max_image_size: int = 1024  # longest side in pixels that the data side lets through (mistral-common's)
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


VISION_PRESETS: dict[str, dict] = {
    "debug": dict(dim=32, num_layers=2, num_heads=2, ffn_dim=64),
    # the published encoder of Pixtral-12B (mistral-community/pixtral-12b vision_config)
    "pixtral-12b": dict(dim=1024, num_layers=24, num_heads=16, ffn_dim=4096, rope_theta=10000.0),
}


def vision_config(preset: Optional[str] = None, **overrides) -> VisionConfig:
    """A validated config: the preset's values, then `overrides`."""
    if preset is not None and preset not in VISION_PRESETS:
        raise ValueError(f"vision.preset: unknown preset {preset!r}; choose one of {sorted(VISION_PRESETS)}")
    cfg = VisionConfig(**{**vars(VisionConfig(preset=preset)), **VISION_PRESETS.get(preset, {}), **overrides})
    validate_vision_config(cfg)
    return cfg


def validate_vision_config(c: VisionConfig) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise ValueError(f"vision config: {msg}")

    for name in ("dim", "num_layers", "num_heads", "ffn_dim", "patch_size", "num_channels", "max_image_size"):
        need(getattr(c, name) > 0, f"{name} must be positive, got {getattr(c, name)}")
    need(c.dim % c.num_heads == 0, f"dim ({c.dim}) is not divisible by num_heads ({c.num_heads})")
    need(c.head_dim % 4 == 0,
         f"head_dim = dim / num_heads ({c.head_dim}) must be a multiple of 4 for RoPE-2D")
    need(c.max_image_size % c.patch_size == 0,
         f"max_image_size ({c.max_image_size}) is not a multiple of patch_size ({c.patch_size})")


def rope_2d(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float, dtype):
    """(N,) patch rows and columns -> cos, sin (1, 1, N, Dh) for `apply_rotary`."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=rows.device).float() / head_dim)
    angles = torch.cat((rows[:, None].float() * inv_freq[0::2],  # (N, Dh/4): even frequencies by row
                        cols[:, None].float() * inv_freq[1::2]), dim=-1)  # odd ones by column
    emb = torch.cat((angles, angles), dim=-1)[None, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(cfg.dim, cfg.dim, bias=False) for _ in range(4))

    def forward(self, x, cos, sin, allowed):
        """x (1, N, D); allowed (N, N) bool, True inside an image's block."""
        B, N, _ = x.shape
        heads = lambda t: t.view(B, N, -1, self.head_dim).transpose(1, 2)  # noqa: E731  (B, h, N, Dh)
        q, k, v = heads(self.wq(x)), heads(self.wk(x)), heads(self.wv(x))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.wo(out.transpose(1, 2).reshape(B, N, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, NORM_EPS)
        self.attention = VisionAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, NORM_EPS)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, allowed):
        x = x + self.attention(self.attention_norm(x), cos, sin, allowed)
        return x + self.feed_forward(self.ffn_norm(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        P = cfg.patch_size
        # the patch convolution as a matmul on flattened patches, columns in (C, P, P) order
        self.patch_embed = nn.Linear(cfg.num_channels * P * P, cfg.dim, bias=False)
        self.patch_norm = RMSNorm(cfg.dim, NORM_EPS)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))

    @torch.no_grad()
    def init_weights(self, seed: int, prefix: str = "vision."):
        """Normal(0, init_std) matrices and unit norms, drawn per tensor name (model/init.py)."""
        source = RandomInit(self.cfg.init_std, seed)
        for name, p in self.named_parameters():
            p.copy_(source.read(prefix + name, p.shape, [0] * p.dim(), p.shape))

    def grid(self, image: torch.Tensor) -> tuple[int, int]:
        """(C, H, W) -> (rows, cols) of patches; H and W must be multiples of the patch size (what
        mistral-common's ImageEncoder produces)."""
        P, C = self.cfg.patch_size, self.cfg.num_channels
        if image.dim() != 3 or image.shape[0] != C or image.shape[1] % P or image.shape[2] % P:
            raise ValueError(f"vision encoder: an image must be ({C}, H, W) with H and W multiples of {P}, "
                             f"got {tuple(image.shape)}")
        return image.shape[1] // P, image.shape[2] // P

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        """images: (C, H_i, W_i) each -> (N, D) features, image after image, patches row-major."""
        P = self.cfg.patch_size
        patches, rows, cols, image_ids = [], [], [], []
        for i, image in enumerate(images):
            h, w = self.grid(image)
            C = image.shape[0]
            patches.append(image.reshape(C, h, P, w, P).permute(1, 3, 0, 2, 4).reshape(h * w, C * P * P))
            r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            rows.append(r.flatten())
            cols.append(c.flatten())
            image_ids.append(torch.full((h * w,), i))
        device = images[0].device
        x = torch.cat(patches).to(self.patch_embed.weight.dtype)
        x = self.patch_norm(self.patch_embed(x))[None]  # (1, N, D)
        cos, sin = rope_2d(torch.cat(rows).to(device), torch.cat(cols).to(device), self.cfg.head_dim,
                           self.cfg.rope_theta, x.dtype)
        image_ids = torch.cat(image_ids).to(device)
        allowed = image_ids[:, None] == image_ids[None, :]  # (N, N) block-diagonal
        for layer in self.layers:
            x = layer(x, cos, sin, allowed)
        return x[0]
