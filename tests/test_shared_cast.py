"""One autocast cast per activation, shared by the Linears that read it, with autocast's fp32
gradient sum."""

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import models.bart as bart
from engine.lora import inject_lora
from models.bart import BartForConditionalGeneration
from models.config import BartConfig
from models.shared_cast import cast_for_readers

BF16_AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


class CastsOf(TorchDispatchMode):
    """Counts fp32 -> bf16 casts of one tensor (by storage) under autocast."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.pointer, self.count = tensor.data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten._to_copy.default and args[0].data_ptr() == self.pointer
                and kwargs.get("dtype") == torch.bfloat16):
            self.count += 1
        return func(*args, **kwargs)


def tiny_model(seed: int = 0) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    config = BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                        dropout=0.0)
    return BartForConditionalGeneration(config)


def test_readers_get_autocasts_values_and_the_gradient_is_autocasts_fp32_sum_bit_for_bit():
    torch.manual_seed(0)
    leaf = torch.randn(64, 48, requires_grad=True)
    weights = [torch.randn(40, 48) for _ in range(3)]
    upstream = [torch.randn(64, 40).bfloat16() for _ in range(3)]

    def run(shared: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        leaf.grad = None
        x = leaf * 1.0  # an activation, not a leaf: autocast caches casts of leaves only
        with torch.autocast(**BF16_AUTOCAST):
            readers = cast_for_readers(x, 3) if shared else (x, x, x)
            outs = [F.linear(r, w) for r, w in zip(readers, weights)]
        torch.autograd.backward(outs, upstream)
        return outs, leaf.grad.clone()

    shared_outs, shared_grad = run(shared=True)
    plain_outs, plain_grad = run(shared=False)
    for a, b in zip(shared_outs, plain_outs):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert shared_grad.dtype == torch.float32
    assert torch.equal(shared_grad, plain_grad)


def test_readers_that_take_no_gradient_are_left_out_of_the_sum():
    x = torch.randn(4, 8, requires_grad=True) * 1.0
    with torch.autocast(**BF16_AUTOCAST):
        first, _, third = cast_for_readers(x, 3)
    grad, = torch.autograd.grad(first.float().sum() + 2 * third.float().sum(), x)
    assert torch.equal(grad, torch.full((4, 8), 3.0))


def test_without_autocast_or_for_a_low_precision_input_every_reader_gets_the_input_itself():
    x = torch.randn(3, 5)
    assert all(r is x for r in cast_for_readers(x, 3))
    with torch.autocast(**BF16_AUTOCAST):
        half = x.bfloat16()
        assert all(r is half for r in cast_for_readers(half, 2))


def test_an_encoder_layer_casts_its_input_once_for_q_k_v_and_their_lora_branches():
    model = tiny_model()
    inject_lora(model, "q_proj,v_proj", rank=4, alpha=8)
    layer = model.model.encoder.layers[0]
    x = torch.randn(2, 6, 32)
    with torch.autocast(**BF16_AUTOCAST), CastsOf(x) as casts:
        layer(x, None)
    assert casts.count == 1  # autocast alone: q, k, v and both LoRA branches, five casts


def test_the_decoder_casts_the_encoder_output_once_for_every_layers_cross_attention():
    model = tiny_model()
    memory = torch.randn(2, 7, 32)
    ids = torch.randint(3, 64, (2, 5))
    with torch.autocast(**BF16_AUTOCAST), CastsOf(memory) as casts:
        model.model.decoder(ids, memory)
    assert casts.count == 1  # autocast alone: k_proj and v_proj of each of the 3 layers


def test_a_bf16_training_step_gives_the_gradients_of_autocasts_own_casts(monkeypatch):
    ids = torch.randint(3, 64, (2, 9))
    labels = torch.randint(3, 64, (2, 6))

    def gradients() -> dict[str, torch.Tensor]:
        model = tiny_model(seed=1)
        with torch.autocast(**BF16_AUTOCAST):
            loss = model(ids, labels=labels, return_logits=False).loss
        loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    shared = gradients()
    monkeypatch.setattr(bart, "cast_for_readers", lambda x, readers: (x,) * readers)
    plain = gradients()
    for name, grad in shared.items():
        # the same bf16 products summed in fp32; only the order of the sum may differ
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-6, msg=name)
