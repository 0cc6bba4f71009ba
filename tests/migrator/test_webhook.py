"""The webhook receiver, running (uvicorn on 127.0.0.1): signatures, replays, limits enforced
before reading, timeouts, the connection bound, and its memory under large unsigned bodies."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from db import (
    RegistryMark,
    make_engine,
    make_session_factory,
    marked_versions,
    migrations,
    session_scope,
)
from migrator.webhook import (
    DeliveryStore,
    MarkStore,
    MemoryDeliveries,
    WebhookLimits,
    WebhookReceiver,
    database_deliveries,
    database_marks,
    sign,
    verify_signature,
)

SECRET = "s3cret"
CREATED = json.dumps({"entity": "model_version", "action": "created", "data": {}})
MB = 1 << 20


def _post(port: int, body: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/", data=body.encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _headers(
    body: str, *, secret: str = SECRET, ts: int | None = None, delivery: str | None = None
) -> dict[str, str]:
    stamp = str(int(time.time()) if ts is None else ts)
    delivery = delivery or uuid.uuid4().hex
    return {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": sign(secret, delivery, stamp, body),
    }


def _head(lines: dict[str, str], *, path: str = "/", method: str = "POST") -> bytes:
    """A request's line and headers, as raw bytes (no body)."""
    text = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    text += "".join(f"{k}: {v}\r\n" for k, v in lines.items())
    return (text + "\r\n").encode()


def _connect(port: int, timeout_s: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    return sock


def _read_reply(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection, or a whole reply is in."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return data
        if not chunk:
            return data
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep and b"content-length:" in head.lower():
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(body) >= length:
                return data


def _status(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:200]
    return int(reply.split()[1])


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes the connection (the socket's timeout bounds the wait)."""
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class Receivers:
    """``serve(limits=..., deliveries=...)`` starts a receiver; ``polls`` counts the early
    polls all of them asked for."""

    def __init__(self) -> None:
        self.started: list[WebhookReceiver] = []
        self.polls: list[int] = []

    def __call__(
        self,
        *,
        limits: WebhookLimits | None = None,
        deliveries: DeliveryStore | None = None,
        marks: MarkStore | None = None,
    ) -> WebhookReceiver:
        receiver = WebhookReceiver(
            "127.0.0.1",
            0,
            SECRET,
            lambda: self.polls.append(1),
            limits=limits,
            deliveries=deliveries,
            marks=marks,
        )
        receiver.start()
        self.started.append(receiver)
        return receiver


@pytest.fixture
def serve() -> Iterator[Receivers]:
    """Running receivers on 127.0.0.1; every one is stopped at the end."""
    receivers = Receivers()
    yield receivers
    for receiver in receivers.started:
        receiver.stop()


def test_signature_matches_mlflows_own_signer() -> None:
    from mlflow.webhooks.delivery import _generate_hmac_signature

    assert sign(SECRET, "abc", "1700000000", CREATED) == _generate_hmac_signature(
        SECRET, "abc", "1700000000", CREATED
    )


def test_verify_refuses_tampering_and_stale_timestamps() -> None:
    body = '{"a": 1}'
    good = sign(SECRET, "d", "1000", body)

    def check(**kw: str | float) -> str | None:
        args: dict[str, str | float] = {
            "delivery_id": "d",
            "timestamp": "1000",
            "body": body,
            "signature": good,
            "now": 1000,
        }
        args.update(kw)
        secret = str(args.pop("secret", SECRET))
        return verify_signature(secret, **args)  # type: ignore[arg-type]

    assert check() is None
    assert check(body=body + " ") == "bad signature"
    assert check(secret="other") == "bad signature"
    assert "timestamp" in str(check(now=5000))
    assert check(delivery_id="") == "missing signature headers"


def test_receiver_only_triggers_a_poll_for_verified_relevant_events(serve: Receivers) -> None:
    receiver = serve()
    assert _post(receiver.port, CREATED, _headers(CREATED, secret="wrong")) == 401
    assert _post(receiver.port, CREATED, _headers(CREATED, ts=1)) == 401
    assert serve.polls == []
    assert _post(receiver.port, CREATED, _headers(CREATED)) == 202
    assert serve.polls == [1]
    other = json.dumps({"entity": "registered_model", "action": "created", "data": {}})
    assert _post(receiver.port, other, _headers(other)) == 200
    assert _post(receiver.port, "[1, 2]", _headers("[1, 2]")) == 400  # signed, not an object
    assert serve.polls == [1]
    assert (receiver.accepted, receiver.refused) == (1, 2)


def test_a_tag_delivery_marks_its_version_in_the_job_database(
    serve: Receivers, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrations.upgrade(url)
    sessions = make_session_factory(make_engine(url))
    receiver = serve(marks=database_marks(sessions))
    tag_set = {"name": "enc-styleA", "version": "3", "key": "lorax.base", "value": "enc/2"}
    bodies = [
        json.dumps({"entity": "model_version_tag", "action": "set", "data": tag_set}),
        json.dumps({"entity": "model_version_tag", "action": "deleted", "data": tag_set}),
        CREATED,  # a new version moves its update time: the search shows it, no mark
        json.dumps({"entity": "model_version_tag", "action": "set", "data": {}}),  # no version
    ]
    assert [_post(receiver.port, b, _headers(b)) for b in bodies] == [202, 202, 202, 202]
    assert serve.polls == [1, 1, 1, 1]
    with session_scope(sessions) as session:
        marks = session.execute(select(RegistryMark.name, RegistryMark.version, RegistryMark.event))
        assert sorted(marks) == [
            ("enc-styleA", "3", "model_version_tag.deleted"),
            ("enc-styleA", "3", "model_version_tag.set"),
        ]
        assert marked_versions(session=session)[0][1:] == ("enc-styleA", "3")


def test_receiver_requires_a_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        WebhookReceiver("127.0.0.1", 0, "", lambda: None)


def test_a_replayed_delivery_is_refused_by_every_replica(serve: Receivers, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrations.upgrade(url)
    sessions = make_session_factory(make_engine(url))
    one = serve(deliveries=database_deliveries(sessions, 300))
    two = serve(deliveries=database_deliveries(sessions, 300))
    headers = _headers(CREATED, delivery="delivery-1")
    assert _post(one.port, CREATED, headers) == 202
    assert _post(one.port, CREATED, headers) == 409  # the same delivery again
    assert _post(two.port, CREATED, headers) == 409  # and at another replica
    assert _post(two.port, CREATED, _headers(CREATED, delivery="delivery-2")) == 202
    assert serve.polls == [1, 1]


def test_memory_deliveries_forget_ids_once_their_window_passed() -> None:
    store = MemoryDeliveries(window_s=60)
    now = int(time.time())
    assert store("a", now) and not store("a", now)
    assert store("old", now - 600)  # recorded, and forgotten at the next call
    assert store("b", now)
    assert store("old", now - 600)  # no longer remembered: its timestamp refuses it anyway


@pytest.mark.parametrize(
    ("length", "signed", "status"),
    [
        ("-1", True, 400),
        ("abc", True, 400),
        (str(100 * MB), True, 413),
        (str(100 * MB), False, 401),
    ],
)
def test_bad_content_length_is_refused_without_reading_the_body(
    serve: Receivers,
    length: str,
    signed: bool,
    status: int,
) -> None:
    receiver = serve()
    headers = _headers(CREATED) if signed else {"Content-Type": "application/json"}
    with _connect(receiver.port) as sock:
        sock.sendall(_head({**headers, "Content-Length": length}))  # the body never comes
        reply = _read_reply(sock)
        assert _status(reply) == status, reply
        assert _closed_by_server(sock)
    assert serve.polls == []


def test_a_chunked_body_is_capped_while_it_streams(serve: Receivers) -> None:
    receiver = serve(limits=WebhookLimits(max_body_bytes=256 * 1024))
    headers = {**_headers(CREATED), "Transfer-Encoding": "chunked"}
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
    sent = 0
    with _connect(receiver.port) as sock:
        sock.sendall(_head(headers))
        try:
            while sent < 100 * MB:
                sock.sendall(chunk)
                sent += 64 * 1024
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = _read_reply(sock)
    assert reply == b"" or _status(reply) == 413  # the reply may be lost in a reset
    assert sent < 100 * MB  # the server stopped reading long before the end
    assert receiver.refused == 1 and serve.polls == []


def test_idle_and_slow_connections_are_closed(serve: Receivers) -> None:
    receiver = serve(limits=WebhookLimits(idle_timeout_s=0.3, request_timeout_s=0.6))
    with _connect(receiver.port) as silent, _connect(receiver.port) as slow_headers:
        slow_headers.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and no more
        assert _closed_by_server(silent)
        assert _closed_by_server(slow_headers)
    with _connect(receiver.port) as slow_body:
        slow_body.sendall(_head({**_headers(CREATED), "Content-Length": str(len(CREATED))}))
        slow_body.sendall(CREATED[:5].encode())  # the rest never comes
        assert _closed_by_server(slow_body)
    with _connect(receiver.port) as kept_alive:
        kept_alive.sendall(_head({}, path="/health", method="GET"))
        assert _status(_read_reply(kept_alive)) == 200
        assert _closed_by_server(kept_alive)  # idle after its reply
    assert serve.polls == []


def test_connections_past_the_bound_are_refused(serve: Receivers) -> None:
    bound = 20
    receiver = serve(limits=WebhookLimits(max_connections=bound, idle_timeout_s=60))
    statuses: list[int] = []
    held: list[socket.socket] = []
    try:
        for _ in range(200):  # each stays open while the next ones come
            sock = _connect(receiver.port)
            held.append(sock)
            sock.sendall(_head({}, path="/health", method="GET"))
            statuses.append(_status(_read_reply(sock)))
    finally:
        for sock in held:
            sock.close()
    served, refused = statuses.count(200), statuses.count(503)
    assert served + refused == 200, statuses
    assert 1 <= served < bound and refused > 200 - bound, (served, refused)
    assert statuses[:served] == [200] * served  # the first ones in, the rest refused

    deadline = time.monotonic() + 10
    while True:  # once they are gone, the receiver serves again
        with _connect(receiver.port) as sock:
            sock.sendall(_head({}, path="/health", method="GET"))
            if _status(_read_reply(sock)) == 200:
                break
        assert time.monotonic() < deadline, "the receiver kept refusing"
        time.sleep(0.1)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _send_body(port: int, headers: dict[str, str], *, chunked: bool, total: int) -> int:
    """Send up to ``total`` bytes of body; returns how many went before the server closed."""
    block = 1 * MB
    piece = b"%x\r\n%s\r\n" % (block, b"y" * block) if chunked else b"y" * block
    sent = 0
    with _connect(port) as sock:
        sock.sendall(_head(headers))
        try:
            while sent < total:
                sock.sendall(piece)
                sent += block
        except (BrokenPipeError, ConnectionResetError):
            pass
        _read_reply(sock)
    return sent


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for the RSS")
def test_large_unsigned_bodies_leave_the_receivers_memory_flat(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrations.upgrade(url)
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.migrator.webhook_server", url, SECRET],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        # Warm up every path once (a delivery accepted, one refused), then measure idle.
        assert _post(port, CREATED, _headers(CREATED)) == 202
        assert _post(port, CREATED, _headers(CREATED, secret="wrong")) == 401
        idle = _rss_bytes(process.pid)
        unsigned = {"Content-Type": "application/json"}
        bogus = {**_headers(CREATED), "X-MLflow-Signature": "v1,AAAA"}  # headers pass; body not
        total = 100 * MB
        sent = [
            _send_body(
                port, {**unsigned, "Content-Length": str(total)}, chunked=False, total=total
            ),
            _send_body(port, {**unsigned, "Content-Length": "-1"}, chunked=False, total=total),
            _send_body(
                port, {**unsigned, "Transfer-Encoding": "chunked"}, chunked=True, total=total
            ),
            _send_body(port, {**bogus, "Transfer-Encoding": "chunked"}, chunked=True, total=total),
        ]
        grown = _rss_bytes(process.pid) - idle
        assert grown < 50 * MB, f"RSS grew by {grown / MB:.1f} MB (sent {sent})"
        assert _post(port, CREATED, _headers(CREATED)) == 202  # still serving
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=30)


def test_the_receiver_is_served_by_its_own_thread(serve: Receivers) -> None:
    receiver = serve()
    assert any(t.name == "webhook" for t in threading.enumerate())
    receiver.stop()
    assert not any(t.name == "webhook" for t in threading.enumerate())
