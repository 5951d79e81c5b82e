"""model/hf.py against transformers' MixtralForCausalLM: both directions by logits (fp32), the files
written, the errors for tensors that are missing, unexpected or of the wrong shape."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import MixtralConfig, MixtralForCausalLM

from model import Mixtral, model_config
from model.hf import export_hf, from_hf, hf_config, import_hf, model_config_from_hf, to_hf

# GQA (4 heads, 2 kv heads), a window shorter than the sequence, rope_theta != 10000, small vocab
CFG = model_config("debug", vocab_size=1000, sliding_window=5, rope_theta=5000.0, attention="reference")
SEQ = 12


def our_model(seed=0) -> Mixtral:
    m = Mixtral(CFG)
    m.init_weights(seed)
    return m.eval()


def hf_model(seed=0) -> MixtralForCausalLM:
    """transformers' own random init, built from its own config (not from hf_config)."""
    torch.manual_seed(seed)
    hc = MixtralConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                       num_experts_per_tok=2, max_position_embeddings=512, sliding_window=5,
                       rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    return MixtralForCausalLM(hc).eval()


def tokens(batch=2):
    return torch.randint(0, CFG.vocab_size, (batch, SEQ), generator=torch.Generator().manual_seed(1))


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    ours = our_model()
    out = export_hf(ours.state_dict(), CFG, tmp_path / "hf", dtype=torch.float32)
    hf, info = MixtralForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        diff = (ours(tokens())[0] - hf.eval()(tokens()).logits).abs().max().item()
    assert diff < 1e-4, diff

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert config["dtype"] == config["torch_dtype"] == "float32" and config["rope_theta"] == 5000.0
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    with safe_open(str(out / "model-00001-of-00001.safetensors"), "pt") as f:  # the Hub layout
        assert f.get_slice("model.layers.1.block_sparse_moe.experts.3.w1.weight").get_shape() == [128, 64]
        assert f.get_slice("model.layers.1.block_sparse_moe.experts.3.w2.weight").get_shape() == [64, 128]
        assert set(f.keys()) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == 4 * sum(p.numel() for p in ours.parameters())
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary folder left


@pytest.mark.parametrize("save_original_format", [True, False], ids=["hub-names", "fused-names"])
def test_transformers_save_pretrained_imports_with_equal_logits(tmp_path, save_original_format):
    hf = hf_model(seed=3)
    hf.save_pretrained(tmp_path, save_original_format=save_original_format)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        fused = "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    assert fused == (not save_original_format)  # transformers 5 writes Hub names by default
    cfg, state = import_hf(tmp_path)
    assert (cfg.num_kv_heads, cfg.sliding_window, cfg.rope_theta, cfg.vocab_size) == (2, 5, 5000.0, 1000)
    cfg.attention = "reference"
    ours = Mixtral(cfg)
    ours.load_state_dict(state, strict=True)
    with torch.no_grad():
        diff = (ours.eval()(tokens())[0] - hf(tokens()).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_round_trip_is_exact():
    sd = our_model().state_dict()
    back = from_hf(to_hf(sd, CFG), CFG)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path):
    hub = {k: v.contiguous() for k, v in to_hf(our_model().state_dict(), CFG).items()}
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    missing = {k: v for k, v in hub.items() if k != name}
    with pytest.raises(ValueError, match=f"HF state dict: missing tensor '{re.escape(name)}'"):
        from_hf(missing, CFG)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.foo'"):
        from_hf(hub | {"model.layers.0.foo": torch.zeros(1)}, CFG)
    bad = hub | {"lm_head.weight": torch.zeros(999, 64)}
    with pytest.raises(ValueError, match=r"'lm_head\.weight' has shape \(999, 64\), expected \(1000, 64\)"):
        from_hf(bad, CFG)
    with pytest.raises(ValueError, match=r"state dict: missing tensor 'layers\.0\.moe\.experts\.w2'"):
        to_hf({k: v for k, v in our_model().state_dict().items() if k != "layers.0.moe.experts.w2"}, CFG)

    # through a folder: the error names the folder and the tensor
    folder = export_hf(our_model().state_dict(), CFG, tmp_path / "hf", dtype=torch.float32)
    shard = folder / "model-00001-of-00001.safetensors"
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors | {"model.layers.0.foo": torch.zeros(2)}, str(folder / "model.safetensors"))
    (folder / "model.safetensors.index.json").unlink()
    shard.unlink()
    with pytest.raises(ValueError, match=rf"HF checkpoint {folder}: unexpected tensor 'model.layers.0.foo'"):
        import_hf(folder)


def test_not_an_hf_folder(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path}: not an HF Mixtral folder"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'llama' is not 'mixtral'"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 64}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"pickle checkpoints .* are not read"):
        import_hf(tmp_path)
    with pytest.raises(ValueError, match=r"tie_word_embeddings=True is not supported"):
        model_config_from_hf({"model_type": "mixtral", "tie_word_embeddings": True})


def test_sharded_export_loads(tmp_path):
    ours = our_model()
    out = export_hf(ours.state_dict(), CFG, tmp_path / "hf", dtype=torch.float32, max_shard_size="300KB")
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n > 2 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert all((out / f).stat().st_size < 300_000 + 50_000 or f == index["weight_map"]["lm_head.weight"]
               for f in files)  # a tensor larger than the limit gets a shard of its own
    hf, info = MixtralForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    _, state = import_hf(out)
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())


def test_bf16_export_with_tokenizer_and_failed_export_leaves_nothing(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    ours = our_model()
    out = export_hf(ours.state_dict(), CFG, tmp_path / "hf", tokenizer=tok)  # default bf16
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("hello") == 3
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = MixtralForCausalLM.from_pretrained(out)
    assert hf.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(hf.lm_head.weight, ours.output.weight.to(torch.bfloat16))

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_hf(ours.state_dict(), CFG, tmp_path / "broken", tokenizer=BrokenTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_config_both_ways():
    # config.json of mistralai/Mixtral-8x7B-v0.1 (transformers 4.36 era: top-level rope_theta, torch_dtype)
    hub = {"architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
           "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
           "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
           "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
           "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
           "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0",
           "use_cache": True, "vocab_size": 32000}
    expected = model_config("mixtral-8x7b")
    expected.preset = None
    assert model_config_from_hf(hub) == expected
    odd = model_config("debug", head_dim=24, sliding_window=7, rope_theta=123.0, norm_eps=1e-6)
    odd.preset = None
    assert model_config_from_hf(hf_config(odd)) == odd
    assert model_config_from_hf(hf_config(odd).to_dict()) == odd


def test_bad_folders_are_one_error_line_before_training(tmp_path):
    """Through the trainer: a missing shard (a real SFT start) and shapes that disagree with config.json
    (the dry run) stop with one `error:` line naming the file or tensor, exit code 2."""
    from conftest import run_cli

    folder = export_hf(our_model().state_dict(), CFG, tmp_path / "hf", dtype=torch.float32, max_shard_size="300KB")
    args = ["recipes/instruct_quickstart.yaml", "--stage", "sft", f"sft.init={folder}", f"run_dir={tmp_path}/run",
            "slurm.gpus_per_node=0", "slurm.tasks_per_node=1"]
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    proc = run_cli(*args, "--dry-run", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith(f"error: HF checkpoint {folder}: "), proc.stderr[-2000:]
    assert "tensor 'model.layers.0.block_sparse_moe.experts.0.w1.weight' has shape (128, 64), expected (96, 64)" in last
    (folder / "config.json").write_text(json.dumps(config))
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: {folder}: shard {shard.name} named in model.safetensors.index.json is missing"), proc.stderr[-2000:]
