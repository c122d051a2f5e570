"""Prepacked oneDNN weights: the same products as the plain weight, repacked when the weight changes,
freed with it, and in generation kept only for frozen weights."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

from models import packed_weights
from models.onednn_linear import product as linear
from models.generate import cast_for_inference, generate, per_token_weights
from tests.test_generate import BASE, CASES, assert_same_ids, build_pair, padded_batch, their_generate

pytestmark = pytest.mark.skipif(not packed_weights.AVAILABLE, reason="this torch build cannot prepack for oneDNN")

DTYPES = [torch.float32] + ([torch.bfloat16] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])




def parameter(rows: int, columns: int, dtype=torch.float32, seed: int = 0) -> nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(rows, columns, generator=g).to(dtype), requires_grad=False)


def assert_same_product(packed_result, plain_result):
    """bf16: bit for bit, which training relies on (`linear` runs bf16 packs only). fp32: to
    rounding. On this project's AMD EPYC fp32 is bit for bit too, but on an Intel Xeon with AMX
    (an H100 host, session 8) oneDNN ran the plain fp32 weight on other kernels at 1 and 4 rows.
    Generation, the only user of fp32 packs, is checked against Transformers' ids instead."""
    if packed_result.dtype == torch.bfloat16:
        assert torch.equal(packed_result, plain_result)
    else:
        torch.testing.assert_close(packed_result, plain_result, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 4, 16, 300])
def test_packed_weight_gives_the_plain_weights_products(dtype, rows):
    weight = parameter(96, 64, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, rows, 64, generator=g).to(dtype)
    bias = torch.randn(96, generator=g).to(dtype)
    packed = packed_weights.prepacked(weight)
    assert packed.is_mkldnn  # a real pack, not the weight handed back
    assert_same_product(linear(x, packed, bias), linear(x, weight, bias))
    assert_same_product(linear(x, packed), linear(x, weight))


def test_a_pack_is_made_once_and_reused_while_the_weight_is_unchanged():
    weight = parameter(32, 16)
    assert packed_weights.prepacked(weight) is packed_weights.prepacked(weight)


def test_an_in_place_change_or_a_new_storage_gets_a_new_pack():
    weight = parameter(32, 16)
    x = torch.randn(4, 16)
    first = packed_weights.prepacked(weight)
    with torch.no_grad():
        weight.mul_(2.0)  # as an optimizer step or LoRA's merge would
    second = packed_weights.prepacked(weight)
    assert second is not first
    assert_same_product(linear(x, second), linear(x, weight.detach().clone()))

    weight.data = torch.randn(32, 16)  # what Module.to() does; the version counter stays the same
    third = packed_weights.prepacked(weight)
    assert third is not second
    assert_same_product(linear(x, third), linear(x, weight.detach().clone()))


def test_a_pack_is_freed_with_its_weight():
    weight = parameter(256, 128)
    gc.collect()  # weights other tests left for the collector go first, not during the count
    before = packed_weights.packed_bytes()
    packed_weights.prepacked(weight)
    assert packed_weights.packed_bytes() - before == 256 * 128 * 4
    del weight
    gc.collect()
    assert packed_weights.packed_bytes() == before


def test_only_cpu_parameters_with_a_version_counter_are_packed():
    assert packed_weights.can_pack(parameter(8, 4))
    assert not packed_weights.can_pack(torch.randn(8, 4))  # a per-call tensor (a cast LoRA factor)
    with torch.inference_mode():
        made_in_inference = nn.Parameter(torch.randn(8, 4), requires_grad=False)
    assert not packed_weights.can_pack(made_in_inference)
    assert not packed_weights.can_pack(nn.Parameter(torch.randn(8)))


needs_bf16 = pytest.mark.skipif(not packed_weights.BF16_AVAILABLE, reason="bf16 F.linear does not run on oneDNN here")


def bf16_layer(seed: int = 0) -> packed_weights.Linear:
    torch.manual_seed(seed)
    layer = packed_weights.Linear(48, 80).requires_grad_(False)
    layer.weight = nn.Parameter(layer.weight.detach().bfloat16(), requires_grad=False)  # as training holds it
    return layer


@needs_bf16
@pytest.mark.parametrize("inputs", ["fp32 under autocast", "bf16", "bf16 2-d"])
def test_linear_on_a_pack_gives_f_linears_output_and_input_gradient_bit_for_bit(inputs):
    layer = bf16_layer()
    packed_weights.prepacked(layer.weight)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 64, 48, generator=g)
    if inputs == "bf16 2-d":
        x = x[0]
    autocast = inputs == "fp32 under autocast"
    if autocast:
        bias = layer.bias  # fp32: autocast casts it, as it casts x
    else:
        x = x.bfloat16()
        bias = layer.bias.detach().bfloat16()
    results = []
    for run in (packed_weights.linear, torch.nn.functional.linear):
        leaf = x.detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = run(leaf, layer.weight, bias)
        out.float().pow(2).sum().backward()
        results.append((out, leaf.grad))
    (out, grad), (expected_out, expected_grad) = results
    assert "_PackedLinear" in type(out.grad_fn).__name__  # it did run on the pack
    assert out.dtype == expected_out.dtype and torch.equal(out, expected_out)
    assert torch.equal(grad, expected_grad)


@needs_bf16
def test_linear_runs_f_linear_where_a_pack_would_not_give_its_numbers():
    layer = bf16_layer()
    x = torch.randn(2, 5, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed_weights.usable_pack(x, layer.weight, layer.bias) is None  # no pack made
        packed_weights.prepacked(layer.weight)
        assert packed_weights.usable_pack(x, layer.weight, layer.bias) is not None
        trainable = nn.Parameter(layer.weight.detach().clone())
        packed_weights.prepacked(trainable)
        assert packed_weights.usable_pack(x, trainable, layer.bias) is None  # it needs a weight gradient
    assert packed_weights.usable_pack(x.bfloat16(), layer.weight, layer.bias.bfloat16()) is not None
    strided = x.transpose(0, 1).bfloat16()  # F.linear adds the bias to these in a second rounding
    assert packed_weights.usable_pack(strided, layer.weight, layer.bias.bfloat16()) is None
    with pytest.raises(RuntimeError):  # fp32 x on a bf16 weight, no autocast: F.linear's own error
        packed_weights.linear(x, layer.weight, layer.bias)
    fp32 = parameter(80, 48)
    packed_weights.prepacked(fp32)  # as fp32 generation leaves it
    assert packed_weights.usable_pack(x, fp32, None) is not None  # no gradient: oneDNN's product either way
    assert packed_weights.usable_pack(x.requires_grad_(), fp32, None) is None  # backward runs on the plain weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed_weights.usable_pack(x.detach(), fp32, None) is None  # autocast multiplies in bf16


@needs_bf16
def test_linear_repacks_a_frozen_weight_that_changed_in_place():
    layer = bf16_layer()
    packed_weights.prepacked(layer.weight)
    x = torch.randn(2, 5, 48).bfloat16()
    with torch.no_grad():
        layer.weight.mul_(-0.5)  # as DDP's start-up broadcast or LoRA's merge would
        assert torch.equal(packed_weights.linear(x, layer.weight), torch.nn.functional.linear(x, layer.weight))


def autocast_products(weight: torch.Tensor, x: torch.Tensor):
    """(output, x's gradient, the weight's gradient) of `packed_weights.linear` under CPU bf16 autocast."""
    leaf = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed_weights.linear(leaf, weight)
    out.float().pow(2).sum().backward()
    return out, leaf.grad, weight.grad


@needs_bf16
def test_a_held_bf16_copy_gives_autocasts_products_without_casting_the_fp32_weight():
    weight = parameter(80, 48, seed=3)  # frozen fp32, as the LM head tied to the embedding
    x = torch.randn(3, 16, 48, generator=torch.Generator().manual_seed(4))
    expected = autocast_products(weight, x)  # autocast's cast in the call
    packed_weights.hold_autocast_copy(weight, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        held = packed_weights.autocast_copy(x, weight)
    assert held is not None and held.dtype == torch.bfloat16 and torch.equal(held, weight.bfloat16())
    assert id(held) in packed_weights._packs  # and the copy runs on its pack
    out, grad, _ = autocast_products(weight, x)
    assert "_PackedLinear" in type(out.grad_fn).__name__
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected[0]) and torch.equal(grad, expected[1])
    assert weight.dtype == torch.float32  # the weight itself is left as it was
    packed_weights.release([weight])
    assert id(weight) not in packed_weights._copies


@needs_bf16
def test_a_held_copy_is_not_used_outside_autocast_or_for_a_trainable_weight_and_is_remade_after_a_change():
    weight = parameter(80, 48, seed=5)
    x = torch.randn(2, 8, 48, generator=torch.Generator().manual_seed(6))
    packed_weights.hold_autocast_copy(weight, torch.bfloat16)
    out = packed_weights.linear(x, weight)  # no autocast: plain fp32
    assert out.dtype == torch.float32 and torch.equal(out, torch.nn.functional.linear(x, weight))
    weight.requires_grad_(True)  # it now needs a gradient, which only the fp32 weight can take
    _, _, weight_grad = autocast_products(weight, x)
    assert weight_grad is not None and weight_grad.dtype == torch.float32
    weight.requires_grad_(False)
    stale = packed_weights._copies[id(weight)].made
    with torch.no_grad():
        weight.mul_(-2.0)  # changed in place, as DDP's start-up broadcast would: the copy is stale
    expected = torch.nn.functional.linear(x.bfloat16(), weight.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(packed_weights.linear(x, weight), expected)
    fresh = packed_weights._copies[id(weight)].made  # made again from the new values
    assert fresh is not stale and torch.equal(fresh, weight.bfloat16())


def fp32_layer(seed: int = 7) -> packed_weights.Linear:
    torch.manual_seed(seed)
    return packed_weights.Linear(48, 80)  # fp32 and trainable, as a full fine-tune holds it


def spy_on_products(monkeypatch) -> list[torch.Tensor]:
    """The weights `packed_weights.linear` hands oneDNN's product from now on."""
    weights = []
    real = packed_weights.onednn_linear.product

    def product(x, weight, bias=None):
        weights.append(weight)
        return real(x, weight, bias)

    monkeypatch.setattr(packed_weights.onednn_linear, "product", product)
    return weights


@needs_bf16
def test_packed_casts_give_autocasts_products_on_a_pack_and_are_dropped_when_the_block_ends(monkeypatch):
    layer = fp32_layer()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 16, 48, generator=g)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # as validation runs
        expected = [torch.nn.functional.linear(x, layer.weight, layer.bias),
                    torch.nn.functional.linear(x[0], layer.weight, layer.bias),
                    torch.nn.functional.linear(x.bfloat16(), layer.weight, layer.bias)]
        products = spy_on_products(monkeypatch)
        with packed_weights.packed_casts([layer.weight]):
            got = [layer(x), layer(x[0]), layer(x.bfloat16())]
        assert len(products) == 3 and all(w.is_mkldnn and w.dtype == torch.bfloat16 for w in products)
        assert id(layer.weight) not in packed_weights._cast_packs
        products.clear()
        layer(x)  # after the block: autocast's cast again
        assert not any(w.is_mkldnn for w in products)
    for out, reference in zip(got, expected):
        assert out.dtype == torch.bfloat16 and torch.equal(out, reference)
    assert layer.weight.dtype == torch.float32 and layer.weight.requires_grad  # the weight is left as it was
    with pytest.raises(ValueError), packed_weights.packed_casts([layer.weight]):
        raise ValueError("a failed validation")
    assert not packed_weights._cast_packs  # dropped however the block ends


@needs_bf16
def test_a_packed_cast_is_not_used_where_autocast_would_give_other_numbers_or_a_gradient_is_needed():
    layer = fp32_layer()
    x = torch.randn(2, 8, 48, generator=torch.Generator().manual_seed(9))
    with packed_weights.packed_casts([layer.weight]):
        assert id(layer.weight) in packed_weights._cast_packs
        with torch.no_grad():
            assert packed_weights.cast_pack(x, layer.weight, layer.bias) is None  # no autocast: fp32
            assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
            with torch.autocast("cpu", dtype=torch.float16):
                assert packed_weights.cast_pack(x, layer.weight, layer.bias) is None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert packed_weights.cast_pack(x, layer.weight, layer.bias) is not None
                assert packed_weights.cast_pack(x.transpose(0, 1), layer.weight, layer.bias) is None  # strided
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert packed_weights.cast_pack(x, layer.weight, layer.bias) is None  # the weight needs a gradient
            layer(x).float().sum().backward()
        assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
        with torch.no_grad():
            layer.weight.mul_(-2.0)  # changed inside the block: its pack is stale
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert packed_weights.cast_pack(x, layer.weight, layer.bias) is None
                assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


@needs_bf16
def test_packed_casts_leave_bf16_weights_held_copies_and_switched_off_packing_alone(monkeypatch):
    bf16, held, plain = bf16_layer().weight, parameter(80, 48, seed=10), fp32_layer().weight
    packed_weights.hold_autocast_copy(held, torch.bfloat16)
    with packed_weights.packed_casts([bf16, held, plain]):
        assert set(packed_weights._cast_packs) == {id(plain)}
        with packed_weights.packed_casts([plain]):  # nested: the outer block's pack stays until it ends
            pass
        assert set(packed_weights._cast_packs) == {id(plain)}
    packed_weights.release([held])
    monkeypatch.setattr(packed_weights, "_enabled", False)  # the scripts' --no-weight-packs
    with packed_weights.packed_casts([plain]):
        assert not packed_weights._cast_packs


@needs_bf16
def test_packed_casts_pack_the_largest_weight_first_so_its_casts_memory_is_reused(monkeypatch):
    small, large, middle = parameter(16, 48, seed=11), parameter(96, 48, seed=12), parameter(40, 48, seed=13)
    for weight in (small, large, middle):
        weight.requires_grad_(True)
    order = []
    reorder = packed_weights._reorder
    monkeypatch.setattr(packed_weights, "_reorder",
                        lambda weight, dtype=None: order.append(weight.shape[0]) or reorder(weight, dtype))
    with packed_weights.packed_casts([small, large, middle]):
        assert set(packed_weights._cast_packs) == {id(small), id(large), id(middle)}
    assert order == [96, 40, 16]


def packs_seen_per_forward(model) -> list[int]:
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(len(packed_weights._cast_packs)))
    return seen


@needs_bf16
@pytest.mark.parametrize("records", [12, 4], ids=["three batches", "one batch"])
def test_validation_under_bf16_autocast_casts_each_weight_once_per_pass_with_the_same_loss(records, monkeypatch):
    from data.batching import TokenizedSplit
    from engine.evaluation import evaluate_loss
    _, model = build_pair("d32-b")  # fp32 weights that need gradients: full fine-tuning's validation
    g = torch.Generator().manual_seed(11)
    rows = lambda n: [[0, *torch.randint(4, model.config.vocab_size, (n,), generator=g).tolist(), 2]
                      for _ in range(records)]
    split = TokenizedSplit(rows(13), rows(6))
    config = model.config

    def validate():
        return evaluate_loss(model, split, 4, "cpu", config.pad_token_id, config.decoder_start_token_id,
                             torch.autocast("cpu", dtype=torch.bfloat16)).loss

    seen = packs_seen_per_forward(model)
    loss = validate()
    linears = len(packed_weights.linear_weights(model))
    assert seen == ([linears] * 3 if records == 12 else [0])  # one batch: nothing to share a cast with
    assert not packed_weights._cast_packs
    monkeypatch.setattr(packed_weights, "_enabled", False)
    assert validate() == loss  # every batch cast by autocast itself: the same loss, bit for bit


def decoder_weight_ids(model) -> set[int]:
    return {id(p) for p in per_token_weights(model)}


def packed_ids() -> set[int]:
    return set(packed_weights._packs)


@pytest.mark.parametrize("num_beams", [1, 4], ids=["greedy", "beam4"])
def test_generation_keeps_the_packs_of_frozen_decoder_weights_and_gives_transformers_ids(num_beams):
    theirs, ours = build_pair("d32-b")
    ours.requires_grad_(False)
    ids, mask = padded_batch(ours.config.vocab_size)
    settings = dict(BASE, **CASES["cnn-like"], num_beams=num_beams)
    first = generate(ours, ids, mask, **settings)
    # q, k, v and out of both attentions, fc1 and fc2 in every decoder layer, and the LM head
    assert len(packed_ids() & decoder_weight_ids(ours)) == 10 * ours.config.decoder_layers + 1
    assert not packed_ids() & {id(p) for p in ours.model.encoder.parameters() if p is not ours.lm_head.weight}
    second = generate(ours, ids, mask, **settings)  # on the packs kept from the first call
    expected = their_generate(theirs, ids, mask, **settings)
    assert_same_ids(first, expected)
    assert_same_ids(second, expected)


def test_generation_drops_the_packs_of_trainable_weights():
    _, ours = build_pair("d32-b")
    ids, mask = padded_batch(ours.config.vocab_size)
    generate(ours, ids, mask, **BASE)
    assert not packed_ids() & decoder_weight_ids(ours)


def test_generation_after_a_frozen_weight_changes_uses_the_new_values():
    _, ours = build_pair("d32-b")
    ours.requires_grad_(False)
    ids, mask = padded_batch(ours.config.vocab_size)
    original = generate(ours, ids, mask, **BASE)
    with torch.no_grad():
        ours.lm_head.weight.mul_(-1.0)  # tied: the embedding changes too
        ours.model.decoder.layers[0].fc1.weight.mul_(3.0)
    after = generate(ours, ids, mask, **BASE)
    _, fresh = build_pair("d32-b")  # trainable: packed afresh in its call, dropped after it
    fresh.load_state_dict(ours.state_dict())
    assert_same_ids(after, generate(fresh, ids, mask, **BASE))
    assert not torch.equal(after, original)  # else a stale pack would go unseen


@needs_bf16
def test_a_model_cast_for_bf16_inference_runs_every_linear_on_a_pack_with_the_same_logits():
    _, model = build_pair("d32-b")
    plain = cast_for_inference(copy.deepcopy(model), torch.bfloat16)
    packed_weights.release(plain.parameters())
    packed = cast_for_inference(model, torch.bfloat16)
    linears = [m for m in packed.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 6 * packed.config.encoder_layers + 10 * packed.config.decoder_layers + 1
    assert {id(m.weight) for m in linears} <= packed_ids()
    assert id(packed.model.decoder.embed_positions.weight) not in packed_ids()
    assert not any(p.requires_grad for p in packed.parameters())  # frozen: the packs stay valid

    ids, mask = padded_batch(packed.config.vocab_size)
    labels = ids[:, :6].clone()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # as evaluate.py runs it
        x = torch.randn(2, 3, packed.config.d_model)
        assert packed_weights.usable_pack(x, linears[0].weight, linears[0].bias) is not None
        assert packed_weights.usable_pack(x, plain.lm_head.weight, None) is None
        got = packed(ids, mask, labels=labels)
        expected = plain(ids, mask, labels=labels)
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.loss, expected.loss)


def test_packing_switched_off_makes_no_pack_and_frees_those_made(monkeypatch):
    monkeypatch.setattr(packed_weights, "_enabled", True)  # restored after the test
    weight = parameter(16, 8)
    packed_weights.prepacked(weight)
    packed_weights.set_enabled(False)
    assert id(weight) not in packed_ids()
    assert not packed_weights.can_pack(weight)
    _, model = build_pair("d32-b")
    model.requires_grad_(False)
    ids, mask = padded_batch(model.config.vocab_size)
    generate(model, ids, mask, **BASE)
    cast_for_inference(model, torch.bfloat16)
    assert not packed_ids()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_weight_moved_to_the_gpu_drops_its_cpu_pack_at_its_first_product_there():
    layer = packed_weights.Linear(64, 96).requires_grad_(False)
    weight = layer.weight
    packed_weights.prepacked(weight)
    layer.to("cuda")
    assert layer.weight is weight  # `.to` moved the data, so the pack's entry is still alive
    x = torch.randn(4, 64, device="cuda")
    out = layer(x)
    assert id(weight) not in packed_weights._packs
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias))
