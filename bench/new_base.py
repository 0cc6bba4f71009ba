"""The "new base" rows of ``bench/transfer_speed.py``: a new base's first pass, today against ours.

A new base B (the successor of A) arrives with N adapters of A to carry. Its first pass is the
assessment of A -> B (ATC at k = 32, module decisions) plus the N transfers, everything from an
empty factor cache, each path in a fresh process:

- **today**: what the service ran before: a full thin SVD of every matrix of both bases
  (``FactorStore.prefetch()``, kept in the cache for the transfers), the ATC on their leading k
  triplets, then the transfers reading those factors;
- **ours, project**: the assessment on randomized top-k factors (``prefetch(rank=k,
  exact=False)``, block Krylov), then the transfers in project mode at full rank, which read a
  QR range basis of each rectangular target module and nothing of the square ones;
- **ours, subspace**: the same assessment, then the transfers in subspace mode, which read the
  exact leading triplets of every target module (an SVD keeping 64 of them).

Each base has its own cache folder, so the cache written *for B* is measured on its own. The
outputs are compared with Algorithm 1's (project mode; the adapters Algorithm 1 ran for) and with
today's path (every adapter); subspace outputs with an exact reference: the subspace transfers
computed from today's complete factors in the today worker, after its clock stopped.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bench import measure

__all__ = ["compare_outputs", "print_new_base", "run_new_base", "work_new_base"]

K = 32
MIN_SIMILARITY = 0.5  # the settings' default module_min_similarity
PEFT_WEIGHTS = "adapter_model.safetensors"


def _folder_mb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20, 1)


def _transfer_all(
    p: dict[str, Any], source: Any, target: Any, decisions: Any, mode: str, out: Path
) -> None:
    from core.formats import read_adapter, resolve_modules, write_adapter
    from core.transfer import transfer_adapter

    shapes = {info.name: info.shape for info in source.source.modules()}
    for i, path in enumerate(p["adapters"]):
        adapter, _ = resolve_modules(read_adapter(path), shapes, strict=True)
        result = transfer_adapter(adapter, source, target, decisions, mode=mode)
        write_adapter(result.adapter, out / f"{i:03d}")


def work_new_base(p: dict[str, Any]) -> dict[str, Any]:
    """One path of a new base's first pass (see the module docstring)."""
    from core.atc import compute_atc
    from core.factor_cache import FactorCache
    from core.factorize import FactorStore
    from core.matching import match_modules
    from core.weights import WeightSource

    device, _ = measure.pick_device(p["device"])
    torch.linalg.svd(torch.randn(8, 8, device=device), full_matrices=False)  # load LAPACK first
    base_rss = measure.rss_mb()
    today = p["path"] == "today"
    started = time.perf_counter()
    stores = [
        FactorStore(
            WeightSource.open(p[side]), cache=FactorCache(p[f"cache_{side}"]), device=device
        )
        for side in ("source", "target")
    ]
    for store in stores:
        if today:
            store.prefetch()  # the full thin SVD, kept for the transfers
        else:
            store.prefetch(rank=K, exact=False)
    views = [store.view(rank=K, exact=today) for store in stores]
    atc = compute_atc(views[0], views[1], k=K)
    decisions = match_modules(atc, min_similarity=MIN_SIMILARITY)
    assess_s = time.perf_counter() - started
    rss_assessed = measure.rss_mb()
    _transfer_all(p, stores[0], stores[1], decisions, p["mode"], Path(p["out"]))
    wall = time.perf_counter() - started
    if p.get("reference_out"):  # untimed: subspace mode from the same complete factors
        _transfer_all(p, stores[0], stores[1], decisions, "subspace", Path(p["reference_out"]))
    return {
        "wall_s": round(wall, 3),
        "assess_s": round(assess_s, 3),
        "transfer_s": round(wall - assess_s, 3),
        "base_rss_mb": round(base_rss, 1),
        "rss_after_assessment_mb": round(rss_assessed, 1),
        "atc": atc.atc,
        "decisions": sorted({d.decision.value for d in decisions}),
        "factorized": {"source": stores[0].computed_by_kind, "target": stores[1].computed_by_kind},
        "cache_target_mb": _folder_mb(Path(p["cache_target"])),
        "cache_source_mb": _folder_mb(Path(p["cache_source"])),
        "device": device,
    }


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def compare_outputs(ours: Path, reference: Path, count: int, *, alg1: bool) -> dict[str, Any]:
    """Max relative Frobenius difference of ups and downs over the first ``count`` adapters,
    against Algorithm 1's files (``alg1``) or another path's PEFT folders."""
    from core.formats import read_adapter

    worst = 0.0
    modules = 0
    for i in range(count):
        mine = read_adapter(ours / f"{i:03d}")
        if alg1:
            raw = load_file(reference / f"{i:03d}.safetensors")
            ref = {
                n: (raw[f"{n}.lora.up.weight"], raw[f"{n}.lora.down.weight"]) for n in mine.modules
            }
        else:
            other = read_adapter(reference / f"{i:03d}")
            ref = {n: (m.up * m.scale, m.down) for n, m in other.modules.items()}
        for name, module in mine.modules.items():
            up, down = ref[name]
            worst = max(
                worst, _relative(module.up * module.scale, up), _relative(module.down, down)
            )
            modules += 1
    return {"max_rel_diff": worst, "adapters_compared": count, "modules_compared": modules}


def run_new_base(
    model: Any,
    adapters: list[Path],
    alg1_out: Path,
    alg1_count: int,
    args: Any,
    script: Path,
    work: Path,
) -> dict[str, Any]:
    """Today's path and ours (project, subspace) for one generated model; see the module doc."""
    base = {"source": str(model.base_a), "target": str(model.base_b), "device": args.device}
    chosen = [str(a) for a in adapters]
    runs: dict[str, dict[str, Any]] = {}
    for label, path, mode in (
        ("today", "today", "project"),
        ("project", "ours", "project"),
        ("subspace", "ours", "subspace"),
    ):
        caches = {side: work / f"cache-{label}-{side}" for side in ("source", "target")}
        payload = {"task": "newbase", "path": path, "mode": mode, "adapters": chosen, **base}
        payload |= {"out": str(work / f"nb-{label}")} | {
            f"cache_{side}": str(folder) for side, folder in caches.items()
        }
        if label == "today":
            payload["reference_out"] = str(work / "nb-reference-subspace")
        print(f"   new base, {len(chosen)} adapters: {label} ...", flush=True)
        runs[label] = measure.run_worker(script, threads=args.threads, payload=payload)
        runs[label]["load_average"] = [round(x, 2) for x in measure.load_average()]
        for folder in caches.values():
            shutil.rmtree(folder, ignore_errors=True)
    n = len(chosen)
    diffs = {
        "project_vs_alg1": compare_outputs(work / "nb-project", alg1_out, alg1_count, alg1=True),
        "today_vs_alg1": compare_outputs(work / "nb-today", alg1_out, alg1_count, alg1=True),
        "project_vs_today": compare_outputs(work / "nb-project", work / "nb-today", n, alg1=False),
        "subspace_vs_exact": compare_outputs(
            work / "nb-subspace", work / "nb-reference-subspace", n, alg1=False
        ),
    }
    today = runs["today"]["wall_s"]
    return {
        "adapters": n,
        "k": K,
        "runs": runs,
        "diff": diffs,
        "speedup_project": today / runs["project"]["wall_s"],
        "speedup_subspace": today / runs["subspace"]["wall_s"],
    }


def print_new_base(models: dict[str, Any]) -> None:
    """Print the "new base" table of a results document's models (if any has the section)."""
    rows = _table_rows(models)
    if rows:
        measure.print_table(
            "A new base's first pass: assessment (k = 32) of its predecessor and it, then N "
            "transfers; today = full SVD of both bases; x = today / ours (same run)",
            NEW_BASE_HEADER,
            rows,
        )


def _table_rows(models: dict[str, Any]) -> list[list[object]]:
    """Rows of the "new base" table: one per model that has the section."""
    rows = []
    for name, model in models.items():
        nb = model.get("new_base")
        if not nb:
            continue
        runs, diff = nb["runs"], nb["diff"]
        rows.append(
            [
                name, nb["adapters"],
                runs["today"]["wall_s"], runs["project"]["wall_s"],
                f"{nb['speedup_project']:.1f}", runs["subspace"]["wall_s"],
                f"{nb['speedup_subspace']:.1f}",
                runs["today"]["cache_target_mb"], runs["project"]["cache_target_mb"],
                runs["subspace"]["cache_target_mb"],
                round(runs["today"]["peak_rss_mb"]), round(runs["project"]["peak_rss_mb"]),
                round(runs["subspace"]["peak_rss_mb"]),
                f"{diff['project_vs_alg1']['max_rel_diff']:.1e}",
                f"{diff['project_vs_today']['max_rel_diff']:.1e}",
                f"{diff['subspace_vs_exact']['max_rel_diff']:.1e}",
            ]
        )  # fmt: skip
    return rows


NEW_BASE_HEADER = [
    "model", "N", "today s", "project s", "x project", "subspace s", "x subspace",
    "today cache MB", "project cache MB", "subspace cache MB", "today MB", "project MB",
    "subspace MB",
    "project vs Alg1", "project vs today", "subspace vs exact",
]  # fmt: skip
