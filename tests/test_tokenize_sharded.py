"""Sharded, multi-process tokenization (data/encode.py, data/sharded.py) and the inputs people have
(data/readers.py): merged shards byte-identical to one process's tokenize_files, the same shards for any
number of workers, compressed / folder / `datasets` inputs with exact ids, truncated files named, and
the tokenize stage (workers, shards) feeding pretraining, after the layout is checked. References: the
tokenizer's own per-document output and the bytes of the single-process file."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, read_metrics, run_cli

from data.indexed import IndexedDataset, tokenize_files
from data.readers import DataError, iter_texts
from data.sharded import ShardedDataset, merge_shards, open_dataset, tokenize_sharded
from data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("mistral-v1")


@pytest.fixture(scope="module")
def scenes() -> list[str]:
    """100 documents of tens to thousands of tokens: the scenes of the first six shipped plays."""
    lines = (ROOT / "data/corpus/shakespeare.jsonl").read_text().splitlines()[:6]
    return [s for line in lines for s in json.loads(line)["text"].split("\n\n\n") if s.strip()]


def reference_ids(tok, text: str) -> list[int]:
    return [tok.bos_token_id] + tok(text, add_special_tokens=False, split_special_tokens=True).input_ids + [
        tok.eos_token_id]


def write_jsonl(path: Path, texts: list[str], opener=open) -> str:
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return str(path)


def files_of(folder: Path, stem: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(stem))


def test_merged_shards_are_the_single_process_file(tmp_path, tok, scenes):
    inputs = [write_jsonl(tmp_path / "a.jsonl", scenes[:60]), write_jsonl(tmp_path / "b.jsonl", scenes[60:])]
    single = tokenize_files(inputs, str(tmp_path / "single"), tok, num_workers=1)
    two = tokenize_sharded(inputs, str(tmp_path / "two"), tok, num_workers=2, shard_tokens=30_000,
                           batch_chars=20_000)
    assert len(two["shards"]) >= 4 and (two["documents"], two["tokens"]) == (single["documents"], single["tokens"])
    for shard in two["shards"][:-1]:  # a shard closes at the first document that brings it to 30k tokens
        ds = IndexedDataset(str(tmp_path / shard["prefix"]))  # each shard is a Megatron indexed dataset
        assert ds.num_tokens >= 30_000 > ds.num_tokens - len(ds[len(ds) - 1])
    merge_shards(str(tmp_path / "two"), str(tmp_path / "merged"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"merged{suffix}").read_bytes() == (tmp_path / f"single{suffix}").read_bytes()
    sharded = open_dataset(str(tmp_path / "two"))
    assert isinstance(sharded, ShardedDataset) and sharded.tokenizer["vocab_size"] == 32000
    for i in (0, 57, len(scenes) - 1):
        assert sharded[i].tolist() == reference_ids(tok, scenes[i])
    one = tokenize_sharded(inputs, str(tmp_path / "one"), tok, num_workers=1, shard_tokens=30_000)
    assert one["shards"] == [dict(s, prefix=s["prefix"].replace("two", "one")) for s in two["shards"]]


def test_one_shard_is_the_plain_pair_and_reruns_leave_no_stale_shards(tmp_path, tok, scenes):
    inputs = [write_jsonl(tmp_path / "in.jsonl", scenes[:60])]
    prefix = str(tmp_path / "c")
    tokenize_sharded(inputs, prefix, tok, num_workers=1)
    assert files_of(tmp_path, "c") == ["c.bin", "c.idx", "c.manifest.json"]
    assert len(IndexedDataset(prefix)) == len(open_dataset(prefix)) == 60
    many = tokenize_sharded(inputs, prefix, tok, num_workers=1, shard_tokens=5_000)
    assert files_of(tmp_path, "c") == sorted([f"c_{i:05d}{s}" for i in range(len(many["shards"]))
                                             for s in (".bin", ".idx")] + ["c.manifest.json"])
    fewer = tokenize_sharded(inputs, prefix, tok, num_workers=1, shard_tokens=12_000)
    assert 1 < len(fewer["shards"]) < len(many["shards"])
    assert len(files_of(tmp_path, "c")) == 2 * len(fewer["shards"]) + 1
    assert len(open_dataset(prefix)) == 60


def test_every_input_kind_gives_the_tokenizers_ids(tmp_path, tok, scenes, monkeypatch):
    import datasets
    import zstandard

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    texts = scenes[:12]
    gz = write_jsonl(tmp_path / "a.jsonl.gz", texts[0:2], gzip.open)
    frames = [zstandard.ZstdCompressor().compress("".join(json.dumps({"text": t}) + "\n" for t in part).encode())
              for part in (texts[2:3], texts[3:4])]
    (tmp_path / "b.jsonl.zst").write_bytes(b"".join(frames))  # two frames, as zstd -c a b > ab.zst writes
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "sub" / "2.jsonl", texts[5:6])
    (folder / "1.txt").write_text(texts[4])
    (folder / "README.md").write_text("not a document")
    datasets.Dataset.from_dict({"text": texts[6:8]}).save_to_disk(str(tmp_path / "saved"))
    data_file = write_jsonl(tmp_path / "hub.jsonl", texts[8:10])
    streamed = write_jsonl(tmp_path / "stream.jsonl", texts[10:12])
    inputs = [gz, str(tmp_path / "b.jsonl.zst"), str(folder), str(tmp_path / "saved"),
              {"dataset": "json", "data_files": data_file, "split": "train"},
              {"dataset": "json", "data_files": [streamed], "streaming": True}]
    assert [t for item in inputs for t in iter_texts(item)] == texts
    stats = tokenize_sharded(inputs, str(tmp_path / "all"), tok, num_workers=1, shard_tokens=3_000)
    ds = open_dataset(str(tmp_path / "all"))
    assert stats["documents"] == len(ds) == len(texts)
    assert [ds[i].tolist() for i in range(len(ds))] == [reference_ids(tok, t) for t in texts]


def test_truncated_compressed_inputs_are_named_and_nothing_is_written(tmp_path, tok, scenes):
    import zstandard

    good = write_jsonl(tmp_path / "good.jsonl", scenes[:2])
    whole = "".join(json.dumps({"text": t}) + "\n" for t in scenes[:20]).encode()
    gz, zst = gzip.compress(whole), zstandard.ZstdCompressor().compress(whole)
    cases = {"cut.jsonl.gz": (gz[: len(gz) // 2], r"cut\.jsonl\.gz: truncated or corrupt gz"),
             "crc.jsonl.gz": (gz[:-8] + bytes(8), r"crc\.jsonl\.gz: truncated or corrupt gz"),
             "cut.jsonl.zst": (zst[: len(zst) - 5], r"cut\.jsonl\.zst: truncated zst"),
             "head.jsonl.zst": (zst[:3], r"head\.jsonl\.zst: (truncated|corrupt) zst")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=message):
            tokenize_sharded([good, str(tmp_path / name)], str(tmp_path / "out"), tok, num_workers=1)
        assert not files_of(tmp_path, "out")


def test_shard_that_disagrees_with_its_manifest_is_named(tmp_path, tok, scenes):
    from data.indexed import write_indexed

    inputs = [write_jsonl(tmp_path / "in.jsonl", scenes[:40])]
    tokenize_sharded(inputs, str(tmp_path / "c"), tok, num_workers=1, shard_tokens=5_000)
    write_indexed(str(tmp_path / "c_00001"), [[1, 5, 2]], vocab_size=32000)
    with pytest.raises(DataError, match=r"c_00001: 1 documents, 3 tokens, but .*c\.manifest\.json lists"):
        open_dataset(str(tmp_path / "c"))


def test_bad_layout_is_refused_before_tokenizing(tmp_path):
    proc = run_cli("recipes/quickstart.yaml", f"run_dir={tmp_path}", "parallel.tp=3", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: pretrain on 1 process(es): world size (1) is not divisible by parallel.tp (3)"]
    assert not (tmp_path / "data").exists()


def test_tokenize_stage_writes_shards_that_pretraining_reads(tmp_path, scenes):
    """tokenize (a folder of .jsonl.gz, 2 workers, several shards) -> pretrain 2 steps on the manifest."""
    folder = tmp_path / "raw"
    folder.mkdir()
    write_jsonl(folder / "part1.jsonl.gz", scenes[:30], gzip.open)
    write_jsonl(folder / "part2.jsonl.gz", scenes[30:60], gzip.open)
    proc = run_cli("recipes/quickstart.yaml", f"run_dir={tmp_path}", "stages=[tokenize,pretrain]",
                   f"tokenize.inputs=[{folder}]", "tokenize.num_workers=2", "tokenize.shard_tokens=8000",
                   "model.preset=debug", "pretrain.steps=2", "pretrain.seq_len=64", "pretrain.micro_batch_size=2",
                   "pretrain.global_batch_size=2", "pretrain.log_every=1", "pretrain.valid_fraction=0",
                   "logging.progress=false")
    manifest = json.loads((tmp_path / "data/corpus.manifest.json").read_text())
    assert manifest["documents"] == 60 and len(manifest["shards"]) > 1
    assert f"{len(manifest['shards'])} shard(s)" in proc.stdout and "with 2 worker(s)" in proc.stdout
    steps = [m for m in read_metrics(tmp_path / "pretrain") if "loss" in m]
    rows_per_epoch = (manifest["tokens"] - 1) // 64
    assert steps[-1]["epochs/corpus"] == pytest.approx(4 / rows_per_epoch)
    assert np.isfinite(steps[-1]["loss"])
