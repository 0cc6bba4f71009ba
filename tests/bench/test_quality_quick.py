"""``bench/quality.py --quick`` runs end to end on the real models and writes complete results.

The quick mode trains for a few steps only, so its numbers mean nothing; what is checked is that
every target x row cell exists with finite numbers, that the module decisions are the expected
ones (the pruned model's layers are rematched), and that the table and plot are written. No
timing is asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"rohan-pristine", "harder", "pruned", "random"}
ROWS = {
    "none",
    "trained",
    "lorax_project",
    "lorax_subspace",
    "lorax_copy",
    "lorax_project_unfiltered",
    "lora_project",
    "lora_project_r",
}
TRANSFER_ROWS = ROWS - {"none", "trained"}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    out = tmp_path_factory.mktemp("quality") / "quality-quick.json"
    cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text()), done.stdout, out


@pytest.mark.slow
@pytest.mark.realmodels
@pytest.mark.interop
def test_every_target_and_row_has_finite_numbers(
    quick_results: tuple[dict[str, Any], str, Path],
) -> None:
    doc, _, _ = quick_results
    assert set(doc["targets"]) == TARGETS
    for name, target in doc["targets"].items():
        assert _finite(target["atc"]) and 0.0 <= target["atc"] <= 1.0, name
        expected = ROWS | ({"lorax_kept_layers_project"} if name == "pruned" else set())
        assert set(target["rows"]) == expected, name
        trained_gain = target["rows"]["trained"]["gain_mean"]
        for key, row in target["rows"].items():
            cell = f"{name}/{key}"
            assert _finite(row["metric_mean"]) and _finite(row["gain_mean"]), cell
            assert 0.0 <= row["metric_mean"] <= 100.0, cell
            assert all(_finite(v) for v in row["metric_per_seed"]), cell
            if row["share"] is None:  # undefined only where there is no trained gain to share
                assert trained_gain < 1.0, cell
            else:
                assert _finite(row["share"]), cell
            if key not in ("none", "trained"):
                assert _finite(row["energy_retained"]), cell
                assert len(row["metric_per_seed"]) == doc["experiment"]["seeds"], cell
    assert all(_finite(v) for v in doc["source"]["lorax"] + doc["source"]["lora"])
    assert set(TRANSFER_ROWS) <= set(doc["spearman"])


@pytest.mark.slow
@pytest.mark.realmodels
@pytest.mark.interop
def test_decisions_follow_the_successors(quick_results: tuple[dict[str, Any], str, Path]) -> None:
    doc, _, _ = quick_results
    targets = doc["targets"]
    # the real fine-tune keeps every module by name; the random control gets nothing
    assert targets["rohan-pristine"]["decisions"] == {"same_name": 24, "rematched": 0, "skipped": 0}
    assert targets["random"]["decisions"]["skipped"] == 24
    assert targets["random"]["rows"]["lorax_project"]["energy_retained"] == 0.0
    # the pruned model's layer 1 is the source's layer 2 (rematched through the ATC's plan)
    by_target = {m["target"]: m for m in targets["pruned"]["module_map"]}
    query1 = by_target["encoder.layer.1.attention.self.query"]
    assert query1["decision"] == "rematched"
    assert query1["source"] == "encoder.layer.2.attention.self.query"
    assert targets["pruned"]["atc"] > targets["rohan-pristine"]["atc"]


@pytest.mark.slow
@pytest.mark.realmodels
@pytest.mark.interop
def test_table_and_plot_are_written(quick_results: tuple[dict[str, Any], str, Path]) -> None:
    _, stdout, out = quick_results
    assert "| target | row |" in stdout
    assert "Spearman" in stdout
    png = out.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
