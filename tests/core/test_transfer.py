"""Transfer: eq. 3 / Algorithm 1, subspace and copy modes, different shapes, whole adapters."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.adapter import AdapterKind, LoraModule
from core.atc import compute_atc
from core.errors import BaseMismatchError, MissingModuleError, NonFiniteError, ShapeMismatchError
from core.factorize import FactorStore, factorize
from core.matching import Decision, match_modules
from core.modes import Pair, project
from core.projection import SIGN_RISK, TransferMode, module_needs, transfer_module
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

seeds = st.integers(0, 100_000)


def _delta(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return scale * (up.double() @ down.double())


def _projected(dw: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """U U^T dW V V^T, formed explicitly (test-side only)."""
    u, v = u.double(), v.double()
    return u @ u.T @ dw.double() @ v @ v.T


# --- the reference: Algorithm 1 --------------------------------------------------------------

SHAPES = {
    # Stable Diffusion attention: self-attn to_q (320), cross-attn to_k (640 x 768), 1280 wide
    "sd.attn1.to_q": (320, 320),
    "sd.attn2.to_k": (640, 768),
    "sd.mid.attn1.to_v": (1280, 1280),
    # Llama: q_proj 512 x 512 and a GQA k_proj 128 x 512; a tall up_proj for the left side
    "llama.q_proj": (512, 512),
    "llama.k_proj": (128, 512),
    "llama.up_proj": (1024, 256),
}


def test_full_rank_project_mode_is_algorithm_1() -> None:
    target_w = {
        name: random_matrix(m, n, seed=i) for i, (name, (m, n)) in enumerate(SHAPES.items())
    }
    modules = [
        lora_module(name, m, n, r=8, seed=50 + i) for i, (name, (m, n)) in enumerate(SHAPES.items())
    ]
    ref_lora = {}
    for mod in modules:
        ref_lora[f"{mod.name}.lora.up.weight"] = mod.up
        ref_lora[f"{mod.name}.lora.down.weight"] = mod.down
    reference = algorithm1(ref_lora, {f"{k}.weight": w for k, w in target_w.items()})
    target = full_factors(target_w)
    for mod in modules:
        out = transfer_module(mod, target[mod.name], mode="project", kind=AdapterKind.LORA)
        ref_up = reference[f"{mod.name}.lora.up.weight"]
        ref_down = reference[f"{mod.name}.lora.down.weight"]
        m, n = mod.shape
        if m != n:  # a non-square base has a proper subspace on its long side: the pair moves
            assert relative_error(_delta(ref_up, ref_down), mod.delta()) > 0.1
        assert relative_error(out.up, ref_up) < 1e-5, mod.name
        assert relative_error(out.down, ref_down) < 1e-5, mod.name
        assert out.k == min(m, n)


# --- properties -----------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(m=st.integers(3, 14), n=st.integers(3, 14), seed=seeds, data=st.data())
def test_lorax_onto_its_own_base_comes_back_unchanged(m: int, n: int, seed: int, data) -> None:
    p = min(m, n)
    r = data.draw(st.integers(1, p))
    k = data.draw(st.integers(r, p))
    full = data.draw(st.booleans())
    base = factorize(random_matrix(m, n, seed))
    module = lorax_module(
        "w", base, r, seed + 1, full=full, scale=data.draw(st.sampled_from([1.0, 0.5]))
    )
    source_delta = module.delta()
    assert float(source_delta.norm()) > 0
    for mode, rank in (
        (TransferMode.PROJECT, k),
        (TransferMode.SUBSPACE, None),
        (TransferMode.COPY, None),
    ):
        out = transfer_module(module, base, base, mode=mode, rank=rank)
        assert relative_error(_delta(out.up, out.down, out.scale), source_delta) < 1e-5, mode
    if r < max(m, n):  # a proper subspace of another base moves the update
        other = factorize(random_matrix(m, n, seed + 2))
        moved = transfer_module(module, other, base, mode="subspace")
        assert relative_error(_delta(moved.up, moved.down, moved.scale), source_delta) > 1e-3


@settings(max_examples=25, deadline=None)
@given(m=st.integers(3, 14), n=st.integers(3, 14), seed=seeds, data=st.data())
def test_projection_is_idempotent(m: int, n: int, seed: int, data) -> None:
    k = data.draw(st.integers(1, min(m, n)))
    target = factorize(random_matrix(m, n, seed))
    up, down = lora_module("w", m, n, 3, seed + 1).up, lora_module("w", m, n, 3, seed + 2).down
    left = target.U[:, :k] if k < m else None
    right = target.V[:, :k] if k < n else None
    once = project(Pair(up, down, 1.0), left, right)
    twice = project(once, left, right)
    assert relative_error(twice.up, once.up) < 1e-5 and relative_error(twice.down, once.down) < 1e-5
    if k < max(m, n):  # a proper subspace on at least one side: something was removed
        changed = relative_error(once.up, up) + relative_error(once.down, down)
        assert changed > 1e-4


@settings(max_examples=25, deadline=None)
@given(
    shape_s=st.tuples(st.integers(4, 12), st.integers(4, 12)),
    shape_t=st.tuples(st.integers(4, 12), st.integers(4, 12)),
    seed=seeds,
    data=st.data(),
)
def test_different_shape_diagonal_ds_is_copied_onto_target_vectors(
    shape_s, shape_t, seed, data
) -> None:
    if shape_s == shape_t:
        shape_t = (shape_t[0] + 1, shape_t[1])
    source = factorize(random_matrix(*shape_s, seed))
    target = factorize(random_matrix(*shape_t, seed + 1))
    r = data.draw(st.integers(1, min(source.full_rank, target.full_rank)))
    module = lorax_module("w", source, r, seed + 2)
    assert module.ds is not None
    expected = (target.U[:, :r].double() * module.ds.double()) @ target.V[:, :r].double().T
    out = transfer_module(module, target, source, mode="project")
    assert (out.up.shape[0], out.down.shape[1]) == shape_t
    assert relative_error(_delta(out.up, out.down, out.scale), expected) < 1e-5
    assert SIGN_RISK not in out.notes and any("different shape" in n for n in out.notes)
    copied = transfer_module(module, target, source, mode="copy")
    assert relative_error(_delta(copied.up, copied.down, copied.scale), expected) < 1e-5
    full = lorax_module("w", source, r, seed + 3, full=True)
    assert SIGN_RISK in transfer_module(full, target, source).notes


# --- modes ----------------------------------------------------------------------------------


def test_truncated_project_and_subspace_modes() -> None:
    source, target = factorize(random_matrix(12, 10, 1)), factorize(random_matrix(12, 10, 2))
    module = lorax_module("w", source, 4, 3, scale=2.0)
    dw = module.delta()
    out = transfer_module(module, target, mode="project", rank=6)
    expected = _projected(dw, target.U[:, :6], target.V[:, :6])
    assert out.k == 6 and out.scale == 2.0 and out.ds is None
    assert relative_error(_delta(out.up, out.down, out.scale), expected) < 1e-5
    sub = transfer_module(module, target, mode="subspace")
    assert torch.equal(sub.up, target.U[:, :4]) and sub.ds is not None and sub.ds.shape == (4, 4)
    expected = _projected(dw, target.U[:, :4], target.V[:, :4])
    assert relative_error(_delta(sub.up, sub.down, sub.scale), expected) < 1e-5
    as_lorax = (target.U[:, :4].double() @ sub.ds.double()) @ target.V[:, :4].double().T
    assert relative_error(as_lorax, expected) < 1e-5  # dS' is the true r x r dS


def test_copy_mode_with_and_without_a_known_ds() -> None:
    source, target = factorize(random_matrix(10, 10, 4)), factorize(random_matrix(10, 10, 5))
    module = lorax_module("w", source, 3, 6)
    assert module.ds is not None
    expected = (target.U[:, :3].double() * module.ds.double()) @ target.V[:, :3].double().T
    known = transfer_module(module, target, mode="copy")
    assert known.ds is not None and known.ds.shape == (3,)
    assert relative_error(_delta(known.up, known.down), expected) < 1e-5
    unknown = LoraModule(name="w", up=module.up, down=module.down)  # expanded form, dS lost
    with pytest.raises(ValueError, match="source"):
        transfer_module(unknown, target, mode="copy")
    recovered = transfer_module(unknown, target, source, mode="copy")
    assert any("recovered" in n for n in recovered.notes)
    assert relative_error(_delta(recovered.up, recovered.down), expected) < 1e-5


def test_compact_module_is_expanded_against_its_base() -> None:
    w = random_matrix(9, 7, 8)
    source = factorize(w, digest="sha256:" + "aa" * 32)
    target = factorize(random_matrix(9, 7, 9))
    expanded = lorax_module("w", source, 3, 10)
    assert expanded.ds is not None
    compact = LoraModule.from_ds("w", expanded.ds, (9, 7), source.digest)
    a = transfer_module(compact, target, source)
    b = transfer_module(expanded, target, source)
    assert relative_error(_delta(a.up, a.down), _delta(b.up, b.down)) < 1e-6
    other = factorize(w, digest="sha256:" + "bb" * 32)
    with pytest.raises(BaseMismatchError, match="aaaa"):
        transfer_module(compact, target, other)


# --- whole adapters -------------------------------------------------------------------------

TB = "down_blocks.2.attentions.0.transformer_blocks.{}.attn1.to_q"


def _ssd_like():
    weights = {TB.format(i): random_matrix(16, 16, 300 + i) for i in range(6)}
    source = {name: factorize(w) for name, w in weights.items()}

    def noise(w: torch.Tensor, s: int) -> torch.Tensor:
        return w + 1e-4 * torch.randn(w.shape, generator=torch.Generator().manual_seed(s))

    target = {
        TB.format(0): factorize(noise(weights[TB.format(0)], 1)),
        TB.format(1): factorize(noise(weights[TB.format(1)], 2)),
        TB.format(2): factorize(random_matrix(16, 16, 999)),
        TB.format(3): factorize(noise(weights[TB.format(5)], 3)),
    }
    return source, target


def test_transfer_adapter_with_decisions_counts_and_figures() -> None:
    source, target = _ssd_like()
    adapter = adapter_of(
        [lorax_module(TB.format(i), source[TB.format(i)], 8, 20 + i) for i in range(6)]
    )
    atc = compute_atc(source, target, k=4)
    decisions = match_modules(atc, min_similarity=0.5)
    result = transfer_adapter(adapter, source, target, decisions, atc=atc)
    assert set(result.adapter.modules) == {TB.format(0), TB.format(1), TB.format(3)}
    assert (result.modules_transferred, result.modules_rematched, result.modules_skipped) == (
        3,
        1,
        3,
    )
    assert result.atc is atc and result.is_lorax and result.notes == ()
    out = result.adapter
    assert out.kind is adapter.kind and out.layout is adapter.layout
    assert out.config == adapter.config and out.metadata == adapter.metadata
    moved = out.modules[TB.format(3)]
    fed = adapter.modules[TB.format(5)]
    assert relative_error(moved.delta(), fed.delta()) < 1e-3  # tb.3 took tb.5's update
    assert relative_error(moved.delta(), adapter.modules[TB.format(3)].delta()) > 0.5
    # energy retained and adapter-weighted similarity, from the definitions
    e_out = sum(float(m.delta().double().square().sum()) for m in out.modules.values())
    e_in = sum(float(m.delta().double().square().sum()) for m in adapter.modules.values())
    assert result.energy_retained == pytest.approx(e_out / e_in, rel=1e-4)
    rows = [r for r in result.modules if r.phi is not None]
    expected = sum(r.phi * r.energy_source for r in rows) / sum(r.energy_source for r in rows)
    assert result.adapter_weighted_similarity == pytest.approx(expected)
    by_source = {r.source: r for r in result.modules}
    assert by_source[TB.format(5)].decision is Decision.REMATCHED
    assert by_source[TB.format(5)].target == TB.format(3)
    assert (
        by_source[TB.format(2)].decision is Decision.SKIPPED and by_source[TB.format(2)].rank == 0
    )
    assert "no valid source module" in by_source[TB.format(2)].notes[0]
    assert by_source[TB.format(4)].target is None  # no such target module
    dropped = by_source[TB.format(3)]  # its target slot went to tb.5's update
    assert dropped.decision is Decision.SKIPPED and dropped.target == TB.format(3)
    assert f"took {TB.format(5)}'s update instead" in dropped.notes[0]
    assert len(result.modules) == 3 + 3


def test_plain_lora_is_flagged_and_scale_is_folded() -> None:
    source, target = _ssd_like()
    adapter = adapter_of(
        [lora_module(TB.format(i), 16, 16, 4, 40 + i, scale=2.0) for i in range(2)],
        kind=AdapterKind.LORA,
    )
    for mode in TransferMode:
        result = transfer_adapter(adapter, source, target, mode=mode)
        assert not result.is_lorax and "not a LoRA-X" in result.notes[0]
        assert result.modules_transferred == 2 and result.adapter_weighted_similarity is None
        for name, module in result.adapter.modules.items():
            assert module.up.dtype == torch.float32 and module.down.dtype == torch.float32
            t = target[name]
            r = 4
            expected = _projected(adapter.modules[name].delta(), t.U[:, :r], t.V[:, :r])
            if mode is TransferMode.PROJECT:
                expected = _projected(adapter.modules[name].delta(), t.U, t.V)
            if mode is not TransferMode.COPY:
                assert relative_error(module.delta(), expected) < 1e-5, mode
            assert any(
                "plain LoRA" in n for n in next(r for r in result.modules if r.target == name).notes
            )


def test_store_backed_transfer_equals_mapping_backed(tmp_path: Path) -> None:
    src_w = {f"layers.{i}.self_attn.q_proj": random_matrix(12, 12, i) for i in range(2)}
    tgt_w = {k: v + 0.05 * random_matrix(12, 12, 77) for k, v in src_w.items()}
    source = FactorStore(WeightSource.open(write_base(tmp_path / "s.safetensors", src_w)))
    target = FactorStore(WeightSource.open(write_base(tmp_path / "t.safetensors", tgt_w)))
    adapter = adapter_of([lorax_module(k, factorize(w), 4, 5) for k, w in src_w.items()])
    via_store = transfer_adapter(adapter, source, target, mode="subspace")
    via_map = transfer_adapter(adapter, full_factors(src_w), full_factors(tgt_w), mode="subspace")
    for name, module in via_store.adapter.modules.items():
        assert relative_error(module.delta(), adapter.modules[name].delta()) > 1e-3
        assert relative_error(module.delta(), via_map.adapter.modules[name].delta()) < 1e-5
        assert module.base_digest == target.source.digest(name)
    # views (as built for the ATC, at a small rank) are answered by their store at full rank
    via_views = transfer_adapter(adapter, source.view(rank=2), target.view(rank=2))
    via_full = transfer_adapter(adapter, full_factors(src_w), full_factors(tgt_w))
    for name, module in via_views.adapter.modules.items():
        assert relative_error(module.delta(), via_full.adapter.modules[name].delta()) < 1e-5


def test_square_modules_at_full_rank_need_no_target_factors(tmp_path: Path) -> None:
    # U_t U_t^T = I for a square base: eq. 3 leaves such a module as it is, so a cold store
    # factorizes only the rectangular weights, and the result is still Algorithm 1's
    target_w = {
        name: random_matrix(m, n, seed=i) for i, (name, (m, n)) in enumerate(SHAPES.items())
    }
    modules = [
        lora_module(name, m, n, r=8, seed=50 + i) for i, (name, (m, n)) in enumerate(SHAPES.items())
    ]
    source = FactorStore(WeightSource.open(write_base(tmp_path / "s.safetensors", target_w)))
    target = FactorStore(WeightSource.open(write_base(tmp_path / "t.safetensors", target_w)))
    result = transfer_adapter(adapter_of(modules), source, target, mode="project")
    rectangular = [name for name, (m, n) in SHAPES.items() if m != n]
    assert target.computed == len(rectangular) and source.computed == 0
    assert target.computed_by_kind["basis"] == len(rectangular)  # one QR each, no SVD
    ref_lora = {}
    for mod in modules:
        ref_lora[f"{mod.name}.lora.up.weight"] = mod.up
        ref_lora[f"{mod.name}.lora.down.weight"] = mod.down
    reference = algorithm1(ref_lora, {f"{k}.weight": w for k, w in target_w.items()})
    for mod in modules:
        out = result.adapter.modules[mod.name]
        assert relative_error(out.up, reference[f"{mod.name}.lora.up.weight"]) < 1e-5
        assert relative_error(out.down, reference[f"{mod.name}.lora.down.weight"]) < 1e-5
        if mod.name not in rectangular:
            assert torch.equal(out.up, mod.up.float()) and torch.equal(out.down, mod.down.float())
    # a truncated rank or another mode does need them; so does a rectangular module
    assert module_needs(modules[0], (320, 320), "project", rank=16).target is not None
    assert module_needs(modules[0], (320, 320), "subspace").target is not None
    rectangular_need = module_needs(modules[1], (640, 768), "project").target
    assert rectangular_need is not None and not rectangular_need.exact  # a range basis serves
    assert (rectangular_need.left, rectangular_need.right) == (False, True)  # V of a wide W
    assert module_needs(modules[0], (320, 320), "project", rank=320).target is None
    with pytest.raises(ValueError, match="needs the target base's factors"):
        transfer_module(modules[1], None, mode="project")


def test_bad_adapters_raise_typed_errors_naming_the_module() -> None:
    source, target = _ssd_like()
    wrong = adapter_of([lora_module(TB.format(0), 16, 8, 2, 1)])
    with pytest.raises(
        ShapeMismatchError, match=r"synthetic-adapter.*transformer_blocks\.0.*16 x 8"
    ):
        transfer_adapter(wrong, source, target)
    unknown = adapter_of([lora_module("up_blocks.0.attn.to_q", 16, 16, 2, 1)])
    with pytest.raises(MissingModuleError, match=r"up_blocks\.0\.attn\.to_q"):
        transfer_adapter(unknown, {}, {"up_blocks.0.attn.to_q": source[TB.format(0)]})
    bad = lora_module(TB.format(1), 16, 16, 2, 1)
    bad.up[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"transformer_blocks\.1"):
        transfer_adapter(adapter_of([bad]), source, target)


def test_handmade_decisions_swap_and_skip() -> None:
    from core.matching import ModuleDecision

    base = {n: factorize(random_matrix(8, 8, i)) for i, n in enumerate(("a", "b"))}
    adapter = adapter_of([lorax_module(n, base[n], 2, 7 + i) for i, n in enumerate(("a", "b"))])
    decisions = [
        ModuleDecision("a", None, Decision.SKIPPED, 0.1, 0.1, 0.1, 0.0, "too far"),
        ModuleDecision("b", "a", Decision.REMATCHED, 0.9, 0.9, 0.9, 0.5, "moved"),
    ]
    result = transfer_adapter(adapter, base, base, decisions)
    assert list(result.adapter.modules) == ["b"]
    assert relative_error(result.adapter.modules["b"].delta(), adapter.modules["a"].delta()) < 1e-5
    assert (result.modules_transferred, result.modules_rematched, result.modules_skipped) == (
        1,
        1,
        1,
    )
    rows = {r.source: r for r in result.modules if r.decision is Decision.SKIPPED}
    assert rows["a"].notes == ("too far (its update still feeds b)",)
    assert "took a's update instead" in rows["b"].notes[0]
    with pytest.raises(ValueError, match="two decisions"):
        transfer_adapter(adapter, base, base, [decisions[1], decisions[1]])


def test_modules_outside_the_assessed_set_go_to_their_own_target() -> None:
    from core.matching import ModuleDecision
    from core.transfer import OUTSIDE_ASSESSED

    base = {n: factorize(random_matrix(8, 8, i)) for i, n in enumerate(("attn", "ff", "gone"))}
    target = {n: base[n] for n in ("attn", "ff")}
    adapter = adapter_of([lora_module(n, 8, 8, 2, 3 + i) for i, n in enumerate(base)])
    decisions = [ModuleDecision("attn", "attn", Decision.SAME_NAME, 0.9, 0.9, 0.9, 0.5, "same")]
    result = transfer_adapter(adapter, base, target, decisions)
    assert set(result.adapter.modules) == {"attn", "ff"}  # ff was not assessed, still carried
    row = next(r for r in result.modules if r.target == "ff")
    assert row.decision is Decision.SAME_NAME and OUTSIDE_ASSESSED in row.notes
    assert result.left_out == (("gone", "no module of that name in the target base"),)
    energy = {n: m.energy() for n, m in adapter.modules.items()}
    assert result.dropped_energy_share == pytest.approx(energy["gone"] / sum(energy.values()))
    assert 0 < result.dropped_energy_share < 1


def test_a_target_fed_by_several_sources_gets_their_weighted_sum() -> None:
    from core.matching import ModuleDecision

    base = {n: factorize(random_matrix(8, 8, i)) for i, n in enumerate(("a", "b", "c"))}
    target = {"c": base["c"]}
    adapter = adapter_of([lora_module(n, 8, 8, 2, 11 + i, scale=0.5) for i, n in enumerate("ab")])
    merged = ModuleDecision(
        "c", "a", Decision.REMATCHED, 0.7, 0.7, 0.7, 0.5, "merge",
        contributions=(("a", 0.25), ("b", 0.75)),
    )  # fmt: skip
    result = transfer_adapter(adapter, base, target, [merged])
    out = result.adapter.modules["c"]
    assert out.rank == 4 and result.modules_skipped == 0 and result.left_out == ()
    expected = 0.25 * adapter.modules["a"].delta() + 0.75 * adapter.modules["b"].delta()
    single = transfer_adapter(
        adapter, base, target, [dataclasses.replace(merged, contributions=())]
    )
    assert relative_error(single.adapter.modules["c"].delta(), expected) > 0.1
    assert relative_error(out.delta(), expected) < 1e-5  # square at full rank: unchanged updates
    row = result.modules[0]
    assert row.contributions == (("a", 0.25), ("b", 0.75)) and row.source == "b"
