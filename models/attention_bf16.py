"""Attention under CPU bf16 autocast: bf16 matmuls around an fp32 softmax, a few heads at a time.

SDPA's CPU flash kernel is slow for training at BART's lengths. Forward + backward of
[4, 16, L, 64] heads on 2 threads (EPYC, avx512_bf16), against this path:
64x256 keys 9.1 -> 5.3 ms, 256x256 26 -> 11 ms, 512x512 75 -> 41 ms, 1024x1024 252 -> 190 ms.
Computing all heads at once is what loses from 192x192 up (256x256: 33 ms, 1024x1024: 974 ms):
the fp32 scores leave the cache. So the heads go in chunks whose scores fit in L2. Up to
batch 4 x 256 x 256 the fp32 probabilities are kept for backward (16 MiB a layer); above that,
like a flash kernel, backward recomputes them, for one extra q k^T and softmax, so memory grows
no faster than SDPA's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# fp32 scores per chunk: 512K (2 MiB) measured best at 256x256 (8 heads) and 512x512 (2 heads).
CHUNK_SCORES = 512 * 1024
# Chunks of one head were slower than chunks of two at every length measured (1024x1024: 283
# against 190 ms).
MIN_CHUNK_HEADS = 2
# A call whose fp32 probabilities fit in this many scores keeps them for backward instead of
# recomputing them: 16 MiB, batch 4 x 16 heads x 256 x 256, so at most ~0.3 GB over
# distilbart's 18 layers. Forward + backward of those [4, 16, 256, 64] heads: 13.1-16.0 ->
# 11.0-13.5 ms, bit for bit the same gradients. Longer inputs recompute, as flash kernels do.
SAVED_PROBS_MAX_SCORES = 4 * 16 * 256 * 256


def attend_bf16(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, dropout: float) -> Tensor:
    """softmax(q k^T / sqrt(head_dim)) v for bf16 [batch, heads, length, head_dim] tensors, with
    SDPA's masking rules: `mask` is boolean (True = may attend), broadcast over heads; `is_causal`
    lets query i see keys 0..i."""
    if is_causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if dropout > 0.0:  # rare in BART (attention_dropout 0): plain autograd, which keeps the probabilities
        return torch.matmul(F.dropout(attention_probs(q, k, mask).to(q.dtype), dropout), v)
    return _ChunkedAttention.apply(q, k, v, mask)


def attention_probs(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """fp32 softmax(q k^T / sqrt(head_dim)) of bf16 q, k; masked keys get probability 0."""
    return scaled_probs(q * q.shape[-1] ** -0.5, k, mask)


def scaled_probs(q_scaled: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """fp32 softmax(q_scaled k^T), for q already multiplied by head_dim ** -0.5."""
    scores = torch.matmul(q_scaled, k.transpose(-1, -2))
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def head_chunks(batch: int, heads: int, scores_per_head: int) -> list[tuple[slice, slice]]:
    """(batch, head) index slices covering every head, each chunk holding about CHUNK_SCORES scores."""
    if heads * scores_per_head <= CHUNK_SCORES:
        rows = max(1, CHUNK_SCORES // (heads * scores_per_head))
        return [(slice(b, b + rows), slice(None)) for b in range(0, batch, rows)]
    step = max(MIN_CHUNK_HEADS, CHUNK_SCORES // scores_per_head)
    return [(slice(b, b + 1), slice(h, h + step)) for b in range(batch) for h in range(0, heads, step)]


def _mask_rows(mask: Tensor | None, rows: slice) -> Tensor | None:
    """The mask's part for a batch slice: masks are [batch or 1, 1, queries or 1, keys] or [queries, keys]."""
    if mask is None or mask.dim() < 4 or mask.shape[0] == 1:
        return mask
    return mask[rows]


def _contiguous(x: Tensor, scale: float = 1.0) -> Tensor:
    """`x * scale` (one pass) or `x` in a fresh row-major tensor."""
    if scale == 1.0:
        return x.contiguous()
    return torch.mul(x, scale, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))


class _ChunkedAttention(torch.autograd.Function):
    """The heads come in as the projections lay them out, [batch, length, heads, head_dim] in
    memory, and bmm on such strided chunks runs at half speed (q k^T of 8 heads at 256x256, 2
    threads: 0.16 against 0.084 ms). So q, k, v and the output's gradient are copied row-major
    once per call (0.024 ms each), q already scaled. The outputs keep the projections' layout,
    so the caller's transposes back to [batch, length, dim] stay views. Small calls keep their
    fp32 probabilities for backward (SAVED_PROBS_MAX_SCORES); the rest recompute them."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        out = torch.empty_like(q)
        ctx.layouts = [(x.shape, x.stride()) for x in (q, k, v)]  # the gradients go out in these
        q, k, v = _contiguous(q, q.shape[-1] ** -0.5), _contiguous(k), _contiguous(v)
        keep_probs = any(ctx.needs_input_grad[:3]) and out.numel() // q.shape[-1] * k.shape[2] <= SAVED_PROBS_MAX_SCORES
        kept = []
        for rows, heads in head_chunks(q.shape[0], q.shape[1], q.shape[2] * k.shape[2]):
            probs = scaled_probs(q[rows, heads], k[rows, heads], _mask_rows(mask, rows))
            out[rows, heads] = torch.matmul(probs.to(q.dtype), v[rows, heads])
            if keep_probs:
                kept.append(probs)
        ctx.save_for_backward(q, k, v, mask, *kept)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q_scaled, k, v, mask, *kept = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = (torch.empty_strided(shape, stride, dtype=q_scaled.dtype, device=q_scaled.device)
                                  for shape, stride in ctx.layouts)
        scale = q_scaled.shape[-1] ** -0.5
        chunks = head_chunks(q_scaled.shape[0], q_scaled.shape[1], q_scaled.shape[2] * k.shape[2])
        for i, (rows, heads) in enumerate(chunks):
            q_, k_, v_, g_ = q_scaled[rows, heads], k[rows, heads], v[rows, heads], grad_out[rows, heads]
            probs = kept[i] if kept else scaled_probs(q_, k_, _mask_rows(mask, rows))
            grad_v[rows, heads] = torch.matmul(probs.to(q_.dtype).transpose(-1, -2), g_)
            grad_probs = torch.matmul(g_, v_.transpose(-1, -2)).float()
            # softmax backward in fp32, dS = P * (dP - rowsum(dP * P)), as one kernel (3x faster than the ops)
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, torch.float32).to(q_.dtype)
            torch.mul(torch.matmul(grad_scores, k_), scale, out=grad_q[rows, heads])
            grad_k[rows, heads] = torch.matmul(grad_scores.transpose(-1, -2), q_)
        return grad_q, grad_k, grad_v, None
