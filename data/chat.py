"""SFT chat data: jsonl conversations -> Mistral instruct tokens + loss mask -> packed rows.

Input: one JSON object per line, {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
(other keys ignored; blank lines skipped). A conversation is
    system* user assistant (user assistant)*
i.e. optional system messages first, then strictly alternating user/assistant turns, ending with an
assistant turn; every content a non-empty string. Anything else raises `DataError` naming file:line
and the message index (`skip_bad=True`: the record is skipped and its error returned instead).

Encoding: mistral-common's instruct tokenizer does all of it (`instruct_tokenizer("mistral-v1")` is
`MistralTokenizer.from_file(mistral_common/data/tokenizer.model.v1)`, the format of
Mixtral-8x7B-Instruct-v0.1); nothing here re-implements the template. For v1 in mistral-common 1.13.1:
    <s>[INST] {system}\n\n{user_1} [/INST] {assistant_1}</s>[INST] {user_2} [/INST] {assistant_2}</s>
(the system prompt is prepended to the FIRST user message). The mask is True exactly on the tokens of
every assistant answer and its closing </s>: assistant turn i spans
    [len(encode(messages[:i])), len(encode(messages[:i + 1])))
of encode(messages); each prefix encoding is checked to be a prefix of the whole encoding.

Packing (`pack_conversations`): a conversation of L tokens fills L - 1 consecutive positions of a row of
seq_len positions: tokens = t[:-1], labels = t[1:] where the mask of t[1:] is True, else -100,
position_ids = 0 .. L - 2 (restarting at 0 at each conversation, so attention never crosses
conversations; the model derives its document mask from them). First-fit in the given order (shuffle
before packing); the rest of a row is padding: token pad_id, label -100, position_ids 0, 1, ... (a
document of its own). No label ever points into another conversation.
Truncation: a conversation longer than seq_len + 1 tokens is cut at the right to its first seq_len + 1
tokens (the first turns are kept; an answer cut in the middle keeps its first tokens and loses its
</s>) and counted in `truncated`; if the cut leaves no answer token among the labels it is dropped and
counted in `dropped` instead.
"""

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .readers import DataError

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100


@lru_cache(maxsize=4)
def instruct_tokenizer(spec: str = "mistral-v1"):
    """mistral-common `MistralTokenizer` for "mistral-v1" (mistral_common/data/tokenizer.model.v1, the
    Mixtral 8x7B Instruct tokenizer), a tokenizer file (tokenizer.model.v*, tekken*.json), or a folder
    holding tokenizer.model (a Hugging Face Mixtral download). Validation mode "agnostic": a request may
    end with a user or an assistant message."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    if spec == "mistral-v1":
        import mistral_common

        path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"instruct tokenizer {spec!r}: not 'mistral-v1', a tokenizer file, or a "
                                    f"folder with tokenizer.model")
    return MistralTokenizer.from_file(str(path), mode=ValidationMode.agnostic)


def as_instruct_tokenizer(tokenizer):
    """A MistralTokenizer as is; a spec (str or Path) through instruct_tokenizer."""
    return instruct_tokenizer(str(tokenizer)) if isinstance(tokenizer, (str, Path)) else tokenizer


@dataclass
class Conversation:
    tokens: list[int]  # mistral-common's encoding of the whole conversation, <s> first
    mask: list[bool]  # True on assistant answer tokens and their </s>
    where: str  # "file:line"


def check_messages(messages, where: str, last_role: str = "assistant") -> list[tuple[str, str]]:
    """[(role, content)] of a validated message list: system* then user/assistant alternating from user,
    ending with `last_role`. Raises DataError naming `where` and the message index."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages, "
                        f"got {type(messages).__name__ if messages != [] else 'an empty list'}")
    checked = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{k}] must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{where}: messages[{k}]: unknown role {role!r} "
                            f"(expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{k}] ({role}): content must be a string, "
                            f"got {type(content).__name__}")
        if not content.strip():
            raise DataError(f"{where}: messages[{k}]: empty {role} turn")
        checked.append((role, content))
    roles = [r for r, _ in checked]
    if last_role == "assistant" and "assistant" not in roles:
        raise DataError(f"{where}: no assistant turn (nothing to learn from)")
    first = next((k for k, r in enumerate(roles) if r != "system"), len(roles))
    turns = roles[first:]
    for k, role in enumerate(turns):
        expected = ("user", "assistant")[k % 2]
        if role != expected:
            raise DataError(f"{where}: messages[{first + k}]: wrong alternation: expected role {expected!r}, "
                            f"got {role!r} (system* then user/assistant alternating from user)")
    if not turns or turns[-1] != last_role:
        raise DataError(f"{where}: wrong alternation: must end with role {last_role!r}, "
                        f"got {turns[-1] if turns else 'system'!r}")
    return checked


def encode_messages(messages: list[tuple[str, str]], tokenizer) -> list[int]:
    """mistral-common's tokens of a (role, content) list: <s>, then its instruct format."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[r](content=c) for r, c in messages])
    return tokenizer.encode_chat_completion(request).tokens


def prefix_length(tokens: list[int], messages, tokenizer, where: str) -> int:
    """len(encode(messages)), checked to be a prefix of `tokens` (true when the format encodes each message
    on its own, as v1 does; a format that moves the system prompt to the last user message is not)."""
    prefix = encode_messages(messages, tokenizer)
    if tokens[:len(prefix)] != prefix:
        raise DataError(f"{where}: the encoding of the first {len(messages)} messages is not a prefix of the "
                        f"whole conversation's: this tokenizer's format cannot be masked per turn")
    return len(prefix)


def encode_conversation(messages, tokenizer, where: str = "conversation") -> Conversation:
    """Validate a raw message list and encode it: tokens and the answer mask (see module docstring)."""
    checked = check_messages(messages, where)
    tokens = encode_messages(checked, tokenizer)
    mask = [False] * len(tokens)
    for i, (role, _) in enumerate(checked):
        if role == "assistant":
            start = prefix_length(tokens, checked[:i], tokenizer, where)
            end = prefix_length(tokens, checked[:i + 1], tokenizer, where)
            mask[start:end] = [True] * (end - start)
    return Conversation(tokens, mask, where)


def json_object(raw: bytes, where: str) -> dict:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {e.start} of the line)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def read_jsonl(paths, convert, skip_bad: bool) -> tuple[list, list[str]]:
    """[convert(record, "file:line")] over the non-blank lines of every file, and the errors of the records
    skipped (only with skip_bad; otherwise the first DataError propagates)."""
    items, skipped = [], []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        if not Path(path).is_file():
            raise DataError(f"{path}: no such file")
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    items.append(convert(json_object(raw, where), where))
                except DataError as e:
                    if not skip_bad:
                        raise
                    skipped.append(str(e))
    return items, skipped


def load_conversations(paths, tokenizer="mistral-v1", skip_bad: bool = False):
    """(conversations, skipped error messages) of one jsonl file or a list of them."""
    tok = as_instruct_tokenizer(tokenizer)

    def convert(record, where):
        if "messages" not in record:
            raise DataError(f"{where}: record has no field 'messages' "
                            f"(fields: {', '.join(map(repr, record)) or 'none'})")
        return encode_conversation(record["messages"], tok, where)

    return read_jsonl(paths, convert, skip_bad)


def split_train_valid(items: list, valid_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split by whole items (conversations, pairs): round(valid_fraction * n) items, at least one when
    valid_fraction > 0, go to valid; both keep the input order."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    n = len(items)
    n_valid = max(1, round(valid_fraction * n)) if valid_fraction > 0 else 0
    if n_valid >= n and n_valid:
        raise DataError(f"valid_fraction={valid_fraction} of {n} items leaves nothing to train on")
    is_valid = np.zeros(n, dtype=bool)
    is_valid[np.random.default_rng(seed).permutation(n)[:n_valid]] = True
    return [x for x, v in zip(items, is_valid) if not v], [x for x, v in zip(items, is_valid) if v]


@dataclass
class PackedChat:
    tokens: torch.Tensor  # (R, seq_len) int64
    labels: torch.Tensor  # (R, seq_len) int64, -100 on prompts, padding and conversation ends
    position_ids: torch.Tensor  # (R, seq_len) int64, 0 at every conversation (and padding) start
    truncated: int  # conversations cut to seq_len + 1 tokens
    dropped: int  # conversations whose cut left no answer token


def pack_conversations(conversations: list[Conversation], seq_len: int, pad_id: int = 0) -> PackedChat:
    """First-fit packing into rows of seq_len positions (see module docstring)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    rows, free, truncated, dropped = [], np.zeros(0, dtype=np.int64), 0, 0
    for conv in conversations:
        tokens, mask = conv.tokens, conv.mask
        if len(tokens) > seq_len + 1:
            tokens, mask = tokens[:seq_len + 1], mask[:seq_len + 1]
            if not any(mask[1:]):
                dropped += 1
                continue
            truncated += 1
        need = len(tokens) - 1
        fits = np.flatnonzero(free >= need)
        if len(fits):
            r = int(fits[0])
        else:
            r, free = len(rows), np.append(free, seq_len)
            rows.append([])
        rows[r].append((tokens, mask))
        free[r] -= need
    shape = (len(rows), seq_len)
    out_tokens, out_labels = np.full(shape, pad_id, np.int64), np.full(shape, IGNORE_INDEX, np.int64)
    out_positions = np.zeros(shape, np.int64)
    for r, row in enumerate(rows):
        at = 0
        for tokens, mask in row:
            n = len(tokens) - 1
            out_tokens[r, at:at + n] = tokens[:-1]
            out_labels[r, at:at + n] = np.where(mask[1:], tokens[1:], IGNORE_INDEX)
            out_positions[r, at:at + n] = np.arange(n)
            at += n
        out_positions[r, at:] = np.arange(seq_len - at)
    return PackedChat(torch.from_numpy(out_tokens), torch.from_numpy(out_labels),
                      torch.from_numpy(out_positions), truncated, dropped)
