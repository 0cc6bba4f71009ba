"""The functional check of a base pair and of each adapter carried between them.

:func:`open_pair` builds both bases (every component they share) and the probe sets;
:func:`check_bases` gives the representation agreement (debiased linear CKA of the final
representations, and per matched layer); :func:`check_adapter` the adapter-effect agreement of
one adapter on the source and its transfer on the target. Base representations are computed
once per pair and reused by every adapter. The math is :mod:`core.functional`.

Cost: building both bases, then per probe set one forward pass of ``count`` probes per base for
the pair, and two more (source + adapter, target + transfer) per adapter. Memory: both bases in
float32 plus one batch of activations (``batch_size`` x ``length``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.adapter import LoraAdapter, LoraModule
from core.functional import (
    AdapterAgreement,
    Encoder,
    Probe,
    RepresentationAgreement,
    Representations,
    adapter_agreement,
    representation_agreement,
)
from migrator.functional.layout import NotRunnableError, RunnableBase, find_runnable
from migrator.functional.models import LoadedComponent, applied, load_component
from migrator.functional.running import ProbeSettings, encode, probe_sets

__all__ = [
    "AdapterCheck",
    "BaseCheck",
    "FunctionalConfig",
    "FunctionalPair",
    "check_adapter",
    "check_bases",
    "open_pair",
]


@dataclass(frozen=True)
class FunctionalConfig:
    """Everything that bounds a functional check (the settings the lead adds).

    Attributes:
        probes: probe count, length, kinds, seed, batch size (see :class:`ProbeSettings`).
        device: where the models run (``cpu``, ``cuda``, ``cuda:1``).
        max_parameters: bases with more parameters (per component) are not built.
    """

    probes: ProbeSettings = field(default_factory=ProbeSettings)
    device: str = "cpu"
    max_parameters: int = 3_000_000_000


@dataclass(frozen=True)
class BaseCheck:
    """Representation agreement of a base pair.

    Attributes:
        components: (component, agreement) per component both bases have ("" for a single
            model; ``unet``, ``text_encoder``, ... in a diffusers pipeline).
        notes: probe kinds or components left out, and why.
        seconds: building both bases and running their probes.
    """

    components: tuple[tuple[str, RepresentationAgreement], ...]
    notes: tuple[str, ...]
    seconds: float

    @property
    def cka(self) -> float:
        """The worst final-representation CKA over components and probe kinds."""
        return min(agreement.cka for _, agreement in self.components)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for the assessment, the job and the run's metrics)."""
        return {
            "cka": self.cka,
            "components": {
                name or "model": {
                    p.kind: {
                        "cka": p.cka,
                        "probes": p.count,
                        "layers": [[lay.source, lay.target, lay.cka] for lay in p.layers],
                        "notes": list(p.notes),
                    }
                    for p in agreement.probes
                }
                for name, agreement in self.components
            },
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class AdapterCheck:
    """Adapter-effect agreement of one adapter and its transfer.

    Attributes:
        components: (component, agreement) per component the source adapter touches.
        notes: components left out, and why.
        seconds: the two adapted forward passes of every probe set.
    """

    components: tuple[tuple[str, AdapterAgreement], ...]
    notes: tuple[str, ...]
    seconds: float

    @property
    def agreement(self) -> float | None:
        """The worst r over components and probe kinds; None when some r is undefined (a side
        on which the adapter changes nothing), which must count as failing."""
        values = [a.agreement for _, a in self.components]
        if not values or any(v is None for v in values):
            return None
        return min(v for v in values if v is not None)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "agreement": self.agreement,
            "components": {
                name or "model": {
                    p.kind: {
                        "r": p.r,
                        "source_effect": p.source_effect,
                        "target_effect": p.target_effect,
                        "effect_ratio": p.effect_ratio,
                        "reason": p.reason,
                    }
                    for p in agreement.probes
                }
                for name, agreement in self.components
            },
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }


def _split(name: str, prefixes: Sequence[str]) -> tuple[str, str]:
    """(component prefix, name inside it) of a WeightSource module or layer name."""
    head, _, rest = name.partition(".")
    if head in prefixes and head:
        return head, rest
    if "" in prefixes:
        return "", name
    raise KeyError(name)


class FunctionalPair:
    """Both bases built, with their probe sets; the handle :func:`check_bases` and
    :func:`check_adapter` use. Call :meth:`close` (or use ``with``) to free the models."""

    def __init__(
        self,
        source: Mapping[str, LoadedComponent],
        target: Mapping[str, LoadedComponent],
        probes: Mapping[str, list[Probe]],
        notes: Sequence[str],
        config: FunctionalConfig,
        build_seconds: float,
    ) -> None:
        self.source, self.target = dict(source), dict(target)
        self.probes = dict(probes)
        self.notes = tuple(notes)
        self.config = config
        self.build_seconds = build_seconds
        self._base: dict[tuple[str, str, int], Representations] = {}

    def __enter__(self) -> FunctionalPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.source.clear()
        self.target.clear()
        self._base.clear()

    def encoder(self, side: str, component: str, layers: Sequence[str] = ()) -> Encoder:
        """The base ``side`` (``source`` / ``target``) of ``component`` as an encoder."""

        def encode_base(probe: Probe) -> Representations:
            return self.base(side, component, probe, layers)

        return encode_base

    def base(
        self, side: str, component: str, probe: Probe, layers: Sequence[str] = ()
    ) -> Representations:
        """Representations of a base without adapter (cached per probe set when no layers)."""
        model = (self.source if side == "source" else self.target)[component]
        key = (side, component, id(probe))
        if layers:
            reps = encode(model, probe, self.config.probes, layers)
            self._base.setdefault(key, Representations(reps.final))
            return reps
        if key not in self._base:
            self._base[key] = encode(model, probe, self.config.probes)
        return self._base[key]


def _build(base: RunnableBase, config: FunctionalConfig) -> dict[str, LoadedComponent]:
    return {
        c.prefix: load_component(c, device=config.device, max_parameters=config.max_parameters)
        for c in base.components
    }


def open_pair(
    source: str | Path,
    target: str | Path,
    config: FunctionalConfig | None = None,
    *,
    source_weights_path: str | None = None,
    target_weights_path: str | None = None,
) -> FunctionalPair:
    """Build both bases and their shared probe sets.

    Raises:
        NotRunnableError: a base cannot run, or they share no component with runnable probes
            (the message says which base and why).
    """
    config = config or FunctionalConfig()
    started = time.perf_counter()
    s_base = find_runnable(source, weights_path=source_weights_path)
    t_base = find_runnable(target, weights_path=target_weights_path)
    s_models, t_models = _build(s_base, config), _build(t_base, config)
    notes: list[str] = []
    probes: dict[str, list[Probe]] = {}
    for prefix in s_models:
        label = prefix or "model"
        if prefix not in t_models:
            notes.append(f"{label}: the target has no such component; left out")
            continue
        if s_models[prefix].spec.kind != t_models[prefix].spec.kind:
            notes.append(f"{label}: the two bases' components are of different kinds; left out")
            continue
        sets, why = probe_sets(s_models[prefix], t_models[prefix], config.probes)
        notes += [f"{label}: {w}" for w in why]
        if sets:
            probes[prefix] = sets
    if not probes:
        raise NotRunnableError(
            "no component of the two bases can run the same probes: " + "; ".join(notes),
            path=target,
        )
    return FunctionalPair(s_models, t_models, probes, notes, config, time.perf_counter() - started)


def check_bases(pair: FunctionalPair, *, layer_pairs: Sequence[tuple[str, str]] = ()) -> BaseCheck:
    """Representation agreement of the pair (final representations and matched layers).

    Args:
        pair: from :func:`open_pair`.
        layer_pairs: (source layer, target layer) in WeightSource naming (e.g.
            ``core.layers.layer_pairs`` of the decisions' (source, target) pairs); a pair whose
            layers lie in different components is ignored.
    """
    started = time.perf_counter()
    out = []
    prefixes = list(pair.source)
    for prefix, probes in pair.probes.items():
        inside = []
        for a, b in layer_pairs:
            (pa, la), (pb, lb) = _split(a, prefixes), _split(b, prefixes)
            if pa == pb == prefix:
                inside.append((la, lb))
        s_layers = list(dict.fromkeys(a for a, _ in inside))
        t_layers = list(dict.fromkeys(b for _, b in inside))
        agreement = representation_agreement(
            pair.encoder("source", prefix, s_layers),
            pair.encoder("target", prefix, t_layers),
            probes,
            layer_pairs=inside,
        )
        out.append((prefix, agreement))
    seconds = pair.build_seconds + time.perf_counter() - started
    return BaseCheck(tuple(out), pair.notes, seconds)


def _lookup(computed: Mapping[int, Representations]) -> Encoder:
    def encoder(probe: Probe) -> Representations:
        return computed[id(probe)]

    return encoder


def _by_component(
    adapter: LoraAdapter, prefixes: Sequence[str]
) -> dict[str, dict[str, LoraModule]]:
    out: dict[str, dict[str, LoraModule]] = {}
    for name, module in adapter.modules.items():
        prefix, inner = _split(name, prefixes)
        out.setdefault(prefix, {})[inner] = module
    return out


def check_adapter(
    pair: FunctionalPair, source_adapter: LoraAdapter, target_adapter: LoraAdapter
) -> AdapterCheck:
    """Adapter-effect agreement of ``source_adapter`` on the source and ``target_adapter`` (its
    transfer) on the target, on every probe set of each component the source adapter touches.

    Both adapters name modules as their base's WeightSource does (``resolve_modules``; a
    ``TransferResult.adapter`` names the target's). A compact LoRA-X must be decoded first.

    Raises:
        InputError: a module the built model lacks, or a compact module.
    """
    started = time.perf_counter()
    s_parts = _by_component(source_adapter, list(pair.source))
    t_parts = _by_component(target_adapter, list(pair.target))
    out, notes = [], []
    for prefix, modules in s_parts.items():
        probes = pair.probes.get(prefix)
        if probes is None:
            notes.append(f"{prefix or 'model'}: no probes run on this component; left out")
            continue
        s_model, t_model = pair.source[prefix], pair.target[prefix]
        with applied(s_model, modules):
            s_adapted = {id(p): encode(s_model, p, pair.config.probes) for p in probes}
        with applied(t_model, t_parts.get(prefix, {})):
            t_adapted = {id(p): encode(t_model, p, pair.config.probes) for p in probes}
        agreement = adapter_agreement(
            pair.encoder("source", prefix),
            _lookup(s_adapted),
            pair.encoder("target", prefix),
            _lookup(t_adapted),
            probes,
        )
        out.append((prefix, agreement))
    return AdapterCheck(tuple(out), tuple(notes), time.perf_counter() - started)
