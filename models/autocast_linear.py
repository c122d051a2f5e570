"""Linear products of fp32 weights under CPU bf16 autocast, with the weight cast in each product
instead of held from forward to backward.

Under autocast, `F.linear` casts an fp32 weight to bf16, and autograd keeps that cast until
backward has used it for the input's gradient. Autocast also caches the cast of every trainable
weight for as long as its context lasts. So by the end of a forward pass every trainable weight
has a bf16 copy alive: 610 MB for a full fine-tune of distilbart-cnn-12-6, held while the
activations peak and into backward, where the encoder's copies go only as backward reaches them.

Here the forward pass casts the weight, multiplies and frees the cast; backward casts it again for
the input's gradient, and the weight's own gradient needs no weight at all. Every product is the
one autocast runs (the same `F.linear` on the same bf16 operands, and in backward the products
autograd's addmm/mm formulas compute), so outputs and gradients are the same bits. One exception:
a weight multiplied more than once in one autocast context (the copy-attention loss runs the last
decoder layer's q_proj and k_proj again, engine/copy_attention.py). Autocast's cached cast then
sums the products' bf16 weight gradients in bf16 before widening them; here each is widened and
they add in fp32, as models/shared_cast.py sums an activation's readers. Training with
`--copy-attention` therefore rounds differently from before, not worse.

Full bf16 fine-tuning step at distilbart-cnn-12-6 shapes (batch 4 x 256/64 tokens, every large
block mmapped so resident memory follows the live tensors): memory at the end of forward
+1390 -> +810 MB, the step's peak +1729 -> +1441 MB; in the bench (full_bf16), a later step
2469 -> 2259 MB, 0.88x of Transformers'. The second cast of each weight costs ~1-2% of the step
(in-process A/B: 2.54 against 2.58 s, within the machine's noise).

GPUs were not measured, so this runs on the CPU only. Products that need no gradient keep
autocast's own path (validation: its cache then casts each weight once per autocast context).
`set_enabled(False)` puts every product back on autocast's `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Off with `set_enabled(False)`: products stay on autocast's F.linear, with its held casts.
_enabled = True


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


class _CastPerProduct(torch.autograd.Function):
    """x W^T + b over 2-D rows, W and b fp32, x already in `dtype`: W cast in forward and again in
    backward. Saves x and the fp32 W (which the model holds anyway), not a cast."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.dtype = bias is not None, dtype
        with torch.autocast("cpu", enabled=False):
            return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = None
        # The fp32 gradients become .grad and outlive the step; the casts and bf16 products here are
        # freed within it. Allocating the gradients before those temporaries leaves fewer holes in
        # glibc's heap: with freed memory kept (train.py), a later full bf16 step at
        # distilbart-cnn-12-6 shapes adds 2054-2069 -> 1879-1988 MB of resident memory (measured,
        # one process, 4 steps each; the placement is glibc's, not something this code controls).
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = weight.new_empty(weight.shape[0]) if ctx.has_bias and ctx.needs_input_grad[2] else None
        # The products of addmm's backward for F.linear(x, W) = addmm(b, x, W^T), W^T column-major:
        # grad @ W for x, grad^T @ x for W; then fp32, as autocast's cast of W passes it back.
        if ctx.needs_input_grad[0]:
            grad_x = grad.mm(weight.to(ctx.dtype))
        if grad_weight is not None:
            grad_weight.copy_(grad.t().mm(x))
        if grad_bias is not None:
            grad_bias.copy_(grad.sum(0))
        return grad_x, grad_weight, grad_bias, None


def runs(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether `linear` runs this product: CPU bf16 autocast on, an fp32 weight (and bias), and a
    gradient to be recorded, which is when autograd would hold autocast's cast."""
    return (_enabled and x.device.type == weight.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            # 2-D or contiguous 3-D x: where F.linear adds the bias inside the product (addmm), as here
            and x.dtype in (torch.float32, torch.bfloat16) and x.dim() in (2, 3) and x.is_contiguous()
            and weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """autocast's `F.linear(x, weight, bias)` with the weight cast per product (see `runs`)."""
    dtype = torch.get_autocast_dtype("cpu")
    # 2-D rows into the Function, so its output is a fresh tensor, not a view: callers may add
    # into it in place (lm_logits does).
    rows = x.to(dtype).reshape(-1, x.shape[-1])
    return _CastPerProduct.apply(rows, weight, bias, dtype).view(*x.shape[:-1], weight.shape[0])
