"""The data pipeline: readers' input checks, the indexed dataset, the packed stream (seeds, document
positions, data-parallel sharding, exact resume). References: the tokenizer's own per-document output,
hand-computed header bytes and entropies, and the documents themselves (every packed row must be cut
from the documents it claims to come from)."""

import json
import math
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.indexed import IndexedDataset, tokenize_files, unigram_entropy, write_indexed
from data.readers import DataError, check_inputs, iter_texts
from data.stream import PackedStream
from data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("mistral-v1")


@pytest.fixture(scope="module")
def scenes() -> list[str]:
    """Documents of very different lengths (about 10 to 2000 tokens): the first scenes of Macbeth."""
    macbeth = json.loads((ROOT / "data/corpus/shakespeare.jsonl").open().readline())["text"]
    return [s for s in macbeth.split("\n\n\n") if s.strip()][:9]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[IndexedDataset, list[list[int]]]:
    """40 documents <s> c c c ... </s> of 1 to 600 content tokens whose ids are unique over the corpus:
    every token of a packed row tells which document it came from and at which index."""
    lengths = np.random.default_rng(0).integers(1, 600, 40)
    lengths[:5] = [1, 2, 3, 30, 31]
    docs, next_id = [], EOS + 1
    for n in lengths:
        docs.append([BOS, *range(next_id, next_id + n), EOS])
        next_id += n
    prefix = str(tmp_path_factory.mktemp("synthetic") / "docs")
    write_indexed(prefix, docs, vocab_size=next_id)
    return IndexedDataset(prefix), docs


@pytest.fixture(scope="module")
def dataset(synthetic) -> IndexedDataset:
    return synthetic[0]


def reference_ids(tok, text: str) -> list[int]:
    return [BOS] + tok(text, add_special_tokens=False, split_special_tokens=True).input_ids + [EOS]


# ---------------------------------------------------------------- readers and the indexed dataset

def test_every_input_kind_round_trips_exact_token_ids(tmp_path, tok, scenes):
    import datasets

    (tmp_path / "one.txt").write_text(scenes[0])
    (tmp_path / "two.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in scenes[1:4]) + "\n\n")
    pq.write_table(pa.table({"text": scenes[4:7], "n": [4, 5, 6]}), tmp_path / "three.parquet")
    datasets.Dataset.from_dict({"text": scenes[7:9]}).save_to_disk(str(tmp_path / "four"))
    edge_cases = ["", "   ", "typed <s> and </s> are text\n", "日本 😀 🎉"]
    (tmp_path / "five.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in edge_cases))
    (tmp_path / "six.txt").write_bytes(b"windows\r\nlines\r\n")  # read exactly, no newline translation
    inputs = [str(tmp_path / name) for name in ("one.txt", "two.jsonl", "three.parquet", "four", "five.jsonl",
                                                 "six.txt")]
    texts = scenes[:9] + edge_cases + ["windows\r\nlines\r\n"]
    assert [t for p in inputs for t in iter_texts(p)] == texts
    assert check_inputs(inputs, "text") == len(texts)

    stats = tokenize_files(inputs, str(tmp_path / "ds"), tok, batch_chars=5000)  # several tokenizer batches
    ds = IndexedDataset(str(tmp_path / "ds"))
    expected = [reference_ids(tok, t) for t in texts]
    assert len(ds) == stats["documents"] == len(texts)
    assert ds.num_tokens == stats["tokens"] == sum(map(len, expected))
    assert ds.tokens.dtype == np.uint16
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids
    assert ds[-1].tolist() == expected[-1]
    assert EOS not in ds[len(texts) - 3].tolist()[:-1]  # "</s>" typed in a text is not end-of-document
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ds")) == ["ds.bin", "ds.idx"]


def test_index_layout_is_megatron_mmidx(tmp_path):
    docs = [[5, 6, 7], [8], [9, 10]]
    write_indexed(str(tmp_path / "d"), docs, vocab_size=100)
    idx = (tmp_path / "d.idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<QBQQ", idx, 9) == (1, 8, 3, 4)  # version, uint16 code, sequences, docs + 1
    assert np.frombuffer(idx, np.int32, 3, 34).tolist() == [3, 1, 2]  # lengths
    assert np.frombuffer(idx, np.int64, 3, 46).tolist() == [0, 6, 8]  # byte pointers
    assert np.frombuffer(idx, np.int64, 4, 70).tolist() == [0, 1, 2, 3]  # document indices
    assert len(idx) == 102
    assert (tmp_path / "d.bin").read_bytes() == np.array([5, 6, 7, 8, 9, 10], np.uint16).tobytes()


def test_large_vocabulary_uses_int32(tmp_path):
    docs = [np.array([0, 70000, 123456]), np.array([65535, 65536])]
    write_indexed(str(tmp_path / "d"), docs, vocab_size=200_000)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert ds.tokens.dtype == np.int32 and [ds[i].tolist() for i in range(2)] == [d.tolist() for d in docs]
    with pytest.raises(DataError, match=r"document 1 has token id 65536 outside \[0, 65536\)"):
        write_indexed(str(tmp_path / "e"), [[0, 65535], [65535, 65536]], vocab_size=65536)


def test_failed_write_leaves_previous_dataset_intact(tmp_path):
    write_indexed(str(tmp_path / "d"), [[1, 2, 3]], vocab_size=10)

    def broken():
        yield [1, 2]
        raise RuntimeError("tokenizer crashed")

    with pytest.raises(RuntimeError):
        write_indexed(str(tmp_path / "d"), broken(), vocab_size=10)
    assert IndexedDataset(str(tmp_path / "d"))[0].tolist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]


def test_corrupt_index_or_bin_is_named(tmp_path):
    prefix = str(tmp_path / "d")
    write_indexed(prefix, [[1, 2, 3], [4, 5]], vocab_size=10)
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    good_idx, good_bin = idx.read_bytes(), bin_.read_bytes()

    idx.write_bytes(good_idx[:-8])
    with pytest.raises(DataError, match=r"d\.idx: truncated"):
        IndexedDataset(prefix)
    idx.write_bytes(b"NOTANIDX!" + good_idx[9:])
    with pytest.raises(DataError, match=r"d\.idx: not an indexed-dataset index"):
        IndexedDataset(prefix)
    idx.write_bytes(good_idx[:5])
    with pytest.raises(DataError, match=r"d\.idx"):
        IndexedDataset(prefix)
    idx.write_bytes(good_idx)
    bin_.write_bytes(good_bin[:-2])
    with pytest.raises(DataError, match=r"d\.bin: 8 bytes, but .*d\.idx describes 5 tokens"):
        IndexedDataset(prefix)
    bin_.unlink()
    with pytest.raises(DataError, match=r"d\.bin: no such file"):
        IndexedDataset(prefix)


def test_unigram_entropy_by_hand(tmp_path):
    write_indexed(str(tmp_path / "d"), [[1, 7], [1, 9]], vocab_size=10)  # p = 1/2, 1/4, 1/4
    assert unigram_entropy(IndexedDataset(str(tmp_path / "d"))) == pytest.approx(1.5 * math.log(2))
    assert unigram_entropy(IndexedDataset(str(tmp_path / "d")), chunk=3) == pytest.approx(1.5 * math.log(2))


def bad_input_cases(tmp_path):
    """(file name, content writer, expected message pattern)"""
    good = json.dumps({"text": "fine"})
    return [
        ("missing.jsonl", None, r"missing\.jsonl: no such file"),
        ("table.csv", "text\nhello\n", r"table\.csv: unsupported file type '\.csv'"),
        ("broken.jsonl", f"{good}\n{good}\n{{'text': 'single quotes'}}\n", r"broken\.jsonl:3: not valid JSON"),
        ("list.jsonl", f"{good}\n[1, 2]\n", r"list\.jsonl:2: expected a JSON object, got list"),
        ("nofield.jsonl", f"{good}\n\n{json.dumps({'body': 'x'})}\n",
         r"nofield\.jsonl:3: record has no field 'text' \(fields: 'body'\)"),
        ("number.jsonl", f"{json.dumps({'text': 42})}\n", r"number\.jsonl:1: field 'text' must be a string, got int"),
        ("null.jsonl", f"{good}\n{json.dumps({'text': None})}\n",
         r"null\.jsonl:2: field 'text' must be a string, got NoneType"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), r"latin1\.txt: not UTF-8"),
        ("latin1.jsonl", f"{good}\n".encode() + '{"text": "caf\xe9"}\n'.encode("latin-1"),
         r"latin1\.jsonl:2: not UTF-8"),
        ("nocolumn.parquet", pa.table({"body": ["x"]}), r"nocolumn\.parquet: no column 'text' \(columns: 'body'\)"),
        ("ints.parquet", pa.table({"text": [1, 2]}), r"ints\.parquet: column 'text' must hold strings, got int64"),
        ("nulls.parquet", pa.table({"text": ["a", "b", None]}), r"nulls\.parquet: row 2: column 'text' is null"),
    ]


def test_bad_inputs_name_file_line_and_field(tmp_path, tok):
    for name, content, pattern in bad_input_cases(tmp_path):
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            pq.write_table(content, path)
        with pytest.raises(DataError, match=pattern):
            check_inputs([str(path)], "text")
        # tokenize_files checks everything before writing anything
        good = tmp_path / "good.jsonl"
        good.write_text(json.dumps({"text": "fine"}) + "\n")
        with pytest.raises(DataError, match=pattern):
            tokenize_files([str(good), str(path)], str(tmp_path / "out"), tok)
        assert not list(tmp_path.glob("out*"))
    with pytest.raises(DataError, match="no input files"):
        check_inputs([], "text")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder: a folder, but not a dataset"):
        check_inputs([str(tmp_path / "folder")], "text")


# ---------------------------------------------------------------- the packed stream

def batches(stream, n):
    return [stream.next_batch() for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("tokens", "labels", "position_ids"))


def test_batch_shapes_and_labels(dataset):
    batch = PackedStream(dataset, seq_len=32, micro_batch_size=4, seed=0).next_batch()
    for key in ("tokens", "labels", "position_ids"):
        assert batch[key].shape == (4, 32) and batch[key].dtype == torch.int64
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])


def test_same_seed_same_stream_other_seed_other_stream(dataset):
    a = batches(PackedStream(dataset, 32, 4, seed=1), 120)  # 480 rows: crosses an epoch (325 rows)
    assert same(a, batches(PackedStream(dataset, 32, 4, seed=1), 120))
    assert not torch.equal(a[0]["tokens"], PackedStream(dataset, 32, 4, seed=2).next_batch()["tokens"])


def test_rows_are_documents_packed_back_to_back(synthetic):
    """One epoch of rows: consecutive tokens are consecutive in one document or </s> then <s>; position
    ids restart exactly at <s> and at the row start and equal the index in the document otherwise; the
    epoch's inputs hold every content token at most once and miss fewer than seq_len of them."""
    ds, docs = synthetic
    where = {tok: (d, i) for d, doc in enumerate(docs) for i, tok in enumerate(doc) if tok > EOS}
    seq_len = 32
    stream = PackedStream(ds, seq_len, micro_batch_size=1, seed=3)
    seen = []
    for _ in range((ds.num_tokens - 1) // seq_len):
        batch = stream.next_batch()
        tokens, labels, pos = (batch[k][0].tolist() for k in ("tokens", "labels", "position_ids"))
        row = tokens + labels[-1:]
        assert labels == row[1:]  # next token, kept across documents (never -100)
        seen += [t for t in tokens if t > EOS]
        for t in range(seq_len):
            a, b = row[t], row[t + 1]
            if a == EOS:
                assert b == BOS
            elif a == BOS:
                assert where[b][1] == 1
            elif b == EOS:
                assert where[a][1] == len(docs[where[a][0]]) - 2
            else:
                assert where[b] == (where[a][0], where[a][1] + 1)
            restart = t == 0 or a == BOS
            assert pos[t] == (0 if restart else pos[t - 1] + 1)
            if a > EOS:
                assert pos[t] == min(where[a][1], t)  # index in the document unless it began before the row
            if a == EOS and t > 0:
                d = where[row[t - 1]][0] if row[t - 1] > EOS else None
                assert d is None or pos[t] == min(len(docs[d]) - 1, t)  # known document length
    content = sum(len(d) - 2 for d in docs)
    assert len(seen) == len(set(seen)) > content - seq_len


def test_data_parallel_ranks_split_the_single_rank_stream(dataset):
    single = batches(PackedStream(dataset, 32, micro_batch_size=6, seed=4), 80)  # crosses an epoch
    for dp in (2, 3):
        ranks = [batches(PackedStream(dataset, 32, 6 // dp, seed=4, dp_rank=r, dp_size=dp), 80) for r in range(dp)]
        for step, whole in enumerate(single):
            for key in whole:
                for r in range(dp):
                    assert torch.equal(ranks[r][step][key], whole[key][r::dp])


def test_accumulation_groups_equal_data_parallel_ranks(dataset):
    """One rank accumulating 2 micro-batches sees the micro-batches of 2 ranks, in rank order."""
    single = PackedStream(dataset, 32, micro_batch_size=3, seed=4, accumulation=2)
    ranks = [PackedStream(dataset, 32, 3, seed=4, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(70):  # crosses an epoch
        for r in range(2):
            assert same([single.next_batch()], [ranks[r].next_batch()])


def test_resume_continues_exactly(dataset):
    stream = PackedStream(dataset, 32, 4, seed=5)
    batches(stream, 60)  # mid-way through the first epoch (325 rows)
    state = json.loads(json.dumps(stream.state_dict()))
    assert state["rows_consumed"] == 240 and state["epoch"] == 0
    expected = batches(stream, 30)  # crosses into the next epoch

    resumed = PackedStream(dataset, 32, 4, seed=5)
    resumed.load_state_dict(state)
    assert same(batches(resumed, 30), expected)

    # elastic: the same global rows continue on 2 ranks with half the micro-batch each
    ranks = [PackedStream(dataset, 32, 2, seed=5, dp_rank=r, dp_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for whole in expected:
        parts = [r.next_batch()["tokens"] for r in ranks]
        assert torch.equal(whole["tokens"][0::2], parts[0]) and torch.equal(whole["tokens"][1::2], parts[1])

    with pytest.raises(DataError, match="seed is 5 in the checkpoint but 6 now"):
        PackedStream(dataset, 32, 4, seed=6).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len is 32 in the checkpoint but 64 now"):
        PackedStream(dataset, 64, 4, seed=5).load_state_dict(state)


def test_stream_rejects_too_small_dataset(tmp_path):
    write_indexed(str(tmp_path / "d"), [[1, 5, 2]], vocab_size=10)
    with pytest.raises(DataError, match="3 tokens, fewer than one row of seq_len \\+ 1 = 4"):
        PackedStream(IndexedDataset(str(tmp_path / "d")), 3, 1, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        PackedStream(IndexedDataset(str(tmp_path / "d")), 2, 1, seed=0, dp_rank=2, dp_size=2)
