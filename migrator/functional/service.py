"""The functional check as the service runs it: sized by the settings, one pair of built bases
kept per process for the next adapter, results as the JSON the job database stores.

:func:`pair_signals` measures what the planner stores with an assessment (weights-only drift,
the bases' representation agreement or why it cannot be measured); :class:`FunctionalBench`
keeps the last built pair so that the adapters carried between the same two bases reuse it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from core.adapter import LoraAdapter
from core.drift import weight_drift
from core.errors import InputError
from core.layers import layer_pairs
from core.weights import WeightSource
from migrator.functional.check import (
    FunctionalConfig,
    FunctionalPair,
    check_adapter,
    check_bases,
    open_pair,
)
from migrator.functional.running import ProbeSettings
from migrator.settings import Settings

__all__ = [
    "BaseFolder",
    "FunctionalBench",
    "config_from_settings",
    "drift_document",
]

BaseFolder = tuple[Path, str | None]
"""A base's downloaded folder and its ``lorax.weights_path`` (None: the folder itself)."""


def config_from_settings(settings: Settings) -> FunctionalConfig:
    """The check's bounds from the ``functional_*`` settings and the device."""
    device = settings.device.value
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    probes = ProbeSettings(
        count=settings.functional_probe_count,
        length=settings.functional_probe_length,
        kinds=tuple(settings.functional_probe_kinds),
        batch_size=settings.functional_batch_size,
    )
    return FunctionalConfig(probes, device, settings.functional_max_parameters)


def drift_document(source: WeightSource, target: WeightSource) -> dict[str, Any]:
    """Weights-only drift of two opened bases, JSON-ready (``missing_share`` included)."""
    drift = weight_drift(source, target)
    doc = dataclasses.asdict(drift)
    doc["missing_share"] = drift.missing_share
    doc["largest"] = [[c.name, c.relative] for c in drift.largest]
    return doc


class FunctionalBench:
    """Builds base pairs for the functional check and keeps the last one for reuse.

    Args:
        settings: the ``functional_*`` settings, the device.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = config_from_settings(settings)
        self._key: tuple[BaseFolder, BaseFolder] | None = None
        self._pair: FunctionalPair | str | None = None

    def pair(self, source: BaseFolder, target: BaseFolder) -> FunctionalPair | str:
        """Both bases built (kept for the next call with the same two), or why they cannot
        run (a sentence for the decision)."""
        if not self.settings.functional_check:
            return "the functional check is off (functional_check=false)"
        key = (source, target)
        if key != self._key:
            self.close()
            try:
                self._pair = open_pair(
                    source[0],
                    target[0],
                    self.config,
                    source_weights_path=source[1],
                    target_weights_path=target[1],
                )
            except InputError as exc:
                self._pair = f"the functional check cannot run: {exc.reason}"
            except (RuntimeError, ValueError, OSError) as exc:  # a model library's refusal
                self._pair = f"the functional check cannot run: {type(exc).__name__}: {exc}"
            self._key = key
        assert self._pair is not None
        return self._pair

    def close(self) -> None:
        """Free the models of the kept pair."""
        if isinstance(self._pair, FunctionalPair):
            self._pair.close()
        self._key, self._pair = None, None

    def base_check(
        self, source: BaseFolder, target: BaseFolder, matched: Iterable[tuple[str | None, str]]
    ) -> dict[str, Any]:
        """The bases' representation agreement (``cka``: the worst over components and probe
        kinds, per matched layer too), or ``{"unavailable": why}``."""
        pair = self.pair(source, target)
        if isinstance(pair, str):
            return {"unavailable": pair}
        return check_bases(pair, layer_pairs=layer_pairs(matched)).as_dict()

    def adapter_check(
        self, source: BaseFolder, target: BaseFolder, adapter: LoraAdapter, carried: LoraAdapter
    ) -> dict[str, Any]:
        """The adapter-effect agreement of ``adapter`` and its transfer ``carried``
        (``agreement``: the worst r; None when undefined), or ``{"unavailable": why}``."""
        pair = self.pair(source, target)
        if isinstance(pair, str):
            return {"unavailable": pair}
        try:
            return check_adapter(pair, adapter, carried).as_dict()
        except InputError as exc:
            return {"unavailable": f"the functional check cannot run this adapter: {exc.reason}"}
