"""FactorStore: each consumer gets what it needs and nothing more (range bases for project mode,
exact top-r for subspace mode, truncated exact or randomized factors for assessments)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from core.errors import NonFiniteError
from core.factor_cache import FactorCache
from core.factorize import FactorStore, factorize, kept_rank
from core.weights import WeightSource
from tests.core.reference_algorithm1 import algorithm1
from tests.core.synthetic import random_matrix, relative_error, write_base

store_module = importlib.import_module("core.factor_store")


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    weights = {f"layers.{i}.q_proj": random_matrix(96, 96, seed=i) for i in range(3)}
    weights |= {f"layers.{i}.k_proj": random_matrix(32, 96, seed=10 + i) for i in range(2)}
    weights |= {"layers.0.up_proj": random_matrix(160, 96, seed=20)}
    return write_base(tmp_path / "base" / "model.safetensors", weights)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(kernel, batch size) of every factorization the stores run."""
    seen: list[tuple[str, int]] = []
    for kernel in ("factorize_batch", "range_basis_batch"):
        real = getattr(store_module, kernel)

        def spy(matrices, _real=real, _kernel=kernel, **kwargs):
            seen.append((_kernel, len(matrices)))
            return _real(matrices, **kwargs)

        monkeypatch.setattr(store_module, kernel, spy)
    return seen


def test_range_bases_need_nothing_for_square_modules_and_are_cached(
    base_file: Path, tmp_path: Path, calls: list[tuple[str, int]]
) -> None:
    cache = FactorCache(tmp_path / "cache")
    store = FactorStore(WeightSource.open(base_file), cache=cache)
    bases = dict(store.iter_range_bases())
    assert sorted(calls) == [("range_basis_batch", 1), ("range_basis_batch", 2)]  # by shape
    assert all(bases[f"layers.{i}.q_proj"].side == "none" for i in range(3))
    assert store.computed == 3 and store.computed_by_kind["basis"] == 3
    assert len(list(cache.directory.rglob("*.safetensors"))) == 3  # square ones store nothing
    up = random_matrix(160, 4, seed=1)
    w = store.source.matrix("layers.0.up_proj")
    reference = algorithm1(
        {"m.lora.up.weight": up, "m.lora.down.weight": random_matrix(4, 96, seed=2)},
        {"m.weight": w},
    )["m.lora.up.weight"]
    assert relative_error(bases["layers.0.up_proj"].project_up(up), reference) < 1e-5
    calls.clear()
    again = FactorStore(WeightSource.open(base_file), cache=cache)
    found = again.range_basis("layers.1.k_proj")
    assert calls == [] and again.computed == 0  # from the disk cache
    assert torch.equal(found.basis, bases["layers.1.k_proj"].basis)  # type: ignore[arg-type]


def test_complete_factors_already_held_serve_range_bases(
    base_file: Path, tmp_path: Path, calls: list[tuple[str, int]]
) -> None:
    cache = FactorCache(tmp_path / "cache")
    FactorStore(WeightSource.open(base_file), cache=cache).prefetch(["layers.0.k_proj"])
    calls.clear()
    store = FactorStore(WeightSource.open(base_file), cache=cache)
    basis = store.range_basis("layers.0.k_proj")
    assert calls == [] and basis.method == "svd"  # read from the exact-full entry
    memory = FactorStore(WeightSource.open(base_file))
    memory.factors("layers.1.k_proj")
    assert memory.range_basis("layers.1.k_proj").method == "svd" and memory.computed == 1


def test_top_factors_keep_only_the_leading_triplets_shared_by_ranks(
    base_file: Path, tmp_path: Path, calls: list[tuple[str, int]]
) -> None:
    assert [kept_rank(r, 96) for r in (8, 16, 64, 65, 90)] == [64, 64, 64, 96, 96]
    assert kept_rank(8, 32) == 32
    cache = FactorCache(tmp_path / "cache")
    store = FactorStore(WeightSource.open(base_file), cache=cache)
    name = "layers.0.q_proj"
    top = store.top_factors(name, 8)
    assert top.exact and top.rank == 8
    digest = store.source.digest(name)
    assert cache.entry_path(digest, "exact", 64).is_file()  # 64 triplets kept, not all 96
    assert not cache.entry_path(digest, "exact", None).exists()
    full = factorize(store.source.matrix(name))
    assert torch.allclose(top.U, full.U[:, :8], atol=1e-5)
    for r in (16, 32, 64):  # the adapters of one base share that SVD
        assert store.top_factors(name, r).rank == r
    fresh = FactorStore(WeightSource.open(base_file), cache=cache)
    assert dict(fresh.iter_top_factors([name], 64))[name].rank == 64 and fresh.computed == 0
    assert store.computed == 1 and len(calls) == 1
    assert store.top_factors(name, 65).rank == 65 and store.computed == 2  # more: a new SVD


def test_exact_assessments_can_keep_only_the_top_triplets(base_file: Path, tmp_path: Path) -> None:
    cache = FactorCache(tmp_path / "cache")
    store = FactorStore(WeightSource.open(base_file), cache=cache)
    store.prefetch(rank=4, complete=False)
    view = store.view(rank=4, complete=False)
    assert all(f.rank == 4 and f.exact for f in view.values())
    entries = sorted(p.name.split(".")[1] for p in cache.directory.rglob("*.safetensors"))
    # 64 of 96 triplets kept; for the 32 x 96 modules, 32 is all of them (a complete entry)
    assert entries == ["exact-64"] * 4 + ["exact-full"] * 2
    assert store.computed == 6  # the view was served from memory


def test_store_names_the_file_of_a_non_finite_weight(tmp_path: Path) -> None:
    bad = random_matrix(32, 96, seed=1)
    bad[3, 4] = float("nan")
    path = write_base(tmp_path / "bad" / "model.safetensors", {"layers.0.k_proj": bad})
    store = FactorStore(WeightSource.open(path))
    with pytest.raises(NonFiniteError, match=r"layers\.0\.k_proj"):
        store.range_basis("layers.0.k_proj")
    with pytest.raises(NonFiniteError, match=r"layers\.0\.k_proj"):
        store.factors("layers.0.k_proj", rank=4, exact=False)


def test_lru_budget_covers_bases_and_factors(base_file: Path) -> None:
    store = FactorStore(WeightSource.open(base_file), memory_bytes=50_000)
    store.prefetch_range_bases()  # 2 x 12 KB + 40 KB of bases (the square ones hold nothing)
    assert store._lru_bytes <= 50_000 and {kind for _, kind in store._lru} == {"basis"}
    assert 1 <= len(store._lru) < 3
    store.prefetch(rank=4, exact=False)
    assert store._lru_bytes <= 50_000 and ("layers.2.q_proj", "svd") in store._lru


@pytest.mark.gpu
def test_cuda_store_computes_from_float16_weights(tmp_path: Path) -> None:
    weights = {f"l.{i}.k_proj": random_matrix(64, 192, seed=i).half() for i in range(3)}
    path = write_base(tmp_path / "half" / "model.safetensors", weights)
    gpu = FactorStore(WeightSource.open(path), device="cuda")
    cpu = FactorStore(WeightSource.open(path))
    down = random_matrix(4, 192, seed=9)
    for name in weights:
        a, b = cpu.range_basis(name), gpu.range_basis(name)
        assert relative_error(b.project_down(down), a.project_down(down)) < 1e-5
        fa, fb = cpu.factors(name, rank=8, exact=False), gpu.factors(name, rank=8, exact=False)
        assert torch.allclose(fa.S, fb.S, rtol=1e-4)


def test_free_heap_is_released_after_each_computed_batch(
    base_file: Path, tmp_path: Path, calls: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's temporaries are handed back (core.heap) once per computed batch, not per
    lookup: factors found in memory or on disk release nothing."""
    released: list[int] = []
    monkeypatch.setattr(store_module, "release_free_memory", lambda: released.append(1))
    cache = FactorCache(tmp_path / "cache")
    store = FactorStore(WeightSource.open(base_file), cache=cache)
    store.prefetch(rank=8, complete=False)  # three shapes: three batches
    assert len(calls) == len(released) == 3
    store.prefetch(rank=8, complete=False)  # held in memory
    # k_proj's kept triplets are all 32 (complete: its basis is their V); up_proj needs a QR
    store.prefetch_range_bases()
    assert calls[-1] == ("range_basis_batch", 1)
    assert len(released) == 4
    FactorStore(WeightSource.open(base_file), cache=cache).prefetch(rank=8, complete=False)
    assert len(released) == 4  # read from the disk cache
