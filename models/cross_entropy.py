"""Token cross-entropy over the LM head's logits, a few rows at a time.

`F.cross_entropy(logits.float(), labels)` writes the fp32 log-softmax of every target row
([tokens, 50264]: 51 MB for 256 tokens), keeps it for backward and then writes an fp32
gradient of the same size, which autocast casts back to bf16. On the CPU those fresh pages and
passes over memory cost more than the arithmetic: 43 ms forward + backward for 256 bf16 rows on
2 threads in isolation, ~145 ms inside a training step. Here each chunk of rows is made fp32
while it is in cache, its log-sum-exp taken, and, when a gradient is wanted, softmax - one_hot
written straight into a gradient buffer of the logits' own dtype during the forward pass:
backward only scales it. 14 ms for the same rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Elements per fp32 chunk: 16 rows of a 50264-word vocabulary (~3 MiB) measured fastest (8 rows:
# 20 ms, 64 rows: 18 ms, all 256 rows: 37 ms).
CHUNK_ELEMENTS = 800_000


def cross_entropy(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """fp32 cross-entropy of [tokens, vocab] logits (any float dtype) against [tokens] labels, as
    `F.cross_entropy(logits.float(), labels, reduction=reduction)` for "mean" or "sum". Every
    label must be a class index (select the target positions first; no ignore_index)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if logits.device.type != "cpu":  # the GPU kernels fuse this already
        return F.cross_entropy(logits.float(), labels, reduction=reduction)
    return _ChunkedCrossEntropy.apply(logits, labels, reduction == "mean")


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, mean: bool) -> Tensor:
        tokens, vocab = logits.shape
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
        for start in range(0, tokens, rows):
            chunk = logits[start:start + rows].float()
            chunk_labels = labels[start:start + rows, None]
            log_normaliser = torch.logsumexp(chunk, dim=-1, keepdim=True)
            total += (log_normaliser - chunk.gather(1, chunk_labels)).sum()
            if grad is not None:  # d loss / d logits = softmax - one_hot(label)
                probs = (chunk - log_normaliser).exp_()
                probs.scatter_add_(1, chunk_labels, torch.full_like(chunk_labels, -1, dtype=probs.dtype))
                grad[start:start + rows] = probs
        ctx.save_for_backward(grad)
        ctx.scale = 1.0 / tokens if mean and tokens else 1.0
        return total / tokens if mean else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        (grad,) = ctx.saved_tensors
        # In place: the buffer was made for this one backward. The factor stays fp32 (a 0-dim
        # tensor does not change the result dtype), so it is not rounded to bf16 first.
        return grad.mul_(grad_loss.float() * ctx.scale), None, None
