"""Pixtral-style image-text model for one device: the vision encoder (model/vision.py), a 2-layer GELU
projector, and our Mixtral decoder (any preset) reading the image features inline with the text.

    images [(C, H_i, W_i)] -> VisionEncoder -> (N, Dv) -> projector: w2(gelu(w1 x)) -> (N, D)
    tokens (B, T) -> decoder embeddings; the N positions holding the image token ([IMG]) get the
    N image features, in order (row-major over (B, T), images in the order given) -> decoder layers
The token layout of an image is mistral-common's (its ImageEncoder with the Tekken tokenizer): per
row of patches, one [IMG] per patch then [IMG_BREAK]; the last row ends in [IMG_END] instead. Only
[IMG] positions take image features; [IMG_BREAK] and [IMG_END] are ordinary embedded tokens, so the
decoder sees the image's rows. Packed conversations keep their position_ids (restarting at 0), and
the encoder packs the images with a block-diagonal mask: nothing attends across images or documents.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, validate_model_config
from .init import RandomInit
from .mixtral import Mixtral
from .vision import VisionConfig, VisionEncoder, validate_vision_config

TEKKEN_IMAGE_TOKEN_ID = 10  # [IMG] in tekken_240911.json ([IMG_BREAK] = 12, [IMG_END] = 13)


@dataclass
class MultimodalConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: ModelConfig = field(default_factory=ModelConfig)
    image_token_id: int = TEKKEN_IMAGE_TOKEN_ID


def validate_multimodal_config(c: MultimodalConfig) -> None:
    validate_vision_config(c.vision)
    validate_model_config(c.text)
    if not 0 <= c.image_token_id < c.text.vocab_size:
        raise ValueError(f"multimodal config: image_token_id ({c.image_token_id}) is outside the decoder's "
                         f"vocabulary (vocab_size {c.text.vocab_size})")


class Projector(nn.Module):
    """Vision features (N, Dv) -> decoder embeddings (N, D): w2(gelu(w1 x)), both with biases (exact
    GELU, as transformers' Llava projector)."""

    def __init__(self, vision_dim: int, dim: int):
        super().__init__()
        self.w1 = nn.Linear(vision_dim, dim)
        self.w2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


class Multimodal(nn.Module):
    def __init__(self, cfg: MultimodalConfig):
        super().__init__()
        validate_multimodal_config(cfg)
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.projector = Projector(cfg.vision.dim, cfg.text.dim)
        self.decoder = Mixtral(cfg.text)

    @property
    def output(self) -> nn.Linear:
        """The LM head, for model/loss.py's fused head + loss (as Mixtral.output)."""
        return self.decoder.output

    @torch.no_grad()
    def init_weights(self, seed: int):
        """The decoder as Mixtral.init_weights(seed) (a text model of that seed, unchanged), the encoder
        under its own names, the projector Normal(0, text init_std) with zero biases."""
        self.decoder.init_weights(seed)
        self.init_image_side(seed)

    @torch.no_grad()
    def init_image_side(self, seed: int):
        """The encoder and the projector of init_weights(seed), the decoder untouched (a text model
        given a fresh encoder)."""
        self.vision.init_weights(seed)
        source = RandomInit(self.cfg.text.init_std, seed)
        for name, p in self.projector.named_parameters():
            p.copy_(torch.zeros_like(p) if name.endswith("bias") else
                    source.read("projector." + name, p.shape, [0] * p.dim(), p.shape))

    def image_features(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(C, H_i, W_i) images -> (N, D) decoder embeddings, N = their patches."""
        return self.projector(self.vision(images))

    def forward(self, tokens: torch.Tensor, images: Optional[list[torch.Tensor]] = None,
                position_ids: Optional[torch.Tensor] = None, mix_mask: Optional[torch.Tensor] = None):
        """tokens (B, T), images in the order of their [IMG] runs -> logits (B, T, V), RouterStats."""
        h, stats = self.hidden(tokens, images, position_ids, mix_mask)
        return self.output(h), stats

    def hidden(self, tokens: torch.Tensor, images: Optional[list[torch.Tensor]] = None,
               position_ids: Optional[torch.Tensor] = None, mix_mask: Optional[torch.Tensor] = None):
        """Mixtral.hidden with the image features in place of the [IMG] embeddings.

        They are put in by a hook on the decoder's embedding, active for this call only, so the decoder
        and its tensor- or expert-parallel rewrite (parallel/parallelize.py, applied to `self.decoder`)
        run unchanged; sequence parallelism, whose embedding output holds a slice of the sequence, is
        refused. A count of [IMG] tokens that differs from the images' patches is a ValueError.

        The encoder and projector are replicated on every rank, not tensor-parallel: they are small
        next to the decoder (Pixtral-12B's 0.4 B of 12.4 B parameters), every tp rank computes the
        same features from the same images, and the gradient reaching them through the decoder's
        replicated residual stream is already whole on each tp rank (the column-parallel layers'
        input copy all-reduces it in backward), so they need no collective of their own; over dp they
        are ordinary dense parameters."""
        is_image = tokens == self.cfg.image_token_id
        images = images or []
        expected = sum(rows * cols for rows, cols in map(self.vision.grid, images))
        found = int(is_image.sum())
        if found != expected:
            raise ValueError(f"multimodal: {found} image tokens (id {self.cfg.image_token_id}) in the batch, "
                             f"but its {len(images)} images give {expected} patches")
        if not images:
            return self.decoder.hidden(tokens, position_ids, mix_mask)
        features = self.image_features(images)

        def put_images(module, args, embeddings):  # (B, T, D)
            if embeddings.shape[:2] != is_image.shape:
                raise ValueError(f"multimodal: the decoder's embedding gave {tuple(embeddings.shape)} for "
                                 f"tokens {tuple(is_image.shape)}; image features need the whole sequence "
                                 "(a sequence-parallel decoder shards it: run it with parallel.sp=false)")
            return embeddings.masked_scatter(is_image[..., None], features.to(embeddings.dtype))

        hook = self.decoder.tok_embeddings.register_forward_hook(put_images)
        try:
            return self.decoder.hidden(tokens, position_ids, mix_mask)
        finally:
            hook.remove()
