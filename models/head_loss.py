"""The LM head's loss a few hundred target rows at a time; for a frozen head, with its gradient.

`cross_entropy(lm_logits(rows), labels)` makes the logits of every target row at once: at
evaluate.py's batch of 16 with 256-token targets, [4096, 50264], 823 MB in fp32. Without a
gradient the chunks' losses are simply summed. With one, the one-product path also keeps a
gradient buffer of the logits' size until backward: 103 MB bf16 per 1024 target rows. When the
head's weight is frozen (LoRA, or frozen embeddings), the only gradient the head passes back is
the rows' own, [rows, d_model]. So here the forward pass runs head, loss and that gradient chunk
by chunk, through the model's own `lm_logits` and `cross_entropy` (packs, held bf16 copies and
autocast apply as usual), keeps only the rows' gradient, and backward scales it by the incoming
gradient. The logits of one chunk are all that is ever held.

Only the place of that scaling differs from the one-product path (it multiplies the bf16 logits'
gradient, here the fp32 rows' gradient), so the gradients agree to the autocast dtype's rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from models.cross_entropy import cross_entropy


def chunked_head_loss(head: Callable[[Tensor], Tensor], rows: Tensor, labels: Tensor, chunk_rows: int,
                      reduction: str = "mean") -> Tensor:
    """`cross_entropy(head(rows), labels, reduction)`, `chunk_rows` rows at a time. Where `rows`
    needs a gradient, it is computed chunk by chunk during the forward pass; `head` must then hold
    no trainable tensor: no gradient reaches anything but `rows`."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    mean = reduction == "mean"
    if torch.is_grad_enabled() and rows.requires_grad:
        return _ChunkedHeadLoss.apply(rows, labels, head, chunk_rows, mean)
    total = sum(cross_entropy(head(rows[chunk]), labels[chunk], "sum") for chunk in _chunks(rows, chunk_rows))
    return total / rows.shape[0] if mean else total


def _chunks(rows: Tensor, chunk_rows: int) -> list[slice]:
    return [slice(start, start + chunk_rows) for start in range(0, rows.shape[0], chunk_rows)]


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, labels: Tensor, head, chunk_rows: int, mean: bool) -> Tensor:
        grad_rows = torch.empty_like(rows)
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for chunk in _chunks(rows, chunk_rows):
            with torch.enable_grad():  # a small graph of its own per chunk, gone once differentiated
                chunk_rows_leaf = rows[chunk].detach().requires_grad_()
                loss = cross_entropy(head(chunk_rows_leaf), labels[chunk], "sum")
                grad_rows[chunk] = torch.autograd.grad(loss, chunk_rows_leaf)[0]
            total += loss.detach()
        ctx.save_for_backward(grad_rows)
        # as models/cross_entropy.py: the mean divides, its gradient multiplies by 1 / rows
        ctx.scale = 1.0 / rows.shape[0] if mean and rows.shape[0] else 1.0
        return total / rows.shape[0] if mean else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        (grad_rows,) = ctx.saved_tensors
        # In place: the buffer was made for this one backward.
        return grad_rows.mul_(grad_loss.float() * ctx.scale), None, None, None, None
