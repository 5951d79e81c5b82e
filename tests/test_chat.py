"""SFT chat data: tokens equal mistral-common's encoding of the whole conversation, the loss mask covers
exactly the assistant answers (+ </s>), packing keeps conversations apart, bad records name file:line."""

import itertools
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from data.chat import (
    Conversation,
    encode_conversation,
    instruct_tokenizer,
    load_conversations,
    pack_conversations,
    split_train_valid,
)
from data.readers import DataError

INSTRUCT = Path(__file__).parent.parent / "data" / "instruct"
SAMPLE = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Peru?"},
    {"role": "assistant", "content": "Lima."},
    {"role": "user", "content": "What is 7 x 8?"},
    {"role": "assistant", "content": "7 x 8 = 56."},
]

# mistral-common 1.13.1, tokenizer.model.v1: '<s>' '▁[' 'INST' ']' '▁You' ... '<0x0A>' 'What' .. '</s>'
PINNED_IDS = [
    1, 733, 16289, 28793, 995, 460, 264, 3078, 864, 13892, 28723, 13, 13, 3195, 349, 272, 5565, 302, 4843,
    28804, 733, 28748, 16289, 28793, 415, 5565, 302, 4843, 349, 5465, 28723, 2, 733, 16289, 28793, 1015, 302,
    28230, 28804, 733, 28748, 16289, 28793, 393, 4250, 28723, 2, 733, 16289, 28793, 1824, 349, 28705, 28787,
    1318, 28705, 28783, 28804, 733, 28748, 16289, 28793, 28705, 28787, 1318, 28705, 28783, 327, 28705, 28782,
    28784, 28723, 2]


def mistral_common_v1(mode: str):
    """mistral-common's own v1 tokenizer, loaded here independently of data.chat."""
    import mistral_common
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    return MistralTokenizer.from_file(str(path), mode=ValidationMode(mode))


def test_tokens_equal_mistral_common_whole_conversation():
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    conv = encode_conversation(SAMPLE, instruct_tokenizer())
    reference = mistral_common_v1("finetuning").encode_chat_completion(
        ChatCompletionRequest(messages=SAMPLE))
    assert conv.tokens == reference.tokens
    # the Mixtral-Instruct v1 layout; mistral-common 1.13.1 puts the system prompt before the FIRST user turn
    assert reference.text == (
        "<s>▁[INST]▁You▁are▁a▁concise▁assistant.<0x0A><0x0A>What▁is▁the▁capital▁of▁France?▁[/INST]"
        "▁The▁capital▁of▁France▁is▁Paris.</s>▁[INST]▁And▁of▁Peru?▁[/INST]▁Lima.</s>"
        "▁[INST]▁What▁is▁7▁x▁8?▁[/INST]▁7▁x▁8▁=▁56.</s>")
    assert conv.tokens == PINNED_IDS and len(conv.mask) == len(PINNED_IDS)


def test_mask_covers_exactly_the_assistant_answers():
    tok = instruct_tokenizer()
    conv = encode_conversation(SAMPLE, tok)
    spans, start = [], None  # maximal runs of masked tokens
    for i, m in enumerate(conv.mask + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    print("\nmasked spans:")
    for a, b in spans:
        print(f"  [{a}:{b}] {tok.decode(conv.tokens[a:b])!r} + </s>")
    answers = [m["content"] for m in SAMPLE if m["role"] == "assistant"]
    assert [tok.decode(conv.tokens[a:b - 1]) for a, b in spans] == answers
    assert all(conv.tokens[b - 1] == 2 for _, b in spans)  # each span closes with </s>
    # and the unmasked spans are exactly the prompts
    gaps = [(0, spans[0][0])] + [(spans[k][1], spans[k + 1][0]) for k in range(len(spans) - 1)]
    assert [tok.decode(conv.tokens[a:b]) for a, b in gaps] == [
        "[INST] You are a concise assistant.\n\nWhat is the capital of France? [/INST]",
        "[INST] And of Peru? [/INST]", "[INST] What is 7 x 8? [/INST]"]
    assert spans[-1][1] == len(conv.tokens)


def test_shipped_chat_set():
    convs, skipped = load_conversations(INSTRUCT / "chat.jsonl")
    assert len(convs) == 2000 and skipped == []
    assert all(c.mask[-1] and c.tokens[-1] == 2 and not c.mask[0] for c in convs)
    assert sum(len(c.tokens) for c in convs) < 150_000
    assert (INSTRUCT / "chat.jsonl").stat().st_size < 1_000_000


def test_held_out_questions_are_new_combinations_of_taught_facts():
    """eval.jsonl asks every held-out question in a phrasing chat.jsonl never pairs with that fact, while
    chat.jsonl teaches each of those answers (under other phrasings): answering needs more than recall."""
    import json

    def turns(path):
        for line in path.read_text().splitlines():
            messages = json.loads(line)["messages"]
            yield from ((q["content"], a["content"]) for q, a in zip(messages, messages[1:])
                        if q["role"] == "user" and a["role"] == "assistant")

    taught = set(turns(INSTRUCT / "chat.jsonl"))
    asked = [json.loads(line)["messages"] for line in (INSTRUCT / "eval.jsonl").read_text().splitlines()]
    questions, answers = {q for q, _ in taught}, {a for _, a in taught}
    assert len(asked) == 100
    for messages in asked:
        question, answer = messages[-2]["content"], messages[-1]["content"]
        assert question not in questions and answer in answers, messages


def test_packed_rows_give_each_conversation_its_own_logits_in_transformers(tmp_path):
    """A model on packed rows (position ids restarting per conversation) computes, for every conversation,
    the logits transformers' Mixtral computes on that conversation alone: no attention across
    conversations, positions restarting at 0. And the labels are the next tokens inside each one."""
    from transformers import MixtralForCausalLM

    from model import Mixtral, model_config
    from model.hf import export_hf

    convs, _ = load_conversations(INSTRUCT / "chat.jsonl")
    packed = pack_conversations(convs[:12], 256)
    cfg = model_config("debug")
    model = Mixtral(cfg)
    model.init_weights(0)
    export_hf(model.state_dict(), cfg, tmp_path, dtype=torch.float32)
    hf = MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        ours, _ = model(packed.tokens[:1], packed.position_ids[:1])
        pieces = segments(packed, 0)
        assert len(pieces) >= 3
        for a, b in pieces:
            alone = hf(packed.tokens[0, a:b][None]).logits[0]
            torch.testing.assert_close(ours[0, a:b], alone, rtol=1e-5, atol=1e-5)
            labels, inputs = packed.labels[0, a:b - 1], packed.tokens[0, a + 1:b]
            assert ((labels == -100) | (labels == inputs)).all()


BAD_CHAT = {  # line -> expected message fragment
    2: "not valid JSON", 3: "expected a JSON object", 4: "no field 'messages'", 5: "unknown role 'bot'",
    6: "empty assistant turn", 7: "no assistant turn", 8: "messages[1]: wrong alternation",
    9: "messages[0]: wrong alternation", 10: "must end with role 'assistant'", 11: "content must be a string",
    12: "messages[2]: wrong alternation",
}


def test_bad_records_name_file_and_line(tmp_path):
    path = INSTRUCT / "fixtures" / "bad_chat.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    for lineno, fragment in BAD_CHAT.items():
        one = tmp_path / f"line{lineno}.jsonl"
        one.write_bytes(b"\n" * (lineno - 1) + lines[lineno - 1])  # same line number, alone
        with pytest.raises(DataError, match=f"line{lineno}.jsonl:{lineno}: .*{re.escape(fragment)}"):
            load_conversations(one)
    with pytest.raises(DataError, match=f"{path}:2: not valid JSON"):  # the whole file stops at the first
        load_conversations(path)
    convs, skipped = load_conversations(path, skip_bad=True)
    assert [c.where for c in convs] == [f"{path}:1", f"{path}:14"]  # line 13 is blank
    assert len(skipped) == len(BAD_CHAT) == 11
    assert all(f"{path}:{n}:" in msg for n, msg in zip(BAD_CHAT, skipped))


def conv(n_tokens: int, answer_from: int, tag: int) -> Conversation:
    """A synthetic conversation: tokens tag*1000 + i, answer = positions answer_from.. (ending the list)."""
    return Conversation([tag * 1000 + i for i in range(n_tokens)],
                        [i >= answer_from for i in range(n_tokens)], f"synthetic{tag}")


def segments(packed, r):
    """The conversations of row r, cut where position_ids restart: [(start, end)]."""
    starts = (packed.position_ids[r] == 0).nonzero().flatten().tolist() + [packed.tokens.shape[1]]
    return list(itertools.pairwise(starts))


def test_packing_keeps_conversations_apart_and_respects_seq_len():
    convs, _ = load_conversations(INSTRUCT / "chat.jsonl")
    convs = convs[:60]
    seq_len = 128
    packed = pack_conversations(convs, seq_len)
    assert packed.tokens.shape == packed.labels.shape == packed.position_ids.shape
    assert packed.tokens.shape[1] == seq_len and packed.truncated == packed.dropped == 0
    found = Counter()
    for r in range(len(packed.tokens)):
        for a, b in segments(packed, r):
            tokens = packed.tokens[r, a:b].tolist()
            assert packed.position_ids[r, a:b].tolist() == list(range(b - a))
            if tokens[0] != 1:  # padding: no <s>, no labels
                assert (packed.labels[r, a:b] == -100).all() and b == seq_len
                continue
            match = [c for c in convs if c.tokens[:-1] == tokens]
            assert match, "a segment is not one conversation's tokens"
            c = match[0]
            expect = [t if m else -100 for t, m in zip(c.tokens[1:], c.mask[1:])]
            assert packed.labels[r, a:b].tolist() == expect  # labels never point into another conversation
            found[tuple(c.tokens)] += 1
    assert found == Counter(tuple(c.tokens) for c in convs)  # every conversation once
    # the labelled positions are exactly the answer tokens (after the first): same count
    assert int((packed.labels != -100).sum()) == sum(sum(c.mask) for c in convs)
    assert packed.tokens.dtype == packed.labels.dtype == packed.position_ids.dtype == torch.int64


def test_packing_truncation_rule():
    seq_len = 16
    long_ok = conv(30, 10, 1)  # cut to 17 tokens: answer tokens 10..16 survive
    long_lost = conv(30, 20, 2)  # the answer starts after the cut: dropped
    exact = conv(17, 5, 3)  # seq_len + 1 tokens: fits uncut
    packed = pack_conversations([long_ok, long_lost, exact], seq_len)
    assert (packed.truncated, packed.dropped) == (1, 1)
    assert packed.tokens.shape == (2, seq_len)
    assert packed.tokens[0].tolist() == long_ok.tokens[:16]
    assert packed.labels[0].tolist() == [-100] * 9 + long_ok.tokens[10:17]
    assert packed.tokens[1].tolist() == exact.tokens[:16] and packed.labels[1, -1] == exact.tokens[16]


def test_packing_first_fit_fills_gaps_and_pads():
    packed = pack_conversations([conv(9, 4, 1), conv(9, 4, 2), conv(5, 2, 3)], seq_len=12, pad_id=7)
    # 8 positions each: the first two need two rows; the third (4) fills row 0 exactly
    assert packed.tokens[0].tolist() == [1000 + i for i in range(8)] + [3000 + i for i in range(4)]
    assert packed.tokens[1].tolist() == [2000 + i for i in range(8)] + [7] * 4
    assert packed.position_ids[1].tolist() == list(range(8)) + list(range(4))
    assert (packed.labels[1, 8:] == -100).all()


def test_split_train_valid_is_seeded_and_by_conversation():
    items = list(range(100))
    train, valid = split_train_valid(items, 0.1, seed=3)
    assert len(valid) == 10 and sorted(train + valid) == items and not set(train) & set(valid)
    assert (train, valid) == split_train_valid(items, 0.1, seed=3)
    assert valid != split_train_valid(items, 0.1, seed=4)[1]
    assert len(split_train_valid(items[:5], 0.01, seed=0)[1]) == 1  # at least one when asked for some
    assert split_train_valid(items, 0.0, seed=0) == (items, [])
    with pytest.raises(ValueError):
        split_train_valid(items, 1.0, seed=0)
