"""model/multimodal.py and its Llava export/import (model/hf_vision.py) against transformers'
LlavaForConditionalGeneration (Pixtral vision + Mixtral text, fp32): logits and greedy generate on a chat
encoded by mistral-common with the Tekken tokenizer it ships; packing against conversations run alone."""

from pathlib import Path

import mistral_common
import numpy as np
import pytest
import torch
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image
from transformers import LlavaConfig, LlavaForConditionalGeneration, MixtralConfig, PixtralVisionConfig

from model import model_config
from model.hf import HFCheckpointError
from model.hf_vision import export_multimodal_hf, import_multimodal_hf, multimodal_config_from_hf
from model.multimodal import Multimodal, MultimodalConfig
from model.vision import vision_config

TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
CFG = MultimodalConfig(vision=vision_config("debug", rope_theta=5000.0),
                       text=model_config("debug", vocab_size=131072, rope_theta=5000.0, attention="reference"))


@pytest.fixture(scope="module")
def tekken():
    return MistralTokenizer.from_file(str(TEKKEN))


@pytest.fixture(scope="module")
def ours():
    """Our random init (model/init.py), shared: drawing the 131072-token vocabulary takes ~2 s."""
    model = Multimodal(CFG)
    model.init_weights(seed=0)
    return model.eval()


def encode(tekken, text: str, sizes, seed=0):
    """One user turn: text, then one random RGB image per (width, height) -> (tokens (T,), images)."""
    rng = np.random.default_rng(seed)
    chunks = [TextChunk(text=text)] + [ImageChunk(image=Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
                                       for w, h in sizes]
    enc = tekken.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(content=chunks)]))
    return torch.tensor(enc.tokens), [torch.from_numpy(i) for i in enc.images]


def hf_inputs(images):
    """transformers' form: images zero-padded to the largest height and width, plus their sizes."""
    H, W = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    pixels = torch.zeros(len(images), 3, H, W)
    for k, img in enumerate(images):
        pixels[k, :, :img.shape[1], :img.shape[2]] = img
    return dict(pixel_values=pixels, image_sizes=torch.tensor([i.shape[1:] for i in images]))


def test_tekken_layout_rows_breaks_end(tekken):
    tokens, images = encode(tekken, "Compare these.", [(70, 40), (20, 45)])
    assert [tuple(i.shape) for i in images] == [(3, 48, 80), (3, 48, 32)]  # sides rounded up to 16
    image_runs = []
    for cols, rows in ((5, 3), (2, 3)):  # per row: [IMG] x cols, [IMG_BREAK]; the last one [IMG_END]
        run = ([10] * cols + [12]) * rows
        image_runs += run[:-1] + [13]
    assert [t for t in tokens.tolist() if t in (10, 12, 13)] == image_runs


def test_export_loads_in_transformers_with_equal_logits_and_generate(tmp_path, tekken, ours):
    out = export_multimodal_hf(ours.state_dict(), CFG, tmp_path / "hf", dtype=torch.float32)
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokens, images = encode(tekken, "Compare these.", [(70, 40), (20, 45)])
    with torch.no_grad():
        want = hf.eval()(input_ids=tokens[None], **hf_inputs(images)).logits
        got = ours(tokens[None], images)[0]
        assert (got - want).abs().max().item() < 1e-4

        generated = hf.generate(input_ids=tokens[None], **hf_inputs(images), max_new_tokens=4, do_sample=False)
        greedy = tokens[None]
        for _ in range(4):  # ours, no cache: the whole sequence each step
            greedy = torch.cat([greedy, ours(greedy, images)[0][:, -1:].argmax(-1)], dim=1)
    assert generated.tolist() == greedy.tolist()


def test_transformers_llava_imports_with_equal_logits(tmp_path, tekken):
    torch.manual_seed(5)
    hc = LlavaConfig(
        vision_config=PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          hidden_act="silu", rope_parameters={"rope_type": "axial", "rope_theta": 5000.0}),
        text_config=MixtralConfig(vocab_size=131072, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                  num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
        image_token_index=10, vision_feature_layer=-1, vision_feature_select_strategy="full")
    hf = LlavaForConditionalGeneration(hc).eval()
    with torch.no_grad():  # transformers starts biases at 0: give them values the import must carry
        hf.model.multi_modal_projector.linear_1.bias.normal_()
        hf.model.multi_modal_projector.linear_2.bias.normal_()
    hf.save_pretrained(tmp_path)
    cfg, state = import_multimodal_hf(tmp_path)
    assert (cfg.vision.dim, cfg.vision.rope_theta, cfg.text.num_experts, cfg.image_token_id) == (32, 5000.0, 4, 10)
    cfg.text.attention = "reference"
    ours = Multimodal(cfg).eval()
    ours.load_state_dict(state, strict=True)
    tokens, images = encode(tekken, "Which is larger?", [(33, 64), (90, 17), (16, 16)], seed=1)
    with torch.no_grad():
        diff = (ours(tokens[None], images)[0] - hf(input_ids=tokens[None], **hf_inputs(images)).logits).abs().max()
    assert diff.item() < 1e-4


def test_packed_conversations_equal_each_alone(tekken, ours):
    (a, a_images), (b, b_images) = encode(tekken, "One.", [(40, 40)], 3), encode(tekken, "Two.", [(64, 30), (17, 50)], 4)
    positions = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]
    with torch.no_grad():
        packed = ours(torch.cat([a, b])[None], a_images + b_images, positions)[0][0]
        alone = torch.cat([ours(a[None], a_images)[0][0], ours(b[None], b_images)[0][0]])
    assert (packed - alone).abs().max().item() < 1e-5


def test_errors_name_the_problem(tekken, ours):
    tokens, images = encode(tekken, "Two images.", [(32, 32), (16, 16)])
    with pytest.raises(ValueError, match=r"5 image tokens \(id 10\) in the batch, but its 1 images give 4 patches"):
        ours(tokens[None], images[:1])
    d = LlavaConfig(vision_config=PixtralVisionConfig(), text_config=MixtralConfig()).to_dict()
    with pytest.raises(HFCheckpointError, match=r"cfg.json: vision_feature_layer=-2 is not supported \(only -1\)"):
        multimodal_config_from_hf(d, "cfg.json")
