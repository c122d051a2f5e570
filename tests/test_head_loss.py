"""The training loss of a frozen LM head, computed a few target rows at a time (models/head_loss.py)."""

import pytest
import torch
import torch.nn.functional as F

from engine.lora import inject_lora, lora_state_dict, mark_only_lora_trainable
from engine.peft_adapter import to_peft_key
from models import bart, packed_weights
from models.cross_entropy import cross_entropy
from models.head_loss import chunked_head_loss
from tests.oracle import hf_config, padded_batch, twin_models


def frozen_head(seed: int = 0, rows: int = 10, dim: int = 16, vocab: int = 37):
    g = torch.Generator().manual_seed(seed)
    head = packed_weights.Linear(dim, vocab)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, dim, generator=g))
        head.bias.copy_(torch.randn(vocab, generator=g))
    head.requires_grad_(False)
    return head, torch.randn(rows, dim, generator=g), torch.randint(0, vocab, (rows,), generator=g)


def loss_and_rows_grad(loss_fn, rows, upstream: float):
    rows = rows.clone().requires_grad_()
    loss = loss_fn(rows)
    (loss * upstream).backward()
    return loss.detach(), rows.grad


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_rows", [1, 3, 10, 64])
def test_chunked_head_loss_equals_the_one_product_loss_and_its_rows_gradient(reduction, chunk_rows):
    head, rows, labels = frozen_head()
    want = loss_and_rows_grad(lambda x: cross_entropy(head(x), labels, reduction), rows, upstream=2.5)
    got = loss_and_rows_grad(lambda x: chunked_head_loss(head, x, labels, chunk_rows, reduction), rows, upstream=2.5)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_chunked_head_loss_under_bf16_autocast_uses_the_held_copy_and_matches_within_bf16_rounding():
    head, rows, labels = frozen_head(rows=12)
    packed_weights.hold_autocast_copy(head.weight, torch.bfloat16)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = loss_and_rows_grad(lambda x: cross_entropy(head(x), labels, "mean"), rows, upstream=3.0)
            got = loss_and_rows_grad(lambda x: chunked_head_loss(head, x, labels, 5, "mean"), rows, upstream=3.0)
    finally:
        packed_weights.release([head.weight])
    assert got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0])
    # the scale multiplies the bf16 logits' gradient there and the fp32 rows' gradient here
    torch.testing.assert_close(got[1], want[1], rtol=1e-2, atol=1e-3)


def test_chunked_head_loss_rejects_an_unknown_reduction():
    head, rows, labels = frozen_head()
    with pytest.raises(ValueError, match="reduction"):
        chunked_head_loss(head, rows, labels, 4, "none")


def lora_twins(rank: int = 4):
    """Ours and PEFT-on-Transformers with the same weights and the same non-zero q/v adapters."""
    peft = pytest.importorskip("peft")
    ours, theirs = twin_models(hf_config(dropout=0.0))
    inject_lora(ours, "q_proj,v_proj", rank=rank, alpha=8.0)
    mark_only_lora_trainable(ours)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:  # the adapters: B non-zero, so A gets a gradient too
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=rank, lora_alpha=8.0, lora_dropout=0.0,
                                                         target_modules=["q_proj", "v_proj"]))
    their_state = {to_peft_key(key): value for key, value in lora_state_dict(ours).items()}
    assert not peft.set_peft_model_state_dict(theirs, their_state).unexpected_keys
    return ours.train(), theirs.train()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lora_loss_and_gradients_with_the_head_in_chunks_match_peft(monkeypatch, reduction):
    ours, theirs = lora_twins()
    input_ids, attention_mask, labels = padded_batch(97)
    targets = int((labels != -100).sum())
    monkeypatch.setattr(bart, "HEAD_CHUNK_ROWS", 4)
    rows_per_call = []
    ours.lm_head.register_forward_hook(lambda module, args, out: rows_per_call.append(out.shape[0]))

    out = ours(input_ids, attention_mask, labels=labels, return_logits=False, loss_reduction=reduction)
    (out.loss * 1.5).backward()
    logits = theirs(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
    their_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction=reduction)
    (their_loss * 1.5).backward()

    assert rows_per_call == [4] * (targets // 4) + ([targets % 4] if targets % 4 else [])
    torch.testing.assert_close(out.loss, their_loss, atol=1e-5, rtol=1e-5)
    their_grads = {name.replace(".default", ""): p.grad for name, p in theirs.named_parameters() if p.requires_grad}
    trained = {name: p for name, p in ours.named_parameters() if p.requires_grad}
    assert len(trained) == len(their_grads) > 0
    for name, param in trained.items():
        torch.testing.assert_close(param.grad, their_grads[to_peft_key(name)], atol=1e-5, rtol=1e-4, msg=name)


def test_a_head_that_trains_keeps_its_logits_in_one_product(monkeypatch):
    ours, _ = twin_models(hf_config(dropout=0.0))
    input_ids, attention_mask, labels = padded_batch(97)
    monkeypatch.setattr(bart, "HEAD_CHUNK_ROWS", 4)
    rows_per_call = []
    ours.lm_head.register_forward_hook(lambda module, args, out: rows_per_call.append(out.shape[0]))
    ours(input_ids, attention_mask, labels=labels, return_logits=False).loss.backward()
    assert rows_per_call == [int((labels != -100).sum())]  # its weight's gradient needs every row's logits
    assert ours.lm_head.weight.grad is not None


def test_a_device_left_out_of_the_chunked_training_loss_keeps_one_product(monkeypatch):
    ours, _ = lora_twins()
    input_ids, attention_mask, labels = padded_batch(97)
    monkeypatch.setattr(bart, "HEAD_CHUNK_ROWS", 4)
    monkeypatch.setattr(bart, "CHUNKED_TRAINING_LOSS_DEVICES", ())
    rows_per_call = []
    ours.lm_head.register_forward_hook(lambda module, args, out: rows_per_call.append(out.shape[0]))
    ours(input_ids, attention_mask, labels=labels, return_logits=False).loss.backward()
    assert rows_per_call == [int((labels != -100).sum())]
