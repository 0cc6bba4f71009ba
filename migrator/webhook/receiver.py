"""MLflow webhook receiver: a verified event asks the daemon for an early poll; a tag set or
deleted also marks its version (``marks``) so that the pass reads it, since MLflow's search
cannot show a tag change.

MLflow (``mlflow server`` only, experimental since 3.3) posts JSON bodies
``{"entity", "action", "timestamp", "data"}`` with the headers ``X-MLflow-Delivery-Id``,
``X-MLflow-Timestamp`` and ``X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret,
"{delivery_id}.{timestamp}.{body}")>``. Deliveries are fire-and-forget, so polling stays the
reconciler: the receiver never does work itself, it only triggers the next poll sooner.

It is a starlette app served by uvicorn in a background thread, and refuses before it reads:

* headers larger than ``max_header_bytes``, a negative or non-numeric ``Content-Length``
  (400, from uvicorn's HTTP parser), a ``Content-Length`` above ``max_body_bytes`` (413), and a
  delivery without signature headers or with a timestamp outside the window (401): the body is
  never read and the connection is closed;
* a chunked body is counted while it streams and refused once past ``max_body_bytes``;
* a connection that brings no request headers within ``idle_timeout_s`` (new, or kept alive)
  is closed, and a request must be answered within ``request_timeout_s`` of its headers;
* past ``max_connections`` connections, requests get 503 (uvicorn's ``limit_concurrency``);
* the signature is checked on the raw body before it is parsed, then the delivery id is
  remembered (in the job database: every replica sees it) so that a replay is refused (409).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from migrator.webhook.signing import (
    DELIVERY_HEADER,
    MARKED_EVENTS,
    RELEVANT_EVENTS,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DeliveryStore,
    MarkStore,
    MemoryDeliveries,
    WebhookLimits,
    header_refusal,
    sign,
)

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = ["WebhookReceiver"]

log = logging.getLogger(__name__)


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _reply(status: int, message: str, *, close: bool = False) -> Response:
    from starlette.responses import JSONResponse

    headers = {"Connection": "close"} if close else None
    return JSONResponse({"status": message}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is announced or streams past ``limit`` bytes."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None and (not declared.strip().isdigit() or int(declared) > limit):
        raise _Refused(413, f"body larger than {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _Refused(413, f"body larger than {limit} bytes")
    except ClientDisconnect:
        raise _Refused(400, "the client went away mid-body") from None
    return bytes(body)


def _guarded_protocol(idle_s: float, request_s: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with the two deadlines it lacks: a connection must bring a
    request's headers within ``idle_s`` (a new one, or one kept alive), and the request must
    be answered within ``request_s`` of its headers (a slow body). Past either it is closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _in_request = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(idle_s)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            cycle = self.cycle
            if not self._in_request and cycle is not None and not cycle.response_complete:
                self._in_request = True  # the headers are in: the request's own deadline
                self._arm(request_s)

        def on_response_complete(self) -> None:
            self._in_request = False
            self._arm(idle_s)
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


class WebhookReceiver:
    """The webhook's HTTP endpoint (``POST /`` for deliveries, ``GET /health``), served by
    uvicorn in a background thread.

    Args:
        host: address to bind (127.0.0.1 by default in the settings).
        port: port (0 picks a free one; see :attr:`port`).
        secret: the webhook's shared secret; every delivery must be signed with it.
        on_event: called for each verified relevant delivery (it should only schedule a poll).
        limits: sizes and timeouts (defaults: :class:`WebhookLimits`).
        deliveries: remembers delivery ids (default: in this process only; the daemon uses
            :func:`database_deliveries`).
        marks: remembers the version a tag delivery names, for the next pass (the daemon uses
            :func:`database_marks`; default: none, the next full reconcile sees the tag).

    Raises:
        ValueError: no secret. OSError: the address cannot be bound.
    """

    def __init__(
        self,
        host: str,
        port: int,
        secret: str,
        on_event: Callable[[], None],
        *,
        limits: WebhookLimits | None = None,
        deliveries: DeliveryStore | None = None,
        marks: MarkStore | None = None,
    ) -> None:
        if not secret:
            raise ValueError("the webhook receiver needs a secret (MIGRATOR_WEBHOOK_SECRET)")
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.secret = secret
        self.on_event = on_event
        self.limits = limits or WebhookLimits()
        self.deliveries = deliveries or MemoryDeliveries(self.limits.timestamp_window_s)
        self.marks = marks
        self.accepted = 0
        self.refused = 0
        self._socket = _bind(host, port)
        app = Starlette(
            routes=[
                Route("/", self._deliver, methods=["POST"]),
                Route("/health", self._health, methods=["GET"]),
            ]
        )
        self._server = uvicorn.Server(self._config(app))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="webhook", daemon=True
        )

    def _config(self, app: Any) -> Any:
        import uvicorn

        limits = self.limits
        return uvicorn.Config(
            app,
            http=_guarded_protocol(limits.idle_timeout_s, limits.request_timeout_s),
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            limit_concurrency=limits.max_connections,
            timeout_keep_alive=max(1, round(limits.idle_timeout_s)),
            h11_max_incomplete_event_size=limits.max_header_bytes,
            timeout_graceful_shutdown=2,
        )

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def start(self, timeout_s: float = 10.0) -> None:
        """Serve in the background; returns once the server listens."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the webhook receiver did not start")
            time.sleep(0.01)
        log.info("webhook receiver on %s:%d", *self._socket.getsockname()[:2])

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._socket.close()

    async def _health(self, request: Request) -> Response:
        return _reply(200, "ok")

    def _check_headers(self, request: Request) -> tuple[str, str, str]:
        headers = request.headers
        delivery_id = headers.get(DELIVERY_HEADER, "")
        stamp = headers.get(TIMESTAMP_HEADER, "")
        signature = headers.get(SIGNATURE_HEADER, "")
        refusal = header_refusal(
            delivery_id,
            stamp,
            signature,
            now=time.time(),
            window_s=self.limits.timestamp_window_s,
        )
        if refusal is not None:
            raise _Refused(401, refusal)
        return delivery_id, stamp, signature

    async def _verified(self, request: Request) -> bytes:
        """The body of a delivery that is signed, not replayed; else :class:`_Refused`."""
        from starlette.concurrency import run_in_threadpool

        delivery_id, stamp, signature = self._check_headers(request)
        body = await _read_body(request, self.limits.max_body_bytes)
        expected = sign(self.secret, delivery_id, stamp, body.decode("utf-8", errors="replace"))
        if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
            raise _Refused(401, "bad signature")
        try:
            new = await run_in_threadpool(self.deliveries, delivery_id, int(stamp))
        except Exception as exc:
            log.warning("webhook delivery %s not recorded: %s", delivery_id, exc)
            raise _Refused(503, "cannot record the delivery now; send it again") from None
        if not new:
            raise _Refused(409, f"delivery {delivery_id} was received before (replayed)")
        return body

    async def _deliver(self, request: Request) -> Response:
        try:
            body = await self._verified(request)
        except _Refused as refused:
            self.refused += 1
            log.warning("webhook delivery refused (%d): %s", refused.status, refused.message)
            return _reply(refused.status, refused.message, close=True)
        try:
            event = json.loads(body)
            key = (str(event.get("entity")), str(event.get("action")))
        except (ValueError, AttributeError):
            return _reply(400, "body is not a JSON object")
        if key not in RELEVANT_EVENTS:
            return _reply(200, "ignored")
        if key in MARKED_EVENTS:
            await self._mark(event, key)
        log.info("webhook %s.%s: polling early", *key)
        self.accepted += 1
        self.on_event()
        return _reply(202, "poll scheduled")

    async def _mark(self, event: dict[str, Any], key: tuple[str, str]) -> None:
        """Remember the version a tag delivery names. A mark that cannot be recorded is only
        logged: the next full reconcile reads the tag anyway."""
        from starlette.concurrency import run_in_threadpool

        data = event.get("data")
        name = data.get("name") if isinstance(data, dict) else None
        version = data.get("version") if isinstance(data, dict) else None
        if self.marks is None or not name or version in (None, ""):
            return
        try:
            await run_in_threadpool(self.marks, str(name), str(version), ".".join(key))
        except Exception as exc:
            log.warning("webhook mark of %s/%s not recorded: %s", name, version, exc)
