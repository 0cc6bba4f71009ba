"""Weights-only drift between two bases, over every same-named tensor (not only the adapters').

ATC reads the singular subspaces of the adapter-location modules; a successor can keep those and
still compute something else (its feed-forward layers retrained or replaced, its embeddings
moved). Drift sees every floating-point tensor both bases hold under the same name:

    drift = ||theta_t - theta_s||_F / ||theta_s||_F
          = sqrt(sum_k ||W_t,k - W_s,k||_F^2 / sum_k ||W_s,k||_F^2)

over the compared tensors k (the relative change of the parameters as one vector, so large
tensors weigh by their size), plus the per-tensor relative changes ||W_t,k - W_s,k|| / ||W_s,k||
(median, largest), and the source tensors the target lacks or holds in another shape (a pruned
successor's dropped layers). Both bases are streamed one tensor, and a large tensor a block of
rows, at a time; no model is loaded. Names carry the diffusers sub-folder prefix, as in
:class:`core.weights.WeightSource`, and keep their suffix (``.weight``, ``.bias``).
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from core.errors import CorruptFileError, NonFiniteError
from core.safetensors_header import read_header
from core.weights import WeightSource

__all__ = ["TensorChange", "WeightDrift", "weight_drift"]

_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class TensorChange:
    """One tensor's relative change ||W_t - W_s||_F / ||W_s||_F (inf: a zero source tensor
    that changed)."""

    name: str
    relative: float
    parameters: int


@dataclass(frozen=True)
class WeightDrift:
    """Weights-only drift of a target base from a source base.

    Attributes:
        drift: ||theta_t - theta_s|| / ||theta_s|| over the compared tensors (0 if none).
        compared: same-named, same-shaped floating-point tensors compared.
        compared_parameters: their entries.
        source_tensors, source_parameters: floating-point tensors (entries) of the source.
        missing: source tensors with no same-named target tensor.
        reshaped: source tensors whose target namesake has another shape.
        target_only: target tensors with no same-named source tensor.
        median_relative: median per-tensor relative change (tensors of non-zero norm).
        largest: the five largest per-tensor changes, largest first.
        missing_examples: up to ten names of missing or reshaped source tensors.
    """

    drift: float
    compared: int
    compared_parameters: int
    source_tensors: int
    source_parameters: int
    missing: int
    reshaped: int
    target_only: int
    median_relative: float
    largest: tuple[TensorChange, ...]
    missing_examples: tuple[str, ...]
    missing_parameters: int = 0

    @property
    def missing_share(self) -> float:
        """Share of the source's tensors the target lacks or holds in another shape."""
        return (self.missing + self.reshaped) / self.source_tensors if self.source_tensors else 0.0

    @property
    def missing_parameter_share(self) -> float:
        """The same, counted in entries."""
        if not self.source_parameters:
            return 0.0
        return self.missing_parameters / self.source_parameters

    @property
    def max_relative(self) -> float:
        """The largest per-tensor relative change (0 if nothing compared)."""
        return self.largest[0].relative if self.largest else 0.0


@dataclass(frozen=True)
class _Ref:
    file: Path
    key: str
    shape: tuple[int, ...]
    pickle: bool


def _listing(source: WeightSource) -> dict[str, _Ref]:
    """Every floating-point tensor of ``source`` by (prefixed) name, in file order."""
    out: dict[str, _Ref] = {}
    for prefix, files, pickle in source.parts:
        for file in files:
            if pickle:
                items = [
                    (k, t.is_floating_point(), tuple(t.shape))
                    for k, t in source.pickled(file).items()
                ]
            else:
                items = [
                    (k, e.dtype in _FLOAT_DTYPES, e.shape)
                    for k, e in read_header(file).tensors.items()
                ]
            for key, is_float, shape in items:
                if is_float:
                    out[f"{prefix}.{key}" if prefix else key] = _Ref(file, key, shape, pickle)
    return out


class _Reader:
    """Row blocks of tensors, with one open safetensors handle per file."""

    def __init__(self, source: WeightSource, stack: contextlib.ExitStack) -> None:
        self.source, self.stack = source, stack
        self.handles: dict[Path, Any] = {}

    def blocks(self, ref: _Ref, rows: int) -> Iterator[torch.Tensor]:
        if ref.pickle:
            tensor = self.source.pickled(ref.file)[ref.key]
            for start in range(0, max(1, tensor.shape[0] if tensor.ndim else 1), rows):
                yield tensor[start : start + rows] if tensor.ndim else tensor
            return
        try:
            if ref.file not in self.handles:
                self.handles[ref.file] = self.stack.enter_context(
                    safe_open(ref.file, framework="pt", device="cpu")
                )
            handle = self.handles[ref.file]
            if not ref.shape:
                yield handle.get_tensor(ref.key)
                return
            view = handle.get_slice(ref.key)
            for start in range(0, ref.shape[0], rows):
                yield view[start : start + rows]
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CorruptFileError(
                f"cannot read tensor ({exc})", path=ref.file, key=ref.key
            ) from exc


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _compare(
    s: _Reader, t: _Reader, name: str, sref: _Ref, tref: _Ref, chunk_bytes: int
) -> tuple[float, float]:
    """(||W_t - W_s||^2, ||W_s||^2) of one tensor pair, in float64, block by block."""
    row = max(1, _numel(sref.shape[1:]))
    rows = max(1, chunk_bytes // (4 * row))
    diff = norm = 0.0
    for a, b in zip(s.blocks(sref, rows), t.blocks(tref, rows), strict=True):
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        diff += float((b64 - a64).square().sum())
        norm += float(a64.square().sum())
    if not (torch.isfinite(torch.tensor(diff)) and torch.isfinite(torch.tensor(norm))):
        bad = sref if not torch.isfinite(torch.tensor(norm)) else tref
        raise NonFiniteError(f"NaN/Inf values in tensor {name}", path=bad.file, key=bad.key)
    return diff, norm


def weight_drift(
    source: WeightSource, target: WeightSource, *, chunk_bytes: int = _CHUNK_BYTES
) -> WeightDrift:
    """Weights-only drift of ``target`` from ``source`` (module docstring).

    Args:
        source, target: the two bases (opened; headers only so far).
        chunk_bytes: the most float32 bytes of one tensor held at a time (row blocks).

    Returns:
        A :class:`WeightDrift`.

    Raises:
        NonFiniteError: a compared tensor holds NaN or Inf (names file and key).
        CorruptFileError: a tensor cannot be read.
    """
    src, tgt = _listing(source), _listing(target)
    changes: list[TensorChange] = []
    total_diff = total_norm = 0.0
    missing: list[str] = []
    reshaped = missing_params = compared_params = 0
    with contextlib.ExitStack() as stack:
        s_read, t_read = _Reader(source, stack), _Reader(target, stack)
        for name, sref in src.items():
            tref = tgt.get(name)
            if tref is None or tref.shape != sref.shape:
                reshaped += tref is not None
                missing.append(name)
                missing_params += _numel(sref.shape)
                continue
            diff, norm = _compare(s_read, t_read, name, sref, tref, chunk_bytes)
            total_diff, total_norm = total_diff + diff, total_norm + norm
            compared_params += _numel(sref.shape)
            rel = (diff / norm) ** 0.5 if norm > 0 else (float("inf") if diff > 0 else 0.0)
            changes.append(TensorChange(name, rel, _numel(sref.shape)))
    finite = [c.relative for c in changes if c.relative != float("inf")]
    return WeightDrift(
        drift=(total_diff / total_norm) ** 0.5 if total_norm > 0 else 0.0,
        compared=len(changes),
        compared_parameters=compared_params,
        source_tensors=len(src),
        source_parameters=sum(_numel(r.shape) for r in src.values()),
        missing=len(missing) - reshaped,
        reshaped=reshaped,
        target_only=sum(name not in src for name in tgt),
        median_relative=statistics.median(finite) if finite else 0.0,
        largest=tuple(sorted(changes, key=lambda c: (-c.relative, c.name))[:5]),
        missing_examples=tuple(missing[:10]),
        missing_parameters=missing_params,
    )
