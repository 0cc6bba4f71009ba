"""factorize / factorize_batch, the sign convention, FactorCache and FactorStore.

Range bases, the randomized method's accuracy bound, cache eviction and the store's new kinds
have their own files (test_range_basis.py, test_randomized_svd.py, test_cache_eviction.py,
test_factor_store.py)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import NonFiniteError
from core.factor_cache import FactorCache
from core.factorize import FactorStore, factorize, factorize_batch, resolve_device
from core.factors import Factors, canonical_signs
from core.similarity import subspace_similarity
from core.weights import WeightSource
from tests.core.synthetic import matrix_with_spectrum, random_matrix, write_base

# FactorStore calls the kernel through its own module's global name: spy there.
store_module = importlib.import_module("core.factor_store")


def _assert_canonical(f: Factors) -> None:
    idx = f.U.abs().argmax(dim=0)
    assert bool((f.U[idx, torch.arange(f.rank)] > 0).all())


def test_exact_factors_reconstruct_and_follow_the_sign_convention() -> None:
    w = random_matrix(24, 16, seed=1)
    f = factorize(w)
    assert (f.rank, f.full_rank, f.complete, f.exact) == (16, 16, True, True)
    assert f.U.dtype == torch.float32 and f.U.device.type == "cpu"
    assert torch.allclose((f.U * f.S) @ f.V.T, w, atol=1e-5)
    assert torch.allclose(f.U.T @ f.U, torch.eye(16), atol=1e-5)
    assert bool((f.S[:-1] >= f.S[1:]).all())
    _assert_canonical(f)
    top = factorize(w, rank=5)
    assert top.rank == 5 and torch.equal(top.U, f.U[:, :5]) and torch.equal(top.S, f.S[:5])
    assert factorize(w, rank=100).rank == 16  # capped at p


def test_factorization_is_deterministic() -> None:
    w = random_matrix(20, 30, seed=2)
    a, b = factorize(w), factorize(w.clone())
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.V, b.V)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(2, 12),
    n=st.integers(2, 12),
    seed=st.integers(0, 10_000),
    flips=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_sign_convention_ignores_flipped_pairs(
    m: int, n: int, seed: int, flips: list[bool]
) -> None:
    u, _, vh = torch.linalg.svd(random_matrix(m, n, seed), full_matrices=False)
    v = vh.T
    signs = torch.tensor([-1.0 if f else 1.0 for f in flips[: u.shape[1]]])
    assert bool((signs < 0).any()) or not any(flips[: u.shape[1]])
    flipped_u, flipped_v = u * signs, v * signs
    cu, cv = canonical_signs(u, v)
    fu, fv = canonical_signs(flipped_u, flipped_v)
    assert torch.equal(cu, fu) and torch.equal(cv, fv)
    # and the product U V^T per pair (what a transfer uses) is unchanged
    assert torch.allclose(cu @ cv.T, u @ v.T, atol=1e-6)


def test_batched_equals_unbatched() -> None:
    ws = [random_matrix(16, 12, seed=s) for s in range(4)]
    batched = factorize_batch(ws, digests=[f"d{i}" for i in range(4)])
    for w, fb, i in zip(ws, batched, range(4), strict=True):
        single = factorize(w)
        assert fb.digest == f"d{i}"
        assert torch.allclose(fb.S, single.S, atol=1e-5)
        assert torch.allclose(fb.U, single.U, atol=1e-4)
        assert torch.allclose(fb.V, single.V, atol=1e-4)


def test_batch_input_checks() -> None:
    with pytest.raises(ValueError, match="one shape"):
        factorize_batch([torch.ones(3, 3), torch.ones(3, 4)])
    with pytest.raises(ValueError, match="at least one"):
        factorize_batch([])
    w = torch.ones(3, 3)
    w[0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        factorize(w)
    with pytest.raises(ValueError, match="rank"):
        factorize(torch.ones(3, 3), method="randomized")


def test_randomized_top_k_matches_exact_on_a_decaying_spectrum() -> None:
    spectrum = torch.exp(-torch.arange(96, dtype=torch.float64) / 8)
    w = matrix_with_spectrum(128, 96, spectrum, seed=7).float()
    exact = factorize(w, rank=8)
    state = torch.get_rng_state()
    fast = factorize(w, rank=8, method="randomized")  # a Krylov space of 8 x 7 < 96 columns
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert not fast.exact and fast.rank == 8
    assert not torch.equal(fast.U, exact.U)  # a different algorithm ...
    assert subspace_similarity(fast.U, exact.U, 8) > 0.9999  # ... with the same subspace
    assert subspace_similarity(fast.V, exact.V, 8) > 0.9999
    assert float(((fast.S - exact.S).abs() / exact.S).max()) < 1e-4
    _assert_canonical(fast)
    again = factorize(w, rank=8, method="randomized")
    assert torch.equal(again.U, fast.U)  # seeded: reproducible


def test_randomized_falls_back_to_exact_when_the_krylov_space_reaches_p() -> None:
    f = factorize(random_matrix(40, 40, 3), rank=6, method="randomized")  # 6 x 7 >= 40
    assert f.exact and f.rank == 6
    g = factorize(random_matrix(40, 40, 3), rank=6, method="randomized", n_iter=4)  # 30 < 40
    assert not g.exact and g.rank == 6


def test_auto_device_resolves_to_an_available_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.gpu
def test_cuda_factors_equal_cpu_factors() -> None:
    w = random_matrix(64, 48, seed=4)
    cpu, gpu = factorize(w), factorize(w, device="cuda")
    assert gpu.U.device.type == "cpu"
    assert torch.allclose(cpu.S, gpu.S, atol=1e-4)
    assert torch.allclose(cpu.U[:, :8], gpu.U[:, :8], atol=1e-3)


# --- FactorCache ---------------------------------------------------------------------------


def test_cache_round_trip_is_identical_and_serves_smaller_ranks(tmp_path: Path) -> None:
    cache = FactorCache(tmp_path)
    f = factorize(random_matrix(12, 9, 5), digest="sha256:" + "ab" * 32)
    path = cache.put(f)
    assert path.name.endswith(".exact-full.safetensors")
    assert not list(tmp_path.rglob("*.tmp"))  # the temporary file was renamed
    got = cache.get(f.digest)
    assert got is not None and got is not f
    assert torch.equal(got.U, f.U) and torch.equal(got.S, f.S) and torch.equal(got.V, f.V)
    small = cache.get(f.digest, rank=4)
    assert small is not None and small.rank == 4 and torch.equal(small.U, f.U[:, :4])
    # exact factors also answer a randomized request
    assert cache.get(f.digest, rank=4, exact=False) is not None
    assert cache.get("sha256:" + "cd" * 32) is None
    assert (cache.stats.hits, cache.stats.misses) == (3, 1)


def test_cache_randomized_entry_serves_only_its_rank(tmp_path: Path) -> None:
    cache = FactorCache(tmp_path)
    spectrum = torch.linspace(3, 0.1, 80, dtype=torch.float64)
    f = factorize(
        matrix_with_spectrum(96, 80, spectrum, 1).float(),
        rank=8,
        method="randomized",
        digest="sha256:" + "01" * 32,
    )
    assert not f.exact
    path = cache.put(f)
    assert path.name.endswith(".randomized-bk0d6s0-8.safetensors")  # what made it is named
    assert cache.get(f.digest, rank=8, exact=False) is not None
    assert cache.get(f.digest, rank=4, exact=False) is None
    assert cache.get(f.digest, rank=8, exact=True) is None
    # factors made with other settings are another entry, never served for these
    assert cache.get(f.digest, rank=8, exact=False, variant="bk8d5s0") is None


def test_corrupt_cache_entry_is_dropped_not_fatal(tmp_path: Path) -> None:
    cache = FactorCache(tmp_path)
    f = factorize(random_matrix(8, 8, 6), digest="sha256:" + "ef" * 32)
    path = cache.put(f)
    path.write_bytes(path.read_bytes()[:50])
    assert cache.get(f.digest) is None
    assert cache.stats.corrupt == 1 and not path.exists()


# --- FactorStore ---------------------------------------------------------------------------


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    weights = {f"layers.{i}.q_proj": random_matrix(16, 16, seed=i) for i in range(3)}
    weights |= {f"layers.{i}.k_proj": random_matrix(8, 16, seed=10 + i) for i in range(2)}
    return write_base(tmp_path / "base" / "model.safetensors", weights)


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """Batch sizes of every factorize_batch call made by FactorStore."""
    calls: list[int] = []
    real = store_module.factorize_batch

    def spy(matrices, **kwargs):
        calls.append(len(matrices))
        return real(matrices, **kwargs)

    monkeypatch.setattr(store_module, "factorize_batch", spy)
    return calls


def test_store_batches_by_shape_and_reports_progress(base_file: Path, counted: list[int]) -> None:
    progress: list[tuple[int, int, str]] = []
    store = FactorStore(WeightSource.open(base_file), progress=lambda *a: progress.append(a))
    store.prefetch()
    assert sorted(counted) == [2, 3]  # one batch per shape
    assert [p[:2] for p in progress] == [(i, 5) for i in range(1, 6)]
    assert {p[2] for p in progress} == set(store.names)
    before = len(counted)
    f = store.factors("layers.1.q_proj", rank=4)
    assert len(counted) == before and f.rank == 4  # served from memory by truncation
    small = FactorStore(WeightSource.open(base_file), batch_bytes=16 * 16 * 4)
    counted.clear()
    small.prefetch()
    assert sorted(counted) == [1, 1, 1, 2]  # the batch budget splits the 16 x 16 group


def test_store_uses_the_disk_cache_and_recomputes_corrupt_entries(
    base_file: Path, tmp_path: Path, counted: list[int]
) -> None:
    cache = FactorCache(tmp_path / "cache")
    first = FactorStore(WeightSource.open(base_file), cache=cache)
    computed = {name: f for name, f in first.iter_factors()}
    assert first.computed == 5 and sum(counted) == 5
    counted.clear()
    second = FactorStore(WeightSource.open(base_file), cache=cache)
    for name, f in second.iter_factors():
        assert f is not computed[name]
        assert torch.equal(f.U, computed[name].U) and torch.equal(f.V, computed[name].V)
        assert f.digest == second.source.digest(name)
    assert second.computed == 0 and counted == []
    victim = cache.entry_path(second.source.digest("layers.0.q_proj"), "exact", None)
    victim.write_bytes(b"garbage")
    third = FactorStore(WeightSource.open(base_file), cache=cache)
    again = third.factors("layers.0.q_proj")
    assert third.computed == 1 and counted == [1]
    assert torch.equal(again.U, computed["layers.0.q_proj"].U)
    assert victim.exists()  # rewritten


def test_store_lru_is_bounded(base_file: Path) -> None:
    one = factorize(random_matrix(16, 16, 0))
    budget = sum(t.numel() * 4 for t in (one.U, one.S, one.V))
    store = FactorStore(WeightSource.open(base_file), memory_bytes=budget)
    store.prefetch()
    assert store._lru_bytes <= budget and len(store._lru) == 1


def test_store_view_is_a_lazy_mapping(base_file: Path) -> None:
    store = FactorStore(WeightSource.open(base_file), names=["layers.0.q_proj", "layers.0.k_proj"])
    view = store.view(rank=3)
    assert store.computed == 0
    assert list(view) == ["layers.0.q_proj", "layers.0.k_proj"] and len(view) == 2
    assert view["layers.0.k_proj"].rank == 3 and store.computed == 1
    with pytest.raises(KeyError):
        view["layers.2.q_proj"]
    with pytest.raises(ValueError, match="rank"):
        store.factors("layers.0.q_proj", exact=False)


def test_store_randomized_requests_and_their_cache_entries(base_file: Path, tmp_path: Path) -> None:
    cache = FactorCache(tmp_path / "cache")
    store = FactorStore(WeightSource.open(base_file), cache=cache, n_iter=1)
    fast = store.factors("layers.0.q_proj", rank=4, exact=False)
    assert not fast.exact and fast.rank == 4  # 4 x 2 < p = 16: the randomized path ran
    digest = store.source.digest("layers.0.q_proj")
    assert cache.entry_path(digest, "randomized", 4, store.variant).is_file()
    assert store.variant == "bk0d1s0"
    exact = store.factors("layers.0.q_proj", rank=4)
    assert exact.exact and store.computed == 2  # a randomized entry never answers exact
    assert subspace_similarity(fast.U, exact.U, 4) > 0.5
    # now the exact full SVD is held: it answers the randomized request too
    assert store.factors("layers.0.q_proj", rank=4, exact=False).exact
