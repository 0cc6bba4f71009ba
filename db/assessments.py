"""Assessments (ATC of a base pair under given parameters) stored once and looked up by
(source base, target base, parameters hash)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy.orm import Session

from db.idempotent import find_by_key, insert_or_get
from db.models import Assessment, AssessmentFigure, ModulePair

__all__ = ["find_assessment", "params_hash", "store_assessment", "store_figures"]

_ATC_SLACK = 1e-9  # float rounding in the transport cost sum


def params_hash(parameters: Mapping[str, Any]) -> str:
    """SHA-256 of the parameters as canonical JSON (sorted keys, no whitespace).

    Key order does not matter; values must be JSON-serialisable (enums: pass their value).

    Raises:
        TypeError: a value JSON cannot encode.
    """
    canonical = json.dumps(
        dict(parameters), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def find_assessment(
    source_base_id: int,
    target_base_id: int,
    parameters: Mapping[str, Any],
    *,
    session: Session,
) -> Assessment | None:
    """The stored assessment of this base pair under these parameters, or None."""
    return find_by_key(
        Assessment,
        {
            "source_base_id": source_base_id,
            "target_base_id": target_base_id,
            "params_hash": params_hash(parameters),
        },
        session=session,
    )


def store_assessment(
    source_base_id: int,
    target_base_id: int,
    parameters: Mapping[str, Any],
    *,
    atc_left: float,
    atc_right: float,
    atc: float,
    module_pairs: Iterable[ModulePair],
    session: Session,
    timings: Mapping[str, float] | None = None,
    figures: Mapping[str, bytes] | None = None,
) -> tuple[Assessment, bool]:
    """Store an assessment with its module pairs, unless one exists for the same key.

    Args:
        parameters: what the ATC depends on (similarity_rank, weighted, role rule, combine,
            module_min_similarity, ...); stored as JSON and hashed for the key.
        atc_left, atc_right, atc: ATC on U, on V, and their combination, each in [0, 1].
        module_pairs: new, unattached :class:`ModulePair` rows.
        timings: seconds per step (factorize, similarity, transport, ...).
        figures: file name -> bytes of figures rendered from it (the similarity heatmap), which
            every transfer run planned from it logs.

    Returns:
        ``(assessment, created)``; when one existed it is returned unchanged.
    """
    for name, value in (("atc_left", atc_left), ("atc_right", atc_right), ("atc", atc)):
        if not -_ATC_SLACK <= value <= 1.0 + _ATC_SLACK:
            raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    digest = params_hash(parameters)
    return insert_or_get(
        Assessment,
        {"source_base_id": source_base_id, "target_base_id": target_base_id, "params_hash": digest},
        lambda: Assessment(
            source_base_id=source_base_id,
            target_base_id=target_base_id,
            parameters=dict(parameters),
            params_hash=digest,
            atc_left=atc_left,
            atc_right=atc_right,
            atc=atc,
            timings=dict(timings or {}),
            module_pairs=list(module_pairs),
            figures=[AssessmentFigure(name=n, content=c) for n, c in (figures or {}).items()],
        ),
        session=session,
    )


def store_figures(
    assessment: Assessment, figures: Mapping[str, bytes], *, session: Session
) -> None:
    """Add or replace figures of a stored assessment (file name -> bytes)."""
    by_name = {f.name: f for f in assessment.figures}
    for name, content in figures.items():
        if name in by_name:
            by_name[name].content = content
        else:
            assessment.figures.append(AssessmentFigure(name=name, content=content))
    session.flush()
