"""The premises and select stages end to end through the CLI, on a generated Metamath database."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, read_metrics, run_cli


def chain_database(n: int = 60) -> str:
    """Axioms ax-1, ax-mp and n theorems; theorem i cites ax-1, ax-mp and theorem i // 2 (when it exists)."""
    consts = " ".join(f"c{i}" for i in range(n))
    lines = [f"$c ( ) -> wff |- {consts} $.", "$v ph ps $.", "wph $f wff ph $.", "wps $f wff ps $.",
             "wi $a wff ( ph -> ps ) $.", "ax-1 $a |- ( ph -> ( ps -> ph ) ) $.",
             "${ mp.1 $e |- ph $. mp.2 $e |- ( ph -> ps ) $. ax-mp $a |- ps $. $}"]
    for i in range(n):
        cited = f" th{i // 2}" if i else ""
        lines.append(f"th{i} $p |- ( ph -> ( c{i} -> c{i // 2} ) ) $= wph wps ax-1{cited} ax-mp $.")
    return "\n".join(lines) + "\n"


def test_premises_and_select_stages(tmp_path):
    database = tmp_path / "chain.mm"
    database.write_text(chain_database())
    run = tmp_path / "run"
    run_cli("recipes/premise_selection.yaml", f"run_dir={run}", f"premises.database={database}",
            "premises.valid_fraction=0.1", "premises.bm25_tune_queries=5", "select.steps=3",
            "select.micro_batch_size=4", "select.global_batch_size=4", "select.extra_negatives=2",
            "select.warmup_steps=1", "select.log_every=1", "select.eval_batch_size=16", "logging.progress=false",
            "stages=[premises,select,export]", "export.checkpoint=${select.output}", "export.dtype=fp32")
    counts = json.loads((run / "premises" / "counts.json").read_text())
    # 2 axioms + 60 theorems are premises; theorem 0 cites 2, the others 3; the last ceil(6) held out
    assert (counts["corpus"], counts["train"], counts["valid"]) == (62, 54, 6)
    assert counts["train_pairs"] == 2 + 53 * 3
    bm25 = json.loads((run / "premises" / "bm25.json").read_text())
    assert 0 <= bm25["recall@32"] <= 1 and bm25["queries"] == 6
    rows = read_metrics(run / "select")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    evaluated = [r for r in rows if "eval/recall@32" in r]
    assert evaluated and evaluated[-1]["eval/queries"] == 6
    assert (run / "select" / "DONE").is_file()
    check_export_and_retrieve(run)


def check_export_and_retrieve(run):
    """The exported encoder in transformers gives the cosine `trainer.retrieve` reports for its top hit."""
    from transformers import AutoModel, AutoTokenizer

    statement = "|- ( ph -> ( c59 -> c29 ) )"
    proc = subprocess.run([sys.executable, "-m", "trainer.retrieve", str(run / "select"), statement, "-k", "3",
                           "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
    hits = json.loads(proc.stdout.splitlines()[-1])
    assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    corpus = {r["label"]: r["text"] for r in map(json.loads, (run / "premises" / "corpus.jsonl").read_text().splitlines())}
    hf, tokenizer = AutoModel.from_pretrained(run / "hf"), AutoTokenizer.from_pretrained(run / "hf")

    def embed(text):
        ids = tokenizer(text, truncation=True, max_length=64, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return torch.nn.functional.normalize(hf(ids).last_hidden_state.mean(1)[0], dim=0)
    assert float(embed(statement) @ embed(corpus[hits[0]["label"]])) == pytest.approx(hits[0]["score"], abs=1e-4)


def test_bad_database_is_one_error_line(tmp_path):
    database = tmp_path / "bad.mm"
    database.write_text("$c |- $.\nx $a |- A $.\ny $p |- A $= x nope $.\n")
    proc = run_cli("recipes/premise_selection.yaml", f"run_dir={tmp_path / 'run'}", f"premises.database={database}",
                   "stages=[premises]", check=False)
    assert proc.returncode == 2
    assert f"error: {database}:3: token 'nope'" in proc.stderr
