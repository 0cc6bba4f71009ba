"""Subspace similarity (eq. 4, eq. 5), its batched forms, and pair validity (appendix D)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.selection import ModuleSelector, RoleRule, role_of
from core.similarity import (
    ModuleRef,
    pair_validity,
    side_validity,
    similarity_matrix,
    subspace_similarity,
    subspace_similarity_batch,
    weighted_subspace_similarity,
)
from tests.core.synthetic import orthonormal

dims = st.integers(4, 24)
seeds = st.integers(0, 100_000)


@settings(max_examples=30, deadline=None)
@given(m=dims, seed=seeds, data=st.data())
def test_psi_is_one_on_itself_symmetric_and_bounded(m: int, seed: int, data) -> None:
    k = data.draw(st.integers(1, m - 1))
    a, b = orthonormal(m, k + 1, seed), orthonormal(m, k + 1, seed + 1)
    assert subspace_similarity(a, a, k) == pytest.approx(1.0, abs=1e-6)
    ab, ba = subspace_similarity(a, b, k), subspace_similarity(b, a, k)
    assert ab == pytest.approx(ba, abs=1e-12)
    assert 0.0 <= ab <= 1.0
    assert ab < 1.0 - 1e-6 or k == m  # two random subspaces are not the same
    s_a = torch.sort(torch.rand(k + 1, generator=torch.Generator().manual_seed(seed)) + 0.1)
    s_b = torch.sort(torch.rand(k + 1, generator=torch.Generator().manual_seed(seed + 1)) + 0.1)
    s_a, s_b = s_a.values.flip(0), s_b.values.flip(0)
    assert weighted_subspace_similarity(a, s_a, a, s_a, k) == pytest.approx(1.0, abs=1e-6)
    w_ab = weighted_subspace_similarity(a, s_a, b, s_b, k)
    assert w_ab == pytest.approx(weighted_subspace_similarity(b, s_b, a, s_a, k), abs=1e-12)
    assert 0.0 <= w_ab <= 1.0


def test_orthogonal_subspaces_have_zero_similarity() -> None:
    q = orthonormal(10, 10, 0)
    assert subspace_similarity(q[:, :4], q[:, 4:8], 4) == pytest.approx(0.0, abs=1e-7)
    # a rotation inside the same span keeps Psi = 1
    rot = orthonormal(4, 4, 1)
    assert subspace_similarity(q[:, :4], q[:, :4] @ rot, 4) == pytest.approx(1.0, abs=1e-6)


def test_unrelated_random_subspaces_sit_near_chance() -> None:
    """E[Psi_k] = k / d for independent uniformly random k-dim subspaces of R^d. Averaged over
    40 pairs at d = 64, k = 8 (chance 0.125), the mean is within 0.02 of chance."""
    d, k = 64, 8
    values = [
        subspace_similarity(orthonormal(d, k, 2 * i), orthonormal(d, k, 2 * i + 1), k)
        for i in range(40)
    ]
    mean = sum(values) / len(values)
    assert abs(mean - k / d) < 0.02
    assert max(values) < 0.35


def test_weighted_similarity_favours_the_leading_directions() -> None:
    q = orthonormal(12, 6, 3)
    s = torch.tensor([10.0, 5.0, 1.0, 0.1])
    same_top = torch.cat([q[:, :2], q[:, 4:6]], dim=1)  # shares the two strongest directions
    same_bottom = torch.cat([q[:, 4:6], q[:, 2:4]], dim=1)  # shares the two weakest
    plain_top = subspace_similarity(q[:, :4], same_top, 4)
    plain_bottom = subspace_similarity(q[:, :4], same_bottom, 4)
    assert plain_top == pytest.approx(plain_bottom, abs=1e-6)  # eq. 4 cannot tell them apart
    top = weighted_subspace_similarity(q[:, :4], s, same_top, s, 4)
    bottom = weighted_subspace_similarity(q[:, :4], s, same_bottom, s, 4)
    assert top > 0.8 > 0.2 > bottom


@settings(max_examples=15, deadline=None)
@given(seed=seeds, weighted=st.booleans())
def test_batched_forms_equal_the_single_pair_function(seed: int, weighted: bool) -> None:
    m, k, n_a, n_b = 12, 3, 4, 5
    a = torch.stack([orthonormal(m, 5, seed + i) for i in range(n_a)])
    b = torch.stack([orthonormal(m, 5, seed + 100 + i) for i in range(n_b)])
    g = torch.Generator().manual_seed(seed)
    s_a = torch.rand(n_a, 5, generator=g).sort(dim=1, descending=True).values if weighted else None
    s_b = torch.rand(n_b, 5, generator=g).sort(dim=1, descending=True).values if weighted else None
    grid = similarity_matrix(a, b, k, s_a, s_b)
    assert grid.shape == (n_a, n_b) and grid.dtype == torch.float64
    for i in range(n_a):
        for j in range(n_b):
            single = (
                weighted_subspace_similarity(a[i], s_a[i], b[j], s_b[j], k)
                if s_a is not None and s_b is not None
                else subspace_similarity(a[i], b[j], k)
            )
            assert float(grid[i, j]) == pytest.approx(single, abs=1e-10)
    pairs = subspace_similarity_batch(
        a[:4], b[:4], k, None if s_a is None else s_a[:4], None if s_b is None else s_b[:4]
    )
    assert torch.allclose(pairs, torch.diagonal(grid[:4, :4]), atol=1e-12)


def test_k_out_of_range_and_dimension_mismatch_raise() -> None:
    a = orthonormal(8, 3, 0)
    with pytest.raises(ValueError, match="k = 4"):
        subspace_similarity(a, a, 4)
    with pytest.raises(ValueError, match="dimensions"):
        subspace_similarity(a, orthonormal(9, 3, 1), 2)


def test_roles_wildcard_numeric_segments_and_are_configurable() -> None:
    name = "down_blocks.2.attentions.0.transformer_blocks.3.attn1.to_q"
    assert role_of(name) == "down_blocks.*.attentions.*.transformer_blocks.*.attn1.to_q"
    assert (
        role_of("encoder.layer.11.attention.self.query") == "encoder.layer.*.attention.self.query"
    )
    merged = RoleRule(substitutions=((r"^(down|up)_blocks", "blocks"),))
    assert role_of(name, merged) == "blocks.*.attentions.*.transformer_blocks.*.attn1.to_q"
    assert role_of(name, RoleRule(function=lambda n: n.rsplit(".", 1)[-1])) == "to_q"
    with pytest.raises(ValueError, match="pattern"):
        RoleRule(substitutions=(("(", ""),))


def test_default_selection_covers_unet_llama_and_bert_attention() -> None:
    names = [
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
        "unet.down_blocks.0.resnets.0.conv1",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.mlp.gate_proj",
        "encoder.layer.0.attention.self.value",
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.output.dense",
    ]
    chosen = ModuleSelector().select(names)
    assert chosen == tuple(names[i] for i in (0, 1, 3, 5, 6))
    no_out = ModuleSelector(exclude=(r"to_out",))
    assert names[1] not in no_out.select(names) and names[0] in no_out.select(names)


def test_pair_validity_follows_appendix_d() -> None:
    q = ModuleRef("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (640, 640))
    q2 = ModuleRef("down_blocks.1.attentions.1.transformer_blocks.3.attn1.to_q", (640, 640))
    k = ModuleRef("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", (640, 640))
    q_wide = ModuleRef("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (1280, 1280))
    k_cross = ModuleRef("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (640, 2048))
    assert pair_validity(q, q2) is None
    reason = pair_validity(q, k)
    assert reason is not None and "different roles" in reason
    reason = pair_validity(q, q_wide)
    assert reason is not None and "different shapes" in reason
    # one dimension in common: valid on that side only
    assert pair_validity(q, k_cross) is None
    left, right = side_validity(q, k_cross)
    assert left is None and right is not None and "2048" in right
