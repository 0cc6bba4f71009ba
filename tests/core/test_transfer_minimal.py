"""Transfers read only what their mode needs of a store: range bases in project mode at full
rank, the exact leading triplets in subspace mode; outputs equal Algorithm 1 / exact references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.factor_cache import FactorCache
from core.factorize import FactorStore, range_basis
from core.projection import transfer_module
from core.transfer import transfer_adapter
from core.weights import WeightSource
from tests.core.reference_algorithm1 import algorithm1
from tests.core.synthetic import (
    adapter_of,
    full_factors,
    lora_module,
    lorax_module,
    random_matrix,
    relative_error,
    write_base,
)

SHAPES = {
    "blocks.0.attn1.to_q": (96, 96),
    "blocks.0.attn2.to_k": (96, 160),  # wide: V's range complement, 64 columns of 160
    "blocks.1.attn2.to_k": (96, 160),
    "blocks.0.ff.up": (200, 64),  # tall: U's range itself, 64 columns of 200
    "blocks.0.attn2.to_v": (120, 96),  # tall: the complement, 24 columns of 120
}


def _bases(tmp_path: Path) -> tuple[dict[str, torch.Tensor], Path, Path]:
    src = {name: random_matrix(m, n, seed=i) for i, (name, (m, n)) in enumerate(SHAPES.items())}
    tgt = {name: w + 0.05 * random_matrix(*w.shape, seed=99) for name, w in src.items()}
    return (
        tgt,
        write_base(tmp_path / "s" / "model.safetensors", src),
        write_base(tmp_path / "t" / "model.safetensors", tgt),
    )


def test_project_mode_reads_range_bases_and_equals_algorithm_1(tmp_path: Path) -> None:
    tgt, s_path, t_path = _bases(tmp_path)
    cache = FactorCache(tmp_path / "cache")
    modules = [
        lora_module(name, m, n, 8, seed=i) for i, (name, (m, n)) in enumerate(SHAPES.items())
    ]
    adapter = adapter_of(modules)
    source = FactorStore(WeightSource.open(s_path), cache=cache)
    target = FactorStore(WeightSource.open(t_path), cache=cache)
    result = transfer_adapter(adapter, source, target, mode="project")
    assert target.computed_by_kind == {"exact": 0, "randomized": 0, "basis": 4}
    assert source.computed == 0
    entries = sorted(p.name.split(".", 1)[1] for p in cache.directory.rglob("*.safetensors"))
    assert entries == [
        "basis-qr-left-null.safetensors",
        "basis-qr-left-range.safetensors",
        "basis-qr-right-null.safetensors",
        "basis-qr-right-null.safetensors",
    ]
    ref_lora = {}
    for mod in modules:
        ref_lora[f"{mod.name}.lora.up.weight"] = mod.up
        ref_lora[f"{mod.name}.lora.down.weight"] = mod.down
    reference = algorithm1(ref_lora, {f"{k}.weight": w for k, w in tgt.items()})
    for mod in modules:
        out = result.adapter.modules[mod.name]
        for part, ref in (("up", "lora.up"), ("down", "lora.down")):
            expected = reference[f"{mod.name}.{ref}.weight"]
            assert relative_error(getattr(out, part), expected) < 1e-5
    moved = result.adapter.modules["blocks.0.attn2.to_k"]
    assert relative_error(moved.down, modules[1].down) > 0.1  # the projection did something
    warm = FactorStore(WeightSource.open(t_path), cache=cache)
    again = transfer_adapter(adapter, source, warm, mode="project")
    assert warm.computed == 0  # every basis came from the cache
    for name, module in again.adapter.modules.items():
        assert torch.equal(module.down, result.adapter.modules[name].down)


def test_subspace_mode_keeps_only_the_leading_triplets(tmp_path: Path) -> None:
    tgt, s_path, t_path = _bases(tmp_path)
    cache = FactorCache(tmp_path / "cache")
    source = FactorStore(WeightSource.open(s_path), cache=cache)
    target = FactorStore(WeightSource.open(t_path), cache=cache)
    src_full = full_factors({n: source.source.matrix(n) for n in SHAPES})
    adapter = adapter_of([lorax_module(n, src_full[n], 8, seed=i) for i, n in enumerate(SHAPES)])
    result = transfer_adapter(adapter, source, target, mode="subspace")
    reference = transfer_adapter(adapter, src_full, full_factors(tgt), mode="subspace")
    for name, module in result.adapter.modules.items():
        expected = reference.adapter.modules[name].delta()
        assert relative_error(module.delta(), expected) < 1e-5
        assert relative_error(module.delta(), adapter.modules[name].delta()) > 1e-3
    entries = sorted(p.name.split(".")[1] for p in cache.directory.rglob("*.safetensors"))
    assert entries == ["exact-64"] * 4 + ["exact-full"]  # p = 64 for the tall 200 x 64 one
    assert target.computed_by_kind["exact"] == 5


def test_a_range_basis_serves_full_rank_only() -> None:
    w = random_matrix(96, 160, seed=1)
    module = lora_module("m", 96, 160, 4, seed=2)
    with pytest.raises(ValueError, match="full rank only"):
        transfer_module(module, range_basis(w), mode="project", rank=16)
