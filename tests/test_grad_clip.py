"""clip_coefficient: torch's clip_grad_norm_ norm and coefficient, without touching the gradients."""

import pytest
import torch

from engine.grad_clip import clip_coefficient


def parameters_with_grads(scale: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    params = [torch.zeros(shape, dtype=dtype, requires_grad=True)
              for shape, dtype in [((7, 5), torch.float32), ((11,), torch.float32), ((4, 3), torch.bfloat16)]]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)
    params.append(torch.zeros(3, requires_grad=True))  # no gradient: left out of the norm
    return params


def test_clip_coefficient_gives_clip_grad_norms_norm_and_the_factor_it_scales_by():
    for scale, max_norm in [(10.0, 1.0), (0.01, 1.0), (1.0, 0.3)]:
        ours = parameters_with_grads(scale)
        theirs = parameters_with_grads(scale)
        grads_before = [p.grad.clone() for p in ours[:3]]
        norm, coefficient = clip_coefficient(ours, max_norm)
        assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(theirs, max_norm))
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, grads_before))  # nothing scaled here
        for p, clipped in zip(ours[:3], theirs[:3]):  # the factor is the one clip_grad_norm_ multiplied by
            assert torch.equal(p.grad * coefficient, clipped.grad)
        expected = 1.0 if scale == 0.01 else max_norm / (float(norm) + 1e-6)
        assert float(coefficient) == pytest.approx(expected, rel=1e-6)  # fp32 against Python's double


def test_clip_coefficient_without_gradients_is_one_over_a_zero_norm():
    norm, coefficient = clip_coefficient([torch.zeros(2, requires_grad=True)], 1.0)
    assert float(norm) == 0.0 and float(coefficient) == 1.0
