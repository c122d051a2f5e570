"""The chunked token cross-entropy against F.cross_entropy: same loss, same gradient."""

import pytest
import torch
import torch.nn.functional as F

from models import cross_entropy as chunked
from models.cross_entropy import cross_entropy


def logits_and_labels(tokens: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=g) * 3).to(dtype)
    return logits, torch.randint(0, vocab, (tokens,), generator=g)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [1, 3, 64])  # several chunks, a ragged last chunk, one chunk
def test_fp32_loss_and_gradient_equal_f_cross_entropy(monkeypatch, reduction, chunk_rows):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", chunk_rows * 50)
    logits, labels = logits_and_labels(10, 50, torch.float32)
    ours_in, theirs_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, theirs = cross_entropy(ours_in, labels, reduction), F.cross_entropy(theirs_in, labels, reduction=reduction)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    (ours * 0.7).backward()
    (theirs * 0.7).backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-5, atol=1e-7)


def test_bf16_logits_give_the_fp32_loss_and_a_bf16_gradient_within_rounding():
    logits, labels = logits_and_labels(40, 300, torch.bfloat16, seed=1)
    ours_in, theirs_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = cross_entropy(ours_in, labels, "sum")
    theirs = F.cross_entropy(theirs_in.float(), labels, reduction="sum")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    (ours / 37).backward()
    (theirs / 37).backward()
    assert ours_in.grad.dtype == torch.bfloat16
    # two bf16 roundings (the unscaled gradient, then the scaled one) against theirs' one
    torch.testing.assert_close(ours_in.grad.float(), theirs_in.grad.float(), rtol=2 ** -7, atol=1e-6)


def test_without_gradient_no_gradient_buffer_is_made_and_the_loss_is_the_same():
    logits, labels = logits_and_labels(8, 30, torch.float32, seed=2)
    with torch.inference_mode():
        loss = cross_entropy(logits, labels, "mean")
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels), rtol=1e-6, atol=0)
    assert not loss.requires_grad


def test_the_input_logits_are_left_unchanged():
    logits, labels = logits_and_labels(6, 20, torch.float32, seed=3)
    before = logits.clone()
    cross_entropy(logits.requires_grad_(), labels).backward()
    assert torch.equal(logits.detach(), before)


def test_unknown_reduction_is_refused():
    logits, labels = logits_and_labels(2, 5, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, labels, "none")
