"""Webhook delivery ids, remembered for the receiver's timestamp window so that a replayed
delivery is refused even by another replica of the daemon."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.orm import Session

from db.idempotent import insert_or_get
from db.models import WebhookDelivery
from db.timestamps import utcnow

__all__ = ["remember_delivery"]


def remember_delivery(
    delivery_id: str,
    *,
    sent_at: float,
    window_s: float,
    session: Session,
    now: datetime | None = None,
) -> bool:
    """Record a delivery id once; say whether it is new.

    Ids whose timestamp left the window are forgotten first: the receiver refuses their
    replays on the timestamp alone.

    Args:
        delivery_id: the ``X-MLflow-Delivery-Id`` of a delivery whose signature was verified.
        sent_at: its ``X-MLflow-Timestamp`` (Unix seconds).
        window_s: how far a timestamp may be from now (the receiver's clock-skew bound).

    Returns:
        True for a delivery id not seen inside the window; False for a replay.
    """
    if not delivery_id:
        raise ValueError("a delivery id is required")
    now = now or utcnow()
    session.execute(
        delete(WebhookDelivery).where(WebhookDelivery.sent_at < now - timedelta(seconds=window_s))
    )
    _, created = insert_or_get(
        WebhookDelivery,
        {"delivery_id": delivery_id},
        lambda: WebhookDelivery(
            delivery_id=delivery_id,
            sent_at=datetime.fromtimestamp(sent_at, UTC),
            received_at=now,
        ),
        session=session,
    )
    return created
