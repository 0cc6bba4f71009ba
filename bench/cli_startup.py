"""How long ``migrator`` takes to answer: ``--help``, a bad-input error and ``jobs list``, this
tree against a baseline (by default the ``main`` branch, exported with ``git archive``) in the
same run, the two alternating so that a machine's drift touches both alike.

Each command runs as a whole process (``python -m migrator ...``) with the same interpreter;
reported: the median wall time and CPU time (user + system, from the kernel's accounting of
the finished child), their ratio (this tree / baseline, pair by pair), and which heavy
libraries the command imported (torch, POT, mlflow, transformers, sqlalchemy).

    python bench/cli_startup.py                  # 10 runs of each, baseline main
    python bench/cli_startup.py --quick          # 3 runs (what the test suite runs)
    python bench/cli_startup.py --baseline HEAD~5
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import RESULTS, load_average, print_table, write_json

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ot", "mlflow", "transformers", "sqlalchemy")


def _export(ref: str, dest: Path) -> Path:
    """The tree of git ``ref`` of this repository, unpacked into ``dest``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _commands(work: Path) -> dict[str, list[str]]:
    missing = str(work / "nonexistent")
    return {
        "--help": ["--help"],
        "bad input (transfer /nonexistent)": [
            "transfer",
            missing,
            "--from",
            missing,
            "--to",
            missing,
            "-o",
            str(work / "out"),
        ],
        "jobs list": ["jobs", "list"],
    }


def _env(tree: Path, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")}
    env.update(
        PYTHONPATH=str(tree),
        MIGRATOR_DATA_DIR=str(work / "data"),
        MIGRATOR_DATABASE_URL=f"sqlite:///{work / 'jobs.db'}",
        MLFLOW_DISABLE_TELEMETRY="true",
        COLUMNS="80",
    )
    return env


def _run_once(args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, int]:
    """(wall s, child CPU s, exit code) of one ``python -m migrator ARGS``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "migrator", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.returncode


def _heavy(args: list[str], env: dict[str, str], cwd: Path) -> list[str]:
    """The heavy top-level packages a command imports (``-X importtime``)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "migrator", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    names = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    return [h for h in HEAVY if h in names]


def _prepare(tree: Path, work: Path) -> None:
    """A job database at ``tree``'s head for ``jobs list`` (made by its own ``db upgrade``)."""
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "migrator", "db", "upgrade"],
        env=_env(tree, work),
        cwd=work,
        check=True,
        capture_output=True,
    )


def measure(baseline_ref: str, runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        trees = {"baseline": _export(baseline_ref, tmp_path / "baseline"), "this tree": ROOT}
        works = {k: tmp_path / f"work-{i}" for i, k in enumerate(trees)}
        for key, tree in trees.items():
            _prepare(tree, works[key])
        rows = []
        for label, args in _commands(tmp_path).items():
            samples: dict[str, list[tuple[float, float, int]]] = {k: [] for k in trees}
            for key, tree in trees.items():  # warm-up (file cache, .pyc)
                _run_once(args, _env(tree, works[key]), works[key])
            for _ in range(runs):
                for key, tree in trees.items():
                    samples[key].append(_run_once(args, _env(tree, works[key]), works[key]))
            heavy = {k: _heavy(args, _env(t, works[k]), works[k]) for k, t in trees.items()}
            ratios = [
                new[0] / old[0]
                for old, new in zip(samples["baseline"], samples["this tree"], strict=True)
            ]
            rows.append(
                {
                    "command": label,
                    **{
                        f"{k} {what}": statistics.median(s[i] for s in samples[k])
                        for k in trees
                        for i, what in ((0, "wall s"), (1, "cpu s"))
                    },
                    "wall ratio": statistics.median(ratios),
                    "exit codes": {k: sorted({s[2] for s in samples[k]}) for k in trees},
                    "heavy imports": heavy,
                }
            )
    return {"baseline": baseline_ref, "runs": runs, "load_average": load_average(), "rows": rows}


def print_tables(doc: dict[str, Any]) -> None:
    print_table(
        f"migrator start-up, median of {doc['runs']} runs (baseline {doc['baseline']}; "
        f"load {doc['load_average'][0]:.1f})",
        [
            "command",
            "baseline wall s",
            "this wall s",
            "ratio",
            "baseline cpu s",
            "this cpu s",
            "baseline imports",
            "this imports",
        ],
        [
            [
                r["command"],
                r["baseline wall s"],
                r["this tree wall s"],
                r["wall ratio"],
                r["baseline cpu s"],
                r["this tree cpu s"],
                ",".join(r["heavy imports"]["baseline"]) or "-",
                ",".join(r["heavy imports"]["this tree"]) or "-",
            ]
            for r in doc["rows"]
        ],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="main", help="git ref to compare with")
    parser.add_argument("--runs", type=int, default=10, help="runs of each command and tree")
    parser.add_argument("--quick", action="store_true", help="3 runs (the test suite's mode)")
    parser.add_argument("--out", type=Path, default=RESULTS / "cli_startup.json")
    args = parser.parse_args()
    doc = measure(args.baseline, 3 if args.quick else args.runs)
    write_json(args.out, doc)
    print_tables(doc)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
