"""DPO: the policy trained by the one loop against a frozen reference with the same starting weights.

Batches: data.preference pairs (truncated to seq_len by its stated rule), taken in the pretraining
stream's grouping (data.stream.StepSchedule), a new order every epoch; a micro-batch of B pairs is 2B
rows, chosen then rejected. Sequence log-probs: the sum over answer tokens of vocab_parallel_log_probs
(vocabulary-sharded logits, never gathered). Loss: trainer.dpo_loss (sigmoid, ipo, hinge, robust)
averaged over the step's pairs, plus the MoE load-balancing loss with its coefficient.

Reference (dpo.reference):
  precompute  log pi_ref of every pair in one pass before the first step, by a model built from
              dpo.init and freed afterwards (one model in memory while training); saved to
              <output>/reference_logps.safetensors so that a resumed run reuses them
  copy        that frozen model is kept and run next to the policy on every micro-batch
Both are the same numbers. dpo.rpo_alpha adds the chosen answers' NLL (trainer.dpo_loss). Evaluation
(every eval_every steps and at the end): loss, rewards, reward accuracy and margin over all training
pairs (the first eval_batches x micro_batch_size of them), and eval/exact_match of the greedy answers to
eval_prompts when set (trainer.generation).
"""

import hashlib
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from data.chat import IGNORE_INDEX, instruct_tokenizer
from data.preference import collate_pairs, load_pairs, truncate_pairs
from data.readers import DataError
from parallel.cross_entropy import vocab_parallel_log_probs

from . import distributed as D
from .dpo_loss import dpo_loss, sequence_log_probs
from .generation import answer_eval_for
from .tasks import eval_batches, router_log, router_loss, shuffled_items, sum_over_dp, to_device

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")


def pad_to_multiple(batch: dict, multiple: int) -> dict:
    """Pad the rows' length to a multiple of `multiple` (sequence parallelism splits it over tp)."""
    extra = -batch["tokens"].shape[1] % multiple
    if not extra:
        return batch
    rows, width = batch["tokens"].shape
    pad = lambda x, value: torch.cat([x, x.new_full((rows, extra), value)], dim=1)  # noqa: E731
    positions = torch.cat([batch["position_ids"], torch.arange(extra).expand(rows, extra)], dim=1)
    return dict(batch, tokens=pad(batch["tokens"], 0), labels=pad(batch["labels"], IGNORE_INDEX),
                position_ids=positions)


def sequence_logps(model, batch, layout):
    """(2B,) summed answer log-probs and the router stats of one pair batch."""
    logits, stats = model(batch["tokens"], batch["position_ids"])
    labels = batch["labels"]
    token_logps = vocab_parallel_log_probs(logits, labels, layout.tp_group)
    return sequence_log_probs(token_logps, labels != IGNORE_INDEX), stats


def build_reference(scfg, cfg, model_cfg, layout):
    """The frozen reference: the stage's starting weights, parallelized like the policy."""
    from .engine import build_model, torch_dtype

    model = build_model(model_cfg, scfg.init, scfg.seed, layout,
                        OmegaConf.merge(cfg.parallel, {"activation_checkpointing": "none"})).requires_grad_(False)
    return model.to(D.device(), torch_dtype(scfg.dtype)).eval()


class DPOTask:
    def __init__(self, scfg, cfg, model_cfg, layout):
        self.scfg, self.model_cfg, self.layout = scfg, model_cfg, layout
        tokenizer = instruct_tokenizer(cfg.tokenizer)
        pairs, skipped = load_pairs(scfg.data, tokenizer, scfg.skip_bad_records)
        if not pairs:
            raise DataError(f"{scfg.data}: no preference pair to train on")
        self.pairs, cut = truncate_pairs(pairs, scfg.seq_len, min(64, scfg.seq_len))
        self.items = shuffled_items(len(self.pairs), scfg, layout, f"dpo data {scfg.data}", "pairs")
        self.answer_eval = answer_eval_for(scfg, tokenizer)
        self.reference, self.reference_logps = None, None
        if scfg.reference == "copy":
            self.reference = build_reference(scfg, cfg, model_cfg, layout)
        else:
            self.reference_logps = self._precomputed(scfg, cfg)
        if D.is_main():
            print(f"[dpo] {len(self.pairs)} pairs ({cut} truncated to {scfg.seq_len} tokens), "
                  f"{len(skipped)} bad records skipped" + (f" (first: {skipped[0]})" if skipped else "")
                  + f"; reference: {scfg.reference}", flush=True)

    # ------------------------------------------------------------ reference log-probs

    def _fingerprint(self, scfg) -> str:
        """What the reference log-probs depend on: the pairs' tokens, the starting weights, the dtype."""
        h = hashlib.sha256(f"{scfg.init}|{scfg.dtype}|{scfg.seed}".encode())
        for p in self.pairs:
            h.update(repr((p.prompt, p.chosen, p.rejected)).encode())
        return h.hexdigest()

    def _precomputed(self, scfg, cfg) -> torch.Tensor:
        """(N, 2) reference log-probs (chosen, rejected) of every pair, computed once and kept on disk."""
        path, fingerprint = Path(scfg.output) / "reference_logps.safetensors", self._fingerprint(scfg)
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                if f.metadata().get("fingerprint") == fingerprint:
                    return f.get_tensor("logps").to(D.device())
        reference = build_reference(scfg, cfg, self.model_cfg, self.layout)
        logps = torch.zeros(len(self.pairs), 2, dtype=torch.float64, device=D.device())
        with torch.no_grad():
            for indices in eval_batches(len(self.pairs), scfg.micro_batch_size, self.layout):
                batch = self._batch([0 if i is None else i for i in indices])
                seq, _ = sequence_logps(reference, batch, self.layout)
                for i, c, r in zip(indices, *seq.double().chunk(2)):
                    if i is not None:
                        logps[i] = torch.stack([c, r])
        logps = torch.tensor(sum_over_dp(logps.flatten().tolist(), self.layout)).view(-1, 2)
        del reference
        if D.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"logps": logps.contiguous()}, str(path.with_suffix(".tmp")),
                      metadata={"fingerprint": fingerprint})
            os.replace(path.with_suffix(".tmp"), path)
        return logps.to(D.device())

    def _reference(self, batch):
        if self.reference is None:
            return self.reference_logps[batch["pair_index"]].float().unbind(1)
        with torch.no_grad():
            return sequence_logps(self.reference, batch, self.layout)[0].chunk(2)

    # ------------------------------------------------------------ task interface

    def _batch(self, indices) -> dict:
        batch = collate_pairs(self.pairs, indices)
        if self.layout.sp:
            batch = pad_to_multiple(batch, self.layout.tp)
        return to_device(batch)

    def next_batch(self):
        return self._batch(self.items.next_items())

    def num_loss_tokens(self, batch) -> int:
        return len(batch["pair_index"])  # the loss is a mean over pairs

    def _pair_losses(self, policy, batch):
        answer_tokens = (batch["labels"] != IGNORE_INDEX).sum(1)
        (ref_chosen, ref_rejected), (n_chosen, n_rejected) = self._reference(batch), answer_tokens.chunk(2)
        s = self.scfg
        return dpo_loss(*policy.chunk(2), ref_chosen, ref_rejected, s.beta, s.loss, s.label_smoothing,
                        n_chosen, n_rejected, s.rpo_alpha)

    @staticmethod
    def _sums(losses, chosen, rejected, weight) -> list[float]:
        return [float((x * weight).sum()) for x in (losses.detach(), chosen, rejected,
                                                    (chosen > rejected).float(), chosen - rejected, weight)]

    def loss(self, engine, batch, scale):
        policy, stats = sequence_logps(engine, batch, self.layout)
        losses, chosen, rejected = self._pair_losses(policy, batch)
        aux, router_sums = router_loss(stats, self.model_cfg, self.layout)
        sums = self._sums(losses, chosen, rejected, torch.ones_like(losses))
        return losses.sum() * scale + aux, dict(zip(METRICS + ("pairs",), sums), **router_sums)

    def reduce_metrics(self, sums, layout) -> dict:
        keys = METRICS + ("pairs",)
        totals = dict(zip(keys, sum_over_dp([sums[k] for k in keys], layout)))
        return {**{k: totals[k] / totals["pairs"] for k in METRICS}, **router_log(sums, layout)}

    def evaluate(self, engine, layout) -> dict:
        totals = [0.0] * (len(METRICS) + 1)
        engine.eval()
        with torch.no_grad():
            for indices in eval_batches(len(self.pairs), self.scfg.micro_batch_size, layout,
                                        self.scfg.eval_batches):
                batch = self._batch([0 if i is None else i for i in indices])
                policy, _ = sequence_logps(engine, batch, layout)
                weight = torch.tensor([float(i is not None) for i in indices], device=policy.device)
                sums = self._sums(*self._pair_losses(policy, batch), weight)
                totals = [a + b for a, b in zip(totals, sums)]
            answers = self.answer_eval(engine, layout, engine.global_steps) \
                if self.answer_eval.prompts else {}
        engine.train()
        totals = sum_over_dp(totals, layout)
        return {**{f"eval/{k}": v / totals[-1] for k, v in zip(METRICS, totals)}, **answers}

    def state_dict(self):
        return self.items.state_dict()

    def load_state_dict(self, state):
        self.items.load_state_dict(state)
