"""SFT: the pretraining loop and loss on packed chat rows, the loss on assistant tokens only.

Rows: data.chat encodes each conversation in the Mistral instruct format (mistral-common), masks all
but the assistant answers and their </s>, and packs the training conversations (shuffled once with the
seed) into rows of seq_len, attention never crossing conversations. The steps take the rows in the
pretraining stream's grouping (data.stream.StepSchedule), a new row order every epoch, so any layout
sees the same micro-batches. The loss is normalised by the step's assistant tokens. Held out:
valid_fraction of the conversations, reported as eval/loss and eval/token_accuracy (the target is the
arg-max of the vocabulary-parallel logits) every eval_every steps and at the end, with eval/exact_match
of the greedy answers to eval_prompts (a chat jsonl, or held_out: the held-out conversations' last
answers; trainer.generation).
"""

import numpy as np
import torch

from data.chat import IGNORE_INDEX, instruct_tokenizer, load_conversations, pack_conversations, split_train_valid
from data.readers import DataError
from parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_top1

from . import distributed as D
from .generation import answer_eval_for
from .tasks import PretrainTask, eval_batches, shuffled_items, sum_over_dp, to_device, token_loss_log


def rows_of(packed, indices) -> dict:
    """The micro-batch of packed rows `indices`; None gives a row with no loss token (a filler)."""
    seq_len = packed.tokens.shape[1]
    pick = torch.tensor([0 if i is None else i for i in indices], dtype=torch.long)
    batch = {k: getattr(packed, k)[pick].clone()
             for k in ("tokens", "labels", "position_ids")}
    for r, i in enumerate(indices):
        if i is None:
            batch["labels"][r] = IGNORE_INDEX
            batch["position_ids"][r] = torch.arange(seq_len)
    return batch


class SFTTask(PretrainTask):
    def __init__(self, scfg, cfg, model_cfg, layout):
        self.scfg, self.model_cfg, self.layout = scfg, model_cfg, layout
        tokenizer = instruct_tokenizer(cfg.tokenizer)
        conversations, skipped = load_conversations(scfg.data, tokenizer, scfg.skip_bad_records)
        train, valid = split_train_valid(conversations, scfg.valid_fraction, scfg.seed)
        shuffled = [train[i] for i in np.random.default_rng(scfg.seed).permutation(len(train))]
        self.rows = pack_conversations(shuffled, scfg.seq_len)
        self.valid = pack_conversations(valid, scfg.seq_len)
        self.answer_eval = answer_eval_for(scfg, tokenizer, held_out=valid)
        if not len(self.rows.tokens):
            raise DataError(f"{scfg.data}: no training conversation keeps an answer token within "
                            f"sft.seq_len={scfg.seq_len}")
        self.items = shuffled_items(len(self.rows.tokens), scfg, layout,
                                    f"sft data {scfg.data} (sft.seq_len {scfg.seq_len})")
        if D.is_main():
            print(f"[sft] {len(train)} conversations -> {len(self.rows.tokens)} rows of {scfg.seq_len} tokens "
                  f"({self.rows.truncated} truncated, {self.rows.dropped} dropped); {len(valid)} held out; "
                  f"{len(skipped)} bad records skipped" + (f" (first: {skipped[0]})" if skipped else ""),
                  flush=True)

    def next_batch(self):
        return to_device(rows_of(self.rows, self.items.next_items()))

    def reduce_metrics(self, sums, layout) -> dict:
        return token_loss_log(sums, layout)

    def evaluate(self, engine, layout) -> dict:
        engine.eval()
        answers = self.answer_eval(engine, layout, engine.global_steps) if self.answer_eval.prompts else {}
        engine.train()
        if not len(self.valid.tokens):
            return answers
        loss_sum = correct = tokens = 0.0
        engine.eval()
        with torch.no_grad():
            for indices in eval_batches(len(self.valid.tokens), self.scfg.micro_batch_size, layout,
                                        self.scfg.eval_batches):
                batch = to_device(rows_of(self.valid, indices))
                logits, _ = engine(batch["tokens"], batch["position_ids"])
                labels = batch["labels"]
                loss_sum += vocab_parallel_cross_entropy(logits, labels, layout.tp_group).sum().item()
                correct += vocab_parallel_top1(logits, labels, layout.tp_group).sum().item()
                tokens += (labels != IGNORE_INDEX).sum().item()
        engine.train()
        loss_sum, correct, tokens = sum_over_dp([loss_sum, correct, tokens], layout)
        return {"eval/loss": loss_sum / tokens, "eval/token_accuracy": correct / tokens, **answers}

    def state_dict(self):
        return self.items.state_dict()

    def load_state_dict(self, state):
        self.items.load_state_dict(state)
