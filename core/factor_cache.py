"""On-disk cache of factors, keyed by the content digest of the factorized tensor.

Each base version is factorized once per module (DESIGN.md, "Factorization cache"); the key is
the tensor's digest (:mod:`core.digest`), so a module unchanged between two base versions is
factorized once for both. An entry's file name says what it holds, and only what a consumer
needs is stored:

========================================  ==========================================================
``<stem>.exact-full.safetensors``         the complete thin SVD: ``U`` (m, p), ``S``, ``V`` (n, p)
``<stem>.exact-<k>.safetensors``          the leading k triplets of the exact SVD (subspace mode)
``<stem>.randomized-<variant>-<k>...``    k randomized triplets (assessments; ``variant`` names the
                                          algorithm and its settings, e.g. ``bk0d6s0``)
``<stem>.basis-<qr|svd>-<side>-<span>``   a :class:`RangeBasis` ``Q``: side ``left``/``right``,
                                          span ``range`` or ``null`` (its complement)
========================================  ==========================================================

Several processes may share the folder (replicas, Ray workers): writes are atomic, a vanished
or replaced file is a miss, hits record their last use and a size cap evicts the least recently
used entries (:mod:`core.cache_files`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from hashlib import sha256
from pathlib import Path
from typing import Any, Literal

import torch

from core.cache_files import CacheFiles, atomic_save
from core.factors import Factors, RangeBasis
from core.finite import all_finite
from core.range_basis import stores_complement
from core.svd import DEFAULT_DEPTH, DEFAULT_OVERSAMPLE, Method, krylov_variant

__all__ = ["CacheStats", "FactorCache", "Method"]

_CACHE_FORMAT = "lorax-factors/1"
_BASIS_FORMAT = "lorax-basis/1"
_SIGN_CONVENTION = "largest-abs-entry-of-u-positive"
DEFAULT_VARIANT = krylov_variant(DEFAULT_OVERSAMPLE, DEFAULT_DEPTH, 0)


@dataclass
class CacheStats:
    """Counters of one :class:`FactorCache` (mutable, for reporting)."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0
    bytes_written: int = 0


def _copy(fh: Any, name: str) -> torch.Tensor:
    """A tensor of an open entry, copied out of the file's memory map."""
    return fh.get_slice(name)[:].clone(memory_format=torch.contiguous_format)


def _check_factors(factors: Factors) -> None:
    tensors = (factors.U, factors.S, factors.V)
    if any(t.dtype != torch.float32 or not all_finite(t) for t in tensors):
        raise ValueError("non-finite or non-float32 factors")
    if bool((factors.S[:-1] < factors.S[1:]).any()) or bool((factors.S < 0).any()):
        raise ValueError("singular values not sorted and non-negative")


class FactorCache:
    """Factors on disk, one safetensors file per (tensor digest, what it holds).

    Factor files hold float32 ``U`` (m, k), ``S`` (k,), ``V`` (n, k) and metadata ``format``,
    ``digest``, ``method``, ``rank``, ``shape``, ``sign_convention`` (and ``variant`` for
    randomized ones); basis files hold ``Q`` and ``format``, ``digest``, ``method``, ``side``,
    ``span``, ``shape``. An unreadable or inconsistent entry is deleted and reported as a miss (it
    is recomputed). Exact entries serve any smaller rank, and randomized requests too (they are
    the better answer); a randomized entry serves only its own rank and variant; complete exact
    factors also serve a range basis.

    Args:
        directory: the cache folder.
        max_bytes: size cap of the folder, least recently used entries evicted first (None: no
            cap). See :mod:`core.cache_files` for how it holds with several processes.
    """

    def __init__(self, directory: str | Path, max_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.stats = CacheStats()
        self.files = CacheFiles(self.directory, max_bytes)

    @property
    def max_bytes(self) -> int | None:
        """The size cap (None: none)."""
        return self.files.max_bytes

    def size_bytes(self) -> int:
        """Bytes in the cache folder now (a scan of the folder)."""
        return self.files.size_bytes()

    def evict(self) -> int:
        """Evict least recently used entries down to 90 % of the cap; returns bytes freed."""
        return self.files.evict()

    @staticmethod
    def _stem(digest: str) -> str:
        if re.fullmatch(r"[a-z0-9]+:[0-9a-f]{16,}", digest):
            return digest.replace(":", "-")
        return "h-" + sha256(digest.encode()).hexdigest()

    def _path(self, digest: str, tag: str) -> Path:
        stem = self._stem(digest)
        return self.directory / stem[-2:] / f"{stem}.{tag}.safetensors"

    def entry_path(
        self, digest: str, method: Method, rank: int | None, variant: str | None = None
    ) -> Path:
        """The file of one factor entry (``rank`` None: the complete exact SVD; ``variant``:
        the randomized algorithm's tag, default the defaults of :func:`core.svd.factorize`)."""
        tag = "full" if rank is None else str(rank)
        if method == "randomized":
            tag = f"{variant or DEFAULT_VARIANT}-{tag}"
        return self._path(digest, f"{method}-{tag}")

    def basis_path(self, digest: str, method: str, side: str, complement: bool) -> Path:
        """The file of one :class:`RangeBasis` entry."""
        span = "null" if complement else "range"
        return self._path(digest, f"basis-{method}-{side}-{span}")

    def _candidates(
        self, digest: str, rank: int | None, exact: bool, variant: str | None
    ) -> list[tuple[Path, Method, int | None]]:
        """Entries that may serve the request, best first: full exact, exact by rank, then a
        randomized entry of exactly ``rank`` and ``variant``."""
        stem = self._stem(digest)
        full = self.entry_path(digest, "exact", None)
        found: list[tuple[Path, Method, int | None]] = [(full, "exact", None)]
        ranked = []
        if rank is not None and full.parent.is_dir():
            for path in full.parent.glob(f"{stem}.exact-*.safetensors"):
                tag = path.name[len(stem) + len(".exact-") : -len(".safetensors")]
                if tag.isdigit() and int(tag) >= rank:
                    ranked.append((int(tag), path))
        found += [(path, "exact", tag) for tag, path in sorted(ranked)]
        if not exact and rank is not None:
            path = self.entry_path(digest, "randomized", rank, variant)
            found.append((path, "randomized", rank))
        return found

    def get(
        self,
        digest: str,
        *,
        rank: int | None = None,
        exact: bool = True,
        variant: str | None = None,
    ) -> Factors | None:
        """Cached factors of the tensor with ``digest`` serving the request, or None.

        Args:
            digest: the tensor's content digest.
            rank: triplets wanted (None: all p, exact only).
            exact: False also accepts randomized factors of exactly ``rank`` and ``variant``.
            variant: the randomized algorithm's tag (default: the default settings').

        Returns:
            Fresh tensors of the leading min(rank, p) triplets (only those are read from disk).
        """
        for path, method, tag in self._candidates(digest, rank, exact, variant):
            reader = partial(self._read_factors, digest=digest, rank=rank, method=method, tag=tag)
            outcome = self.files.read(path, reader)
            self.stats.corrupt += outcome.corrupt
            if outcome.value is not None:
                self.stats.hits += 1
                assert isinstance(outcome.value, Factors)
                return outcome.value
        self.stats.misses += 1
        return None

    @staticmethod
    def _read_factors(
        fh: Any, digest: str, rank: int | None, method: Method, tag: int | None
    ) -> Factors:
        meta = fh.metadata() or {}
        m, n = (int(x) for x in meta["shape"].split(","))
        stored = fh.get_slice("S").get_shape()[0]
        if (
            meta.get("format") != _CACHE_FORMAT
            or meta.get("digest") != digest
            or meta.get("method") != method
            or meta.get("sign_convention") != _SIGN_CONVENTION
            or meta.get("rank") != str(stored)
            or stored != (min(m, n) if tag is None else tag)
        ):
            raise ValueError("metadata does not match the entry's name")
        k = stored if rank is None else min(rank, stored)
        # Slices are views of the file's memory map: a copy lets the map go (a kept view would
        # hold every page read through it, the whole U and V, for its lifetime).
        copy = torch.contiguous_format
        factors = Factors(
            U=fh.get_slice("U")[:, :k].clone(memory_format=copy),
            S=fh.get_slice("S")[:k].clone(memory_format=copy),
            V=fh.get_slice("V")[:, :k].clone(memory_format=copy),
            shape=(m, n),
            exact=method == "exact",
            digest=digest,
        )
        _check_factors(factors)
        return factors

    def put(self, factors: Factors, *, variant: str | None = None) -> Path:
        """Store ``factors`` (which must carry a digest) atomically; returns the entry's file.

        Complete exact factors go to the ``exact-full`` entry, other exact ones to
        ``exact-<rank>``, randomized ones to ``randomized-<variant>-<rank>``.

        Raises:
            ValueError: factors without a digest.
            OSError: the cache folder cannot be written.
        """
        if not factors.digest:
            raise ValueError("factors without a digest cannot be cached")
        method: Method = "exact" if factors.exact else "randomized"
        rank = None if factors.complete else factors.rank
        path = self.entry_path(factors.digest, method, rank, variant)
        tensors = {
            name: t.detach().to("cpu", torch.float32).contiguous().clone()
            for name, t in (("U", factors.U), ("S", factors.S), ("V", factors.V))
        }
        meta = {
            "format": _CACHE_FORMAT,
            "digest": factors.digest,
            "method": method,
            "rank": str(factors.rank),
            "shape": f"{factors.shape[0]},{factors.shape[1]}",
            "sign_convention": _SIGN_CONVENTION,
        }
        if method == "randomized":
            meta["variant"] = variant or DEFAULT_VARIANT
        return self._save(tensors, path, meta)

    def _save(self, tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> Path:
        size = atomic_save(tensors, path, meta)
        self.stats.writes += 1
        self.stats.bytes_written += size
        self.files.wrote(size)
        return path

    def get_basis(self, digest: str, shape: tuple[int, int]) -> RangeBasis | None:
        """The cached :class:`RangeBasis` of the (m, n) tensor with ``digest``, or None.

        A QR basis is looked for first, then an SVD fallback basis, then complete exact factors
        (only their U or V is read). Square shapes need no entry: call
        :meth:`RangeBasis.identity`.
        """
        m, n = shape
        if m == n:
            return RangeBasis.identity(shape, digest)
        side = "left" if m > n else "right"
        complement = stores_complement(shape)
        for method, comp in (("qr", complement), ("svd", False)):
            path = self.basis_path(digest, method, side, comp)
            reader = partial(
                self._read_basis, digest=digest, shape=shape, method=method, complement=comp
            )
            outcome = self.files.read(path, reader)
            self.stats.corrupt += outcome.corrupt
            if isinstance(outcome.value, RangeBasis):
                self.stats.hits += 1
                return outcome.value
        full = self.entry_path(digest, "exact", None)
        outcome = self.files.read(full, partial(self._basis_of_factors, digest=digest, shape=shape))
        self.stats.corrupt += outcome.corrupt
        if isinstance(outcome.value, RangeBasis):
            self.stats.hits += 1
            return outcome.value
        self.stats.misses += 1
        return None

    @staticmethod
    def _read_basis(
        fh: Any, digest: str, shape: tuple[int, int], method: str, complement: bool
    ) -> RangeBasis:
        meta = fh.metadata() or {}
        side = "left" if shape[0] > shape[1] else "right"
        expected = {
            "format": _BASIS_FORMAT,
            "digest": digest,
            "method": method,
            "side": side,
            "span": "null" if complement else "range",
            "shape": f"{shape[0]},{shape[1]}",
        }
        if any(meta.get(key) != value for key, value in expected.items()):
            raise ValueError("metadata does not match the entry's name")
        q = _copy(fh, "Q")
        if q.dtype != torch.float32 or not all_finite(q):
            raise ValueError("non-finite or non-float32 basis")
        return RangeBasis(shape, side, q, complement, method, digest)  # type: ignore[arg-type]

    @staticmethod
    def _basis_of_factors(fh: Any, digest: str, shape: tuple[int, int]) -> RangeBasis:
        meta = fh.metadata() or {}
        if (
            meta.get("format") != _CACHE_FORMAT
            or meta.get("digest") != digest
            or meta.get("method") != "exact"
            or meta.get("shape") != f"{shape[0]},{shape[1]}"
        ):
            raise ValueError("metadata does not match the entry's name")
        side: Literal["left", "right"] = "left" if shape[0] > shape[1] else "right"
        q = _copy(fh, "U" if side == "left" else "V")
        if q.dtype != torch.float32 or tuple(q.shape) != (max(shape), min(shape)):
            raise ValueError("factors of the wrong shape")
        if not all_finite(q):
            raise ValueError("non-finite factors")
        return RangeBasis(shape, side, q, False, "svd", digest)

    def put_basis(self, basis: RangeBasis) -> Path | None:
        """Store a rectangular weight's :class:`RangeBasis` atomically (square ones hold
        nothing: None); returns the entry's file.

        Raises:
            ValueError: a basis without a digest.
            OSError: the cache folder cannot be written.
        """
        if basis.basis is None:
            return None
        if not basis.digest:
            raise ValueError("a basis without a digest cannot be cached")
        path = self.basis_path(basis.digest, basis.method, basis.side, basis.complement)
        meta = {
            "format": _BASIS_FORMAT,
            "digest": basis.digest,
            "method": basis.method,
            "side": basis.side,
            "span": "null" if basis.complement else "range",
            "shape": f"{basis.shape[0]},{basis.shape[1]}",
        }
        q = basis.basis.detach().to("cpu", torch.float32).contiguous().clone()
        return self._save({"Q": q}, path, meta)
