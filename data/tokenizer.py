"""Tokenizers: the real Mixtral 8x7B tokenizer as a Hugging Face fast tokenizer, or any saved HF tokenizer.

    load_tokenizer("mistral-v1")  -> the Mixtral tokenizer (32000 tokens; <unk>=0, <s>=1, </s>=2)
    load_tokenizer("/path/dir")   -> AutoTokenizer.from_pretrained("/path/dir")

"mistral-v1" is built from the sentencepiece model that mistral-common ships
(`mistral_common/data/tokenizer.model.v1`, the tokenizer of Mixtral 8x7B) as a `tokenizers` BPE that
reproduces sentencepiece's ids exactly (tests/test_tokenizer.py):
  - normalizer: prepend "▁" (sentencepiece's dummy prefix), then every " " -> "▁"; no pre-tokenizer
  - model: BPE over the sentencepiece pieces; merges ranked by the score of the merged piece (the order
    sentencepiece's BPE applies them), byte fallback (<0x00>..<0xFF>) for characters outside the vocab
  - post-processor: "<s> $A" (sentencepiece's add_bos); decoder: "▁" -> " ", bytes fused, prefix stripped
Building takes about a second; the result is cached as tokenizer.json under $MOE_TRAIN_CACHE
(default ~/.cache/moe-train), keyed by the model file's hash. `save_pretrained(dir)` writes files that
`AutoTokenizer.from_pretrained(dir)` loads back with the same ids (that is how HF exports ship it).
Like every HF tokenizer it reads a literal "<s>" or "</s>" in the text as a control token unless called
with split_special_tokens=True (sentencepiece never does); data.indexed.tokenize_files passes it.
"""

import hashlib
import os
from pathlib import Path

SPECIAL = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def mistral_v1_model_file() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def cache_dir() -> Path:
    return Path(os.environ.get("MOE_TRAIN_CACHE", Path.home() / ".cache" / "moe-train"))


def build_bpe_from_sentencepiece(model_file: Path):
    """A `tokenizers.Tokenizer` equal to the sentencepiece BPE model in `model_file`."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    score = {piece: sp.get_score(i) for piece, i in vocab.items()}
    mergeable = [p for p, i in vocab.items() if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    merges = [(piece, piece[:k], piece[k:]) for piece in mergeable for k in range(1, len(piece))
              if piece[:k] in vocab and piece[k:] in vocab]
    # sentencepiece merges the pair whose merged piece scores highest first: rank merges that way. Its
    # whitespace pieces ("▁" x 1..16) all score -1e9; sentencepiece breaks such ties by taking the leftmost
    # pair, which grows whitespace runs greedily from the left: ranking the longer piece first does the same.
    merges.sort(key=lambda m: (-score[m[0]], -len(m[0]), vocab[m[1]], vocab[m[2]]))
    bpe = models.BPE(vocab=vocab, merges=[(a, b) for _, a, b in merges], unk_token="<unk>",
                     fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    bos = sp.id_to_piece(sp.bos_id())
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())])
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                            for i in (sp.unk_id(), sp.bos_id(), sp.eos_id())])
    return tok


def mistral_v1():
    from transformers import PreTrainedTokenizerFast

    model_file = mistral_v1_model_file()
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()[:16]
    cached = cache_dir() / "tokenizers" / f"mistral-v1-{digest}" / "tokenizer.json"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"tokenizer.json.tmp.{os.getpid()}")
        build_bpe_from_sentencepiece(model_file).save(str(tmp))
        os.replace(tmp, cached)  # atomic: ranks building at the same time never read half a file
    return PreTrainedTokenizerFast(tokenizer_file=str(cached), name_or_path="mistral-v1",
                                   clean_up_tokenization_spaces=False, **SPECIAL)


def load_tokenizer(spec: str = "mistral-v1"):
    """"mistral-v1" (the Mixtral 8x7B tokenizer) or a folder with a saved HF tokenizer; returns a
    transformers fast tokenizer (`PreTrainedTokenizerFast`)."""
    if spec == "mistral-v1":
        return mistral_v1()
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"tokenizer {spec!r}: not 'mistral-v1' and no such folder "
                                f"(expected a folder written by save_pretrained)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)
