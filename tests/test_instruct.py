"""SFT and DPO stages on the trainer: sequence log-probs at TP2 against full-logit log_softmax, DPO
learns the shipped preferences, SFT/DPO under parallel layouts equal one process (losses, grad norms,
held-out metrics, greedy answers generated on sharded weights), dpo.reference=copy equals precompute,
and the instruct recipe chain ends in an HF export that answers held-out questions right."""

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from conftest import read_metrics, run_cli
from distributed import run_ranks
from model import Mixtral, model_config

CHAT, PREFS, EVAL = "data/instruct/chat.jsonl", "data/instruct/preference.jsonl", "data/instruct/eval.jsonl"
RECIPE = "recipes/instruct_quickstart.yaml"
# The shortened chain's SFT (debug preset, ~2 CPU minutes): on the first CHAIN_PROMPTS held-out questions
# (capitals, arithmetic) exact match was 0.10 after 150 steps and 0.825 after 300 from a random start, and
# 0.75 after SFT and after DPO in this chain (measured; the jump is the model learning to carry the
# question's subject into its answer). 0.5 leaves room for numerical differences between machines; a
# model that recites memorised answers instead scores about 0.1.
CHAIN_SFT = {"sft.steps": 300, "sft.lr": 5e-3, "sft.seq_len": 128, "sft.micro_batch_size": 8,
             "sft.global_batch_size": 8, "sft.warmup_steps": 10}
CHAIN_PROMPTS, CHAIN_EXACT_MATCH = 40, 0.5


def pair_batch():
    from data.preference import collate_pairs, load_pairs

    pairs, _ = load_pairs(PREFS)
    return collate_pairs(pairs, [0, 1, 2])


def full_logit_sequence_logps(model, batch):
    """The plain way: full logits, torch.log_softmax, gather the labels, sum over answer tokens."""
    logits, _ = model(batch["tokens"], batch["position_ids"])
    logps = F.log_softmax(logits.float(), dim=-1)
    mask = batch["labels"] != -100
    picked = logps.gather(-1, batch["labels"].clamp(min=0)[..., None]).squeeze(-1)
    return (picked * mask).sum(-1)


def tp_sequence_logps(rank, world_size, sp):
    from parallel.layout import Layout
    from parallel.parallelize import parallelize
    from trainer.config import ParallelConfig
    from trainer.dpo import pad_to_multiple, sequence_logps

    cfg = model_config("debug")
    layout = Layout.build(ParallelConfig(tp=2, sp=sp), cfg, None, world_size, rank)
    model = Mixtral(cfg)
    model.init_weights(3)
    parallelize(model, layout, ParallelConfig(tp=2, sp=sp))
    batch = pad_to_multiple(pair_batch(), 2) if sp else pair_batch()
    logps, _ = sequence_logps(model, batch, layout)
    assert model.output.weight.shape[0] == cfg.vocab_size // 2  # the logits stay vocab-sharded
    return logps.tolist()


def test_sequence_log_probs_at_tp2_equal_full_log_softmax():
    model = Mixtral(model_config("debug"))
    model.init_weights(3)
    expected = full_logit_sequence_logps(model, pair_batch())
    assert expected.shape == (6,) and (expected < 0).all()
    for sp in (False, True):
        for got in map(torch.tensor, run_ranks(2, tp_sequence_logps, sp)):
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4), (sp, got, expected)


def test_greedy_answers_equal_transformers_generate_on_the_export(tmp_path):
    """Our generation (left-padded rows of different prompt lengths, no KV cache, the LM head on the last
    position) gives the tokens transformers' generate (KV cache, its attention mask) gives on the export
    of the same random model; exact match is scored after case, punctuation and spacing."""
    import types

    from data.chat import instruct_tokenizer
    from model.hf import export_hf
    from trainer.evaluate_generation import evaluate
    from trainer.generation import AnswerEval, exact_match, load_prompts

    cfg = model_config("debug")
    model = Mixtral(cfg)
    model.init_weights(5)
    export_hf(model.state_dict(), cfg, tmp_path / "hf", dtype=torch.float32)
    tok = instruct_tokenizer()
    prompts = load_prompts(EVAL, tok, 12)
    assert len({len(p.tokens) for p in prompts}) > 3  # rows of different lengths share a batch
    layout = types.SimpleNamespace(tp=1, sp=False, dp=1, dp_rank=0, tp_rank=0, tp_group=None, dp_group=None)
    score = AnswerEval(prompts, tok, 10, 5, tmp_path / "run")(model.eval(), layout, step=0)
    _, results = evaluate(tmp_path / "hf", EVAL, limit=12, max_new_tokens=10)
    ours = [json.loads(line) for line in (tmp_path / "run/answers.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in ours] == [answer for _, _, answer in results]
    assert all(len(r["answer"]) > 10 for r in ours) and score == {"eval/exact_match": 0.0}
    assert exact_match(" the Capital of  FRANCE is paris ", "The capital of France is Paris.")
    assert not exact_match("The capital of France is Lyon.", "The capital of France is Paris.")


def instruct_args(run_dir, stages, **extra):
    args = {"run_dir": run_dir, "stages": f"[{','.join(stages)}]", "model.preset": "debug",
            "logging.progress": "false", "sft.init": "null", "sft.steps": 4, "sft.seq_len": 128,
            "sft.micro_batch_size": 2, "sft.global_batch_size": 4, "sft.log_every": 1, "sft.eval_every": 0,
            "sft.eval_batches": 2, "dpo.init": "null", "dpo.steps": 3, "dpo.seq_len": 96,
            "dpo.micro_batch_size": 2, "dpo.global_batch_size": 4, "dpo.log_every": 1,
            "dpo.eval_batches": 2, "dpo.lr": 1e-3, "dpo.rpo_alpha": 0.0, "sft.eval_prompts": "null",
            "dpo.eval_prompts": "null"}
    args.update(extra)
    return [RECIPE] + [f"{k}={v}" for k, v in args.items()]


def curve(run_dir, stage, key="loss"):
    return [m[key] for m in read_metrics(f"{run_dir}/{stage}") if key in m]


def evaluated(run_folder) -> dict:
    """The eval/ metrics of the last evaluation."""
    last = [m for m in read_metrics(run_folder) if "eval/exact_match" in m][-1]
    return {k: v for k, v in last.items() if k.startswith("eval/")}


def answers(run_dir, stage) -> dict:
    """{prompt: answer} of the last evaluation in <stage>/answers.jsonl."""
    lines = (Path(run_dir) / stage / "answers.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    last = max(r["step"] for r in records)
    return {r["prompt"]: r["answer"] for r in records if r["step"] == last}


def test_dpo_learns_the_shipped_preferences(tmp_path):
    """From a random debug model (the reference), DPO on the 300 shipped pairs: reward accuracy on the
    training pairs > 0.85 and a positive margin; at step 1 policy = reference, so the loss is log 2. The
    rude and off-topic rejections (75 % of the pairs) are learnt first; the wrong facts differ from the
    right ones in a token or two (measured 0.877 overall): > 0.85 needs more than 40 % of them."""
    run_cli(*instruct_args(tmp_path, ["dpo"], **{"dpo.steps": 24, "dpo.micro_batch_size": 8,
                                                "dpo.global_batch_size": 8, "dpo.eval_batches": 0,
                                                "dpo.warmup_steps": 1, "dpo.lr": 2e-3}))
    metrics = read_metrics(tmp_path / "dpo")
    assert abs(metrics[0]["loss"] - math.log(2)) < 1e-4
    final = [m for m in metrics if "eval/rewards/accuracy" in m][-1]
    assert final["step"] == 24
    assert final["eval/rewards/accuracy"] > 0.85 and final["eval/rewards/margin"] > 0, final
    assert (tmp_path / "dpo/reference_logps.safetensors").is_file()


def test_sft_and_dpo_layouts_equal_one_process(tmp_path):
    """SFT at DP2 (ZeRO-1) and DPO at TP2 with sequence parallelism give the single-process loss and
    grad-norm curves, the same held-out metrics, and the same greedy answers (generated on the sharded
    weights: prompts dealt over dp, arg-max over the vocabulary shards, sequence split over tp)."""
    extra = {"dpo.rpo_alpha": 1.0}  # its NLL gradients reach the clipping norm: grad_norm must agree
    extra |= {f"{s}.{k}": v for s in ("sft", "dpo") for k, v in
              (("eval_prompts", EVAL), ("eval_prompts_limit", 5), ("eval_max_new_tokens", 6),
               ("eval_batches", 0))}  # eval_batches caps micro-batches per rank: the whole split
    single = tmp_path / "single"
    run_cli(*instruct_args(single, ["sft", "dpo"], **{"parallel.zero_stage": 0}, **extra))
    dp2, tp2 = tmp_path / "dp2", tmp_path / "tp2"
    run_cli(*instruct_args(dp2, ["sft"], **{"parallel.zero_stage": 1}, **extra), nproc=2)
    run_cli(*instruct_args(tp2, ["dpo"], **{"parallel.tp": 2, "parallel.sp": "true"}, **extra), nproc=2)
    for run, stage in ((dp2, "sft"), (tp2, "dpo")):
        got, want = curve(run, stage), curve(single, stage)
        assert len(got) == len(want) > 0
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (stage, got, want)
        got, want = curve(run, stage, "grad_norm"), curve(single, stage, "grad_norm")
        assert len(got) == len(want) > 0
        assert max(abs(a / b - 1) for a, b in zip(got, want)) < 1e-4, (stage, got, want)
        final, expect = (evaluated(r / stage) for r in (run, single))
        assert final.keys() == expect.keys() and "eval/exact_match" in final, final
        assert all(abs(final[k] - expect[k]) < 1e-4 for k in final), (stage, final, expect)
    # every answer is a real greedy continuation, identical under every layout
    for run, stage, written in ((dp2, "sft", 3), (tp2, "dpo", 5)):  # dp rank 0 writes its share
        got, want = answers(run, stage), answers(single, stage)
        assert len(want) == 5 and any(want.values()) and len(got) == written
        assert all(want[prompt] == answer for prompt, answer in got.items()), (stage, got, want)


def test_instruct_chain_exports_a_model_that_answers_held_out_questions(tmp_path):
    """tokenize -> pretrain -> sft -> dpo -> export of the instruct recipe, shortened (debug preset): the
    greedy answers to held-out questions (new phrasings of taught facts) are right at least CHAIN_EXACT_MATCH
    of the time after SFT and after DPO (RPO keeps them); transformers' own generate (KV cache) on the
    export gives exactly the answers generated during training; a rerun skips every finished stage;
    --stage runs one alone."""
    overrides = {"sft.init": "${pretrain.output}", "dpo.init": "${sft.output}", "pretrain.steps": 3,
                 "pretrain.seq_len": 64, "pretrain.micro_batch_size": 2, "pretrain.global_batch_size": 2,
                 **CHAIN_SFT, "sft.eval_prompts": EVAL, "sft.eval_prompts_limit": CHAIN_PROMPTS,
                 "dpo.eval_prompts": EVAL, "dpo.eval_prompts_limit": CHAIN_PROMPTS, "dpo.steps": 4,
                 "dpo.lr": 1e-4, "dpo.rpo_alpha": 1.0,
                 "export.sample_prompt": "'What is the capital of France?'"}
    stages = ["tokenize", "pretrain", "sft", "dpo", "export"]
    proc = run_cli(*instruct_args(tmp_path, stages, **overrides), timeout=900)
    assert re.search(r"\[export\] sample \(chat\): '.+'", proc.stdout), proc.stdout[-3000:]
    sft, dpo = (evaluated(tmp_path / stage)["eval/exact_match"] for stage in ("sft", "dpo"))
    assert sft >= CHAIN_EXACT_MATCH and dpo >= CHAIN_EXACT_MATCH, (sft, dpo)

    from trainer.evaluate_generation import evaluate

    score, results = evaluate(tmp_path / "hf", EVAL, limit=CHAIN_PROMPTS)
    assert len(results) == CHAIN_PROMPTS and score == dpo
    assert {prompt: answer for prompt, _, answer in results} == answers(tmp_path, "dpo")

    rerun = run_cli(*instruct_args(tmp_path, stages, **overrides))
    assert rerun.stdout.count("already done") == 5
    alone = run_cli(*instruct_args(tmp_path, stages, **overrides), "--stage", "export", "--force")
    assert "[export]" in alone.stdout and "[sft]" not in alone.stdout


def test_dpo_resume_reproduces_the_uninterrupted_run_and_copy_equals_precompute(tmp_path):
    """Stopped after step 2 and restarted: the same curve (data position restored, the reference
    log-probs read back from <output>/reference_logps.safetensors, not recomputed from the policy). And
    dpo.reference=copy (a frozen model run next to the policy) trains exactly like precompute, with RPO on."""
    full, cut, copy = tmp_path / "full", tmp_path / "cut", tmp_path / "copy"
    rpo = {"dpo.steps": 4, "dpo.rpo_alpha": 0.5}
    run_cli(*instruct_args(full, ["dpo"], **rpo))
    run_cli(*instruct_args(cut, ["dpo"], **rpo, **{"dpo.stop_after": 2}))
    run_cli(*instruct_args(cut, ["dpo"], **rpo))
    run_cli(*instruct_args(copy, ["dpo"], **rpo, **{"dpo.reference": "copy"}))
    a, b = curve(full, "dpo"), curve(cut, "dpo")
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-6, (a, b)
    assert not (copy / "dpo/reference_logps.safetensors").exists()
    for key in ("loss", "grad_norm", "rewards/chosen", "eval/loss"):
        a, c = curve(full, "dpo", key), curve(copy, "dpo", key)
        assert len(a) == len(c) > 0 and max(abs(x - y) for x, y in zip(a, c)) < 1e-6, (key, a, c)
