"""Teacher-forced validation loss: the token-mean cross-entropy over a whole split."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from data.batching import LengthGroupedSampler, TokenizedSplit, collate
from models import packed_weights


@dataclass
class LossReport:
    loss: float
    num_tokens: int
    num_samples: int
    runtime: float

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows a float past ~709

    @property
    def samples_per_second(self) -> float:
        return self.num_samples / self.runtime if self.runtime > 0 else float("inf")


@torch.inference_mode()
def evaluate_loss(model, split: TokenizedSplit, batch_size: int, device, pad_token_id: int,
                  decoder_start_token_id: int, autocast=None, progress=None) -> LossReport:
    """Sum the loss over every target token of the split, then divide once (not a mean of means)."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    total, tokens = 0.0, 0
    batches = LengthGroupedSampler(split.lengths(), batch_size, shuffle=False).epoch_batches(0)
    # Several batches under CPU bf16 autocast: each fp32 weight is cast (and packed) once for the
    # whole pass rather than once per batch. One batch would gain nothing for the memory.
    casts = packed_weights.linear_weights(model) if len(batches) > 1 and _cpu_bf16(autocast) else []
    with packed_weights.packed_casts(casts):
        for indices in batches if progress is None else progress(batches):
            batch = collate(split, indices, pad_token_id, decoder_start_token_id).to(device)
            with autocast or nullcontext():
                out = model(batch.input_ids, batch.attention_mask, batch.decoder_input_ids, labels=batch.labels,
                            return_logits=False, loss_reduction="sum")
            total += float(out.loss)
            tokens += out.num_target_tokens
    model.train(was_training)
    return LossReport(total / max(tokens, 1), tokens, len(split), time.perf_counter() - start)


def _cpu_bf16(autocast) -> bool:
    return (isinstance(autocast, torch.autocast) and autocast.device == "cpu"
            and autocast.fast_dtype == torch.bfloat16)
