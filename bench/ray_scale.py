"""Factorization of an SDXL-shaped base: one process against Ray, and how it divides on N workers.

    python bench/ray_scale.py [--quick] [--model sdxl] [--address ADDRESS] [--device cpu|cuda]

Base A of ``bench/shapes.py``'s model (SDXL UNet: 560 attention matrices, float16, sharded) gets
the factors the assessment reads (the leading ``similarity_rank`` triplets of every selected
matrix, randomized unless ``assessment_factors=exact``), into an empty factor cache, each path in
a fresh process:

- **local**: what ``MIGRATOR_EXECUTOR=local`` runs: ``OpenedBase.factors_at`` in the process,
  batched by shape, torch on every core (2 threads here);
- **ray**: what ``MIGRATOR_EXECUTOR=ray`` runs: ``migrator.executors.factor_plan.factor_groups`` cuts the
  base into tasks by shape group and ``factorize_on_ray`` runs them (1 CPU and 1 torch thread a
  task), on a local Ray with 2 CPUs (or the cluster at ``--address``). Timed apart: Ray's start,
  the workers' first import (a warm-up task per slot), planning the tasks (content digests of
  every tensor, read in the driver) and the fan-out itself.

The Ray run's task reports (seconds per task, on one thread) then give each shape's time per
module; an LPT schedule of the tasks ``split_modules`` would make for N workers gives the
makespan on N workers, and the same plan for a Llama-2-70B-shaped base (shapes only, times
scaled from the measured 1280 x 1280 module by m n min(m, n): an estimate) shows how a base that
takes hours on one worker divides. Both caches are compared (singular values of a sample) and
deleted afterwards. Results: ``bench/results/ray_scale.json`` (``--quick``: ``bench/.cache/``).
"""

from __future__ import annotations

import argparse
import heapq
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/ray_scale.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import measure, shapes

SCRIPT = Path(__file__).resolve()
WORK = shapes.CACHE / "ray-scale"  # this script's own models and caches (no shared writes)
WORKERS = (1, 2, 4, 8, 16, 32, 64)
REFERENCE_SHAPE = (1280, 1280)


def _settings(p: dict[str, Any]) -> Any:
    from migrator.settings import load_settings

    data = Path(p["data"])
    return load_settings(
        data_dir=data,
        cache_dir=Path(p["cache"]),
        tracking_uri=f"sqlite:///{data / 'mlflow.db'}",  # never opened: the tasks read files
        device=p["device"],
    )


def work_local(p: dict[str, Any]) -> dict[str, Any]:
    """Factorize every selected module of the base in this process (the local executor)."""
    import torch

    from migrator.bases import open_base

    torch.set_num_threads(p.get("threads") or os.cpu_count() or 1)
    base = open_base(Path(p["base"]), _settings(p), label=p["label"])
    load_before = measure.load_average()[0]
    with measure.Timer() as t:
        base.factors_at(base.assessment_rank)
    return {
        "load_1min": [load_before, measure.load_average()[0]],
        "seconds": t.seconds,
        "modules": len(base.selected),
        "computed": base.store.computed,
        "threads": torch.get_num_threads(),
    }


def _warm_up() -> int:
    """A task that imports what a factorization task imports (run once per slot)."""
    import migrator.executors.ray_tasks  # noqa: F401

    time.sleep(1.0)  # hold the slot so the next warm-up lands on another worker
    return os.getpid()


def work_ray(p: dict[str, Any]) -> dict[str, Any]:
    """Factorize the same modules as Ray tasks (the Ray executor's fan-out)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray: loopback only
    import ray

    from migrator.bases import open_base
    from migrator.executors.factor_plan import factor_groups
    from migrator.executors.ray_runtime import factorize_on_ray

    with measure.Timer() as start:
        if p["address"]:
            ray.init(address=p["address"])
        else:
            ray.init(num_cpus=p["cpus"], include_dashboard=False, log_to_driver=False)
    resources = ray.cluster_resources()
    slots = int(resources.get("GPU" if p["device"] == "cuda" else "CPU", 1))
    with measure.Timer() as warm:
        pids = ray.get([ray.remote(_warm_up).options(num_cpus=1).remote() for _ in range(slots)])
    settings = _settings(p)
    with measure.Timer() as plan:
        base = open_base(Path(p["base"]), settings, label=p["label"])
        groups = factor_groups(base, parallelism=slots)
    load_before = measure.load_average()[0]
    with measure.Timer() as fan:
        reports = factorize_on_ray(settings, groups)
    load_after = measure.load_average()[0]
    ray.shutdown()
    return {
        "load_1min": [load_before, load_after],
        "ray_start_s": start.seconds,
        "warm_up_s": warm.seconds,
        "workers_warmed": len(set(pids)),
        "plan_s": plan.seconds,
        "fan_out_s": fan.seconds,
        "slots": slots,
        "tasks": [
            {
                "shape": list(r.shape),
                "modules": r.modules,
                "computed": r.computed,
                "seconds": r.seconds,
                "threads": r.threads,
                "device": r.device,
                "host": r.host,
            }
            for r in reports
        ],
    }


# --- the division on N workers --------------------------------------------------------------


def lpt_makespan(durations: list[float], workers: int) -> float:
    """Makespan of tasks given largest first to the least loaded of ``workers`` (LPT)."""
    loads = [0.0] * workers
    heapq.heapify(loads)
    for d in sorted(durations, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + d)
    return max(loads)


def per_module_seconds(tasks: list[dict[str, Any]]) -> dict[tuple[int, int], float]:
    """Measured seconds per module of each shape (task time / modules, pooled per shape)."""
    seconds: dict[tuple[int, int], list[float]] = {}
    for task in tasks:
        entry = seconds.setdefault((task["shape"][0], task["shape"][1]), [0.0, 0.0])
        entry[0] += task["seconds"]
        entry[1] += task["modules"]
    return {shape: s / n for shape, (s, n) in seconds.items()}


def factor_bytes(shape: tuple[int, int]) -> int:
    """Bytes of one module's complete float32 factors in the cache: (m + n + 1) p 4."""
    m, n = shape
    return (m + n + 1) * min(m, n) * 4


def division(
    modules: list[tuple[str, tuple[int, int]]], seconds_of: Any, label: str
) -> list[dict[str, Any]]:
    """For each N: the tasks the Ray executor would make, their LPT makespan on N workers."""
    from migrator.executors.factor_plan import split_modules

    total = sum(seconds_of(shape) for _, shape in modules)
    written = sum(factor_bytes(shape) for _, shape in modules)
    rows = []
    for n in WORKERS:
        groups = split_modules(modules, label=label, path="-", parallelism=n)
        durations = [sum(seconds_of(g.shape) for _ in g.names) for g in groups]
        makespan = lpt_makespan(durations, n)
        rows.append(
            {
                "workers": n,
                "tasks": len(groups),
                "largest_task_s": max(durations),
                "makespan_s": makespan,
                "ideal_s": total / n,
                "efficiency": total / n / makespan,
                "speedup": total / makespan,
                "cache_written_gb_per_worker": written / n / 1e9,
            }
        )
    return rows


def llama70b_modules() -> list[tuple[str, tuple[int, int]]]:
    """Llama-2-70B's attention matrices: 80 layers, hidden 8192, 8 key/value heads of 128."""
    out = []
    for layer in range(80):
        for proj, shape in (("q", (8192, 8192)), ("k", (1024, 8192)), ("v", (1024, 8192))):
            out.append((f"model.layers.{layer}.self_attn.{proj}_proj", shape))
        out.append((f"model.layers.{layer}.self_attn.o_proj", (8192, 8192)))
    return out


# --- main ------------------------------------------------------------------------------------


def _same_factors(a: Path, b: Path, sample: int = 8) -> float:
    """Max relative difference of the singular values of ``sample`` entries in both caches."""
    from safetensors import safe_open

    worst = 0.0
    files = sorted(a.rglob("*.safetensors"))
    for file in files[:: max(1, len(files) // sample)]:
        other = b / file.relative_to(a)
        with safe_open(str(file), "pt") as fa, safe_open(str(other), "pt") as fb:
            sa, sb = fa.get_tensor("S"), fb.get_tensor("S")
            worst = max(worst, float(((sa - sb).abs().max() / sa.max()).item()))
    return worst


def _total(path: str, result: dict[str, Any]) -> float:
    """Factorization wall time of a run: the prefetch, or planning + fan-out on Ray."""
    if path != "ray":
        return float(result["seconds"])
    return float(result["plan_s"] + result["fan_out_s"])


def _load(result: dict[str, Any]) -> str:
    return "{:.1f} -> {:.1f}".format(*result["load_1min"])


def _cache_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a toy UNet (seconds)")
    parser.add_argument("--model", default=None, help="bench/shapes.py model (default sdxl)")
    parser.add_argument("--address", default="", help="Ray address (default: a local Ray)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--keep", action="store_true", help="keep the two factor caches")
    parser.add_argument("--rounds", type=int, default=None, help="local/ray pairs (default 2)")
    parser.add_argument("--cache", type=Path, default=WORK, help="models and factor caches")
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    args = parser.parse_args()
    name = args.model or ("tiny-unet" if args.quick else "sdxl")
    args.rounds = args.rounds or (1 if args.quick else 2)
    spec = shapes.model_spec(name)
    before = measure.machine()
    with measure.Timer() as gen:
        model = shapes.generate(spec, cache=args.cache)
    print(
        f"{name}: {len(spec.modules)} matrices, {spec.params / 1e6:.0f} M weights, "
        f"{model.file_bytes / 1e9:.2f} GB float16 ({gen.seconds:.0f} s to generate or find); "
        f"load {before['load_average']}",
        flush=True,
    )
    runs = args.cache / "runs"
    common = {"base": str(model.base_a), "label": f"{name}/A", "device": args.device}
    locals_: list[dict[str, Any]] = []
    singles: list[dict[str, Any]] = []
    rays: list[dict[str, Any]] = []
    same, cache_gb = 0.0, 0.0
    for round_ in range(args.rounds):
        shutil.rmtree(runs, ignore_errors=True)
        order = ("local", "local1", "ray")
        for path in order if round_ % 2 == 0 else reversed(order):  # the load drifts
            payload = {
                "task": "ray" if path == "ray" else "local",
                **common,
                "threads": 1 if path == "local1" else None,
                "data": str(runs / path),
                "cache": str(runs / f"cache-{path}"),
                "address": args.address,
                "cpus": args.cpus,
            }
            result = measure.run_worker(SCRIPT, payload)
            {"local": locals_, "local1": singles, "ray": rays}[path].append(result)
            print(
                f"round {round_ + 1} {path}: {_total(path, result):.1f} s "
                f"(load {result['load_1min']})",
                flush=True,
            )
        for path in ("local", "local1"):
            same = max(same, _same_factors(runs / f"cache-{path}", runs / "cache-ray"))
        cache_gb = _cache_bytes(runs / "cache-ray") / 1e9
    if not args.keep:
        shutil.rmtree(runs, ignore_errors=True)
    after = measure.machine()

    rows = []
    for i, (local, single, ray_run) in enumerate(zip(locals_, singles, rays, strict=True)):
        for run in (local, single):
            rows.append(
                [i + 1, f"local ({run['threads']} thr.)", 1, "-", "-", run["seconds"], _load(run)]
            )
        rows.append(
            [
                i + 1,
                f"ray ({ray_run['slots']} x 1 thread)",
                len(ray_run["tasks"]),
                ray_run["ray_start_s"] + ray_run["warm_up_s"],
                ray_run["plan_s"],
                _total("ray", ray_run),
                _load(ray_run),
            ]
        )
    header = ["round", "path", "tasks", "start s", "plan s", "factorize s", "load (1 min)"]
    measure.print_table(
        f"Factorization of {name} base A ({len(spec.modules)} matrices, empty cache)", header, rows
    )
    local_s = statistics.median(r["seconds"] for r in locals_)
    single_s = statistics.median(r["seconds"] for r in singles)
    ray_s = statistics.median(_total("ray", r) for r in rays)
    ray_run = min(rays, key=lambda r: _total("ray", r))
    tasks = ray_run["tasks"]
    print(
        f"median local {local_s:.1f} s ({locals_[0]['threads']} threads), local 1 thread "
        f"{single_s:.1f} s, ray {ray_s:.1f} s (plan + fan-out): local / ray "
        f"{local_s / ray_s:.2f}x, local 1 thread / ray {single_s / ray_s:.2f}x; Ray's start and the workers' first imports "
        f"({ray_run['ray_start_s'] + ray_run['warm_up_s']:.1f} s) are paid once per daemon; "
        f"factors written: {cache_gb:.2f} GB per run; singular values local vs ray differ by "
        f"{same:.1e} (relative) at most",
        flush=True,
    )

    per_module = per_module_seconds(tasks)
    task_rows = [
        [
            f"{m}x{n}",
            sum(t["modules"] for t in tasks if tuple(t["shape"]) == (m, n)),
            sum(1 for t in tasks if tuple(t["shape"]) == (m, n)),
            per_module[(m, n)],
            sum(t["seconds"] for t in tasks if tuple(t["shape"]) == (m, n)),
        ]
        for (m, n) in sorted(per_module, key=lambda s: -per_module[s])
    ]
    measure.print_table(
        "Ray tasks by shape (1 thread each)",
        ["shape", "modules", "tasks", "s / module", "task s (sum)"],
        task_rows,
    )

    def measured(shape: tuple[int, int]) -> float:
        return per_module[shape]

    sdxl_rows = division(list(spec.modules), measured, name)
    ref = per_module.get(REFERENCE_SHAPE) or max(per_module.values())
    ref_shape = (
        REFERENCE_SHAPE if REFERENCE_SHAPE in per_module else max(per_module, key=per_module.get)
    )
    ref_cost = ref_shape[0] * ref_shape[1] * min(ref_shape)

    def scaled(shape: tuple[int, int]) -> float:
        return ref * shape[0] * shape[1] * min(shape) / ref_cost

    llama_rows = division(llama70b_modules(), scaled, "llama-70b")
    div_header = [
        "workers",
        "tasks",
        "largest task s",
        "makespan s",
        "ideal s",
        "efficiency",
        "speedup",
        "cache GB / worker",
    ]
    for title, table in (
        (f"{name} on N workers (measured per-module times)", sdxl_rows),
        (
            "Llama-2-70B attention on N workers (estimated: scaled by m n p from "
            f"the measured {ref_shape[0]}x{ref_shape[1]} module)",
            llama_rows,
        ),
    ):
        measure.print_table(
            title,
            div_header,
            [
                [
                    r["workers"],
                    r["tasks"],
                    r["largest_task_s"],
                    r["makespan_s"],
                    r["ideal_s"],
                    r["efficiency"],
                    r["speedup"],
                    r["cache_written_gb_per_worker"],
                ]
                for r in table
            ],
        )

    out = args.out or (
        args.cache / "ray_scale_quick.json" if args.quick else measure.RESULTS / "ray_scale.json"
    )
    measure.write_json(
        out,
        {
            "model": name,
            "matrices": len(spec.modules),
            "weights_gb_fp16": model.file_bytes / 1e9,
            "factors_gb": cache_gb,
            "machine_before": before,
            "machine_after": after,
            "local_runs": locals_,
            "local_1_thread_runs": singles,
            "local_1_thread_median_s": single_s,
            "ray_runs": rays,
            "local_median_s": local_s,
            "ray_median_s": ray_s,
            "local_over_ray": local_s / ray_s,
            "singular_values_max_rel_diff": same,
            "seconds_per_module": {f"{m}x{n}": s for (m, n), s in per_module.items()},
            "division": sdxl_rows,
            "llama70b_division_estimated": llama_rows,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        measure.worker_main({"local": work_local, "ray": work_ray})
    else:
        main()
