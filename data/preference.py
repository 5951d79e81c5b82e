"""DPO preference data: jsonl pairs -> shared prompt tokens + chosen/rejected answer tokens -> paired rows.

Input: one JSON object per line (blank lines skipped, other keys ignored):
    {"prompt": str | [messages], "chosen": answer, "rejected": answer}
  prompt   a string (one user turn) or a message list as in data.chat (system* then user/assistant
           alternating from user) that ends with a user turn: multi-turn prompts and system prompts
  answer   a string, {"role": "assistant", "content": str}, or a list holding exactly that one message
Errors (`DataError` naming file:line, or skipped and returned with `skip_bad=True`): not JSON, a
missing or malformed prompt / chosen / rejected, an unknown role, an empty turn or answer, wrong
alternation, chosen identical to rejected.

Encoding (mistral-common, as data.chat; never a re-implemented template):
    prompt   = encode(prompt messages)                 <s>[INST] ... [/INST]
    chosen   = encode(prompt + [chosen])[len(prompt):]  answer tokens, ending with </s>
    rejected = likewise; both full encodings are checked to start with exactly the prompt tokens.

Truncation (`truncate_pair`): rows hold tokens[:-1] of prompt + answer, so a pair fits seq_len when
P + A <= seq_len + 1 (P prompt tokens, A the longer answer). A pair that does not fit:
  1. loses prompt tokens from the left, just after <s> (kept), down to
         P' = min(P, max(min_prompt_tokens, seq_len + 1 - A))
     (the latest turns are kept; the cut may fall inside an early [INST] block);
  2. then each answer longer than seq_len + 1 - P' is cut at the right to that length (losing </s>).
Both rows of a pair keep the same prompt tokens.

Batch (`collate_pairs`, `pair_batches`), B pairs -> 2B rows [chosen_0 .. chosen_{B-1}, rejected_0 ..
rejected_{B-1}] padded at the right to the longest row of the batch, T positions:
  tokens        (2B, T) int64  (prompt + answer)[:-1], then pad_id
  labels        (2B, T) int64  (prompt + answer)[1:] on answer tokens, -100 on prompt and padding:
                               labels[r, P - 1 + k] = answer[k]
  position_ids  (2B, T) int64  0 .. len - 2, then 0, 1, ... over the padding (a document of its own)
  pair_index    (B,)    int64  index of each pair in the list (to look up precomputed reference log-probs)
Sum the per-token log-probs where labels != -100 (trainer.dpo_loss.sequence_log_probs) and split the rows
with .chunk(2) into chosen and rejected.
"""

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from .chat import IGNORE_INDEX, as_instruct_tokenizer, check_messages, encode_messages, read_jsonl
from .readers import DataError


@dataclass
class Pair:
    prompt: list[int]  # <s>[INST] ... [/INST], shared by both rows
    chosen: list[int]  # answer tokens, ending with </s> unless truncated
    rejected: list[int]
    where: str  # "file:line"


def prompt_messages(value, where: str) -> list[tuple[str, str]]:
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    elif not isinstance(value, list):
        raise DataError(f"{where}: 'prompt' must be a string or a list of messages, "
                        f"got {type(value).__name__}")
    return check_messages(value, f"{where}: prompt", last_role="user")


def answer_content(value, key: str, where: str) -> str:
    if isinstance(value, list):
        if len(value) != 1:
            raise DataError(f"{where}: {key!r}: a list must hold exactly one assistant message, "
                            f"got {len(value)}")
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant" or "content" not in value:
            raise DataError(f"{where}: {key!r}: expected {{'role': 'assistant', 'content': ...}}, "
                            f"got role {value.get('role')!r}")
        value = value["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r}: must be a string or an assistant message, "
                        f"got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {key!r}: empty answer")
    return value


def encode_pair(record: dict, tokenizer, where: str = "pair") -> Pair:
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            raise DataError(f"{where}: record has no field {key!r} "
                            f"(fields: {', '.join(map(repr, record)) or 'none'})")
    prompt = prompt_messages(record["prompt"], where)
    chosen, rejected = (answer_content(record[k], k, where) for k in ("chosen", "rejected"))
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
    prompt_tokens = encode_messages(prompt, tokenizer)
    answers = []
    for answer in (chosen, rejected):
        full = encode_messages(prompt + [("assistant", answer)], tokenizer)
        if full[:len(prompt_tokens)] != prompt_tokens:
            raise DataError(f"{where}: the prompt's tokens are not a prefix of prompt + answer: "
                            f"this tokenizer's format cannot share the prompt")
        answers.append(full[len(prompt_tokens):])
    return Pair(prompt_tokens, answers[0], answers[1], where)


def load_pairs(paths, tokenizer="mistral-v1", skip_bad: bool = False) -> tuple[list[Pair], list[str]]:
    """(pairs, skipped error messages) of one jsonl file or a list of them."""
    tok = as_instruct_tokenizer(tokenizer)
    return read_jsonl(paths, lambda record, where: encode_pair(record, tok, where), skip_bad)


def truncate_pair(pair: Pair, seq_len: int, min_prompt_tokens: int = 64) -> Pair:
    """The pair cut to fit rows of seq_len positions by the rule of the module docstring."""
    if not 1 <= min_prompt_tokens <= seq_len:
        raise ValueError(f"min_prompt_tokens ({min_prompt_tokens}) must be in [1, seq_len={seq_len}]")
    budget = seq_len + 1
    longest = max(len(pair.chosen), len(pair.rejected))
    if len(pair.prompt) + longest <= budget:
        return pair
    keep = min(len(pair.prompt), max(min_prompt_tokens, budget - longest))
    prompt = pair.prompt[:1] + pair.prompt[len(pair.prompt) - keep + 1:]
    room = budget - keep
    return replace(pair, prompt=prompt, chosen=pair.chosen[:room], rejected=pair.rejected[:room])


def truncate_pairs(pairs: list[Pair], seq_len: int, min_prompt_tokens: int = 64) -> tuple[list[Pair], int]:
    """(the pairs, each fitted to seq_len, and how many were cut)."""
    fitted = [truncate_pair(p, seq_len, min_prompt_tokens) for p in pairs]
    return fitted, sum(f is not p for f, p in zip(fitted, pairs))


def collate_pairs(pairs: list[Pair], indices, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The DPO batch of pairs[i] for i in indices (layout in the module docstring)."""
    indices = [int(i) for i in indices]
    rows = [(pairs[i].prompt, pairs[i].chosen) for i in indices] + [(pairs[i].prompt, pairs[i].rejected)
                                                                     for i in indices]
    width = max(len(p) + len(a) - 1 for p, a in rows)
    tokens = np.full((len(rows), width), pad_id, np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, np.int64)
    positions = np.zeros((len(rows), width), np.int64)
    for r, (prompt, answer) in enumerate(rows):
        sequence = prompt + answer
        n = len(sequence) - 1
        tokens[r, :n] = sequence[:-1]
        labels[r, len(prompt) - 1:n] = answer
        positions[r, :n] = np.arange(n)
        positions[r, n:] = np.arange(width - n)
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(positions),
            "pair_index": torch.tensor(indices, dtype=torch.int64)}


def pair_batches(pairs: list[Pair], batch_size: int, shuffle_seed: int | None = None, drop_last: bool = False,
                 pad_id: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over the pairs, batch_size pairs (2 * batch_size rows) at a time, in the given order or a
    permutation seeded by shuffle_seed; the last, smaller batch unless drop_last."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = (np.arange(len(pairs)) if shuffle_seed is None
             else np.random.default_rng(shuffle_seed).permutation(len(pairs)))
    for start in range(0, len(pairs), batch_size):
        indices = order[start:start + batch_size]
        if len(indices) < batch_size and drop_last:
            return
        yield collate_pairs(pairs, indices, pad_id)
