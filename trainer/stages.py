"""The stages of a recipe and their chain: tokenize -> pretrain -> transition (from a Mixture
of Tokens to sparse, trainer/transition.py) -> sft -> dpo -> export -> evaluate.

Each stage writes into its own output folder and marks it with `DONE` when it has finished; a
re-run skips finished stages (or redoes them with force=True). Stages find their inputs by
reference to each other's outputs in the config (`sft.init: ${pretrain.output}`).
"""

import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import distributed as D
from .config import model_config_of, save_config


def stage_output(cfg: DictConfig, stage: str) -> Path:
    return Path(cfg[stage].output if stage != "tokenize" else cfg.tokenize.output + ".idx")


def done_marker(cfg: DictConfig, stage: str) -> Path:
    out = stage_output(cfg, stage)
    return out.parent / (out.name + ".DONE") if stage == "tokenize" else out / "DONE"


def run_recipe(cfg: DictConfig, only: str = None, force: bool = False) -> None:
    D.init_distributed()
    for stage in [only] if only else list(cfg.stages):
        marker = done_marker(cfg, stage)
        if marker.exists() and not force:
            if D.is_main():
                print(f"[{stage}] already done ({marker}); skipped (use --force to redo)", flush=True)
            continue
        t0 = time.perf_counter()
        finished = RUNNERS[stage](cfg)
        D.barrier()
        if finished and D.is_main():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"stage": stage, "seconds": time.perf_counter() - t0}))
            print(f"[{stage}] done in {time.perf_counter() - t0:.1f} s", flush=True)


def run_tokenize(cfg: DictConfig) -> bool:
    from data.indexed import IndexedDataset, tokenize_files, unigram_entropy
    from data.readers import check_inputs
    from data.tokenizer import load_tokenizer

    check_inputs(list(cfg.tokenize.inputs), cfg.tokenize.text_field)
    if D.is_main():
        Path(cfg.tokenize.output).parent.mkdir(parents=True, exist_ok=True)
        stats = tokenize_files(list(cfg.tokenize.inputs), cfg.tokenize.output,
                               load_tokenizer(cfg.tokenizer), cfg.tokenize.text_field)
        entropy = unigram_entropy(IndexedDataset(cfg.tokenize.output))
        print(f"[tokenize] {stats['documents']} documents, {stats['tokens']} tokens -> "
              f"{cfg.tokenize.output}.bin/.idx; unigram entropy {entropy:.3f} nats/token "
              "(a model that learns anything beyond token frequencies goes below it)", flush=True)
    return True


def run_training(stage: str, cfg: DictConfig) -> bool:
    from parallel.layout import Layout

    from .checkpoint import latest_checkpoint
    from .engine import build_engine, build_model, model_config_for
    from .loop import train

    scfg = cfg[stage]
    out = Path(scfg.output)
    mcfg = model_config_for(model_config_of(cfg), scfg.init)
    cfg = cfg.copy()
    cfg.model = OmegaConf.structured(mcfg)  # the shape actually trained (an HF init may set it)
    layout = Layout.build(cfg.parallel, mcfg, scfg, D.world_size(), D.rank())
    resuming = latest_checkpoint(out / "checkpoints") is not None
    # a resumed run materializes from its own checkpoint directly (no random init first)
    init = str(latest_checkpoint(out / "checkpoints")) if resuming else scfg.init
    model = build_model(mcfg, init, scfg.seed, layout, cfg.parallel,
                        torch.bfloat16 if scfg.dtype == "bf16" else torch.float32)
    engine = build_engine(model, scfg, cfg.parallel, layout)
    task = make_task(stage, scfg, cfg, mcfg, layout)
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    step, _ = train(stage, scfg, cfg, engine, task, layout, mcfg)
    return step == scfg.steps


def make_task(stage, scfg, cfg, mcfg, layout):
    from .tasks import PretrainTask

    if stage == "pretrain":
        return PretrainTask(scfg, mcfg, layout)
    if stage == "sft":
        from .sft import SFTTask
        return SFTTask(scfg, cfg, mcfg, layout)
    from .dpo import DPOTask
    return DPOTask(scfg, cfg, mcfg, layout)


def run_transition(cfg: DictConfig) -> bool:
    from .transition import transition_tuning

    return transition_tuning(cfg)


def run_export(cfg: DictConfig) -> bool:
    from .export import export_checkpoint

    if D.is_main():
        export_checkpoint(cfg.export.checkpoint, cfg.export.output, cfg.tokenizer, cfg.export.dtype,
                          cfg.export.max_shard_size, cfg.export.sample_prompt)
    return True


def run_evaluate(cfg: DictConfig) -> bool:
    from .evaluate import evaluate_stage

    if D.is_main():
        evaluate_stage(cfg)
    return True


RUNNERS = {
    "tokenize": run_tokenize,
    "pretrain": lambda cfg: run_training("pretrain", cfg),
    "transition": run_transition,
    "sft": lambda cfg: run_training("sft", cfg),
    "dpo": lambda cfg: run_training("dpo", cfg),
    "export": run_export,
    "evaluate": run_evaluate,
}
