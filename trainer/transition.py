"""Transition tuning: a Mixture of Tokens checkpoint becomes the token-choice sparse MoE of the same
weights, which then trains on (the `transition` stage).

A Mixture of Tokens mixes the sequences of a batch, which at inference would let the requests of a batch
influence each other; the sparse MoE routes every token alone. Everything but the MoE's controller carries
over under its own name (the experts are the same stacked w1, w3, w2); each layer's router gate is the
controller times logit_scale / temperature: the same logits, now compared across the experts of one
token instead of across the tokens of a group, top_k from the checkpoint's model.top_k. The stage then
trains like pretraining on its own data stream, and its checkpoints are a plain sparse Mixtral that the
export stage writes as MixtralForCausalLM.

Before training the stage measures the held-out loss of the Mixture of Tokens checkpoint and of the
converted model on the same documents (printed and written to <output>/transition.json); the loop's
final evaluation is the loss after tuning.
"""

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import distributed as D
from .config import ConfigError, save_config


class SparseFromMixtureOfTokens:
    """A Mixture of Tokens checkpoint read as a source of the sparse model's weights (model/init.py)."""

    ROUTER = re.compile(r"(layers\.\d+\.moe\.)router\.gate\.weight")

    def __init__(self, source, mot_cfg):
        self.source, self.cfg = source, mot_cfg

    def read(self, name: str, full_shape, offsets, shape) -> torch.Tensor:
        router = self.ROUTER.fullmatch(name)
        if router is None:
            return self.source.read(name, full_shape, offsets, shape)
        gate = self.source.read(router[1] + "controller.weight", full_shape, offsets, shape) / self.cfg.mot_temperature
        if self.cfg.mot_learnable_temperature:
            gate = gate * self.source.read(router[1] + "logit_scale", [1], [0], [1])
        return gate


class BareEngine:
    """What a task's evaluate uses of an engine, for a model that trains in no engine."""

    def __init__(self, model):
        self.module = model

    def __call__(self, *args):
        return self.module(*args)

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()


def mixture_of_tokens_checkpoint(init):
    """(checkpoint folder, its ModelConfig) of transition.init, which must be a Mixture of Tokens."""
    from .export import read_model, resolve_checkpoint

    ckpt = resolve_checkpoint(init)
    mot_cfg = read_model(ckpt)[0]
    if mot_cfg.moe_type != "tokens":
        raise ConfigError(f"transition.init: {ckpt} holds model.moe_type={mot_cfg.moe_type}, "
                          "not a Mixture of Tokens (tokens)")
    return ckpt, mot_cfg


def transition_tuning(cfg: DictConfig) -> bool:
    from parallel.layout import Layout

    from .checkpoint import CheckpointSource, latest_checkpoint
    from .engine import build_engine, build_model
    from .loop import train
    from .tasks import PretrainTask

    scfg = cfg.transition
    out = Path(scfg.output)
    ckpt, mot_cfg = mixture_of_tokens_checkpoint(scfg.init)
    sparse_cfg = replace(mot_cfg, moe_type="sparse")
    cfg = cfg.copy()
    cfg.model = OmegaConf.structured(sparse_cfg)  # what the checkpoints of this stage hold
    layout = Layout.build(cfg.parallel, sparse_cfg, scfg, D.world_size(), D.rank())
    dtype = torch.bfloat16 if scfg.dtype == "bf16" else torch.float32
    task = PretrainTask(scfg, sparse_cfg, layout)
    resume = latest_checkpoint(out / "checkpoints")
    if resume is None:
        mot = build_model(mot_cfg, None, scfg.seed, layout, cfg.parallel, dtype, source=CheckpointSource(ckpt))
        before = task.evaluate(BareEngine(mot), layout)["eval/loss"]
        del mot
        source = SparseFromMixtureOfTokens(CheckpointSource(ckpt), mot_cfg)
    else:
        source = CheckpointSource(resume)
    model = build_model(sparse_cfg, None, scfg.seed, layout, cfg.parallel, dtype, source=source)
    if resume is None:
        switched = task.evaluate(BareEngine(model), layout)["eval/loss"]
    engine = build_engine(model, scfg, cfg.parallel, layout)
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        if resume is None:
            record = {"from": str(ckpt), "eval_loss_mixture_of_tokens": before, "eval_loss_switched": switched}
            (out / "transition.json").write_text(json.dumps(record, indent=1))
            print(f"[transition] held-out loss: Mixture of Tokens {before:.4f} -> sparse top-{sparse_cfg.top_k} "
                  f"at the switch {switched:.4f}", flush=True)
    step, last = train("transition", scfg, cfg, engine, task, layout, sparse_cfg)
    if D.is_main() and "eval/loss" in last:
        path = out / "transition.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        record.update(eval_loss_tuned=last["eval/loss"], steps=step)
        path.write_text(json.dumps(record, indent=1))
        print(f"[transition] held-out loss after {step} steps of tuning: {last['eval/loss']:.4f}", flush=True)
    return step == scfg.steps
