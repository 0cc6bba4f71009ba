"""match_modules: same name, else most transport mass (appendix B.1.1), else skip."""

from __future__ import annotations

import pytest
import torch

from core.atc import compute_atc
from core.factorize import factorize
from core.factors import Factors
from core.matching import Decision, match_modules
from tests.core.synthetic import random_matrix

TB = "down_blocks.2.attentions.0.transformer_blocks.{}.attn1.to_q"


def _noisy(w: torch.Tensor, seed: int) -> torch.Tensor:
    return w + 1e-4 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ssd_like() -> tuple[dict[str, Factors], dict[str, Factors]]:
    """Source: 6 transformer blocks. Target (distilled): 4 blocks; tb.0 and tb.1 are the
    source's, tb.3 resembles the source's tb.5 (as SSD-1B's tb.3 resembles SDXL's tb.6), tb.2
    is new. Plus a target-only module of a role the source lacks."""
    weights = {TB.format(i): random_matrix(16, 16, 100 + i) for i in range(6)}
    source = {name: factorize(w) for name, w in weights.items()}
    target = {
        TB.format(0): factorize(_noisy(weights[TB.format(0)], 1)),
        TB.format(1): factorize(_noisy(weights[TB.format(1)], 2)),
        TB.format(2): factorize(random_matrix(16, 16, 999)),
        TB.format(3): factorize(_noisy(weights[TB.format(5)], 3)),
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": factorize(
            random_matrix(16, 16, 7)
        ),
    }
    return source, target


def test_same_name_rematch_and_skip(ssd_like) -> None:
    source, target = ssd_like
    atc = compute_atc(source, target, k=4)
    decisions = {d.target: d for d in match_modules(atc, min_similarity=0.5)}
    assert list(decisions) == list(target)

    same = decisions[TB.format(0)]
    assert same.decision is Decision.SAME_NAME and same.source == TB.format(0)
    assert same.reason == "same name, phi 1.00" and same.phi > 0.99 and same.mass > 0

    moved = decisions[TB.format(3)]
    assert moved.decision is Decision.REMATCHED and moved.source == TB.format(5)
    assert moved.phi > 0.99 and moved.mass == pytest.approx(1 / 6)  # all of the source row
    assert moved.reason.startswith("same-name phi 0.")
    assert f"< 0.5; rematched to {TB.format(5)} (mass 0.1667, phi 1.00)" in moved.reason

    new = decisions[TB.format(2)]
    assert new.decision is Decision.SKIPPED and new.source is None and new.mass == 0.0
    assert "no valid source module with phi >= 0.5" in new.reason
    assert new.phi == pytest.approx(
        atc.phi[atc.source_index(TB.format(2)), atc.target_index(TB.format(2))]
    )

    orphan = decisions["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert orphan.decision is Decision.SKIPPED
    assert orphan.reason.startswith("no same-named source module; no valid source module")


def test_threshold_moves_decisions(ssd_like) -> None:
    source, target = ssd_like
    atc = compute_atc(source, target, k=4)
    lenient = {d.target: d.decision for d in match_modules(atc, min_similarity=0.0)}
    strict = {d.target: d.decision for d in match_modules(atc, min_similarity=1.01)}
    assert lenient[TB.format(2)] is not Decision.SKIPPED
    assert set(strict.values()) == {Decision.SKIPPED}


def test_decision_is_a_string_enum() -> None:
    assert Decision("rematched") is Decision.REMATCHED
    assert f"{Decision.SAME_NAME}" == "same_name"


def _layers(count: int, seed: int) -> dict[str, torch.Tensor]:
    return {
        f"encoder.layer.{i}.attention.self.query": random_matrix(16, 16, seed + i)
        for i in range(count)
    }


def test_merge_equals_one_to_one_for_equal_module_counts() -> None:
    weights = _layers(4, 200)
    source = {n: factorize(w) for n, w in weights.items()}
    target = {n: factorize(_noisy(w, 9)) for n, w in weights.items()}
    atc = compute_atc(source, target, k=4)
    one = match_modules(atc, min_similarity=0.5)
    merged = match_modules(atc, min_similarity=0.5, strategy="merge")
    assert merged == one  # a permutation plan has one source per column
    assert all(d.contributions == () and d.sources == ((d.source, 1.0),) for d in one)


def test_merge_combines_every_source_sending_mass() -> None:
    """Six source modules, three targets (the source's 0, 2, 4): each target column holds
    the mass of two source rows."""
    weights = _layers(6, 300)
    source = {n: factorize(w) for n, w in weights.items()}
    names = list(weights)
    target = {names[b]: factorize(_noisy(weights[names[2 * b]], b)) for b in range(3)}
    atc = compute_atc(source, target, k=4)
    one = {d.target: d for d in match_modules(atc, min_similarity=0.5)}
    merged = {d.target: d for d in match_modules(atc, min_similarity=0.5, strategy="merge")}
    mean = {
        d.target: d
        for d in match_modules(atc, min_similarity=0.5, strategy="merge", merge_weights="target")
    }
    fed = []
    for b in range(3):
        t = names[b]
        assert one[t].contributions == () and one[t].source == names[2 * b]
        parts = merged[t].contributions
        assert len(parts) == 2 and parts[0] == (names[2 * b], pytest.approx(1.0))
        assert parts[1][1] == pytest.approx(1.0)  # the whole of that source row's mass
        assert merged[t].source == one[t].source and merged[t].decision == one[t].decision
        assert "merged (source weights)" in merged[t].reason
        assert [w for _, w in mean[t].contributions] == [pytest.approx(0.5)] * 2
        fed += [s for s, _ in parts]
    assert sorted(fed) == sorted(names)  # every source update reaches one target


def test_merge_keeps_skips_and_merge_min_similarity_filters() -> None:
    weights = _layers(6, 400)
    source = {n: factorize(w) for n, w in weights.items()}
    names = list(weights)
    target = {names[0]: factorize(_noisy(weights[names[0]], 1)),
              names[1]: factorize(random_matrix(16, 16, 999))}  # fmt: skip
    atc = compute_atc(source, target, k=4)
    merged = {d.target: d for d in match_modules(atc, min_similarity=0.5, strategy="merge")}
    assert merged[names[1]].decision is Decision.SKIPPED and merged[names[1]].sources == ()
    assert len(merged[names[0]].contributions) == 3  # 6 rows over 2 columns
    strict = match_modules(atc, min_similarity=0.5, strategy="merge", merge_min_similarity=0.99)
    assert strict[0].contributions == ()  # no other source is that similar: one-to-one


def test_a_plan_of_the_wrong_shape_is_refused(ssd_like) -> None:
    source, target = ssd_like
    atc = compute_atc(source, target, k=4)
    with pytest.raises(ValueError, match="plan has shape"):
        match_modules(atc, min_similarity=0.5, plan=atc.plan[:, :2])
    with pytest.raises(ValueError, match="non-negative"):
        match_modules(atc, min_similarity=0.5, plan=-atc.plan)
