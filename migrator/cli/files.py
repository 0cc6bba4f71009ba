"""File-level commands: ``atc`` and ``transfer``, on local files or ``models:/name/version``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

from core.errors import InputError
from migrator.cli.common import (
    EXIT_BAD_INPUT,
    emit_json,
    err,
    fail,
    fmt_atc,
    guarded,
    out,
    progress_bar,
    state,
    table,
)
from migrator.registry import Tag, VersionRef
from migrator.settings import Settings

if TYPE_CHECKING:
    from core.transfer import TransferResult
    from migrator.migration import BaseModel, ProgressFn

__all__ = ["atc_command", "transfer_command"]


def _download(spec: str, settings: Settings, kind: str) -> tuple[Path, str, str | None]:
    """A ``models:/name/version`` spec downloaded to the scratch folder: (path, label,
    weights sub-path)."""
    from migrator.registry.mlflow_registry import MlflowRegistry

    try:
        ref = VersionRef.parse(spec)
    except ValueError as exc:
        raise InputError(str(exc), path=spec) from None
    registry = MlflowRegistry(
        settings.tracking,
        settings.registry,
        retries=settings.registry_retries,
        backoff_s=settings.registry_backoff_s,
    )
    info = registry.get_version(ref)
    dest = settings.scratch / "cli" / kind / ref.name / ref.version
    local = registry.download(ref, dest)
    return local, str(ref), info.tags.get(Tag.WEIGHTS_PATH) or None


def _local(spec: str, settings: Settings, kind: str) -> tuple[Path, str, str | None]:
    if spec.startswith("models:/"):
        return _download(spec, settings, kind)
    path = Path(spec)
    if not path.exists():
        raise InputError("no such file or folder", path=path)
    return path, spec, None


def _open(spec: str, settings: Settings, progress: ProgressFn | None) -> BaseModel:
    from migrator.migration import open_base

    path, label, weights_path = _local(spec, settings, "bases")
    return open_base(path, settings, label=label, weights_path=weights_path, progress=progress)


@guarded
def atc_command(
    source: str = typer.Argument(
        ..., help="Source base: safetensors file, folder, or models:/name/version."
    ),
    target: str = typer.Argument(..., help="Target base, same forms."),
    plot: Path | None = typer.Option(
        None, "--plot", help="Write the similarity heatmap (PNG) here."
    ),
    rank: int | None = typer.Option(
        None, "--rank", "-k", help="Similarity rank k (default: the similarity_rank setting)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Adapter Transferability Cost of SOURCE -> TARGET, with every module's match."""
    from migrator.migration import assess

    settings = state.settings()
    if rank is not None:
        settings = settings.model_copy(update={"similarity_rank": rank})
    with progress_bar("factorizing", enabled=not as_json) as progress:
        src = _open(source, settings, progress)
        tgt = _open(target, settings, progress)
        assessment = assess(src, tgt, settings)
    atc = assessment.atc
    modules = [
        {
            "target": d.target,
            "source": d.source,
            "phi_left": round(d.phi_left, 6),
            "phi_right": round(d.phi_right, 6),
            "decision": d.decision.value,
            "phi": round(d.phi, 6),
            "transport_mass": d.mass,
            "reason": d.reason,
        }
        for d in assessment.decisions
    ]
    if plot is not None:
        assessment.plot(plot, source_label=src.label, target_label=tgt.label)
    if as_json:
        emit_json(
            {
                "atc": atc.atc,
                "atc_left": atc.atc_left,
                "atc_right": atc.atc_right,
                "similarity_rank": atc.k,
                "combine": atc.combine.value,
                "source": src.label,
                "target": tgt.label,
                "seconds": round(assessment.seconds, 3),
                "modules": modules,
                "plot": None if plot is None else str(plot),
            }
        )
        return
    table(
        f"{src.label} -> {tgt.label}",
        ["target module", "source module", "phi left", "phi right", "decision"],
        [
            [
                m["target"],
                m["source"] or "-",
                f"{m['phi_left']:.3f}",
                f"{m['phi_right']:.3f}",
                m["decision"],
            ]
            for m in modules
        ],
    )
    counts = assessment.counts
    out.print(
        f"ATC [bold]{atc.atc:.3f}[/] (left {atc.atc_left:.3f}, right {atc.atc_right:.3f}; "
        f"k = {atc.k}); modules: {counts['same_name']} same name, {counts['rematched']} "
        f"rematched, {counts['skipped']} skipped" + (f"; heatmap: {plot}" if plot else "")
    )


@guarded
def transfer_command(
    adapter: str = typer.Argument(
        ...,
        help="PEFT folder, kohya/diffusers .safetensors, compact LoRA-X file, or models:/name/version.",
    ),
    source: str = typer.Option(..., "--from", help="The base the adapter was trained on."),
    target: str = typer.Option(..., "--to", help="The base to carry it to."),
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="Where to write the result (a folder, or a .safetensors file for single-file layouts).",
    ),
    mode: str = typer.Option(
        "project",
        "--mode",
        help="project (full-rank projection, paper Algorithm 1), subspace (k = r) or copy.",
    ),
    rank: int | None = typer.Option(
        None, "--rank", help="k of the projection in project mode (default: full thin rank)."
    ),
    match: bool = typer.Option(
        True,
        "--match/--same-name",
        help="Match modules by subspace similarity (default), or carry each to the module of the same name.",
    ),
    allow_partial: bool = typer.Option(
        False,
        "--allow-partial",
        help="Write the result even when some adapter modules reach no target module (listed).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Carry ADAPTER from base --from to base --to, training-free; write it in its own layout.

    Exits 1, writing nothing, when a module of the adapter reaches no module of the target,
    listing each by name and reason (--allow-partial writes the rest)."""
    from migrator.migration import assess, load_adapter, migrate, write_migrated

    if mode not in ("project", "subspace", "copy"):
        fail(f"--mode must be project, subspace or copy, not {mode!r}", EXIT_BAD_INPUT)
    settings = state.settings()
    with progress_bar("factorizing", enabled=not as_json) as progress:
        src = _open(source, settings, progress)
        tgt = _open(target, settings, progress)
        adapter_path, _, _ = _local(adapter, settings, "adapters")
        loaded = load_adapter(adapter_path, src, settings)
        assessment = assess(src, tgt, settings) if match else None
        migrated = migrate(loaded, src, tgt, assessment, settings, mode=mode, rank=rank)
    result = migrated.result
    left_out = _left_out(result)
    if left_out and not allow_partial:
        _refuse_partial(left_out, result, as_json)
    files = write_migrated(migrated, output, like=_like(adapter_path))
    atc = None if assessment is None else assessment.atc
    document = {
        "modules_transferred": result.modules_transferred,
        "modules_rematched": result.modules_rematched,
        "modules_skipped": result.modules_skipped,
        "energy_retained": result.energy_retained,
        "atc": None if atc is None else atc.atc,
        "atc_left": None if atc is None else atc.atc_left,
        "atc_right": None if atc is None else atc.atc_right,
        "adapter_weighted_similarity": result.adapter_weighted_similarity,
        "mode": result.mode.value,
        "is_lorax": result.is_lorax,
        "layout": migrated.layout.value,
        "files": [str(f) for f in files],
        "notes": list(result.notes),
        "modules_left_out": left_out,
        "conversions": _conversions(result),
    }
    if as_json:
        emit_json(document)
        return
    table(
        f"{adapter}: {src.label} -> {tgt.label} ({result.mode.value})",
        ["modules transferred", "rematched", "skipped", "energy retained", "ATC"],
        [
            [
                result.modules_transferred,
                result.modules_rematched,
                result.modules_skipped,
                f"{result.energy_retained:.1%}",
                fmt_atc(document["atc"]),
            ]
        ],
    )
    for note in result.notes:
        out.print(f"note: {note}", markup=False)
    _print_losses(left_out, _conversions(result))
    if not result.is_lorax:
        out.print("note: the input is a plain LoRA, not a LoRA-X: expect a weaker transfer")
    out.print(f"wrote {', '.join(str(f) for f in files)}")


def _like(adapter_path: Path) -> Path | None:
    """The input's single file, whose name a single-file result keeps."""
    if adapter_path.is_file():
        return adapter_path
    if adapter_path.is_dir() and not (adapter_path / "adapter_config.json").exists():
        singles = list(adapter_path.glob("*.safetensors"))
        return singles[0] if len(singles) == 1 else None
    return None


def _print_losses(left_out: list[dict[str, object]], conversions: list[dict[str, object]]) -> None:
    """What did not come through whole: modules left out, LyCORIS modules converted."""
    for item in left_out:
        out.print(f"left out: {item['module']} ({item['reason']})", markup=False)
    for c in conversions:
        out.print(
            f"converted: {c['key']} ({c['kind']}) to a rank-{c['rank']} LoRA keeping "
            f"{c['energy_kept']:.1%} of its energy",
            markup=False,
        )


def _left_out(result: TransferResult) -> list[dict[str, object]]:
    """Every adapter module whose update reaches no target module: name, target, reason."""
    targets = {r.source: r.target for r in result.modules if r.rank == 0}
    return [
        {"module": name, "target": targets.get(name), "reason": why}
        for name, why in result.left_out
    ]


def _conversions(result: TransferResult) -> list[dict[str, object]]:
    return [
        {"key": c.key, "kind": c.kind, "rank": c.rank, "energy_kept": c.energy_kept}
        for c in result.adapter.conversions
    ]


def _refuse_partial(
    left_out: list[dict[str, object]], result: TransferResult, as_json: bool
) -> NoReturn:
    """List the left-out modules on stderr (and the figures as JSON) and exit 1."""
    for item in left_out:
        err.print(f"left out: {item['module']}: {item['reason']}", markup=False, highlight=False)
    if as_json:
        emit_json(
            {
                "modules_transferred": result.modules_transferred,
                "modules_rematched": result.modules_rematched,
                "modules_skipped": result.modules_skipped,
                "energy_retained": result.energy_retained,
                "atc": None if result.atc is None else result.atc.atc,
                "modules_left_out": left_out,
                "files": [],
            }
        )
    fail(
        f"{len(left_out)} adapter module(s) reach no module of the target; nothing written "
        "(--allow-partial writes the rest)"
    )
