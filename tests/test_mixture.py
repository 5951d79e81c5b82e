"""Weighted pretraining mixtures (data/mixture.py) and the pretraining task over them: token shares
against the weights, determinism, exact resume (also through the trainer's CLI), data-parallel layouts,
held-out splits per source, and bad mixtures refused before any work. References: token ids that name
their source and document, plain counting loops, largest-remainder rounding by hand."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import read_metrics, run_cli

from data.indexed import IndexedDataset, write_indexed
from data.mixture import BLOCK, MixtureStream, block_counts, check_sources, open_sources, parse_mixture
from data.readers import DataError
from data.stream import PackedStream

BOS, EOS = 1, 2
SPAN = 8000  # source k's content token ids lie in [k * SPAN, (k + 1) * SPAN)
SEQ = 16


def write_source(folder, k: int, num_docs: int, seed: int) -> str:
    """num_docs documents <s> c c ... </s> of 3 to 80 content tokens, ids unique over all sources."""
    lengths = np.random.default_rng(seed).integers(3, 80, num_docs)
    starts = k * SPAN + np.concatenate([[10], 10 + np.cumsum(lengths[:-1])])
    docs = [[BOS, *range(s, s + n), EOS] for s, n in zip(starts, lengths)]
    prefix = str(folder / f"source{k}")
    write_indexed(prefix, docs, vocab_size=4 * SPAN)
    return prefix


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("mixture")
    return [write_source(folder, k, n, seed=k) for k, n in enumerate((40, 7, 90))]  # 3 sizes: many epochs


def mixture(prefixes, weights, micro=4, seed=0, dp_rank=0, dp_size=1, accumulation=1) -> MixtureStream:
    streams = [PackedStream(IndexedDataset(p), SEQ, 1, seed) for p in prefixes]
    return MixtureStream(streams, weights, [f"s{k}" for k in range(len(prefixes))], micro, dp_rank, dp_size,
                         accumulation)


def source_of_row(tokens: torch.Tensor) -> int:
    content = tokens[tokens > EOS]
    sources = set((content // SPAN).tolist())
    assert len(sources) == 1, sources  # a row never mixes sources
    return sources.pop()


def batches(stream, n):
    return [stream.next_batch() for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("tokens", "labels", "position_ids"))


def test_block_counts_are_the_largest_remainder_rounding():
    # 5 : 3 : 2 of 65536 = 32768, 19660.8, 13107.2 -> floors 32768, 19660, 13107 (65535): the largest
    # remainder (.8) takes the last row
    assert block_counts([5, 3, 2]).tolist() == [32768, 19661, 13107]
    assert block_counts([1]).tolist() == [BLOCK]
    with pytest.raises(DataError, match="below 1/65536"):
        block_counts([1, 1e-6])


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 1, 6]])
def test_token_shares_and_epochs_follow_the_weights(prefixes, weights):
    """Over 400 steps (3200 rows, tens of epochs of the small sources) each source's share of the tokens
    is its weight's share within 2 rows, in every prefix of the run, and the logged epochs equal the rows
    counted per source over each source's rows per epoch."""
    stream = mixture(prefixes, weights, micro=8)
    share = np.asarray(weights) / np.sum(weights)
    tokens = np.zeros(3)
    for step in range(1, 401):
        batch = stream.next_batch()
        for row in batch["tokens"]:
            tokens[source_of_row(row)] += row.numel()
        rows = step * 8
        assert np.abs(tokens / SEQ - share * rows).max() <= 2, (step, tokens / SEQ, share * rows)
    print("token shares over 3200 rows:", (tokens / tokens.sum()).round(4).tolist(), "weights:", share.tolist())
    per_epoch = [(IndexedDataset(p).num_tokens - 1) // SEQ for p in prefixes]
    assert stream.epochs() == pytest.approx({f"epochs/s{k}": tokens[k] / SEQ / per_epoch[k] for k in range(3)})
    assert stream.epochs()["epochs/s1"] > 10  # the small source went round many times


def test_one_source_is_its_packed_stream(prefixes):
    alone = PackedStream(IndexedDataset(prefixes[0]), SEQ, 4, seed=3)
    assert same(batches(mixture(prefixes[:1], [2.5], seed=3), 60), batches(alone, 60))


def test_deterministic_for_a_seed(prefixes):
    a = batches(mixture(prefixes, [1, 1, 1], seed=1), 50)
    assert same(a, batches(mixture(prefixes, [1, 1, 1], seed=1), 50))
    assert not same(a, batches(mixture(prefixes, [1, 1, 1], seed=2), 50))


def test_data_parallel_layouts_see_the_same_rows(prefixes):
    """dp ranks split the one-process micro-batches; one rank accumulating 2 sees 2 ranks' micro-batches."""
    single = batches(mixture(prefixes, [3, 1, 2], micro=6), 80)
    for dp in (2, 3):
        ranks = [batches(mixture(prefixes, [3, 1, 2], micro=6 // dp, dp_rank=r, dp_size=dp), 80) for r in range(dp)]
        for step, whole in enumerate(single):
            for r in range(dp):
                assert torch.equal(ranks[r][step]["tokens"], whole["tokens"][r::dp])
    accumulating = mixture(prefixes, [3, 1, 2], micro=3, accumulation=2)
    ranks = [mixture(prefixes, [3, 1, 2], micro=3, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(80):
        for r in range(2):
            assert same([accumulating.next_batch()], [ranks[r].next_batch()])


def test_resume_continues_exactly_at_any_layout(prefixes):
    stream = mixture(prefixes, [0.6, 0.1, 0.3])
    batches(stream, 70)
    state = json.loads(json.dumps(stream.state_dict()))  # what a checkpoint stores
    assert state["rows_consumed"] == 280 and state["epochs/s1"] > 1
    expected = batches(stream, 40)
    resumed = mixture(prefixes, [0.6, 0.1, 0.3])
    resumed.load_state_dict(state)
    assert same(batches(resumed, 40), expected)
    ranks = [mixture(prefixes, [0.6, 0.1, 0.3], micro=2, dp_rank=r, dp_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for whole in expected:
        assert all(torch.equal(whole["tokens"][r::2], ranks[r].next_batch()["tokens"]) for r in range(2))
    with pytest.raises(DataError, match="sources is"):
        mixture(prefixes, [0.5, 0.2, 0.3]).load_state_dict(state)  # other weights: other rows
    with pytest.raises(DataError, match="seed is 0 in the checkpoint but 4 now"):
        mixture(prefixes, [0.6, 0.1, 0.3], seed=4).load_state_dict(state)


def pretrain_task(data, valid_fraction=0.2):
    from trainer.tasks import PretrainTask

    scfg = SimpleNamespace(data=data, valid_fraction=valid_fraction, seed=7, seq_len=SEQ, micro_batch_size=4,
                           global_batch_size=4, steps=10, eval_batches=0)
    layout = SimpleNamespace(dp_rank=0, dp=1)
    return PretrainTask(scfg, SimpleNamespace(vocab_size=4 * SPAN), layout)


def test_held_out_documents_of_every_source_are_never_trained_on(prefixes):
    task = pretrain_task([{"path": p, "weight": 1} for p in prefixes])
    assert len(task.valid) == 3
    held_out = set()
    for valid in task.valid:
        for g in range(valid.rows_per_epoch):
            held_out |= set(valid.row(g)[0].tolist())
    held_out -= {BOS, EOS}
    sizes = [len(IndexedDataset(p)) for p in prefixes]
    assert {t // SPAN for t in held_out} == {0, 1, 2}
    trained = set()
    for _ in range(300):  # several epochs of every source
        trained |= set(task.stream.next_batch()["tokens"].flatten().tolist())
    assert not held_out & trained
    # every held-out document is whole: round(0.2 n) documents of each source
    docs = {k: [IndexedDataset(p)[i] for i in range(n)] for k, (p, n) in enumerate(zip(prefixes, sizes))}
    for k, n in enumerate(sizes):
        held = [d for d in docs[k] if set(d[1:-1].tolist()) & held_out]
        assert len(held) == max(1, round(0.2 * n))


def test_bad_mixtures_name_the_key():
    for data, message in [
        ([{"path": "a", "weight": 0}], r"data\[0\]\.weight: must be a number > 0, got 0"),
        ([{"path": "a", "weight": 1}, {"path": "b", "weight": -2}], r"data\[1\]\.weight: must be a number > 0"),
        ([{"path": "a"}], r"data\[0\]: expected \{path: PREFIX, weight: NUMBER\}"),
        ([], "a non-empty list"),
        ("", "an empty prefix"),
    ]:
        with pytest.raises(DataError, match=message):
            parse_mixture(data)


def write_manifest(prefix: str, vocab_size: int, sha: str):
    Path(f"{prefix}.manifest.json").write_text(json.dumps({
        "format": 1, "tokenizer": {"name": sha, "vocab_size": vocab_size, "vocab_sha256": sha},
        "documents": 1, "tokens": 3, "shards": [{"prefix": Path(prefix).name, "documents": 1, "tokens": 3}]}))


def test_missing_prefixes_and_mixed_tokenizers_are_refused(tmp_path):
    for name in ("a", "b", "c"):
        write_indexed(str(tmp_path / name), [[1, 5, 2]], vocab_size=1000 if name != "c" else 70000)
    a, b, c = (str(tmp_path / n) for n in "abc")
    sources = parse_mixture([{"path": a, "weight": 1}, {"path": str(tmp_path / "nope"), "weight": 1}])
    with pytest.raises(DataError, match=r"data\[1\] \(.*nope\): no such dataset"):
        check_sources(sources, "data", 32000)
    check_sources(sources, "data", 32000, produced={str(tmp_path / "nope")})  # an earlier stage writes it
    write_manifest(a, 32000, "aaaa")
    write_manifest(b, 32768, "bbbb")
    mixed = parse_mixture([{"path": a, "weight": 1}, {"path": b, "weight": 1}])
    with pytest.raises(DataError, match=r"different tokenizers .*32000 tokens, vocabulary aaaa.*32768 tokens"):
        check_sources(mixed, "pretrain.data", 40000)
    with pytest.raises(DataError, match=r"32768 tokens\), more than model.vocab_size \(32000\)"):
        check_sources(mixed[1:], "pretrain.data", 32000)
    with pytest.raises(DataError, match="different dtypes"):  # plain pairs: uint16 next to int32
        open_sources(parse_mixture([{"path": a, "weight": 1}, {"path": c, "weight": 1}]), "data", 80000)


def test_preflight_refuses_layout_and_data_before_tokenizing(tmp_path):
    """The checks run_recipe makes before its first stage: on one process, parallel.tp=3 fails, and so does
    a mixture prefix that no earlier stage writes; the tokenize stage's own output may not exist yet."""
    from parallel.layout import LayoutError
    from trainer.config import load_config
    from trainer.stages import preflight

    recipe = "recipes/quickstart.yaml"
    with pytest.raises(LayoutError, match=r"pretrain on 1 process\(es\): .*parallel.tp \(3\)"):
        preflight(load_config(recipe, [f"run_dir={tmp_path}", "parallel.tp=3"]), ["tokenize", "pretrain"])
    mixture_arg = f"pretrain.data=[{{path: '${{tokenize.output}}', weight: 1}}, {{path: {tmp_path}/web, weight: 2}}]"
    cfg = load_config(recipe, [f"run_dir={tmp_path}", mixture_arg])
    with pytest.raises(DataError, match=r"pretrain.data\[1\] \(.*web\): no such dataset"):
        preflight(cfg, ["tokenize", "pretrain"])
    write_indexed(f"{tmp_path}/web", [[1, 5, 2]], vocab_size=32000)
    preflight(cfg, ["tokenize", "pretrain"])
    with pytest.raises(DataError, match=r"pretrain.data\[0\] \(.*corpus\): no such dataset"):
        preflight(cfg, ["pretrain"])  # without the tokenize stage, its output must exist already


def test_bad_weight_is_one_error_line_exit_2(tmp_path, capsys):
    from trainer.__main__ import main

    assert main(["recipes/quickstart.yaml", f"run_dir={tmp_path}",
                 "pretrain.data=[{path: a, weight: 1}, {path: b, weight: 0}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: pretrain.data[1].weight: must be a number > 0, got 0"]
    assert not tmp_path.joinpath("data").exists()


def test_mixture_run_resumes_exactly_through_the_trainer(prefixes, tmp_path):
    """The debug model on a 3-source mixture: killed after 2 of 4 steps and restarted, its losses, epochs
    and held-out losses equal the uninterrupted run's; eval/loss is the share-weighted mean of the
    sources' held-out losses."""
    data = "[" + ", ".join(f"{{path: {p}, weight: {w}}}" for p, w in zip(prefixes, (5, 1, 4))) + "]"
    args = ["recipes/quickstart.yaml", "stages=[pretrain]", "model.preset=debug",
            f"pretrain.data={data}", "pretrain.steps=4", f"pretrain.seq_len={SEQ}", "pretrain.micro_batch_size=2",
            "pretrain.global_batch_size=4", "pretrain.log_every=1", "pretrain.valid_fraction=0.2",
            "pretrain.eval_batches=1", "logging.progress=false"]
    run_cli(*args, f"run_dir={tmp_path / 'full'}")
    run_cli(*args, f"run_dir={tmp_path / 'cut'}", "pretrain.stop_after=2")
    resumed = run_cli(*args, f"run_dir={tmp_path / 'cut'}")
    assert "resumed from step 2" in resumed.stdout
    full, cut = (read_metrics(tmp_path / run / "pretrain") for run in ("full", "cut"))
    keys = ["loss", "epochs/source0", "epochs/source1", "epochs/source2"]
    assert [[m[k] for k in keys] for m in full if "loss" in m] == [[m[k] for k in keys] for m in cut if "loss" in m]
    (last,) = [m for m in full if "eval/loss" in m]
    (cut_last,) = [m for m in cut if "eval/loss" in m]
    assert abs(last["eval/loss"] - cut_last["eval/loss"]) < 1e-6
    shares = block_counts([5, 1, 4]) / BLOCK
    assert last["eval/loss"] == pytest.approx(sum(s * last[f"eval/loss/source{k}"] for k, s in enumerate(shares)))


def test_source_names_are_the_parts_that_tell_prefixes_apart():
    from data.mixture import Source, source_names

    assert source_names([Source("runs/web/data/corpus", 1), Source("runs/code/data/corpus", 1)]) == [
        "web/data/corpus", "code/data/corpus"]
    assert source_names([Source("/d/web", 1), Source("/d/code", 1)]) == ["web", "code"]
    assert source_names([Source("a/x", 1), Source("a/x", 2)]) == ["a/x#0", "a/x#1"]
