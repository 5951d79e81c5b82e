"""Exact match of a Hugging Face export's greedy answers to held-out chat prompts (trainer.generation's
scoring, with transformers' own generate and KV cache doing the generation):

    python -m trainer.evaluate_generation runs/instruct_quickstart/hf data/instruct/eval.jsonl

DATA is chat jsonl (data.chat's format); each conversation's last assistant answer is the reference.
The prompts are encoded by mistral-common (--tokenizer: "mistral-v1", a tokenizer file or a folder with
tokenizer.model; default the export's tokenizer.model, else mistral-v1).
"""

import argparse
from pathlib import Path

import torch

from data.chat import instruct_tokenizer

from .generation import exact_match, load_prompts


def evaluate(hf_dir, data, tokenizer=None, limit: int = 0, max_new_tokens: int = 64, batch_size: int = 16):
    """(exact match, [(prompt, reference, answer)]) of the export in `hf_dir` on the prompts of `data`."""
    from transformers import MixtralForCausalLM

    spec = tokenizer or (str(hf_dir) if (Path(hf_dir) / "tokenizer.model").is_file() else "mistral-v1")
    tok = instruct_tokenizer(spec)
    eos_id = tok.instruct_tokenizer.tokenizer.eos_id
    prompts = load_prompts(data, tok, limit)
    model = MixtralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    results = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p.tokens) for p in batch)
        ids = torch.tensor([[eos_id] * (width - len(p.tokens)) + p.tokens for p in batch])
        mask = torch.tensor([[0] * (width - len(p.tokens)) + [1] * len(p.tokens) for p in batch])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos_id, pad_token_id=eos_id)
        for prompt, row in zip(batch, out[:, width:].tolist()):
            answer = row[:row.index(eos_id)] if eos_id in row else row
            results.append((tok.decode(prompt.tokens), tok.decode(prompt.reference), tok.decode(answer)))
    return sum(exact_match(a, r) for _, r, a in results) / len(results), results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate_generation",
                                description=__doc__.splitlines()[0])
    p.add_argument("hf_dir", help="Hugging Face Mixtral folder")
    p.add_argument("data", help="chat jsonl: the last assistant answer of each conversation is the reference")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--limit", type=int, default=0, help="first N prompts (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--samples", type=int, default=3, help="answers to print")
    a = p.parse_args(argv)
    score, results = evaluate(a.hf_dir, a.data, a.tokenizer, a.limit, a.max_new_tokens)
    for prompt, reference, answer in results[:a.samples]:
        print(f"{prompt!r}\n  -> {answer!r} ({'right' if exact_match(answer, reference) else 'wrong'}: "
              f"{reference!r})")
    print(f"exact match {score:.3f} on {len(results)} prompts")


if __name__ == "__main__":
    main()
