"""trainer/vision_sft.py: the packed multimodal answer loss against each conversation run alone with a
plain cross-entropy on the tokens after [/INST]; bad input named by file:line (or skipped and counted);
mistral-common's downscaling of large images; a short real run of the stage with its Llava export; the
stage through the trainer at TP2 and EP2 equal to one process (loss and grad norm of every step), and
resumed with a frozen part equal to the uninterrupted run, the frozen part still at its starting weights."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlavaForConditionalGeneration

from conftest import ROOT, assert_same_curves, read_metrics, run_cli
from data.readers import DataError
from model import model_config
from model.multimodal import Multimodal, MultimodalConfig
from model.vision import vision_config
from trainer.checkpoint import CheckpointReader, latest_checkpoint
from trainer.vision_sft import (encode_image_conversation, load_image_conversations, multimodal_logits_or_loss,
                                pack_image_conversations, rows_of, tekken)

INST_END, EOS = 4, 2  # Tekken's [/INST] and </s>
SEED = 1234  # vision_sft.seed's default (the quickstart recipe sets none)
CFG = MultimodalConfig(vision=vision_config("debug"), text=model_config("debug", vocab_size=131072,
                                                                        attention="reference"))


def chat(tmp_path, name, sizes, answer, question="What is this?"):
    """A user turn with one image per (width, height), written as PNGs next to the jsonl, and an answer."""
    parts = [{"type": "text", "text": question}]
    for k, (w, h) in enumerate(sizes):
        path = tmp_path / f"{name}_{k}.png"
        Image.new("RGB", (w, h), (40 * k, 200, 90)).save(path)
        parts.append({"type": "image", "path": path.name})
    return {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]}


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def load(path, skip=False, max_image_size=1024):
    return load_image_conversations(path, tekken(max_image_size), skip, 10, 16)


def test_loss_equals_plain_answer_loss_of_each_conversation_alone(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(tmp_path, "a", [(40, 30)], "a green square"),
                                              chat(tmp_path, "b", [(20, 50), (33, 16)], "two", "And these?"),
                                              chat(tmp_path, "c", [(16, 16)], "one small one")])
    conversations, _ = load(data)
    packed = pack_image_conversations(conversations, seq_len=128)
    assert len(packed.tokens) == 1  # all three in one row
    model = Multimodal(CFG)
    model.init_weights(0)
    engine, layout = SimpleNamespace(module=model), SimpleNamespace(tp=1)
    got, _, hits = multimodal_logits_or_loss(engine, rows_of(packed, [0]), layout)

    want, answer_tokens = 0.0, 0
    for conv in conversations:
        tokens = torch.tensor(conv.tokens)
        start = int((tokens == INST_END).nonzero().max()) + 1  # the answer: after the last [/INST]
        assert tokens[-1] == EOS
        logits = model(tokens[None], conv.images)[0][0]
        want = want + F.cross_entropy(logits[start - 1:-1], tokens[start:], reduction="sum")
        answer_tokens += len(tokens) - start
    assert len(hits) == answer_tokens
    assert abs(got.item() - want.item()) < 1e-3 * want.item()


def test_bad_input_names_file_and_line_or_is_skipped(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = chat(tmp_path, "g", [(16, 16)], "fine")
    missing = {"messages": [{"role": "user", "content": [{"type": "image", "path": "nowhere.png"}]},
                            {"role": "assistant", "content": "x"}]}
    broken = {"messages": [{"role": "user", "content": [{"type": "image", "path": "broken.png"}]},
                           {"role": "assistant", "content": "x"}]}
    in_answer = {"messages": [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": [{"type": "image", "path": "g_0.png"}]}]}
    cases = [(missing, r"nowhere.png: no such file"), (broken, r"broken.png: cannot read it"),
             (in_answer, r"messages\[1\]: only user turns may hold a list of parts"),
             ('{"messages": 3', r"not valid JSON")]
    for k, (record, message) in enumerate(cases):
        path = write_jsonl(tmp_path / f"bad{k}.jsonl", [good, record])
        with pytest.raises(DataError, match=rf"bad{k}.jsonl:2: .*{message}"):
            load(path)
    conversations, skipped = load(write_jsonl(tmp_path / "all.jsonl", [good] + [r for r, _ in cases]), skip=True)
    assert len(conversations) == 1 and len(skipped) == len(cases)


def test_large_image_is_scaled_down_as_mistral_common_does(tmp_path):
    record = chat(tmp_path, "wide", [(400, 90)], "wide")
    conv = encode_image_conversation(record["messages"], tekken(64), tmp_path, "x:1", 10, 16)
    (image,) = conv.images
    assert tuple(image.shape) == (3, 16, 64)  # 400 x 90 -> 64 x 14.4 -> sides rounded up to 16
    assert conv.tokens.count(10) == 4


def test_stage_runs_reports_answer_accuracy_and_exports(tmp_path):
    run = tmp_path / "run"
    run_cli("recipes/vision_quickstart.yaml", f"run_dir={run}", "vision_sft.steps=1",
            "vision_sft.eval_every=0", "vision_sft.save_every=1", "vision_sft.freeze=[projector]",
            "logging.progress=false")
    final = read_metrics(run / "vision_sft")[-1]
    assert final["step"] == 1 and final["eval/answers"] == 64 and 0 <= final["eval/answer_accuracy"] <= 1
    hf = LlavaForConditionalGeneration.from_pretrained(run / "hf")
    start = Multimodal(CFG)
    start.init_image_side(SEED)  # the encoder and projector of init_weights(SEED); the projector was frozen
    assert torch.equal(hf.model.multi_modal_projector.linear_1.weight, start.projector.w1.weight)
    assert not torch.equal(hf.model.vision_tower.ln_pre.weight, start.vision.patch_norm.weight)
    proc = run_cli("recipes/vision_quickstart.yaml", f"run_dir={tmp_path / 'bad'}", "vision_sft.data=nowhere.jsonl",
                   check=False)
    assert proc.returncode == 2 and "nowhere.jsonl: no such file" in proc.stdout + proc.stderr
    assert (ROOT / "data/vision/heldout.jsonl").is_file()


# ---------------------------------------------------------------- the stage through the trainer

STEPS = 4


def shipped_clip_art(file: str, lines) -> list[dict]:
    """Records `lines` of data/vision/`file` with their image paths made absolute."""
    all_lines = (ROOT / "data/vision" / file).read_text().splitlines()
    records = [json.loads(all_lines[k]) for k in lines]
    for record in records:
        for part in record["messages"][0]["content"]:
            if part["type"] == "image":
                part["path"] = str(ROOT / "data/vision" / part["path"])
    return records


@pytest.fixture(scope="module")
def stage_data(tmp_path_factory):
    """data: one question about two shipped clip-art images and seven text-only conversations, each
    alone in its row of 64 positions (39 to 43 tokens: no two fit one row). A step's 4 rows are split
    2 + 2 over the data-parallel ranks at EP2, so the step holding the image row gives one rank images
    and the other none. clip_art: 8 shipped clip-art questions (2 per category), an image in every row.
    eval_data: one held-out clip-art question per category."""
    folder = tmp_path_factory.mktemp("stage_data")
    images = ROOT / "data/vision/images"
    question = {"type": "text", "text": "What is in these two pictures? Answer with two words."}
    two_images = {"messages": [
        {"role": "user", "content": [question, {"type": "image", "path": str(images / "animal_000.png")},
                                     {"type": "image", "path": str(images / "vehicle_000.png")}]},
        {"role": "assistant", "content": "animal, vehicle"}]}
    text_only = [{"messages": [
        {"role": "user", "content": f"Count from {k} to {k + 5} in digits, separated by commas, nothing more."},
        {"role": "assistant", "content": ", ".join(str(k + j) for j in range(6))}]} for k in range(7)]
    mixed = write_jsonl(folder / "mixed.jsonl", [two_images] + text_only)
    conversations, _ = load(mixed)
    assert len(pack_image_conversations(conversations, seq_len=64).tokens) == len(conversations) == 8
    clip_art = shipped_clip_art("train.jsonl", [0, 1, 64, 65, 128, 129, 192, 193])  # 64 per category
    heldout = shipped_clip_art("heldout.jsonl", [0, 16, 32, 48])  # 16 per category
    return {"data": mixed, "clip_art": write_jsonl(folder / "clip_art.jsonl", clip_art),
            "eval_data": write_jsonl(folder / "heldout.jsonl", heldout)}


def stage_args(data, run_dir, **extra) -> list[str]:
    """CLI arguments of a short vision_sft run of the quickstart's model on `data` (overrides in extra)."""
    args = dict({"run_dir": run_dir, "vision_sft.data": data["data"],
                 "vision_sft.eval_data": data["eval_data"], "vision_sft.steps": STEPS,
                 "vision_sft.micro_batch_size": 2, "vision_sft.global_batch_size": 4,
                 "vision_sft.seq_len": 64, "vision_sft.warmup_steps": 2, "vision_sft.log_every": 1,
                 "vision_sft.save_every": 100, "vision_sft.eval_every": 0, "vision_sft.export_hf": "null",
                 "logging.progress": "false"}, **extra)
    return ["recipes/vision_quickstart.yaml"] + [f"{k}={v}" for k, v in args.items()]


def held_out(stage_folder) -> dict:
    (row,) = [m for m in read_metrics(stage_folder) if "eval/loss" in m]
    return row


@pytest.fixture(scope="module")
def single_process(stage_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    run_cli(*stage_args(stage_data, run_dir))
    return run_dir / "vision_sft"


LAYOUTS = {"tp2": {"parallel.tp": 2}, "ep2": {"parallel.ep": 2}}
FP32_TOL = 1e-6  # relative, as tests/test_trainer.py: layouts only sum in another order (measured <= 1.3e-7)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_like_one_process(layout, stage_data, tmp_path, single_process):
    """The encoder and projector are replicated: at TP2 their gradient must count once in the grad norm,
    at EP2 be averaged over the two data-parallel ranks, also in a step where one of them has no image."""
    run_cli(*stage_args(stage_data, tmp_path, **LAYOUTS[layout]), nproc=2)
    assert_same_curves(tmp_path / "vision_sft", single_process, FP32_TOL, FP32_TOL)
    got, want = held_out(tmp_path / "vision_sft"), held_out(single_process)
    assert abs(got["eval/loss"] - want["eval/loss"]) <= FP32_TOL * want["eval/loss"], (got, want)
    for key in ("eval/token_accuracy", "eval/answer_accuracy", "eval/answers"):
        assert got[key] == want[key], (key, got, want)


@pytest.mark.parametrize("frozen", ["vision", "decoder"])
def test_resume_with_a_frozen_part_reproduces_the_uninterrupted_run(frozen, stage_data, tmp_path):
    """Stopped after step 2 as if interrupted, then started again: the same losses and grad norms as one
    uninterrupted run, and the frozen part still at its starting weights in the final checkpoint."""
    freeze = {"vision_sft.freeze": f"[{frozen}]", "vision_sft.data": stage_data["clip_art"]}
    run_cli(*stage_args(stage_data, tmp_path / "full", **freeze))
    run_cli(*stage_args(stage_data, tmp_path / "cut", **freeze, **{"vision_sft.stop_after": 2}))
    assert not (tmp_path / "cut/vision_sft/DONE").exists()
    run_cli(*stage_args(stage_data, tmp_path / "cut", **freeze))
    assert_same_curves(tmp_path / "cut/vision_sft", tmp_path / "full/vision_sft", 1e-6, 1e-6)
    got, want = held_out(tmp_path / "cut/vision_sft"), held_out(tmp_path / "full/vision_sft")
    assert abs(got["eval/loss"] - want["eval/loss"]) < 1e-6, (got, want)

    start = Multimodal(CFG)
    start.init_image_side(SEED)
    if frozen == "decoder":
        start.decoder.init_weights(SEED)
    final = CheckpointReader(latest_checkpoint(tmp_path / "cut/vision_sft/checkpoints"))
    assert final.trainer_state()["step"] == STEPS
    frozen_names = [n for n in start.state_dict() if n.startswith(frozen + ".")]
    assert frozen_names
    for name in frozen_names:
        assert torch.equal(final.read(f"model/{name}"), start.state_dict()[name]), name
    trained = "projector.w1.weight"  # trained in both runs: the comparison above is not vacuous
    assert not torch.equal(final.read(f"model/{trained}"), start.state_dict()[trained])
