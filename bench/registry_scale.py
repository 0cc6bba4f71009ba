"""The watcher at registry scale: what a pass costs when the registry is large and nothing is new.

    python bench/registry_scale.py [--quick] [--sizes 500,2000,10000] [--shares 1.0,0.3]
        [--drain 200] [--passes 3] [--ticks 2] [--threads 1] [--out FILE] [--show]

An embedded MLflow registry (SQLite) grows through the sizes, one registry per *share* (the
share of its versions that are the migrator's: ``lorax.*``-tagged bases and adapters; the rest
are other teams' model versions without those tags). The migrator's adapters are LoRA-X
adapters of a base ``big/1`` that has no successor, in lineages of 10 versions: all already
migrated, so a pass finds nothing to do. At each size, side by side in the same run, two
watchers on fresh job databases: **incremental** (the default, ``MIGRATOR_FULL_RECONCILE_EVERY``
= 30: a pass reads only what changed since the last one) and **full listing** (= 1: every pass
reads every version, as before the watcher kept a cursor). For each, in fresh processes:

- **daemon**: ``build_context`` once, then ``run_once`` as the scheduler calls it: a first pass
  (it records the catalog of every version in a fresh job database), a second one (it reads
  again what the first one's page writes touched), then ``--passes`` idle passes (the figure
  of interest), with the resident memory after each and the peak;
- **tick**: ``migrator tick --json`` as a subprocess (``--ticks`` times, on the daemon's job
  database), wall time from start to exit (start-up included) and its peak RSS.

The tables give each idle pass as a ratio to the full listing's, and (in the incremental
worker) the floor of any watcher that lists everything: ``MlflowClient.search_model_versions``
over every version in pages of 1,000, and over the ``lorax.role = adapter`` versions.

Then, once (the largest registry of the first share, incremental), **drain**: a daemon on the
idle passes' job database runs one idle pass, ``--drain`` new adapters are registered on a base
``enc/1`` and its successor ``enc/2`` arrives; one pass deprecates ``enc/1``, assesses the pair and transfers and registers every adapter: its
time, jobs and the process's RSS at its start and end (issue 15, item 5).
Results: ``bench/results/registry_scale.json`` (``--quick``: ``bench/.cache/``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/registry_scale.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import measure

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
CACHE = SCRIPT.parent / ".cache"
LINEAGE = 10  # versions per registered model
FULL_SIZES, QUICK_SIZES = (500, 2000, 10000), (20, 40)
FULL_SHARES, QUICK_SHARES = (1.0, 0.3), (0.5,)
ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _uri(work: Path) -> str:
    return f"sqlite:///{work / 'mlflow.db'}"


MODES = {"incremental": "30", "full": "1"}  # MIGRATOR_FULL_RECONCILE_EVERY of each watcher


def _settings_env(work: Path, mode: str) -> dict[str, str]:
    """The migrator's settings for this registry and watcher (environment form)."""
    return {
        "MIGRATOR_FULL_RECONCILE_EVERY": MODES[mode],
        "MIGRATOR_DATA_DIR": str(work / f"data-{mode}"),
        "MIGRATOR_TRACKING_URI": _uri(work),
        "MIGRATOR_DEVICE": "cpu",
        "MIGRATOR_REGISTRY_RETRIES": "0",
    }


# --- the registry ----------------------------------------------------------------------------


class Registry:
    """A growing embedded MLflow registry and what it holds so far.

    ``Registry(work)`` opens the one in ``work``, creating it (with the base ``big/1`` and the
    adapter files its versions point to) when ``create``.
    """

    def __init__(self, work: Path, *, create: bool = True) -> None:
        from mlflow import MlflowClient

        from migrator.registry import Tag
        from tests.migrator import scenario

        self.work, self.tag, self.scenario = work, Tag, scenario
        work.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=_uri(work), registry_uri=_uri(work))
        self.counts = {"ours": 0, "others": 0}
        self.models: set[str] = set()
        if not create:
            exp = self.client.get_experiment_by_name("uploads")
            assert exp is not None, f"no registry in {work}"
            self.experiment = exp.experiment_id
            return
        self.experiment = self.client.create_experiment(
            "uploads", artifact_location=(work / "artifacts").as_uri()
        )
        big = self.scenario.base_weights(0)
        self._base("big", big, "v1")
        self.adapter_source, self.adapter_run = self._upload(
            self.scenario.write(self.scenario.lorax_adapter(big), work / "files" / "big-ad")
        )

    def _upload(self, folder: Path) -> tuple[str, str]:
        run = self.client.create_run(self.experiment)
        self.client.log_artifacts(run.info.run_id, str(folder), "files")
        self.client.set_terminated(run.info.run_id)
        return f"runs:/{run.info.run_id}/files", run.info.run_id

    def _version(self, name: str, source: str, run_id: str, tags: dict[str, str]) -> str:
        if name not in self.models:
            if not self.client.search_registered_models(f"name = '{name}'"):
                self.client.create_registered_model(name)
            self.models.add(name)
        mv = self.client.create_model_version(name, source, run_id=run_id, tags=tags)
        return f"{name}/{mv.version}"

    def _base(self, name: str, weights: dict[str, Any], label: str) -> str:
        folder = self.scenario.write_weights(self.work / "files" / f"{name}-{label}", weights)
        source, run_id = self._upload(folder)
        self.counts["ours"] += 1
        return self._version(name, source, run_id, {self.tag.ROLE: "base"})

    def grow(self, size: int, share: float) -> None:
        """Add versions until there are ``size``, ``share`` of them the migrator's."""
        ours = max(self.counts["ours"], round(size * share))
        tags = {self.tag.ROLE: "adapter", self.tag.BASE: "big/1", self.tag.FORMAT: "lorax"}
        while self.counts["ours"] < ours:
            name = f"ad-{(self.counts['ours'] - 1) // LINEAGE:05d}"
            self._version(name, self.adapter_source, self.adapter_run, tags)
            self.counts["ours"] += 1
        while self.counts["ours"] + self.counts["others"] < size:
            name = f"other-{self.counts['others'] // LINEAGE:05d}"
            team = {"team": "vision", "stage": "staging"}
            self._version(name, self.adapter_source, self.adapter_run, team)
            self.counts["others"] += 1

    def add_drain(self, count: int) -> None:
        """``count`` adapters of ``enc/1``, then its successor ``enc/2``."""
        enc = self.scenario.base_weights(7)
        base = self._base("enc", enc, "v1")
        files = self.scenario.write(
            self.scenario.lorax_adapter(enc), self.work / "files" / "enc-ad"
        )
        source, run_id = self._upload(files)
        tags = {self.tag.ROLE: "adapter", self.tag.BASE: base, self.tag.FORMAT: "lorax"}
        for i in range(count):
            self._version(f"drain-{i:04d}", source, run_id, tags)
        self._base("enc", self.scenario.successor(enc), "v2")


# --- workers ---------------------------------------------------------------------------------


def _list_all(client: Any, filter_string: str | None) -> tuple[int, float]:
    """(versions, seconds) of a full paged listing."""
    started = time.perf_counter()
    count, token = 0, None
    while True:
        page = client.search_model_versions(
            filter_string=filter_string, max_results=1000, page_token=token
        )
        count += len(page)
        token = page.token
        if not token:
            return count, time.perf_counter() - started


def _baseline(uri: str) -> dict[str, Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    listed, all_s = _list_all(client, None)
    adapters, ours_s = _list_all(client, "tags.`lorax.role` = 'adapter'")
    return {
        "versions": listed,
        "list_all_s": all_s,
        "adapters": adapters,
        "list_adapters_s": ours_s,
    }


def work_daemon(p: dict[str, Any]) -> dict[str, Any]:
    """``run_once`` as the daemon runs it: one context, a first and a second pass, idle
    passes, a drain."""
    os.environ.update(p["env"])
    from migrator.database import prepare_database
    from migrator.pipeline import run_once
    from migrator.settings import load_settings
    from migrator.wiring import build_context

    settings = load_settings()
    prepare_database(settings.database_url.get_secret_value())
    ctx = build_context(settings)
    out: dict[str, Any] = {"idle_s": [], "listings": []}
    for label in ("first_pass_s", "second_pass_s"):
        started = time.perf_counter()
        report = run_once(ctx)
        out[label] = time.perf_counter() - started
        out["listings"].append(report.listing)
        if label == "first_pass_s":
            out["seen"] = {"bases": report.bases, "adapters": report.adapters}
    out["rss_mb"] = [measure.rss_mb()]
    for _ in range(p["passes"]):
        t = time.perf_counter()
        report = run_once(ctx)
        out["idle_s"].append(time.perf_counter() - t)
        out["rss_mb"].append(measure.rss_mb())
        out["listings"].append(report.listing)
        assert not report.planned and not report.outcomes, "an idle pass found work"
    out["idle_peak_rss_mb"] = measure.peak_rss_mb()  # before any drain
    if p.get("listing_floor"):
        out["baseline"] = _baseline(p["env"]["MIGRATOR_TRACKING_URI"])
    return out


def work_drain(p: dict[str, Any]) -> dict[str, Any]:
    """A daemon on the job database of the idle passes: one idle pass, then the drain."""
    os.environ.update(p["env"])
    from migrator.pipeline import run_once
    from migrator.settings import load_settings
    from migrator.wiring import build_context

    ctx = build_context(load_settings())
    idle = run_once(ctx)
    Registry(Path(p["drain_work"]), create=False).add_drain(p["drain"])
    return {"idle_listing": idle.listing, **_drain(ctx, run_once)}


def _drain(ctx: Any, run_once: Any) -> dict[str, Any]:
    rss_start = measure.rss_mb()
    t = time.perf_counter()
    report = run_once(ctx)
    seconds = time.perf_counter() - t
    statuses: dict[str, int] = {}
    for outcome in report.outcomes:
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
    return {
        "pass_s": seconds,
        "planned": len(report.planned),
        "outcomes": statuses,
        "rss_start_mb": round(rss_start, 1),
        "rss_end_mb": round(measure.rss_mb(), 1),
        "peak_rss_mb_so_far": round(measure.peak_rss_mb(), 1),
    }


def _tick(env: dict[str, str], threads: int | None) -> dict[str, Any]:
    """``migrator tick --json`` in a subprocess: wall time from start to exit, peak RSS (the
    child's own ``ru_maxrss``, from ``os.wait4``)."""
    full = {**os.environ, **ENV, **env, "PYTHONPATH": str(ROOT)}
    if threads:
        full |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "migrator", "tick", "--json"],
            cwd=ROOT,
            env=full,
            stdout=stdout,
            stderr=stderr,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"migrator tick failed ({proc.returncode}): {stderr.read()[-2000:]}")
        document = json.loads(stdout.read())
    return {
        "wall_s": seconds,
        "jobs": len(document["jobs"]),
        "listing": document.get("listing"),
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


# --- orchestration ---------------------------------------------------------------------------


def _measure_mode(
    registry: Registry, size: int, mode: str, args: argparse.Namespace, *, drain: bool
) -> dict[str, Any]:
    """One watcher on a fresh job database: the daemon worker, then the ticks on its database."""
    env = _settings_env(registry.work, mode)
    shutil.rmtree(env["MIGRATOR_DATA_DIR"], ignore_errors=True)
    payload: dict[str, Any] = {"task": "daemon", "env": env | ENV, "passes": args.passes}
    payload["listing_floor"] = mode == "incremental"
    print(f"   {size} versions, {mode}: daemon ...", flush=True)
    daemon = measure.run_worker(SCRIPT, payload, threads=args.threads, timeout=7200)
    ticks = []
    for i in range(args.ticks):
        print(f"   {size} versions, {mode}: migrator tick ({i + 1}) ...", flush=True)
        ticks.append(_tick(env, args.threads))
    if drain:
        print(f"   {size} versions, {mode}: drain of {args.drain} adapters ...", flush=True)
        payload |= {"task": "drain", "drain_work": str(registry.work), "drain": args.drain}
        daemon["drain"] = measure.run_worker(SCRIPT, payload, threads=args.threads, timeout=7200)
    shutil.rmtree(env["MIGRATOR_DATA_DIR"], ignore_errors=True)
    return {
        "daemon": daemon,
        "ticks": ticks,
        "idle_median_s": statistics.median(daemon["idle_s"]),
        "tick_median_s": statistics.median(t["wall_s"] for t in ticks) if ticks else None,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def measure_size(
    registry: Registry, size: int, args: argparse.Namespace, *, drain: bool
) -> dict[str, Any]:
    """One size of one registry: the full-listing watcher, then the incremental one (which
    drains last, since the drain adds versions)."""
    full = _measure_mode(registry, size, "full", args, drain=False)
    incremental = _measure_mode(registry, size, "incremental", args, drain=drain)
    return {
        "size": size,
        "counts": dict(registry.counts),
        "modes": {"incremental": incremental, "full": full},
        "idle_full_over_incremental": _ratio(full["idle_median_s"], incremental["idle_median_s"]),
        "tick_full_over_incremental": _ratio(full["tick_median_s"], incremental["tick_median_s"]),
        "load_average": [round(x, 2) for x in measure.load_average()],
    }


def run_share(share: float, args: argparse.Namespace, scratch: Path, first: bool) -> dict[str, Any]:
    """One registry grown through the sizes; the drain on the largest one of the first."""
    work = scratch / f"share-{share:g}"
    print(f"== registry, {share:.0%} of the versions the migrator's", flush=True)
    registry = Registry(work)
    rows = []
    for i, size in enumerate(args.sizes):
        t = time.perf_counter()
        registry.grow(size, share)
        print(f"   {size} versions registered in {time.perf_counter() - t:.0f}s", flush=True)
        last = i == len(args.sizes) - 1
        rows.append(measure_size(registry, size, args, drain=first and last and args.drain > 0))
    base = rows[0]["modes"]["incremental"]["idle_median_s"]
    for row in rows:
        row["idle_over_smallest"] = _ratio(row["modes"]["incremental"]["idle_median_s"], base)
    shutil.rmtree(work, ignore_errors=True)
    return {"share": share, "rows": rows}


def _mode_row(r: dict[str, Any], share: float, mode: str) -> list[object]:
    m = r["modes"][mode]
    d, ticks = m["daemon"], m["ticks"]
    rss = d["rss_mb"]
    return [
        r["size"], f"{share:.0%}", mode, d["seen"]["adapters"], round(d["first_pass_s"], 2),
        round(d["second_pass_s"], 2), round(m["idle_median_s"], 3), "/".join(d["listings"][2:]),
        m["tick_median_s"] and round(m["tick_median_s"], 2),
        f"{rss[0]:.0f} -> {rss[-1]:.0f}", round(d["idle_peak_rss_mb"]),
        round(max(t["peak_rss_mb"] or 0 for t in ticks)) if ticks else None,
    ]  # fmt: skip


def print_tables(result: dict[str, Any]) -> None:
    """The Markdown tables of a result document."""
    sections = result.get("registries", [])
    rows = [
        _mode_row(r, s["share"], mode)
        for s in sections for r in s["rows"] for mode in ("full", "incremental")
    ]  # fmt: skip
    measure.print_table(
        "An idle pass (nothing new) against the registry's size: the full-listing watcher "
        "(MIGRATOR_FULL_RECONCILE_EVERY=1) and the incremental one (default), same run",
        ["versions", "ours", "watcher", "adapters seen", "first pass s", "second pass s",
         "idle pass s", "idle reads", "tick s", "daemon RSS MB", "daemon peak MB",
         "tick peak MB"],
        rows,
    )  # fmt: skip
    ratios = []
    for s in sections:
        for r in s["rows"]:
            floor = r["modes"]["incremental"]["daemon"].get("baseline", {})
            ratios.append([
                r["size"], f"{s['share']:.0%}", measure.fmt(r["idle_full_over_incremental"], 1),
                measure.fmt(r["tick_full_over_incremental"], 1),
                measure.fmt(r["idle_over_smallest"], 1),
                measure.fmt(floor.get("list_all_s"), 3), measure.fmt(floor.get("list_adapters_s"), 3),
            ])  # fmt: skip
    measure.print_table(
        "Ratios: full listing over incremental (idle pass in the daemon, `migrator tick`), the "
        "incremental idle pass over the smallest size's; the floor of listing everything",
        ["versions", "ours", "daemon x", "tick x", "x smallest", "list all s",
         "list adapters s"],
        ratios,
    )  # fmt: skip
    drains = [
        (s["share"], r) for s in sections for r in s["rows"]
        if "drain" in r["modes"]["incremental"]["daemon"]
    ]  # fmt: skip
    if drains:
        measure.print_table(
            "A pass that drains the adapters of a deprecated base onto its successor",
            ["versions", "ours", "jobs planned", "outcomes", "pass s", "RSS start MB",
             "RSS end MB"],
            [
                [r["size"], f"{share:.0%}", d["planned"], d["outcomes"], round(d["pass_s"], 1),
                 d["rss_start_mb"], d["rss_end_mb"]]
                for share, r in drains
                for d in [r["modes"]["incremental"]["daemon"]["drain"]]
            ],
        )  # fmt: skip


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny registries (for tests)")
    parser.add_argument("--sizes", help="comma-separated registry sizes (versions)")
    parser.add_argument("--shares", help="comma-separated shares of the migrator's versions")
    parser.add_argument("--drain", type=int, help="adapters drained onto a new base (0: none)")
    parser.add_argument("--passes", type=int, help="idle daemon passes measured per size")
    parser.add_argument("--ticks", type=int, help="`migrator tick` runs per size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="scratch folder")
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--show", action="store_true", help="print the tables of --out and exit")
    args = parser.parse_args(argv)
    quick = args.quick
    args.sizes = (
        tuple(int(s) for s in args.sizes.split(","))
        if args.sizes
        else QUICK_SIZES
        if quick
        else FULL_SIZES
    )
    args.shares = (
        tuple(float(s) for s in args.shares.split(","))
        if args.shares
        else QUICK_SHARES
        if quick
        else FULL_SHARES
    )
    args.drain = args.drain if args.drain is not None else (2 if quick else 200)
    args.passes = args.passes or (2 if quick else 3)
    args.ticks = args.ticks if args.ticks is not None else (1 if quick else 2)
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the registries, measure, print the tables, write the JSON."""
    args = _parse(argv)
    out = args.out or (
        args.cache / "registry_scale.quick.json"
        if args.quick
        else measure.RESULTS / "registry_scale.json"
    )
    if args.show:
        print_tables(json.loads(out.read_text()))
        return 0
    os.environ.update(ENV)
    result: dict[str, Any] = measure.run_header(
        "bench/registry_scale.py",
        quick=args.quick,
        requested="cpu",
        device="cpu",
        note=None,
        threads=args.threads,
    )
    scratch = args.cache / "runs" / f"registry-{time.strftime('%H%M%S')}"
    try:
        result["registries"] = []
        for i, share in enumerate(args.shares):
            result["registries"].append(run_share(share, args, scratch, first=i == 0))
            measure.write_json(out, result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return measure.finish(out, result, print_tables)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        measure.worker_main({"daemon": work_daemon, "drain": work_drain})
    else:
        sys.exit(main())
