"""Deliveries as MLflow signs them: the signature, the checks on the headers alone (made before
the body is read), the timestamp window, and where delivery ids are remembered so that a
replay is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from migrator.settings import Settings

__all__ = [
    "DELIVERY_HEADER",
    "MARKED_EVENTS",
    "MAX_BODY_BYTES",
    "MAX_CLOCK_SKEW_S",
    "RELEVANT_EVENTS",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "DeliveryStore",
    "MarkStore",
    "MemoryDeliveries",
    "WebhookLimits",
    "database_deliveries",
    "database_marks",
    "header_refusal",
    "sign",
    "verify_signature",
]

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
MAX_BODY_BYTES = 1 << 20
MAX_CLOCK_SKEW_S = 300
MAX_DELIVERY_ID = 255  # the job database's column

# (entity, action) pairs that can mean new work.
RELEVANT_EVENTS = {
    ("model_version", "created"),
    ("model_version_tag", "set"),
    ("model_version_tag", "deleted"),
    ("model_version_alias", "created"),  # an approval given in the UI (lorax-approved-<job>)
    ("model_version_alias", "deleted"),
}

# Changes MLflow's search cannot show (a tag set or deleted moves no version's update time):
# the version named in the delivery is marked for the next pass (:func:`database_marks`).
MARKED_EVENTS = {("model_version_tag", "set"), ("model_version_tag", "deleted")}

#: ``mark(name, version, event)``: remember that a delivery said ``name/version`` changed.
MarkStore = Callable[[str, str, str], None]

#: ``remember(delivery_id, timestamp)``: True for a delivery id not seen inside the window.
DeliveryStore = Callable[[str, int], bool]


def sign(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery."""
    digest = hmac.new(
        secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256
    ).digest()
    return "v1," + base64.b64encode(digest).decode()


def header_refusal(
    delivery_id: str, timestamp: str, signature: str, *, now: float, window_s: float
) -> str | None:
    """What is wrong with a delivery's headers alone (checked before its body is read)."""
    if not delivery_id or not timestamp or not signature:
        return "missing signature headers"
    if len(delivery_id) > MAX_DELIVERY_ID:
        return "delivery id too long"
    try:
        sent = int(timestamp)
    except ValueError:
        return "timestamp is not a Unix time"
    if abs(now - sent) > window_s:
        return "timestamp too far from now (replayed or clock skew)"
    return None


def verify_signature(
    secret: str,
    *,
    delivery_id: str,
    timestamp: str,
    body: str,
    signature: str,
    now: float | None = None,
    window_s: float = MAX_CLOCK_SKEW_S,
) -> str | None:
    """Check a delivery. Returns None when valid, else the reason it is refused."""
    refusal = header_refusal(
        delivery_id,
        timestamp,
        signature,
        now=time.time() if now is None else now,
        window_s=window_s,
    )
    if refusal is not None:
        return refusal
    expected = sign(secret, delivery_id, timestamp, body)
    if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
        return "bad signature"
    return None


@dataclass(frozen=True)
class WebhookLimits:
    """How much the receiver accepts (the ``webhook_*`` settings)."""

    max_body_bytes: int = MAX_BODY_BYTES
    max_header_bytes: int = 16384
    idle_timeout_s: float = 5.0
    request_timeout_s: float = 10.0
    max_connections: int = 64
    timestamp_window_s: float = MAX_CLOCK_SKEW_S

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookLimits:
        return cls(
            max_body_bytes=settings.webhook_max_body_bytes,
            max_header_bytes=settings.webhook_max_header_bytes,
            idle_timeout_s=settings.webhook_idle_timeout_s,
            request_timeout_s=settings.webhook_request_timeout_s,
            max_connections=settings.webhook_max_connections,
            timestamp_window_s=settings.webhook_timestamp_window_s,
        )


class MemoryDeliveries:
    """Delivery ids remembered in this process for the window (one replica, or tests)."""

    def __init__(self, window_s: float = MAX_CLOCK_SKEW_S) -> None:
        self.window_s = window_s
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, delivery_id: str, sent_at: int) -> bool:
        with self._lock:
            oldest = time.time() - self.window_s
            self._seen = {k: t for k, t in self._seen.items() if t >= oldest}
            if delivery_id in self._seen:
                return False
            self._seen[delivery_id] = sent_at
            return True


def database_deliveries(sessions: sessionmaker[Session], window_s: float) -> DeliveryStore:
    """Delivery ids remembered in the job database (:func:`db.remember_delivery`), so that a
    replay is refused by every replica of the daemon."""
    from db import remember_delivery, session_scope

    def remember(delivery_id: str, sent_at: int) -> bool:
        with session_scope(sessions) as session:
            return remember_delivery(
                delivery_id, sent_at=sent_at, window_s=window_s, session=session
            )

    return remember


def database_marks(sessions: sessionmaker[Session]) -> MarkStore:
    """Marks kept in the job database (:func:`db.mark_version`), read by the next pass of any
    replica (:mod:`migrator.pipeline.watch`)."""
    from db import mark_version, session_scope

    def mark(name: str, version: str, event: str) -> None:
        with session_scope(sessions) as session:
            mark_version(name, version, event, session=session)

    return mark
