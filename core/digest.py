"""Content digests of tensors: the keys of the factorization cache and of compact LoRA-X files.

The digest covers the stored dtype, the shape and the raw little-endian bytes, so the same tensor
gives the same digest whether it is read from a safetensors file (without decoding it) or taken
from memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch

__all__ = ["DTYPE_NAMES", "bytes_digest", "tensor_digest"]

# safetensors dtype names, used in digests so that file and memory agree.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def bytes_digest(dtype: str, shape: Sequence[int], chunks: Iterable[bytes]) -> str:
    """Digest of a tensor given as its safetensors dtype name, shape and raw bytes.

    Returns:
        ``"sha256:<hex>"``.
    """
    h = hashlib.sha256()
    h.update(f"{dtype}:{','.join(str(int(s)) for s in shape)}:".encode())
    for chunk in chunks:
        h.update(chunk)
    return "sha256:" + h.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """Digest of an in-memory tensor; equal to :func:`bytes_digest` of the same stored tensor."""
    name = DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise TypeError(f"no digest for dtype {tensor.dtype}")
    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return bytes_digest(name, tuple(tensor.shape), [raw])
