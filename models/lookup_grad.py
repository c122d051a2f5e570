"""Token lookups that add their gradient rows straight into the embedding's `.grad` (CPU).

In a full fine-tune the token embedding, tied to the LM head, gets gradients from three readers:
the head, then (in backward order) the decoder's lookup and the encoder's. Autograd sums them
before anything reaches `.grad`: each lookup's backward makes a dense, zero-filled
[vocab, d_model] gradient (206 MB at distilbart-cnn-12-6 shapes) to add a few hundred rows to,
and the head's gradient is held apart until the encoder's lookup, the last reader, is done. At
the decoder's lookup that is the whole step's peak. Measured on ours' later full bf16 step at
bench shapes, with every block of 64 KB or more mmapped so that resident memory follows live
tensors: backward's peak +1441 -> +1279 MB.

Here a lookup's rows are a leaf for autograd, so the weight's only reader it sees is the head.
The head's gradient becomes `.grad` as soon as the head's backward is done; the rows' gradient
arrives at a hook, which sums repeated ids (in index order, as the dense backward sums them)
and adds the sums into `.grad` in place. The same additions as autograd's, so the same bits in a
single backward pass; over several micro-batches `.grad` takes the readers one at a time rather
than their sum, so there the last bits may differ.

What autograd no longer sees: the lookups' part of the weight's gradient reaches `.grad` only,
not `torch.autograd.grad`, a gradient hook on the weight, or DDP's all-reduce (started from those
hooks). So it runs only where the caller switches it on (`adding_rows_into_grad`): the engine's
training step on one process (`engine.trainer.accumulate_gradients`). Not on a GPU, where
`index_add_` sums repeated ids in no fixed order (and whose memory was not measured).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_on = False


@contextmanager
def adding_rows_into_grad(enabled: bool = True) -> Iterator[None]:
    """Lookups run in the block (`lookup`) add their gradient rows into the weight's `.grad`."""
    global _on
    before, _on = _on, enabled
    try:
        yield
    finally:
        _on = before


def runs(embedding: nn.Embedding) -> bool:
    """Switched on, a gradient to record for a CPU weight, and a lookup whose backward is plain
    (no max_norm renormalising the weight, no frequency scaling, no sparse gradient)."""
    weight = embedding.weight
    return (_on and torch.is_grad_enabled() and weight.requires_grad and weight.device.type == "cpu"
            and embedding.max_norm is None and not embedding.scale_grad_by_freq and not embedding.sparse)


def lookup(embedding: nn.Embedding, ids: Tensor) -> Tensor:
    """`embedding(ids)`; where `runs`, with its weight gradient added straight into `.grad`."""
    if not runs(embedding):
        return embedding(ids)
    rows = F.embedding(ids, embedding.weight.detach(), embedding.padding_idx).requires_grad_()
    rows.register_hook(partial(_add_into_grad, embedding.weight, ids, embedding.padding_idx))
    return rows


@torch.no_grad()
def _add_into_grad(weight: Tensor, ids: Tensor, padding_idx: int | None, grad: Tensor) -> None:
    ids, grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
    if padding_idx is not None:  # the padding row gets no gradient, as in F.embedding's backward
        kept = ids != padding_idx
        ids, grad = ids[kept], grad[kept]
    unique, position = torch.unique(ids, return_inverse=True)
    # A repeated id's rows summed from zero in index order: F.embedding's dense backward's sums.
    sums = grad.new_zeros(len(unique), grad.shape[-1], dtype=weight.dtype)
    sums.index_add_(0, position, grad.to(weight.dtype))
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    weight.grad.index_add_(0, unique, sums)
