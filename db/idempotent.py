"""Create-once by unique key: look up first, insert in a SAVEPOINT, and on a unique-constraint
race return the row the other transaction committed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.base import Base

__all__ = ["find_by_key", "insert_or_get"]

ModelT = TypeVar("ModelT", bound=Base)


def find_by_key(model: type[ModelT], key: Mapping[str, Any], *, session: Session) -> ModelT | None:
    """The row of ``model`` whose columns equal ``key``, or None."""
    return session.scalars(select(model).filter_by(**key)).one_or_none()


def insert_or_get(
    model: type[ModelT],
    key: Mapping[str, Any],
    build: Callable[[], ModelT],
    *,
    session: Session,
) -> tuple[ModelT, bool]:
    """Return the row with ``key``, inserting ``build()`` if there is none.

    ``key`` must be the columns of a unique constraint. The insert runs in a SAVEPOINT, so when
    another transaction inserts the same key first (PostgreSQL: our INSERT waits on the unique
    index, then fails), only the savepoint is rolled back and the committed row is returned;
    the caller's transaction stays usable.

    Returns:
        ``(row, created)``.
    """
    existing = find_by_key(model, key, session=session)
    if existing is not None:
        return existing, False
    row = build()
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        existing = find_by_key(model, key, session=session)
        if existing is None:  # the IntegrityError was about something else: not ours to hide
            raise
        return existing, False
    return row, True
