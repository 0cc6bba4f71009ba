"""Shared plumbing of the benchmarks: worker subprocesses, peak memory, machine facts, tables.

Every measured configuration runs in a fresh Python process (``<script> --worker JSON``) so that
peak RSS (``VmHWM``) and allocator state of one configuration never leak into another. A worker
prints one JSON object as its last stdout line; wall times are measured inside the worker around
the work itself (interpreter start and imports excluded, the same for every path).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS",
    "Timer",
    "fmt",
    "load_average",
    "machine",
    "peak_rss_mb",
    "pick_device",
    "print_table",
    "rss_mb",
    "run_worker",
    "worker_main",
    "write_json",
]

RESULTS = Path(__file__).resolve().parent / "results"


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field in MiB (Linux); ru_maxrss as a fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (VmHWM), MiB."""
    return _status_mb("VmHWM")


def rss_mb() -> float:
    """Current resident set size (VmRSS), MiB."""
    return _status_mb("VmRSS")


class Timer:
    """``with Timer() as t: ...``; then ``t.seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()


def machine() -> dict[str, Any]:
    """CPU, cores, memory, library versions and the load average right now."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": [round(x, 2) for x in load_average()],
    }


def pick_device(requested: str) -> tuple[str, str | None]:
    """(device to use, note): ``cuda`` falls back to the CPU, saying so, when none is present."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        note = "no CUDA device found: running on CPU"
        print(f"NOTE: {note}", flush=True)
        return "cpu", note
    if requested == "auto":
        return ("cuda" if torch.cuda.is_available() else "cpu"), None
    return requested, None


def run_worker(
    script: Path,
    payload: dict[str, Any],
    *,
    threads: int | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run ``script --worker JSON`` in a fresh interpreter and return its JSON answer.

    Args:
        script: the benchmark script.
        payload: the worker's task (``payload["task"]``) and arguments.
        threads: CPU threads of the worker (OpenMP / MKL / torch); None keeps torch's default
            (one per core).
        timeout: seconds before the worker is killed.

    Raises:
        RuntimeError: the worker failed (its stderr tail is in the message).
    """
    cmd = [sys.executable, str(script), "--worker", json.dumps(payload)]
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"worker {payload.get('task')} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


def worker_main(tasks: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    """Entry point of a worker process: run ``tasks[payload['task']]`` and print its answer
    with the process's peak RSS added."""
    payload = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    out = tasks[payload["task"]](payload)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["threads"] = _torch_threads()
    print(json.dumps(out), flush=True)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_header(
    script: str, *, quick: bool, requested: str, device: str, note: str | None, threads: int | None
) -> dict[str, Any]:
    """The fields every results document starts with: what ran, when, where and how."""
    machine_info = machine()
    return {
        "script": script,
        "command": " ".join(["python", script, *sys.argv[1:]]),
        "quick": quick,
        "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info,
        "device": {"requested": requested, "used": device, "note": note},
        "threads": threads or machine_info["torch_threads"],
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


def finish(path: Path, data: dict[str, Any], print_tables: Callable[[dict[str, Any]], None]) -> int:
    """Write a benchmark's results, print its tables and say where they went; exit status 0."""
    write_json(path, data)
    print_tables(data)
    print(f"results: {path}")
    return 0


def fmt(value: object, digits: int = 2) -> str:
    """A table cell: floats rounded, None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10 ** (-digits) or abs(value) >= 1e6):
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Print (and return) a Markdown table."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    text = f"\n{title}\n\n" + "\n".join(lines) + "\n"
    print(text, flush=True)
    return text
