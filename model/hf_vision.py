"""Hugging Face interop of the vision encoder (ours <-> transformers' `PixtralVisionModel`) and of the
multimodal model (ours <-> a `LlavaForConditionalGeneration` folder with a Pixtral encoder and a Mixtral
decoder; the decoder's tensors go through model/hf.py).

Names (ours -> transformers; PixtralVisionModel's own, prefixed `vision_tower.` inside Llava):
    patch_embed.weight (D, C*P*P)                 patch_conv.weight (D, C, P, P)   (same numbers, reshaped)
    patch_norm.weight                             ln_pre.weight
    layers.N.attention_norm / ffn_norm.weight     transformer.layers.N.attention_norm / ffn_norm.weight
    layers.N.attention.{wq,wk,wv,wo}.weight       transformer.layers.N.attention.{q,k,v,o}_proj.weight
    layers.N.feed_forward.{w1,w3,w2}.weight       transformer.layers.N.feed_forward.{gate,up,down}_proj.weight
Every conversion consumes every tensor (model/hf.py's check_tensors): a missing, unexpected or
misshapen one is an HFCheckpointError naming it.
"""

import json
from pathlib import Path
from typing import Union

import torch

from .hf import (HFCheckpointError, check_tensors, from_hf, hf_config, index_folder, model_config_from_hf,
                 to_hf, write_hf_folder)
from .hf_families import hf_family
from .multimodal import MultimodalConfig, validate_multimodal_config
from .vision import VisionConfig, VisionEncoder, validate_vision_config

VISION_LAYER_TO_HF = {
    "attention_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attention.wq.weight": "attention.q_proj.weight",
    "attention.wk.weight": "attention.k_proj.weight",
    "attention.wv.weight": "attention.v_proj.weight",
    "attention.wo.weight": "attention.o_proj.weight",
    "feed_forward.w1.weight": "feed_forward.gate_proj.weight",
    "feed_forward.w3.weight": "feed_forward.up_proj.weight",
    "feed_forward.w2.weight": "feed_forward.down_proj.weight",
}


def pixtral_config(cfg: VisionConfig):
    """VisionConfig -> transformers.PixtralVisionConfig with the same shapes and math."""
    from transformers import PixtralVisionConfig

    return PixtralVisionConfig(
        hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_channels=cfg.num_channels, image_size=cfg.max_image_size,
        patch_size=cfg.patch_size, hidden_act="silu", initializer_range=cfg.init_std,
        rope_parameters={"rope_type": "axial", "rope_theta": float(cfg.rope_theta)})


def vision_config_from_hf(hf_cfg, source: str = "HF vision config") -> VisionConfig:
    """transformers.PixtralVisionConfig or its dict -> VisionConfig; what we cannot represent (another
    model_type or activation, a head_dim other than hidden_size / heads) is an HFCheckpointError."""
    d = hf_cfg.to_dict() if hasattr(hf_cfg, "to_dict") else dict(hf_cfg)
    rope = d.get("rope_parameters") or {}
    checks = [("model_type", d.get("model_type", "pixtral"), "pixtral"),
              ("hidden_act", d.get("hidden_act"), "silu"),
              ("rope_parameters.rope_type", rope.get("rope_type", "axial"), "axial"),
              ("head_dim", d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
               d["hidden_size"] // d["num_attention_heads"])]
    for key, value, supported in checks:
        if value != supported:
            raise HFCheckpointError(f"{source}: {key}={value!r} is not supported (only {supported!r})")
    size = d.get("image_size", 1024)
    cfg = VisionConfig(
        dim=d["hidden_size"], num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
        ffn_dim=d["intermediate_size"], patch_size=d.get("patch_size", 16),
        num_channels=d.get("num_channels", 3), rope_theta=float(rope.get("rope_theta", 10000.0)),
        max_image_size=max(size) if isinstance(size, list) else size,
        init_std=d.get("initializer_range", 0.02))
    try:
        validate_vision_config(cfg)
    except ValueError as e:
        raise HFCheckpointError(f"{source}: {e}") from None
    return cfg


def vision_shapes(cfg: VisionConfig) -> dict[str, tuple]:
    """Our name -> shape, from the meta device."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in VisionEncoder(cfg).state_dict().items()}


def vision_hub_names(cfg: VisionConfig) -> dict[str, str]:
    """Our name -> PixtralVisionModel's name."""
    out = {"patch_embed.weight": "patch_conv.weight", "patch_norm.weight": "ln_pre.weight"}
    for i in range(cfg.num_layers):
        out |= {f"layers.{i}.{ours}": f"transformer.layers.{i}.{hf}"
                for ours, hf in VISION_LAYER_TO_HF.items()}
    return out


def vision_hf_shapes(cfg: VisionConfig) -> dict[str, tuple]:
    P, C = cfg.patch_size, cfg.num_channels
    ours = vision_shapes(cfg)
    shapes = {hf: ours[name] for name, hf in vision_hub_names(cfg).items()}
    return shapes | {"patch_conv.weight": (cfg.dim, C, P, P)}


def vision_to_hf(state_dict: dict, cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """Our encoder's state dict -> PixtralVisionModel's (views)."""
    check_tensors(state_dict, vision_shapes(cfg), "vision state dict")
    P, C = cfg.patch_size, cfg.num_channels
    out = {hf: state_dict[name] for name, hf in vision_hub_names(cfg).items()}
    out["patch_conv.weight"] = state_dict["patch_embed.weight"].view(cfg.dim, C, P, P)
    return out


def vision_from_hf(hf_state_dict: dict, cfg: VisionConfig, source: str = "HF vision state dict") -> dict:
    """PixtralVisionModel's state dict -> our encoder's."""
    check_tensors(hf_state_dict, vision_hf_shapes(cfg), source)
    out = {name: hf_state_dict[hf] for name, hf in vision_hub_names(cfg).items()}
    out["patch_embed.weight"] = hf_state_dict["patch_conv.weight"].reshape(cfg.dim, -1)
    return out


# ---- the multimodal model <-> a LlavaForConditionalGeneration folder ----------------------------------
# ours (model/multimodal.py)   the folder (transformers' Hub layout, as save_pretrained writes it)
#   decoder.*                  language_model.* + model/hf.py's Mixtral names
#   vision.*                   vision_tower.* + the PixtralVisionModel names above
#   projector.w1 / w2.*        multi_modal_projector.linear_1 / linear_2.* (weight and bias)

PROJECTOR_TO_HF = {"w1.weight": "linear_1.weight", "w1.bias": "linear_1.bias",
                   "w2.weight": "linear_2.weight", "w2.bias": "linear_2.bias"}
PREFIXES = {"decoder.": "language_model.", "vision.": "vision_tower.", "projector.": "multi_modal_projector."}
# what our model computes, in LlavaConfig's terms: the last encoder layer, every patch, a GELU projector
LLAVA_FIXED = {"vision_feature_layer": -1, "vision_feature_select_strategy": "full",
               "projector_hidden_act": "gelu", "multimodal_projector_bias": True}


def llava_config(cfg: MultimodalConfig, bos_token_id: int = 1, eos_token_id: int = 2) -> dict:
    """MultimodalConfig -> the config.json dict of a LlavaForConditionalGeneration (Pixtral + Mixtral)."""
    from transformers import LlavaConfig

    patches = cfg.vision.max_image_size // cfg.vision.patch_size
    config = LlavaConfig(vision_config=pixtral_config(cfg.vision),
                         text_config=hf_config(cfg.text, bos_token_id, eos_token_id),
                         image_token_index=cfg.image_token_id, image_seq_length=patches * patches,
                         **LLAVA_FIXED)
    return config.to_dict() | {"architectures": ["LlavaForConditionalGeneration"]}


def split_state_dict(state_dict: dict, prefixes: dict, source: str) -> dict[str, dict]:
    """{prefix: {rest of name: tensor}} for each prefix; a name under none is an HFCheckpointError."""
    parts = {p: {} for p in prefixes}
    for name, t in state_dict.items():
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            raise HFCheckpointError(f"{source}: unexpected tensor {name!r} (not under {', '.join(prefixes)})")
        parts[prefix][name[len(prefix):]] = t
    return parts


def multimodal_to_hf(state_dict: dict, cfg: MultimodalConfig) -> dict[str, torch.Tensor]:
    """Our Multimodal state dict -> the Llava folder's tensors (views, no copies)."""
    if hf_family(cfg.text) != "mixtral":
        raise ValueError(f"multimodal export: the decoder's router needs the {hf_family(cfg.text)} family; "
                         "the Llava export carries a Mixtral decoder only")
    parts = split_state_dict(state_dict, PREFIXES, "state dict")
    check_tensors(parts["projector."], projector_shapes(cfg), "projector state dict")
    hf = {PREFIXES["decoder."] + k: v for k, v in to_hf(parts["decoder."], cfg.text).items()}
    hf |= {PREFIXES["vision."] + k: v for k, v in vision_to_hf(parts["vision."], cfg.vision).items()}
    return hf | {PREFIXES["projector."] + PROJECTOR_TO_HF[k]: v for k, v in parts["projector."].items()}


def projector_shapes(cfg: MultimodalConfig) -> dict[str, tuple]:
    Dv, D = cfg.vision.dim, cfg.text.dim
    return {"w1.weight": (D, Dv), "w1.bias": (D,), "w2.weight": (D, D), "w2.bias": (D,)}


def export_multimodal_hf(state_dict: dict, cfg: MultimodalConfig, out_dir, tokenizer=None,
                         dtype=torch.bfloat16, max_shard_size: Union[int, str] = "2GB") -> Path:
    """Write a LlavaForConditionalGeneration folder (model/hf.py's write_hf_folder: shards, index,
    generation config, tokenizer files) from our whole state dict."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    bos, eos = 1 if bos is None else bos, 2 if eos is None else eos
    tensors = multimodal_to_hf(state_dict, cfg)
    return write_hf_folder(out_dir, {n: tuple(t.shape) for n, t in tensors.items()}, tensors.__getitem__,
                           llava_config(cfg, bos, eos), bos, eos, tokenizer, dtype, max_shard_size)


def multimodal_config_from_hf(d: dict, source: str = "HF config") -> MultimodalConfig:
    """A Llava config.json dict (Pixtral vision, Mixtral text) -> MultimodalConfig; any setting that
    our model does not compute (LLAVA_FIXED) is an HFCheckpointError naming the key."""
    if d.get("model_type") != "llava":
        raise HFCheckpointError(f"{source}: model_type {d.get('model_type')!r} is not 'llava'")
    if d["text_config"].get("model_type", "mixtral") != "mixtral":  # from_hf reads Mixtral's tensor names
        raise HFCheckpointError(f"{source}: text_config.model_type {d['text_config']['model_type']!r} "
                                "is not 'mixtral'")
    defaults = {"vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                "projector_hidden_act": "gelu", "multimodal_projector_bias": True}  # LlavaConfig's
    for key, supported in LLAVA_FIXED.items():
        if d.get(key, defaults[key]) != supported:
            raise HFCheckpointError(f"{source}: {key}={d.get(key, defaults[key])!r} is not supported "
                                    f"(only {supported!r})")
    cfg = MultimodalConfig(vision=vision_config_from_hf(d["vision_config"], f"{source} vision_config"),
                           text=model_config_from_hf(d["text_config"], f"{source} text_config"),
                           image_token_id=d.get("image_token_index", 32000))
    try:
        validate_multimodal_config(cfg)
    except ValueError as e:
        raise HFCheckpointError(f"{source}: {e}") from None
    return cfg


def import_multimodal_hf(path) -> tuple[MultimodalConfig, dict[str, torch.Tensor]]:
    """A Llava folder (Pixtral vision, Mixtral text; Hub tensor names) -> (config, our whole state dict)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise HFCheckpointError(f"{path}: not an HF Llava folder (no config.json)")
    cfg = multimodal_config_from_hf(json.loads((path / "config.json").read_text()), f"{path}/config.json")
    where, _ = index_folder(path)
    hf = {}
    for file in sorted(set(where.values())):
        hf |= load_file(str(file))
    parts = split_state_dict(hf, {v: k for k, v in PREFIXES.items()}, f"HF checkpoint {path}")
    source = f"HF checkpoint {path}"
    check_tensors(parts["multi_modal_projector."],
                  {PROJECTOR_TO_HF[k]: s for k, s in projector_shapes(cfg).items()}, source)
    projector = {k: parts["multi_modal_projector."][hf_name] for k, hf_name in PROJECTOR_TO_HF.items()}
    out = {"decoder." + k: v for k, v in from_hf(parts["language_model."], cfg.text, source).items()}
    out |= {"vision." + k: v for k, v in vision_from_hf(parts["vision_tower."], cfg.vision, source).items()}
    return cfg, out | {"projector." + k: v for k, v in projector.items()}
