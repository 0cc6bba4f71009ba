"""Reading and writing the tensor files adapters live in: safetensors, and pickles on request.

Every reader here turns library exceptions into the typed errors of :mod:`core.errors`, naming
the file (and the tensor key), and checks every tensor for NaN/Inf. Every writer is atomic: it
writes a temporary file (or folder) next to the target and renames it over the target, so a crash
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from core.errors import CorruptFileError, NonFiniteError, PickleRefusedError
from core.finite import all_finite
from core.safetensors_header import read_header

__all__ = [
    "TensorFile",
    "check_finite",
    "json_writer",
    "read_pickle",
    "read_safetensors",
    "safetensors_writer",
    "write_folder_atomic",
    "write_safetensors_atomic",
]


@dataclass(frozen=True, eq=False)
class TensorFile:
    """The tensors and the string metadata of one file.

    Attributes:
        path: the file read.
        tensors: key -> tensor, in file order.
        metadata: the safetensors ``__metadata__`` (empty for pickles).
    """

    path: Path
    tensors: Mapping[str, torch.Tensor]
    metadata: Mapping[str, str] = field(default_factory=dict)


def check_finite(tensor: torch.Tensor, *, path: str | Path, key: str) -> None:
    """Raise :class:`NonFiniteError` naming ``path`` and ``key`` if ``tensor`` holds NaN or Inf."""
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(f"tensor holds {bad} NaN/Inf values", path=path, key=key)


def read_safetensors(path: str | Path) -> TensorFile:
    """Every tensor and the metadata of a safetensors file, each tensor checked for NaN/Inf.

    The header is checked first (:func:`core.safetensors_header.read_header`), so a truncated
    file is reported with the tensor it cuts into.

    Raises:
        CorruptFileError: truncated file, bad header, or not safetensors at all.
        NonFiniteError: a tensor holding NaN or Inf (names the key).
    """
    read_header(path)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():  # noqa: SIM118 - safe_open handles have no __iter__
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(f"not a readable safetensors file ({exc})", path=path) from exc
    for key, tensor in tensors.items():
        check_finite(tensor, path=path, key=key)
    return TensorFile(path=Path(path), tensors=tensors, metadata=metadata)


def read_pickle(path: str | Path, *, allow_pickle: bool) -> TensorFile:
    """The tensors of a pickle checkpoint, only when the caller opted in.

    Loading uses ``torch.load(weights_only=True)``, which refuses arbitrary objects even then.

    Raises:
        PickleRefusedError: ``allow_pickle`` is False.
        CorruptFileError: the pickle cannot be loaded, or does not hold a dict of tensors.
        NonFiniteError: a tensor holding NaN or Inf.
    """
    if not allow_pickle:
        raise PickleRefusedError(
            "pickle checkpoints can run code when loaded and are refused; convert the adapter "
            "to safetensors, or opt in with allow_pickle=True if you trust the file",
            path=path,
        )
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad pickles
        raise CorruptFileError(f"cannot load pickle checkpoint ({exc})", path=path) from exc
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise CorruptFileError("pickle checkpoint does not hold a dict of tensors", path=path)
    for key, tensor in loaded.items():
        check_finite(tensor, path=path, key=key)
    return TensorFile(path=Path(path), tensors=dict(loaded), metadata={})


def _umask() -> int:
    """The process's umask, read without changing it where the kernel tells (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(current)
    return current


def _publish_mode(path: Path, *, folder: bool = False) -> None:
    """Give a file (0666) or folder (0777) made by mkstemp/mkdtemp (0600/0700) the mode the
    umask gives an ordinary new one, so that a shared artifact volume can read what is written."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Run ``write(tmp_path)`` on a temporary file beside ``path``, then rename it onto ``path``
    (with the mode the umask gives a new file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safetensors_writer(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Callable[[Path], None]:
    """A function writing ``tensors`` (contiguous, on the CPU) and string ``metadata`` to a path."""
    ready = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in metadata.items()}
    return lambda path: save_file(ready, str(path), metadata=meta)


def json_writer(document: object) -> Callable[[Path], None]:
    """A function writing ``document`` as indented JSON with sorted keys to a path."""
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"

    def write(path: Path) -> None:
        path.write_text(text, encoding="utf-8")

    return write


def write_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str | Path
) -> Path:
    """Write a safetensors file atomically (temporary file, then rename). Returns the path."""
    out = Path(path)
    _replace_atomically(out, safetensors_writer(tensors, metadata))
    return out


def write_folder_atomic(
    folder: str | Path, writers: Mapping[str, Callable[[Path], object]]
) -> list[Path]:
    """Write several files into a folder so that a crash never leaves a half-written set.

    A new folder is filled under a temporary name and renamed into place in one step. In an
    existing folder each file is replaced atomically, in the order given (put the file whose
    presence marks the set as complete, such as a config, last).

    Args:
        folder: the output folder.
        writers: file name -> function writing that file to a given path.

    Returns:
        The paths written, in order.
    """
    out = Path(folder)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            for name, write in writers.items():
                write(tmp / name)
                _publish_mode(tmp / name)
            _publish_mode(tmp, folder=True)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        for name, write in writers.items():
            _replace_atomically(out / name, write)
    return [out / name for name in writers]
