"""Where a base model's weight files are: the layouts :class:`core.weights.WeightSource` reads.

- a single ``.safetensors`` file (or a checkpoint index naming its shards);
- a folder of ``.safetensors`` files, or a sharded checkpoint with a ``*.safetensors.index.json``;
- a diffusers pipeline folder: sub-folders (``unet/``, ``text_encoder/``, ...) each holding
  ``diffusion_pytorch_model*.safetensors`` or ``model*.safetensors``; their module names are
  prefixed with the sub-folder name (``unet.down_blocks.0...``);
- an MLflow transformers-flavour folder (an ``MLmodel`` file; weights under ``model/`` or
  ``components/<name>/``).

Variant files (``model.fp16.safetensors``) are dropped when a plain counterpart exists. Pickle
checkpoints are found too (``.bin``, ``.pt``, ``.pth``, ``.ckpt``), marked as such: whether to read
them is the caller's decision.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import CorruptFileError, InputError, UnknownLayoutError

__all__ = ["PICKLE_SUFFIXES", "PickleCheckpoints", "WeightPart", "find_weight_files"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state", "scaler")


@dataclass(frozen=True)
class WeightPart:
    """Weight files of one part of a model.

    Attributes:
        prefix: the module-name prefix of the part (a pipeline sub-folder), or "".
        files: its weight files.
        pickle: whether they are pickle checkpoints.
    """

    prefix: str
    files: tuple[Path, ...]
    pickle: bool


def _is_pickle(path: Path) -> bool:
    return path.suffix in PICKLE_SUFFIXES and not path.name.startswith(_NOT_WEIGHTS)


def _base(name: str) -> str:
    return re.split(r"[.-]", name, maxsplit=1)[0]


def _prefer_standard(files: Sequence[Path], suffix: str) -> list[Path]:
    """Drop variant files (``model.fp16.safetensors``) that have a plain counterpart
    (``model.safetensors`` or ``model-00001-of-00002.safetensors``)."""
    plain = {_base(f.name) for f in files if "." not in f.name[: -len(suffix)]}
    return [f for f in files if "." not in f.name[: -len(suffix)] or _base(f.name) not in plain]


def _pick_index(indexes: Sequence[Path], suffix: str, folder: Path) -> Path:
    chosen = _prefer_standard(indexes, suffix)
    if len(chosen) > 1:
        names = ", ".join(i.name for i in chosen)
        raise UnknownLayoutError(f"several checkpoint indexes ({names})", path=folder)
    return chosen[0]


def _index_files(index: Path) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptFileError(f"unreadable checkpoint index ({exc!r})", path=index) from exc
    files = tuple(index.parent / name for name in names)
    for file in files:
        if not file.is_file():
            raise CorruptFileError(f"index names missing shard {file.name}", path=index)
    return files


def _flat_weights(folder: Path) -> tuple[tuple[Path, ...], bool] | None:
    """Weight files directly in ``folder`` as (files, is_pickle), or None.

    Order of preference: a safetensors index, safetensors files, a pickle index, pickle files.
    """
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return _index_files(_pick_index(indexes, ".safetensors.index.json", folder)), False
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return tuple(_prefer_standard(files, ".safetensors")), False
    indexes = sorted(folder.glob("*.bin.index.json"))
    if indexes:
        return _index_files(_pick_index(indexes, ".bin.index.json", folder)), True
    pickles = sorted(f for f in folder.iterdir() if f.is_file() and _is_pickle(f))
    return (tuple(pickles), True) if pickles else None


def find_weight_files(root: Path, subfolders: Sequence[str] | None) -> list[WeightPart]:
    """The weight files under ``root``, by part (see the module docstring for the layouts).

    Args:
        root: a file or folder.
        subfolders: only these sub-folders of a pipeline (each must hold weights).

    Raises:
        InputError: no weights found (with a hint when some lie deeper), or a requested
            sub-folder without weights.
        CorruptFileError: an unreadable index or a missing shard.
        UnknownLayoutError: not a weight file; several candidate indexes.
    """
    if root.is_file():
        if root.name.endswith(".index.json"):
            return [WeightPart("", _index_files(root), root.name.endswith(".bin.index.json"))]
        if root.suffix == ".safetensors":
            return [WeightPart("", (root,), False)]
        if root.suffix in PICKLE_SUFFIXES:
            return [WeightPart("", (root,), True)]
        raise UnknownLayoutError("not a safetensors file, index or known checkpoint", path=root)
    if subfolders is not None:
        parts = []
        for sub in subfolders:
            found = _flat_weights(root / sub) if (root / sub).is_dir() else None
            if found is None:
                raise InputError(f"sub-folder {sub!r} holds no weights", path=root)
            parts.append(WeightPart(sub, *found))
        return parts
    if (root / "MLmodel").is_file():
        model = root / "model"
        if model.is_dir() and (_flat_weights(model) or _child_weights(model)):
            return find_weight_files(model, None)
        components = root / "components"
        parts_found = _child_weights(components) if components.is_dir() else []
        if len(parts_found) == 1:
            return [WeightPart("", parts_found[0].files, parts_found[0].pickle)]
        if parts_found:
            return parts_found
    flat = _flat_weights(root)
    if flat is not None:
        return [WeightPart("", *flat)]
    children = _child_weights(root)
    if children:
        return children
    hint = next(iter(sorted(root.rglob("*.safetensors"))), None)
    extra = f"; found {hint.relative_to(root)}: pass weights_path" if hint else ""
    raise InputError(f"no safetensors weights found{extra}", path=root)


def _child_weights(root: Path) -> list[WeightPart]:
    parts = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        found = _flat_weights(child)
        if found is not None:
            parts.append(WeightPart(child.name, *found))
    return parts


class PickleCheckpoints:
    """Loads pickle checkpoints with ``torch.load(weights_only=True)``, keeping the last one."""

    def __init__(self) -> None:
        self._loaded: tuple[Path, dict[str, torch.Tensor]] | None = None

    def load(self, file: Path) -> dict[str, torch.Tensor]:
        """The tensors of ``file`` (a dict, or a dict under ``state_dict``).

        Raises:
            CorruptFileError: the file does not load with ``weights_only=True``.
            UnknownLayoutError: it does not hold a dict of tensors.
        """
        if self._loaded is not None and self._loaded[0] == file:
            return self._loaded[1]
        try:
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for bad or unsafe pickles
            raise CorruptFileError(
                f"cannot load checkpoint with weights_only=True ({exc})", path=file
            ) from exc
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise UnknownLayoutError("checkpoint is not a dict of tensors", path=file)
        state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self._loaded = (file, state)
        return state
