"""compute_atc: cost matrix, exact OT, ATC left/right/combined, validity."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import core.atc as atc_module
from core.atc import Combine, compute_atc, solve_transport
from core.errors import TransportError
from core.factorize import factorize
from core.factors import Factors
from core.similarity import subspace_similarity
from tests.core.synthetic import random_matrix


def _model(seed: int, layers: int = 3, width: int = 16, kv: int = 8) -> dict[str, Factors]:
    """A tiny Llama-like model: q_proj (width x width) and GQA k_proj (kv x width) per layer."""
    out = {}
    for i in range(layers):
        out[f"layers.{i}.q_proj"] = factorize(random_matrix(width, width, seed * 1000 + 2 * i))
        out[f"layers.{i}.k_proj"] = factorize(random_matrix(kv, width, seed * 1000 + 2 * i + 1))
    return out


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), layers=st.integers(1, 4), weighted=st.booleans())
def test_atc_of_a_model_with_itself_is_zero_with_the_identity_plan(
    seed: int, layers: int, weighted: bool
) -> None:
    model = _model(seed, layers)
    result = compute_atc(model, model, k=4, weighted=weighted)
    n = len(model)
    assert result.atc == pytest.approx(0.0, abs=1e-6)
    assert result.atc_left == pytest.approx(0.0, abs=1e-6)
    assert result.atc_right == pytest.approx(0.0, abs=1e-6)
    for plan in (result.plan, result.plan_left, result.plan_right):
        assert np.allclose(plan, np.eye(n) / n)
    assert np.allclose(np.diag(result.phi), 1.0, atol=1e-6)


def test_unrelated_random_models_cost_about_one_minus_chance() -> None:
    """Psi_k of independent random 16-wide bases is about k/d = 0.25 at k = 4 (their singular
    vectors are random); the plan picks the best pairs, so ATC lies a little under 1 - k/d.
    Tolerance: within [0.55, 0.8]."""
    a, b = _model(1, layers=4), _model(2, layers=4)
    result = compute_atc(a, b, k=4)
    assert 0.55 < result.atc < 0.8
    off = result.phi[result.valid]
    assert abs(off.mean() - 4 / 16) < 0.08


def test_invalid_pairs_have_zero_similarity_and_reasons() -> None:
    model = _model(3, layers=2)
    result = compute_atc(model, model, k=4)
    q, kp = result.source_index("layers.0.q_proj"), result.target_index("layers.0.k_proj")
    assert not result.valid[q, kp] and result.phi[q, kp] == 0.0
    assert result.cost[q, kp] == 1.0
    reason = result.reason("layers.0.q_proj", "layers.0.k_proj")
    assert reason is not None and "different roles" in reason
    assert result.reason("layers.0.q_proj", "layers.1.q_proj") is None
    assert result.valid[q, result.target_index("layers.1.q_proj")]
    with pytest.raises(KeyError):
        result.source_index("absent")


def test_renamed_modules_are_found_by_the_plan() -> None:
    """The target holds the source's layers in another order: the plan undoes the permutation
    and ATC is 0, although same-named pairs are unrelated."""
    source = _model(4, layers=3)
    order = [2, 0, 1]
    target = {}
    for i, j in enumerate(order):
        target[f"layers.{i}.q_proj"] = source[f"layers.{j}.q_proj"]
        target[f"layers.{i}.k_proj"] = source[f"layers.{j}.k_proj"]
    result = compute_atc(source, target, k=4)
    assert (
        result.phi[result.source_index("layers.0.q_proj"), result.target_index("layers.0.q_proj")]
        < 0.9
    )
    assert result.atc == pytest.approx(0.0, abs=1e-6)
    for i, j in enumerate(order):
        row, col = (
            result.source_index(f"layers.{j}.q_proj"),
            result.target_index(f"layers.{i}.q_proj"),
        )
        assert result.plan[row, col] == pytest.approx(1 / 6)


def test_unequal_sizes_split_mass_with_uniform_marginals() -> None:
    source, target = _model(5, layers=3), _model(6, layers=2)
    result = compute_atc(source, target, k=4)
    assert result.plan.shape == (6, 4)
    assert np.allclose(result.plan.sum(axis=1), 1 / 6)
    assert np.allclose(result.plan.sum(axis=0), 1 / 4)
    assert np.allclose(result.source_marginal, 1 / 6) and np.allclose(result.target_marginal, 1 / 4)
    # each side's own plan is optimal for it, so the mean of the side costs is at most the
    # cost of the combined plan under the combined cost
    assert result.atc <= float((result.cost * result.plan).sum()) + 1e-12
    assert 0.0 <= result.atc <= 1.0
    with pytest.raises(ValueError):
        result.phi[0, 0] = 1.0  # read-only


def test_combinations_of_left_and_right() -> None:
    a, b = _model(7), _model(8)
    results = {c: compute_atc(a, b, k=4, combine=c) for c in Combine}
    mean, worst = results[Combine.MEAN], results[Combine.MAX]
    assert mean.atc_left != pytest.approx(mean.atc_right)  # the sides differ here
    assert mean.atc == pytest.approx((mean.atc_left + mean.atc_right) / 2)
    assert worst.atc == pytest.approx(max(mean.atc_left, mean.atc_right))
    assert results[Combine.LEFT].atc == pytest.approx(mean.atc_left)
    assert results[Combine.RIGHT].atc == pytest.approx(mean.atc_right)
    assert np.allclose(worst.phi, np.minimum(mean.phi_left, mean.phi_right))
    assert compute_atc(a, b, k=4, combine="left").combine is Combine.LEFT


def test_different_rows_same_columns_are_valid_on_the_right_only() -> None:
    """A GQA k_proj with 8 rows against one with 12 rows: only V (the input side) compares."""
    w = random_matrix(12, 16, 9)
    source = {"layers.0.k_proj": factorize(w[:8])}
    target = {"layers.0.k_proj": factorize(w)}
    result = compute_atc(source, target, k=4)
    assert not result.valid_left[0, 0] and result.valid_right[0, 0]
    assert result.phi_left[0, 0] == 0.0 and result.phi_right[0, 0] > 0.5
    assert result.phi[0, 0] == pytest.approx(result.phi_right[0, 0] / 2)
    left, right = result.reasons("layers.0.k_proj", "layers.0.k_proj")
    assert left is not None and "rows" in left and right is None


def test_factors_too_small_for_k_are_refused() -> None:
    f = factorize(random_matrix(16, 16, 1), rank=2)
    with pytest.raises(ValueError, match="k = 4"):
        compute_atc({"a": f}, {"a": f}, k=4)
    with pytest.raises(ValueError):
        compute_atc({}, {"a": f}, k=1)


def test_a_non_optimal_solver_result_raises(monkeypatch) -> None:
    def fake_emd(a, b, m, numItermax, log):
        return np.zeros_like(m), {"result_code": 3, "warning": "numItermax reached"}

    monkeypatch.setattr(atc_module.ot, "emd", fake_emd)
    with pytest.raises(TransportError, match="numItermax"):
        solve_transport(np.ones((2, 2)))


def test_solver_is_exact_on_a_known_assignment() -> None:
    cost = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.6], [0.4, 0.7, 0.0]])
    plan = solve_transport(cost)
    assert np.allclose(plan, np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]]) / 3)


def test_equal_digests_give_exactly_one() -> None:
    w = random_matrix(16, 16, 11)
    with_digest = {"layers.0.q_proj": factorize(w, digest="sha256:" + "12" * 32)}
    without = {"layers.0.q_proj": factorize(w)}
    exact = compute_atc(with_digest, with_digest, k=4)
    assert exact.phi[0, 0] == 1.0 and exact.atc == 0.0
    rounded = compute_atc(without, without, k=4)
    assert rounded.phi[0, 0] == pytest.approx(1.0, abs=1e-6) and rounded.atc < 1e-6


def test_stacks_are_held_one_group_pair_at_a_time(monkeypatch) -> None:
    """The float64 stacks of a side are built per group pair and freed after it: creating one
    finds at most the pair's other stack alive, never the stacks of every module."""
    import weakref

    alive: weakref.WeakSet = weakref.WeakSet()
    held_at_creation: list[int] = []
    real = atc_module._stack

    def tracked(*args, **kwargs):
        held_at_creation.append(len(alive))
        stack, values = real(*args, **kwargs)
        alive.add(stack)
        return stack, values

    monkeypatch.setattr(atc_module, "_stack", tracked)
    a, b = _model(1, layers=4), _model(2, layers=4)
    expected = compute_atc(a, b, k=4)
    monkeypatch.undo()
    # q_proj and k_proj are two groups per side on each base: 8 stacks built in all.
    assert len(held_at_creation) == 8
    assert max(held_at_creation) <= 1
    for i, s_name in enumerate(expected.source_names):  # each pair as the one-pair formula
        for j, t_name in enumerate(expected.target_names):
            if s_name.split(".")[-1] == t_name.split(".")[-1]:
                left = subspace_similarity(a[s_name].U, b[t_name].U, 4)
                right = subspace_similarity(a[s_name].V, b[t_name].V, 4)
                assert expected.phi_left[i, j] == pytest.approx(left, abs=1e-12)
                assert expected.phi_right[i, j] == pytest.approx(right, abs=1e-12)
            else:
                assert not expected.valid[i, j]
