"""One autocast cast of an activation for several Linears that read it.

Under autocast every Linear casts its fp32 input to the low-precision dtype itself, so an input
read by q_proj, k_proj and v_proj (and their LoRA branches) is cast three to five times, and in
backward each reader's gradient is cast back to fp32 on its own before the fp32 sum.
`cast_for_readers` casts once and hands each reader its own output; its backward sums the
readers' low-precision gradients in fp32, as autocast's separate casts would (bf16 -> fp32 is
exact), so only the order of the fp32 additions can differ. Casting once and sharing one tensor
would instead sum the gradients in bf16.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _CastForReaders(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype, readers: int) -> tuple[Tensor, ...]:
        ctx.source_dtype = x.dtype
        cast = x.to(dtype)
        # distinct outputs, so autograd hands backward each reader's gradient unsummed
        return (cast,) + tuple(cast.view_as(cast) for _ in range(readers - 1))

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        total = None
        for grad in grads:
            if grad is None:
                continue
            if total is None:
                total = grad.to(ctx.source_dtype, copy=True)
            else:
                total.add_(grad)  # in the fp32 of `total`: grad is widened exactly
        return total, None, None


def cast_for_readers(x: Tensor, readers: int) -> tuple[Tensor, ...]:
    """`readers` tensors for `readers` Linears to read: under autocast on x's device, one cast of
    fp32 `x` to the autocast dtype (what each Linear would have cast it to); otherwise x itself."""
    device = x.device.type
    if x.dtype != torch.float32 or not torch.is_autocast_enabled(device):
        return (x,) * readers
    return _CastForReaders.apply(x, torch.get_autocast_dtype(device), readers)
