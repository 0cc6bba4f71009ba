"""Debiased linear CKA, adapter-effect agreement and their encoder-level wrappers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core.functional import (
    Representations,
    adapter_agreement,
    cosine_similarities,
    effect_agreement,
    linear_cka,
    representation_agreement,
)
from core.probes import ProbeKind, TokenProbes, random_token_ids
from tests.core.synthetic import orthonormal


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _u_centered(k: torch.Tensor) -> torch.Tensor:
    """Szekely-Rizzo U-centering, entry by entry (a reference independent of the closed form)."""
    n = k.shape[0]
    k = k.clone().fill_diagonal_(0.0)
    out = torch.zeros_like(k)
    total = k.sum()
    for i in range(n):
        for j in range(n):
            if i != j:
                out[i, j] = (
                    k[i, j]
                    - k[i].sum() / (n - 2)
                    - k[:, j].sum() / (n - 2)
                    + total / ((n - 1) * (n - 2))
                )
    return out


def _reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    ku, lu = _u_centered(x @ x.T), _u_centered(y @ y.T)
    return float((ku * lu).sum() / ((ku * ku).sum() * (lu * lu).sum()).sqrt())


def test_cka_matches_the_u_centered_reference() -> None:
    x = _randn(12, 5, seed=0)
    y = x @ _randn(5, 7, seed=1) + 0.5 * _randn(12, 7, seed=2)
    value = linear_cka(x, y)
    assert 0.2 < value < 0.99  # neither trivially 0 nor 1
    assert value == pytest.approx(_reference_cka(x, y), abs=1e-10)


def test_cka_is_one_for_rotations_and_scalings_of_the_same_representation() -> None:
    x = _randn(64, 16, seed=3)
    rotated = 3.0 * x @ orthonormal(16, 16, seed=4).double()
    assert not torch.allclose(rotated, x)
    assert linear_cka(x, rotated) == pytest.approx(1.0, abs=1e-6)  # float32-orthonormal
    assert linear_cka(x, rotated, debiased=False) == pytest.approx(1.0, abs=1e-6)
    # wider target space: the same content embedded in 32 dims
    wide = x @ orthonormal(32, 16, seed=5).double().T
    assert linear_cka(x, wide) == pytest.approx(1.0, abs=1e-6)


def test_debiasing_removes_the_small_sample_bias_of_unrelated_representations() -> None:
    x, y = _randn(40, 200, seed=6), _randn(40, 200, seed=7)
    biased, debiased = linear_cka(x, y, debiased=False), linear_cka(x, y)
    assert biased > 0.5  # unrelated, yet biased CKA is large at n << d
    assert abs(debiased) < 0.1
    assert -1.0 <= debiased <= 1.0


def test_cka_refuses_bad_inputs() -> None:
    x = _randn(10, 4, seed=8)
    with pytest.raises(ValueError, match="same probes"):
        linear_cka(x, x[:9])
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(x[:3], x[:3])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        linear_cka(bad, x)
    with pytest.raises(ValueError, match="does not vary"):
        linear_cka(torch.ones(10, 4), x)


def test_cosine_similarities() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
    c = cosine_similarities(x)
    assert c[0, 1] == 0.0 and c[0, 2] == pytest.approx(1 / math.sqrt(2))
    assert c[3].abs().sum() == 0.0 and c.dtype == torch.float64


def _effect_sides(seed: int, n: int = 30, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    base = _randn(n, d, seed=seed)
    return base, base + 0.3 * _randn(n, d, seed=seed + 100)


def test_the_same_effect_seen_through_a_rotation_agrees_fully() -> None:
    s0, s1 = _effect_sides(10)
    q = orthonormal(8, 8, seed=11).double()
    t0, t1 = s0 @ q, s1 @ q  # another base computing the same thing in rotated coordinates
    assert not torch.allclose(t0, s0)
    result = effect_agreement(s0, s1, t0, t1, kind="text")
    assert result.r == pytest.approx(1.0, abs=1e-6)  # q is float32-orthonormal
    assert result.effect_ratio == pytest.approx(1.0, abs=1e-6)
    assert result.kind == "text" and result.count == 30 and result.reason is None


def test_unrelated_effects_do_not_agree_and_weaker_effects_show_in_the_ratio() -> None:
    s0, s1 = _effect_sides(20)
    t0, t1 = _effect_sides(40)
    result = effect_agreement(s0, s1, t0, t1)
    assert result.r is not None and abs(result.r) < 0.2
    half = effect_agreement(s0, s1, s0, s0 + 0.5 * (s1 - s0))
    assert half.r is not None and half.r > 0.9
    assert half.effect_ratio is not None and 0.3 < half.effect_ratio < 0.7


def test_no_effect_on_a_side_gives_no_correlation_and_says_why() -> None:
    s0, s1 = _effect_sides(30)
    result = effect_agreement(s0, s1, s0, s0.clone())
    assert result.r is None and result.target_effect == 0.0
    assert "transferred adapter changes nothing" in (result.reason or "")
    result = effect_agreement(s0, s0.clone(), s0, s1)
    assert result.r is None and "adapter changes nothing on the source" in (result.reason or "")


class _Tiny(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(50, 16)
        self.layer0 = nn.Linear(16, 16)
        self.layer1 = nn.Linear(16, 16)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h0 = torch.tanh(self.layer0(self.embed(ids)))
        return h0, torch.tanh(self.layer1(h0))


def _encoder(model: _Tiny):
    @torch.no_grad()
    def encode(probe: TokenProbes) -> Representations:  # type: ignore[override]
        h0, h1 = model(probe.ids)
        return Representations(
            final=h1.mean(1), layers={"layer0": h0.mean(1), "layer1": h1.mean(1)}
        )

    return encode


def test_representation_agreement_falls_with_the_perturbation_of_the_target() -> None:
    source = _Tiny(0)
    probes = [random_token_ids(50, count=64, length=6, seed=s) for s in (0, 1)]
    values = []
    for eps in (0.0, 0.3, 3.0):
        target = _Tiny(0)
        with torch.no_grad():
            for p in target.parameters():
                p.add_(
                    eps * p.std() * torch.randn(p.shape, generator=torch.Generator().manual_seed(9))
                )
        result = representation_agreement(
            _encoder(source), _encoder(target), probes, layer_pairs=[("layer0", "layer0")]
        )
        assert [p.kind for p in result.probes] == ["token_ids", "token_ids"]
        assert len(result.probes[0].layers) == 1
        values.append(result.cka)
    assert values[0] == pytest.approx(1.0, abs=1e-9)
    assert values[0] > values[1] > values[2]


def test_adapter_agreement_over_probe_sets() -> None:
    source = _Tiny(0)
    adapted = _Tiny(0)
    with torch.no_grad():
        adapted.layer1.weight.add_(
            0.5 * torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
        )
    probes = [random_token_ids(50, count=32, length=6, seed=s) for s in (3, 4)]
    same = adapter_agreement(
        _encoder(source), _encoder(adapted), _encoder(source), _encoder(adapted), probes
    )
    assert same.agreement == pytest.approx(1.0, abs=1e-9)
    none = adapter_agreement(
        _encoder(source), _encoder(adapted), _encoder(source), _encoder(source), probes
    )
    assert none.agreement is None and none.by_kind()["token_ids"].reason is not None
    assert ProbeKind.TOKEN_IDS == "token_ids"
