"""Stream the matrices of a base model from safetensors, one tensor at a time, in one naming.

:meth:`WeightSource.open` reads the layouts of :mod:`core.weight_files` (a file, a folder, a
sharded checkpoint, a diffusers pipeline, an MLflow folder). Module names are canonical: a
diffusers pipeline's sub-folder prefixes them (``unet.down_blocks.0...``), and a single-file
Stable Diffusion checkpoint in LDM/SGM naming (``model.diffusion_model.input_blocks.4.1...``,
``conditioner.embedders.1.model.transformer.resblocks.N...``) is named as the same pipeline in
diffusers layout would be (:mod:`core.checkpoints.ldm_names`), so both layouts give the same
names, shapes and matrices. OpenCLIP's fused ``attn.in_proj_weight`` is three modules
``self_attn.{q,k,v}_proj``, each reading its row block of the stored tensor (its digest is the
digest of that block, so the factor cache stays keyed by content).

Every floating-point weight of two or more dimensions is a matrix, shape (m, n) = (out, in):
a convolution (out, in, kh, kw) is viewed as (out, in * kh * kw), so eq. 3 applies to it
unchanged. Opening reads file headers only; :meth:`WeightSource.matrix` loads exactly one tensor
(or one row block). Pickle checkpoints are refused unless ``allow_pickle=True``; then they are
read with ``torch.load(weights_only=True)``, which loads a whole file (memory-mapped where the
file format allows it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors import SafetensorError, safe_open

from core.checkpoints import (
    Architecture,
    UnetBlocks,
    architecture_of_base,
    is_ldm_checkpoint,
    map_checkpoint,
)
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
from core.weight_files import PICKLE_SUFFIXES, PickleCheckpoints, WeightPart, find_weight_files

__all__ = ["PICKLE_SUFFIXES", "ModuleInfo", "WeightSource"]

_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_CHUNK = 1 << 20
_WEIGHT = ".weight"


@dataclass(frozen=True)
class ModuleInfo:
    """A weight that can be factorized, as listed from file headers.

    Attributes:
        name: module name in the canonical naming (prefixed by a pipeline component).
        key: the tensor key inside ``file`` (for a row block, the fused tensor's key).
        shape: (m, n) = (out, in * kernel), the matrix the math sees.
        stored_shape: the module's own tensor shape ((out, in, kh, kw) for a convolution; for a
            row block or a transposed tensor, the block's or the transpose's shape).
        dtype: the stored safetensors dtype name (``F32``, ``F16``, ``BF16``, ...).
        file: the file holding the tensor.
        rows: [begin, end) rows of the stored tensor this module is (fused OpenCLIP q/k/v).
        transposed: the module's weight is the stored 2-D tensor transposed.
    """

    name: str
    key: str
    shape: tuple[int, int]
    stored_shape: tuple[int, ...]
    dtype: str
    file: Path
    rows: tuple[int, int] | None = None
    transposed: bool = False


@dataclass(frozen=True)
class _Stored:
    key: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    entry: TensorEntry | None


def _classify(dtype: str, shape: tuple[int, ...]) -> tuple[int, int] | str:
    """The (m, n) matrix shape of a stored weight, or the reason it is not a matrix."""
    if dtype not in _FLOAT_DTYPES:
        return f"dtype {dtype} is not a floating-point weight"
    if len(shape) < 2:
        return f"{len(shape)}-D tensor, not a matrix"
    if len(shape) > 5:
        return f"{len(shape)}-D tensor, not a matrix or a convolution"
    if any(s == 0 for s in shape):
        return "empty matrix"
    return (shape[0], math.prod(shape[1:]))


class WeightSource:
    """Read-only access to the matrices of one base model, one tensor at a time.

    Build with :meth:`open`. Not thread-safe (the pickle path keeps one loaded file).

    Attributes:
        path: the file or folder opened.
        ignored: folders left out of a multi-part layout, with the reason.
        naming: ``ldm`` when single-file LDM/SGM keys were renamed to the diffusers naming,
            ``native`` when names are the stored keys (prefixed by pipeline sub-folders).
        architecture: the Stable Diffusion family found (:mod:`core.checkpoints.architecture`),
            or None.
        unet_blocks: the UNet's block layout, when the model has a diffusers-named UNet.
    """

    def __init__(
        self,
        path: Path,
        parts: Sequence[WeightPart],
        ignored: Mapping[Path, str] | None = None,
        *,
        pickle_loader: PickleCheckpoints | None = None,
    ) -> None:
        self.path = path
        self._parts = tuple(parts)
        self.ignored: Mapping[Path, str] = MappingProxyType(dict(ignored or {}))
        self._modules: dict[str, ModuleInfo] = {}
        self._entries: dict[str, TensorEntry] = {}
        self._skipped: dict[str, str] = {}
        self._digests: dict[str, str] = {}
        self._pickles = pickle_loader or PickleCheckpoints()
        self.naming = "native"
        families: Mapping[str, str] | None = None
        for part in self._parts:
            stored = self._stored(part)
            if not part.prefix and is_ldm_checkpoint(stored):
                families = self._add_checkpoint(stored)
                self.naming = "ldm"
            else:
                for key, item in stored.items():
                    if key.endswith(_WEIGHT):
                        name = key[: -len(_WEIGHT)]
                        self._add(f"{part.prefix}.{name}" if part.prefix else name, item)
        shapes = {info.name: info.stored_shape for info in self._modules.values()}
        self.architecture: Architecture | None = architecture_of_base(shapes, families=families)
        unet = [n.removeprefix("unet.") for n in self._modules if n.startswith("unet.")]
        self.unet_blocks: UnetBlocks | None = UnetBlocks.from_diffusers_names(
            unet or list(self._modules)
        )

    def _stored(self, part: WeightPart) -> dict[str, _Stored]:
        stored: dict[str, _Stored] = {}
        for file in part.files:
            for key, dtype, shape, entry in self._list(file, part.pickle):
                if key in stored:
                    raise UnknownLayoutError(
                        f"tensor {key!r} is in both {stored[key].file.name} and {file.name}",
                        path=file,
                    )
                stored[key] = _Stored(key, dtype, shape, file, entry)
        return stored

    def _add(
        self,
        name: str,
        item: _Stored,
        rows: tuple[int, int] | None = None,
        transposed: bool = False,
    ) -> None:
        if name in self._modules or name in self._skipped:
            raise UnknownLayoutError(
                f"two weights are named {name!r}", path=item.file, key=item.key
            )
        shape = item.shape
        if rows is not None:
            shape = (rows[1] - rows[0], *shape[1:])
        elif transposed:
            if len(shape) != 2:
                self._skipped[name] = f"{len(shape)}-D tensor where a 2-D projection was expected"
                return
            shape = (shape[1], shape[0])
        kind = _classify(item.dtype, shape)
        if isinstance(kind, str):
            self._skipped[name] = kind
            return
        self._modules[name] = ModuleInfo(
            name, item.key, kind, shape, item.dtype, item.file, rows, transposed
        )
        if item.entry is not None:
            self._entries[name] = item.entry

    def _add_checkpoint(self, stored: Mapping[str, _Stored]) -> Mapping[str, str]:
        mapped = map_checkpoint({key: item.shape for key, item in stored.items()})
        for param, view in mapped.params.items():
            if param.endswith(_WEIGHT):
                self._add(param[: -len(_WEIGHT)], stored[view.key], view.rows, view.transpose)
        for key, why in mapped.unmapped.items():
            if key.endswith(_WEIGHT):
                self._skipped[key[: -len(_WEIGHT)]] = f"single-file checkpoint key: {why}"
        return mapped.families

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
            path: a file or folder in one of the layouts of :mod:`core.weight_files`.
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
        parts = find_weight_files(root, subfolders)
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
        for key, tensor in self._pickles.load(file).items():
            yield key, DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape), None

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
        """Every matrix (2-D weights and convolutions); see :meth:`skipped` for the rest."""
        return tuple(self._modules.values())

    def skipped(self) -> Mapping[str, str]:
        """``.weight`` tensors that are not matrices, with the reason (norms, integer tensors,
        single-file keys outside the name map)."""
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
        """The module's tensor in its stored dtype and :attr:`ModuleInfo.stored_shape`, loading
        only that tensor (only its row block for a fused q/k/v).

        Raises:
            MissingModuleError, CorruptFileError.
        """
        info = self.info(name)
        if info.name not in self._entries:
            tensor = self._pickles.load(info.file)[info.key]
            if info.rows is not None:
                tensor = tensor[info.rows[0] : info.rows[1]]
            return (tensor.T if info.transposed else tensor).contiguous().clone()
        try:
            with safe_open(info.file, framework="pt", device="cpu") as fh:
                if info.rows is not None:
                    tensor = fh.get_slice(info.key)[info.rows[0] : info.rows[1]]
                else:
                    tensor = fh.get_tensor(info.key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CorruptFileError(
                f"cannot read tensor ({exc})", path=info.file, key=info.key
            ) from exc
        return tensor.T.contiguous() if info.transposed else tensor

    def matrix(self, name: str) -> torch.Tensor:
        """Load one weight as a float32 (m, n) matrix (convolutions reshaped to
        (out, in * kh * kw)).

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
        """Content digest of the module's tensor (:mod:`core.digest`), from the file's raw bytes.

        Equal to ``tensor_digest(self.stored_tensor(name))``; safetensors data is hashed without
        decoding, one chunk at a time (a row block hashes only its rows' bytes).
        """
        cached = self._digests.get(name)
        if cached is not None:
            return cached
        info = self.info(name)
        entry = self._entries.get(name)
        if entry is None or info.transposed:
            digest = tensor_digest(self.stored_tensor(name))
        else:
            begin, end = entry.begin, entry.end
            if info.rows is not None:
                row_bytes = (end - begin) // max(entry.shape[0], 1)
                begin, end = begin + info.rows[0] * row_bytes, begin + info.rows[1] * row_bytes
            chunks = self._chunks(info.file, begin, end, entry.key)
            digest = bytes_digest(entry.dtype, info.stored_shape, chunks)
        self._digests[name] = digest
        return digest

    @staticmethod
    def _chunks(file: Path, begin: int, end: int, key: str) -> Iterator[bytes]:
        with file.open("rb") as fh:
            fh.seek(begin)
            left = end - begin
            while left > 0:
                chunk = fh.read(min(_CHUNK, left))
                if not chunk:
                    raise CorruptFileError("file ended inside tensor data", path=file, key=key)
                left -= len(chunk)
                yield chunk

    def __repr__(self) -> str:
        return f"WeightSource({str(self.path)!r}, {len(self)} matrices, layout={self.layout})"
