"""What a run reports: a JSONL file in the run folder, wandb (offline unless configured), a progress bar.

Every line of `<output>/metrics.jsonl` is one logged step: {"stage", "step", "loss", "lr",
"grad_norm", "step_time", "tokens_per_s", "mfu", "memory_gb", ...}. Only rank 0 writes.
"""

import json
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from model.flops import flops_per_token

from . import distributed as D


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def device_peak_flops() -> float:
    """Datasheet dense bf16 peak per device where known (H100/H200 SXM: 989 TFLOP/s), else 0."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if "H100" in name or "H200" in name:
            return 989e12
    return 0.0


def open_wandb(cfg: DictConfig, stage: str, out: Path):
    """The stage's wandb run (run name `<run_dir name>-<stage>`, files in `out`), or None when disabled.
    The WANDB_MODE environment variable wins over logging.wandb (CI: disabled); online needs a key."""
    mode = os.environ.get("WANDB_MODE", cfg.logging.wandb)
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        mode = "offline"
    if mode == "disabled":
        return None
    import wandb
    return wandb.init(project=cfg.logging.project, name=f"{Path(cfg.run_dir).name}-{stage}", dir=str(out),
                      mode=mode, resume="allow", config=OmegaConf.to_container(cfg, resolve=True))


class RunLogger:
    def __init__(self, out: Path, stage: str, cfg: DictConfig, scfg: DictConfig, model_cfg, layout,
                 resumed_from=None):
        self.stage, self.every, self.total = stage, scfg.log_every, scfg.steps
        self.main = D.is_main()
        self.flops = flops_per_token(model_cfg, scfg.seq_len)["total"]
        self.peak = device_peak_flops() * layout.world_size
        self.file = self.bar = self.wandb = None
        if not self.main:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "metrics.jsonl", "a")
        if resumed_from is not None:
            print(f"[{stage}] resumed from step {resumed_from} "
                  f"(SLURM_RESTART_COUNT={os.environ.get('SLURM_RESTART_COUNT', 0)})", flush=True)
        self.wandb = open_wandb(cfg, stage, out)
        if cfg.logging.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=resumed_from or 0, desc=stage, dynamic_ncols=True)
        self.t_last = time.perf_counter()

    def log(self, step: int, metrics: dict, tokens=None):
        if not self.main:
            return
        record = {"stage": self.stage, "step": step, **metrics}
        if tokens is not None and metrics.get("step_time"):
            record["tokens_per_s"] = tokens / metrics["step_time"]
            record["tflops"] = record["tokens_per_s"] * self.flops / 1e12
            if self.peak:
                record["mfu"] = record["tokens_per_s"] * self.flops / self.peak
        record["memory_gb"] = peak_memory_gb()
        if self.bar is not None and tokens is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                 tok_s=f"{record.get('tokens_per_s', 0):.0f}")
        if step % self.every and step != self.total and tokens is not None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({f"{self.stage}/{k}": v for k, v in record.items()
                            if isinstance(v, (int, float)) and k != "step"}, step=step)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
