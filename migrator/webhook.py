"""MLflow webhook receiver: a verified event only asks the daemon for an early poll.

MLflow (``mlflow server`` only, experimental since 3.3) posts JSON bodies
``{"entity", "action", "timestamp", "data"}`` with the headers ``X-MLflow-Delivery-Id``,
``X-MLflow-Timestamp`` and ``X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret,
"{delivery_id}.{timestamp}.{body}")>``. Deliveries are fire-and-forget, so polling stays the
reconciler: the receiver never does work itself, it only triggers the next poll sooner.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["RELEVANT_EVENTS", "WebhookReceiver", "sign", "verify_signature"]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
MAX_BODY_BYTES = 1 << 20
MAX_CLOCK_SKEW_S = 300

# (entity, action) pairs that can mean new work.
RELEVANT_EVENTS = {
    ("model_version", "created"),
    ("model_version_tag", "set"),
    ("model_version_alias", "created"),
    ("model_version_alias", "deleted"),  # UI approvals
}


def sign(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery."""
    digest = hmac.new(
        secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256
    ).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify_signature(
    secret: str,
    *,
    delivery_id: str,
    timestamp: str,
    body: str,
    signature: str,
    now: float | None = None,
) -> str | None:
    """Check a delivery. Returns None when valid, else the reason it is refused."""
    if not delivery_id or not timestamp or not signature:
        return "missing signature headers"
    try:
        sent = int(timestamp)
    except ValueError:
        return "timestamp is not a Unix time"
    if abs((time.time() if now is None else now) - sent) > MAX_CLOCK_SKEW_S:
        return "timestamp too far from now (replayed or clock skew)"
    expected = sign(secret, delivery_id, timestamp, body)
    if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
        return "bad signature"
    return None


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet: we log ourselves
        return

    def _reply(self, status: HTTPStatus, message: str) -> None:
        body = json.dumps({"status": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(HTTPStatus.OK, "ok")
        else:
            self._reply(HTTPStatus.NOT_FOUND, "not found")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body too large")
            return
        raw = self.rfile.read(length).decode("utf-8", errors="replace")
        refusal = verify_signature(
            self.server.secret,
            delivery_id=self.headers.get(DELIVERY_HEADER, ""),
            timestamp=self.headers.get(TIMESTAMP_HEADER, ""),
            body=raw,
            signature=self.headers.get(SIGNATURE_HEADER, ""),
        )
        if refusal is not None:
            log.warning("webhook delivery refused: %s", refusal)
            self.server.refused += 1
            self._reply(HTTPStatus.UNAUTHORIZED, refusal)
            return
        try:
            event = json.loads(raw)
            key = (str(event.get("entity")), str(event.get("action")))
        except (ValueError, AttributeError):
            self._reply(HTTPStatus.BAD_REQUEST, "body is not a JSON object")
            return
        if key in RELEVANT_EVENTS:
            log.info("webhook %s.%s: polling early", *key)
            self.server.accepted += 1
            self.server.on_event()
            self._reply(HTTPStatus.ACCEPTED, "poll scheduled")
        else:
            self._reply(HTTPStatus.OK, "ignored")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], secret: str, on_event: Callable[[], None]):
        super().__init__(address, _Handler)
        self.secret = secret
        self.on_event = on_event
        self.accepted = 0
        self.refused = 0


class WebhookReceiver:
    """A small HTTP server (``POST /`` for deliveries, ``GET /health``) in a background thread.

    Args:
        host: address to bind (127.0.0.1 by default in the settings).
        port: port (0 picks a free one; see :attr:`port`).
        secret: the webhook's shared secret; every delivery must be signed with it.
        on_event: called for each verified relevant delivery (it should only schedule a poll).
    """

    def __init__(self, host: str, port: int, secret: str, on_event: Callable[[], None]):
        if not secret:
            raise ValueError("the webhook receiver needs a secret (MIGRATOR_WEBHOOK_SECRET)")
        self._server = _Server((host, port), secret, on_event)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="webhook", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def accepted(self) -> int:
        return self._server.accepted

    @property
    def refused(self) -> int:
        return self._server.refused

    def start(self) -> None:
        self._thread.start()
        log.info("webhook receiver on %s:%d", *self._server.server_address[:2])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
