"""Lineage walks (recursive CTEs) and the newest version per lineage on a base."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from sqlalchemy.orm import Session, sessionmaker

from db import (
    AdapterOrigin,
    ancestors,
    descendants,
    get_or_create_base_version,
    record_lineage,
    session_scope,
)
from tests.db.seed import seed_adapter


@dataclass(frozen=True)
class Tree:
    base1: int
    base2: int
    base3: int
    ids: dict[str, int]


def _build(session: Session) -> Tree:
    """style: v1 (base1) -> v2 (base2) -> v3 (base3), and v1 -> v2b (base3) (a branch: the
    original transferred straight to base3 as well). sketch: s1 (base1) -> s2 (base2).
    solo: o1 on base3, no lineage."""
    b1, b2, b3 = (get_or_create_base_version("base", v, session=session) for v in "123")
    ids = {
        "v1": seed_adapter(session, b1, "style", "1").id,
        "v2": seed_adapter(session, b2, "style", "2").id,
        "v3": seed_adapter(session, b3, "style", "3").id,
        "v2b": seed_adapter(session, b3, "style", "4").id,
        "s1": seed_adapter(session, b1, "sketch", "1").id,
        "s2": seed_adapter(session, b2, "sketch", "2").id,
        "o1": seed_adapter(session, b3, "solo", "1").id,
    }
    for parent, child in (("v1", "v2"), ("v2", "v3"), ("v1", "v2b"), ("s1", "s2")):
        record_lineage(ids[parent], ids[child], session=session)
    return Tree(b1.id, b2.id, b3.id, ids)


@pytest.fixture
def tree(factory: sessionmaker[Session]) -> Tree:
    with session_scope(factory) as session:
        return _build(session)


def _names(entries: list, tree: Tree) -> list[tuple[str, int]]:
    by_id = {v: k for k, v in tree.ids.items()}
    return [(by_id[e.adapter.id], e.depth) for e in entries]


def test_ancestors_and_descendants(factory: sessionmaker[Session], tree: Tree) -> None:
    ids = tree.ids
    with session_scope(factory) as session:
        assert _names(ancestors(ids["v3"], session=session), tree) == [("v2", 1), ("v1", 2)]
        assert _names(ancestors(ids["v2b"], session=session), tree) == [("v1", 1)]
        assert _names(ancestors(ids["v1"], session=session), tree) == []
        assert _names(descendants(ids["v1"], session=session), tree) == [
            ("v2", 1),
            ("v2b", 1),
            ("v3", 2),
        ]
        assert _names(descendants(ids["v2"], session=session), tree) == [("v3", 1)]
        assert _names(descendants(ids["v3"], session=session), tree) == []
        assert _names(descendants(ids["s1"], session=session), tree) == [("s2", 1)]


def test_lineage_is_recorded_once_and_never_cycles(
    factory: sessionmaker[Session], tree: Tree
) -> None:
    ids = tree.ids
    with session_scope(factory) as session:
        first = record_lineage(ids["v1"], ids["v2"], session=session)
        again = record_lineage(ids["v1"], ids["v2"], job_id=None, session=session)
        assert again.id == first.id
        with pytest.raises(ValueError, match="its own ancestor"):
            record_lineage(ids["v3"], ids["v1"], session=session)
        with pytest.raises(ValueError, match="its own ancestor"):
            record_lineage(ids["v2"], ids["v2"], session=session)
        assert _names(descendants(ids["v3"], session=session), tree) == []


def test_adapter_origin_defaults_to_registered(factory: sessionmaker[Session], tree: Tree) -> None:
    with session_scope(factory) as session:
        base = get_or_create_base_version("base", "1", session=session)
        assert seed_adapter(session, base, "style", "1").origin is AdapterOrigin.REGISTERED
