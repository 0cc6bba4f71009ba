"""Per-module transfer of one LoRA pair onto a target base (section 4.2, eq. 3, Algorithm 1).

Notation: source base W_s (m, n) = U_s S_s V_s^T, target base W_t (m', n') = U_t S_t V_t^T,
adapter update dW_s = s B A with B (m, r), A (r, n), scale s. X_k is the first k columns of X.
Products run right to left: an m x m projector U U^T is never formed. In project mode a side
whose dimension equals k keeps its factor: U_t,k is then square and orthogonal, U_t,k U_t,k^T = I
exactly (Algorithm 1 computes that identity in float32, to about 1e-6), so a square module at full
rank k = m = n is carried unchanged and needs no target factors at all.

- project (eq. 3; Algorithm 1 at k = p):  B' = U_t,k (L_k^T B),  A' = (A R_k) V_t,k^T
- subspace (k = r, a LoRA-X of the target): dS' = s (L_r^T B)(A R_r) (r x r, full),
  up = U_t,r, down = (dS' / s) V_t,r^T
- copy (Table 5 ablation): up = U_t,r, down = (dS_s / s) V_t,r^T, with dS_s the module's dS if
  known, else s (U_s,r^T B)(A V_s,r)

where (L, R) = (U_t, V_t) for the same shape (projection onto the target's subspaces) and
(L, R) = (U_s, V_s) when the shapes differ (section 4.2.2: coordinates in the source basis
carried to the target basis). For a diagonal LoRA-X, B = U_s,r and A = diag(d) V_s,r^T, so the
different-shape map gives U_t,r diag(d) V_t,r^T: dS copied onto the target's singular vectors,
unaffected by the sign convention.

When only one dimension differs, both sides still go through basis coordinates. Projecting the
equal side onto the target (A V_t V_t^T) while carrying the other side's coordinates would pair
the target's left vectors u_t,i with the source's right vectors v_s,i, whose relative signs are
arbitrary: a diagonal dS would come out with random sign flips. Mapping both sides keeps each
(u_i, v_i) pair together. For a full dS or a plain LoRA the coordinates still depend on the signs
(and, for repeated singular values, rotations) of both bases' singular vectors: a risk the result
notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

from core.adapter import LoraModule
from core.errors import BaseMismatchError, NonFiniteError
from core.factors import Factors
from core.finite import all_finite

__all__ = [
    "ModuleTransfer",
    "TransferMode",
    "needs_source_factors",
    "needs_target_factors",
    "project_pair",
    "transfer_module",
]

PLAIN_LORA = "plain LoRA, not a LoRA-X: projected onto the target (paper Table 2)"
SIGN_RISK = (
    "sign/rotation risk: a full dS or plain LoRA is carried through basis coordinates, which "
    "depend on the singular-vector signs of both bases (convention: largest |u_i| entry positive)"
)


class TransferMode(StrEnum):
    """How an adapter module is carried to the target base."""

    PROJECT = "project"  # eq. 3 at rank k (default k = p: the paper's Algorithm 1)
    SUBSPACE = "subspace"  # k = r: the result is a LoRA-X of the target with a full r x r dS
    COPY = "copy"  # Table 5 ablation: the source dS copied onto the target's singular vectors


@dataclass(frozen=True, eq=False)
class ModuleTransfer:
    """One transferred module.

    Attributes:
        up: B' (m', r_out), float32.
        down: A' (r_out, n'), float32.
        scale: the multiplier of up @ down (the input's scale; 1 if that was 0).
        ds: dS of the result as a LoRA-X of the target (subspace: (r, r); copy: the source's
            form), None in project mode.
        k: the rank of the bases used.
        notes: risks and facts worth reporting.
    """

    up: torch.Tensor
    down: torch.Tensor
    scale: float
    ds: torch.Tensor | None
    k: int
    notes: tuple[str, ...]


def project_pair(
    up: torch.Tensor, down: torch.Tensor, target: Factors, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 with target factors of rank k: B' = U_t,k (U_t,k^T B), A' = (A V_t,k) V_t,k^T.

    A side with k = m (left) or k = n (right) is returned as is: its projector is the identity.

    Args:
        up: B (m, r); down: A (r, n); target: factors of an (m, n) base holding >= k triplets.

    Returns:
        (B', A'), float32, shapes unchanged.
    """
    m, n = target.shape
    up, down = up.float(), down.float()
    if k < m:
        u = target.U[:, :k]
        up = u @ (u.T @ up)
    if k < n:
        v = target.V[:, :k]
        down = (down @ v) @ v.T
    return up, down


def _ds_matrix(ds: torch.Tensor, r: int) -> torch.Tensor:
    ds = ds.float()
    return torch.diag(ds[:r]) if ds.ndim == 1 else ds[:r, :r]


def _check_base(module: LoraModule, source: Factors) -> None:
    """A compact LoRA-X decodes only against the base tensor it was trained on."""
    if module.base_digest and source.digest and module.base_digest != source.digest:
        raise BaseMismatchError(
            f"compact LoRA-X was trained on base tensor {module.base_digest}, the source base "
            f"holds {source.digest}",
            key=module.name,
        )


def _expand_compact(
    module: LoraModule, source: Factors | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U_s,r and A = dS V_s,r^T of a compact LoRA-X (dW = U_s,r dS V_s,r^T)."""
    assert module.ds is not None
    r = module.rank
    if source is None or source.rank < r:
        raise ValueError(f"module {module.name}: a compact LoRA-X needs source factors of rank {r}")
    _check_base(module, source)
    return source.U[:, :r], _ds_matrix(module.ds, r) @ source.V[:, :r].T


def needs_source_factors(
    module: LoraModule, target_shape: tuple[int, int], mode: TransferMode | str
) -> bool:
    """Whether :func:`transfer_module` needs the source base's factors for this module: a
    different shape or a compact module (project, subspace), or copy mode without a known dS."""
    if TransferMode(mode) is TransferMode.COPY:
        return module.ds is None
    return module.shape != tuple(target_shape) or module.is_compact


def needs_target_factors(
    module: LoraModule,
    target_shape: tuple[int, int],
    mode: TransferMode | str,
    rank: int | None = None,
) -> bool:
    """Whether :func:`transfer_module` needs the target base's factors for this module: always,
    except in project mode for a square, non-compact module of the target's shape at full rank
    (k = m = n), which eq. 3 leaves unchanged."""
    if TransferMode(mode) is not TransferMode.PROJECT or module.is_compact:
        return True
    m, n = module.shape
    if tuple(target_shape) != (m, n) or m != n:
        return True
    return rank is not None and rank < m


def transfer_module(
    module: LoraModule,
    target: Factors | None,
    source: Factors | None = None,
    *,
    mode: TransferMode | str = TransferMode.PROJECT,
    rank: int | None = None,
    lorax: bool = True,
) -> ModuleTransfer:
    """Carry one adapter module to the target base (see the module docstring for the formulas).

    Args:
        module: the adapter module on the source base, (m, n), rank r. A compact module is
            expanded with ``source`` first.
        target: factors of the target weight (m', n'). Project mode at ``rank`` None needs all p
            triplets; other modes need the ranks they use. None where
            :func:`needs_target_factors` says they are not needed (the module is returned as is).
        source: factors of the source weight; needed for a different shape, a compact module, or
            copy mode without a known dS.
        mode: :class:`TransferMode`.
        rank: project: k (None: p, or min(p_s, p_t) across shapes); subspace: r_out (None: r);
            copy: dS truncated to this rank (None: r).
        lorax: False for a plain LoRA (adds notes only).

    Returns:
        A :class:`ModuleTransfer`.

    Raises:
        ValueError: missing or too small factors.
        BaseMismatchError: a compact module whose base digest differs from ``source``'s.
        NonFiniteError: a non-finite result.
    """
    mode = TransferMode(mode)
    notes: list[str] = [] if lorax else [PLAIN_LORA]
    if target is None:
        if needs_target_factors(module, module.shape, mode, rank):
            raise ValueError(f"module {module.name}: this transfer needs the target base's factors")
        up, down = module.up.float(), module.down.float()
        return _result(up, down, float(module.scale), None, min(module.shape), notes, module.name)
    (m, n), (mt, nt) = module.shape, target.shape
    if source is not None and source.shape != (m, n):
        raise ValueError(f"module {module.name}: source factors {source.shape} != adapter {(m, n)}")
    copy = mode is TransferMode.COPY
    reshaped = (m, n) != (mt, nt)
    if needs_source_factors(module, (mt, nt), mode) and source is None:
        raise ValueError(f"module {module.name}: this transfer needs the source base's factors")
    if reshaped:
        notes.append(f"different shape {m} x {n} -> {mt} x {nt}: mapped through basis coordinates")
        if not copy and (not lorax or module.ds is None or module.ds.ndim == 2):
            notes.append(SIGN_RISK)
    scale = float(module.scale) if module.scale != 0 else 1.0
    cap = target.full_rank
    if not copy and reshaped:
        assert source is not None
        cap = min(cap, source.full_rank)
    if copy:
        r = min(rank or module.rank, module.rank, cap)
        if module.ds is not None:
            if module.is_compact and source is not None:
                _check_base(module, source)
            ds = module.ds.float()[:r] if module.ds.ndim == 1 else module.ds.float()[:r, :r]
        else:
            assert source is not None
            _need(source, r, module.name)
            up, down = module.up.float(), module.down.float()
            ds = module.scale * ((source.U[:, :r].T @ up) @ (down @ source.V[:, :r]))
            notes.append("dS recovered from the source factors as U_s,r^T dW V_s,r")
        _need(target, r, module.name)
        u, v = target.U[:, :r], target.V[:, :r]
        return _result(u, (_ds_matrix(ds, r) / scale) @ v.T, scale, ds, r, notes, module.name)
    if module.is_compact:
        up, down = _expand_compact(module, source)
    else:
        up, down = module.up.float(), module.down.float()
    left = source if reshaped else target
    right = source if reshaped else target
    assert left is not None and right is not None
    if mode is TransferMode.SUBSPACE:
        r = min(rank or module.rank, cap)
        _need(target, r, module.name)
        _need(left, r, module.name)
        _need(right, r, module.name)
        ds = module.scale * ((left.U[:, :r].T @ up) @ (down @ right.V[:, :r]))
        u, v = target.U[:, :r], target.V[:, :r]
        return _result(u, (ds / scale) @ v.T, scale, ds, r, notes, module.name)
    k = cap if rank is None else min(rank, cap)
    for factors in {id(f): f for f in (target, left, right)}.values():
        _need(factors, k, module.name)
    if not reshaped:
        up2, down2 = project_pair(up, down, target, k)
    else:
        up2 = target.U[:, :k] @ (left.U[:, :k].T @ up)
        down2 = (down @ right.V[:, :k]) @ target.V[:, :k].T
    return _result(up2, down2, float(module.scale), None, k, notes, module.name)


def _need(factors: Factors, k: int, name: str) -> None:
    if factors.rank < k:
        raise ValueError(f"module {name}: factors hold {factors.rank} triplets, {k} are needed")


def _result(
    up: torch.Tensor,
    down: torch.Tensor,
    scale: float,
    ds: torch.Tensor | None,
    k: int,
    notes: list[str],
    name: str,
) -> ModuleTransfer:
    up, down = up.float().contiguous(), down.float().contiguous()
    if not (all_finite(up) and all_finite(down)):
        raise NonFiniteError("transferred module is not finite", key=name)
    return ModuleTransfer(up, down, scale, None if ds is None else ds.float(), k, tuple(notes))
