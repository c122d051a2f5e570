"""Float32 Linear products on oneDNN: F.linear's values and gradients, the same bits with or without
a recorded graph, and only where the product is float32 on the CPU outside autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import onednn_linear, packed_weights
from models.bart import BartForConditionalGeneration
from models.config import PRESETS

pytestmark = pytest.mark.skipif(not onednn_linear.AVAILABLE, reason="this torch build has no oneDNN linear op")


@pytest.fixture
def every_size(monkeypatch):
    """Small products too: below MIN_MACS `linear` leaves them to F.linear."""
    monkeypatch.setattr(onednn_linear, "MIN_MACS", 0)


def tensors(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in shapes]


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("trained", ["all", "input_only", "weight_only"])
def test_fp32_products_and_their_gradients_match_float64(every_size, layout, trained):
    x, weight, bias, grad = tensors((5, 3, 24), (40, 24), (40,), (3, 5, 40))
    x = x.transpose(0, 1) if layout == "strided" else x.transpose(0, 1).contiguous()  # [3, 5, 24] either way
    leaves = [x.clone().requires_grad_(trained != "weight_only"),  # clone keeps the strides
              weight.clone().requires_grad_(trained != "input_only"),
              bias.clone().requires_grad_(trained != "input_only")]
    assert leaves[0].is_contiguous() == (layout == "contiguous")
    out = packed_weights.linear(*leaves)
    assert type(out.grad_fn).__name__ == "_Fp32LinearBackward"
    out.backward(grad)
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    F.linear(*exact).backward(grad.double())
    torch.testing.assert_close(out.double(), F.linear(*exact), rtol=1e-5, atol=1e-5)
    for ours, reference in zip(leaves, exact):
        if ours.requires_grad:
            torch.testing.assert_close(ours.grad.double(), reference.grad, rtol=1e-5, atol=1e-5)
        else:
            assert ours.grad is None


def test_products_without_a_gradient_run_on_onednn_too_so_a_forward_gives_the_same_bits_recorded_or_not(every_size):
    torch.manual_seed(0)
    model = BartForConditionalGeneration(PRESETS["tiny"]).eval()
    ids = torch.randint(4, PRESETS["tiny"].vocab_size, (2, 9))
    recorded = model(ids, decoder_input_ids=ids[:, :5]).logits
    assert recorded.requires_grad
    with torch.inference_mode():
        inferred = model(ids, decoder_input_ids=ids[:, :5]).logits
    assert torch.equal(recorded, inferred)
    x, weight = tensors((4, 24), (40, 24))
    with torch.no_grad():
        assert torch.equal(packed_weights.linear(x, weight), onednn_linear.product(x, weight))


def test_products_below_min_macs_stay_on_f_linear():
    small_x, small_w = tensors((4, 32), (32, 32))  # 4096 multiply-adds
    big_x, big_w = tensors((64, 256), (256, 256))  # 4.2M
    small_w.requires_grad_(), big_w.requires_grad_()
    assert onednn_linear.MIN_MACS == 64 * 256 * 256
    assert type(packed_weights.linear(small_x, small_w).grad_fn).__name__ == "MmBackward0"
    assert type(packed_weights.linear(big_x, big_w).grad_fn).__name__ == "_Fp32LinearBackward"
    assert type(packed_weights.linear(big_x[:-1], big_w).grad_fn).__name__ == "MmBackward0"


def test_other_products_stay_on_f_linear(every_size):
    x, weight, bias = tensors((3, 24), (40, 24), (40,))
    weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast multiplies in bf16
        assert type(packed_weights.linear(x, weight, bias).grad_fn).__name__ != "_Fp32LinearBackward"
        assert not onednn_linear.runs(x, weight, bias)
    assert not onednn_linear.runs(x.double(), weight.double(), None)
    assert not onednn_linear.runs(x[0], weight, bias)  # 1-D input: F.linear's
    onednn_linear.set_enabled(False)
    try:
        out = packed_weights.linear(x, weight, bias)
        assert type(out.grad_fn).__name__ == "AddmmBackward0" and torch.equal(out, F.linear(x, weight, bias))
    finally:
        onednn_linear.set_enabled(True)
