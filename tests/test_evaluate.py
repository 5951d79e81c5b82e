"""The evaluate stage: routing counts of a hand-set router against a plain loop, the chance rates against
enumeration and the Mixtral paper's Table 5, the passkey harness with models forced to answer right or
wrong, and the CLI on an HF export against transformers' own loss and log-likelihoods (lm-eval)."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT


# ---------------------------------------------------------------- routing

def test_chance_rates_match_enumeration_and_the_paper():
    from trainer.evaluate_routing import chance_repeat_any, chance_repeat_first

    for E, k in [(8, 2), (4, 2), (16, 4), (8, 1)]:
        sets = [set(s) for s in itertools.combinations(range(E), k)]
        shared = sum(bool(a & b) for a in sets for b in sets) / len(sets) ** 2
        assert math.isclose(chance_repeat_any(E, k), shared)
    assert round(100 * chance_repeat_first(8), 1) == 12.5 and round(100 * chance_repeat_any(8, 2)) == 46


def hand_routed_model():
    """A debug Mixtral whose router picks experts by token class c = id % 4: attention and experts write
    nothing (wo = w2 = 0), so every layer routes the token's own embedding e_c. Layer 0 chooses (c, c+1),
    layer 1 (3-c, c+2 if distinct else c+1), first choice first (mod 4)."""
    from model import Mixtral
    from model.config import model_config

    cfg = model_config("debug", vocab_size=64, attention="reference")
    model = Mixtral(cfg)
    model.init_weights(0)
    with torch.no_grad():
        model.tok_embeddings.weight.zero_()
        for v in range(cfg.vocab_size):
            model.tok_embeddings.weight[v, v % 4] = 1.0
        for layer, block in enumerate(model.layers):
            block.attention.wo.weight.zero_()
            block.moe.experts.w2.zero_()
            gate = block.moe.router.gate.weight
            gate.zero_()
            for c in range(4):
                first, second = choices(layer, c)
                gate[first, c], gate[second, c] = 3.0, 2.0
    return model.eval()


def choices(layer: int, c: int) -> tuple[int, int]:
    if layer == 0:
        return c, (c + 1) % 4
    second = (c + 2) % 4
    return 3 - c, second if second != 3 - c else (c + 1) % 4


def test_routing_counts_of_a_hand_set_router():
    from trainer.evaluate_text import evaluate_corpus

    model = hand_routed_model()
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 64, 17), rng.integers(0, 64, 5)]
    result = evaluate_corpus(model, documents, seq_len=8, max_tokens=0, batch_size=2, device="cpu")

    # the windows by hand: inputs 0..7 and 8..15 of the first document, 0..3 of the second
    runs = [documents[0][:8], documents[0][8:16], documents[1][:4]]
    for layer in (0, 1):
        assigned, first, pairs, same_first, same_any = np.zeros(4), np.zeros(4), 0, 0, 0
        for run in runs:
            picks = [choices(layer, int(t) % 4) for t in run]
            for a, b in picks:
                assigned[a] += 1
                assigned[b] += 1
                first[a] += 1
            for x, y in zip(picks, picks[1:]):
                pairs += 1
                same_first += x[0] == y[0]
                same_any += bool(set(x) & set(y))
        got = result["routing"][str(layer)]
        assert got["pairs"] == pairs == 7 + 7 + 3
        np.testing.assert_allclose(got["share"], assigned / assigned.sum())
        np.testing.assert_allclose(got["first_share"], first / first.sum())
        assert math.isclose(got["repeat_first"], same_first / pairs)
        assert math.isclose(got["repeat_any"], same_any / pairs)
        assert math.isclose(got["repeat_first_given_load"], float(((first / first.sum()) ** 2).sum()))

    # the loss: cross entropy of the plain forward over each window
    with torch.no_grad():
        windows = [documents[0][:9], documents[0][8:17], documents[1]]
        losses = [F.cross_entropy(model(torch.tensor(w[None, :-1]))[0][0], torch.tensor(w[1:]), reduction="none")
                  for w in windows]
    assert result["tokens"] == 20
    assert math.isclose(result["loss"], float(torch.cat(losses).mean()), rel_tol=1e-5)
    assert result["by_position"][0] == pytest.approx(
        {"start": 0, "end": 1, "tokens": 3, "loss": float(torch.stack([l[0] for l in losses]).mean())})


# ---------------------------------------------------------------- passkey

def oracle(tokenizer, wrong: bool = False, window: int = None):
    """logits_at of a model that reads the key from its context (the tokens after the first "The pass key
    is" among the last `window` tokens up to the position, causally) and outputs the key's next token;
    wrong: the last token off by one; no key in sight: token 0."""
    from trainer.evaluate_passkey import QUESTION, encode

    intro, question = encode(tokenizer, "The pass key is"), encode(tokenizer, QUESTION)

    def find(seq, pattern):
        return next((i for i in range(len(seq) - len(pattern) + 1) if seq[i:i + len(pattern)] == pattern), None)

    def logits_at(tokens, at):
        out = torch.zeros(*at.shape, len(tokenizer))
        for r in range(len(tokens)):
            for j, p in enumerate(at[r].tolist()):
                seen = tokens[r, :p + 1].tolist()
                asked = max(i for i in range(len(seen)) if seen[i:i + len(question)] == question)
                done = len(seen) - asked - len(question)  # answer tokens already in the context
                visible = seen[max(0, len(seen) - window) if window else 0:asked]
                start = find(visible, intro)
                if start is None:
                    out[r, j, 0] = 1
                    continue
                key = visible[start + len(intro):start + len(intro) + 6]
                target = key[done] + (wrong and done == 5)
                out[r, j, target] = 1
        return out
    return logits_at


def test_passkey_harness_with_forced_models():
    from data.tokenizer import load_tokenizer
    from trainer.evaluate_passkey import passkey_grid, passkey_prompt

    tok = load_tokenizer("mistral-v1")
    for length, depth in [(128, 0.0), (300, 0.5), (1024, 1.0)]:
        prompt, answer = passkey_prompt(tok, length, depth, 31415)
        assert length - 25 < len(prompt) + len(answer) <= length  # a filler sentence is 23 tokens
        assert tok.decode(answer).strip() == "31415" and prompt[0] == tok.bos_token_id
    grid = dict(lengths=[256, 1024], depths=[0.0, 1.0], trials=2, batch_size=2)
    assert passkey_grid(oracle(tok), tok, **grid)["accuracy"] == [[1, 1], [1, 1]]
    assert passkey_grid(oracle(tok, wrong=True), tok, **grid)["accuracy"] == [[0, 0], [0, 0]]
    # a model that sees only its last 300 tokens finds the key at depth 0 in 256 tokens, not in 1024
    assert passkey_grid(oracle(tok, window=300), tok, **grid)["accuracy"] == [[1, 0], [1, 1]]


# ---------------------------------------------------------------- the CLI on an HF export

@pytest.fixture(scope="module")
def hf_export(tmp_path_factory):
    from data.tokenizer import load_tokenizer
    from model import Mixtral, export_hf
    from model.config import model_config

    cfg = model_config("debug", num_layers=2, max_seq_len=256)
    model = Mixtral(cfg)
    model.init_weights(3)
    folder = tmp_path_factory.mktemp("hf") / "export"
    export_hf(model.state_dict(), cfg, folder, tokenizer=load_tokenizer("mistral-v1"), dtype=torch.float32)
    return folder


def test_cli_on_hf_export_against_transformers(hf_export, tmp_path):
    from transformers import MixtralForCausalLM

    from data.tokenizer import load_tokenizer
    from trainer.evaluate import main

    corpus = tmp_path / "lines.txt"
    corpus.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 4)
    out = tmp_path / "eval"
    assert main([str(hf_export), "--out", str(out), "--corpora", f"lines={corpus}", "seq_len=32",
                 "passkey_trials=1", "passkey_lengths=[128]", "passkey_depths=[0.5]"]) == 0
    results = json.loads((out / "eval.json").read_text())
    for figure in ("perplexity", "expert_shares", "repeat_first", "repeat_any", "passkey"):
        assert (out / f"{figure}.png").is_file(), figure

    tok = load_tokenizer("mistral-v1")
    ids = [tok.bos_token_id] + tok(corpus.read_text(), add_special_tokens=False).input_ids + [tok.eos_token_id]
    hf = MixtralForCausalLM.from_pretrained(hf_export, dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 32):
            w = torch.tensor([ids[start:start + 33]])
            losses.append(F.cross_entropy(hf(w[:, :-1]).logits[0], w[0, 1:], reduction="none"))
    assert results["corpora"]["lines"]["tokens"] == len(ids) - 1
    assert math.isclose(results["corpora"]["lines"]["loss"], float(torch.cat(losses).mean()), rel_tol=1e-4)
    assert results["passkey"]["lengths"] == [128] and len(results["passkey"]["accuracy"]) == 1
    assert set(results["corpora"]["lines"]["routing"]) == {"0", "1"}


def test_lm_eval_local_task_against_transformers(hf_export):
    pytest.importorskip("lm_eval")
    from transformers import MixtralForCausalLM

    from data.tokenizer import load_tokenizer
    from trainer.evaluate_lm_eval import run_lm_eval

    results = run_lm_eval(hf_export, ["local_capitals"], ROOT / "data/eval/lm_eval", batch_size=4)
    # the reference: the choice of the highest summed log-likelihood after "question" + " "
    tok = load_tokenizer("mistral-v1")
    hf = MixtralForCausalLM.from_pretrained(hf_export, dtype=torch.float32).eval()
    right = 0
    examples = [json.loads(line) for line in (ROOT / "data/eval/lm_eval/capitals.jsonl").read_text().splitlines()]
    for ex in examples:
        scores = []
        for choice in ex["choices"]:
            context = tok(ex["question"]).input_ids
            whole = tok(ex["question"] + " " + choice).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([whole])).logits[0, :-1], -1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        right += int(np.argmax(scores)) == ex["answer"]
    assert math.isclose(results["local_capitals"]["acc,none"], right / len(examples))
