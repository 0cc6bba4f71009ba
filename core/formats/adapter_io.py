"""The two entry points: :func:`read_adapter` (any layout, auto-detected) and :func:`write_adapter`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from core.adapter import AdapterKind, AdapterLayout, LoraAdapter
from core.errors import InputError
from core.formats.compact import read_compact, write_compact
from core.formats.detect import layout_of_keys, peft_folder_of
from core.formats.diffusers import read_diffusers, write_diffusers
from core.formats.kohya import read_kohya, write_kohya
from core.formats.lycoris import LycorisOptions
from core.formats.peft import read_peft, write_peft
from core.formats.resolve import resolve_modules
from core.formats.tensorfile import read_pickle, read_safetensors
from core.weights import PICKLE_SUFFIXES

__all__ = ["DEFAULT_FILE_NAMES", "read_adapter", "write_adapter"]

# File names used when a single-file layout is written into a folder.
DEFAULT_FILE_NAMES = {
    AdapterLayout.KOHYA: "lora.safetensors",
    AdapterLayout.DIFFUSERS: "pytorch_lora_weights.safetensors",
    AdapterLayout.COMPACT: "lorax_compact.safetensors",
}


def read_adapter(
    path: str | Path,
    *,
    base_modules: Mapping[str, tuple[int, int]] | None = None,
    allow_pickle: bool = False,
    lycoris: LycorisOptions | None = None,
) -> LoraAdapter:
    """Read an adapter in any supported layout, detected from the path, keys and metadata.

    Args:
        path: a PEFT folder (or its weights file), or a kohya, diffusers or compact LoRA-X
            ``.safetensors`` file (a pickle only with ``allow_pickle``).
        base_modules: base module name -> (m, n); when given, module names are resolved onto the
            base's (:func:`core.formats.resolve_modules`, strict) and shapes are checked.
        allow_pickle: opt in to pickle files (loaded with ``torch.load(weights_only=True)``).
        lycoris: how LyCORIS modules (LoHa, LoKr, ...) of a kohya file become LoRA modules
            (default :class:`core.formats.lycoris.LycorisOptions`).

    Returns:
        The adapter; names resolved to base names when ``base_modules`` is given.

    Raises:
        InputError: a missing path; and its subclasses: PickleRefusedError, CorruptFileError
            (truncated or unreadable), NonFiniteError, UnknownLayoutError, UnpairedTensorError,
            ShapeMismatchError, MissingModuleError, each naming the file and the key.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("no such adapter file or folder", path=p)
    folder = peft_folder_of(p)
    if folder is not None:
        adapter = read_peft(folder, allow_pickle=allow_pickle)
    elif p.is_dir():
        adapter = _read_single_file_in(p, allow_pickle=allow_pickle, lycoris=lycoris)
    else:
        adapter = _read_file(p, allow_pickle=allow_pickle, lycoris=lycoris)
    if base_modules is not None:
        adapter, _ = resolve_modules(adapter, base_modules, strict=True)
    return adapter


def _read_single_file_in(
    folder: Path, *, allow_pickle: bool, lycoris: LycorisOptions | None
) -> LoraAdapter:
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) != 1:
        raise InputError(
            f"folder is not a PEFT adapter and holds {len(candidates)} safetensors files "
            "(expected adapter_config.json, or exactly one adapter file)",
            path=folder,
        )
    return _read_file(candidates[0], allow_pickle=allow_pickle, lycoris=lycoris)


def _read_file(path: Path, *, allow_pickle: bool, lycoris: LycorisOptions | None) -> LoraAdapter:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        tensor_file = read_pickle(path, allow_pickle=allow_pickle)
    else:
        tensor_file = read_safetensors(path)
    layout = layout_of_keys(list(tensor_file.tensors), dict(tensor_file.metadata), path=path)
    if layout is AdapterLayout.COMPACT:
        return read_compact(tensor_file)
    if layout is AdapterLayout.KOHYA:
        return read_kohya(tensor_file, lycoris=lycoris)
    return read_diffusers(tensor_file)


def write_adapter(
    adapter: LoraAdapter,
    out_path: str | Path,
    *,
    layout: AdapterLayout | None = None,
    fold_scale: bool | None = None,
) -> list[Path]:
    """Write an adapter, atomically, in its own layout or another one.

    Args:
        adapter: the adapter. Keys keep the prefixes the adapter was read with (same layout);
            a conversion derives them from the module names.
        out_path: a folder for PEFT; a file for kohya, diffusers and compact (an existing folder
            gets the file :data:`DEFAULT_FILE_NAMES` names).
        layout: the layout to write; default the adapter's own.
        fold_scale: PEFT only: see :func:`core.formats.peft.write_peft`.

    Returns:
        The files written.

    Raises:
        ValueError: an empty adapter; a compact adapter to an expanded layout (decode it first)
            or an expanded one to the compact layout (encode it first).
    """
    target = adapter.layout if layout is None else AdapterLayout(layout)
    if not adapter.modules:
        raise ValueError("the adapter has no modules to write")
    compact = adapter.kind is AdapterKind.LORAX_COMPACT
    if compact != (target is AdapterLayout.COMPACT):
        raise ValueError(
            "a compact LoRA-X is written only as compact (decode_compact it for other layouts)"
            if compact
            else "only a compact LoRA-X is written as compact (use encode_compact first)"
        )
    out = Path(out_path)
    if target is AdapterLayout.PEFT:
        return write_peft(adapter, out, fold_scale=fold_scale)
    if out.is_dir():
        out = out / DEFAULT_FILE_NAMES[target]
    if target is AdapterLayout.COMPACT:
        return write_compact(adapter, out)
    if target is AdapterLayout.KOHYA:
        return write_kohya(adapter, out)
    return write_diffusers(adapter, out)
