"""The data-free functional check: build runnable bases, run seeded probes, compare.

- :func:`find_runnable` / :func:`runnable_problem`: can a base folder run, and how (or why not);
- :func:`open_pair`: both bases built with their probe sets (a :class:`FunctionalPair`);
- :func:`check_bases`: representation agreement of the pair (:class:`BaseCheck`);
- :func:`check_adapter`: adapter-effect agreement of an adapter and its transfer
  (:class:`AdapterCheck`).

The math is :mod:`core.functional`; the probes :mod:`core.probes`.
"""

from __future__ import annotations

from migrator.functional.check import (
    AdapterCheck,
    BaseCheck,
    FunctionalConfig,
    FunctionalPair,
    check_adapter,
    check_bases,
    open_pair,
)
from migrator.functional.layout import (
    Component,
    NotRunnableError,
    RunnableBase,
    find_runnable,
    runnable_problem,
)
from migrator.functional.running import ProbeSettings

__all__ = [
    "AdapterCheck",
    "BaseCheck",
    "Component",
    "FunctionalConfig",
    "FunctionalPair",
    "NotRunnableError",
    "ProbeSettings",
    "RunnableBase",
    "check_adapter",
    "check_bases",
    "find_runnable",
    "open_pair",
    "runnable_problem",
]
