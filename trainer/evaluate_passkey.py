"""Passkey retrieval (Mohtashami & Jaggi 2023, the test of the Mixtral paper's Figure 4): a 5-digit number
hidden at a chosen depth in repeated filler text, asked for at the end.

    <s> There is an important info hidden ... there. | filler x n_before | The pass key is 40213. Remember
    it. 40213 is the pass key. | filler x n_after | What is the pass key? The pass key is | 40213

A prompt of `length` tokens holds as many filler sentences as fit (n_before + n_after); depth d puts
round(d * n) of them before the key (0: right after the instructions, 1: right before the question).
Each piece is encoded alone and the token lists are concatenated, so the key's tokens are the same in
every prompt. The model answers right when greedy decoding yields the key's tokens: that holds exactly
when, fed the prompt and the key (teacher forcing), the arg-max at every answer position is the next key
token, so one forward pass per prompt decides it (lowest id on ties, as torch.argmax).
"""

from typing import Callable

import numpy as np
import torch

INSTRUCTIONS = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens), len(prompt) + len(answer) <= length, filled up to it."""
    head = [tokenizer.bos_token_id] + encode(tokenizer, INSTRUCTIONS)
    needle, question, answer = (encode(tokenizer, KEY.format(key=key)), encode(tokenizer, QUESTION),
                                encode(tokenizer, str(key)))
    filler = encode(tokenizer, FILLER)
    fixed = len(head) + len(needle) + len(question) + len(answer)
    fillers = (length - fixed) // len(filler)
    if fillers < 1:
        raise ValueError(f"passkey length {length}: too short, a prompt needs at least {fixed + len(filler)} "
                         "tokens")
    before = round(depth * fillers)
    prompt = head + filler * before + needle + filler * (fillers - before) + question
    return prompt, answer


def passkey_grid(logits_at: Callable, tokenizer, lengths: list[int], depths: list[float], trials: int,
                 seed: int = 0, batch_size: int = 4) -> dict:
    """Accuracy of every (length, depth) cell over `trials` random keys.

    logits_at(tokens (B, T), at (B, n)) -> logits (B, n, V) at positions `at` (the model's next-token
    prediction after each of them). Returns {"lengths", "depths", "accuracy": [[depth][length]],
    "trials"}."""
    accuracy = np.zeros((len(depths), len(lengths)))
    for j, length in enumerate(lengths):
        for i, depth in enumerate(depths):
            rng = np.random.default_rng([seed, length, i])
            keys = rng.integers(10_000, 100_000, size=trials).tolist()
            cases = [passkey_prompt(tokenizer, length, depth, k) for k in keys]
            right = 0
            for start in range(0, trials, batch_size):
                right += sum(answers_right(logits_at, cases[start:start + batch_size]))
            accuracy[i, j] = right / trials
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "accuracy": accuracy.tolist()}


def answers_right(logits_at: Callable, cases: list[tuple[list[int], list[int]]]) -> list[bool]:
    """Whether greedy decoding after each prompt yields its answer. Rows are right-padded: the padding
    comes after every position read, so causal attention never sees it."""
    rows = [prompt + answer for prompt, answer in cases]
    width, n = max(map(len, rows)), len(cases[0][1])
    tokens = torch.zeros((len(rows), width), dtype=torch.long)
    at = torch.zeros((len(rows), n), dtype=torch.long)
    for r, (row, (prompt, answer)) in enumerate(zip(rows, cases)):
        tokens[r, :len(row)] = torch.tensor(row)
        at[r] = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(answer))
    predicted = logits_at(tokens, at).argmax(-1).cpu()
    return [predicted[r].tolist() == answer for r, (_, answer) in enumerate(cases)]
