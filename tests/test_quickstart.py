"""The README's quickstart recipe end to end (shortened): tokenize, pretrain the tiny preset with a held-out
document, export, load the export with transformers and generate, evaluate."""

import ast
import json
import re

import torch

from conftest import read_metrics, run_cli


def greedy_with_our_model(checkpoint, prompt_ids: list[int], new_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding by the project's own single-device model read straight from the checkpoint:
    an independent path to the sample that the export prints through transformers."""
    from omegaconf import OmegaConf

    from model import Mixtral, ModelConfig
    from trainer.checkpoint import CheckpointReader

    reader = CheckpointReader(checkpoint)
    model = Mixtral(ModelConfig(**OmegaConf.to_container(OmegaConf.load(checkpoint / "config.yaml").model)))
    model.load_state_dict({n: reader.read(f"model/{n}") for n in reader.names("model")})
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits, _ = model.eval()(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
            if ids[-1] == eos_id:  # transformers' generate stops there too
                break
    return ids[len(prompt_ids):]


def test_quickstart_learns_beyond_unigram_and_exports(tmp_path):
    from data.indexed import IndexedDataset, unigram_entropy
    from data.tokenizer import load_tokenizer
    from trainer.checkpoint import latest_checkpoint

    args = ("recipes/quickstart.yaml", f"run_dir={tmp_path}", "pretrain.steps=100", "logging.progress=false")
    proc = run_cli(*args, timeout=900)
    entropy = unigram_entropy(IndexedDataset(str(tmp_path / "data/corpus")))
    metrics = read_metrics(tmp_path / "pretrain")
    final = [m for m in metrics if "loss" in m][-1]
    assert final["step"] == 100
    assert final["loss"] < entropy - 0.3, (final["loss"], entropy)
    # a play never trained on (other characters' names): a unigram model would score about the entropy
    held_out = [m for m in metrics if "eval/loss" in m][-1]
    assert held_out["step"] == 100 and held_out["eval/loss"] < entropy - 0.1, (held_out, entropy)
    for marker in ("data/corpus.idx.DONE", "pretrain/DONE", "hf/DONE"):
        assert (tmp_path / marker).is_file(), marker
    assert (tmp_path / "hf/model.safetensors.index.json").is_file()

    sample = re.search(r"\[export\] sample: (.+)", proc.stdout)
    assert sample, proc.stdout[-2000:]
    tok = load_tokenizer("mistral-v1")
    prompt = tok("ROMEO:").input_ids
    ours = greedy_with_our_model(latest_checkpoint(tmp_path / "pretrain/checkpoints"), prompt, 40, tok.eos_token_id)
    assert ast.literal_eval(sample.group(1)) == tok.decode(ours, skip_special_tokens=True)

    # the evaluate stage: the held-out play (as in pretraining's eval/loss), code and arithmetic, each
    # with routing shares over the 8 experts, and the passkey grid; figures beside eval.json
    report = json.loads((tmp_path / "eval/eval.json").read_text())
    assert set(report["corpora"]) == {"plays", "code", "math"}
    plays = report["corpora"]["plays"]
    assert plays["tokens"] == 4096 and abs(plays["loss"] - held_out["eval/loss"]) < 0.5, (plays, held_out)
    for corpus in report["corpora"].values():
        for layer in corpus["routing"].values():
            assert len(layer["share"]) == 8 and abs(sum(layer["share"]) - 1) < 1e-6
    grid = report["passkey"]["accuracy"]
    assert len(grid) == len(report["passkey"]["depths"]) and all(len(r) == len(report["passkey"]["lengths"]) for r in grid)
    for figure in ("perplexity", "expert_shares", "repeat_first", "repeat_any", "passkey"):
        assert (tmp_path / f"eval/{figure}.png").is_file(), figure

    rerun = run_cli(*args)
    assert rerun.stdout.count("already done") == 4
