"""trainer/vision_sft.py: the packed multimodal answer loss against each conversation run alone with a
plain cross-entropy on the tokens after [/INST]; bad input named by file:line (or skipped and counted);
mistral-common's downscaling of large images; a short real run of the stage with its Llava export."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlavaForConditionalGeneration

from conftest import ROOT, run_cli
from data.readers import DataError
from model import model_config
from model.multimodal import Multimodal, MultimodalConfig
from model.vision import vision_config
from trainer.vision_sft import (encode_image_conversation, load_image_conversations, multimodal_logits_or_loss,
                                pack_image_conversations, rows_of, tekken)

INST_END, EOS = 4, 2  # Tekken's [/INST] and </s>
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
    run_cli("recipes/vision_quickstart.yaml", f"run_dir={run}", "vision_sft.steps=2", "vision_sft.eval_every=0",
            "vision_sft.save_every=2", "vision_sft.freeze=[projector]", "logging.progress=false")
    records = [json.loads(line) for line in (run / "vision_sft" / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["step"] == 2 and final["eval/answers"] == 64 and 0 <= final["eval/answer_accuracy"] <= 1
    hf = LlavaForConditionalGeneration.from_pretrained(run / "hf")
    start = Multimodal(CFG)
    start.init_weights(1234)  # the recipe's seed; the projector was frozen
    assert torch.equal(hf.model.multi_modal_projector.linear_1.weight, start.projector.w1.weight)
    assert not torch.equal(hf.model.vision_tower.ln_pre.weight, start.vision.patch_norm.weight)
    proc = run_cli("recipes/vision_quickstart.yaml", f"run_dir={tmp_path / 'bad'}", "vision_sft.data=nowhere.jsonl",
                   check=False)
    assert proc.returncode == 2 and "nowhere.jsonl: no such file" in proc.stdout + proc.stderr
    assert (ROOT / "data/vision/heldout.jsonl").is_file()
