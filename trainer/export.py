"""Checkpoint (saved at any layout) -> Hugging Face MixtralForCausalLM folder, without launching a job.

    python -m trainer.export runs/quickstart/pretrain runs/quickstart/hf [--dtype bf16]

Streams: one Hub tensor at a time is read from the stored slices (an expert's row only) into the
size-bounded shard being filled, so the peak host memory is about one output shard plus one tensor.

The sample prompt (optional) is generated from with transformers after the export: as plain text for a
pretrained checkpoint, as a user turn in the Mistral instruct format (mistral-common) for an SFT or DPO
checkpoint.
"""

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from model import ModelConfig
from model.hf import export_hf

from .checkpoint import CheckpointError, CheckpointSource, latest_checkpoint
from .engine import torch_dtype


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, or a run folder whose `checkpoints/latest` names one."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    ckpt = latest_checkpoint(path / "checkpoints")
    if ckpt is None:
        raise CheckpointError(f"{path}: no checkpoint (neither a manifest.json nor checkpoints/latest)")
    return ckpt


def read_model(path):
    """(ModelConfig, source of its weights, resolved config) of a checkpoint. The source reads boxes
    of the stored slices on demand: export streams tensor by tensor (model.hf.export_hf)."""
    ckpt = resolve_checkpoint(path)
    cfg = OmegaConf.load(ckpt / "config.yaml")
    mcfg = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    return mcfg, CheckpointSource(ckpt), cfg


def export_checkpoint(checkpoint, out_dir, tokenizer=None, dtype="bf16", max_shard_size="2GB",
                      sample_prompt=None) -> Path:
    from data.tokenizer import load_tokenizer

    mcfg, source, cfg = read_model(checkpoint)
    if mcfg.moe_type != "sparse":
        raise CheckpointError(f"{checkpoint}: a Mixture of Tokens checkpoint has no Mixtral form; export the "
                              "output of the transition stage (trainer/transition.py)")
    tok = load_tokenizer(tokenizer or cfg.tokenizer)
    export_hf(source, mcfg, out_dir, tokenizer=tok, max_shard_size=max_shard_size,
              dtype=torch_dtype(dtype))
    ckpt = resolve_checkpoint(checkpoint)
    print(f"[export] {ckpt} -> {out_dir}", flush=True)
    if sample_prompt:
        stage = json.loads((ckpt / "trainer_state.json").read_text()).get("stage")
        chat = (tokenizer or cfg.tokenizer) if stage in ("sft", "dpo") else None
        print(f"[export] sample{' (chat)' if chat else ''}: "
              f"{generate(out_dir, tok, sample_prompt, chat_tokenizer=chat)!r}", flush=True)
    return Path(out_dir)


def generate(hf_dir, tokenizer, prompt: str, max_new_tokens: int = 40, chat_tokenizer=None) -> str:
    """Greedy continuation of `prompt` by the transformers model loaded from `hf_dir`; with
    chat_tokenizer (a data.chat.instruct_tokenizer spec) the prompt is a user turn formatted by
    mistral-common, and generation stops at </s>."""
    import torch
    from transformers import AutoModelForCausalLM

    from data.chat import encode_messages, instruct_tokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if chat_tokenizer is None:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    else:
        ids = torch.tensor([encode_messages([("user", prompt)], instruct_tokenizer(str(chat_tokenizer)))])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint folder or run folder")
    p.add_argument("output", help="HF folder to write")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--tokenizer", default=None, help="default: the run's tokenizer")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--sample-prompt", default=None)
    a = p.parse_args(argv)
    export_checkpoint(a.checkpoint, a.output, a.tokenizer, a.dtype, a.max_shard_size, a.sample_prompt)


if __name__ == "__main__":
    main()
