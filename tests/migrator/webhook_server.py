"""A webhook receiver alone in a process, for tests that watch it from outside (its RSS).

Usage: ``python -m tests.migrator.webhook_server DATABASE_URL SECRET``: it serves on a free
port of 127.0.0.1, with delivery ids in the job database at ``DATABASE_URL`` (migrated to
head), prints ``<port>`` on stdout, and stops when stdin closes.
"""

from __future__ import annotations

import sys

from db import make_engine, make_session_factory
from migrator.webhook import WebhookLimits, WebhookReceiver, database_deliveries


def main(argv: list[str]) -> int:
    url, secret = argv
    limits = WebhookLimits(idle_timeout_s=2.0, request_timeout_s=5.0)
    sessions = make_session_factory(make_engine(url))
    receiver = WebhookReceiver(
        "127.0.0.1",
        0,
        secret,
        lambda: None,
        limits=limits,
        deliveries=database_deliveries(sessions, limits.timestamp_window_s),
    )
    receiver.start()
    print(receiver.port, flush=True)
    sys.stdin.read()
    receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
