"""A real ``mlflow server`` delivers its webhook to the receiver (starlette on uvicorn, delivery
ids in the job database): its signed delivery is accepted and asks for a poll. Replays, bad
lengths, timeouts and the connection bound are tested against the running receiver in
``tests/migrator/test_webhook.py``, signed as MLflow signs."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from db import make_engine, make_session_factory, migrations
from migrator.registry.mlflow_registry import MlflowRegistry
from migrator.webhook import WebhookReceiver, database_deliveries
from tests.e2e.harness import wait_for
from tests.fixtures.mlflow import MlflowServer
from tests.migrator.scenario import register

pytestmark = [pytest.mark.e2e, pytest.mark.mlflow_server, pytest.mark.slow]

SECRET = "the same secret"


def test_a_delivery_of_mlflow_server_is_accepted(
    own_mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrations.upgrade(url)
    polls: list[int] = []
    receiver = WebhookReceiver(
        "127.0.0.1",
        0,
        SECRET,
        lambda: polls.append(1),
        deliveries=database_deliveries(make_session_factory(make_engine(url)), 300),
    )
    receiver.start()
    try:
        client = MlflowClient(own_mlflow_server.url)
        client.create_webhook(
            name="lorax-migrator",
            url=f"http://127.0.0.1:{receiver.port}/",
            events=["model_version.created"],
            secret=SECRET,
        )
        files = tmp_path / "files"
        files.mkdir()
        (files / "weights.safetensors").write_bytes(b"x")
        register(MlflowRegistry(own_mlflow_server.url, retries=1), "delivered", files, {})
        wait_for(
            lambda: bool(polls),
            timeout_s=60,
            what="MLflow's delivery of model_version.created",
            context=lambda: own_mlflow_server.log.read_text(errors="replace")[-3000:],
        )
        assert (receiver.accepted, receiver.refused) == (1, 0)
    finally:
        receiver.stop()
