"""Generation-based evaluation: greedy answers to held-out chat prompts, scored by exact match.

Prompts come from chat data (data.chat's jsonl): in each conversation the last assistant answer is the
reference and everything before it the prompt. An answer matches when it equals the reference after
`normalize` (lower case, punctuation dropped, whitespace collapsed). The SFT and DPO stages log
`eval/exact_match` and write this rank's answers to <output>/answers.jsonl (one line per prompt, with
the step); `python -m trainer.evaluate_generation` scores any Hugging Face export the same way.

Generation runs on the training model as it is sharded (any tp / sp / ep / dp layout), not on a gathered
copy: Mixtral 8x7B's bf16 weights alone are 93 GB, more than an 80 GB GPU holds next to its share of the
training state, while the sharded forward costs nothing beyond its activations. Prompts are dealt over
the data-parallel ranks like the other held-out metrics; every rank runs the same number of forward
passes (the expert all-to-all and the tp collectives need all of them). Rows are left-padded: the
padding is a document of its own (positions 0, 1, ...), so the prompt starts at position 0 and never
attends to it. No KV cache: each new token re-runs the forward over the whole row, O(n^2) in the answer
length, cheap for answers of tens of tokens; the greedy token is the arg-max over the vocabulary-sharded
logits (lowest id on ties, as torch.argmax).
"""

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from data.chat import load_conversations
from parallel.cross_entropy import vocab_parallel_argmax

from . import distributed as D

PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    return " ".join(PUNCTUATION.sub(" ", text.lower()).split())


def exact_match(answer: str, reference: str) -> bool:
    return normalize(answer) == normalize(reference)


@dataclass
class Prompt:
    tokens: list[int]  # the conversation up to its last answer: <s> ... [/INST]
    reference: list[int]  # the last answer's tokens, without </s>


def prompts_of(conversations) -> list[Prompt]:
    """The last answer of each data.chat.Conversation (its last run of masked tokens) as the reference."""
    prompts = []
    for conv in conversations:
        end = len(conv.mask)
        start = end - 1
        while start > 0 and conv.mask[start - 1]:
            start -= 1
        prompts.append(Prompt(conv.tokens[:start], conv.tokens[start:end - 1]))
    return prompts


def load_prompts(path, tokenizer, limit: int = 0) -> list[Prompt]:
    prompts = prompts_of(load_conversations(path, tokenizer)[0])
    return prompts[:limit] if limit else prompts


def answer_eval_for(scfg, tokenizer, held_out=()) -> "AnswerEval":
    """A training stage's answer evaluation: scfg.eval_prompts is None (none), a chat jsonl, or
    "held_out" (the stage's own held-out conversations, `held_out`), capped at eval_prompts_limit."""
    if scfg.eval_prompts is None:
        prompts = []
    elif scfg.eval_prompts == "held_out":
        prompts = prompts_of(held_out)[:scfg.eval_prompts_limit or None]
    else:
        prompts = load_prompts(scfg.eval_prompts, tokenizer, scfg.eval_prompts_limit)
    return AnswerEval(prompts, tokenizer, scfg.eval_max_new_tokens, scfg.micro_batch_size, scfg.output)


def left_padded(rows: list[list[int]], multiple: int, pad_id: int = 0):
    """(tokens, position_ids) (B, T), T a multiple of `multiple`; the padding is a document of its own."""
    width = -(-max(map(len, rows)) // multiple) * multiple
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        pad = width - len(row)
        tokens[r, pad:] = torch.tensor(row)
        positions[r, :pad], positions[r, pad:] = torch.arange(pad), torch.arange(len(row))
    return tokens, positions


def last_logits(model, tokens, positions, sp: bool) -> torch.Tensor:
    """(B, V/tp) logits of each row's last position. The LM head runs on that position only, except under
    sequence parallelism, where the hidden states are split over the sequence and the head gathers them."""
    if sp:
        return model(tokens, positions)[0][:, -1]
    module = getattr(model, "module", model)  # the model inside a DeepSpeed engine
    hidden, _ = module.hidden(tokens, positions)
    return module.output(hidden[:, -1:])[:, 0]


@torch.no_grad()
def generate(model, prompts: list[list[int]], layout, max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy answers (without the closing </s>) to `prompts` by the (sharded) model; every rank of the
    world calls it, each with its own prompts, the same number of times."""
    answers, done = [[] for _ in prompts], [False] * len(prompts)
    tp_group = layout.tp_group if layout.tp > 1 else None
    for _ in range(max_new_tokens):
        if not D.all_reduce_max(float(not all(done))):
            break
        rows = [p + a for p, a in zip(prompts, answers)]
        tokens, positions = left_padded(rows, layout.tp if layout.sp else 1)
        logits = last_logits(model, tokens.to(D.device()), positions.to(D.device()), layout.sp)
        for r, token in enumerate(vocab_parallel_argmax(logits, tp_group).tolist()):
            done[r] = done[r] or token == eos_id
            if not done[r]:
                answers[r].append(token)
    return answers


class AnswerEval:
    """eval/exact_match of greedy answers to `prompts`, this rank's answers appended to answers.jsonl."""

    def __init__(self, prompts: list[Prompt], tokenizer, max_new_tokens: int, batch_size: int, output):
        self.prompts, self.tokenizer = prompts, tokenizer
        self.eos_id = tokenizer.instruct_tokenizer.tokenizer.eos_id
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.path = Path(output) / "answers.jsonl"

    def __call__(self, model, layout, step: int) -> dict:
        from .tasks import eval_batches, sum_over_dp

        decode = self.tokenizer.decode
        matches, records = 0, []
        for indices in eval_batches(len(self.prompts), self.batch_size, layout):
            batch = [self.prompts[0 if i is None else i] for i in indices]
            answers = generate(model, [p.tokens for p in batch], layout, self.max_new_tokens, self.eos_id)
            for i, prompt, answer in zip(indices, batch, answers):
                if i is None:
                    continue
                text, reference = decode(answer), decode(prompt.reference)
                match = exact_match(text, reference)
                matches += match
                records.append({"step": step, "prompt": decode(prompt.tokens), "reference": reference,
                                "answer": text, "match": match})
        matches, = sum_over_dp([float(matches)], layout)
        if layout.dp_rank == 0 and layout.tp_rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if D.is_main() and records:
            print(f"[eval] step {step}: exact match {matches / len(self.prompts):.3f}; "
                  f"{records[0]['prompt']!r} -> {records[0]['answer']!r}", flush=True)
        return {"eval/exact_match": matches / len(self.prompts)}
