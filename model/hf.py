"""Hugging Face interop: our Mixtral <-> a `MixtralForCausalLM` folder, one adapter for both directions.
Models whose router Mixtral cannot express go to Qwen2-MoE or GLM-4-MoE instead (model/hf_families.py).

Names (ours -> the Hub layout of mistralai/Mixtral-8x7B-v0.1, which vLLM and every transformers version
load; transformers 5 fuses the experts on load and un-fuses them again in save_pretrained):
    tok_embeddings.weight                   model.embed_tokens.weight                          (V, D)
    layers.N.attention_norm.weight          model.layers.N.input_layernorm.weight              (D,)
    layers.N.attention.{wq,wk,wv,wo}.weight model.layers.N.self_attn.{q,k,v,o}_proj.weight     same (out, in)
    layers.N.ffn_norm.weight                model.layers.N.post_attention_layernorm.weight     (D,)
    layers.N.moe.router.gate.weight         model.layers.N.block_sparse_moe.gate.weight        (E, D)
    layers.N.moe.experts.w1 / w3 (E, D, F)  ...block_sparse_moe.experts.E.w1 / w3.weight       (F, D) each
    layers.N.moe.experts.w2 (E, F, D)       ...block_sparse_moe.experts.E.w2.weight            (D, F) each
    norm.weight, output.weight              model.norm.weight, lm_head.weight
`from_hf` also reads transformers 5's in-memory (fused) layout, per layer, as written by
`save_pretrained(..., save_original_format=False)`:
    model.layers.N.mlp.gate.weight (E, D); mlp.experts.gate_up_proj (E, 2F, D) = [w1^T; w3^T] stacked
    along dim 1; mlp.experts.down_proj (E, D, F) = w2^T.
Every conversion consumes every tensor: a missing or unexpected name, or a shape that differs from
the config, is an HFCheckpointError (a ValueError) naming the tensor (and the folder). Files are read
with safetensors only.

At scale nothing is whole: `HFFolder` is a source of boxes of our tensors (model/init.py) that a rank
reads with safetensors' lazy slicing, only for the shards it holds; `export_hf` writes the Hub
tensors one at a time from any source into size-bounded shards.
"""

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .config import ModelConfig, validate_model_config
from .hf_families import ARCHITECTURES, family_config, family_hub_names, hf_family, model_config_from_family
from .init import StateDictSource

class HFCheckpointError(ValueError):
    """An HF folder or state dict that is not the Mixtral the config describes; names the folder,
    file or tensor."""


OUR_TO_HF = {  # per-layer tensors that map one to one
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_LEVEL = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


# ---- config ---------------------------------------------------------------------------------------

def hf_config(cfg: ModelConfig, bos_token_id: int = 1, eos_token_id: int = 2):
    """ModelConfig -> transformers.MixtralConfig with the same shapes and math."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.expert_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_size, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k, max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        sliding_window=cfg.sliding_window, rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std,
        router_aux_loss_coef=cfg.router_aux_loss_coef, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=bos_token_id, eos_token_id=eos_token_id)


def model_config_from_hf(hf_cfg, source: str = "HF config") -> ModelConfig:
    """transformers.MixtralConfig or a config.json dict -> ModelConfig. Training-only knobs that we do not
    implement (router_jitter_noise, attention_dropout) are ignored; anything that changes the forward
    pass and that we cannot represent (another model_type, rope scaling, tied embeddings, another
    activation) is a ValueError naming `source` and the key."""
    from transformers import MixtralConfig

    d = hf_cfg.to_dict() if hasattr(hf_cfg, "to_dict") else dict(hf_cfg)
    if d.get("model_type") in ARCHITECTURES:  # another router (model/hf_families.py)
        cfg = model_config_from_family(d, source)
        try:
            validate_model_config(cfg)
        except ValueError as e:
            raise HFCheckpointError(f"{source}: {e}") from None
        return cfg
    if d.get("model_type", "mixtral") != "mixtral":
        raise HFCheckpointError(f"{source}: model_type {d['model_type']!r} is not 'mixtral'")
    c = MixtralConfig.from_dict(d)
    rope = c.rope_parameters or {}
    checks = [("rope_parameters.rope_type", rope.get("rope_type", "default"), "default"),
              ("tie_word_embeddings", c.tie_word_embeddings, False), ("hidden_act", c.hidden_act, "silu")]
    for key, value, supported in checks:
        if value != supported:
            raise HFCheckpointError(f"{source}: {key}={value!r} is not supported (only {supported!r})")
    head_dim = c.head_dim if c.head_dim and c.head_dim * c.num_attention_heads != c.hidden_size else None
    cfg = ModelConfig(
        vocab_size=c.vocab_size, dim=c.hidden_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, head_dim=head_dim,
        num_experts=c.num_local_experts, top_k=c.num_experts_per_tok, expert_dim=c.intermediate_size,
        max_seq_len=c.max_position_embeddings, rope_theta=float(rope.get("rope_theta", c.default_theta)),
        sliding_window=c.sliding_window, norm_eps=c.rms_norm_eps, init_std=c.initializer_range,
        router_aux_loss_coef=c.router_aux_loss_coef)
    try:
        validate_model_config(cfg)
    except ValueError as e:
        raise HFCheckpointError(f"{source}: {e}") from None
    return cfg


# ---- state dicts ----------------------------------------------------------------------------------

def our_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Name -> shape of every tensor of Mixtral(cfg), built on the meta device (no memory)."""
    from .mixtral import Mixtral

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Mixtral(cfg).state_dict().items()}


def hf_shapes(cfg: ModelConfig, fused_layers: frozenset = frozenset()) -> dict[str, tuple]:
    """Name -> shape of every tensor of an HF checkpoint; layers in `fused_layers` use the fused layout."""
    D, F, E, Dh = cfg.dim, cfg.expert_dim, cfg.num_experts, cfg.head_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, D)}
    for i in range(cfg.num_layers):
        q = f"model.layers.{i}."
        shapes |= {q + "input_layernorm.weight": (D,), q + "post_attention_layernorm.weight": (D,),
                   q + "self_attn.q_proj.weight": (cfg.num_heads * Dh, D),
                   q + "self_attn.k_proj.weight": (cfg.num_kv_heads * Dh, D),
                   q + "self_attn.v_proj.weight": (cfg.num_kv_heads * Dh, D),
                   q + "self_attn.o_proj.weight": (D, cfg.num_heads * Dh)}
        if i in fused_layers:
            shapes |= {q + "mlp.gate.weight": (E, D), q + "mlp.experts.gate_up_proj": (E, 2 * F, D),
                       q + "mlp.experts.down_proj": (E, D, F)}
            continue
        shapes[q + "block_sparse_moe.gate.weight"] = (E, D)
        for e in range(E):
            x = f"{q}block_sparse_moe.experts.{e}."
            shapes |= {x + "w1.weight": (F, D), x + "w2.weight": (D, F), x + "w3.weight": (F, D)}
    return shapes | {"model.norm.weight": (D,), "lm_head.weight": (cfg.vocab_size, D)}


def check_tensors(tensors: dict, expected: dict[str, tuple], source: str) -> None:
    """ValueError naming every missing or unexpected tensor, else the first shapes that differ."""
    check_shapes({k: tuple(v.shape) for k, v in tensors.items()}, expected, source)


def check_shapes(shapes: dict[str, tuple], expected: dict[str, tuple], source: str) -> None:
    """check_tensors on name -> shape (e.g. read from safetensors headers, no data loaded)."""
    def names(keys):
        keys = sorted(keys, key=_natural)
        more = f" (and {len(keys) - 8} more)" if len(keys) > 8 else ""
        return ", ".join(repr(k) for k in keys[:8]) + more

    missing, unexpected = expected.keys() - shapes.keys(), shapes.keys() - expected.keys()
    problems = [f"missing tensor{'s' * (len(missing) > 1)} {names(missing)}"] if missing else []
    problems += [f"unexpected tensor{'s' * (len(unexpected) > 1)} {names(unexpected)}"] if unexpected else []
    problems += [f"tensor {k!r} has shape {tuple(shapes[k])}, expected {expected[k]}"
                 for k in sorted(expected.keys() & shapes.keys(), key=_natural)
                 if tuple(shapes[k]) != expected[k]][:8]
    if problems:
        raise HFCheckpointError(f"{source}: " + "; ".join(problems))


def hub_names(cfg: ModelConfig) -> dict[str, tuple[str, Optional[int]]]:
    """Hub name -> (our name, expert index or None), in the Hub's order. An expert's Hub tensor is
    our stacked tensor's row `expert`, transposed."""
    out = {TOP_LEVEL["tok_embeddings.weight"]: ("tok_embeddings.weight", None)}
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out |= {q + hf: (p + ours, None) for ours, hf in OUR_TO_HF.items()}
        out[q + "block_sparse_moe.gate.weight"] = (p + "moe.router.gate.weight", None)
        for w in ("w1", "w2", "w3"):
            out |= {f"{q}block_sparse_moe.experts.{e}.{w}.weight": (f"{p}moe.experts.{w}", e)
                    for e in range(cfg.num_experts)}
    return out | {TOP_LEVEL[k]: (k, None) for k in ("norm.weight", "output.weight")}


def hub_tensor(source, name: str, expert: Optional[int], full_shape) -> torch.Tensor:
    """The Hub tensor of our tensor `name` (row `expert` of a stacked expert tensor, transposed), read
    from a source of our tensors (model/init.py): only that box is read."""
    if expert is None:
        return source.read(name, full_shape, [0] * len(full_shape), full_shape)
    return source.read(name, full_shape, [expert, 0, 0], [1, *full_shape[1:]])[0].t()


def hub_layout(cfg: ModelConfig) -> tuple[str, dict, dict]:
    """(family, Hub name -> (our name, expert), Hub name -> shape) of the export of `cfg`: Mixtral's, or
    the family that carries its router (model/hf_families.py; refused there when none does)."""
    family = hf_family(cfg)
    if family == "mixtral":
        return family, hub_names(cfg), hf_shapes(cfg)
    names, ours = family_hub_names(cfg, family), our_shapes(cfg)
    return family, names, {n: ours[o] if e is None else ours[o][:0:-1] for n, (o, e) in names.items()}


def to_hf(state_dict: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> Hub-named tensors (views: no copy of the experts)."""
    ours = our_shapes(cfg)
    check_tensors(state_dict, ours, "state dict")
    source = StateDictSource(state_dict)
    return {hf: hub_tensor(source, name, e, ours[name]) for hf, (name, e) in hub_layout(cfg)[1].items()}


def from_hf(hf_state_dict: dict, cfg: ModelConfig, source: str = "HF state dict") -> dict[str, torch.Tensor]:
    """HF tensors (Hub or transformers 5 fused names, chosen per layer) -> our state dict."""
    fused = frozenset(i for i in range(cfg.num_layers)
                      if f"model.layers.{i}.mlp.experts.gate_up_proj" in hf_state_dict)
    check_tensors(hf_state_dict, hf_shapes(cfg, fused), source)
    sd, F = hf_state_dict, cfg.expert_dim
    out = {ours: sd[hf] for ours, hf in TOP_LEVEL.items()}
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out |= {p + ours: sd[q + hf] for ours, hf in OUR_TO_HF.items()}
        if i in fused:
            out[p + "moe.router.gate.weight"] = sd[q + "mlp.gate.weight"]
            gate_up = sd[q + "mlp.experts.gate_up_proj"]  # (E, 2F, D)
            out[p + "moe.experts.w1"] = gate_up[:, :F].transpose(1, 2).contiguous()
            out[p + "moe.experts.w3"] = gate_up[:, F:].transpose(1, 2).contiguous()
            out[p + "moe.experts.w2"] = sd[q + "mlp.experts.down_proj"].transpose(1, 2).contiguous()
            continue
        out[p + "moe.router.gate.weight"] = sd[q + "block_sparse_moe.gate.weight"]
        for w in ("w1", "w2", "w3"):
            out[f"{p}moe.experts.{w}"] = torch.stack(
                [sd[f"{q}block_sparse_moe.experts.{e}.{w}.weight"].t() for e in range(cfg.num_experts)])
    return out


# ---- folders --------------------------------------------------------------------------------------

def export_hf(source, cfg: ModelConfig, out_dir, tokenizer=None, dtype=torch.bfloat16,
              max_shard_size: Union[int, str] = "2GB") -> Path:
    """Write a MixtralForCausalLM folder: config.json, generation_config.json, model-0000k-of-0000N
    .safetensors + model.safetensors.index.json, and the tokenizer's files when one is given.

    `source` is our state dict, or any source of our tensors (model/init.py; a checkpoint's
    trainer.checkpoint.CheckpointSource): tensors are read one Hub tensor at a time (an expert's
    row only) and cast into the shard being filled, so memory holds one shard plus one tensor.
    Written into a temporary sibling and renamed at the end: a failed export leaves no folder behind.
    An existing `out_dir` is replaced if it is empty or an HF folder (has config.json).
    """
    ours = our_shapes(cfg)
    if isinstance(source, dict):
        check_tensors(source, ours, "state dict")
        source = StateDictSource(source)
    family, names, shapes = hub_layout(cfg)
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    bos, eos = 1 if bos is None else bos, 2 if eos is None else eos
    config = (hf_config(cfg, bos, eos) if family == "mixtral" else family_config(cfg, family, bos, eos)).to_dict()
    # top-level rope_theta: what transformers 4.x and vLLM read
    config |= {"architectures": [ARCHITECTURES.get(family, "MixtralForCausalLM")], "rope_theta": float(cfg.rope_theta)}
    return write_hf_folder(out_dir, {n: shapes[n] for n in names},
                           lambda n: hub_tensor(source, names[n][0], names[n][1], ours[names[n][0]]),
                           config, bos, eos, tokenizer, dtype, max_shard_size)


def write_hf_folder(out_dir, shapes: dict[str, tuple], read: Callable[[str], torch.Tensor], config: dict,
                    bos: int, eos: int, tokenizer=None, dtype=torch.bfloat16,
                    max_shard_size: Union[int, str] = "2GB") -> Path:
    """Write any HF model folder: config.json (`config` plus its dtype), generation_config.json, the
    tensors named in `shapes` (in that order), each `read(name)` when its shard is filled and cast to
    `dtype`, into model-0000k-of-0000N.safetensors + model.safetensors.index.json, and the tokenizer's
    files when one is given. Memory holds one shard plus one tensor. Written into a temporary sibling
    and renamed at the end: a failed export leaves no folder behind. An existing `out_dir` is replaced
    if it is empty or an HF folder (has config.json)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").exists():
        raise FileExistsError(f"export: {out_dir} exists and is not an HF folder; refusing to replace it")
    dtype_name = str(dtype).removeprefix("torch.")
    config = config | {"dtype": dtype_name, "torch_dtype": dtype_name}  # torch_dtype: what transformers 4.x reads
    shards = split_into_shards(shapes, dtype, parse_size(max_shard_size))
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weight_map = {}
        for k, shard_names in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            shard = {n: read(n).to(dtype).contiguous() for n in shard_names}
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            del shard
            weight_map |= dict.fromkeys(shard_names, fname)
        total = sum(math.prod(shape) for shape in shapes.values())
        index = {"metadata": {"total_size": total * dtype.itemsize, "total_parameters": total},
                 "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        GenerationConfig(bos_token_id=bos, eos_token_id=eos).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():  # move the old folder aside first: a crash here still leaves one folder
            old = tmp.with_name(tmp.name + "-old")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def index_folder(path: Path) -> tuple[dict[str, Path], dict[str, tuple]]:
    """An HF folder's tensors from the safetensors headers, no data read: (name -> file, name -> shape).
    Checks the index (model.safetensors.index.json, else one model.safetensors), that every shard it
    names exists, and that no tensor appears twice or outside its indexed shard."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise HFCheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                         "(pickle checkpoints such as pytorch_model.bin are not read)")
    where, shapes = {}, {}
    for fname in files:
        if not (path / fname).is_file():
            raise HFCheckpointError(f"{path}: shard {fname} named in model.safetensors.index.json is missing")
        with safe_open(str(path / fname), framework="pt") as f:
            for name in f.keys():
                if name in where:
                    raise HFCheckpointError(f"HF checkpoint {path}: tensor {name!r} appears in two shards")
                if weight_map is not None and weight_map.get(name) != fname:
                    raise HFCheckpointError(f"HF checkpoint {path}: tensor {name!r} in {fname} is not indexed "
                                     f"there (index says {weight_map.get(name)})")
                where[name] = path / fname
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return where, shapes


class HFFolder:
    """An HF Mixtral folder (config.json + model.safetensors or a sharded index) as a source of our
    tensors (model/init.py): read(name, full_shape, offsets, shape) reads only that box, through
    safetensors' lazy slicing (get_slice), in the files' dtype. Hub expert tensors are per expert, so
    a rank that holds some experts reads only theirs. Opening the folder checks config.json, the
    index, that every shard exists, and every tensor's shape against the config from the headers,
    before any data is read. Pickle files (pytorch_model.bin) are never read."""

    def __init__(self, path):
        path = self.path = Path(path)
        if not (path / "config.json").is_file():
            raise HFCheckpointError(f"{path}: not an HF Mixtral folder (no config.json)")
        self.cfg = model_config_from_hf(json.loads((path / "config.json").read_text()),
                                        source=f"{path}/config.json")
        self._where, shapes = index_folder(path)
        self.family, names, family_shapes = hub_layout(self.cfg)
        self._hub_of = {}  # our name -> {expert or None: Hub name}, for the families other than Mixtral
        for hub, (ours, expert) in names.items():
            self._hub_of.setdefault(ours, {})[expert] = hub
        self.fused = frozenset(i for i in range(self.cfg.num_layers)
                               if f"model.layers.{i}.mlp.experts.gate_up_proj" in shapes)
        expected = hf_shapes(self.cfg, self.fused) if self.family == "mixtral" else family_shapes
        check_shapes(shapes, expected, f"HF checkpoint {path}")
        self.ours = our_shapes(self.cfg)

    def _get(self, hf_name: str, box: tuple) -> torch.Tensor:
        """The box of one file tensor, copied out; the file is mapped only for this read (a mapping
        kept open would keep every page read so far resident: the whole folder, by the end)."""
        from safetensors import safe_open

        with safe_open(str(self._where[hf_name]), framework="pt") as f:
            return f.get_slice(hf_name)[box]

    def read(self, name: str, full_shape, offsets, shape) -> torch.Tensor:
        if self.ours.get(name) != tuple(full_shape):
            raise HFCheckpointError(f"HF checkpoint {self.path}: our tensor {name!r} of shape {tuple(full_shape)} "
                             f"does not match the folder's config ({self.ours.get(name)})")
        box = tuple(slice(o, o + n) for o, n in zip(offsets, shape))
        if self.family != "mixtral":
            hub = self._hub_of[name]
            if None in hub:
                return self._get(hub[None], box)
            experts, a, b = box
            return torch.stack([self._get(hub[e], (b, a)).t() for e in range(experts.start, experts.stop)])
        if name in TOP_LEVEL:
            return self._get(TOP_LEVEL[name], box)
        _, i, rest = name.split(".", 2)
        q = f"model.layers.{i}."
        if rest in OUR_TO_HF:
            return self._get(q + OUR_TO_HF[rest], box)
        fused = int(i) in self.fused
        if rest == "moe.router.gate.weight":
            return self._get(q + ("mlp.gate.weight" if fused else "block_sparse_moe.gate.weight"), box)
        w = rest.rsplit(".", 1)[1]
        experts, a, b = box  # w1, w3: (E, D, F) boxes; w2: (E, F, D)
        if fused:  # gate_up_proj (E, 2F, D) = [w1^T; w3^T], down_proj (E, D, F) = w2^T
            if w == "w2":
                return self._get(q + "mlp.experts.down_proj", (experts, b, a)).transpose(1, 2)
            shift = 0 if w == "w1" else self.cfg.expert_dim
            rows = slice(b.start + shift, b.stop + shift)
            return self._get(q + "mlp.experts.gate_up_proj", (experts, rows, a)).transpose(1, 2)
        return torch.stack([self._get(f"{q}block_sparse_moe.experts.{e}.{w}.weight", (b, a)).t()
                            for e in range(experts.start, experts.stop)])


def import_hf(path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """An HF Mixtral folder -> (config, our whole state dict), in the files' dtype (HFFolder read whole)."""
    folder = HFFolder(path)
    return folder.cfg, {name: folder.read(name, shape, [0] * len(shape), shape)
                        for name, shape in folder.ours.items()}


def split_into_shards(shapes: dict[str, tuple], dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    """Names grouped in order into shards of at most max_bytes (a larger tensor gets its own shard)."""
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def parse_size(size: Union[int, str]) -> int:
    """2000000, "2GB" (10^9) or "2GiB" (2^30) -> bytes, as transformers reads max_shard_size."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", size, flags=re.IGNORECASE)
    if m is None:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like '2GB' / '500MiB'")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** ("KMGT".index(unit[0]) + 1))


def _natural(name: str):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]
