"""The Mixtral tokenizer (data/tokenizer.py) against sentencepiece itself, the reference implementation."""

import json
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from data.tokenizer import load_tokenizer, mistral_v1_model_file

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "Hello world",
    "",
    " ",
    "a  b   c    d     e",
    "x" + " " * 40 + "y",  # runs longer than the longest whitespace piece (16)
    "\n",
    "line one\nline two\n\n\n   indented\n\ttabbed\r\nwindows",
    "   leading and trailing   ",
    "1234567890 3.14159 2024-01-31 1,000,000",
    "日本語のテキストと中文字符，한국어",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧 ok",
    "ﬁ ligature, Ⅻ numeral, café, naïve, Zürich",
    "control chars \x00\x07 and a zero-width\u200bspace",
    "<s> and </s> and <unk> typed as text",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "FIRST WITCH.\nWhen shall we three meet again?\nIn thunder, lightning, or in rain?",
] + [" " * n + "z" for n in range(1, 36)]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("mistral-v1")


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(mistral_v1_model_file()))


@pytest.fixture(scope="module")
def plays():
    lines = (ROOT / "data/corpus/shakespeare.jsonl").read_text().splitlines()[:2]
    return [json.loads(line)["text"] for line in lines]


def test_vocabulary_and_special_tokens(tok):
    assert len(tok) == tok.vocab_size == 32000
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 258]) == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]


def test_ids_equal_sentencepiece(tok, sp, plays):
    texts = TEXTS + plays
    # literal "<s>" in text is text, as in sentencepiece, once special-token parsing is off
    ours = tok(texts, split_special_tokens=True)["input_ids"]
    for text, ids, ref in zip(texts, ours, sp.encode(texts)):
        assert ids == [sp.bos_id()] + ref, repr(text[:80])


def test_decode_round_trips(tok, plays):
    for text in TEXTS + plays:
        ids = tok(text, split_special_tokens=True).input_ids
        assert tok.decode(ids, skip_special_tokens=True) == text, repr(text[:80])


def test_save_pretrained_reloads_with_same_ids(tok, plays, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    for reloaded in (AutoTokenizer.from_pretrained(tmp_path / "tok"), load_tokenizer(str(tmp_path / "tok"))):
        assert len(reloaded) == 32000 and reloaded.eos_token_id == 2
        texts = TEXTS + [plays[0][:5000]]
        assert reloaded(texts, split_special_tokens=True)["input_ids"] == \
            tok(texts, split_special_tokens=True)["input_ids"]


def test_built_tokenizer_is_cached(monkeypatch, tmp_path, tok):
    monkeypatch.setenv("MOE_TRAIN_CACHE", str(tmp_path))
    first = load_tokenizer("mistral-v1")
    cached = list(tmp_path.glob("tokenizers/mistral-v1-*/tokenizer.json"))
    assert len(cached) == 1
    assert load_tokenizer("mistral-v1")(TEXTS).input_ids == first(TEXTS).input_ids == tok(TEXTS).input_ids


def test_missing_tokenizer_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no/such/tokenizer"):
        load_tokenizer(str(tmp_path / "no/such/tokenizer"))
