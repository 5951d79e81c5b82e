"""Meta-device build + shard-only materialization (trainer.engine.build_model) against the single-device
model: at TP2 (+SP) and EP2, on 2 gloo ranks, every local parameter equals the matching slice of
Mixtral.init_weights (plain torch.randn per row block, model/init.py), and of a sharded HF folder."""

import pytest
import torch

from distributed import run_ranks
from model import Mixtral, model_config
from model.init import ROWS_PER_BLOCK, RandomInit, block_seed

LAYOUTS = {"tp2-sp": ["parallel.tp=2", "parallel.sp=true"], "ep2": ["parallel.ep=2"],
           "tp2-expert_tp": ["parallel.tp=2", "parallel.expert_tp=true"]}
OVERRIDES = ["model.preset=debug", "model.vocab_size=1000", "pretrain.micro_batch_size=1",
             "pretrain.global_batch_size=2", "pretrain.seq_len=16"]


def test_a_box_is_the_slice_of_the_whole_tensor():
    """Boxes that cut blocks, cross experts and slice the last dim equal slices of the whole draw."""
    src, shape = RandomInit(0.02, seed=5), [4, 100, 48]
    whole = src.read("layers.0.moe.experts.w2", shape, [0, 0, 0], shape)
    for offsets, size in [([1, 0, 0], [2, 100, 48]), ([0, 50, 0], [4, 50, 48]), ([0, 0, 24], [4, 100, 24]),
                          ([3, 63, 5], [1, 2, 7])]:
        box = src.read("layers.0.moe.experts.w2", shape, offsets, size)
        assert torch.equal(box, whole[tuple(slice(o, o + n) for o, n in zip(offsets, size))])
    # the definition, independently: rows 64..127 of the flattened tensor are one block's randn draw
    block = torch.randn(ROWS_PER_BLOCK, 48, generator=torch.Generator().manual_seed(
        block_seed(5, "layers.0.moe.experts.w2", 1)))
    assert torch.equal(whole.view(-1, 48)[64:128], block * 0.02)
    assert whole.std().item() == pytest.approx(0.02, rel=0.05)


def check_layouts(rank, world, init, reference: dict) -> dict:
    """Build the model at every layout with trainer.engine.build_model; each local parameter must equal
    its box of `reference`. Returns {layout: number of parameters this rank holds sharded}."""
    from parallel.layout import Layout
    from parallel.materialize import local_slice
    from trainer.config import load_config, model_config_of
    from trainer.engine import build_model

    sharded = {}
    for name, overrides in LAYOUTS.items():
        cfg = load_config(None, OVERRIDES + overrides)
        mcfg = model_config_of(cfg)
        layout = Layout.build(cfg.parallel, mcfg, cfg.pretrain, world, rank)
        params = dict(build_model(mcfg, init, 7, layout, cfg.parallel).named_parameters())
        assert params.keys() == reference.keys(), name
        for n, p in params.items():
            box = tuple(slice(o, o + s) for o, s in zip(local_slice(p)[1], p.shape))
            assert torch.equal(p.detach(), reference[n][box]), (name, n, init)
        sharded[name] = sum(p.shape != reference[n].shape for n, p in params.items())
    return sharded


def test_shards_equal_slices_of_the_single_device_init_and_of_an_hf_folder(tmp_path):
    from model.hf import export_hf

    single = Mixtral(model_config("debug", vocab_size=1000))
    single.init_weights(7)
    reference = {n: p.detach() for n, p in single.state_dict().items()}
    # a Hub-layout folder (per-expert tensors) in several shards, fp32 so that slices compare exactly;
    # test_hf.py loads such folders in transformers
    export_hf(reference, single.cfg, tmp_path / "hf", dtype=torch.float32, max_shard_size="200KB")
    for sharded in run_ranks(2, check_both_sources, str(tmp_path / "hf"), reference):
        assert all(n > 0 for n in sharded), sharded  # every layout did shard something


def check_both_sources(rank, world, hf_dir, reference):
    return [n for init in (None, hf_dir) for n in check_layouts(rank, world, init, reference).values()]
