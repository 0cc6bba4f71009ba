"""Files of the factor cache shared by several processes: atomic writes, safe reads, LRU eviction.

Several daemon replicas and Ray workers may share one cache folder (a volume). The rules that
make that safe without locks:

- **Writes are atomic**: a temporary file in the entry's folder, then ``os.replace``; a reader
  opens either the old complete file or the new one, never half of one.
- **A vanished file is a miss**: another process may evict (unlink) an entry between a reader's
  lookup and its open, or replace it while it is read. The reader then reports a miss (and
  recomputes), never an error, and never deletes what another process wrote (a file is deleted
  as corrupt only when it is still the file that failed to read: same device and inode).
  An entry unlinked while it is open stays readable (POSIX): no torn reads.
- **Last use is the modification time**: a hit touches it (``os.utime``, one system call), a
  write sets it. Eviction deletes the least recently used entries first until the folder is
  under 90 % of its cap, so it runs about once per tenth of the cap written, not at every write.
  Each process scans the folder at its first write, then adds what it writes to that figure and
  scans (and evicts) again when the figure passes the cap or when it has written a tenth of the
  cap since its last scan: writes by other processes are seen at that scan, so the folder stays
  under the cap plus a tenth of it per writing process. Eviction by several processes at once is
  safe (unlinking a file another one already removed is skipped).
- Temporary files left by a crashed writer are deleted by eviction once an hour old.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["CacheFiles", "ReadOutcome", "atomic_save"]

T = TypeVar("T")

LOW_WATER = 0.9
STALE_TMP_S = 3600.0
ENTRY_SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"


def atomic_save(tensors: dict, path: Path, metadata: dict[str, str]) -> int:
    """Write a safetensors file atomically (temporary file + ``os.replace``); returns its size.

    Raises:
        OSError: the folder cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size


@dataclass(frozen=True)
class ReadOutcome:
    """What reading one entry gave: ``value`` (None unless it was read), and whether the file
    was missing (vanished: a miss, not an error) or corrupt (deleted, counted)."""

    value: object = None
    missing: bool = False
    corrupt: bool = False


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class CacheFiles:
    """The file operations of one cache folder (see the module docstring).

    Args:
        directory: the cache folder (two levels: ``<dir>/<hh>/<entry>``).
        max_bytes: size cap (None: no cap, nothing is evicted).
    """

    def __init__(self, directory: Path, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.directory = directory
        self.max_bytes = max_bytes
        self._estimate: int | None = None  # bytes in the folder as this process sees it
        self._written = 0  # bytes this process wrote since its last scan
        self.evicted = 0  # entries this process deleted to keep the cap

    def read(self, path: Path, reader: Callable[[object], T]) -> ReadOutcome:
        """Open ``path`` with safetensors and apply ``reader`` to the handle.

        ``reader`` raises on anything inconsistent. A hit touches the file (last use).
        """
        before = _identity(path)
        if before is None:
            return ReadOutcome(missing=True)
        try:
            with safe_open(path, framework="pt", device="cpu") as fh:
                value = reader(fh)
        except Exception:  # unreadable: vanished, replaced meanwhile, or corrupt
            now = _identity(path)
            if now != before:  # evicted or rewritten by another process: a plain miss
                return ReadOutcome(missing=True)
            path.unlink(missing_ok=True)
            return ReadOutcome(corrupt=True)
        with contextlib.suppress(OSError):  # evicted just now: the value read is still whole
            os.utime(path)
        return ReadOutcome(value=value)

    def wrote(self, size: int) -> None:
        """Count a write of ``size`` bytes; evict when the folder may be over its cap."""
        if self.max_bytes is None:
            return
        if self._estimate is None:
            self.evict()
            return
        self._estimate += size
        self._written += size
        if self._estimate > self.max_bytes or self._written > self.max_bytes * (1.0 - LOW_WATER):
            self.evict()

    def entries(self) -> Iterator[os.DirEntry[str]]:
        """Every file under the folder (entries and temporary files)."""
        try:
            shards = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            try:
                files = list(os.scandir(shard.path))
            except FileNotFoundError:  # removed meanwhile
                continue
            yield from (f for f in files if f.is_file(follow_symlinks=False))

    def _listing(self) -> tuple[list[tuple[float, int, str]], int]:
        """(entries as (mtime, size, path), total bytes) with stale temporary files deleted."""
        now = time.time()
        listing, total = [], 0
        for entry in self.entries():
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.name.endswith(TMP_SUFFIX):
                if now - st.st_mtime > STALE_TMP_S:
                    Path(entry.path).unlink(missing_ok=True)
                else:
                    total += st.st_size
                continue
            listing.append((st.st_mtime, st.st_size, entry.path))
            total += st.st_size
        return listing, total

    def size_bytes(self) -> int:
        """Bytes in the folder now (entries and unfinished writes)."""
        return self._listing()[1]

    def evict(self) -> int:
        """Delete least recently used entries until the folder is under 90 % of the cap.

        Returns:
            Bytes deleted by this call (0 without a cap or when under it).
        """
        if self.max_bytes is None:
            return 0
        listing, total = self._listing()
        freed = 0
        if total > self.max_bytes:
            goal = self.max_bytes * LOW_WATER
            for _, size, path in sorted(listing):
                if total - freed <= goal:
                    break
                try:
                    os.unlink(path)
                except FileNotFoundError:  # another process evicted it first
                    continue
                freed += size
                self.evicted += 1
        self._estimate, self._written = total - freed, 0
        return freed
