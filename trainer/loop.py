"""The one training loop. Pretraining, SFT and DPO differ only in their Task (batches + loss).

Each optimizer step takes `gas` micro-batches per data-parallel rank. Token losses are summed and
divided by the number of loss tokens of the whole step (all micro-batches, all ranks), so any layout
and any accumulation give the same gradient as one process with the whole batch.

Preemption: SIGTERM or SIGUSR1 sets a flag; the ranks agree on it after the current step, save a
checkpoint and leave with EXIT_PREEMPTED. A new start resumes from `<output>/checkpoints/latest`.
"""

import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from model.moe import update_expert_bias

from . import distributed as D
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .metrics import RunLogger

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again", the batch script requeues the job


class Preemption:
    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        return D.all_reduce_max(float(self.requested)) > 0


def train(stage: str, scfg: DictConfig, cfg: DictConfig, engine, task, layout, model_cfg):
    """Run stage `stage` to scfg.steps (or scfg.stop_after); returns (last step, its metrics)."""
    out = Path(scfg.output)
    ckpt_root = out / "checkpoints"
    step = 0
    resume = latest_checkpoint(ckpt_root)
    if resume is not None:
        state = load_checkpoint(resume, engine)
        step = state["step"]
        engine.lr_scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr  # load_state_dict restores the schedule, not the optimizer's current lr
        task.load_state_dict(state["data"])
        engine.global_steps = step
    gas = engine.gradient_accumulation_steps()
    logger = RunLogger(out, stage, cfg, scfg, model_cfg, layout, resumed_from=step if resume else None)
    preemption = Preemption()
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    last = {}
    stop_at = min(scfg.steps, scfg.stop_after or scfg.steps)

    def save(at: int):
        save_checkpoint(ckpt_root, at, engine,
                        dict(scheduler=engine.lr_scheduler.state_dict(), data=task.state_dict(),
                             stage=stage, layout=layout.describe()),
                        config_yaml, scfg.keep_last, scfg.keep_every)

    while step < stop_at:
        t0 = time.perf_counter()
        batches = [task.next_batch() for _ in range(gas)]
        counts = torch.tensor([float(sum(task.num_loss_tokens(b) for b in batches)),
                               float(sum(b["tokens"].numel() for b in batches))], device=D.device())
        if dist.is_initialized() and layout.dp > 1:
            dist.all_reduce(counts, group=layout.dp_group)
        loss_tokens, processed = counts.tolist()  # processed: every position run, padding included (MFU's basis)
        scale = layout.dp * gas / loss_tokens
        sums = {}
        for batch in batches:
            loss, metrics = task.loss(engine, batch, scale)
            engine.backward(loss)
            engine.step()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        step += 1
        last = task.reduce_metrics(sums, layout)
        if model_cfg.router_bias_rate:  # aux-loss-free balancing, from the step's global expert load
            update_expert_bias(engine.module, last["expert_load"], model_cfg.router_bias_rate)
        last.update(lr=engine.get_lr()[0], grad_norm=_grad_norm(engine),
                    step_time=time.perf_counter() - t0)
        logger.log(step, last, tokens=processed)
        if (scfg.eval_every and step % scfg.eval_every == 0) or step == scfg.steps:
            evaluated = task.evaluate(engine, layout)  # held-out metrics, and always after the last step
            if evaluated:
                last.update(evaluated)
                logger.log(step, evaluated, tokens=None)
        preempted = preemption.agreed()
        if preempted or step % scfg.save_every == 0 or step == stop_at:
            save(step)
        if preempted:
            logger.close()
            D.barrier()
            sys.exit(EXIT_PREEMPTED)
    logger.close()
    return step, last


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
