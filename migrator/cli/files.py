"""File-level commands: ``atc`` and ``transfer``, on local files or ``models:/name/version``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from core.errors import InputError
from core.vocabulary import TransferMode
from migrator.cli.common import (
    EXIT_BAD_INPUT,
    JSON_OPTION,
    WIDE_OPTION,
    decisions_table,
    emit_json,
    err,
    fail,
    fields,
    fmt_atc,
    guarded,
    out,
    progress_bar,
    state,
)
from migrator.registry import Tag, VersionRef

if TYPE_CHECKING:
    from core.transfer import TransferResult
    from migrator.adapters import CarriedAdapter
    from migrator.bases import BaseComparison, OpenedBase, ProgressFn
    from migrator.documents import ModuleCounts
    from migrator.settings import Settings

__all__ = ["atc_command", "transfer_command"]

MODES = ", ".join(m.value for m in TransferMode)


def _download(spec: str, settings: Settings, kind: str) -> tuple[Path, str, str | None]:
    """A ``models:/name/version`` spec downloaded to the scratch folder: (path, label,
    weights sub-path)."""
    from migrator.registry.mlflow_registry import MlflowRegistry

    try:
        ref = VersionRef.parse(spec)
    except ValueError as exc:
        raise InputError(str(exc), path=spec) from None
    registry = MlflowRegistry.from_settings(settings)
    info = registry.get_version(ref)
    dest = settings.scratch_dir / "cli" / kind / ref.name / ref.version
    local = registry.download(ref, dest)
    return local, str(ref), info.tags.get(Tag.WEIGHTS_PATH) or None


def _check_spec(spec: str) -> None:
    """Refuse a missing file or a malformed ``models:/`` reference before anything heavy is
    imported, so that bad input answers at once.

    Raises:
        InputError: naming the path or reference.
    """
    if spec.startswith("models:/"):
        try:
            VersionRef.parse(spec)
        except ValueError as exc:
            raise InputError(str(exc), path=spec) from None
    elif not Path(spec).exists():
        raise InputError("no such file or folder", path=spec)


def _local(spec: str, settings: Settings, kind: str) -> tuple[Path, str, str | None]:
    if spec.startswith("models:/"):
        return _download(spec, settings, kind)
    path = Path(spec)
    if not path.exists():
        raise InputError("no such file or folder", path=path)
    return path, spec, None


def _open(spec: str, settings: Settings, progress: ProgressFn | None) -> OpenedBase:
    from migrator.bases import open_base

    path, label, weights_path = _local(spec, settings, "bases")
    return open_base(path, settings, label=label, weights_path=weights_path, progress=progress)


def _atc_document(comparison: BaseComparison, src: str, tgt: str) -> dict[str, Any]:
    from migrator.documents import ModuleCounts, decision_document

    atc = comparison.atc
    return {
        "atc": atc.atc,
        "atc_left": atc.atc_left,
        "atc_right": atc.atc_right,
        "similarity_rank": atc.k,
        "combine": atc.combine.value,
        "source": src,
        "target": tgt,
        "seconds": round(comparison.seconds, 3),
        "modules": [decision_document(d) for d in comparison.decisions],
        "module_counts": ModuleCounts.of_decisions(comparison.decisions).document(),
    }


def _print_atc(
    document: dict[str, Any], counts: ModuleCounts, plot: Path | None, *, wide: bool
) -> None:
    title = f"{document['source']} -> {document['target']}"
    decisions_table(title, document["modules"], wide=wide)
    out.print(
        f"ATC [bold]{document['atc']:.3f}[/] (left {document['atc_left']:.3f}, right "
        f"{document['atc_right']:.3f}; k = {document['similarity_rank']}); {counts.text()}"
        + (f"; heatmap: {', '.join(document['plots'])}" if plot else "")
    )


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
    as_json: bool = JSON_OPTION,
    wide: bool = WIDE_OPTION,
) -> None:
    """Adapter Transferability Cost of SOURCE -> TARGET, with every module's match."""
    for spec in (source, target):
        _check_spec(spec)
    from migrator.bases import compare_bases

    settings = state.settings()
    if rank is not None:
        settings = settings.model_copy(update={"similarity_rank": rank})
    with progress_bar("factorizing", enabled=not as_json) as progress:
        src = _open(source, settings, progress)
        tgt = _open(target, settings, progress)
        comparison = compare_bases(src, tgt, settings)
    plots = (
        []
        if plot is None
        else comparison.plot(plot, source_label=src.label, target_label=tgt.label)
    )
    document = _atc_document(comparison, src.label, tgt.label)
    document["plot"] = None if plot is None else str(plot)
    document["plots"] = [str(p) for p in plots]
    if as_json:
        emit_json(document)
    else:
        from migrator.documents import ModuleCounts

        _print_atc(document, ModuleCounts.of_decisions(comparison.decisions), plot, wide=wide)


def _transfer_document(
    carried: CarriedAdapter, comparison: BaseComparison | None, files: list[Path]
) -> dict[str, Any]:
    from migrator.documents import ModuleCounts

    result = carried.result
    atc = None if comparison is None else comparison.atc
    counts = ModuleCounts.of_transfer(result, None if comparison is None else comparison.decisions)
    return {
        "modules_transferred": result.modules_transferred,
        "modules_rematched": result.modules_rematched,
        "modules_skipped": result.modules_skipped,
        "module_counts": counts.document(),
        "energy_retained": result.energy_retained,
        "atc": None if atc is None else atc.atc,
        "atc_left": None if atc is None else atc.atc_left,
        "atc_right": None if atc is None else atc.atc_right,
        "adapter_weighted_similarity": result.adapter_weighted_similarity,
        "mode": result.mode.value,
        "is_lorax": result.is_lorax,
        "layout": carried.layout.value,
        "files": [str(f) for f in files],
        "notes": list(result.notes),
        "modules_left_out": _left_out(result),
        "conversions": _conversions(result),
    }


def _left_out(result: TransferResult) -> list[dict[str, Any]]:
    """Every adapter module whose update reaches no target module: name, target, reason."""
    targets = {r.source: r.target for r in result.modules if r.rank == 0}
    return [
        {"module": name, "target": targets.get(name), "reason": why}
        for name, why in result.left_out
    ]


def _conversions(result: TransferResult) -> list[dict[str, Any]]:
    """LyCORIS modules that became LoRA modules, with the energy each kept."""
    return [
        {"key": c.key, "kind": c.kind, "rank": c.rank, "energy_kept": c.energy_kept}
        for c in result.adapter.conversions
    ]


def _refuse_partial(document: dict[str, Any], as_json: bool) -> NoReturn:
    """List the left-out modules on stderr (and the figures as JSON, no files) and exit 1."""
    left_out = document["modules_left_out"]
    for item in left_out:
        err.print(f"left out: {item['module']}: {item['reason']}", markup=False, highlight=False)
    if as_json:
        emit_json(document)
    fail(
        f"{len(left_out)} adapter module(s) reach no module of the target; nothing written "
        "(--allow-partial writes the rest)"
    )


def _print_transfer(document: dict[str, Any], title: str) -> None:
    c = document["module_counts"]
    fields(
        title,
        [
            (
                "target modules: same name / rematched / skipped",
                f"{c['target_same_name']} / {c['target_rematched']} / {c['target_skipped']}",
            ),
            ("adapter modules left out", f"{c['adapter_left_out']} of {c['adapter_modules']}"),
            ("energy retained", f"{document['energy_retained']:.1%}"),
            ("ATC", fmt_atc(document["atc"])),
        ],
    )
    for note in document["notes"]:
        out.print(f"note: {note}", markup=False)
    for item in document["modules_left_out"]:
        out.print(f"left out: {item['module']} ({item['reason']})", markup=False)
    for c in document["conversions"]:
        out.print(
            f"converted: {c['key']} ({c['kind']}) to a rank-{c['rank']} LoRA keeping "
            f"{c['energy_kept']:.1%} of its energy",
            markup=False,
        )
    if not document["is_lorax"]:
        out.print("note: the input is a plain LoRA, not a LoRA-X: expect a weaker transfer")
    out.print(f"wrote {', '.join(document['files'])}")


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
        TransferMode.PROJECT.value,
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
    if mode not in {m.value for m in TransferMode}:
        fail(f"--mode must be one of {MODES}, not {mode!r}", EXIT_BAD_INPUT)
    for spec in (adapter, source, target):
        _check_spec(spec)
    from migrator.adapters import carry_adapter, load_adapter, single_file_of, write_carried
    from migrator.bases import compare_bases

    settings = state.settings()
    with progress_bar("factorizing", enabled=not as_json) as progress:
        src = _open(source, settings, progress)
        tgt = _open(target, settings, progress)
        adapter_path, _, _ = _local(adapter, settings, "adapters")
        loaded = load_adapter(adapter_path, src, settings)
        comparison = compare_bases(src, tgt, settings) if match else None
        decisions = None if comparison is None else comparison.decisions
        atc = None if comparison is None else comparison.atc
        carried = carry_adapter(
            loaded, src, tgt, decisions, settings, mode=mode, rank=rank, atc=atc
        )
    if carried.result.left_out and not allow_partial:
        _refuse_partial(_transfer_document(carried, comparison, []), as_json)
    files = write_carried(carried, output, like=single_file_of(adapter_path))
    document = _transfer_document(carried, comparison, files)
    if as_json:
        emit_json(document)
    else:
        _print_transfer(document, f"{adapter}: {src.label} -> {tgt.label} ({document['mode']})")
