"""model/multimodal.py and its Llava export/import (model/hf_vision.py) against transformers'
LlavaForConditionalGeneration (Pixtral vision + Mixtral text, fp32): logits and greedy generate on a chat
encoded by mistral-common with the Tekken tokenizer it ships; packing against conversations run alone."""

from pathlib import Path
from types import SimpleNamespace

import mistral_common
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image
from transformers import LlavaConfig, LlavaForConditionalGeneration, MixtralConfig, PixtralVisionConfig

from distributed import run_ranks
from model import load_balancing_loss, model_config, router_z_loss
from model.hf import HFCheckpointError
from model.hf_vision import export_multimodal_hf, import_multimodal_hf, multimodal_config_from_hf
from model.multimodal import Multimodal, MultimodalConfig
from model.vision import vision_config
from parallel.cross_entropy import vocab_parallel_cross_entropy
from parallel.layout import Layout
from parallel.mappings import all_gather
from parallel.parallelize import parallelize
from trainer.config import ParallelConfig

TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
CFG = MultimodalConfig(vision=vision_config("debug", rope_theta=5000.0),  # the Tekken vocabulary
                       text=model_config("debug", vocab_size=131072, rope_theta=5000.0,
                                         attention="reference"))


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
    pixels = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
    chunks = [TextChunk(text=text)] + [ImageChunk(image=Image.fromarray(p)) for p in pixels]
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

        generated = hf.generate(input_ids=tokens[None], **hf_inputs(images), max_new_tokens=4,
                                do_sample=False)
        greedy = tokens[None]
        for _ in range(4):  # ours, no cache: the whole sequence each step
            greedy = torch.cat([greedy, ours(greedy, images)[0][:, -1:].argmax(-1)], dim=1)
    assert generated.tolist() == greedy.tolist()


def test_transformers_llava_imports_with_equal_logits(tmp_path, tekken):
    torch.manual_seed(5)
    hc = LlavaConfig(
        vision_config=PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, hidden_act="silu",
                                          rope_parameters={"rope_type": "axial", "rope_theta": 5000.0}),
        text_config=MixtralConfig(vocab_size=131072, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  num_local_experts=4, num_experts_per_tok=2,
                                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
        image_token_index=10, vision_feature_layer=-1, vision_feature_select_strategy="full")
    hf = LlavaForConditionalGeneration(hc).eval()
    with torch.no_grad():  # transformers starts biases at 0: give them values the import must carry
        hf.model.multi_modal_projector.linear_1.bias.normal_()
        hf.model.multi_modal_projector.linear_2.bias.normal_()
    hf.save_pretrained(tmp_path)
    cfg, state = import_multimodal_hf(tmp_path)
    assert (cfg.vision.dim, cfg.vision.rope_theta, cfg.text.num_experts, cfg.image_token_id) == \
        (32, 5000.0, 4, 10)
    cfg.text.attention = "reference"
    ours = Multimodal(cfg).eval()
    ours.load_state_dict(state, strict=True)
    tokens, images = encode(tekken, "Which is larger?", [(33, 64), (90, 17), (16, 16)], seed=1)
    with torch.no_grad():
        want = hf(input_ids=tokens[None], **hf_inputs(images)).logits
        diff = (ours(tokens[None], images)[0] - want).abs().max()
    assert diff.item() < 1e-4


def test_packed_conversations_equal_each_alone(tekken, ours):
    a, a_images = encode(tekken, "One.", [(40, 40)], seed=3)
    b, b_images = encode(tekken, "Two.", [(64, 30), (17, 50)], seed=4)
    positions = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]
    with torch.no_grad():
        packed = ours(torch.cat([a, b])[None], a_images + b_images, positions)[0][0]
        alone = torch.cat([ours(a[None], a_images)[0][0], ours(b[None], b_images)[0][0]])
    assert (packed - alone).abs().max().item() < 1e-5


def test_errors_name_the_problem(tekken, ours):
    tokens, images = encode(tekken, "Two images.", [(32, 32), (16, 16)])
    with pytest.raises(ValueError, match=r"5 image tokens \(id 10\) in the batch, but its 1 images give 4 "):
        ours(tokens[None], images[:1])
    d = LlavaConfig(vision_config=PixtralVisionConfig(), text_config=MixtralConfig()).to_dict()
    with pytest.raises(HFCheckpointError, match=r"cfg.json: vision_feature_layer=-2 is not supported"):
        multimodal_config_from_hf(d, "cfg.json")


# ---------------------------------------------------------------- parallel parity (2 gloo ranks)

def image_run(rows: int, cols: int) -> list[int]:
    """mistral-common's token layout of one image (checked above against its ImageEncoder)."""
    run = ([10] * cols + [12]) * rows
    return run[:-1] + [13]


def parallel_batch():
    """2 rows of 24 tokens in a 256-token vocabulary: row 0 packs two conversations (one image each),
    row 1 holds one; labels ignore the image runs. Images (3, 16 rows, 16 cols) each."""
    g = torch.Generator().manual_seed(7)
    text = lambda n: torch.randint(14, 256, (n,), generator=g).tolist()  # noqa: E731  (no special ids)
    rows = [text(3) + image_run(2, 3) + text(3), text(2) + image_run(1, 2) + text(5),
            text(4) + image_run(3, 1) + text(14)]
    tokens = torch.tensor([rows[0] + rows[1], rows[2]])
    position_ids = torch.tensor([list(range(14)) + list(range(10)), list(range(24))])
    labels = torch.randint(0, 256, tokens.shape, generator=g)
    labels[(tokens == 10) | (tokens == 12) | (tokens == 13)] = -100
    images = [torch.randn(3, 16 * r, 16 * c, generator=g) for r, c in ((2, 3), (1, 2), (3, 1))]
    return tokens, position_ids, labels, images


PARALLEL_CFG = MultimodalConfig(vision=vision_config("debug"), text=model_config("debug", vocab_size=256))
Z_COEF = 0.01


def multimodal_loss(model, token_loss):
    """token_loss(logits, labels) + the router's auxiliary losses, on parallel_batch()."""
    tokens, position_ids, labels, images = parallel_batch()
    logits, stats = model(tokens, images, position_ids)
    aux = PARALLEL_CFG.text.router_aux_loss_coef * load_balancing_loss(stats) + Z_COEF * router_z_loss(stats)
    return token_loss(logits, labels) + aux


def multimodal_reference():
    model = Multimodal(PARALLEL_CFG)
    model.init_weights(0)
    loss = multimodal_loss(model, lambda logits, labels: F.cross_entropy(logits.flatten(0, 1),
                                                                         labels.flatten()))
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def multimodal_parallel(rank, world_size, **parallel):
    """Loss and whole gradients of one parallel run; every rank feeds the same batch (dp replicas).
    Gradients as DeepSpeed reduces them (parallel/expert_parallel.py): dense ones averaged over dp,
    expert slices divided by dp (they already hold every rank's tokens), then slices gathered."""
    pcfg = ParallelConfig(**parallel)
    dp = world_size // pcfg.tp
    shape = SimpleNamespace(micro_batch_size=2, global_batch_size=2 * dp, seq_len=24)
    layout = Layout.build(pcfg, PARALLEL_CFG.text, shape, world_size, rank)
    model = Multimodal(PARALLEL_CFG)
    model.init_weights(0)
    parallelize(model.decoder, layout, pcfg)
    loss = multimodal_loss(model, lambda logits, labels: vocab_parallel_cross_entropy(
        logits, labels, layout.tp_group).sum() / (labels != -100).sum())
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        grad, spec = p.grad.clone(), getattr(p, "_shard", None)
        if getattr(p, "allreduce", True):
            dist.all_reduce(grad, group=layout.dp_group)
        grad /= layout.dp
        if spec is not None:
            group = layout.tp_group if getattr(p, "tensor_model_parallel", False) else layout.ep_group
            grad = all_gather(grad, spec[0], group)
        grads[name] = grad
    return loss.item(), grads


def multimodal_parallel_checks(rank, world_size):
    ref_loss, ref_grads = multimodal_reference()
    ref_norm = torch.cat([g.flatten() for g in ref_grads.values()]).double().norm().item()
    results = {}
    for name, parallel in {"tp2": dict(tp=2), "ep2": dict(ep=2)}.items():
        loss, grads = multimodal_parallel(rank, world_size, **parallel)
        assert grads.keys() == ref_grads.keys()
        norm = torch.cat([g.flatten() for g in grads.values()]).double().norm().item()
        worst = max(((g - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-12)).item()
                    for n, g in grads.items())
        results[name] = dict(loss=abs(loss - ref_loss) / ref_loss, grad_norm=abs(norm - ref_norm) / ref_norm,
                             worst_grad=worst,
                             vision_grad=grads["vision.layers.0.attention.wq.weight"].norm())
    return results


def test_tp2_and_ep2_equal_one_process():
    for results in run_ranks(2, multimodal_parallel_checks):
        for name, errors in results.items():
            assert errors.pop("vision_grad").item() > 0, name  # the images' gradient reaches the encoder
            assert max(errors.values()) < 1e-5, (name, errors)
