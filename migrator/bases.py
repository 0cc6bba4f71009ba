"""Base models on local files: open one for migration, and compare two (ATC + module decisions).

This is what ``migrator atc``, the planner and remote workers share: it wires :mod:`core` with the
settings (module patterns, similarity rank, thresholds, device, cache) and knows nothing of
registries or databases.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.atc import ATCResult, compute_atc
from core.errors import InputError
from core.factor_cache import FactorCache
from core.factorize import FactorStore
from core.factors import Factors
from core.layers import ordered_plan
from core.matching import Decision, ModuleDecision, match_modules
from core.selection import DEFAULT_PATTERNS, ModuleSelector, RoleRule
from core.weights import WeightSource
from migrator.assessment_params import assessment_parameters
from migrator.settings import Settings

__all__ = [
    "BaseComparison",
    "OpenedBase",
    "ProgressFn",
    "assessment_parameters",
    "compare_bases",
    "open_base",
    "role_rule",
    "selector",
]

ProgressFn = Callable[[int, int, str], None]


def role_rule(settings: Settings) -> RoleRule:
    """The rule naming a module's role (numeric segments wildcarded, then the substitutions)."""
    return RoleRule(substitutions=tuple((p, r) for p, r in settings.role_substitutions))


def selector(settings: Settings) -> ModuleSelector:
    """The modules the ATC compares (``module_patterns``, default: the attention projections)."""
    return ModuleSelector(tuple(settings.module_patterns or DEFAULT_PATTERNS))


@dataclass
class OpenedBase:
    """A base model opened for migration: its weights and its (cached, lazy) factors.

    Attributes:
        label: how messages name it (``name/version`` or a path).
        source: streamed weights.
        store: factors of every matrix of the base, computed on demand (transfers reach any
            module an adapter adapts).
        selected: the modules the ATC compares (``module_patterns``).
        exact_assessment: the ATC reads exact leading triplets (``assessment_factors=exact``),
            else randomized ones.
        assessment_rank: ``similarity_rank`` when opened.
    """

    label: str
    source: WeightSource
    store: FactorStore
    selected: tuple[str, ...]
    exact_assessment: bool = False
    assessment_rank: int = 32  # similarity_rank: the k the ATC reads

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Every matrix of the base, name -> (m, n): what adapter names resolve against."""
        return {info.name: info.shape for info in self.source.modules()}

    def factors_at(self, k: int) -> dict[str, Factors]:
        """The leading k triplets of every selected module, batched by shape and cached: from
        the randomized range finder (``assessment_factors=randomized``, the default: its
        accuracy bound is :func:`core.svd.factorize_batch`'s), or the exact leading triplets
        (``exact``) without keeping the complete SVD."""
        if self.exact_assessment:
            self.store.prefetch(self.selected, rank=k, complete=False)
            return {n: self.store.factors(n, rank=k, complete=False) for n in self.selected}
        self.store.prefetch(self.selected, rank=k, exact=False)
        return {n: self.store.factors(n, rank=k, exact=False) for n in self.selected}


def open_base(
    path: Path,
    settings: Settings,
    *,
    label: str | None = None,
    weights_path: str | None = None,
    progress: ProgressFn | None = None,
) -> OpenedBase:
    """Open a base model's weights and set up its factor store.

    Raises:
        InputError: no weights, pickle refused, corrupt files, or no module matching the
            adapter-location patterns (the message names the base).
    """
    source = WeightSource.open(path, allow_pickle=settings.allow_pickle, weights_path=weights_path)
    names = selector(settings).select(source.names)
    if not names:
        raise InputError(
            "no weight matches the adapter-location patterns (module_patterns); "
            f"{len(source.names)} matrices found",
            path=label or path,
        )
    store = FactorStore(
        source,
        cache=FactorCache(settings.cache_dir, max_bytes=settings.cache_max_bytes),
        device=settings.device.value,
        progress=progress,
    )
    exact = settings.assessment_factors == "exact"
    return OpenedBase(
        label or str(path),
        source,
        store,
        names,
        exact_assessment=exact,
        assessment_rank=settings.similarity_rank,
    )


@dataclass(frozen=True)
class BaseComparison:
    """ATC of a base pair and the per-module decisions that follow from it."""

    atc: ATCResult
    decisions: tuple[ModuleDecision, ...]
    seconds: float

    def figures(self, *, source_label: str, target_label: str) -> dict[str, bytes]:
        """The similarity heatmap files (``migrator.heatmaps.heatmap_figures``: file name ->
        PNG), the chosen pairs marked."""
        from migrator.heatmaps import Match, heatmap_figures

        atc = self.atc
        matches = [
            Match(atc.source_index(s), atc.target_index(d.target), s != d.target)
            for d in self.decisions
            for s, _ in d.sources
        ]
        return heatmap_figures(
            atc.phi_left,
            atc.phi_right,
            atc.source_names,
            atc.target_names,
            title=f"{source_label} -> {target_label}: ATC {atc.atc:.3f}",
            matches=matches,
        )

    def plot(self, out: Path, *, source_label: str, target_label: str) -> list[Path]:
        """Write the heatmap files: ``out``, and beside it ``<stem>_full.png`` when the full
        map is a second file. Returns the paths written."""
        figures = self.figures(source_label=source_label, target_label=target_label)
        out.parent.mkdir(parents=True, exist_ok=True)
        written = []
        for name, content in figures.items():
            path = out if name == "similarity.png" else out.with_name(f"{out.stem}_full.png")
            path.write_bytes(content)
            written.append(path)
        return written

    def heatmap_png(self, *, source_label: str, target_label: str) -> bytes:
        """The main heatmap (``similarity.png``) as PNG bytes."""
        return self.figures(source_label=source_label, target_label=target_label)["similarity.png"]

    @property
    def counts(self) -> dict[str, int]:
        """Target modules per decision (same_name, rematched, skipped)."""
        out = {d.value: 0 for d in Decision}
        for decision in self.decisions:
            out[decision.decision.value] += 1
        return out


def compare_bases(source: OpenedBase, target: OpenedBase, settings: Settings) -> BaseComparison:
    """Subspace similarities, ATC and module decisions of ``source`` -> ``target``.

    The similarity reads only the leading ``similarity_rank`` triplets of the selected modules;
    what the cache lacks is factorized (and cached by content) first. Modules are matched as
    ``match_strategy`` / ``order_preserving_layers`` say.
    """
    started = time.perf_counter()
    k = settings.similarity_rank
    atc = compute_atc(
        source.factors_at(k),
        target.factors_at(k),
        k=k,
        weighted=settings.weighted_similarity,
        role_rule=role_rule(settings),
        combine=settings.atc_combine,
    )
    plan = ordered_plan(atc).plan if settings.order_preserving_layers else None
    decisions = match_modules(
        atc,
        min_similarity=settings.module_min_similarity,
        strategy=settings.match_strategy,
        plan=plan,
        merge_weights=settings.merge_weights,
    )
    return BaseComparison(atc, decisions, time.perf_counter() - started)
