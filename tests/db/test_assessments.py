"""Assessments are stored once per (source, target, parameters) and reused."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db import (
    Assessment,
    ModulePair,
    find_assessment,
    params_hash,
    session_scope,
    store_assessment,
)
from tests.db.seed import seed_bases

PARAMS = {"similarity_rank": 32, "weighted": False, "combine": "mean", "module_min_similarity": 0.5}


def _pairs() -> list[ModulePair]:
    return [
        ModulePair(
            source_module="tb.6",
            target_module="tb.3",
            phi_left=0.91,
            phi_right=0.88,
            transport_mass=0.5,
            decision="rematched",
            reason="most transport mass",
        ),
        ModulePair(
            source_module=None,
            target_module="tb.9",
            decision="skipped",
            reason="no valid source module",
        ),
    ]


def test_params_hash_ignores_key_order_and_sees_values() -> None:
    reordered = dict(reversed(list(PARAMS.items())))
    assert list(reordered) != list(PARAMS)
    assert params_hash(reordered) == params_hash(PARAMS)
    assert params_hash({**PARAMS, "similarity_rank": 64}) != params_hash(PARAMS)
    assert len(params_hash(PARAMS)) == 64
    with pytest.raises(TypeError):
        params_hash({"rule": object()})


def test_store_then_find_and_reuse(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        bases = seed_bases(session)
        stored, created = store_assessment(
            bases.old.id,
            bases.new.id,
            PARAMS,
            atc_left=0.2,
            atc_right=0.3,
            atc=0.25,
            module_pairs=_pairs(),
            timings={"factorize": 1.5, "transport": 0.02},
            session=session,
        )
        assert created
        ids = (bases.old.id, bases.new.id, stored.id)
    source, target, assessment_id = ids
    with session_scope(factory) as session:
        found = find_assessment(
            source, target, dict(reversed(list(PARAMS.items()))), session=session
        )
        assert found is not None and found.id == assessment_id
        assert (found.atc_left, found.atc_right, found.atc) == (0.2, 0.3, 0.25)
        assert found.parameters == PARAMS
        assert found.timings == {"factorize": 1.5, "transport": 0.02}
        assert [(p.source_module, p.target_module, p.decision) for p in found.module_pairs] == [
            ("tb.6", "tb.3", "rematched"),
            (None, "tb.9", "skipped"),
        ]
        assert (
            find_assessment(source, target, {**PARAMS, "weighted": True}, session=session) is None
        )
        assert find_assessment(target, source, PARAMS, session=session) is None  # direction matters
        again, created = store_assessment(
            source,
            target,
            PARAMS,
            atc_left=0.9,
            atc_right=0.9,
            atc=0.9,
            module_pairs=[],
            session=session,
        )
        assert not created and again.id == assessment_id and again.atc == 0.25
        assert session.scalar(select(func.count()).select_from(Assessment)) == 1
        assert session.scalar(select(func.count()).select_from(ModulePair)) == 2


def test_atc_outside_unit_interval_is_refused(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        bases = seed_bases(session)
        for bad in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match="atc"):
                store_assessment(
                    bases.old.id,
                    bases.new.id,
                    PARAMS,
                    atc_left=0.1,
                    atc_right=0.1,
                    atc=bad,
                    module_pairs=[],
                    session=session,
                )
