"""The randomized (block Krylov) top-k SVD of assessments: accuracy against exact factors,
reproducibility, and its fallbacks. Real-weights accuracy: test_real_weights.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.atc import compute_atc
from core.factorize import factorize, factorize_batch
from core.similarity import subspace_similarity
from tests.core.synthetic import matrix_with_spectrum

K = 8


def _power_law(m: int, n: int, seed: int, alpha: float = 0.35) -> torch.Tensor:
    """A slowly decaying spectrum like trained attention weights' (s_i ~ i^-alpha)."""
    p = min(m, n)
    spectrum = torch.arange(1, p + 1, dtype=torch.float64) ** -alpha
    return matrix_with_spectrum(m, n, spectrum, seed).float()


def _pair(m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A base and its successor (1 % Gaussian noise)."""
    a = _power_law(m, n, seed)
    noise = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 99))
    return a, a + noise * (0.01 * float(a.norm()) / float(noise.norm()))


def test_every_similarity_of_an_atc_is_within_the_bound_and_under_it() -> None:
    # two "bases" of 6 modules each, two shapes, the second a perturbed copy of the first
    shapes = [(96, 96)] * 4 + [(96, 160)] * 2
    pairs = [_pair(m, n, 10 * i) for i, (m, n) in enumerate(shapes)]
    names = [f"blocks.{i}.attn.to_{'q' if m == n else 'k'}" for i, (m, n) in enumerate(shapes)]

    def both(**kwargs: object) -> tuple[dict, dict]:
        return tuple(  # type: ignore[return-value]
            {name: factorize(pair[side], **kwargs) for name, pair in zip(names, pairs, strict=True)}
            for side in (0, 1)
        )

    ea, eb = both()
    ra, rb = both(rank=K, method="randomized")
    assert not any(f.exact for f in ra.values())  # 8 x 7 < 96: the Krylov path ran
    exact = compute_atc(ea, eb, k=K)
    fast = compute_atc(ra, rb, k=K)
    errors = []
    for side, attr in (("left", "U"), ("right", "V")):
        valid = getattr(exact, f"valid_{side}")
        assert valid.sum() == 4 * 4 + 2 * 2  # every pair of the same role
        diff = np.abs(getattr(exact, f"phi_{side}") - getattr(fast, f"phi_{side}"))
        errors.append(float(diff[valid].max()))
        # the a-priori worst case, from each module's own recovery psi of its exact subspace
        recovery = {
            (base, name): subspace_similarity(getattr(rand[name], attr), getattr(ex[name], attr), K)
            for base, rand, ex in (("a", ra, ea), ("b", rb, eb))
            for name in names
        }
        for i, j in zip(*np.nonzero(valid), strict=True):
            bound = math.sqrt(2 * max(0.0, 1 - recovery["a", names[i]]))
            bound += math.sqrt(2 * max(0.0, 1 - recovery["b", names[j]]))
            assert diff[i, j] <= bound + 1e-5  # float32 rounding of both sides' Psi
    assert 0.0 < max(errors) < 1e-3  # truncation error is there, and within the bound
    assert abs(exact.atc - fast.atc) < 1e-3


def test_a_module_factors_the_same_in_any_batch_and_from_float16() -> None:
    ws = [_power_law(64, 48, seed) for seed in range(3)]
    alone = factorize(ws[1], rank=4, method="randomized")
    batched = factorize_batch(ws, rank=4, method="randomized")[1]
    assert not alone.exact
    assert torch.allclose(alone.U, batched.U, atol=1e-5)  # one start block per shape
    assert torch.allclose(alone.S, batched.S, rtol=1e-5)
    half = ws[1].half()
    from_half = factorize(half, rank=4, method="randomized")  # computed in float32
    assert from_half.U.dtype == torch.float32
    same = factorize(half.float(), rank=4, method="randomized")
    assert torch.equal(from_half.U, same.U) and torch.equal(from_half.S, same.S)


def test_tall_matrices_run_on_their_short_side() -> None:
    w = _power_law(160, 64, seed=3)
    fast, exact = factorize(w, rank=K, method="randomized"), factorize(w, rank=K)
    assert fast.U.shape == (160, K) and fast.V.shape == (64, K) and not fast.exact
    assert subspace_similarity(fast.U, exact.U, K) > 0.999
    assert subspace_similarity(fast.V, exact.V, K) > 0.999
    assert torch.allclose((fast.U * fast.S) @ fast.V.T, (exact.U * exact.S) @ exact.V.T, atol=1e-3)


def test_rank_below_k_falls_back_to_the_exact_svd() -> None:
    low = torch.randn(96, 3) @ torch.randn(3, 80)  # rank 3 < k
    f = factorize(low, rank=K, method="randomized")
    assert f.exact and f.rank == K  # V of a zero singular value is defined only by the SVD
    assert torch.allclose(f.U.T @ f.U, torch.eye(K), atol=1e-5)


def test_depth_and_oversampling_are_settings() -> None:
    w = _power_law(128, 128, seed=5)
    exact = factorize(w, rank=K)
    shallow = factorize(w, rank=K, method="randomized", n_iter=1)
    deep = factorize(w, rank=K, method="randomized", n_iter=6, oversample=4)
    shallow_psi = subspace_similarity(shallow.U, exact.U, K)
    deep_psi = subspace_similarity(deep.U, exact.U, K)
    assert shallow_psi < deep_psi  # more depth, a better subspace
    assert deep_psi > 0.9999
    with pytest.raises(ValueError, match="rank"):
        factorize(w, method="randomized")
