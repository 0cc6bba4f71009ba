"""On-disk cache of factors, keyed by the content digest of the factorized tensor.

Each base version is factorized once per module (DESIGN.md, "Factorization cache"); the key is
the tensor's digest (:mod:`core.digest`), so a module unchanged between two base versions is
factorized once for both.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.factors import Factors
from core.finite import all_finite

__all__ = ["CacheStats", "FactorCache", "Method"]

Method = Literal["exact", "randomized"]

_CACHE_FORMAT = "lorax-factors/1"
_SIGN_CONVENTION = "largest-abs-entry-of-u-positive"


@dataclass
class CacheStats:
    """Counters of one :class:`FactorCache` (mutable, for reporting)."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0


class FactorCache:
    """Factors on disk, one safetensors file per (tensor digest, method, rank).

    File ``<dir>/<hh>/<algo>-<hex>.<method>-<rank|full>.safetensors`` holds float32 tensors
    ``U`` (m, k), ``S`` (k,), ``V`` (n, k) and metadata ``format``, ``digest``, ``method``,
    ``rank``, ``shape`` and ``sign_convention``. Writes go to a temporary file in the same folder,
    then ``os.replace``, so readers never see half a file. An unreadable or inconsistent entry is
    deleted and reported as a miss (it is recomputed). Exact entries serve any smaller rank, and
    randomized requests too (they are the better answer); a randomized entry serves only its own
    rank.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.stats = CacheStats()

    @staticmethod
    def _stem(digest: str) -> str:
        if re.fullmatch(r"[a-z0-9]+:[0-9a-f]{16,}", digest):
            return digest.replace(":", "-")
        return "h-" + sha256(digest.encode()).hexdigest()

    def entry_path(self, digest: str, method: Method, rank: int | None) -> Path:
        """The file of one entry (``rank`` None: the complete exact SVD)."""
        stem = self._stem(digest)
        tag = "full" if rank is None else str(rank)
        return self.directory / stem[-2:] / f"{stem}.{method}-{tag}.safetensors"

    def _candidates(
        self, digest: str, rank: int | None, exact: bool
    ) -> list[tuple[Path, Method, int | None]]:
        """Entries that can serve the request, best first: full exact, exact by rank, then a
        randomized entry of exactly ``rank``."""
        stem = self._stem(digest)
        folder = self.entry_path(digest, "exact", None).parent
        found: list[tuple[Path, Method, int | None]] = [
            (self.entry_path(digest, "exact", None), "exact", None)
        ]
        ranked = []
        for path in folder.glob(f"{stem}.exact-*.safetensors") if folder.is_dir() else []:
            tag = path.name[len(stem) + len(".exact-") : -len(".safetensors")]
            if tag.isdigit() and rank is not None and int(tag) >= rank:
                ranked.append((int(tag), path))
        found += [(path, "exact", tag) for tag, path in sorted(ranked)]
        if not exact and rank is not None:
            found.append((self.entry_path(digest, "randomized", rank), "randomized", rank))
        return [entry for entry in found if entry[0].is_file()]

    def get(self, digest: str, *, rank: int | None = None, exact: bool = True) -> Factors | None:
        """Cached factors of the tensor with ``digest`` serving the request, or None.

        Args:
            digest: the tensor's content digest.
            rank: triplets wanted (None: all p, exact only).
            exact: False also accepts randomized factors of exactly ``rank``.

        Returns:
            Fresh tensors of the leading min(rank, p) triplets (only those are read from disk).
        """
        for path, method, tag in self._candidates(digest, rank, exact):
            factors = self._read(path, digest, rank, method, tag)
            if factors is not None:
                self.stats.hits += 1
                return factors
        self.stats.misses += 1
        return None

    def _read(
        self, path: Path, digest: str, rank: int | None, method: Method, tag: int | None
    ) -> Factors | None:
        try:
            with safe_open(path, framework="pt", device="cpu") as fh:
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
                # Slices are views of the file's memory map: a copy lets the map go (a kept view
                # would hold every page read through it, the whole U and V, for its lifetime).
                copy = torch.contiguous_format
                factors = Factors(
                    U=fh.get_slice("U")[:, :k].clone(memory_format=copy),
                    S=fh.get_slice("S")[:k].clone(memory_format=copy),
                    V=fh.get_slice("V")[:, :k].clone(memory_format=copy),
                    shape=(m, n),
                    exact=method == "exact",
                    digest=digest,
                )
            tensors = (factors.U, factors.S, factors.V)
            if any(t.dtype != torch.float32 or not all_finite(t) for t in tensors):
                raise ValueError("non-finite or non-float32 factors")
            if bool((factors.S[:-1] < factors.S[1:]).any()) or bool((factors.S < 0).any()):
                raise ValueError("singular values not sorted and non-negative")
            return factors
        except Exception:  # any unreadable entry is a miss, never fatal: drop it, recompute
            self.stats.corrupt += 1
            path.unlink(missing_ok=True)
            return None

    def put(self, factors: Factors) -> Path:
        """Store ``factors`` (which must carry a digest) atomically; returns the entry's file.

        Raises:
            ValueError: factors without a digest.
            OSError: the cache folder cannot be written.
        """
        if not factors.digest:
            raise ValueError("factors without a digest cannot be cached")
        method: Method = "exact" if factors.exact else "randomized"
        path = self.entry_path(factors.digest, method, None if factors.complete else factors.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
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
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.stats.writes += 1
        return path
