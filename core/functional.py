"""Data-free functional agreement of two bases and of an adapter's effect on them.

Where ATC reads weights only (singular subspaces of the attention modules), these signals run
the models on seeded probe inputs (:mod:`core.probes`) and compare what comes out. ``core`` does
not build models: callers pass *encoders*, callables from a probe set to its
:class:`Representations` (``migrator.functional`` builds them from base folders).

- **Representation agreement of two bases**: debiased linear CKA (Kornblith et al. 2019, with the
  unbiased HSIC estimator of Song et al. 2012, as in Nguyen et al. 2021) between the final
  representations of the probes on source and target, and between matched layers.
- **Adapter-effect agreement**: the Pearson correlation, over the entries i < j, of the change
  the adapter makes to the probes' pairwise cosine-similarity matrix on the source and the change
  the transferred adapter makes on the target:
  r = corr(C(s + dW_s) - C(s), C(t + dW_t) - C(t)), C_ij = cos(h_i, h_j).

Everything is computed in float64; results are frozen dataclasses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from core.probes import LatentProbes, TextProbes, TokenProbes

__all__ = [
    "AdapterAgreement",
    "EffectAgreement",
    "Encoder",
    "LayerAgreement",
    "Probe",
    "ProbeAgreement",
    "RepresentationAgreement",
    "Representations",
    "adapter_agreement",
    "cosine_similarities",
    "effect_agreement",
    "linear_cka",
    "representation_agreement",
]

Probe = TokenProbes | TextProbes | LatentProbes

_TINY = 1e-12  # below this an effect (std of the cosine changes) counts as none at all


@dataclass(frozen=True, eq=False)
class Representations:
    """What a model computes on one probe set.

    Attributes:
        final: (n, d) one row per probe: the final representation (pooled over positions).
        layers: layer name -> (n, d_layer) pooled output of that layer, for the layers asked for.
    """

    final: torch.Tensor
    layers: Mapping[str, torch.Tensor] = field(default_factory=dict)


Encoder = Callable[[Probe], Representations]
"""A model seen through its probes: probe set -> representations (n rows, one per probe)."""


def _matrix(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"{what} must be (n, d), got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} holds NaN or Inf")
    return x


def _hsic(k: torch.Tensor, l: torch.Tensor, debiased: bool) -> float:  # noqa: E741
    n = k.shape[0]
    if not debiased:
        h = torch.eye(n, dtype=k.dtype) - 1.0 / n
        return float(torch.sum((h @ k @ h) * l)) / (n - 1) ** 2
    k = k.clone().fill_diagonal_(0.0)
    l = l.clone().fill_diagonal_(0.0)  # noqa: E741
    k1, l1 = k.sum(0), l.sum(0)
    value = (
        torch.sum(k * l)
        + k1.sum() * l1.sum() / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * torch.dot(k1, l1)
    )
    return float(value) / (n * (n - 3))


def linear_cka(x: torch.Tensor, y: torch.Tensor, *, debiased: bool = True) -> float:
    """Linear centered kernel alignment of two representations of the same n probes.

    With K = X X^T and L = Y Y^T (n x n), CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)). The
    debiased form (default) uses the unbiased estimator (Song et al. 2012), with K~, L~ the Grams
    with zeroed diagonals:

        HSIC_1(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2))
                        - 2 / (n-2) 1^T K~ L~ 1] / (n (n-3)),

    which removes the bias that makes biased CKA of unrelated high-dimensional representations
    far above 0 at small n; it is in [-1, 1] (an inner product of U-centered Grams) and about 0
    for unrelated representations. The biased form is tr(K H L H) / (n-1)^2 with H = I - 11^T/n.
    Invariant to orthogonal transforms and isotropic scaling of either side; d may differ.

    Args:
        x: (n, d_x), y: (n, d_y); rows are probes, in the same order.
        debiased: use the unbiased HSIC estimator (needs n >= 4).

    Returns:
        CKA in [-1, 1] (biased: [0, 1]).

    Raises:
        ValueError: shapes that do not pair, n < 4 (debiased) or < 2, non-finite values, or a
            representation that does not vary across the probes (CKA undefined).
    """
    x, y = _matrix(x, "x"), _matrix(y, "y")
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x has {n} rows and y {y.shape[0]}: CKA compares the same probes")
    if n < (4 if debiased else 2):
        raise ValueError(f"CKA needs at least {4 if debiased else 2} probes, got {n}")
    k, l = x @ x.T, y @ y.T  # noqa: E741
    kl, kk, ll = _hsic(k, l, debiased), _hsic(k, k, debiased), _hsic(l, l, debiased)
    scale = max(float(k.diagonal().mean()), float(l.diagonal().mean()), 1e-300)
    if kk <= _TINY * scale**2 / n or ll <= _TINY * scale**2 / n:
        raise ValueError("a representation does not vary across the probes: CKA is undefined")
    return max(-1.0, min(1.0, kl / math.sqrt(kk * ll)))


def cosine_similarities(x: torch.Tensor) -> torch.Tensor:
    """C_ij = cos(x_i, x_j) of the rows of ``x`` (n, d), float64 (a zero row has cosine 0)."""
    x = _matrix(x, "representations")
    unit = x / x.norm(dim=1, keepdim=True).clamp(min=1e-300)
    return unit @ unit.T


@dataclass(frozen=True)
class EffectAgreement:
    """How alike an adapter's effect on the source and its transfer's effect on the target are,
    on one probe set.

    Attributes:
        kind: the probe kind.
        count: number of probes n (the correlation runs over n (n - 1) / 2 pairs).
        r: Pearson correlation of the two changes of the cosine-similarity matrix; None when one
            side has no effect at all (then ``reason`` says which).
        source_effect: RMS over pairs of C(s + dW_s) - C(s).
        target_effect: RMS over pairs of C(t + dW_t) - C(t).
        reason: why ``r`` is None.
    """

    kind: str
    count: int
    r: float | None
    source_effect: float
    target_effect: float
    reason: str | None = None

    @property
    def effect_ratio(self) -> float | None:
        """target_effect / source_effect: below 1, the transfer acts more weakly."""
        return None if self.source_effect <= 0 else self.target_effect / self.source_effect


def effect_agreement(
    source_base: torch.Tensor,
    source_adapted: torch.Tensor,
    target_base: torch.Tensor,
    target_adapted: torch.Tensor,
    *,
    kind: str = "",
) -> EffectAgreement:
    """Adapter-effect agreement on one probe set (module docstring).

    Args:
        source_base, source_adapted: (n, d_s) final representations of the probes on the source
            base without and with the adapter.
        target_base, target_adapted: (n, d_t) the same on the target, without and with the
            transferred adapter.
        kind: the probe kind, recorded in the result.

    Returns:
        An :class:`EffectAgreement`.

    Raises:
        ValueError: fewer than 3 probes, row counts that differ, non-finite values.
    """
    n = source_base.shape[0]
    if n < 3 or any(t.shape[0] != n for t in (source_adapted, target_base, target_adapted)):
        raise ValueError("effect agreement needs the same n >= 3 probes on all four sides")
    iu = torch.triu_indices(n, n, offset=1)
    ds = (cosine_similarities(source_adapted) - cosine_similarities(source_base))[iu[0], iu[1]]
    dt = (cosine_similarities(target_adapted) - cosine_similarities(target_base))[iu[0], iu[1]]
    s_eff, t_eff = float(ds.square().mean().sqrt()), float(dt.square().mean().sqrt())
    reason = None
    if float(ds.std()) <= _TINY:
        reason = "the adapter changes nothing on the source's probes"
    elif float(dt.std()) <= _TINY:
        reason = "the transferred adapter changes nothing on the target's probes"
    if reason is not None:
        return EffectAgreement(kind, n, None, s_eff, t_eff, reason)
    r = float(torch.corrcoef(torch.stack([ds, dt]))[0, 1])
    return EffectAgreement(kind, n, max(-1.0, min(1.0, r)), s_eff, t_eff)


@dataclass(frozen=True)
class LayerAgreement:
    """Debiased linear CKA of one matched layer pair (source layer -> target layer)."""

    source: str
    target: str
    cka: float


@dataclass(frozen=True)
class ProbeAgreement:
    """Representation agreement of two bases on one probe set.

    Attributes:
        kind: the probe kind.
        count: number of probes.
        cka: debiased linear CKA of the final representations (0.0 where undefined: see notes).
        layers: CKA per matched layer pair, in the order asked for.
        notes: where a CKA was undefined and why.
    """

    kind: str
    count: int
    cka: float
    layers: tuple[LayerAgreement, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RepresentationAgreement:
    """Representation agreement of two bases over every probe set.

    Attributes:
        probes: one :class:`ProbeAgreement` per probe set, in the order run.
    """

    probes: tuple[ProbeAgreement, ...]

    @property
    def cka(self) -> float:
        """The worst final-representation CKA over the probe kinds (what a policy compares)."""
        return min(p.cka for p in self.probes)

    def by_kind(self) -> dict[str, ProbeAgreement]:
        return {p.kind: p for p in self.probes}


@dataclass(frozen=True)
class AdapterAgreement:
    """Adapter-effect agreement over every probe set.

    Attributes:
        probes: one :class:`EffectAgreement` per probe set, in the order run.
    """

    probes: tuple[EffectAgreement, ...]

    @property
    def agreement(self) -> float | None:
        """The worst r over the probe kinds; None when some kind has none (no effect on a
        side), which a policy must treat as failing."""
        values = [p.r for p in self.probes]
        if not values or any(v is None for v in values):
            return None
        return min(v for v in values if v is not None)

    def by_kind(self) -> dict[str, EffectAgreement]:
        return {p.kind: p for p in self.probes}


def _cka_or_note(x: torch.Tensor, y: torch.Tensor, what: str, notes: list[str]) -> float:
    try:
        return linear_cka(x, y)
    except ValueError as exc:
        notes.append(f"{what}: {exc}; counted as 0")
        return 0.0


def representation_agreement(
    source: Encoder,
    target: Encoder,
    probes: Sequence[Probe],
    *,
    layer_pairs: Sequence[tuple[str, str]] = (),
) -> RepresentationAgreement:
    """Debiased linear CKA of the two bases' final representations on each probe set, and of
    each matched layer pair.

    Args:
        source, target: encoders of the two bases; the target's must return the target layers
            of ``layer_pairs`` and the source's the source layers.
        probes: the probe sets (each at least 4 probes).
        layer_pairs: (source layer, target layer) names to compare.

    Returns:
        A :class:`RepresentationAgreement`; an undefined CKA (constant or non-finite output)
        counts as 0 with a note.

    Raises:
        KeyError: an encoder did not return a layer of ``layer_pairs``.
    """
    out = []
    for probe in probes:
        s, t = source(probe), target(probe)
        notes: list[str] = []
        final = _cka_or_note(s.final, t.final, "final representations", notes)
        layers = tuple(
            LayerAgreement(a, b, _cka_or_note(s.layers[a], t.layers[b], f"{a} -> {b}", notes))
            for a, b in layer_pairs
        )
        out.append(ProbeAgreement(str(probe.kind), probe.count, final, layers, tuple(notes)))
    return RepresentationAgreement(tuple(out))


def adapter_agreement(
    source_base: Encoder,
    source_adapted: Encoder,
    target_base: Encoder,
    target_adapted: Encoder,
    probes: Sequence[Probe],
) -> AdapterAgreement:
    """:func:`effect_agreement` of the final representations on each probe set.

    Args:
        source_base, source_adapted: the source base without and with the adapter.
        target_base, target_adapted: the target base without and with the transferred adapter.
        probes: the probe sets.

    Returns:
        An :class:`AdapterAgreement`. A side whose outputs are not finite gives r = None with
        the reason.
    """
    out = []
    for probe in probes:
        reps = [f(probe).final for f in (source_base, source_adapted, target_base, target_adapted)]
        try:
            out.append(effect_agreement(*reps, kind=str(probe.kind)))
        except ValueError as exc:
            out.append(EffectAgreement(str(probe.kind), probe.count, None, 0.0, 0.0, str(exc)))
    return AdapterAgreement(tuple(out))
