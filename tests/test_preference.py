"""DPO preference data: the pair shares exactly the prompt tokens (mistral-common's encoding of the prompt),
answers end with </s>, the batch layout puts labels on the answers only, truncation follows its rule,
bad records name file:line."""

import re
from pathlib import Path

import pytest

from data.chat import instruct_tokenizer
from data.preference import Pair, collate_pairs, load_pairs, pair_batches, truncate_pair, truncate_pairs
from data.readers import DataError

INSTRUCT = Path(__file__).parent.parent / "data" / "instruct"


def as_messages(prompt):
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def answer_text(answer):
    if isinstance(answer, list):
        answer = answer[0]
    return answer["content"] if isinstance(answer, dict) else answer


def test_pairs_share_exactly_the_prompt_tokens():
    import json

    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = INSTRUCT / "preference.jsonl"
    pairs, skipped = load_pairs(path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(pairs) == len(records) == 300 and skipped == []
    assert path.stat().st_size < 1_000_000
    assert sum(isinstance(r["prompt"], list) and r["prompt"][0]["role"] == "system" for r in records) > 20
    assert sum(isinstance(r["prompt"], list) and len(r["prompt"]) >= 3 for r in records) > 20  # multi-turn
    serving = MistralTokenizer.v1()  # mistral-common's own v1 instances: whole encodings, no prefix diffs
    tok = MistralTokenizer.from_file(serving.instruct_tokenizer.tokenizer.file_path,
                                     mode=ValidationMode.finetuning)
    for pair, record in list(zip(pairs, records))[::7]:
        prompt = as_messages(record["prompt"])
        expect_prompt = serving.encode_chat_completion(ChatCompletionRequest(messages=prompt)).tokens
        assert pair.prompt == expect_prompt and pair.prompt[-4:] == [733, 28748, 16289, 28793]  # ' [/INST]'
        for answer, tokens in ((record["chosen"], pair.chosen), (record["rejected"], pair.rejected)):
            full = tok.encode_chat_completion(ChatCompletionRequest(
                messages=prompt + [{"role": "assistant", "content": answer_text(answer)}])).tokens
            assert pair.prompt + tokens == full and tokens[-1] == 2
            assert tok.decode(tokens[:-1]) == answer_text(answer)


def test_batch_layout_rows_chosen_then_rejected():
    pairs, _ = load_pairs(INSTRUCT / "preference.jsonl")
    batch = collate_pairs(pairs, [5, 0, 17], pad_id=0)
    B = 3
    width = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) - 1
                for p in (pairs[5], pairs[0], pairs[17]))
    assert batch["tokens"].shape == batch["labels"].shape == batch["position_ids"].shape == (2 * B, width)
    assert batch["pair_index"].tolist() == [5, 0, 17]
    for r in range(2 * B):
        pair = pairs[[5, 0, 17][r % B]]
        answer = pair.chosen if r < B else pair.rejected
        sequence, P, n = pair.prompt + answer, len(pair.prompt), len(pair.prompt) + len(answer) - 1
        assert batch["tokens"][r, :n].tolist() == sequence[:-1]
        assert (batch["tokens"][r, n:] == 0).all()
        labels = batch["labels"][r].tolist()
        assert labels[P - 1:n] == answer  # labels[P - 1 + k] = answer[k]
        assert set(labels[:P - 1] + labels[n:]) <= {-100}
        assert batch["position_ids"][r].tolist() == list(range(n)) + list(range(width - n))
    # the chosen and rejected rows of a pair share the prompt inputs
    P = len(pairs[5].prompt)
    assert batch["tokens"][0, :P].tolist() == batch["tokens"][3, :P].tolist() == pairs[5].prompt


def test_pair_batches_cover_every_pair_once():
    pairs, _ = load_pairs(INSTRUCT / "preference.jsonl")
    seen = [i for b in pair_batches(pairs, 32, shuffle_seed=1) for i in b["pair_index"].tolist()]
    assert sorted(seen) == list(range(300)) and seen != list(range(300))
    assert [b["pair_index"].tolist() for b in pair_batches(pairs, 128)][-1] == list(range(256, 300))
    assert len(list(pair_batches(pairs, 128, drop_last=True))) == 2


def synthetic(prompt_len: int, chosen_len: int, rejected_len: int) -> Pair:
    return Pair([1] + list(range(100, 100 + prompt_len - 1)), list(range(500, 500 + chosen_len)),
                list(range(900, 900 + rejected_len)), "synthetic")


@pytest.mark.parametrize("P, C, R, seq_len, N, expect_prompt, expect_answer", [
    (10, 5, 3, 14, 4, 10, 5),  # P + A = 15 = seq_len + 1: fits, unchanged
    (20, 6, 4, 15, 4, 10, 6),  # prompt cut from the left to seq_len + 1 - A = 10; answers whole
    (20, 30, 4, 15, 4, 4, 12),  # prompt down to N = 4 only; then answers cut to 16 - 4 = 12
    (3, 30, 40, 15, 8, 3, 13),  # prompt shorter than N: kept; answers cut to 13
])
def test_truncation_rule(P, C, R, seq_len, N, expect_prompt, expect_answer):
    pair = synthetic(P, C, R)
    cut = truncate_pair(pair, seq_len, min_prompt_tokens=N)
    assert len(cut.prompt) == expect_prompt
    assert cut.prompt[0] == 1  # <s> kept, then the end of the prompt
    assert cut.prompt[1:] == pair.prompt[len(pair.prompt) - expect_prompt + 1:]
    assert cut.chosen == pair.chosen[:expect_answer] and cut.rejected == pair.rejected[:expect_answer]
    assert len(cut.prompt) + max(len(cut.chosen), len(cut.rejected)) - 1 <= seq_len
    batch = collate_pairs([cut], [0])
    assert batch["tokens"].shape[1] <= seq_len
    assert (batch["labels"] != -100).sum(dim=1).tolist() == [len(cut.chosen), len(cut.rejected)]


def test_truncate_pairs_counts_and_checks():
    pairs = [synthetic(10, 5, 3), synthetic(20, 30, 4)]
    fitted, n_cut = truncate_pairs(pairs, 15, min_prompt_tokens=4)
    assert n_cut == 1 and fitted[0] is pairs[0]
    with pytest.raises(ValueError, match="min_prompt_tokens"):
        truncate_pair(pairs[0], 8, min_prompt_tokens=9)


BAD_PREFERENCE = {  # line -> expected message fragment
    2: "no field 'chosen'", 3: "no field 'rejected'", 4: "'chosen': empty answer",
    5: "prompt: wrong alternation: must end with role 'user'", 6: "prompt: messages[0]: unknown role 'human'",
    7: "exactly one assistant message, got 2", 8: "expected {'role': 'assistant'", 9: "identical",
    10: "'prompt' must be a string or a list", 11: "not valid JSON",
}


def test_bad_records_name_file_and_line(tmp_path):
    path = INSTRUCT / "fixtures" / "bad_preference.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    for lineno, fragment in BAD_PREFERENCE.items():
        one = tmp_path / f"line{lineno}.jsonl"
        one.write_bytes(b"\n" * (lineno - 1) + lines[lineno - 1])
        with pytest.raises(DataError, match=f"line{lineno}.jsonl:{lineno}: .*{re.escape(fragment)}"):
            load_pairs(one)
    pairs, skipped = load_pairs(path, skip_bad=True)
    assert [p.where for p in pairs] == [f"{path}:1", f"{path}:12"]
    assert len(skipped) == len(BAD_PREFERENCE) == 10
    assert all(f"{path}:{n}:" in msg for n, msg in zip(BAD_PREFERENCE, skipped))
    # line 12: a system prompt, chosen as a message, rejected as a one-message list
    assert instruct_tokenizer().decode(pairs[1].prompt) == "[INST] Be kind.\n\nHi [/INST]"
