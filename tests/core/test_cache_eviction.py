"""The factor cache under a size cap: LRU eviction, last use on hit, and processes sharing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.cache_files import STALE_TMP_S, CacheFiles
from core.factor_cache import FactorCache
from core.factorize import factorize, range_basis
from tests.core.synthetic import random_matrix

ROOT = Path(__file__).resolve().parents[2]


def _digest(i: int) -> str:
    return "sha256:" + f"{i:064x}"


def _fill(cache: FactorCache, count: int, start: int = 0) -> list[Path]:
    """``count`` complete factor entries of 24 x 16 matrices, written one second apart in
    modification time (so the LRU order is unambiguous)."""
    paths = []
    for i in range(start, start + count):
        path = cache.put(factorize(random_matrix(24, 16, seed=i), digest=_digest(i)))
        stamp = time.time() - 1000 + i
        os.utime(path, (stamp, stamp))
        paths.append(path)
    return paths


def test_eviction_keeps_the_cache_under_its_cap_least_recently_used_first(
    tmp_path: Path,
) -> None:
    unbounded = FactorCache(tmp_path / "a")
    one = _fill(unbounded, 1)[0].stat().st_size
    cache = FactorCache(tmp_path / "b", max_bytes=int(one * 6.5))
    paths = _fill(cache, 6)
    assert cache.files.evicted == 0 and all(p.exists() for p in paths)
    hit = cache.get(_digest(0))  # the oldest entry is used: it becomes the most recent
    assert hit is not None and paths[0].stat().st_mtime > paths[5].stat().st_mtime
    _fill(cache, 2, start=6)  # over the cap: evict to 90 % of it
    assert cache.size_bytes() <= cache.max_bytes  # type: ignore[operator]
    assert cache.files.evicted >= 2
    assert paths[0].exists()  # recently used: kept
    assert not paths[1].exists() and not paths[2].exists()  # least recently used: gone
    assert cache.get(_digest(1)) is None  # an evicted entry is a plain miss
    assert cache.stats.corrupt == 0


def test_no_cap_never_evicts_and_stale_temporary_files_go(tmp_path: Path) -> None:
    cache = FactorCache(tmp_path)
    _fill(cache, 4)
    assert cache.evict() == 0 and len(list(tmp_path.rglob("*.safetensors"))) == 4
    shard = next(p for p in tmp_path.iterdir() if p.is_dir())
    stale, fresh = shard / ".x.safetensors.1.tmp", shard / ".y.safetensors.2.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    old = time.time() - STALE_TMP_S - 10
    os.utime(stale, (old, old))
    capped = FactorCache(tmp_path, max_bytes=10**9)
    capped.evict()
    assert not stale.exists() and fresh.exists()  # a crashed writer's leftovers, not a live one


def test_a_file_that_vanishes_or_is_replaced_while_read_is_a_miss(tmp_path: Path) -> None:
    files = CacheFiles(tmp_path)
    path = tmp_path / "ab" / "entry.safetensors"
    cache = FactorCache(tmp_path)
    written = cache.put(factorize(random_matrix(8, 6, seed=1), digest=_digest(1)))
    path.parent.mkdir(parents=True, exist_ok=True)
    written.rename(path)

    def evicted_meanwhile(fh: object) -> object:
        path.unlink()
        raise OSError("gone")

    outcome = files.read(path, evicted_meanwhile)
    assert outcome.missing and not outcome.corrupt
    assert files.read(path, lambda fh: fh).missing  # not there at all: a miss too
    cache.put(factorize(random_matrix(8, 6, seed=1), digest=_digest(1))).rename(path)
    newer = tmp_path / "newer.safetensors"
    cache.put(factorize(random_matrix(8, 6, seed=2), digest=_digest(2))).rename(newer)

    def replaced_meanwhile(fh: object) -> object:
        os.replace(newer, path)  # another process rewrote the entry
        raise ValueError("the old content looked wrong")

    outcome = files.read(path, replaced_meanwhile)
    assert outcome.missing and not outcome.corrupt
    assert path.exists()  # the other process's file is not deleted

    def corrupt(fh: object) -> object:
        raise ValueError("inconsistent")

    outcome = files.read(path, corrupt)
    assert outcome.corrupt and not path.exists()  # still the file that failed: dropped


def test_hits_record_their_last_use_for_bases_too(tmp_path: Path) -> None:
    cache = FactorCache(tmp_path)
    basis = range_basis(random_matrix(40, 24, seed=3), digest=_digest(3))
    path = cache.put_basis(basis)
    assert path is not None and path.name.endswith(".basis-qr-left-null.safetensors")
    os.utime(path, (1000.0, 1000.0))
    found = cache.get_basis(_digest(3), (40, 24))
    assert found is not None and found.complement and found.method == "qr"
    assert torch.equal(found.basis, basis.basis)  # type: ignore[arg-type]
    assert path.stat().st_mtime > 1000.0


@pytest.mark.slow  # three interpreters (about 10 s here)
def test_processes_sharing_a_capped_cache_never_fail_and_stay_under_the_cap(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "shared"
    one = FactorCache(tmp_path / "probe").put(
        factorize(random_matrix(48, 32, seed=0), digest=_digest(0))
    )
    cap = one.stat().st_size * 12
    count = 60
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    worker = [sys.executable, "-m", "tests.core.cache_worker"]
    writers = [
        subprocess.Popen(
            [*worker, "write", str(folder), str(cap), str(count), str(seed)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in (0, 1)
    ]
    reader = subprocess.run(
        [*worker, "read", str(folder), str(count), "6"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    outs = [w.communicate(timeout=120)[0] for w in writers]
    assert reader.returncode == 0, reader.stderr[-2000:]
    assert all(w.returncode == 0 for w in writers)
    read = json.loads(reader.stdout.splitlines()[-1])
    wrote = [json.loads(out.splitlines()[-1]) for out in outs]
    assert all(w["writes"] == count for w in wrote)
    assert sum(w["evicted"] for w in wrote) > 0  # the cap was reached and held by eviction
    assert read["hits"] > 0 and read["misses"] > 0  # the reader saw entries come and go ...
    assert read["bad"] == 0 and read["corrupt"] == 0  # ... and never a torn or wrong one
    # the cap holds within a tenth of it per writing process (core.cache_files)
    assert FactorCache(folder).size_bytes() <= cap * 1.2
