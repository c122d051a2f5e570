"""fp32 weights under CPU bf16 autocast, cast in each product instead of held for backward:
autocast's outputs and gradients bit for bit, and no bf16 weight copy kept by the graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import autocast_linear, packed_weights
from models.bart import BartForConditionalGeneration
from models.config import BartConfig

BF16_AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


@pytest.fixture
def autocasts_own(monkeypatch):
    """A function that turns this module off, so products run on autocast's F.linear."""
    return lambda: monkeypatch.setattr(autocast_linear, "_enabled", False)


def leaves(x_shape, out_features, bias, trained, x_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=g).to(x_dtype).requires_grad_(trained != "weight_only")
    weight = (0.1 * torch.randn(out_features, x_shape[-1], generator=g)).requires_grad_(trained != "input_only")
    b = (0.1 * torch.randn(out_features, generator=g)).requires_grad_(trained != "input_only") if bias else None
    return x, weight, b


def product_and_gradients(x, weight, bias, expect_ours: bool):
    for t in (x, weight, bias):
        if t is not None:
            t.grad = None
    with torch.autocast(**BF16_AUTOCAST):
        out = packed_weights.linear(x, weight, bias)
    assert (type(out.grad_fn).__name__ == "ViewBackward0"
            and type(out.grad_fn.next_functions[0][0]).__name__ == "_CastPerProductBackward") == expect_ours
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in (x, weight, bias) if t is not None]


@pytest.mark.parametrize("x_shape", [(3, 7, 48), (21, 48), (2, 16, 256)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("trained", ["all", "input_only", "weight_only"])
def test_outputs_and_gradients_are_autocasts_bit_for_bit(autocasts_own, x_shape, bias, trained):
    out_features = 1024 if x_shape[-1] == 256 else 40
    ours = product_and_gradients(*leaves(x_shape, out_features, bias, trained), expect_ours=True)
    autocasts_own()
    theirs = product_and_gradients(*leaves(x_shape, out_features, bias, trained), expect_ours=False)
    for mine, reference in zip(ours, theirs):
        if reference is None:
            assert mine is None
        else:
            assert mine.dtype == reference.dtype and torch.equal(mine, reference)


def test_a_bf16_input_gets_autocasts_gradient_too(autocasts_own):
    ours = product_and_gradients(*leaves((5, 9, 48), 40, True, "all", torch.bfloat16), expect_ours=True)
    autocasts_own()
    theirs = product_and_gradients(*leaves((5, 9, 48), 40, True, "all", torch.bfloat16), expect_ours=False)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def tiny_model() -> BartForConditionalGeneration:
    torch.manual_seed(0)
    # weight shapes [32, 32], [64, 32], [32, 64]: no activation below has 32 or 64 rows
    config = BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)
    return BartForConditionalGeneration(config).train()


def saved_for_backward(model: BartForConditionalGeneration, ids, labels) -> list[torch.Tensor]:
    saved = []

    def keep(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast(**BF16_AUTOCAST):
        model(ids, labels=labels, return_logits=False).loss.backward()
    return saved


def test_the_graph_holds_no_bf16_copy_of_a_trainable_weight(autocasts_own):
    ids, labels = torch.randint(3, 64, (2, 9)), torch.randint(3, 64, (2, 6))
    weight_shapes = {tuple(p.shape) for p in tiny_model().parameters() if p.dim() == 2}

    def bf16_weight_copies() -> int:
        return sum(t.dtype == torch.bfloat16 and tuple(t.shape) in weight_shapes
                   for t in saved_for_backward(tiny_model(), ids, labels))

    assert bf16_weight_copies() == 0
    autocasts_own()
    # autocast's F.linear saves a cast of each Linear's weight: 2 encoder layers x 6, 2 decoder
    # layers x 10, and the LM head
    assert bf16_weight_copies() == 33


def test_a_full_bf16_training_step_gives_autocasts_gradients_bit_for_bit(autocasts_own):
    ids, labels = torch.randint(3, 64, (2, 9)), torch.randint(3, 64, (2, 6))

    def gradients() -> dict[str, torch.Tensor]:
        model = tiny_model()
        torch.manual_seed(5)  # the same dropout masks
        with torch.autocast(**BF16_AUTOCAST):
            loss = model(ids, labels=labels, return_logits=False, loss_reduction="sum").loss
        loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    ours = gradients()
    autocasts_own()
    theirs = gradients()
    for name, grad in theirs.items():
        assert torch.equal(ours[name], grad), name


def test_a_weight_multiplied_twice_gets_its_products_gradients_added_in_fp32():
    """Autocast's cached cast would add the two bf16 gradients in bf16; here they add in fp32."""
    x, weight, bias = leaves((3, 7, 48), 40, True, "weight_only")
    x2 = x.detach() * 0.5 + 1.0
    with torch.autocast(**BF16_AUTOCAST):
        loss = sum(packed_weights.linear(inputs, weight, bias).float().sum() for inputs in (x, x2))
    loss.backward()
    separate = []
    for inputs in (x, x2):
        copy = weight.detach().clone().requires_grad_()
        with torch.autocast(**BF16_AUTOCAST):
            packed_weights.linear(inputs, copy, bias.detach()).float().sum().backward()
        separate.append(copy.grad)
    assert torch.equal(weight.grad, separate[0] + separate[1])


def test_other_products_keep_autocasts_f_linear():
    x, weight, bias = leaves((3, 7, 48), 40, True, "all")
    assert not autocast_linear.runs(x, weight, bias)  # no autocast
    with torch.autocast(**BF16_AUTOCAST):
        assert autocast_linear.runs(x, weight, bias)
        with torch.no_grad():  # nothing held for backward: autocast's own cast (and cache) is cheaper
            assert not autocast_linear.runs(x, weight, bias)
        assert not autocast_linear.runs(x, weight.detach().bfloat16(), bias.detach().bfloat16())
        assert not autocast_linear.runs(x.transpose(0, 1), weight, bias)  # F.linear adds the bias apart
        assert not autocast_linear.runs(x[None], weight, bias)  # 4-D: likewise
        assert not autocast_linear.runs(x.detach(), weight.detach(), bias.detach())
    with torch.autocast("cpu", dtype=torch.float16):
        assert not autocast_linear.runs(x, weight, bias)
    with torch.autocast(**BF16_AUTOCAST):
        assert type(F.linear(x, weight, bias).grad_fn).__name__ != "_CastPerProductBackward"
