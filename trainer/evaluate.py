"""Evaluation of a checkpoint: perplexity by corpus and position, the Mixtral paper's routing analysis,
passkey retrieval, and lm-evaluation-harness tasks; eval.json and figures in one folder.

    python -m trainer.evaluate CKPT_OR_HF_FOLDER [--out DIR] [--corpora NAME=PATH]... [key=value ...]
    (as a recipe stage: `evaluate`, configured by trainer.config.EvaluateStage)

CKPT_OR_HF_FOLDER is one of our run folders (its latest checkpoint), a checkpoint saved at any layout,
or an HF Mixtral folder: it is loaded the way training stages load `init`, whole, on one device
(trainer.engine.build_model with a one-rank layout). The stage runs on rank 0 only.

eval.json:
    checkpoint, model (the ModelConfig), seq_len, seconds
    corpora.<name>: loss, perplexity, tokens, by_position [{start, end, loss, tokens}],
                    routing.<layer>: share[E], first_share[E], repeat_first, repeat_any,
                                     repeat_first_given_load, pairs   (trainer/evaluate_routing.py)
    routing_chance: share (1/E), repeat_first (1/E), repeat_any (1 - C(E-k, k) / C(E, k))
    passkey: lengths, depths, trials, accuracy[depth][length]   (trainer/evaluate_passkey.py)
    lm_eval.<task>: lm-eval's metrics                            (trainer/evaluate_lm_eval.py)
Figures: trainer/evaluate_plots.py. wandb (logging.*): the scalars as evaluate/<name>, and the figures.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .evaluate_routing import chance_repeat_any, chance_repeat_first

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CORPORA = [f"{name}={ROOT}/data/eval/{name}.jsonl" for name in ("plays", "code", "math")]


def load_for_eval(path, dtype: torch.dtype):
    """(model in eval mode, ModelConfig, tokenizer) of a run folder, a checkpoint or an HF Mixtral folder."""
    from data.tokenizer import load_tokenizer
    from model.config import ModelConfig
    from parallel.layout import Layout

    from .config import ParallelConfig
    from .engine import build_model, model_config_for, starting_point
    from .export import read_model

    kind, where = starting_point(str(path))
    if kind == "hf":
        mcfg = model_config_for(ModelConfig(), where)
        tokenizer = load_tokenizer(str(where) if (where / "tokenizer.json").is_file() else "mistral-v1")
    else:
        mcfg, _, run_cfg = read_model(where)
        tokenizer = load_tokenizer(run_cfg.tokenizer)
    parallel = OmegaConf.structured(ParallelConfig)
    layout = Layout.plan(parallel, mcfg, None, world_size=1)
    model = build_model(mcfg, str(where), 0, layout, parallel, dtype)
    return model.eval(), mcfg, tokenizer


@torch.no_grad()
def logits_at(model, tokens: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Logits (B, n, V) of positions `at` (B, n) only: the LM head never runs on the whole prompt."""
    device = model.output.weight.device
    hidden, _ = model.hidden(tokens.to(device))
    picked = hidden.gather(1, at.to(device)[..., None].expand(-1, -1, hidden.shape[-1]))
    return model.output(picked).float()


def passkey_lengths(ecfg, max_seq_len: int) -> list[int]:
    lengths = list(ecfg.passkey_lengths) or sorted({max(64, max_seq_len // d) for d in (8, 4, 2, 1)})
    too_long = [n for n in lengths if n > max_seq_len]
    if too_long:
        raise ValueError(f"evaluate.passkey_lengths {too_long} exceed the model's max_seq_len ({max_seq_len})")
    return lengths


def lm_eval_folder(ecfg) -> Path:
    folder = Path(ecfg.lm_eval_model or ecfg.checkpoint)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"evaluate.lm_eval_tasks: lm-eval runs on an HF folder; {folder} is not one "
                                "(set evaluate.lm_eval_model, e.g. ${export.output})")
    return folder


def evaluate(ecfg: DictConfig) -> dict:
    """Every evaluation `ecfg` (an EvaluateStage) asks for; writes eval.json and the figures."""
    from .evaluate_passkey import passkey_grid
    from .evaluate_plots import plot_eval
    from .evaluate_text import corpus_documents, evaluate_corpus

    t0 = time.perf_counter()
    model, mcfg, tokenizer = load_for_eval(ecfg.checkpoint, torch.bfloat16 if ecfg.dtype == "bf16" else torch.float32)
    device = model.output.weight.device
    seq_len = ecfg.seq_len or mcfg.max_seq_len
    results = {"checkpoint": str(ecfg.checkpoint), "model": asdict(mcfg), "seq_len": seq_len,
               "routing_chance": {"share": 1 / mcfg.num_experts,
                                  "repeat_first": chance_repeat_first(mcfg.num_experts),
                                  "repeat_any": chance_repeat_any(mcfg.num_experts, mcfg.top_k)},
               "corpora": {}}
    for name, path in ecfg.corpora.items():
        documents = corpus_documents(path, tokenizer, ecfg.text_field)
        results["corpora"][name] = evaluate_corpus(model, documents, seq_len, ecfg.max_tokens, ecfg.batch_size,
                                                   device)
    if ecfg.passkey_trials:
        results["passkey"] = passkey_grid(partial(logits_at, model), tokenizer,
                                          passkey_lengths(ecfg, mcfg.max_seq_len), list(ecfg.passkey_depths),
                                          ecfg.passkey_trials, ecfg.seed, ecfg.batch_size)
    if ecfg.lm_eval_tasks:
        from .evaluate_lm_eval import run_lm_eval
        del model  # lm-eval loads the folder itself, with transformers
        results["lm_eval"] = run_lm_eval(lm_eval_folder(ecfg), list(ecfg.lm_eval_tasks), ecfg.lm_eval_include,
                                         ecfg.lm_eval_limit, ecfg.batch_size, str(device))
    results["seconds"] = time.perf_counter() - t0
    out = Path(ecfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_eval(results, out)
    return results


def scalars(results: dict) -> dict:
    """The headline numbers: loss per corpus, repetition rates per corpus and layer, passkey accuracy."""
    out = {}
    for name, corpus in results["corpora"].items():
        out[f"loss/{name}"] = corpus["loss"]
        for layer, r in corpus["routing"].items():
            out[f"repeat_first/{name}/layer{layer}"] = r["repeat_first"]
            out[f"repeat_any/{name}/layer{layer}"] = r["repeat_any"]
    if "passkey" in results:
        accuracy = [a for row in results["passkey"]["accuracy"] for a in row]
        out["passkey/accuracy"] = sum(accuracy) / len(accuracy)
    for task, metrics in results.get("lm_eval", {}).items():
        out |= {f"lm_eval/{task}/{metric}": value for metric, value in metrics.items()}
    return out


def summary(results: dict) -> str:
    lines = [f"{name}: loss {c['loss']:.3f} (perplexity {c['perplexity']:.1f}, {c['tokens']} tokens)"
             for name, c in results["corpora"].items()]
    chance = results["routing_chance"]
    for name, c in results["corpora"].items():
        if c["routing"]:
            first = [r["repeat_first"] for r in c["routing"].values()]
            anyk = [r["repeat_any"] for r in c["routing"].values()]
            lines.append(f"{name}: consecutive tokens keep their first expert {min(first):.1%}-{max(first):.1%} "
                         f"of the time over the layers (chance {chance['repeat_first']:.1%}), share one "
                         f"{min(anyk):.1%}-{max(anyk):.1%} (chance {chance['repeat_any']:.1%})")
    if "passkey" in results:
        lines.append(f"passkey accuracy {scalars(results)['passkey/accuracy']:.1%} over lengths "
                     f"{results['passkey']['lengths']}")
    for task, metrics in results.get("lm_eval", {}).items():
        lines.append(f"lm-eval {task}: {metrics}")
    return "\n".join(lines)


def evaluate_stage(cfg: DictConfig) -> dict:
    """The recipe stage: evaluate, print the headline numbers, log them and the figures to wandb."""
    from .metrics import open_wandb

    results = evaluate(cfg.evaluate)
    print(f"[evaluate] {cfg.evaluate.checkpoint} -> {cfg.evaluate.output}/eval.json in {results['seconds']:.1f} s\n"
          + "\n".join(f"[evaluate] {line}" for line in summary(results).splitlines()), flush=True)
    run = open_wandb(cfg, "evaluate", Path(cfg.evaluate.output))
    if run is not None:
        import wandb
        images = {f"evaluate/{p.stem}": wandb.Image(str(p)) for p in sorted(Path(cfg.evaluate.output).glob("*.png"))}
        run.log({f"evaluate/{k}": v for k, v in scalars(results).items()} | images)
        run.finish()
    return results


def main(argv=None) -> int:
    from .config import ConfigError, RecipeConfig, validate_evaluate

    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run folder, checkpoint folder or HF Mixtral folder")
    p.add_argument("--out", help="output folder (default: <checkpoint>/eval)")
    p.add_argument("--corpora", action="append", metavar="NAME=PATH",
                   help="a held-out corpus: .jsonl / .txt file or indexed prefix; repeat the option for more "
                        "(default: data/eval's plays, code and math)")
    p.add_argument("overrides", nargs="*", help="more evaluate settings, e.g. passkey_trials=0 seq_len=512")
    a = p.parse_intermixed_args(argv)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RecipeConfig), {"run_dir": a.out or f"{a.checkpoint}/eval"})
        ecfg = OmegaConf.merge(cfg.evaluate, OmegaConf.from_dotlist(a.overrides),
                               {"checkpoint": a.checkpoint, "output": a.out or f"{a.checkpoint}/eval"})
        corpora = a.corpora or SHIPPED_CORPORA
        bad = [c for c in corpora if "=" not in c]
        if bad:
            raise ConfigError(f"--corpora {bad[0]!r} is not of the form name=path")
        ecfg.corpora = dict(c.split("=", 1) for c in corpora)
        validate_evaluate(ecfg)
        cfg.evaluate = ecfg
        evaluate_stage(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
