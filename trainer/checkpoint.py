"""Layout-independent checkpoints: logical tensors written in slices, read back into any layout.

A checkpoint is a folder `step_00000100/`:
    manifest.json        tensor -> full shape, dtype, and its slices (file, key, offsets, shape, sha256)
    rank00000.safetensors ...   the slices each rank was designated to write
    trainer_state.json   step, scheduler, data position, RNG states, layout it was saved at
    config.yaml          the resolved config of the run
Tensors: `model/<name>` (fp32 master weights), `exp_avg/<name>`, `exp_avg_sq/<name>` (Adam moments),
`<name>` being the parameter's name in the single-device model. A parameter sharded by parallel/
carries `param._shard`: (dim, rank, world) or a list of them; its slice of the logical tensor follows.
Replicas (data parallel, tensor-parallel replicated norms...) are written once, by the lowest rank.

ZeRO's flat buffers are read and written through DeepSpeed's per-parameter accessors
(safe_get/set_full_fp32_param, safe_get/set_full_optimizer_state), which gather over the parameter's
data-parallel group: every rank calls them for every parameter, in the same order.

Safety: ranks write into `step_X.tmp/`; rank 0 fsyncs, renames to `step_X/` and only then points
`latest` at it, so a crash at any moment leaves the previous checkpoint loadable. Every slice's sha256
is checked on load; nothing is ever unpickled.
"""

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                             safe_set_full_fp32_param, safe_set_full_optimizer_state)
from safetensors import safe_open

from parallel.deepspeed_internals import holds_fp32_fragment, relink_optimizer_state
from parallel.materialize import local_slice

from . import distributed as D
from .safetensors_stream import SafetensorsWriter

MOMENTS = ("exp_avg", "exp_avg_sq")


class CheckpointError(RuntimeError):
    pass


# ---------------------------------------------------------------- slices of logical tensors

def _intersect(off_a, shape_a, off_b, shape_b):
    lo = [max(a, b) for a, b in zip(off_a, off_b)]
    hi = [min(a + s, b + t) for a, s, b, t in zip(off_a, shape_a, off_b, shape_b)]
    return None if any(h <= l for l, h in zip(lo, hi)) else (lo, hi)


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()


# ---------------------------------------------------------------- reading DeepSpeed's state

def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def model_buffers(module) -> list[tuple[str, torch.Tensor]]:
    """The persistent buffers (model/moe.py's expert_bias): whole on every rank, saved as `model/<name>`
    by rank 0 and loaded like the weights."""
    state = module.state_dict(keep_vars=True)
    return [(name, b) for name, b in module.named_buffers() if name in state]


def _master(engine, p) -> torch.Tensor:
    if not isinstance(p, torch.nn.Parameter):  # a buffer: no optimizer copy
        return p.detach().float().cpu()
    v = safe_get_full_fp32_param(p)
    return (v if v is not None else p.detach()).float().cpu()


def _moment(engine, p, key) -> torch.Tensor:
    v = safe_get_full_optimizer_state(p, key)
    if v is None:
        state = _base_optimizer(engine).state.get(p, {})
        if key not in state and not p.requires_grad:  # a frozen parameter has no optimizer state
            return torch.zeros(p.shape)
        v = state[key]
    return v.float().cpu()


def _ensure_optimizer_state(engine, step: int):
    """Adam's state at `step`: zeros where no step ran yet, so it can be read or overwritten."""
    base = _base_optimizer(engine)
    for group in base.param_groups:
        for p in group["params"]:
            if "exp_avg" not in base.state[p]:
                base.state[p].update(step=torch.tensor(float(step)), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
            else:
                base.state[p]["step"] = torch.tensor(float(step))
    relink_optimizer_state(engine.optimizer)  # ZeRO's views of later param groups stay empty otherwise


# ---------------------------------------------------------------- save

def save_checkpoint(root, step: int, engine, trainer_state: dict, config_yaml: str,
                    keep_last: int = 2, keep_every: int = 0) -> Path:
    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    if D.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()

    _ensure_optimizer_state(engine, step)
    params = list(engine.module.named_parameters())
    buffers = model_buffers(engine.module)
    kinds = ("model", *MOMENTS)
    slices = {name: local_slice(p) for name, p in params}  # name -> (full shape, offsets)
    slices |= {name: (list(b.shape), [0] * b.dim()) for name, b in buffers}
    mine = [(f"{kind}/{name}", tuple(slices[name][1])) for name, _ in params for kind in kinds]
    mine += [(f"model/{name}", tuple(slices[name][1])) for name, _ in buffers]
    everyone = [None] * D.world_size()
    if dist.is_initialized():
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    writer = {}
    for r, items in enumerate(everyone):
        for item in items:
            writer.setdefault(item, r)
    fname = f"rank{D.rank():05d}.safetensors"
    layout = [(_slice_key(f"{kind}/{name}", slices[name][1]), list(p.shape), torch.float32) for name, p in params
              for kind in kinds if writer[(f"{kind}/{name}", tuple(slices[name][1]))] == D.rank()]
    layout += [(_slice_key(f"model/{name}", slices[name][1]), list(b.shape), torch.float32) for name, b in buffers
               if writer[(f"model/{name}", tuple(slices[name][1]))] == D.rank()]
    entries = []
    # one tensor at a time: ZeRO's accessors gather a parameter (a collective every rank joins), the
    # designated writer streams it into its file, and it is freed before the next one
    with SafetensorsWriter(tmp / fname, layout) as out:
        items = [(n, kind, p) for n, p in params for kind in kinds] + [(n, "model", b) for n, b in buffers]
        for name, kind, p in items:
            full, offsets = slices[name]
            t = _master(engine, p) if kind == "model" else _moment(engine, p, kind)
            key = f"{kind}/{name}"
            if writer[(key, tuple(offsets))] != D.rank():
                continue
            out.write(_slice_key(key, offsets), t)
            entries.append(dict(tensor=key, full_shape=full, dtype="float32", file=fname,
                                key=_slice_key(key, offsets), offsets=offsets, shape=list(t.shape),
                                sha256=_sha256(t)))
    _fsync(tmp / fname)

    rng = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        rng["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    gathered = [None] * D.world_size()
    if dist.is_initialized():
        dist.gather_object((entries, rng), gathered if D.is_main() else None, dst=0)
    else:
        gathered = [(entries, rng)]

    if D.is_main():
        manifest = {"step": step, "tensors": {}}
        for ents, _ in gathered:
            for e in ents:
                t = manifest["tensors"].setdefault(e["tensor"], dict(full_shape=e["full_shape"],
                                                                     dtype=e["dtype"], slices=[]))
                t["slices"].append({k: e[k] for k in ("file", "key", "offsets", "shape", "sha256")})
        state = dict(trainer_state, step=step, rng=[g[1] for g in gathered])
        _write(tmp / "manifest.json", json.dumps(manifest, indent=1))
        _write(tmp / "trainer_state.json", json.dumps(state, indent=1))
        _write(tmp / "config.yaml", config_yaml)
        _fsync(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        _write(root / "latest.tmp", final.name)
        os.replace(root / "latest.tmp", root / "latest")
        _fsync(root)
        _prune(root, keep_last, keep_every)
    D.barrier()
    return final


def _slice_key(key: str, offsets) -> str:
    return f"{key}@{','.join(map(str, offsets))}"


def _write(path: Path, text: str):
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep_last: int, keep_every: int):
    steps = sorted(int(p.name[5:]) for p in root.glob("step_*") if p.name[5:].isdigit())
    keep = set(steps[-max(keep_last, 1):])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    for s in steps:
        if s not in keep:
            shutil.rmtree(root / f"step_{s:08d}")


# ---------------------------------------------------------------- load

def latest_checkpoint(root) -> Optional[Path]:
    """The checkpoint `latest` points at, or None when the folder has none."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / "manifest.json").is_file():
        raise CheckpointError(f"{pointer} points at {path}, which is not a complete checkpoint")
    return path


class CheckpointReader:
    """Reads any box of any logical tensor, verifying each slice's checksum once."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / "manifest.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path / 'manifest.json'}: unreadable manifest ({e})") from e
        self._verified = set()

    def names(self, kind: str = "model") -> list[str]:
        return [k[len(kind) + 1:] for k in self.manifest["tensors"] if k.startswith(kind + "/")]

    def has(self, key: str) -> bool:
        return key in self.manifest["tensors"]

    def full_shape(self, key: str) -> list[int]:
        return self.manifest["tensors"][key]["full_shape"]

    def _slice(self, s: dict, tensor: str, box: tuple) -> torch.Tensor:
        """`box` (slices) of stored slice `s`. A whole slice is checked against its sha256 (once); a part
        of one is read alone through safetensors' lazy slicing, unchecked (so a rank reads no more than
        it keeps; `inspect_checkpoint --verify` checks everything)."""
        file = self.path / s["file"]
        whole = all(b.start == 0 and b.stop == n for b, n in zip(box, s["shape"]))
        try:  # mapped for this read only: a mapping kept open keeps every page read so far resident
            with safe_open(str(file), framework="pt") as f:
                t = f.get_tensor(s["key"]) if whole else f.get_slice(s["key"])[box]
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor '{tensor}' ({e})") from e
        if whole and s["key"] not in self._verified:
            if list(t.shape) != s["shape"] or _sha256(t) != s["sha256"]:
                raise CheckpointError(f"{file}: tensor '{tensor}' is corrupted (checksum mismatch)")
            self._verified.add(s["key"])
        return t

    def read(self, key: str, offsets=None, shape=None) -> torch.Tensor:
        """The box [offsets, offsets + shape) of logical tensor `key` (the whole tensor by default)."""
        if key not in self.manifest["tensors"]:
            raise CheckpointError(f"{self.path}: checkpoint has no tensor '{key}'")
        meta = self.manifest["tensors"][key]
        shape = shape or meta["full_shape"]
        offsets = offsets or [0] * len(shape)
        out = torch.empty(shape, dtype=getattr(torch, meta["dtype"]))
        covered = 0
        for s in meta["slices"]:
            box = _intersect(offsets, shape, s["offsets"], s["shape"])
            if box is None:
                continue
            lo, hi = box
            src = self._slice(s, key, tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, s["offsets"])))
            out[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offsets))] = src
            covered += src.numel()
        if covered != out.numel():
            raise CheckpointError(f"{self.path}: slices of '{key}' do not cover the requested box")
        return out

    def trainer_state(self) -> dict:
        return json.loads((self.path / "trainer_state.json").read_text())


class CheckpointSource:
    """A checkpoint's fp32 master weights as a starting-weights source (parallel/materialize.py)."""

    def __init__(self, path):
        self.reader = CheckpointReader(path)

    def read(self, name: str, full_shape, offsets, shape) -> torch.Tensor:
        key = f"model/{name}"
        if not self.reader.has(key):
            raise CheckpointError(f"{self.reader.path}: checkpoint has no tensor '{key}'")
        if self.reader.full_shape(key) != list(full_shape):
            raise CheckpointError(f"{self.reader.path}: tensor '{key}' has shape {self.reader.full_shape(key)}, "
                                  f"the model expects {list(full_shape)}")
        return self.reader.read(key, list(offsets), list(shape))


def scheduler_state_for(scheduler: dict, groups: int) -> dict:
    """An LR scheduler's state resized to `groups` optimizer param groups. Their number depends on the
    layout (expert parallelism adds DeepSpeed's expert groups) while all of them follow one schedule:
    each per-group list, its entries all equal, becomes `groups` copies of its entry."""
    out = dict(scheduler)
    for key, value in scheduler.items():
        if isinstance(value, list) and len(value) != groups:
            if any(v != value[0] for v in value):
                raise CheckpointError(f"scheduler state '{key}' differs between param groups ({value}): "
                                      f"cannot map it to {groups} groups")
            out[key] = value[:1] * groups
    return out


def load_checkpoint(path, engine, load_optimizer: bool = True) -> dict:
    """Fill the model (and optimizer) of `engine` from a checkpoint saved at any layout.

    Returns the trainer state (step, scheduler, data position...). RNG states are restored when the
    checkpoint has one for this rank.
    """
    reader = CheckpointReader(path)
    state = reader.trainer_state()
    if "scheduler" in state:
        state["scheduler"] = scheduler_state_for(state["scheduler"], len(_base_optimizer(engine).param_groups))
    params = dict(engine.module.named_parameters())
    buffers = model_buffers(engine.module)
    expected = set(params) | {name for name, _ in buffers}
    stored = set(reader.names("model"))
    if expected != stored:
        raise CheckpointError(f"{path}: parameters differ from the model: missing "
                              f"{sorted(expected - stored)[:5]}, unexpected {sorted(stored - expected)[:5]}")
    for name, b in buffers:
        if reader.full_shape(f"model/{name}") != list(b.shape):
            raise CheckpointError(f"{path}: tensor 'model/{name}' has shape "
                                  f"{reader.full_shape(f'model/{name}')}, the model expects {list(b.shape)}")
        module, _, attr = name.rpartition(".")
        setattr(engine.module.get_submodule(module), attr, reader.read(f"model/{name}").to(b.device))
    if load_optimizer:
        _ensure_optimizer_state(engine, state["step"])
    for name, p in params.items():
        full, offsets = local_slice(p)
        if reader.full_shape(f"model/{name}") != full:
            raise CheckpointError(f"{path}: tensor 'model/{name}' has shape "
                                  f"{reader.full_shape(f'model/{name}')}, the model expects {full}")
        master = reader.read(f"model/{name}", offsets, list(p.shape)).to(p.device)
        with torch.no_grad():
            p.copy_(master.to(p.dtype))
        safe_set_full_fp32_param(p, master)
        if not load_optimizer or not p.requires_grad:  # a frozen parameter has no optimizer state
            continue
        for key in MOMENTS:
            if not reader.has(f"{key}/{name}"):
                continue
            value = reader.read(f"{key}/{name}", offsets, list(p.shape)).to(p.device)
            if holds_fp32_fragment(p):
                safe_set_full_optimizer_state(p, value, key)
            else:
                _base_optimizer(engine).state[p][key].copy_(value)
    rngs = state.get("rng", [])
    if D.rank() < len(rngs):
        rng = rngs[D.rank()]
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(rng["torch"])), dtype=torch.uint8))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(rng["cuda"])),
                                                      dtype=torch.uint8))
    return state
