"""The README's quickstart recipe end to end (shortened): tokenize, pretrain the tiny preset, export,
load the export with transformers and generate."""

import re

from conftest import read_metrics, run_cli


def test_quickstart_learns_beyond_unigram_and_exports(tmp_path):
    from data.indexed import IndexedDataset, unigram_entropy

    proc = run_cli("recipes/quickstart.yaml", f"run_dir={tmp_path}", "pretrain.steps=100",
                   "logging.progress=false", timeout=900)
    entropy = unigram_entropy(IndexedDataset(str(tmp_path / "data/corpus")))
    final = read_metrics(tmp_path / "pretrain")[-1]
    assert final["step"] == 100
    assert final["loss"] < entropy - 0.3, (final["loss"], entropy)
    assert (tmp_path / "hf/model.safetensors.index.json").is_file()
    sample = re.search(r"\[export\] sample: (.+)", proc.stdout)
    assert sample and len(sample.group(1)) > 10, proc.stdout[-2000:]
    for stage in ("pretrain", "hf"):
        assert (tmp_path / stage / "DONE").exists() or stage == "hf"
    rerun = run_cli("recipes/quickstart.yaml", f"run_dir={tmp_path}", "pretrain.steps=100",
                    "logging.progress=false")
    assert rerun.stdout.count("already done") == 3
