"""``bench/cli_startup.py --quick`` runs and reports the three start-up figures (no timing is
asserted: only that the table and JSON are written, and what each command imports)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench  # a whole benchmark script: make test-bench

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cli_startup_quick(tmp_path: Path) -> None:
    out = tmp_path / "cli_startup.json"
    cmd = [sys.executable, str(ROOT / "bench" / "cli_startup.py"), "--quick", "--out", str(out)]
    done = subprocess.run(
        [*cmd, "--baseline", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| command" in done.stdout
    doc = json.loads(out.read_text())
    rows = {r["command"]: r for r in doc["rows"]}
    assert list(rows) == ["--help", "bad input (transfer /nonexistent)", "jobs list"]
    for row in rows.values():
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("this tree wall s", "wall ratio"))
    assert rows["--help"]["exit codes"]["this tree"] == [0]
    assert rows["bad input (transfer /nonexistent)"]["exit codes"]["this tree"] == [2]
    assert rows["--help"]["heavy imports"]["this tree"] == []
    assert "torch" not in rows["jobs list"]["heavy imports"]["this tree"]
