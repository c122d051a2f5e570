"""Token lookups that add their gradient rows into the embedding's .grad: autograd's gradients,
bit for bit, without autograd seeing the lookups as readers of the weight."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch

from data.batching import TokenizedSplit, collate
from engine.trainer import accumulate_gradients
from models import lookup_grad
from models.bart import BartForConditionalGeneration
from models.config import BartConfig

VOCAB = 24  # small, so the batch repeats ids within and across its rows


def tiny_model(tie: bool = True) -> BartForConditionalGeneration:
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, max_position_embeddings=64, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        dropout=0.0, tie_word_embeddings=tie)).train()


def padded_batches(count: int = 1):
    """Batches of uneven lengths (so with padding) of random ids from a small vocabulary."""
    g = torch.Generator().manual_seed(1)
    rows = lambda: [[0, *torch.randint(3, VOCAB, (int(n),), generator=g).tolist(), 2]
                    for n in torch.randint(3, 14, (3,), generator=g)]
    return [collate(TokenizedSplit(rows(), rows()), range(3), 1, 2) for _ in range(count)]


def gradients(model, batches, on: bool, bf16: bool = False) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            with lookup_grad.adding_rows_into_grad(on):
                loss = model(batch.input_ids, batch.attention_mask, batch.decoder_input_ids, labels=batch.labels,
                             loss_reduction="sum").loss
        loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16 autocast"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied head", "untied head"])
def test_rows_added_into_grad_give_autograds_gradients_bit_for_bit(bf16, tie):
    model = tiny_model(tie)
    batch = padded_batches()[0]
    assert (batch.input_ids == 1).any() and len(batch.input_ids.unique()) < batch.input_ids.numel()
    expected = gradients(model, [batch], on=False, bf16=bf16)
    got = gradients(model, [batch], on=True, bf16=bf16)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    shared = model.model.shared.weight.grad
    if not tie:  # the padding row gets no gradient from a lookup (from the head it does)
        assert shared[1].abs().sum() == 0
    assert shared[batch.input_ids[batch.input_ids != 1].unique()].abs().sum(-1).gt(0).all()


def test_a_lookup_alone_gives_f_embeddings_gradient_with_the_padding_row_left_out():
    embedding = torch.nn.Embedding(VOCAB, 8, padding_idx=1)
    ids = torch.tensor([[5, 1, 5, 7], [1, 7, 7, 5]])  # the padding id read, and ids repeated
    upstream = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(2))
    (embedding(ids) * upstream).sum().backward()
    expected, embedding.weight.grad = embedding.weight.grad, None
    with lookup_grad.adding_rows_into_grad():
        rows = lookup_grad.lookup(embedding, ids)
    assert torch.equal(rows, embedding(ids))
    (rows * upstream).sum().backward()
    assert embedding.weight.grad[1].abs().sum() == 0
    assert torch.equal(embedding.weight.grad, expected)


def weight_readers(loss: torch.Tensor, weight: torch.Tensor) -> int:
    """How many edges of `loss`'s graph lead to `weight`'s AccumulateGrad node."""
    count, seen, stack = 0, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None and getattr(child, "variable", None) is weight:
                count += 1
            stack.append(child)
    return count


def test_autograd_sees_only_the_head_read_the_tied_weight_so_no_lookup_makes_a_dense_gradient():
    model = tiny_model()
    batch = padded_batches()[0]
    weight = model.model.shared.weight
    readers = {}
    for on in (False, True):
        with lookup_grad.adding_rows_into_grad(on):
            loss = model(batch.input_ids, batch.attention_mask, batch.decoder_input_ids, labels=batch.labels).loss
        readers[on] = weight_readers(loss, weight)
    assert readers == {False: 3, True: 1}  # head + two lookups, or the head alone


def test_micro_batches_accumulate_the_rows_to_rounding():
    model = tiny_model()
    batches = padded_batches(3)
    expected = gradients(model, batches, on=False)
    got = gradients(model, batches, on=True)
    for name in expected:  # .grad takes the readers one by one here, not their sum: the last bits may differ
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6 * scale)
    shared = "model.shared.weight"
    assert not torch.equal(got[shared], torch.zeros_like(got[shared]))


def test_lookups_stay_plain_where_they_must():
    model = tiny_model()
    embedding = model.model.shared
    ids = padded_batches()[0].input_ids
    assert not lookup_grad.runs(embedding)  # switched off unless a caller switches it on
    with lookup_grad.adding_rows_into_grad():
        assert lookup_grad.runs(embedding)
        with torch.no_grad():
            assert not lookup_grad.runs(embedding)
        with lookup_grad.adding_rows_into_grad(False):  # nested: DDP's step
            assert not lookup_grad.runs(embedding)
        assert lookup_grad.runs(embedding)
        frozen = copy.deepcopy(embedding).requires_grad_(False)  # LoRA's
        assert not lookup_grad.runs(frozen) and not lookup_grad.lookup(frozen, ids).requires_grad
        for setting in (dict(max_norm=1.0), dict(scale_grad_by_freq=True), dict(sparse=True)):
            assert not lookup_grad.runs(torch.nn.Embedding(VOCAB, 4, **setting))
    assert not lookup_grad.runs(embedding)


def test_the_training_step_adds_the_rows_into_grad_on_one_process(monkeypatch):
    model = tiny_model()
    batches = padded_batches(1)
    seen = []
    real = lookup_grad.lookup

    def spy(embedding, ids):
        seen.append(lookup_grad.runs(embedding))
        return real(embedding, ids)

    monkeypatch.setattr("models.bart.lookup", spy)
    accumulate_gradients(model, batches, torch.device("cpu"))
    assert seen == [True, True]  # the encoder's lookup and the decoder's
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(lookup_grad, "runs", lambda embedding: False)
    accumulate_gradients(model, batches, torch.device("cpu"))
    for name, p in model.named_parameters():
        assert torch.equal(got[name], p.grad), name
