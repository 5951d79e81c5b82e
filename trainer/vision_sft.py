"""Image-text SFT: model/multimodal.py trained by the one loop (trainer/loop.py) as a Task.

Data: jsonl of {"messages": [...]} as data/chat.py, except that a user content may also be a list of
parts, {"type": "text", "text": str} and {"type": "image", "path": str} (relative to the jsonl's folder),
in the order they are read. mistral-common encodes the chat with the Tekken tokenizer it ships (the
Pixtral-12B format, `<s>[INST]{user}[/INST]{answer}</s>`), images through its ImageEncoder: an image whose
longest side is above vision max_image_size is scaled down to it (mistral-common's rule, aspect ratio
kept), each side rounded up to a multiple of the patch size. Images sit where their parts are, so a record
cannot hold more images than [IMG] runs; the encoding is still checked to hold exactly as many [IMG]
tokens as its images have patches. A missing or unreadable image, an image part outside a user turn, or
anything data/chat.py refuses is a DataError naming file:line and the message (skip_bad_records: skipped
and counted).

Loss mask: the assistant answers and their </s> (each prefix encoding checked to be a prefix of the
whole). Packing: first-fit rows of seq_len positions as data/chat.py, position ids restarting at every
conversation (no attention across conversations); the encoder packs each micro-batch's images with its
block-diagonal mask (no attention across images). A conversation longer than seq_len + 1 tokens is
dropped and counted, never cut (a cut could split an image).

Held out (`eval_data`, or valid_fraction of `data`): eval/loss, eval/token_accuracy, and
eval/answer_accuracy: the share of conversations whose every answer token is the arg-max next token
(teacher-forced, i.e. the greedy answer up to its </s>).

Model (run_vision_sft): the decoder from `init` (one of our text checkpoints or an HF Mixtral folder,
vocabulary of 131072 Tekken tokens) or random, the encoder and projector fresh (vision_preset) or from
`vision_init` (an HF Llava folder: model/hf_vision.py); built on the meta device, the decoder
parallelized, then materialized. `freeze` lists parts (vision, projector, decoder) kept fixed.
`export_hf`: the final weights as a LlavaForConditionalGeneration folder.
"""

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from data.chat import IGNORE_INDEX, check_messages, read_jsonl, split_train_valid
from data.readers import DataError
from model.loss import fused_linear_cross_entropy
from parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_top1

from . import distributed as D
from .tasks import (PretrainTask, eval_batches, router_loss, shuffled_items, sum_over_dp, to_device,
                    token_loss_log)

PARTS = ("vision", "projector", "decoder")


@lru_cache(maxsize=4)
def tekken(max_image_size: int = 1024, patch_size: int = 16):
    """mistral-common's Tekken tokenizer (tekken_240911.json) with its image encoder's maximum side and
    patch size set to ours."""
    import mistral_common
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tok = MistralTokenizer.from_file(str(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"),
                                     mode=ValidationMode.agnostic)
    config = tok.instruct_tokenizer.image_encoder.image_config
    config.max_image_size, config.image_patch_size = max_image_size, patch_size
    return tok


@dataclass
class ImageConversation:
    tokens: list[int]
    mask: list[bool]  # True on answer tokens and their </s>
    images: list[torch.Tensor]  # (3, H, W) float, in token order
    where: str


def load_image(path: Path, where: str, k: int):
    from PIL import Image

    if not path.is_file():
        raise DataError(f"{where}: messages[{k}]: image {path}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as e:  # PIL raises several kinds for truncated or foreign files
        raise DataError(f"{where}: messages[{k}]: image {path}: cannot read it ({e})") from None


def parse_messages(messages, base: Path, where: str) -> list[tuple[str, object]]:
    """[(role, content)] where a user content is a str or a list of TextChunk / ImageChunk."""
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk

    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' must be a list")
    plain, parts = [], {}
    for k, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            plain.append(m)
            continue
        if m.get("role") != "user":
            raise DataError(f"{where}: messages[{k}]: only user turns may hold a list of parts (images)")
        chunks = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str) and part["text"].strip():
                chunks.append(TextChunk(text=part["text"]))
            elif kind == "image" and isinstance(part.get("path"), str):
                chunks.append(ImageChunk(image=load_image(base / part["path"], where, k)))
            else:
                raise DataError(f"{where}: messages[{k}].content[{j}]: expected {{'type': 'text', 'text': str}} "
                                "or {'type': 'image', 'path': str}")
        if not chunks:
            raise DataError(f"{where}: messages[{k}]: empty user turn")
        parts[k] = chunks
        plain.append({"role": "user", "content": "(parts)"})
    return [(role, parts.get(k, content)) for k, (role, content) in enumerate(check_messages(plain, where))]


def encode_request(messages, tokenizer):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=[kinds[r](content=c)
                                                                            for r, c in messages]))


def encode_image_conversation(messages, tokenizer, base: Path, where: str,
                              image_token_id: int, patch_size: int) -> ImageConversation:
    checked = parse_messages(messages, base, where)
    encoded = encode_request(checked, tokenizer)
    tokens, images = encoded.tokens, [torch.from_numpy(np.asarray(i, dtype=np.float32)) for i in encoded.images]
    patches = sum((i.shape[1] // patch_size) * (i.shape[2] // patch_size) for i in images)
    if tokens.count(image_token_id) != patches:
        raise DataError(f"{where}: {tokens.count(image_token_id)} [IMG] tokens for {len(images)} images of "
                        f"{patches} patches")
    mask = [False] * len(tokens)
    for i, (role, _) in enumerate(checked):
        if role == "assistant":
            start, end = (len(encode_request(checked[:n], tokenizer).tokens) for n in (i, i + 1))
            if tokens[:end] != encode_request(checked[:i + 1], tokenizer).tokens:
                raise DataError(f"{where}: the encoding of the first {i + 1} messages is not a prefix of the "
                                "whole conversation's: this format cannot be masked per turn")
            mask[start:end] = [True] * (end - start)
    return ImageConversation(tokens, mask, images, where)


def load_image_conversations(path, tokenizer, skip_bad: bool, image_token_id: int, patch_size: int):
    """(conversations, errors of the skipped records) of one jsonl file; image paths are relative to it."""
    folder = Path(path).parent

    def convert(record, where):
        if "messages" not in record:
            raise DataError(f"{where}: record has no field 'messages'")
        return encode_image_conversation(record["messages"], tokenizer, folder, where, image_token_id, patch_size)

    return read_jsonl(path, convert, skip_bad)


@dataclass
class PackedImageChat:
    tokens: torch.Tensor  # (R, T)
    labels: torch.Tensor  # (R, T), IGNORE_INDEX off the answers
    position_ids: torch.Tensor  # (R, T), restarting at every conversation
    conversation: torch.Tensor  # (R, T), index of the conversation at each position, -1 on padding
    images: list[list[torch.Tensor]]  # per row, in token order
    dropped: int  # conversations longer than seq_len + 1


def pack_image_conversations(conversations: list[ImageConversation], seq_len: int) -> PackedImageChat:
    rows, free, dropped = [], [], 0
    for c, conv in enumerate(conversations):
        need = len(conv.tokens) - 1
        if need > seq_len:
            dropped += 1
            continue
        r = next((r for r, room in enumerate(free) if room >= need), len(rows))
        if r == len(rows):
            rows.append([])
            free.append(seq_len)
        rows[r].append(c)
        free[r] -= need
    shape = (len(rows), seq_len)
    tokens, labels = torch.zeros(shape, dtype=torch.long), torch.full(shape, IGNORE_INDEX)
    positions, owner = torch.zeros(shape, dtype=torch.long), torch.full(shape, -1)
    for r, row in enumerate(rows):
        at = 0
        for c in row:
            t, m = torch.tensor(conversations[c].tokens), torch.tensor(conversations[c].mask)
            n = len(t) - 1
            tokens[r, at:at + n] = t[:-1]
            labels[r, at:at + n] = torch.where(m[1:], t[1:], IGNORE_INDEX)
            positions[r, at:at + n] = torch.arange(n)
            owner[r, at:at + n] = c
            at += n
        positions[r, at:] = torch.arange(seq_len - at)
    images = [[i for c in row for i in conversations[c].images] for row in rows]
    return PackedImageChat(tokens, labels, positions, owner, images, dropped)


def rows_of(packed: PackedImageChat, indices) -> dict:
    """The micro-batch of rows `indices` with their images in row-major token order; None gives an
    all-padding row (no image, no loss token)."""
    pick = torch.tensor([0 if i is None else i for i in indices])
    batch = {k: getattr(packed, k)[pick].clone() for k in ("tokens", "labels", "position_ids", "conversation")}
    images = []
    for r, i in enumerate(indices):
        if i is None:
            batch["tokens"][r], batch["labels"][r], batch["conversation"][r] = 0, IGNORE_INDEX, -1
            batch["position_ids"][r] = torch.arange(batch["tokens"].shape[1])
        else:
            images += packed.images[i]
    return {**batch, "images": images}


def multimodal_logits_or_loss(engine, batch, layout):
    """(summed answer-token loss, router stats, (L,) top-1 hits at the loss positions, row-major). Without
    tp only the loss positions go through the LM head (model/loss.py fuses head and loss)."""
    images = [i.to(batch["tokens"].device) for i in batch["images"]]
    labels = batch["labels"]
    if layout.tp > 1:
        logits, stats = engine(batch["tokens"], images, batch["position_ids"])
        hits = vocab_parallel_top1(logits, labels, layout.tp_group)[labels != IGNORE_INDEX]
        return vocab_parallel_cross_entropy(logits, labels, layout.tp_group).sum(), stats, hits
    model = engine.module
    hidden, stats = model.hidden(batch["tokens"], images, batch["position_ids"])
    keep = labels != IGNORE_INDEX
    hidden, targets = hidden[keep], labels[keep]
    loss = fused_linear_cross_entropy(hidden, model.output.weight, targets)
    with torch.no_grad():
        hits = model.output(hidden.detach()).argmax(-1) == targets
    return loss, stats, hits


def zero_through_image_side(model):
    """0 x the encoder's and projector's trained parameters, added to the loss: a micro-batch without
    images still gives them a (zero) gradient. DeepSpeed reduces over data parallelism the gradients
    that exist, so a rank whose micro-batch holds no image would otherwise join reductions of other
    sizes than the other ranks (a failed or hung collective)."""
    return 0.0 * sum(p.sum() for part in (model.vision, model.projector) for p in part.parameters()
                     if p.requires_grad)


class VisionSFTTask(PretrainTask):
    def __init__(self, scfg, mm_cfg, layout):
        self.scfg, self.model_cfg, self.layout = scfg, mm_cfg.text, layout
        tokenizer = tekken(mm_cfg.vision.max_image_size, mm_cfg.vision.patch_size)
        load = lambda path: load_image_conversations(  # noqa: E731
            path, tokenizer, scfg.skip_bad_records, mm_cfg.image_token_id, mm_cfg.vision.patch_size)
        conversations, skipped = load(scfg.data)
        if scfg.eval_data:
            train = conversations
            valid, skipped_valid = load(scfg.eval_data)
            skipped += skipped_valid
        else:
            train, valid = split_train_valid(conversations, scfg.valid_fraction, scfg.seed)
        shuffled = [train[i] for i in np.random.default_rng(scfg.seed).permutation(len(train))]
        self.rows = pack_image_conversations(shuffled, scfg.seq_len)
        self.valid = pack_image_conversations(valid, scfg.seq_len)
        if not len(self.rows.tokens):
            raise DataError(f"{scfg.data}: no training conversation fits vision_sft.seq_len={scfg.seq_len}")
        self.items = shuffled_items(len(self.rows.tokens), scfg, layout,
                                    f"vision_sft data {scfg.data} (seq_len {scfg.seq_len})")
        if D.is_main():
            print(f"[vision_sft] {len(train)} conversations ({sum(len(r) for r in self.rows.images)} images) -> "
                  f"{len(self.rows.tokens)} rows of {scfg.seq_len} tokens ({self.rows.dropped} too long, "
                  f"dropped); {len(valid)} held out; {len(skipped)} bad records skipped"
                  + (f" (first: {skipped[0]})" if skipped else ""), flush=True)

    def next_batch(self):
        return to_device(rows_of(self.rows, self.items.next_items()))

    def loss(self, engine, batch, scale):
        ce_sum, stats, _ = multimodal_logits_or_loss(engine, batch, self.layout)
        aux, router_sums = router_loss(stats, self.model_cfg, self.layout)
        loss = ce_sum * scale + aux + zero_through_image_side(engine.module)
        return loss, {"loss_sum": ce_sum.item(), "tokens": self.num_loss_tokens(batch), **router_sums}

    def reduce_metrics(self, sums, layout) -> dict:
        return token_loss_log(sums, layout)

    def evaluate(self, engine, layout) -> dict:
        if not len(self.valid.tokens):
            return {}
        loss_sum = correct = tokens = answers_right = answers = 0.0
        engine.eval()
        with torch.no_grad():
            for indices in eval_batches(len(self.valid.tokens), self.scfg.micro_batch_size, layout,
                                        self.scfg.eval_batches):
                batch = to_device(rows_of(self.valid, indices))
                ce_sum, _, hits = multimodal_logits_or_loss(engine, batch, layout)
                owners = batch["conversation"][batch["labels"] != IGNORE_INDEX]
                wrong = set(owners[~hits].tolist())
                loss_sum, correct, tokens = loss_sum + ce_sum.item(), correct + hits.sum().item(), tokens + len(hits)
                present = set(owners.tolist())
                answers, answers_right = answers + len(present), answers_right + len(present - wrong)
        engine.train()
        loss_sum, correct, tokens, answers_right, answers = sum_over_dp(
            [loss_sum, correct, tokens, answers_right, answers], layout)
        return {"eval/loss": loss_sum / tokens, "eval/token_accuracy": correct / tokens,
                "eval/answer_accuracy": answers_right / answers, "eval/answers": answers}

    def state_dict(self):
        return self.items.state_dict()

    def load_state_dict(self, state):
        self.items.load_state_dict(state)


def image_side_state(mm_cfg, vision_init, seed: int) -> dict:
    """vision.* and projector.* tensors: Multimodal.init_image_side(seed), then those of `vision_init` (an
    HF Llava folder) when given; its projector only if it fits the decoder's width."""
    from model.multimodal import Multimodal

    with torch.device("meta"):
        model = Multimodal(mm_cfg)
    for part in (model.vision, model.projector):
        part.to_empty(device="cpu")
    model.init_image_side(seed)
    state = {f"{p}.{k}": v for p in ("vision", "projector") for k, v in getattr(model, p).state_dict().items()}
    if vision_init:
        from model.hf_vision import import_multimodal_hf

        _, imported = import_multimodal_hf(vision_init)
        for name in state:
            if name in imported and (name.startswith("vision.") or imported[name].shape == state[name].shape):
                state[name] = imported[name].float()
    return state


def multimodal_config_of(cfg, scfg):
    """(MultimodalConfig, the stage's text config): the vision preset, or the vision config of
    `vision_init`; the decoder as trainer.engine.model_config_for. Mismatches are ConfigError."""
    from model.hf_vision import multimodal_config_from_hf
    from model.multimodal import MultimodalConfig
    from model.vision import vision_config

    from .config import ConfigError, model_config_of
    from .engine import model_config_for

    text = model_config_for(model_config_of(cfg), scfg.init)
    bad = [p for p in scfg.freeze if p not in PARTS]
    if bad or len(set(scfg.freeze)) == len(PARTS):
        raise ConfigError(f"vision_sft.freeze: {list(scfg.freeze)}: choose some (not all) of {list(PARTS)}")
    vocab = tekken().instruct_tokenizer.tokenizer.n_words
    if text.vocab_size != vocab:
        raise ConfigError(f"vision_sft: the decoder's vocab_size ({text.vocab_size}) is not the Tekken "
                          f"tokenizer's ({vocab}); set model.vocab_size={vocab}")
    if scfg.vision_init:
        import json

        config = Path(scfg.vision_init) / "config.json"
        if not config.is_file():
            raise ConfigError(f"vision_sft.vision_init: {scfg.vision_init} is not an HF Llava folder")
        vision = multimodal_config_from_hf(json.loads(config.read_text()), str(config)).vision
    else:
        try:
            vision = vision_config(scfg.vision_preset)
        except ValueError as e:
            raise ConfigError(f"vision_sft.vision_preset: {e}") from None
    return MultimodalConfig(vision=vision, text=text), text


def run_vision_sft(cfg) -> bool:
    from omegaconf import OmegaConf

    from model.hf_vision import export_multimodal_hf
    from model.multimodal import Multimodal
    from parallel.layout import Layout

    from .checkpoint import CheckpointReader, latest_checkpoint
    from .config import save_config
    from .engine import build_engine, build_wrapped_model
    from .loop import train

    scfg = cfg.vision_sft
    out = Path(scfg.output)
    mm_cfg, text = multimodal_config_of(cfg, scfg)
    cfg = cfg.copy()
    cfg.model = OmegaConf.structured(text)
    layout = Layout.build(cfg.parallel, text, scfg, D.world_size(), D.rank())
    task = VisionSFTTask(scfg, mm_cfg, layout)  # the data is read and checked before the model is built
    model = build_wrapped_model(lambda: Multimodal(mm_cfg), text, scfg,
                                lambda: image_side_state(mm_cfg, scfg.vision_init, scfg.seed), layout, cfg.parallel)
    for part in scfg.freeze:
        getattr(model, part).requires_grad_(False)
    engine = build_engine(model, scfg, cfg.parallel, layout)
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    step, _ = train("vision_sft", scfg, cfg, engine, task, layout, text)
    if step == scfg.steps and scfg.export_hf and D.is_main():
        reader = CheckpointReader(latest_checkpoint(out / "checkpoints"))
        state = {name: reader.read(f"model/{name}") for name in reader.names()}
        path = export_multimodal_hf(state, mm_cfg, scfg.export_hf, dtype=torch.float32)
        print(f"[vision_sft] exported a LlavaForConditionalGeneration folder to {path}", flush=True)
    return step == scfg.steps
