"""What the functional check adds to the daemon's pass on the demo: the same registry, one pass
without the check (``functional_check=false``) and one with it (the default), side by side.

    python bench/demo_pass.py                 # the demo's adapters (16 steps), 64 probes of 32
    python bench/demo_pass.py --rounds 2      # two of each, alternating
    python bench/demo_pass.py --quick         # 1 training step, 8 probes of 8 (in make test)

The demo registry (``make demo``'s: all-MiniLM-L6-v2 as ``minilm`` v1 with three trained
adapters in three file layouts, its real fine-tune, a depth-pruned copy and a random one) is
built once; each pass then runs in a fresh process on a fresh copy of it (its own job database
and an empty factor cache), so both sides start alike: reading the registry, factorizing the
bases, three assessments, the transfers, the pages. Reported: each pass's wall time, what it
decided, and the difference with the check against without, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure
from measure import RESULTS, load_average, machine, print_table, write_json

QUICK_PROBES = {"functional_probe_count": 8, "functional_probe_length": 8}


def work_populate(p: dict[str, Any]) -> dict[str, Any]:
    """Register the demo's models and adapters under ``./.demo`` (the working directory)."""
    from functools import partial

    from migrator import demo
    from migrator.database import prepare_database
    from migrator.registry.mlflow_registry import MlflowRegistry
    from migrator.settings import load_settings

    if p["steps"] is not None:
        demo._train_adapter = partial(demo._train_adapter, steps=p["steps"])  # type: ignore[assignment]
    settings = load_settings(data_dir=demo.DEMO_DIR)
    prepare_database(settings.database_url.get_secret_value())
    started = time.perf_counter()
    demo._populate(MlflowRegistry.from_settings(settings).client, demo.DEMO_DIR / "build")
    return {"seconds": time.perf_counter() - started}


def work_pass(p: dict[str, Any]) -> dict[str, Any]:
    """One daemon pass over the registry under ``./.demo``; its wall time and decisions."""
    import torch

    from db import list_jobs, session_scope
    from migrator import demo
    from migrator.pipeline import run_once
    from migrator.registry.mlflow_registry import MlflowRegistry
    from migrator.settings import load_settings
    from migrator.wiring import build_context

    torch.set_num_threads(p["threads"])
    settings = load_settings(data_dir=demo.DEMO_DIR, **p["settings"])
    load_before = load_average()[0]
    started = time.perf_counter()
    ctx = build_context(settings, MlflowRegistry.from_settings(settings))
    report = run_once(ctx)
    seconds = time.perf_counter() - started
    decided: dict[str, int] = {}
    for job in report.planned:
        decided[job.decision] = decided.get(job.decision, 0) + 1
    with session_scope(ctx.sessions) as session:
        measured = {
            str(signal["name"])
            for job in list_jobs(session=session)
            for signal in job.signals or []
            if signal.get("value") is not None
        }
    return {
        "signals_measured": sorted(measured),
        "seconds": seconds,
        "load_1min": [load_before, load_average()[0]],
        "decided": decided,
        "outcomes": sorted(str(o.status) for o in report.outcomes),
        "problems": report.problems,
        "unavailable": report.unavailable,
    }


def _child(task: str, cwd: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Run ``task`` of this file in a fresh interpreter (``measure.run_worker``) in ``cwd``."""
    return measure.run_worker(Path(__file__), {"task": task, "cwd": str(cwd), **payload})


def _worker() -> None:
    """A worker process: in the payload's folder, with no MIGRATOR_* setting from the shell."""
    payload = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    for key in [k for k in os.environ if k.startswith("MIGRATOR_")]:
        del os.environ[key]
    os.chdir(payload["cwd"])
    measure.worker_main({"work_populate": work_populate, "work_pass": work_pass})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 training step, 8 probes of 8")
    parser.add_argument("--rounds", type=int, default=1, help="passes of each kind")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per pass")
    parser.add_argument("--out", type=Path, default=RESULTS / "demo_pass.json")
    args = parser.parse_args()
    probes = QUICK_PROBES if args.quick else {}
    started = time.perf_counter()
    before = machine()
    with tempfile.TemporaryDirectory(prefix="demo-pass-") as tmp:
        root = Path(tmp)
        (root / "registry").mkdir()
        built = _child("work_populate", root / "registry", {"steps": 1 if args.quick else None})
        print(f"demo registry built in {built['seconds']:.0f} s", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
        for i in range(args.rounds):
            for side, check in (("without", False), ("with", True)):
                work = root / f"{side}-{i}"
                shutil.copytree(root / "registry", work)
                settings = {"functional_check": check, **probes}
                result = _child("work_pass", work, {"threads": args.threads, "settings": settings})
                runs[side].append(result)
                print(f"round {i + 1}, {side} the check: {result['seconds']:.1f} s", flush=True)
                shutil.rmtree(work, ignore_errors=True)
    rows = [
        [
            side,
            i + 1,
            r["seconds"],
            ", ".join(f"{k} {v}" for k, v in sorted(r["decided"].items())),
            ", ".join(r["signals_measured"]),
            "{:.1f} -> {:.1f}".format(*r["load_1min"]),
        ]
        for side, results in runs.items()
        for i, r in enumerate(results)
    ]
    print_table(
        "One daemon pass on the demo registry",
        ["functional check", "round", "pass s", "decided", "signals measured", "load (1 min)"],
        rows,
    )
    without = statistics.median(r["seconds"] for r in runs["without"])
    with_check = statistics.median(r["seconds"] for r in runs["with"])
    print(
        f"\nThe check adds {with_check - without:+.1f} s to the pass "
        f"({with_check:.1f} s against {without:.1f} s, x{with_check / without:.2f}; medians)"
    )
    write_json(
        args.out,
        {
            "command": "python bench/demo_pass.py " + " ".join(sys.argv[1:]),
            "quick": args.quick,
            "probes": probes or "defaults (64 of 32)",
            "build_seconds": built["seconds"],
            "runs": runs,
            "added_seconds": with_check - without,
            "machine": {"before": before, "after": machine()},
            "wall_seconds": time.perf_counter() - started,
        },
    )


if __name__ == "__main__":
    _worker() if "--worker" in sys.argv else main()
