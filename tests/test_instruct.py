"""SFT and DPO stages on the trainer: sequence log-probs at TP2 against full-logit log_softmax, DPO
learns the shipped preferences, SFT/DPO under parallel layouts equal one process, the instruct
recipe chain ends in an HF export that answers a chat prompt."""

import math
import re

import torch
import torch.nn.functional as F

from conftest import read_metrics, run_cli
from distributed import run_ranks
from model import Mixtral, model_config

CHAT, PREFS = "data/instruct/chat.jsonl", "data/instruct/preference.jsonl"
RECIPE = "recipes/instruct_quickstart.yaml"


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


def instruct_args(run_dir, stages, **extra):
    args = {"run_dir": run_dir, "stages": f"[{','.join(stages)}]", "model.preset": "debug",
            "logging.progress": "false", "sft.init": "null", "sft.steps": 4, "sft.seq_len": 128,
            "sft.micro_batch_size": 2, "sft.global_batch_size": 4, "sft.log_every": 1, "sft.eval_every": 0,
            "sft.eval_batches": 2, "dpo.init": "null", "dpo.steps": 3, "dpo.seq_len": 96,
            "dpo.micro_batch_size": 2, "dpo.global_batch_size": 4, "dpo.log_every": 1,
            "dpo.eval_batches": 2, "dpo.lr": 1e-3}
    args.update(extra)
    return [RECIPE] + [f"{k}={v}" for k, v in args.items()]


def curve(run_dir, stage, key="loss"):
    return [m[key] for m in read_metrics(f"{run_dir}/{stage}") if key in m]


def test_dpo_learns_the_shipped_preferences(tmp_path):
    """From a random debug model (the reference), DPO on the 300 shipped pairs: reward accuracy on the
    training pairs > 0.9 and a positive margin; at step 1 policy = reference, so the loss is log 2."""
    run_cli(*instruct_args(tmp_path, ["dpo"], **{"dpo.steps": 24, "dpo.micro_batch_size": 8,
                                                "dpo.global_batch_size": 8, "dpo.eval_batches": 0,
                                                "dpo.warmup_steps": 1, "dpo.lr": 2e-3}))
    metrics = read_metrics(tmp_path / "dpo")
    assert abs(metrics[0]["loss"] - math.log(2)) < 1e-4
    final = [m for m in metrics if "eval/rewards/accuracy" in m][-1]
    assert final["step"] == 24
    assert final["eval/rewards/accuracy"] > 0.9 and final["eval/rewards/margin"] > 0, final
    assert (tmp_path / "dpo/reference_logps.safetensors").is_file()


def test_sft_and_dpo_layouts_equal_one_process(tmp_path):
    """SFT at DP2 (ZeRO-1) and DPO at TP2 with sequence parallelism give the single-process curves."""
    single = tmp_path / "single"
    run_cli(*instruct_args(single, ["sft", "dpo"], **{"parallel.zero_stage": 0}))
    dp2, tp2 = tmp_path / "dp2", tmp_path / "tp2"
    run_cli(*instruct_args(dp2, ["sft"], **{"parallel.zero_stage": 1}), nproc=2)
    run_cli(*instruct_args(tp2, ["dpo"], **{"parallel.tp": 2, "parallel.sp": "true"}), nproc=2)
    for run, stage in ((dp2, "sft"), (tp2, "dpo")):
        got, want = curve(run, stage), curve(single, stage)
        assert len(got) == len(want) > 0
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (stage, got, want)
    sft_eval = [m for m in read_metrics(single / "sft") if "eval/token_accuracy" in m]
    assert sft_eval and 0 <= sft_eval[-1]["eval/token_accuracy"] <= 1


def test_instruct_chain_exports_a_model_that_answers_a_chat_prompt(tmp_path):
    """tokenize -> pretrain -> sft -> dpo -> export of the instruct recipe (shortened, debug preset): each
    stage starts from the previous one by reference, the export loads in transformers and answers a
    mistral-common chat prompt; a rerun skips every finished stage; --stage runs one alone."""
    overrides = {"sft.init": "${pretrain.output}",
                 "dpo.init": "${sft.output}", "pretrain.steps": 3, "pretrain.seq_len": 64,
                 "pretrain.micro_batch_size": 2, "pretrain.global_batch_size": 2, "sft.steps": 30,
                 "sft.lr": 3e-3, "export.sample_prompt": "'What is the capital of France?'"}
    stages = ["tokenize", "pretrain", "sft", "dpo", "export"]
    proc = run_cli(*instruct_args(tmp_path, stages, **overrides), timeout=900)
    assert re.search(r"\[export\] sample \(chat\): '.+'", proc.stdout), proc.stdout[-3000:]
    sft_losses = curve(tmp_path, "sft")
    assert sft_losses[-1] < sft_losses[0] - 1.0, sft_losses  # it learns the answers

    from transformers import MixtralForCausalLM

    from data.chat import encode_messages, instruct_tokenizer

    model = MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    question, answer = "What is the capital of France?", "The capital of France is Paris."
    prompt = encode_messages([("user", question)], instruct_tokenizer())
    full = encode_messages([("user", question), ("assistant", answer)], instruct_tokenizer())
    assert full[:len(prompt)] == prompt and full[-1] == 2  # the answer then </s>
    with torch.no_grad():  # transformers on the export scores the answer as our SFT loss learnt it
        logits = model(torch.tensor([full])).logits[0, len(prompt) - 1:-1]
    answer_nll = F.cross_entropy(logits, torch.tensor(full[len(prompt):])).item()
    assert answer_nll < sft_losses[0] - 1.0, (answer_nll, sft_losses)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert out.shape[1] > len(prompt)  # it answers (a debug model: no quality asked of the words)

    rerun = run_cli(*instruct_args(tmp_path, stages, **overrides))
    assert rerun.stdout.count("already done") == 5
    alone = run_cli(*instruct_args(tmp_path, stages, **overrides), "--stage", "export", "--force")
    assert "[export]" in alone.stdout and "[sft]" not in alone.stdout


def test_dpo_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Stopped after step 2 and restarted: the same curve (data position restored, the reference
    log-probs read back from <output>/reference_logps.safetensors, not recomputed from the policy)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_cli(*instruct_args(full, ["dpo"], **{"dpo.steps": 4}))
    run_cli(*instruct_args(cut, ["dpo"], **{"dpo.steps": 4, "dpo.stop_after": 2}))
    run_cli(*instruct_args(cut, ["dpo"], **{"dpo.steps": 4}))
    a, b = curve(full, "dpo"), curve(cut, "dpo")
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-6, (a, b)
