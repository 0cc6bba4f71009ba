"""The benchmark scripts' ``--quick`` modes, so that they never rot (no timing is asserted).

Each script runs as a subprocess exactly as a person would run it, on toy models generated into
a temporary folder; the JSON it writes must hold the expected rows with finite numbers, and our
transfers must equal the paper's Algorithm 1 to 1e-5 relative.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.bench  # a whole benchmark script: make test-bench

ROOT = Path(__file__).resolve().parents[2]
MAX_REL_DIFF = 1e-5


def _run(script: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, str(ROOT / "bench" / f"{script}.py"), "--quick"]
    cmd += ["--cache", str(tmp_path / "cache"), "--out", str(out), *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|" in done.stdout  # printed a table
    return json.loads(out.read_text())


def _finite(*values: object) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


@pytest.mark.slow
def test_transfer_speed_quick(tmp_path: Path) -> None:
    result = _run("transfer_speed", tmp_path)
    assert result["quick"] is True
    assert result["device"]["used"] == "cpu"
    rows = result["models"]["tiny-unet"]["rows"]
    assert [r["adapters"] for r in rows] == [1, 2]
    assert [r["alg1_estimated"] for r in rows] == [False, True]
    for r in rows:
        assert _finite(r["alg1"]["wall_s"], r["speedup_service"], r["speedup_cold"])
        assert _finite(r["speedup_warm"])
        for label in ("ours_service", "ours_cold", "ours_warm"):
            run = r[label]
            assert _finite(run["wall_s"], run["peak_rss_mb"], run["median_adapter_s"])
            assert len(run["per_adapter_s"]) == r["adapters"]
            assert r[f"diff_{label.removeprefix('ours_')}"]["modules_compared"] > 0
        assert not r["alg1_estimated"] or r["alg1"]["from_measured_n"] == 1
        assert r["alg1_estimated"] or _finite(r["alg1"]["peak_rss_mb"])
        assert _finite(r["max_rel_diff"])
        assert r["max_rel_diff"] <= MAX_REL_DIFF
    # every target matrix in the service path; the rectangular ones only when cold (a square
    # module at full rank needs no factors); none when warm (the cache works)
    service, cold, warm = (rows[0][f"ours_{x}"] for x in ("service", "cold", "warm"))
    assert service["factorized"] > cold["factorized"] > 0 and warm["factorized"] == 0
    # a new base's first pass: today (full SVD of both bases) against ours, project and subspace
    new = result["models"]["tiny-unet"]["new_base"]
    assert new["adapters"] == 2 and new["k"] == 32
    today, project, subspace = (new["runs"][x] for x in ("today", "project", "subspace"))
    for run in (today, project, subspace):
        assert _finite(run["wall_s"], run["assess_s"], run["peak_rss_mb"], run["cache_target_mb"])
        assert run["decisions"] == ["same_name"]
    assert today["factorized"]["target"]["exact"] > 0 == today["factorized"]["target"]["basis"]
    assert project["factorized"]["target"]["exact"] == 0  # no SVD of the new base ...
    assert project["factorized"]["target"]["basis"] > 0  # ... a QR of its rectangular modules
    assert project["factorized"]["source"]["randomized"] > 0
    # subspace mode: exact leading triplets, no QR (on toy widths the assessment's own factors
    # are exact already: k x 7 >= p falls back to the exact SVD, and they serve the transfer)
    assert subspace["factorized"]["target"]["basis"] == 0
    assert project["cache_target_mb"] < today["cache_target_mb"]
    assert _finite(new["speedup_project"], new["speedup_subspace"])
    for key in ("project_vs_alg1", "today_vs_alg1", "project_vs_today", "subspace_vs_exact"):
        assert new["diff"][key]["modules_compared"] > 0
        assert new["diff"][key]["max_rel_diff"] <= MAX_REL_DIFF, key
    sizes = result["sizes"]["rows"]
    assert [r["model"] for r in sizes] == ["grid-b1-w48", "grid-b4-w96"]
    for r in sizes:
        assert _finite(r["ours"]["peak_rss_mb"], r["alg1"]["peak_rss_mb"], r["max_rel_diff"])
        assert _finite(r["new_base"]["peak_rss_mb"], r["new_base"]["wall_s"])
        assert r["max_rel_diff"] <= MAX_REL_DIFF


@pytest.mark.slow
def test_atc_scale_quick(tmp_path: Path) -> None:
    # --device cuda: runs there on a GPU machine, and says so and runs on the CPU elsewhere
    result = _run("atc_scale", tmp_path, "--device", "cuda")
    if not torch.cuda.is_available():
        assert result["device"] == {
            "requested": "cuda",
            "used": "cpu",
            "note": "no CUDA device found: running on CPU",
        }
    rows = [result["pair"], *result["sizes"]["rows"]]
    assert [r["model"] for r in rows] == ["tiny-unet", "grid-b1-w48", "grid-b4-w96"]
    for r in rows:
        for method in ("truncated", "exact"):
            run = r[method]
            assert _finite(run["wall_s"], run["peak_rss_mb"], run["atc"], run["atc_s"])
            assert 0.0 <= run["atc"] <= 1.0
            assert run["factorized"] == 2 * r["matrices"]
        error = r["error"]
        assert _finite(error["max_abs_err"], error["mean_abs_err_left"], error["atc_abs_err"])
        assert 0.0 <= error["max_abs_err"] <= 1.0
        assert error["pairs_left"] > 0 and error["pairs_right"] > 0


@pytest.mark.slow
def test_randomized_settings_quick(tmp_path: Path) -> None:
    result = _run("randomized_settings", tmp_path)
    before, default = result["settings"]
    assert "before" in before and "default" in default
    for row in result["cost"].values():
        assert _finite(row["exact_s"], row[default]["s"], row[default]["x_exact"])
        assert row[default]["max_psi_err"] < row[before]["max_psi_err"]
    pristine = result["accuracy"]["minilm->pristine"]  # the real weights (suite dependencies)
    assert pristine[default]["max_psi_err"] < 1e-3 < pristine[before]["max_psi_err"]
    assert pristine[default]["atc_err"] < 1e-3
    assert _finite(*result["accuracy"]["minilm->random-init"][default].values())


@pytest.mark.slow
def test_registry_scale_quick(tmp_path: Path) -> None:
    result = _run("registry_scale", tmp_path)
    assert result["quick"] is True
    (section,) = result["registries"]
    assert section["share"] == 0.5
    rows = section["rows"]
    assert [r["size"] for r in rows] == [20, 40]
    for r in rows:
        assert r["counts"]["ours"] + r["counts"]["others"] == r["size"]
        assert r["counts"]["others"] > 0  # other teams' versions are in the registry too
        for mode, idle in (("incremental", "none"), ("full", "full")):
            m = r["modes"][mode]
            daemon = m["daemon"]
            assert daemon["listings"][0] == "full"  # a fresh job database reads everything
            assert daemon["listings"][2:] == [idle, idle]  # what the idle passes read
            assert _finite(*daemon["idle_s"], daemon["first_pass_s"], daemon["second_pass_s"])
            assert daemon["seen"]["adapters"] == r["counts"]["ours"] - 1  # all but big/1
            assert _finite(daemon["idle_peak_rss_mb"], *daemon["rss_mb"])
            (tick,) = m["ticks"]
            assert tick["jobs"] == 0 and tick["listing"] == idle
            assert _finite(tick["wall_s"], tick["peak_rss_mb"])
        assert r["modes"]["incremental"]["daemon"]["baseline"]["versions"] == r["size"]
        assert _finite(r["idle_full_over_incremental"], r["tick_full_over_incremental"])
    drain = rows[-1]["modes"]["incremental"]["daemon"]["drain"]  # two adapters of enc/1
    assert drain["idle_listing"] == "none"
    assert drain["planned"] == 2 and drain["outcomes"] == {"succeeded": 2}
    assert _finite(drain["pass_s"], drain["rss_start_mb"], drain["rss_end_mb"])
    assert "drain" not in rows[0]["modes"]["incremental"]["daemon"]
    assert "drain" not in rows[-1]["modes"]["full"]["daemon"]


@pytest.mark.slow
@pytest.mark.ray
def test_ray_scale_quick(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    out = tmp_path / "ray_scale.json"
    cmd = [sys.executable, str(ROOT / "bench" / "ray_scale.py"), "--quick"]
    cmd += ["--cache", str(tmp_path / "cache"), "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|" in done.stdout  # printed its tables
    result = json.loads(out.read_text())
    assert result["model"] == "tiny-unet"
    assert _finite(result["local_median_s"], result["ray_median_s"], result["local_over_ray"])
    # the Ray fan-out computes the same factors as the local path
    assert result["singular_values_max_rel_diff"] <= 1e-4
    assert result["factors_gb"] > 0
    assert result["ray_runs"] and all(run["tasks"] for run in result["ray_runs"])
    workers = [row["workers"] for row in result["division"]]
    assert workers == sorted(workers) and workers[0] == 1
