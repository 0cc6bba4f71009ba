"""Stream the 2-D weights of a base model from safetensors, one tensor at a time.

:meth:`WeightSource.open` understands these layouts (see DESIGN.md, "Registry conventions"):

- a single ``.safetensors`` file;
- a folder of ``.safetensors`` files, or a sharded checkpoint with a ``*.safetensors.index.json``;
- a diffusers pipeline folder: sub-folders (``unet/``, ``text_encoder/``, ...) each holding
  ``diffusion_pytorch_model*.safetensors`` or ``model*.safetensors``; module names are prefixed
  with the sub-folder name (``unet.down_blocks.0...``);
- an MLflow transformers-flavour folder (an ``MLmodel`` file; weights under ``model/`` or
  ``components/<name>/``).

Opening reads file headers only (keys, dtypes, shapes, byte offsets). :meth:`WeightSource.matrix`
loads exactly one tensor. Pickle checkpoints are refused unless ``allow_pickle=True``; then they
are read with ``torch.load(weights_only=True)``, which loads a whole file (memory-mapped where the
file format allows it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors import SafetensorError, safe_open

from core.digest import DTYPE_NAMES, bytes_digest, tensor_digest
from core.errors import (
    CorruptFileError,
    InputError,
    MissingModuleError,
    NonFiniteError,
    PickleRefusedError,
    UnknownLayoutError,
)
from core.finite import all_finite
from core.safetensors_header import TensorEntry, read_header

__all__ = ["ModuleInfo", "WeightSource"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state", "scaler")
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModuleInfo:
    """A weight that can be factorized, as listed from file headers.

    Attributes:
        name: module name (key without ``.weight``, prefixed by a diffusers sub-folder).
        key: the tensor key inside ``file``.
        shape: (m, n) = (out, in), the matrix the math sees.
        stored_shape: the stored shape ((out, in, 1, 1) for a 1x1 convolution).
        dtype: the stored safetensors dtype name (``F32``, ``F16``, ``BF16``, ...).
        file: the file holding the tensor.
    """

    name: str
    key: str
    shape: tuple[int, int]
    stored_shape: tuple[int, ...]
    dtype: str
    file: Path


@dataclass(frozen=True)
class _Part:
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


def _resolve(root: Path, subfolders: Sequence[str] | None) -> list[_Part]:
    """Find the weight files under ``root`` (see the module docstring for the layouts)."""
    if root.is_file():
        if root.name.endswith(".index.json"):
            return [_Part("", _index_files(root), root.name.endswith(".bin.index.json"))]
        if root.suffix == ".safetensors":
            return [_Part("", (root,), False)]
        if root.suffix in PICKLE_SUFFIXES:
            return [_Part("", (root,), True)]
        raise UnknownLayoutError("not a safetensors file, index or known checkpoint", path=root)
    if subfolders is not None:
        parts = []
        for sub in subfolders:
            found = _flat_weights(root / sub) if (root / sub).is_dir() else None
            if found is None:
                raise InputError(f"sub-folder {sub!r} holds no weights", path=root)
            parts.append(_Part(sub, *found))
        return parts
    if (root / "MLmodel").is_file():
        model = root / "model"
        if model.is_dir() and (_flat_weights(model) or _child_weights(model)):
            return _resolve(model, None)
        components = root / "components"
        parts_found = _child_weights(components) if components.is_dir() else []
        if len(parts_found) == 1:
            return [_Part("", parts_found[0].files, parts_found[0].pickle)]
        if parts_found:
            return parts_found
    flat = _flat_weights(root)
    if flat is not None:
        return [_Part("", *flat)]
    children = _child_weights(root)
    if children:
        return children
    hint = next(iter(sorted(root.rglob("*.safetensors"))), None)
    extra = f"; found {hint.relative_to(root)}: pass weights_path" if hint else ""
    raise InputError(f"no safetensors weights found{extra}", path=root)


def _child_weights(root: Path) -> list[_Part]:
    parts = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        found = _flat_weights(child)
        if found is not None:
            parts.append(_Part(child.name, *found))
    return parts


def _classify(dtype: str, shape: tuple[int, ...]) -> tuple[int, int] | str:
    """The (m, n) matrix shape of a stored weight, or the reason it is not a matrix."""
    if dtype not in _FLOAT_DTYPES:
        return f"dtype {dtype} is not a floating-point weight"
    if len(shape) == 4 and shape[2:] != (1, 1):
        return (
            f"convolution with a {shape[2]}x{shape[3]} kernel: only 1x1 convolutions are matrices"
        )
    if len(shape) not in (2, 4):
        return f"{len(shape)}-D tensor, not a matrix"
    if shape[0] == 0 or shape[1] == 0:
        return "empty matrix"
    return (shape[0], shape[1])


class WeightSource:
    """Read-only access to the matrices of one base model, one tensor at a time.

    Build with :meth:`open`. Not thread-safe (the pickle path keeps one loaded file).
    """

    def __init__(
        self, path: Path, parts: Sequence[_Part], ignored: Mapping[Path, str] | None = None
    ) -> None:
        self.path = path
        self._parts = tuple(parts)
        self.ignored: Mapping[Path, str] = MappingProxyType(dict(ignored or {}))
        """Folders left out of a multi-part layout, with the reason."""
        self._modules: dict[str, ModuleInfo] = {}
        self._entries: dict[str, TensorEntry] = {}
        self._skipped: dict[str, str] = {}
        self._digests: dict[str, str] = {}
        self._pickled: tuple[Path, dict[str, torch.Tensor]] | None = None
        seen: dict[str, Path] = {}
        for part in self._parts:
            for file in part.files:
                for key, dtype, shape, entry in self._list(file, part.pickle):
                    if not key.endswith(".weight"):
                        continue
                    name = key[: -len(".weight")]
                    name = f"{part.prefix}.{name}" if part.prefix else name
                    if name in seen:
                        raise UnknownLayoutError(
                            f"weight {key!r} is in both {seen[name].name} and {file.name}",
                            path=file,
                        )
                    seen[name] = file
                    kind = _classify(dtype, shape)
                    if isinstance(kind, str):
                        self._skipped[name] = kind
                        continue
                    self._modules[name] = ModuleInfo(name, key, kind, shape, dtype, file)
                    if entry is not None:
                        self._entries[name] = entry

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        allow_pickle: bool = False,
        subfolders: Sequence[str] | None = None,
        weights_path: str | None = None,
    ) -> WeightSource:
        """Open a base model's weights (headers only).

        Args:
            path: a file or folder in one of the layouts of the module docstring.
            allow_pickle: accept ``.bin``/``.pt``/``.pth``/``.ckpt`` checkpoints, loaded with
                ``torch.load(weights_only=True)``.
            subfolders: restrict a diffusers pipeline to these sub-folders (names keep the
                ``<sub-folder>.`` prefix).
            weights_path: a sub-path of ``path`` to read instead (``lorax.weights_path``).

        Raises:
            InputError: the path does not exist or holds no weights.
            PickleRefusedError: only pickle checkpoints were found (or a requested sub-folder
                holds only pickles) and ``allow_pickle`` is False. Pickle-only sub-folders of a
                pipeline whose other sub-folders are safetensors are left out instead (listed in
                :attr:`ignored`).
            CorruptFileError: a truncated or unreadable safetensors file or index.
            UnknownLayoutError: files that no layout explains (e.g. a key in two files).
        """
        root = Path(path)
        if weights_path:
            root = root / weights_path
        if not root.exists():
            raise InputError("no such file or folder", path=root)
        parts = _resolve(root, subfolders)
        refused = [part for part in parts if part.pickle and not allow_pickle]
        if refused and (len(refused) == len(parts) or subfolders is not None):
            raise PickleRefusedError(
                "pickle checkpoints can run code when loaded and are refused; convert them "
                "to safetensors or pass allow_pickle=True",
                path=refused[0].files[0],
            )
        # a pipeline whose other parts are safetensors: leave the pickle-only parts out, saying so
        ignored = {
            part.files[0].parent: "pickle-only sub-folder left out (allow_pickle=False)"
            for part in refused
        }
        return cls(root, [part for part in parts if part not in refused], ignored)

    def _list(
        self, file: Path, pickle: bool
    ) -> Iterator[tuple[str, str, tuple[int, ...], TensorEntry | None]]:
        if not pickle:
            for key, entry in read_header(file).tensors.items():
                yield key, entry.dtype, entry.shape, entry
            return
        for key, tensor in self._load_pickle(file).items():
            yield key, DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape), None

    def _load_pickle(self, file: Path) -> dict[str, torch.Tensor]:
        if self._pickled is not None and self._pickled[0] == file:
            return self._pickled[1]
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
        self._pickled = (file, state)
        return state

    @property
    def layout(self) -> str:
        """``single``, ``multi-part`` (diffusers/components) or ``pickle``, for messages."""
        if any(p.pickle for p in self._parts):
            return "pickle"
        return "multi-part" if any(p.prefix for p in self._parts) else "single"

    @property
    def parts(self) -> tuple[tuple[str, tuple[Path, ...], bool], ...]:
        """(name prefix, files, is_pickle) of each part read: what :mod:`core.drift` streams
        every tensor (not only the matrices) from."""
        return tuple((part.prefix, part.files, part.pickle) for part in self._parts)

    def pickled(self, file: Path) -> Mapping[str, torch.Tensor]:
        """Every tensor of one pickle checkpoint of this source (the last one loaded is kept)."""
        return MappingProxyType(self._load_pickle(file))

    @property
    def files(self) -> tuple[Path, ...]:
        """Every weight file read."""
        return tuple(f for part in self._parts for f in part.files)

    @property
    def names(self) -> tuple[str, ...]:
        """Module names of every matrix, in file order."""
        return tuple(self._modules)

    def modules(self) -> tuple[ModuleInfo, ...]:
        """Every 2-D weight and 1x1 convolution; see :meth:`skipped` for the rest."""
        return tuple(self._modules.values())

    def skipped(self) -> Mapping[str, str]:
        """``.weight`` tensors that are not matrices, with the reason (e.g. 3x3 convolutions)."""
        return MappingProxyType(self._skipped)

    def __contains__(self, name: object) -> bool:
        return name in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def info(self, name: str) -> ModuleInfo:
        """The :class:`ModuleInfo` of ``name``.

        Raises:
            MissingModuleError: no such matrix (the message gives the skip reason if any).
        """
        try:
            return self._modules[name]
        except KeyError:
            why = self._skipped.get(name, "no weight of that name")
            raise MissingModuleError(
                f"not a usable matrix: {why}", path=self.path, key=name
            ) from None

    def stored_tensor(self, name: str) -> torch.Tensor:
        """The tensor of ``name`` as stored (dtype and shape), loading only that tensor.

        Raises:
            MissingModuleError, CorruptFileError.
        """
        info = self.info(name)
        if info.name not in self._entries:
            return self._load_pickle(info.file)[info.key].clone()
        try:
            with safe_open(info.file, framework="pt", device="cpu") as fh:
                return fh.get_tensor(info.key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CorruptFileError(
                f"cannot read tensor ({exc})", path=info.file, key=info.key
            ) from exc

    def matrix(self, name: str) -> torch.Tensor:
        """Load one weight as a float32 (m, n) matrix (1x1 convolutions reshaped).

        Raises:
            MissingModuleError, CorruptFileError.
            NonFiniteError: the tensor holds NaN or Inf (names file and key).
        """
        info = self.info(name)
        matrix = self.stored_tensor(name).to(torch.float32).reshape(info.shape)
        if not all_finite(matrix):
            bad = int((~torch.isfinite(matrix)).sum())
            raise NonFiniteError(
                f"{bad} NaN/Inf values in the weight", path=info.file, key=info.key
            )
        return matrix

    def digest(self, name: str) -> str:
        """Content digest of the stored tensor (:mod:`core.digest`), from the file's raw bytes.

        Equal to ``tensor_digest(self.stored_tensor(name))``; safetensors data is hashed without
        decoding, one chunk at a time.
        """
        cached = self._digests.get(name)
        if cached is not None:
            return cached
        info = self.info(name)
        entry = self._entries.get(name)
        if entry is None:
            digest = tensor_digest(self.stored_tensor(name))
        else:
            digest = bytes_digest(entry.dtype, entry.shape, self._chunks(info.file, entry))
        self._digests[name] = digest
        return digest

    @staticmethod
    def _chunks(file: Path, entry: TensorEntry) -> Iterator[bytes]:
        with file.open("rb") as fh:
            fh.seek(entry.begin)
            left = entry.end - entry.begin
            while left > 0:
                chunk = fh.read(min(_CHUNK, left))
                if not chunk:
                    raise CorruptFileError(
                        "file ended inside tensor data", path=file, key=entry.key
                    )
                left -= len(chunk)
                yield chunk

    def __repr__(self) -> str:
        return f"WeightSource({str(self.path)!r}, {len(self)} matrices, layout={self.layout})"
