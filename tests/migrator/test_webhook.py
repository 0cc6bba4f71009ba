from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from migrator.webhook import WebhookReceiver, sign, verify_signature

SECRET = "s3cret"


def _post(port: int, body: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/", data=body.encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _headers(body: str, *, secret: str = SECRET, ts: int | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if ts is None else ts)
    return {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": "d-1",
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": sign(secret, "d-1", stamp, body),
    }


def test_signature_matches_mlflows_own_signer() -> None:
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body = json.dumps({"entity": "model_version", "action": "created", "data": {}})
    assert sign(SECRET, "abc", "1700000000", body) == _generate_hmac_signature(
        SECRET, "abc", "1700000000", body
    )


def test_verify_refuses_tampering_and_replay() -> None:
    body = '{"a": 1}'
    good = sign(SECRET, "d", "1000", body)
    assert (
        verify_signature(
            SECRET, delivery_id="d", timestamp="1000", body=body, signature=good, now=1000
        )
        is None
    )
    assert (
        verify_signature(
            SECRET, delivery_id="d", timestamp="1000", body=body + " ", signature=good, now=1000
        )
        == "bad signature"
    )
    assert (
        verify_signature(
            "other", delivery_id="d", timestamp="1000", body=body, signature=good, now=1000
        )
        == "bad signature"
    )
    assert "timestamp" in str(
        verify_signature(
            SECRET, delivery_id="d", timestamp="1000", body=body, signature=good, now=5000
        )
    )
    assert (
        verify_signature(
            SECRET, delivery_id="", timestamp="1000", body=body, signature=good, now=1000
        )
        == "missing signature headers"
    )


def test_receiver_only_triggers_a_poll_for_verified_relevant_events() -> None:
    polls = threading.Event()
    count = []

    def on_event() -> None:
        count.append(1)
        polls.set()

    receiver = WebhookReceiver("127.0.0.1", 0, SECRET, on_event)
    receiver.start()
    try:
        created = json.dumps({"entity": "model_version", "action": "created", "data": {}})
        assert _post(receiver.port, created, _headers(created, secret="wrong")) == 401
        assert _post(receiver.port, created, _headers(created, ts=1)) == 401
        assert not count
        assert _post(receiver.port, created, _headers(created)) == 202
        assert polls.wait(5)
        other = json.dumps({"entity": "registered_model", "action": "created", "data": {}})
        assert _post(receiver.port, other, _headers(other)) == 200
        assert len(count) == 1
        assert (receiver.accepted, receiver.refused) == (1, 2)
    finally:
        receiver.stop()


def test_receiver_requires_a_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        WebhookReceiver("127.0.0.1", 0, "", lambda: None)
