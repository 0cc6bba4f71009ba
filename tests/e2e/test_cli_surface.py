"""The CLI's fixed surface, as a script or an operator sees it: exit codes (0 success, 1 failure
of the work, 2 bad usage or input), one clear line on bad input, one JSON document with
``--json``. The commands are independent, so they run side by side (start-up dominates)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from db import migrations
from tests.e2e.conftest import SyntheticFiles
from tests.e2e.harness import migrator_env, run_cli_parallel
from tests.fixtures.postgres import PostgresServer

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.slow]


def test_cli_exit_codes_and_json(
    synthetic: SyntheticFiles, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    empty = postgres_server.create_database()
    at_head = postgres_server.create_database()
    migrations.upgrade(at_head)

    # A LoRA-X adapter whose weights file is cut in half.
    broken = tmp_path / "broken"
    shutil.copytree(synthetic.adapters["styleA"][0], broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    def env(database: str) -> dict[str, str]:
        return migrator_env(
            data_dir=tmp_path / "data",
            tracking_uri=f"sqlite:///{tmp_path / 'unused-mlflow.db'}",
            database_url=database,
        )

    files = env(f"sqlite:///{tmp_path / 'jobs.db'}")
    v1, v2 = str(synthetic.v1), str(synthetic.v2)
    check_head, check_empty, run_stale, transfer_bad, atc, transfer_good = run_cli_parallel(
        [
            (["db", "check", "--json"], env(at_head)),
            (["db", "check", "--json"], env(empty)),
            (["run"], env(empty)),
            (
                [
                    "transfer",
                    str(broken),
                    "--from",
                    v1,
                    "--to",
                    v2,
                    "--output",
                    str(tmp_path / "o1"),
                ],
                files,
            ),
            (["atc", v1, v2, "--json"], files),
            (
                [
                    "transfer",
                    str(synthetic.adapters["styleA"][0]),
                    "--from",
                    v1,
                    "--to",
                    v2,
                    "--output",
                    str(tmp_path / "o2"),
                    "--json",
                ],
                files,
            ),
        ]
    )

    # db check: 0 at head, 1 on an empty PostgreSQL database, one JSON document either way.
    assert check_head.returncode == 0, check_head.describe()
    head = migrations.head()
    assert check_head.json() == {"revision": head, "head": head, "ok": True, "problem": None}
    assert check_empty.returncode == 1, check_empty.describe()
    doc = check_empty.json()
    assert doc["ok"] is False and doc["revision"] is None and doc["head"] == head
    assert "migrator db upgrade" in doc["problem"]

    # run refuses a database that is not at head, says what to do, and changes nothing.
    assert run_stale.returncode == 2, run_stale.describe()
    assert "migrator db upgrade" in run_stale.stderr, run_stale.describe()
    assert len(run_stale.stderr.strip().splitlines()) == 1, run_stale.describe()
    assert migrations.current(empty) is None

    # Bad input: exit 2, one line naming the file, nothing written.
    assert transfer_bad.returncode == 2, transfer_bad.describe()
    lines = transfer_bad.stderr.strip().splitlines()
    assert len(lines) == 1, transfer_bad.describe()
    assert str(weights) in lines[0], transfer_bad.describe()
    assert transfer_bad.stdout == ""
    assert not (tmp_path / "o1").exists()

    # atc --json: exactly one JSON document with the fixed keys.
    assert atc.returncode == 0, atc.describe()
    report = atc.json()
    assert {"atc", "atc_left", "atc_right", "similarity_rank", "modules"} <= set(report)
    assert report["similarity_rank"] == 8
    assert 0.0 <= report["atc"] < 0.05  # v2 is v1 moved by 2%
    assert report["atc"] == pytest.approx((report["atc_left"] + report["atc_right"]) / 2)
    assert len(report["modules"]) == 8
    for module in report["modules"]:
        assert {"target", "source", "phi_left", "phi_right", "decision"} <= set(module), module
        assert module["source"] == module["target"] and module["decision"] == "same_name"
        assert 0.9 < module["phi_left"] <= 1.0 + 1e-6

    # transfer --json on good input writes the adapter and reports it.
    assert transfer_good.returncode == 0, transfer_good.describe()
    moved = transfer_good.json()
    assert {
        "modules_transferred",
        "modules_rematched",
        "modules_skipped",
        "energy_retained",
        "atc",
    } <= set(moved)
    assert moved["modules_transferred"] == 8 and moved["modules_skipped"] == 0
    assert (tmp_path / "o2" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "o2" / "adapter_config.json").is_file()
