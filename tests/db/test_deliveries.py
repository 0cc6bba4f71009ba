"""Webhook delivery ids: remembered once inside the timestamp window, on both back ends."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db import WebhookDelivery, remember_delivery, session_scope


def _remember(
    factory: sessionmaker[Session], delivery: str, sent: float, now: datetime | None = None
) -> bool:
    with session_scope(factory) as session:
        return remember_delivery(delivery, sent_at=sent, window_s=300, now=now, session=session)


def test_a_delivery_id_is_new_once(factory: sessionmaker[Session]) -> None:
    now = time.time()
    assert _remember(factory, "d-1", now) is True
    assert _remember(factory, "d-1", now) is False  # a replay
    assert _remember(factory, "d-2", now) is True
    with pytest.raises(ValueError):
        _remember(factory, "", now)


def test_ids_older_than_the_window_are_forgotten(factory: sessionmaker[Session]) -> None:
    now = datetime.now(UTC)
    old = (now - timedelta(seconds=600)).timestamp()
    assert _remember(factory, "old", old, now=now - timedelta(seconds=600))
    assert _remember(factory, "new", now.timestamp(), now=now)  # prunes "old"
    with session_scope(factory) as session:
        ids = session.scalars(select(WebhookDelivery.delivery_id)).all()
        assert ids == ["new"]
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 1
