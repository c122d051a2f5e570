"""The CPU dropout: drops each element with probability p, keeps the mean, is seeded like torch."""

import pytest
import torch

from models.dropout import LEVELS, dropout


def test_each_element_is_dropped_with_probability_p_in_every_lane_of_the_random_words():
    torch.manual_seed(0)
    n = 1 << 20
    kept = dropout(torch.ones(n), 0.1, training=True) != 0
    # one 64-bit draw serves four consecutive elements; each of the four must drop at rate p
    for lane in range(4):
        rate = 1 - kept[lane::4].float().mean().item()
        assert abs(rate - 0.1) < 5 * (0.1 * 0.9 / (n / 4)) ** 0.5, (lane, rate)
    # and neighbours are independent: both dropped at rate p^2
    both = (~kept[0::2] & ~kept[1::2]).float().mean().item()
    assert abs(both - 0.01) < 0.002


def test_kept_values_are_scaled_to_keep_the_expected_value_exactly():
    torch.manual_seed(1)
    x = torch.randn(4, 64, 32)
    out = dropout(x, 0.3, training=True)
    dropped_levels = round(0.3 * LEVELS)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] * (LEVELS / (LEVELS - dropped_levels)), rtol=0, atol=0)


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    x = torch.randn(3, 50, requires_grad=True)
    out = dropout(x, 0.25, training=True)
    out.sum().backward()
    scale = LEVELS / (LEVELS - round(0.25 * LEVELS))
    torch.testing.assert_close(x.grad, (out != 0).float() * scale, rtol=0, atol=0)


def test_same_seed_same_mask_and_consecutive_calls_differ():
    x = torch.ones(1000)
    torch.manual_seed(3)
    a, b = dropout(x, 0.5, True), dropout(x, 0.5, True)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.5, True), a)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("p, training", [(0.0, True), (0.4, False)])
def test_identity_when_not_training_or_p_is_zero(p, training):
    x = torch.randn(10)
    assert dropout(x, p, training) is x


def test_bf16_input_stays_bf16():
    torch.manual_seed(4)
    out = dropout(torch.ones(100, dtype=torch.bfloat16), 0.1, True)
    assert out.dtype == torch.bfloat16
    assert set(out.unique().tolist()) <= {0.0, float(torch.tensor(LEVELS / (LEVELS - round(0.1 * LEVELS))).bfloat16())}
