"""Adapters on local files: load one onto its base, carry it to another base, write the result.

What ``migrator transfer``, the transfer job and remote workers share; no registry, no database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.adapter import AdapterKind, AdapterLayout, LoraAdapter
from core.atc import ATCResult
from core.decisions import ModuleDecision
from core.formats import (
    CoverageReport,
    decode_compact,
    encode_compact,
    read_adapter,
    resolve_modules,
    write_adapter,
)
from core.formats.peft import CONFIG_NAME
from core.transfer import TransferMode, TransferResult, transfer_adapter
from migrator.bases import OpenedBase
from migrator.errors import NothingToTransferError
from migrator.settings import Settings

__all__ = [
    "CarriedAdapter",
    "LoadedAdapter",
    "carry_adapter",
    "load_adapter",
    "single_file_of",
    "write_carried",
]


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter read from files and resolved onto its base's module names."""

    adapter: LoraAdapter
    coverage: CoverageReport
    input_kind: AdapterKind
    path: Path


def load_adapter(path: Path, base: OpenedBase, settings: Settings) -> LoadedAdapter:
    """Read an adapter (any layout), resolve it onto ``base`` and expand a compact LoRA-X.

    Raises:
        InputError and subclasses: unreadable file, unknown layout, a module the base lacks or
            whose shape differs, a compact LoRA-X made for another base tensor.
    """
    adapter = read_adapter(path, allow_pickle=settings.allow_pickle)
    adapter, coverage = resolve_modules(adapter, base.shapes(), strict=True)
    kind = adapter.kind
    if kind is AdapterKind.LORAX_COMPACT:
        factors = {name: base.store.factors(name) for name in adapter.modules}
        adapter = decode_compact(adapter, factors)
    return LoadedAdapter(adapter, coverage, kind, path)


@dataclass(frozen=True)
class CarriedAdapter:
    """A transferred adapter, ready to write, and its figures."""

    result: TransferResult
    adapter: LoraAdapter  # what to write: compact again when the input was compact

    @property
    def layout(self) -> AdapterLayout:
        return self.adapter.layout


def carry_adapter(
    loaded: LoadedAdapter,
    source: OpenedBase,
    target: OpenedBase,
    decisions: Sequence[ModuleDecision] | None,
    settings: Settings,
    *,
    mode: TransferMode | str | None = None,
    rank: int | None = None,
    atc: ATCResult | None = None,
) -> CarriedAdapter:
    """Transfer ``loaded`` from ``source`` to ``target`` under the given module decisions.

    With ``decisions`` None, modules go to the target module of the same name.

    Raises:
        NothingToTransferError: no module reaches the target.
        InputError and subclasses: see :func:`core.transfer.transfer_adapter`.
    """
    result = transfer_adapter(
        loaded.adapter,
        source.store,
        target.store,
        decisions,
        mode=TransferMode(mode or settings.transfer_mode),
        rank=rank if rank is not None else settings.transfer_rank,
        atc=atc,
    )
    if result.modules_transferred == 0:
        raise NothingToTransferError(
            f"no module of the adapter reaches a module of {target.label} with similarity >= "
            f"module_min_similarity ({settings.module_min_similarity}); nothing to transfer",
            path=loaded.path,
        )
    out = result.adapter
    if loaded.input_kind is AdapterKind.LORAX_COMPACT:
        out = encode_compact(out, {name: target.store.factors(name) for name in out.modules})
    return CarriedAdapter(result, out)


def single_file_of(path: Path) -> Path | None:
    """The adapter's one ``.safetensors`` file (a file itself, or the only one in a folder that
    is not a PEFT folder), whose name the written result keeps; None otherwise."""
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    if (path / CONFIG_NAME).exists():
        return None
    files = list(path.glob("*.safetensors"))
    return files[0] if len(files) == 1 else None


def write_carried(carried: CarriedAdapter, out: Path, *, like: Path | None = None) -> list[Path]:
    """Write the transferred adapter under ``out`` in its input layout.

    A PEFT adapter becomes the folder ``out``; a single-file adapter keeps the name of the input
    file ``like`` (see :func:`single_file_of`) inside ``out``, unless ``out`` ends in
    ``.safetensors``.
    """
    adapter = carried.adapter
    if adapter.layout is AdapterLayout.PEFT or out.suffix == ".safetensors":
        return write_adapter(adapter, out)
    out.mkdir(parents=True, exist_ok=True)
    if like is not None:
        return write_adapter(adapter, out / like.name)
    return write_adapter(adapter, out)
