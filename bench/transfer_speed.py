"""Transfer throughput: our path against the paper's Algorithm 1, side by side.

    python bench/transfer_speed.py [--quick] [--device cpu|cuda] [--threads 1]
        [--models sd15,llama,sdxl] [--counts 1,4,16,64] [--new-base 4]
        [--sizes grid-b8-w1280,...] [--show]

For each model (``bench/shapes.py``) and N adapters (LoRA-X, ranks 8/16/32/64 in turn, PEFT
folders) from base A to its successor B, in project mode at full thin rank (the paper's
Algorithm 1), each configuration in a fresh process:

- **ours, cold**: what the product runs, with an empty factor cache: ``WeightSource`` on B's
  safetensors, ``FactorStore`` + ``FactorCache`` (each target matrix the transfers need
  factorized once, in shape batches, cached on disk), then per adapter ``read_adapter`` +
  ``resolve_modules``, ``core.transfer.transfer_adapter`` and ``write_adapter``. At full rank a
  square module is carried unchanged (its projectors are the identity), so only the rectangular
  matrices are factorized;
- **ours, cold + full factorization**: the same after ``FactorStore.prefetch()`` of B (every
  matrix factorized, as ``migrator.bases.compare_bases`` does before any transfer of a new base):
  the cost of a base's first transfers in the service;
- **ours, warm**: the cold path in a new process whose factor cache the cold run filled;
- **Algorithm 1**: ``tests/core/reference_algorithm1.py`` (the literal transcription that the
  tests use as their reference): B's tensors loaded into a dict (float32, as
  ``torch.linalg.svd`` needs), then per adapter its safetensors file loaded, Algorithm 1 (a full
  SVD of every target matrix, ``u @ u.T @ up``, ``down @ vh.T @ vh``) and the result saved.

Timed: everything from opening the files to writing the outputs (interpreter start and imports
excluded for all three). Peak RSS is the worker's VmHWM. The outputs are compared module by
module: max ||ours - Algorithm 1||_F / ||Algorithm 1||_F over ups and downs. Where Algorithm 1
would take too long it runs for fewer adapters; larger N then shows an *estimate* (load time +
N x its measured per-adapter time), marked ``*`` and ``alg1_estimated`` in the JSON, never used
for an acceptance target.

A second table ("new base", ``bench/new_base.py``) is a new base's first pass: the assessment
of its predecessor and it (ATC at k = 32) plus N = 4 transfers, today's path (a full SVD of both
bases) against ours (randomized assessment factors, then QR range bases in project mode or the
exact leading triplets in subspace mode), with the cache each writes for the new base and the
outputs against Algorithm 1 / an exact reference.

A third table ("sizes") runs one rank-8 adapter on generic models of growing module count and
width: peak memory of a transfer, and of a new base's first pass, against the model's size and
its largest module.
Results: ``bench/results/transfer_speed.json`` (``--quick``: ``bench/.cache/``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/transfer_speed.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from safetensors.torch import load_file, save_file

from bench import measure, shapes
from bench.new_base import compare_outputs, print_new_base, run_new_base, work_new_base
from core.formats import read_adapter, resolve_modules, write_adapter
from tests.core.reference_algorithm1 import algorithm1

SCRIPT = Path(__file__).resolve()
RANKS = (8, 16, 32, 64)
LABELS = ("service", "cold", "warm")
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class Plan:
    """Adapter counts to run for one model, and the largest N Algorithm 1 runs for."""

    counts: tuple[int, ...]
    alg1_max: int


PLANS = {
    "sd15": Plan((1, 4, 16, 64), 16),
    "llama": Plan((1, 4, 16, 64), 4),
    "sdxl": Plan((1, 4), 1),
    "tiny-unet": Plan((1, 2), 1),  # N = 2 exercises the estimate path
    "tiny-llama": Plan((1, 2), 1),
}
FULL_MODELS = ("sd15", "llama", "sdxl")
QUICK_MODELS = ("tiny-unet",)
FULL_SIZES = ("grid-b2-w1280", "grid-b8-w1280", "grid-b32-w1280", "grid-b8-w640", "grid-b8-w2048")
QUICK_SIZES = ("grid-b1-w48", "grid-b4-w96")
NEW_BASE_N = 4  # adapters of a new base's first pass
QUICK_NEW_BASE_N = 2


# --- workers (fresh processes) ----------------------------------------------------------------


def _warm_up(device: str) -> None:
    """Load the LAPACK/BLAS kernels before the clock starts (the first SVD of a process pays
    about a second of library loading, the same for every path)."""
    x = torch.randn(8, 8, device=device)
    torch.linalg.svd(x, full_matrices=False)
    _ = x @ x


def work_ours(p: dict[str, Any]) -> dict[str, Any]:
    """The product's path for N adapters; see the module docstring."""
    # Imported here: core.transfer pulls in POT (about 1.7 s), which no other task needs.
    from core.factor_cache import FactorCache
    from core.factorize import FactorStore
    from core.transfer import transfer_adapter
    from core.weights import WeightSource

    device, _ = measure.pick_device(p["device"])
    _warm_up(device)
    base_rss = measure.rss_mb()
    out = Path(p["out"])
    per_adapter = []
    started = time.perf_counter()
    source = WeightSource.open(p["source"])
    target = WeightSource.open(p["target"])
    cache = FactorCache(p["factor_cache"])
    source_store = FactorStore(source, cache=cache, device=device)
    target_store = FactorStore(target, cache=cache, device=device)
    shapes_a = {info.name: info.shape for info in source.modules()}
    if p.get("prefetch"):
        target_store.prefetch()
    for i, path in enumerate(p["adapters"]):
        t = time.perf_counter()
        adapter, _ = resolve_modules(read_adapter(path), shapes_a, strict=True)
        result = transfer_adapter(adapter, source_store, target_store, mode="project")
        write_adapter(result.adapter, out / f"{i:03d}")
        per_adapter.append(time.perf_counter() - t)
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "per_adapter_s": per_adapter,
        "base_rss_mb": round(base_rss, 1),
        "factorized": target_store.computed + source_store.computed,
        "cache_hits": cache.stats.hits,
        "cache_misses": cache.stats.misses,
        "device": device,
    }


def work_alg1(p: dict[str, Any]) -> dict[str, Any]:
    """Algorithm 1 for N adapters; see the module docstring."""
    device, _ = measure.pick_device(p["device"])
    _warm_up(device)
    base_rss = measure.rss_mb()
    out = Path(p["out"])
    out.mkdir(parents=True, exist_ok=True)
    per_adapter = []
    started = time.perf_counter()
    tar_model_tensors: dict[str, torch.Tensor] = {}
    for file in p["target_files"]:
        for key, tensor in load_file(file).items():
            tar_model_tensors[key] = tensor.to(device=device, dtype=torch.float32)
    load_s = time.perf_counter() - started
    for i, path in enumerate(p["adapters"]):
        t = time.perf_counter()
        raw = load_file(Path(path) / PEFT_WEIGHTS)
        ref_lora = {}
        for model_key in tar_model_tensors:  # the adapter's keys in the model's order (zip)
            name = model_key.removesuffix(".weight")
            for peft, kohya in (("lora_B", "lora.up"), ("lora_A", "lora.down")):
                tensor = raw[f"{PEFT_PREFIX}{name}.{peft}.weight"]
                ref_lora[f"{name}.{kohya}.weight"] = tensor.to(device=device, dtype=torch.float32)
        tar_lora = algorithm1(ref_lora, tar_model_tensors)
        save_file(
            {k: v.cpu().contiguous() for k, v in tar_lora.items()},
            str(out / f"{i:03d}.safetensors"),
        )
        per_adapter.append(time.perf_counter() - t)
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "load_s": load_s,
        "per_adapter_s": per_adapter,
        "base_rss_mb": round(base_rss, 1),
        "device": device,
    }


# --- comparison -------------------------------------------------------------------------------


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def max_relative_difference(ours: Path, alg1: Path, count: int) -> dict[str, Any]:
    """Max relative Frobenius difference of ups and downs, ours vs Algorithm 1, over the first
    ``count`` adapters."""
    worst_up = worst_down = 0.0
    modules = 0
    for i in range(count):
        adapter = read_adapter(ours / f"{i:03d}")
        reference = load_file(alg1 / f"{i:03d}.safetensors")
        for name, module in adapter.modules.items():
            if module.scale != 1.0:
                raise AssertionError(f"{name}: scale {module.scale}, expected 1 (expanded LoRA-X)")
            worst_up = max(worst_up, _relative(module.up, reference[f"{name}.lora.up.weight"]))
            worst_down = max(
                worst_down, _relative(module.down, reference[f"{name}.lora.down.weight"])
            )
            modules += 1
    return {
        "max_rel_diff": max(worst_up, worst_down),
        "max_rel_diff_up": worst_up,
        "max_rel_diff_down": worst_down,
        "adapters_compared": count,
        "modules_compared": modules,
    }


# --- orchestration ----------------------------------------------------------------------------


def _warm_page_cache(files: list[Path]) -> None:
    """Read files once so every configuration finds them in the OS page cache."""
    for file in files:
        with file.open("rb") as fh:
            while fh.read(1 << 24):
                pass


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    per = r["per_adapter_s"]
    return {
        **{k: v for k, v in r.items() if k != "per_adapter_s"},
        "wall_s": round(r["wall_s"], 3),
        "first_adapter_s": round(per[0], 3),
        "median_adapter_s": round(statistics.median(per), 4),
        "per_adapter_s": [round(x, 4) for x in per],
    }


def _files(model: shapes.GeneratedModel, adapters: list[Path]) -> list[Path]:
    return model.weight_files("A") + model.weight_files("B") + [a / PEFT_WEIGHTS for a in adapters]


def _run_count(
    n: int,
    plan: Plan,
    adapters: list[Path],
    alg1_runs: dict[int, dict[str, Any]],
    base: dict[str, Any],
    work: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One row of the main table: N adapters, Algorithm 1 (or its estimate) and our three
    configurations."""
    alg1_out, factors = work / "alg1", work / "factors"
    target_files = base.pop("target_files")
    chosen = [str(a) for a in adapters[:n]]
    row: dict[str, Any] = {"adapters": n, "ranks": [RANKS[i % len(RANKS)] for i in range(n)]}
    if n <= plan.alg1_max:
        print(f"   N={n}: Algorithm 1 ...", flush=True)
        payload = {"task": "alg1", "adapters": chosen, "out": str(alg1_out), **base}
        payload["target_files"] = target_files
        alg1_runs[n] = _summary(measure.run_worker(SCRIPT, threads=args.threads, payload=payload))
        row["alg1"] = alg1_runs[n]
        row["alg1_estimated"] = False
    else:
        ref = alg1_runs[max(alg1_runs)]
        estimate = ref["load_s"] + n * ref["median_adapter_s"]
        row["alg1"] = {"wall_s": round(estimate, 3), "from_measured_n": max(alg1_runs)}
        row["alg1_estimated"] = True
    for label in ("service", "cold", "warm"):
        if label != "warm":
            shutil.rmtree(factors, ignore_errors=True)
        print(f"   N={n}: ours ({label}) ...", flush=True)
        out = work / f"ours-{label}"
        payload = {"task": "ours", "adapters": chosen, "out": str(out), **base}
        payload["factor_cache"] = str(factors)
        payload["prefetch"] = label == "service"
        row[f"ours_{label}"] = _summary(
            measure.run_worker(SCRIPT, threads=args.threads, payload=payload)
        )
        compared = min(n, max(alg1_runs))
        row[f"diff_{label}"] = max_relative_difference(out, alg1_out, compared)
    alg1_wall = row["alg1"]["wall_s"]
    row["speedup_service"] = alg1_wall / row["ours_service"]["wall_s"]
    row["speedup_cold"] = alg1_wall / row["ours_cold"]["wall_s"]
    row["speedup_warm"] = alg1_wall / row["ours_warm"]["wall_s"]
    row["max_rel_diff"] = max(row[f"diff_{x}"]["max_rel_diff"] for x in LABELS)
    print(
        f"   N={n}: Alg1 {alg1_wall:.1f}s{'*' if row['alg1_estimated'] else ''}, "
        f"cold+factorize {row['ours_service']['wall_s']:.1f}s, "
        f"cold {row['ours_cold']['wall_s']:.1f}s, warm {row['ours_warm']['wall_s']:.1f}s, "
        f"x{row['speedup_service']:.1f} / x{row['speedup_cold']:.1f} / "
        f"x{row['speedup_warm']:.1f}, "
        f"diff {row['max_rel_diff']:.1e}",
        flush=True,
    )
    return row


def run_model(name: str, plan: Plan, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """All configurations of one model."""
    spec = shapes.model_spec(name)
    print(f"== {name}: {spec.description}; {len(spec.modules)} matrices", flush=True)
    model = shapes.generate(spec, cache=args.cache)
    wanted = max((*plan.counts, plan.alg1_max, args.new_base))
    adapters = shapes.adapter_paths(model, wanted, RANKS)
    _warm_page_cache(_files(model, adapters))
    work = scratch / name
    alg1_out = work / "alg1"
    base = {"source": str(model.base_a), "target": str(model.base_b), "device": args.device}
    rows = []
    alg1_runs: dict[int, dict[str, Any]] = {}
    load_start = measure.load_average()
    if not any(n <= plan.alg1_max for n in plan.counts):  # measure once, for the estimates
        print(f"   N={plan.alg1_max}: Algorithm 1 ...", flush=True)
        chosen = [str(a) for a in adapters[: plan.alg1_max]]
        payload = {"task": "alg1", "adapters": chosen, "out": str(alg1_out), **base}
        payload["target_files"] = [str(f) for f in model.weight_files("B")]
        alg1_runs[plan.alg1_max] = _summary(
            measure.run_worker(SCRIPT, threads=args.threads, payload=payload)
        )
    target_files = [str(f) for f in model.weight_files("B")]
    for n in plan.counts:
        row_base = base | {"target_files": target_files}
        rows.append(_run_count(n, plan, adapters, alg1_runs, row_base, work, args))
    section: dict[str, Any] = {}
    if args.new_base:
        count = min(args.new_base, max(alg1_runs))
        section["new_base"] = run_new_base(
            model, adapters[: args.new_base], alg1_out, count, args, SCRIPT, work
        )
    shutil.rmtree(work, ignore_errors=True)
    return {
        "description": spec.description,
        "matrices": len(spec.modules),
        "params": spec.params,
        "largest": list(spec.largest),
        "base_file_mb": round(model.file_bytes / 2**20, 1),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in measure.load_average()],
        "alg1_runs": {str(n): r for n, r in alg1_runs.items()},
        "rows": rows,
        **section,
    }


def _size_row(name: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """One size-table row: Alg1, ours with every target matrix factorized, and the new-base
    path (randomized assessment of both bases, then the transfer)."""
    spec = shapes.model_spec(name)
    print(f"== sizes: {name}", flush=True)
    model = shapes.generate(spec, cache=args.cache)
    adapters = shapes.adapter_paths(model, 1, (8,))
    _warm_page_cache(_files(model, adapters))
    work = scratch / name
    base = {"source": str(model.base_a), "target": str(model.base_b), "device": args.device}
    base["adapters"] = [str(adapters[0])]
    ours = measure.run_worker(
        SCRIPT,
        threads=args.threads,
        payload={"task": "ours", "out": str(work / "ours"), **base}
        | {"factor_cache": str(work / "factors"), "prefetch": True},
    )
    alg1 = measure.run_worker(
        SCRIPT,
        threads=args.threads,
        payload={"task": "alg1", "out": str(work / "alg1"), **base}
        | {"target_files": [str(f) for f in model.weight_files("B")]},
    )
    caches = {f"cache_{side}": str(work / f"nb-{side}") for side in ("source", "target")}
    fresh = measure.run_worker(
        SCRIPT,
        threads=args.threads,
        payload={"task": "newbase", "path": "ours", "mode": "project", **base, **caches}
        | {"out": str(work / "new-base")},
    )
    diff = max_relative_difference(work / "ours", work / "alg1", 1)
    new_diff = compare_outputs(work / "new-base", work / "alg1", 1, alg1=True)
    m, n = spec.largest
    shutil.rmtree(work, ignore_errors=True)
    return {
        "model": name,
        "matrices": len(spec.modules),
        "largest": [m, n],
        "model_fp32_mb": round(4 * spec.params / 2**20, 1),
        "largest_fp32_mb": round(4 * m * n / 2**20, 1),
        "ours": _summary(ours),
        "alg1": _summary(alg1),
        "new_base": fresh,
        "max_rel_diff": max(diff["max_rel_diff"], new_diff["max_rel_diff"]),
        "load_average": [round(x, 2) for x in measure.load_average()],
    }


def run_sizes(names: tuple[str, ...], args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """One rank-8 adapter on models of growing size: time and peak RSS of Alg1, of ours with
    every target matrix factorized (the old first transfer of a base in the service), and of
    the new-base path (randomized assessment of both bases plus the transfer)."""
    return {"rank": 8, "rows": [_size_row(name, args, scratch) for name in names]}


def print_tables(result: dict[str, Any]) -> None:
    """The Markdown tables of a result document."""
    rows = []
    for name, model in result.get("models", {}).items():
        for r in model["rows"]:
            star = "*" if r["alg1_estimated"] else ""
            alg1 = r["alg1"]
            rows.append(
                [
                    name,
                    r["adapters"],
                    f"{alg1['wall_s']:.1f}{star}",
                    r["ours_service"]["wall_s"],
                    r["ours_cold"]["wall_s"],
                    r["ours_warm"]["wall_s"],
                    f"{r['speedup_service']:.1f}{star}",
                    f"{r['speedup_cold']:.1f}{star}",
                    f"{r['speedup_warm']:.1f}{star}",
                    "-" if r["alg1_estimated"] else round(alg1["peak_rss_mb"]),
                    round(r["ours_service"]["peak_rss_mb"]),
                    round(r["ours_cold"]["peak_rss_mb"]),
                    round(r["ours_warm"]["peak_rss_mb"]),
                    f"{r['max_rel_diff']:.1e}",
                ]
            )
    if rows:
        measure.print_table(
            "Transfer, project mode at full rank (* = Algorithm 1 estimated from its measured "
            "per-adapter time, not measured)",
            ["model", "N", "Alg1 s", "cold+fact. s", "cold s", "warm s", "x cold+fact.",
             "x cold", "x warm", "Alg1 MB", "cold+fact. MB", "cold MB", "warm MB",
             "max rel diff"],
            rows,
        )  # fmt: skip
    print_new_base(result.get("models", {}))
    sizes = result.get("sizes", {}).get("rows", [])
    if sizes:
        measure.print_table(
            "Peak memory of one transfer (rank 8, cold cache) against model size: every matrix "
            "factorized (ours), and a new base's first pass (randomized assessment of both bases "
            "+ the transfer)",
            ["model", "matrices", "largest", "model fp32 MB", "largest fp32 MB", "ours s",
             "ours MB", "new base s", "new base MB", "Alg1 s", "Alg1 MB", "max rel diff"],
            [
                [
                    r["model"], r["matrices"], "x".join(map(str, r["largest"])),
                    r["model_fp32_mb"], r["largest_fp32_mb"], r["ours"]["wall_s"],
                    round(r["ours"]["peak_rss_mb"]),
                    r.get("new_base", {}).get("wall_s"),
                    round(r["new_base"]["peak_rss_mb"]) if "new_base" in r else None,
                    r["alg1"]["wall_s"], round(r["alg1"]["peak_rss_mb"]),
                    f"{r['max_rel_diff']:.1e}",
                ]
                for r in sizes
            ],
        )  # fmt: skip


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, seconds (for tests)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--models", help=f"comma-separated (default {','.join(FULL_MODELS)})")
    parser.add_argument(
        "--counts", help="comma-separated adapter counts (default per model; '' for none)"
    )
    parser.add_argument("--alg1-max", type=int, help="largest N Algorithm 1 runs for")
    parser.add_argument(
        "--new-base",
        type=int,
        help=f"adapters of the new-base rows (default {NEW_BASE_N}, quick {QUICK_NEW_BASE_N}; "
        "0 skips them)",
    )
    parser.add_argument("--sizes", help="comma-separated size-table models ('' to skip)")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads per worker (default 1; 0: torch's)"
    )
    parser.add_argument("--cache", type=Path, default=shapes.CACHE, help="generated data")
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--show", action="store_true", help="print the tables of --out and exit")
    args = parser.parse_args(argv)
    if args.threads == 0:
        args.threads = None
    if args.new_base is None:
        args.new_base = QUICK_NEW_BASE_N if args.quick else NEW_BASE_N
    return args


def _plan(name: str, args: argparse.Namespace) -> Plan:
    plan = PLANS.get(name, Plan((1, 4, 16, 64), 16))
    if args.counts is not None:
        plan = Plan(tuple(int(c) for c in args.counts.split(",") if c), plan.alg1_max)
    if args.alg1_max is not None:
        plan = Plan(plan.counts, args.alg1_max)
    return Plan(plan.counts, max(1, min(plan.alg1_max, max(plan.counts, default=plan.alg1_max))))


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the configurations, print the tables, write the JSON."""
    args = _parse(argv)
    device, note = measure.pick_device(args.device)
    models = (
        tuple(args.models.split(","))
        if args.models
        else QUICK_MODELS
        if args.quick
        else FULL_MODELS
    )
    if args.sizes is not None:
        sizes = tuple(s for s in args.sizes.split(",") if s)
    else:
        sizes = QUICK_SIZES if args.quick else FULL_SIZES
    out = args.out or (
        args.cache / "transfer_speed.quick.json"
        if args.quick
        else measure.RESULTS / "transfer_speed.json"
    )
    if args.show:
        print_tables(json.loads(out.read_text()))
        return 0
    result: dict[str, Any] = {}
    if out.is_file() and not args.quick:  # a partial run updates its own sections only
        result = json.loads(out.read_text())
    result.update(
        measure.run_header(
            "bench/transfer_speed.py",
            quick=args.quick,
            requested=args.device,
            device=device,
            note=note,
            threads=args.threads,
        )
    )
    scratch = args.cache / "runs" / f"transfer-{time.strftime('%H%M%S')}"
    try:
        result.setdefault("models", {})
        for name in models:
            result["models"][name] = run_model(name, _plan(name, args), args, scratch)
            result["models"][name]["command"] = result["command"]  # sections of partial runs
            measure.write_json(out, result)
        if sizes:
            result["sizes"] = run_sizes(sizes, args, scratch) | {"command": result["command"]}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return measure.finish(out, result, print_tables)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        measure.worker_main({"ours": work_ours, "alg1": work_alg1, "newbase": work_new_base})
    else:
        sys.exit(main())
