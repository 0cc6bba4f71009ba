"""Layer positions, monotone alignment (against brute force) and the order-preserving plan."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from core.atc import ATCResult, compute_atc
from core.factorize import factorize
from core.layers import (
    layer_pairs,
    layer_position,
    monotone_alignment,
    ordered_plan,
    stack_similarities,
)
from core.matching import Decision, MatchStrategy, match_modules
from tests.core.synthetic import random_matrix

MEMBERS = ("attention.self.query", "attention.self.key")


def test_layer_position_of_bert_unet_and_sequential_names() -> None:
    p = layer_position("encoder.layer.3.attention.self.query")
    assert p is not None and (p.stack, p.index, p.layer, p.member) == (
        "encoder.layer.*",
        3,
        "encoder.layer.3",
        "attention.self.query",
    )
    q = layer_position("unet.down_blocks.2.attentions.0.transformer_blocks.1.attn1.to_out.0")
    assert q is not None
    assert q.stack == "unet.down_blocks.2.attentions.0.transformer_blocks.*" and q.index == 1
    assert q.member == "attn1.to_out.0"  # the final ".0" is a Sequential index, not a layer
    assert layer_position("pooler.dense") is None
    assert layer_position("to_out.0") is None


def _monotone_maps(rows: int, cols: int, cover: bool):
    """Every admissible alignment, enumerated (rows >= cols)."""
    if cover:
        for f in itertools.product(range(cols), repeat=rows):
            steps = [b - a for a, b in itertools.pairwise(f)]
            if f[0] == 0 and f[-1] == cols - 1 and all(s in (0, 1) for s in steps):
                yield [(i, f[i]) for i in range(rows)]
    else:
        for chosen in itertools.combinations(range(rows), cols):
            yield [(chosen[j], j) for j in range(cols)]


@pytest.mark.parametrize("cover", [True, False])
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4), (6, 1)])
def test_monotone_alignment_is_optimal(cover: bool, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape) + cover)
    for _ in range(5):
        sim = rng.random(shape)
        pairs = monotone_alignment(sim, cover=cover)
        flip = shape[0] < shape[1]
        longer = sim.T if flip else sim
        best = max(sum(longer[a, b] for a, b in m) for m in _monotone_maps(*longer.shape, cover))
        assert sum(sim[a, b] for a, b in pairs) == pytest.approx(best)
        # order preserved: sorted by source, targets never decrease
        targets = [b for _, b in pairs]
        assert targets == sorted(targets)
        if cover:
            assert {a for a, _ in pairs} == set(range(shape[0]))
            assert {b for _, b in pairs} == set(range(shape[1]))


def test_equal_depths_align_as_the_identity_and_bad_input_is_refused() -> None:
    sim = np.random.default_rng(0).random((4, 4))
    assert monotone_alignment(sim) == tuple((i, i) for i in range(4))
    assert monotone_alignment(sim, cover=False) == tuple((i, i) for i in range(4))
    with pytest.raises(ValueError, match="finite non-empty"):
        monotone_alignment(np.array([[np.nan]]))


def _name(layer: int, member: str) -> str:
    return f"encoder.layer.{layer}.{member}"


@pytest.fixture(scope="module")
def pruned_atc() -> ATCResult:
    """Source: 6 layers; target: 3 layers, target layer b is source layer 2b (plus noise)."""
    weights = {
        _name(i, m): random_matrix(16, 16, 10 * i + k)
        for i in range(6)
        for k, m in enumerate(MEMBERS)
    }
    g = torch.Generator().manual_seed(5)
    target = {
        _name(b, m): factorize(weights[_name(2 * b, m)] + 1e-4 * torch.randn(16, 16, generator=g))
        for b in range(3)
        for m in MEMBERS
    }
    return compute_atc({n: factorize(w) for n, w in weights.items()}, target, k=4)


def test_stack_similarity_finds_the_kept_layers(pruned_atc: ATCResult) -> None:
    stacks = stack_similarities(pruned_atc)
    assert list(stacks) == ["encoder.layer.*"]
    s = stacks["encoder.layer.*"]
    assert s.source_layers == tuple(range(6)) and s.target_layers == (0, 1, 2)
    assert [int(np.argmax(s.sim[:, b])) for b in range(3)] == [0, 2, 4]


def test_ordered_plan_keeps_order_and_carries_every_source_layer(pruned_atc: ATCResult) -> None:
    ordered = ordered_plan(pruned_atc)
    align = ordered.alignments["encoder.layer.*"]
    assert {a for a, _ in align} == set(range(6))
    assert (0, 0) in align and (2, 1) in align and (4, 2) in align
    assert [b for _, b in align] == sorted(b for _, b in align)
    plan = ordered.plan
    assert plan.shape == pruned_atc.plan.shape and not plan.flags.writeable
    assert plan.sum() == pytest.approx(1.0)  # every source module's mass 1/S is carried
    i, j = (
        pruned_atc.source_index(_name(1, MEMBERS[0])),
        pruned_atc.target_index(_name(0, MEMBERS[1])),
    )
    assert plan[i, j] == 0.0  # never across members
    injective = ordered_plan(pruned_atc, cover=False)
    assert injective.alignments["encoder.layer.*"] == ((0, 0), (2, 1), (4, 2))


def test_matching_on_the_ordered_plan(pruned_atc: ATCResult) -> None:
    ordered = ordered_plan(pruned_atc)
    one = {d.target: d for d in match_modules(pruned_atc, min_similarity=0.5, plan=ordered.plan)}
    d = one[_name(1, MEMBERS[0])]
    assert d.decision is Decision.REMATCHED and d.source == _name(2, MEMBERS[0])
    merged = {
        d.target: d
        for d in match_modules(
            pruned_atc, min_similarity=0.5, plan=ordered.plan, strategy=MatchStrategy.MERGE
        )
    }
    sources = {
        t: {s for s, _ in d.sources} for t, d in merged.items() if d.target.endswith("query")
    }
    aligned = ordered.alignments["encoder.layer.*"]
    for b in range(3):
        expected = {_name(a, MEMBERS[0]) for a, bb in aligned if bb == b}
        assert sources[_name(b, MEMBERS[0])] == expected
    assert all(w == pytest.approx(1.0) for d in merged.values() for _, w in d.sources)
    assert merged[_name(1, MEMBERS[0])].sources[0][0] == _name(2, MEMBERS[0])  # anchor first


def test_layer_pairs_from_module_pairs() -> None:
    pairs = [
        (_name(0, MEMBERS[0]), _name(0, MEMBERS[0])),
        (_name(2, MEMBERS[0]), _name(1, MEMBERS[0])),
        (_name(2, MEMBERS[1]), _name(1, MEMBERS[1])),
        (_name(3, MEMBERS[1]), _name(1, MEMBERS[1])),
        (None, _name(2, MEMBERS[0])),
        ("pooler.dense", _name(2, MEMBERS[1])),
    ]
    assert layer_pairs(pairs) == (
        ("encoder.layer.0", "encoder.layer.0"),
        ("encoder.layer.2", "encoder.layer.1"),
    )


def test_merged_ordered_decisions_carry_every_layer_through_the_transfer(
    pruned_atc: ATCResult,
) -> None:
    """match_modules(merge, ordered plan) -> transfer_adapter: each kept layer receives the sum
    of the updates of the source layers aligned with it (square modules at full rank are carried
    unchanged in project mode), and all of the adapter's energy arrives."""
    from core.transfer import transfer_adapter
    from tests.core.synthetic import adapter_of, lora_module

    adapter = adapter_of(
        [lora_module(n, 16, 16, 2, seed=i) for i, n in enumerate(pruned_atc.source_names)]
    )
    bank = {n: factorize(random_matrix(16, 16, 0)) for n in pruned_atc.target_names}
    source = {n: factorize(random_matrix(16, 16, 1)) for n in pruned_atc.source_names}
    ordered = ordered_plan(pruned_atc)
    one = transfer_adapter(
        adapter, source, bank, match_modules(pruned_atc, min_similarity=0.5, plan=ordered.plan)
    )
    merged_decisions = match_modules(
        pruned_atc, min_similarity=0.5, plan=ordered.plan, strategy="merge"
    )
    merged = transfer_adapter(adapter, source, bank, merged_decisions)
    assert 0.3 < one.energy_retained < 0.7
    assert merged.modules_skipped == 0 and one.modules_skipped > 0
    for d in merged_decisions:
        expected = sum(w * adapter.modules[s].delta() for s, w in d.sources)
        got = merged.adapter.modules[d.target].delta()
        assert len(d.sources) >= 1
        assert torch.allclose(got, expected, atol=1e-5)
    fed = {s for d in merged_decisions for s, _ in d.sources}
    assert fed == set(pruned_atc.source_names)
    assert merged.energy_retained > one.energy_retained
