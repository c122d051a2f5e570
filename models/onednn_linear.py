"""Float32 Linear products, forward and backward, on oneDNN instead of MKL.

On the CPU, `F.linear` and its backward run float32 on MKL's sgemm, and bf16 on oneDNN. On this
project's AMD EPYC (avx512) MKL reaches ~160-215 GFLOP/s with 2 threads at distilbart-cnn-12-6's
shapes, oneDNN ~345-450 on the same products: [1024 x 1024] @ [1024 x 4096]^T forward 44.7
against 20.1 ms, its input gradient 42.0 against 20.1 ms, its weight gradient 41.3 against 23.5
ms. (MKL takes slower code paths on non-Intel CPUs. On Intel CPUs both libraries are Intel's own;
the gap there was not measured.)

`packed_weights.linear`, which every Linear of the model runs, calls `linear` here for float32 CPU
products outside autocast (`runs`), with a gradient or without, so a forward pass gives the same
numbers whether a graph is recorded or not. Without a gradient it may run on generation's fp32
pack of the weight (`packed_weights.usable_pack`). Only the summation order differs from MKL's:
relative error against float64 ~3e-6 for oneDNN's weight gradient over 1024 rows, ~2e-6 for MKL's.
`set_enabled(False)` puts these products back on F.linear.
"""

from __future__ import annotations

import torch
from torch import Tensor

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

# Off with `set_enabled(False)`: float32 products stay on F.linear (MKL on the CPU).
_enabled = True

# Multiply-adds (rows x in x out) from which a product runs here. Below, the autograd Function's
# and oneDNN's cost per call outweighs the faster kernel. A Linear's forward and backward, timed
# with 2 threads: 128 x 64 -> 256 (2.1M) took 134 us against F.linear's 103 us, and 512 x 128 ->
# 128 (8.4M) 239 against 295 us. From 256 x 256 -> 256 on, oneDNN was 1.5-2.0x faster.
MIN_MACS = 1 << 22


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def product(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight^T + bias on oneDNN. `weight` may be a pack (models/packed_weights.py) or a
    strided view (a transposed weight), read as it is."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _Fp32Linear(torch.autograd.Function):
    """F.linear with forward and backward products on oneDNN. Saves what F.linear saves: x, W."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return product(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # grad @ W
            grad_x = product(rows, weight.t()).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:  # grad^T @ x
            grad_weight = product(rows.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


def eligible(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Float32 on the CPU, outside autocast (which would multiply in bf16, on oneDNN already)."""
    return (_enabled and AVAILABLE and x.device.type == weight.device.type == "cpu" and x.dim() >= 2
            and x.dtype == torch.float32
            and weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and not torch.is_autocast_enabled("cpu"))


def runs(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether `linear` should run this product (on the plain weight): `eligible`, and big enough
    that oneDNN's speed outweighs its cost per call (MIN_MACS). The choice depends on shapes only,
    never on whether a gradient is recorded."""
    return eligible(x, weight, bias) and x.numel() // max(x.shape[-1], 1) * weight.numel() >= MIN_MACS


def needs_grad(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` on oneDNN, with its backward on oneDNN too where a gradient is needed."""
    if needs_grad(x, weight, bias):
        return _Fp32Linear.apply(x, weight, bias)
    return product(x, weight, bias)
