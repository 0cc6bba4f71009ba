"""ATC at SDXL scale: exact full SVD against the truncated (randomized top-k) path.

    python bench/atc_scale.py [--quick] [--device cpu|cuda] [--threads N] [--k 32]
        [--pair sdxl] [--sizes grid-b8-w1280,...] [--show]

Both bases of a pair (``bench/shapes.py``: base A and its successor B) are factorized from their
safetensors files with an empty factor cache, then ``core.atc.compute_atc`` and
``core.matching.match_modules`` run on the leading k triplets. Each path runs in a fresh process:

- **exact**: what ``migrator.bases.compare_bases`` does: ``FactorStore.prefetch()`` (full thin SVD
  of every matrix, batched by shape, cached on disk for later transfers), then the similarities
  on a rank-k view;
- **truncated**: ``FactorStore.prefetch(rank=k, exact=False)`` (the randomized block Krylov
  SVD of ``core.svd`` with the store's defaults: blocks of k columns, depth 6), then the same.

Reported: wall time (by phase), peak RSS (VmHWM), the factor cache written, and the error of the
truncated similarities against the exact ones over every valid module pair (left and right
Psi_k, the same-name pairs, the ATC values and the matching decisions). A table over sizes
(generic models of growing module count and width) shows how time and memory grow.
Results: ``bench/results/atc_scale.json`` (``--quick``: ``bench/.cache/``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/atc_scale.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from bench import measure, shapes
from core.atc import compute_atc
from core.factor_cache import FactorCache
from core.factorize import FactorStore, factorize
from core.matching import match_modules
from core.similarity import subspace_similarity
from core.weights import WeightSource

SCRIPT = Path(__file__).resolve()
MIN_SIMILARITY = 0.5  # the settings' default module_min_similarity
FULL_PAIR = "sdxl"
QUICK_PAIR = "tiny-unet"
FULL_SIZES = ("grid-b2-w1280", "grid-b8-w1280", "grid-b32-w1280", "grid-b8-w640", "grid-b8-w2048")
QUICK_SIZES = ("grid-b1-w48", "grid-b4-w96")


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def work_atc(p: dict[str, Any]) -> dict[str, Any]:
    """One ATC of base A -> base B on the exact or the truncated path (see the module doc)."""
    device, _ = measure.pick_device(p["device"])
    torch.linalg.svd(torch.randn(8, 8, device=device), full_matrices=False)  # load LAPACK first
    base_rss = measure.rss_mb()
    k, exact = int(p["k"]), p["method"] == "exact"
    cache = FactorCache(p["factor_cache"])
    phases = {}
    started = time.perf_counter()
    stores = []
    for side in ("source", "target"):
        t = time.perf_counter()
        store = FactorStore(WeightSource.open(p[side]), cache=cache, device=device)
        if exact:
            store.prefetch()
        else:
            store.prefetch(rank=k, exact=False)
        stores.append(store)
        phases[f"factorize_{side}_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    atc = compute_atc(stores[0].view(rank=k, exact=exact), stores[1].view(rank=k, exact=exact), k=k)
    decisions = match_modules(atc, min_similarity=MIN_SIMILARITY)
    phases["atc_s"] = round(time.perf_counter() - t, 3)
    wall = time.perf_counter() - started
    if p.get("save"):
        np.savez(
            p["save"],
            phi_left=atc.phi_left,
            phi_right=atc.phi_right,
            valid_left=atc.valid_left,
            valid_right=atc.valid_right,
            decisions=np.array([f"{d.decision.value}:{d.source}" for d in decisions]),
        )
    return {
        "wall_s": round(wall, 3),
        **phases,
        "base_rss_mb": round(base_rss, 1),
        "atc": atc.atc,
        "atc_left": atc.atc_left,
        "atc_right": atc.atc_right,
        "modules": [len(atc.source_names), len(atc.target_names)],
        "factorized": sum(s.computed for s in stores),
        "cache_written_mb": round(_folder_bytes(Path(p["factor_cache"])) / 2**20, 1),
        "device": device,
    }


def work_recovery(p: dict[str, Any]) -> dict[str, Any]:
    """How well the truncated path recovers each sampled module's own top-k subspaces:
    Psi_k(U_trunc, U_exact) and Psi_k(V_trunc, V_exact) (1 = the same subspace)."""
    device, _ = measure.pick_device(p["device"])
    k, source = int(p["k"]), WeightSource.open(p["source"])
    names = list(source.names)
    step = max(1, len(names) // int(p["sample"]))
    rows = []
    for name in names[::step][: int(p["sample"])]:
        w = source.matrix(name)
        exact = factorize(w, device=device)
        trunc = factorize(w, rank=k, method="randomized", device=device)  # store defaults
        kk = min(k, exact.rank)
        rows.append(
            {
                "module": name,
                "shape": list(w.shape),
                "psi_left": subspace_similarity(trunc.U, exact.U, kk),
                "psi_right": subspace_similarity(trunc.V, exact.V, kk),
            }
        )
    worst = min(min(r["psi_left"], r["psi_right"]) for r in rows)
    return {"modules": rows, "min_psi": worst, "max_recovery_err": 1.0 - worst}


def compare(exact: Path, truncated: Path) -> dict[str, Any]:
    """Errors of the truncated similarities against the exact ones, over every valid pair."""
    a, b = np.load(exact), np.load(truncated)
    out: dict[str, Any] = {}
    worst = 0.0
    for side in ("left", "right"):
        valid = a[f"valid_{side}"]
        diff = np.abs(a[f"phi_{side}"] - b[f"phi_{side}"])[valid]
        same = np.abs(np.diagonal(a[f"phi_{side}"]) - np.diagonal(b[f"phi_{side}"]))
        out[f"pairs_{side}"] = int(valid.sum())
        out[f"max_abs_err_{side}"] = float(diff.max())
        out[f"mean_abs_err_{side}"] = float(diff.mean())
        out[f"max_abs_err_same_name_{side}"] = float(same.max())
        out[f"mean_phi_same_name_{side}"] = float(np.diagonal(a[f"phi_{side}"]).mean())
        worst = max(worst, float(diff.max()))
    out["max_abs_err"] = worst
    out["decisions_agree"] = float(np.mean(a["decisions"] == b["decisions"]))
    return out


def run_pair(
    name: str,
    args: argparse.Namespace,
    scratch: Path,
    *,
    exact: bool = True,
    recovery: bool = False,
) -> dict[str, Any]:
    """Truncated and (optionally) exact ATC of one generated pair, each in a fresh process."""
    spec = shapes.model_spec(name)
    model = shapes.generate(spec, cache=args.cache)
    for file in model.weight_files("A") + model.weight_files("B"):  # into the OS page cache
        with file.open("rb") as fh:
            while fh.read(1 << 24):
                pass
    work = scratch / name
    work.mkdir(parents=True, exist_ok=True)
    base = {"source": str(model.base_a), "target": str(model.base_b), "device": args.device}
    row: dict[str, Any] = {
        "model": name,
        "description": spec.description,
        "matrices": len(spec.modules),
        "largest": list(spec.largest),
        "base_file_mb": round(model.file_bytes / 2**20, 1),
        "k": args.k,
    }
    methods = ("truncated", "exact") if exact else ("truncated",)
    for method in methods:
        print(f"   {name}: {method} ...", flush=True)
        cache = work / f"factors-{method}"
        payload = {"task": "atc", "method": method, "k": args.k, "factor_cache": str(cache)}
        payload["save"] = str(work / f"{method}.npz")
        row[method] = measure.run_worker(SCRIPT, threads=args.threads, payload=payload | base)
        row[method]["load_average"] = [round(x, 2) for x in measure.load_average()]
        shutil.rmtree(cache, ignore_errors=True)
        r = row[method]
        print(
            f"   {name}: {method} {r['wall_s']:.1f}s, {r['peak_rss_mb']:.0f} MB, "
            f"ATC {r['atc']:.4f}",
            flush=True,
        )
    if exact:
        row["error"] = compare(work / "exact.npz", work / "truncated.npz")
        row["error"]["atc_abs_err"] = abs(row["exact"]["atc"] - row["truncated"]["atc"])
        row["speedup"] = row["exact"]["wall_s"] / row["truncated"]["wall_s"]
    if recovery:
        payload = {"task": "recovery", "k": args.k, "sample": args.sample}
        row["recovery"] = measure.run_worker(SCRIPT, threads=args.threads, payload=payload | base)
    shutil.rmtree(work, ignore_errors=True)
    return row


def print_tables(result: dict[str, Any]) -> None:
    """The Markdown tables of a result document."""
    rows = []
    for r in [result["pair"], *result.get("sizes", {}).get("rows", [])]:
        t, e = r["truncated"], r.get("exact")
        rows.append(
            [
                r["model"], r["matrices"], "x".join(map(str, r["largest"])), r["base_file_mb"],
                t["wall_s"], round(t["peak_rss_mb"]),
                None if e is None else e["wall_s"], None if e is None else round(e["peak_rss_mb"]),
                None if e is None else e["cache_written_mb"],
                None if e is None else f"{r['error']['max_abs_err']:.1e}",
                None if e is None else f"{r['error']['atc_abs_err']:.1e}",
            ]
        )  # fmt: skip
    measure.print_table(
        f"ATC, k = {result['k']}: truncated (randomized top-k) vs exact (full thin SVD)",
        ["model", "matrices", "largest", "base MB (fp16)", "trunc s", "trunc MB", "exact s",
         "exact MB", "exact cache MB", "max |Psi err|", "|ATC err|"],
        rows,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run both paths on the pair and the sizes, print, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, seconds (for tests)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--k", type=int, default=32, help="similarity rank (settings default 32)")
    parser.add_argument("--pair", help=f"model of the main comparison (default {FULL_PAIR})")
    parser.add_argument("--sizes", help="comma-separated size-table models ('' to skip)")
    parser.add_argument("--sample", type=int, default=24, help="modules in the recovery check")
    parser.add_argument("--no-sizes-exact", action="store_true", help="truncated only in sizes")
    parser.add_argument(
        "--threads", type=int, help="CPU threads per worker (default: torch's, one per core)"
    )
    parser.add_argument("--cache", type=Path, default=shapes.CACHE, help="generated data")
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--show", action="store_true", help="print the tables of --out and exit")
    args = parser.parse_args(argv)
    device, note = measure.pick_device(args.device)
    pair = args.pair or (QUICK_PAIR if args.quick else FULL_PAIR)
    if args.sizes is not None:
        sizes = tuple(s for s in args.sizes.split(",") if s)
    else:
        sizes = QUICK_SIZES if args.quick else FULL_SIZES
    out = args.out or (
        args.cache / "atc_scale.quick.json" if args.quick else measure.RESULTS / "atc_scale.json"
    )
    if args.show:
        print_tables(json.loads(out.read_text()))
        return 0
    result: dict[str, Any] = {}
    if out.is_file() and not args.quick:
        result = json.loads(out.read_text())
    result.update(
        measure.run_header(
            "bench/atc_scale.py",
            quick=args.quick,
            requested=args.device,
            device=device,
            note=note,
            threads=args.threads,
        ),
        k=args.k,
    )
    scratch = args.cache / "runs" / f"atc-{time.strftime('%H%M%S')}"
    try:
        print(f"== pair: {pair}", flush=True)
        result["pair"] = run_pair(pair, args, scratch, recovery=True)
        measure.write_json(out, result)
        if sizes:
            rows = []
            for name in sizes:
                print(f"== sizes: {name}", flush=True)
                rows.append(run_pair(name, args, scratch, exact=not args.no_sizes_exact))
            result["sizes"] = {"rows": rows}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return measure.finish(out, result, print_tables)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        measure.worker_main({"atc": work_atc, "recovery": work_recovery})
    else:
        sys.exit(main())
