"""The fast finiteness check agrees with the element-wise one, overflowing sums included."""

from __future__ import annotations

import pytest
import torch

from core.finite import all_finite


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(64, 48),
        torch.full((8, 8), 3e38),  # finite entries whose float32 sum overflows
        torch.tensor([1.0, float("nan")]),
        torch.tensor([float("inf"), -float("inf")]),  # the sum is NaN
        torch.tensor([1.0, -float("inf")]),
        torch.randn(4, 4).half(),
        torch.empty(0, 3),
        torch.arange(6),
    ],
)
def test_all_finite_agrees_with_isfinite(tensor: torch.Tensor) -> None:
    assert all_finite(tensor) == bool(torch.isfinite(tensor).all())
