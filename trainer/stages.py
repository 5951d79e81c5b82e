"""The stages of a recipe and their chain: tokenize -> pretrain -> transition (from a Mixture
of Tokens to sparse, trainer/transition.py) -> sft -> dpo -> export -> evaluate.

Each stage writes into its own output folder and marks it with `DONE` when it has finished; a
re-run skips finished stages (or redoes them with force=True). Stages find their inputs by
reference to each other's outputs in the config (`sft.init: ${pretrain.output}`).
"""

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import distributed as D
from .config import TRAINING_STAGES, model_config_of, pretrain_data, save_config

def stage_output(cfg: DictConfig, stage: str) -> Path:
    return Path(cfg[stage].output if stage != "tokenize" else cfg.tokenize.output + ".idx")


def done_marker(cfg: DictConfig, stage: str) -> Path:
    out = stage_output(cfg, stage)
    return out.parent / (out.name + ".DONE") if stage == "tokenize" else out / "DONE"


def run_recipe(cfg: DictConfig, only: str = None, force: bool = False) -> None:
    D.init_distributed(cfg.parallel.collective_timeout_s)
    stages = [only] if only else list(cfg.stages)
    pending = [stage for stage in stages if force or not done_marker(cfg, stage).exists()]
    preflight(cfg, pending)
    for stage in stages:
        marker = done_marker(cfg, stage)
        if stage not in pending:
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


def preflight(cfg: DictConfig, stages: list[str]) -> None:
    """What can be refused before the first stage runs: every training stage's layout on this world
    (parallel/layout.py), and pretraining data that no earlier stage of this run writes must exist, with
    one tokenizer that fits the model (data/mixture.py). A recipe that cannot train fails before it
    tokenizes."""
    from data.mixture import check_sources, parse_mixture
    from parallel.layout import Layout, LayoutError

    from .engine import model_config_for

    for i, stage in enumerate(stages):
        if stage not in TRAINING_STAGES:
            continue
        scfg, mcfg = cfg[stage], model_config_of(cfg)
        if scfg.init is not None and (Path(scfg.init) / "config.json").is_file():
            mcfg = model_config_for(mcfg, scfg.init)  # an HF folder sets the shape
        try:
            Layout.plan(cfg.parallel, mcfg, scfg, D.world_size(), D.rank())
        except LayoutError as e:
            raise LayoutError(f"{stage} on {D.world_size()} process(es): {e}") from None
        if stage in ("pretrain", "transition"):
            produced = {cfg.tokenize.output} if "tokenize" in stages[:i] else set()
            check_sources(parse_mixture(pretrain_data(scfg), f"{stage}.data"), f"{stage}.data",
                          mcfg.vocab_size, produced)


def run_tokenize(cfg: DictConfig) -> bool:
    from data.encode import worker_count
    from data.indexed import unigram_entropy
    from data.readers import check_inputs
    from data.sharded import open_dataset, tokenize_sharded
    from data.tokenizer import load_tokenizer

    t = cfg.tokenize
    inputs = OmegaConf.to_container(t.inputs, resolve=True)
    if not D.is_main():
        check_inputs(inputs, t.text_field)  # bad input fails on every rank alike, not only on rank 0
        return True
    Path(t.output).parent.mkdir(parents=True, exist_ok=True)
    workers = worker_count(t.num_workers)
    stats = tokenize_sharded(inputs, t.output, load_tokenizer(cfg.tokenizer), t.text_field, workers,
                             t.shard_tokens)
    entropy = unigram_entropy(open_dataset(t.output))
    print(f"[tokenize] {stats['documents']} documents, {stats['tokens']} tokens -> {len(stats['shards'])} "
          f"shard(s) + {t.output}.manifest.json; {stats['tokens'] / stats['seconds']:.0f} tokens/s with "
          f"{workers} worker(s); unigram entropy {entropy:.3f} nats/token (a model that learns anything "
          "beyond token frequencies goes below it)", flush=True)
    return True


def run_training(stage: str, cfg: DictConfig) -> bool:
    from parallel.layout import Layout

    from .checkpoint import latest_checkpoint
    from .engine import build_engine, build_model, model_config_for, torch_dtype
    from .loop import train

    scfg = cfg[stage]
    out = Path(scfg.output)
    mcfg = model_config_for(model_config_of(cfg), scfg.init)
    cfg = cfg.copy()
    cfg.model = OmegaConf.structured(mcfg)  # the shape actually trained (an HF init may set it)
    layout = Layout.build(cfg.parallel, mcfg, scfg, D.world_size(), D.rank())
    task = make_task(stage, scfg, cfg, mcfg, layout)  # its data is opened and checked before the model
    resume = latest_checkpoint(out / "checkpoints")
    # a resumed run materializes from its own checkpoint directly (no random init first)
    init = str(resume) if resume is not None else scfg.init
    model = build_model(mcfg, init, scfg.seed, layout, cfg.parallel, torch_dtype(scfg.dtype))
    engine = build_engine(model, scfg, cfg.parallel, layout)
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
    if stage == "select":
        from .premise_select import SelectTask
        return SelectTask(scfg, cfg, mcfg, layout)
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


def run_premises(cfg: DictConfig) -> bool:
    from .premise_stage import run_premises_stage

    return run_premises_stage(cfg)


def run_rerank(cfg: DictConfig) -> bool:
    from .premise_rerank import run_rerank

    return run_rerank(cfg)


def run_vision_sft(cfg: DictConfig) -> bool:
    from .vision_sft import run_vision_sft

    return run_vision_sft(cfg)


RUNNERS = {
    "tokenize": run_tokenize,
    "pretrain": lambda cfg: run_training("pretrain", cfg),
    "transition": run_transition,
    "sft": lambda cfg: run_training("sft", cfg),
    "dpo": lambda cfg: run_training("dpo", cfg),
    "export": run_export,
    "evaluate": run_evaluate,
    "premises": run_premises,
    "select": lambda cfg: run_training("select", cfg),
    "rerank": run_rerank,
    "vision_sft": run_vision_sft,
}
