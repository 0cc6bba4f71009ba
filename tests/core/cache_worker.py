"""A process that shares a factor cache folder with others (for test_cache_eviction.py).

    python -m tests.core.cache_worker write DIR MAX_BYTES COUNT SEED
    python -m tests.core.cache_worker read DIR COUNT SECONDS

``write`` puts COUNT entries (factors and range bases of random matrices, digests
``sha256:<seed><i>``) under a size cap, so it evicts as it goes; ``read`` looks up the digests
of writer seeds 0 and 1 in a loop for SECONDS. Each prints one JSON line: what it did, and the
errors it met (none expected).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from core.factor_cache import FactorCache
from core.factorize import factorize, range_basis

SHAPE = (48, 32)


def digest(seed: int, i: int) -> str:
    return f"sha256:{seed:04x}{i:060x}"


def write(directory: str, max_bytes: int, count: int, seed: int) -> dict[str, object]:
    cache = FactorCache(directory, max_bytes=max_bytes)
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        w = torch.randn(*SHAPE, generator=gen)
        if i % 2:
            cache.put_basis(range_basis(w, digest=digest(seed, i)))
        else:
            cache.put(factorize(w, digest=digest(seed, i)))
    return {"writes": cache.stats.writes, "evicted": cache.files.evicted}


def read(directory: str, count: int, seconds: float) -> dict[str, object]:
    cache = FactorCache(directory)
    hits = misses = bad = 0
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        for seed in (0, 1):
            for i in range(count):
                if i % 2:
                    found = cache.get_basis(digest(seed, i), SHAPE)
                    ok = found is None or (found.basis is not None and found.digest)
                else:
                    factors = cache.get(digest(seed, i))
                    found = factors
                    ok = factors is None or (factors.complete and factors.shape == SHAPE)
                hits += found is not None
                misses += found is None
                bad += not ok
    return {"hits": hits, "misses": misses, "bad": bad, "corrupt": cache.stats.corrupt}


def main(argv: list[str]) -> int:
    kind, directory, *rest = argv
    if kind == "write":
        out = write(directory, int(rest[0]), int(rest[1]), int(rest[2]))
    else:
        out = read(directory, int(rest[0]), float(rest[1]))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
