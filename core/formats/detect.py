"""Recognising an adapter's layout from its path, keys and metadata.

* a folder with ``adapter_config.json`` (or that file's ``adapter_model.safetensors``): PEFT;
* a safetensors file whose metadata says ``lorax.format = lorax-compact``: compact LoRA-X;
* keys ``lora_unet_*`` / ``lora_te*_`` with ``.lora_down.weight``: kohya;
* keys ending ``.lora_A.weight``, ``.lora.down.weight`` or ``_lora.down.weight``: diffusers;
* a pickle (``.bin``, ``.pt``, ``.pth``, ``.ckpt``): refused unless opted in, then by its keys.

PEFT weights without their ``adapter_config.json`` are refused: their scale is in the config.
"""

from __future__ import annotations

from pathlib import Path

from core.adapter import AdapterLayout
from core.errors import InputError, UnknownLayoutError
from core.formats.compact import is_compact_file
from core.formats.diffusers import looks_like_diffusers
from core.formats.kohya import looks_like_kohya
from core.formats.naming import PEFT_WRAPPER
from core.formats.peft import CONFIG_NAME, WEIGHTS_NAME
from core.safetensors_header import read_header
from core.weights import PICKLE_SUFFIXES

__all__ = ["detect_layout", "layout_of_keys", "peft_folder_of"]


def peft_folder_of(path: Path) -> Path | None:
    """The PEFT folder ``path`` is, or whose weights file it is; None otherwise."""
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return path
    if (
        path.is_file()
        and path.name in (WEIGHTS_NAME, CONFIG_NAME)
        and (path.parent / CONFIG_NAME).is_file()
    ):
        return path.parent
    return None


def layout_of_keys(keys: list[str], metadata: dict[str, str], *, path: str | Path) -> AdapterLayout:
    """The layout of a single-file adapter from its keys and metadata.

    Raises:
        UnknownLayoutError: no known layout (names the file and a sample key); PEFT keys without
            their config.
    """
    if is_compact_file(metadata):
        return AdapterLayout.COMPACT
    if looks_like_kohya(keys):
        return AdapterLayout.KOHYA
    if keys and all(k.startswith(PEFT_WRAPPER) for k in keys):
        raise UnknownLayoutError(
            f"PEFT adapter weights without their {CONFIG_NAME} (which holds the scale): pass the "
            "PEFT folder",
            path=path,
            key=keys[0],
        )
    if looks_like_diffusers(keys):
        return AdapterLayout.DIFFUSERS
    sample = keys[0] if keys else None
    raise UnknownLayoutError(
        "unknown adapter key layout (expected PEFT, kohya, diffusers or compact LoRA-X keys)"
        + ("" if keys else ": the file holds no tensors"),
        path=path,
        key=sample,
    )


def detect_layout(path: str | Path) -> AdapterLayout:
    """The layout of the adapter at ``path``, from its header only (no tensor is read).

    Pickle files are reported by their container only: their keys need loading (see
    :func:`core.formats.read_adapter`), so this raises for them.

    Raises:
        InputError: the path does not exist.
        UnknownLayoutError: no known layout, or a pickle file.
        CorruptFileError: an unreadable safetensors header.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("no such adapter file or folder", path=p)
    if peft_folder_of(p) is not None:
        return AdapterLayout.PEFT
    if p.is_dir():
        raise UnknownLayoutError(f"folder without {CONFIG_NAME}: not a PEFT adapter", path=p)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise UnknownLayoutError(
            "a pickle checkpoint: its layout is known only once loaded", path=p
        )
    header = read_header(p)
    return layout_of_keys(list(header.tensors), dict(header.metadata), path=p)
