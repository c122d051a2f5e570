"""The CPU bf16-autocast attention path (two bf16 matmuls + fp32 softmax) against SDPA."""

import torch
import torch.nn.functional as F

from models import attention_bf16
from models.attention_bf16 import attend_bf16 as _attend_bf16, head_chunks
from models.bart import Attention, BartForConditionalGeneration
from models.config import BartConfig


def qkv(queries: int, keys: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, n, 8, generator=g) for n in (queries, keys, keys))


def bf16_heads_with_padding(seed: int, padded_row: int, padded_from: int) -> tuple[torch.Tensor, ...]:
    """bf16 q [3, 4, 6, 8], k and v [3, 4, 9, 8], an output gradient, and a key-padding mask that
    hides keys `padded_from`.. of batch row `padded_row`."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 4, n, 8, generator=g).bfloat16() for n in (6, 9, 9))
    grad_out = torch.randn(3, 4, 6, 8, generator=g).bfloat16()
    padding = torch.ones(3, 9, dtype=torch.bool)
    padding[padded_row, padded_from:] = False
    return q, k, v, grad_out, padding[:, None, None, :]


def test_bf16_attention_matches_sdpa_with_padding_and_causal_masks():
    q, k, v = qkv(5, 7)
    padding = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)[:, None, None, :]
    bf = [t.bfloat16() for t in (q, k, v)]
    got = _attend_bf16(*bf, padding, False, 0.0).float()
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=padding), atol=3e-2, rtol=0)

    q, k, v = qkv(6, 6, seed=1)
    bf = [t.bfloat16() for t in (q, k, v)]
    got = _attend_bf16(*bf, None, True, 0.0).float()
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=3e-2, rtol=0)


def test_bf16_attention_ignores_masked_keys_and_future_positions():
    q, k, v = (t.bfloat16() for t in qkv(4, 6))
    padding = torch.tensor([[1, 1, 1, 1, 0, 0]] * 2, dtype=torch.bool)[:, None, None, :]
    changed = v.clone()
    changed[..., 4:, :] = 1e3  # only padded keys change
    assert torch.equal(_attend_bf16(q, k, v, padding, False, 0.0), _attend_bf16(q, k, changed, padding, False, 0.0))

    q, k, v = (t.bfloat16() for t in qkv(6, 6))
    later = v.clone()
    later[..., 3:, :] = 1e3  # positions 3.. must not reach queries 0..2
    a, b = _attend_bf16(q, k, v, None, True, 0.0), _attend_bf16(q, k, later, None, True, 0.0)
    assert torch.equal(a[..., :3, :], b[..., :3, :])
    assert not torch.equal(a[..., 3:, :], b[..., 3:, :])


def test_attention_uses_bf16_path_only_under_cpu_autocast():
    torch.manual_seed(0)
    attention = Attention(16, 2, dropout=0.0).eval()
    x = torch.randn(2, 5, 16)
    k, v = attention.project_kv(x)
    fp32 = attention(x, k, v)
    reference = F.scaled_dot_product_attention(attention._heads(attention.q_proj(x)), k, v)
    expected = attention.out_proj(reference.transpose(1, 2).reshape(2, 5, 16))
    assert torch.equal(fp32, expected)  # no autocast: SDPA exactly, so fp32 parity is untouched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        k16, v16 = attention.project_kv(x)
        mixed = attention(x, k16, v16)
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), fp32, atol=5e-2, rtol=0)


def test_bf16_autocast_training_step_gives_gradients_close_to_fp32():
    config = BartConfig.from_hf_dict(dict(model_type="bart", vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                          decoder_ffn_dim=32, max_position_embeddings=32, dropout=0.0))
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config).train()
    ids = torch.randint(3, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.randint(3, 50, (2, 5))

    def grads(autocast: bool) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, mask, labels=labels).loss
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss32, g32 = grads(False)
    loss16, g16 = grads(True)
    assert abs(loss16 - loss32) < 2e-2 * abs(loss32)
    assert len(g16) == len(g32)
    for a, b in zip(g16, g32):
        assert torch.linalg.vector_norm(a - b) <= 0.1 * torch.linalg.vector_norm(b) + 1e-6


def test_bf16_attention_backward_matches_sdpa_gradients():
    padding = torch.tensor([[1] * 7, [1] * 5 + [0] * 2], dtype=torch.bool)[:, None, None, :]
    for queries, keys, mask, causal in [(5, 7, padding, False), (6, 6, None, True)]:
        q, k, v = (t.requires_grad_() for t in qkv(queries, keys, seed=2))
        grad_out = torch.randn(2, 3, queries, 8, generator=torch.Generator().manual_seed(3))
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal).backward(grad_out)
        expected = [t.grad for t in (q, k, v)]
        bf = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
        _attend_bf16(*bf, mask, causal, 0.0).backward(grad_out.bfloat16())
        for got, want in zip(bf, expected):
            assert got.grad.dtype == torch.bfloat16
            torch.testing.assert_close(got.grad.float(), want, atol=5e-2, rtol=5e-2)


def test_head_chunks_cover_every_head_once_within_the_score_budget():
    for batch, heads, scores in [(4, 16, 64 * 64), (4, 16, 256 * 256), (3, 16, 1024 * 1024), (1, 3, 7)]:
        covered = torch.zeros(batch, heads, dtype=torch.int64)
        for rows, cols in head_chunks(batch, heads, scores):
            covered[rows, cols] += 1
            chunk_scores = covered[rows, cols].numel() * scores
            assert chunk_scores <= max(attention_bf16.CHUNK_SCORES, attention_bf16.MIN_CHUNK_HEADS * scores)
        assert torch.equal(covered, torch.ones_like(covered))


def test_chunked_attention_equals_all_heads_at_once(monkeypatch):
    """Forward and backward give the same values whether the heads go one chunk or many."""
    q, k, v, grad_out, padding = bf16_heads_with_padding(seed=4, padded_row=1, padded_from=5)

    def run(mask, causal):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = _attend_bf16(*leaves, mask, causal, 0.0)
        out.backward(grad_out)
        return [out] + [t.grad for t in leaves]

    for mask, causal in [(padding, False), (None, False)]:
        whole = run(mask, causal)
        monkeypatch.setattr(attention_bf16, "CHUNK_SCORES", 6 * 9)  # one head per chunk
        monkeypatch.setattr(attention_bf16, "MIN_CHUNK_HEADS", 1)
        assert len(head_chunks(3, 4, 6 * 9)) == 12
        for a, b in zip(whole, run(mask, causal)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        monkeypatch.undo()


def test_strided_heads_give_the_values_of_row_major_heads_and_gradients_in_their_layout():
    """The projections' heads are transposed views; the result must not depend on the layout,
    and each gradient comes back in its input's layout, so the caller's reshape stays a view."""
    g = torch.Generator().manual_seed(5)
    batch, heads, head_dim = 2, 4, 8
    padding = torch.ones(batch, 9, dtype=torch.bool)
    padding[1, 6:] = False
    padding = padding[:, None, None, :]
    as_projected = [torch.randn(batch, n, heads * head_dim, generator=g).bfloat16()
                    .view(batch, n, heads, head_dim).transpose(1, 2) for n in (6, 9, 9)]
    grad_out = torch.randn(batch, heads, 6, head_dim, generator=g).bfloat16()

    def run(tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out = _attend_bf16(*leaves, padding, False, 0.0)
        out.backward(grad_out)
        return [out] + [t.grad for t in leaves], leaves

    strided, leaves = run(as_projected)
    row_major, _ = run([t.contiguous() for t in as_projected])
    assert not any(t.is_contiguous() for t in as_projected)
    for a, b in zip(strided, row_major):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for leaf in leaves:
        assert leaf.grad.stride() == leaf.stride()
        leaf.grad.transpose(1, 2).view(batch, -1, heads * head_dim)  # a view: raises if it needs a copy


def test_kept_probabilities_give_the_gradients_of_recomputed_ones(monkeypatch):
    """Small calls keep their fp32 probabilities for backward; larger ones recompute them. The
    gradients must be the same bit for bit, and nothing is kept when no gradient is wanted."""
    q, k, v, grad_out, padding = bf16_heads_with_padding(seed=6, padded_row=2, padded_from=4)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = _attend_bf16(*leaves, padding, False, 0.0)
        saved = len(out.grad_fn.saved_tensors)
        out.backward(grad_out)
        return saved, [out] + [t.grad for t in leaves]

    monkeypatch.setattr(attention_bf16, "CHUNK_SCORES", 2 * 6 * 9)  # two heads per chunk: 6 chunks
    kept_count, kept = run()
    monkeypatch.setattr(attention_bf16, "SAVED_PROBS_MAX_SCORES", 3 * 4 * 6 * 9 - 1)  # one score too many
    recomputed_count, recomputed = run()
    assert (kept_count, recomputed_count) == (4 + 6, 4)
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    monkeypatch.undo()
    frozen = _attend_bf16(q, k, v, padding, False, 0.0)
    assert frozen.grad_fn is None and torch.equal(frozen, kept[0].detach())
