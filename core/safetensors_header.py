"""Read and check the header of a safetensors file without reading tensor data.

A safetensors file is: an 8-byte little-endian header length N, N bytes of JSON mapping each key
to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data buffer) plus
an optional ``"__metadata__"`` object of strings, then the data buffer. Checking offsets against
the file size catches truncated downloads before any tensor is decoded; the absolute offsets let
:mod:`core.weights` hash a tensor's raw bytes (:mod:`core.digest`) without decoding it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from core.errors import CorruptFileError

__all__ = ["SafetensorsHeader", "TensorEntry", "read_header"]

_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
    "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a safetensors header. ``begin``/``end`` are absolute file offsets."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of a safetensors file: tensors in file order plus ``__metadata__``."""

    path: Path
    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and check a safetensors header without reading tensor data.

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the data buffer. Checks
    that every tensor's byte range lies inside the file and matches its dtype and shape.

    Raises:
        CorruptFileError: truncated file, unreadable header, or inconsistent offsets.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CorruptFileError(
                "file is shorter than a safetensors header (truncated?)", path=path
            )
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise CorruptFileError(
                f"header length {n} exceeds the file size {size} (truncated, or not safetensors)",
                path=path,
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"safetensors header is not valid JSON ({exc})", path=path) from exc
    if not isinstance(header, dict):
        raise CorruptFileError("safetensors header is not a JSON object", path=path)
    data_start, data_len = 8 + n, size - 8 - n
    tensors: dict[str, TensorEntry] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"malformed header entry ({exc!r})", path=path, key=key) from exc
        if not 0 <= begin <= end or any(s < 0 for s in shape):
            raise CorruptFileError("negative or reversed data offsets", path=path, key=key)
        if end > data_len:
            raise CorruptFileError(
                f"tensor data ends at byte {end} but the file holds {data_len} bytes of data "
                "(truncated?)",
                path=path,
                key=key,
            )
        itemsize = _DTYPE_SIZES.get(dtype)
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise CorruptFileError(
                f"{end - begin} bytes stored for a {dtype} tensor of shape {list(shape)}",
                path=path,
                key=key,
            )
        tensors[key] = TensorEntry(key, dtype, shape, data_start + begin, data_start + end)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CorruptFileError("__metadata__ is not a JSON object", path=path)
    return SafetensorsHeader(path, MappingProxyType(tensors), MappingProxyType(dict(meta)))
