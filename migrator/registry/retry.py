"""Bounded retries with exponential backoff for calls to external services."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["retry_call"]

T = TypeVar("T")
log = logging.getLogger(__name__)


def retry_call(
    fn: Callable[[], T],
    *,
    is_transient: Callable[[BaseException], bool],
    retries: int,
    backoff_s: float,
    what: str,
    max_backoff_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn``; on a transient error retry up to ``retries`` times, doubling the delay.

    Raises:
        The last error once retries are spent, or any non-transient error at once.
    """
    delay = backoff_s
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt == retries:
                raise
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.1fs",
                what,
                type(exc).__name__,
                str(exc).splitlines()[0][:200] if str(exc) else "",
                attempt + 1,
                retries,
                delay,
            )
            sleep(delay)
            delay = min(delay * 2, max_backoff_s)
    raise AssertionError("unreachable")
