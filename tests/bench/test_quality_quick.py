"""``bench/quality.py --quick`` runs end to end on the real models and writes complete results.

The quick mode trains for a few steps only, so its accuracy numbers mean nothing; what is checked
is that every target x row cell exists with finite numbers, that the module decisions are the
expected ones (the pruned model's layers are rematched), that the signals beside ATC are there
and tell the real fine-tune from the random-feed-forward control (those are measured on the real
models), and that the table and plot are written. No timing is asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.bench  # a whole benchmark script: make test-bench

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {
    "rohan-pristine", "harder-2", "harder-4", "harder-6", "pruned", "random", "random-ffn"
}  # fmt: skip
VARIANTS = {
    "lorax_project_merge",
    "lorax_project_merge_mean",
    "lorax_project_ordered",
    "lorax_project_ordered_merge",
    "lorax_project_ordered_merge_mean",
}
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
        expected = ROWS | ({"lorax_kept_layers_project"} | VARIANTS if name == "pruned" else set())
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


@pytest.mark.slow
@pytest.mark.realmodels
@pytest.mark.interop
def test_signals_beside_atc(quick_results: tuple[dict[str, Any], str, Path]) -> None:
    doc, stdout, _ = quick_results
    targets = doc["targets"]
    for name, target in targets.items():
        assert _finite(target["drift"]) and target["drift"] >= 0.0, name
        assert set(target["cka"]) == {"token_ids", "words", "text"}, name
        assert all(-1.0 <= v <= 1.0 for v in target["cka"].values()), name
        assert len(target["adapter_signals"]) == doc["experiment"]["seeds"], name
    rohan, noise = targets["rohan-pristine"], targets["random-ffn"]
    # the control: attention untouched, so ATC cannot see it; drift and the function can
    assert noise["atc"] < 1e-6 and rohan["atc"] < 1e-3
    assert noise["drift"] > 0.3 > 0.01 > rohan["drift"]
    assert min(rohan["cka"].values()) > 0.9 > 0.7 > min(noise["cka"].values())
    for signals in rohan["adapter_signals"]:
        assert min(signals["r"].values()) > 0.8
    for signals in targets["random"]["adapter_signals"]:  # every module skipped: no effect
        assert all(v is None for v in signals["r"].values())
    decisions = {(p["target"], p["decision"]) for p in doc["signals"]["points"]}
    assert {d for t, d in decisions if t == "rohan-pristine"} == {"approved"}
    for held in ("harder-2", "harder-4", "harder-6", "pruned", "random-ffn"):
        assert {d for t, d in decisions if t == held} == {"pending"}, held
    assert {d for t, d in decisions if t == "random"} == {"skipped"}
    assert {"atc", "drift", "cka_text", "effect_text"} <= set(doc["signals"]["spearman"])
    assert doc["signals"]["costs"]["adapter_seconds_mean"] > 0
    assert "Spearman rho of each signal" in stdout and "Functional check cost" in stdout


@pytest.mark.slow
@pytest.mark.realmodels
@pytest.mark.interop
def test_merge_carries_the_dropped_layers(quick_results: tuple[dict[str, Any], str, Path]) -> None:
    doc, _, _ = quick_results
    rows = doc["targets"]["pruned"]["rows"]
    one_to_one = rows["lorax_project"]["energy_retained"]
    assert 0.3 < one_to_one < 0.7  # three of six layers' updates have a place
    assert rows["lorax_project_ordered_merge"]["energy_retained"] > 0.95
    assert rows["lorax_project_merge"]["energy_retained"] > 0.95
    assert rows["lorax_project_ordered_merge_mean"]["energy_retained"] < one_to_one
    mapping = doc["targets"]["pruned"]["variant_module_map"]["lorax_project_ordered_merge"]
    fed = {s for m in mapping for s, _ in m["sources"]}
    assert len(fed) == 24  # every source module reaches a target module
    query0 = next(m for m in mapping if m["target"] == "encoder.layer.0.attention.self.query")
    assert query0["sources"][0][0] == "encoder.layer.0.attention.self.query"
