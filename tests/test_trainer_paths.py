"""Documented trainer paths beyond the layouts: activation checkpointing modes and the pretraining
held-out evaluation, each through the trainer and against an independent reference."""

import math

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import pretrain_args, read_metrics, run_cli
from distributed import run_ranks

RECIPE = "recipes/quickstart.yaml"


class CountOps(TorchDispatchMode):
    """Counts the aten ops that run (by name) while active."""

    def __init__(self):
        super().__init__()
        self.ops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_checkpointing_modes_recompute_what_they_say():
    """Same gradients in every mode; in backward, full re-runs the blocks' matmuls and attention,
    selective re-runs none of them but does recompute the element-wise ops (softmax, silu). The
    experts' SwiGLU (model.moe._SwiGLU) keeps only its input and evaluates silu in its backward in
    every mode, so selective shows as more silu calls than no checkpointing."""
    from model import Mixtral
    from model.config import PRESETS, ModelConfig
    from parallel.parallelize import apply_activation_checkpointing

    cfg = ModelConfig(**PRESETS["debug"])
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    runs = {}
    for mode in ("none", "full", "selective"):
        model = Mixtral(cfg)
        model.init_weights(0)
        apply_activation_checkpointing(model, mode)
        logits, _ = model(tokens)
        with CountOps() as counted:
            logits.logsumexp(-1).mean().backward()
        runs[mode] = ([p.grad for p in model.parameters()], counted.ops)
    for mode in ("full", "selective"):
        for got, want in zip(runs[mode][0], runs["none"][0]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    backward = runs["none"][1]
    full, selective = runs["full"][1], runs["selective"][1]
    for op in ("mm", "grouped_mm"):  # grouped_mm: model.moe's custom op
        assert full[op] > backward[op], (op, full, backward)
        assert selective[op] == backward[op], (op, selective, backward)
    assert full.get("_scaled_dot_product_flash_attention_for_cpu", 0) == cfg.num_layers
    assert "_scaled_dot_product_flash_attention_for_cpu" not in selective
    assert "_softmax" not in backward and selective.get("_softmax", 0) > 0, selective
    assert backward.get("silu", 0) == cfg.num_layers, backward
    assert selective.get("silu", 0) > backward["silu"], (selective, backward)


def test_checkpointing_modes_train_alike_through_the_trainer(corpus, tmp_path):
    curves = {}
    for mode in ("none", "full", "selective"):
        run_cli(*pretrain_args(corpus, tmp_path / mode, steps=4, **{"parallel.activation_checkpointing": mode,
                                                                    "pretrain.grad_clip": 0.5}))
        curves[mode] = [(m["loss"], m["grad_norm"]) for m in read_metrics(tmp_path / mode / "pretrain")
                        if "loss" in m]
    assert len(curves["none"]) == 4
    for mode in ("full", "selective"):
        for (loss, norm), (ref_loss, ref_norm) in zip(curves[mode], curves["none"]):
            assert abs(loss - ref_loss) <= 1e-6 * ref_loss and abs(norm - ref_norm) <= 1e-6 * ref_norm, \
                (mode, curves[mode], curves["none"])


def test_pretrain_heldout_eval_equals_transformers(corpus, tmp_path):
    """valid_fraction holds out whole documents; at EP2 (two data-parallel ranks, the last micro-batch
    padded with fillers) eval/loss over the whole held-out split equals transformers' loss of the
    exported model on the held-out document's rows, and those rows are never trained on."""
    from transformers import MixtralForCausalLM

    from data.indexed import IndexedDataset
    from data.stream import PackedStream, split_documents

    run_cli(*pretrain_args(corpus, tmp_path, steps=4, **{
        "stages": "[pretrain,export]", "pretrain.valid_fraction": 0.5, "pretrain.eval_every": 2,
        "pretrain.eval_batches": 0, "parallel.ep": 2, "export.dtype": "fp32"}), nproc=2)
    evals = [m for m in read_metrics(tmp_path / "pretrain") if "eval/loss" in m]
    assert [m["step"] for m in evals] == [2, 4]

    dataset = IndexedDataset(corpus)
    train_docs, valid_docs = split_documents(len(dataset), 0.5, seed=1234)
    assert len(train_docs) == len(valid_docs) == 1
    doc = np.asarray(dataset[int(valid_docs[0])])
    rows = (len(doc) - 1) // 64  # one held-out document: row k is doc[64k : 64k + 65] in some order
    tokens = torch.from_numpy(doc[: rows * 64 + 1].astype(np.int64))
    inputs, labels = tokens[:-1].view(rows, 64), tokens[1:].view(rows, 64)
    model = MixtralForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    assert math.isclose(evals[-1]["eval/loss"], want, rel_tol=1e-5), (evals[-1], want)

    train = PackedStream(dataset, 64, 2, 1234, documents=train_docs)
    train_doc = np.asarray(dataset[int(train_docs[0])]).astype(np.int64).tobytes()
    for g in range(0, train.rows_per_epoch, 7):
        row = train.row(g)[0].tobytes()
        assert row in train_doc and row not in doc.astype(np.int64).tobytes()


def test_every_stage_reports_throughput(corpus, tmp_path):
    """pretrain, SFT and DPO log the same throughput fields at log_every; tokens_per_s counts every
    position run in the step (all ranks, padding included), so x step_time it is the batch's size."""
    seq_len, batch = 64, 4
    common = {"micro_batch_size": 2, "global_batch_size": batch, "seq_len": seq_len, "steps": 4,
              "log_every": 2, "save_every": 100, "warmup_steps": 1}
    overrides = {f"{stage}.{k}": v for stage in ("pretrain", "sft", "dpo") for k, v in common.items()}
    run_cli(RECIPE, "stages=[pretrain,sft,dpo]", f"run_dir={tmp_path}", "model.preset=debug",
            f"pretrain.data={corpus}", "sft.data=data/instruct/chat.jsonl", "sft.init=null",
            "dpo.data=data/instruct/preference.jsonl", "dpo.init=null", "logging.progress=false",
            *[f"{k}={v}" for k, v in overrides.items()], nproc=2)
    for stage in ("pretrain", "sft", "dpo"):
        steps = [m for m in read_metrics(tmp_path / stage) if "loss" in m]
        assert [m["step"] for m in steps] == [2, 4], (stage, steps)
        for m in steps:
            assert m["tflops"] > 0 and m["memory_gb"] > 0, (stage, m)
            processed = m["tokens_per_s"] * m["step_time"]
            if stage == "dpo":  # pairs: 2 rows each, padded to the longest pair of the micro-batch
                assert 0 < processed <= 2 * batch * seq_len, (stage, m)
            else:
                assert math.isclose(processed, batch * seq_len, rel_tol=1e-9), (stage, m)


def test_sft_from_an_hf_folder_equals_sft_from_the_checkpoint(corpus, tmp_path):
    """The HF import path through the trainer: SFT started from the fp32 export of a pretraining run
    trains exactly like SFT started from that run's checkpoint (same loss and grad norm each step)."""
    common = ["model.preset=debug", f"pretrain.data={corpus}", "sft.data=data/instruct/chat.jsonl",
              "logging.progress=false", "sft.steps=3", "sft.seq_len=64", "sft.micro_batch_size=2",
              "sft.global_batch_size=2", "sft.log_every=1"]
    run_cli(*pretrain_args(corpus, tmp_path, steps=2, **{"stages": "[pretrain,export]", "export.dtype": "fp32"}))
    run_cli(RECIPE, "stages=[sft]", f"run_dir={tmp_path}", *common)
    run_cli(RECIPE, "stages=[sft]", f"run_dir={tmp_path}", f"sft.init={tmp_path / 'hf'}",
            f"sft.output={tmp_path / 'sft_hf'}", *common)
    from_ckpt, from_hf = ([(m["loss"], m["grad_norm"]) for m in read_metrics(tmp_path / run) if "loss" in m]
                          for run in ("sft", "sft_hf"))
    assert len(from_hf) == 3
    for (a, na), (b, nb) in zip(from_hf, from_ckpt):
        assert math.isclose(a, b, rel_tol=1e-6) and math.isclose(na, nb, rel_tol=1e-6), (from_hf, from_ckpt)


def _step_through_hidden_only(rank, world_size):
    from parallel.layout import Layout
    from trainer.config import load_config, model_config_of
    from trainer.engine import build_engine, build_model

    cfg = load_config(None, ["model.preset=debug", "pretrain.micro_batch_size=2",
                             "pretrain.global_batch_size=2", "pretrain.seq_len=16", "pretrain.warmup_steps=0",
                             "pretrain.lr=1e-2", "pretrain.weight_decay=0.1"])
    mcfg = model_config_of(cfg)
    layout = Layout.build(cfg.parallel, mcfg, cfg.pretrain, world_size, rank)
    model = build_model(mcfg, None, 0, layout, cfg.parallel)
    engine = build_engine(model, cfg.pretrain, cfg.parallel, layout)
    head = engine.module.output.weight
    group = next(g for g in engine.optimizer.param_groups if any(p is head for p in g["params"]))
    lr, decay, before = group["lr"], group["weight_decay"], head.detach().clone()
    tokens = torch.randint(0, mcfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden, _ = engine.module.hidden(tokens)
    engine.backward(hidden.float().square().mean())
    engine.step()
    return engine.zero_optimization_stage(), lr, decay, before.numpy(), head.detach().numpy().copy()


def test_a_parameter_without_gradient_steps_on_one_rank_as_deepspeed_reduces_it():
    """One fp32 rank runs ZeRO 0 without DeepSpeed's gradient all-reduce
    (parallel.deepspeed_internals.skip_gradient_allreduce). A trainable parameter the loss never reaches
    (the LM head under SELECT and RERANK, which train through `hidden`) still gets the zero gradient the
    all-reduce gives it, so AdamW steps it: a zero Adam update and decoupled weight decay,
    w <- w (1 - lr wd)."""
    stage, lr, decay, before, after = run_ranks(1, _step_through_hidden_only)[0]
    assert stage == 0 and decay > 0
    np.testing.assert_allclose(after, before * (1 - lr * decay), rtol=1e-6, atol=0)
