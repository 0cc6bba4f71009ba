"""What a pass needs: settings, the registry, the job database, local files, where jobs run, a
stop token. The entry points build it (:func:`migrator.wiring.build_context`)."""

from __future__ import annotations

import logging
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from migrator.daemon import StopToken
from migrator.pipeline.breaker import Breaker
from migrator.registry import ModelVersionInfo, Registry, Tag, VersionRef
from migrator.settings import Settings

if TYPE_CHECKING:  # the math (torch) is loaded by the first base opened, not by every pass
    from migrator.bases import OpenedBase, ProgressFn
    from migrator.functional.service import BaseFolder, FunctionalBench
    from migrator.pipeline.executor import Executor

__all__ = ["CRASH_ENV", "Context", "Workspace", "crash_point"]

log = logging.getLogger(__name__)

#: Test hook: ``MIGRATOR_CRASH_AT=<point>[:<count>]`` kills the process (exit 137, no cleanup)
#: when a pass or a job reaches ``<point>`` (``after_claim``: a batch claimed, no job started;
#: ``mid_transfer``, ``after_run``, ``after_register``: inside a job's work), at most
#: ``<count>`` times per marker file (``MIGRATOR_CRASH_MARKER``), so a restarted daemon goes on.
CRASH_ENV = "MIGRATOR_CRASH_AT"


def crash_point(point: str) -> None:
    """Kill the process here if the crash test hook asks for it."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    wanted, _, count = spec.partition(":")
    if wanted != point:
        return
    marker = os.environ.get("MIGRATOR_CRASH_MARKER")
    if marker:
        path = Path(marker)
        done = int(path.read_text()) if path.exists() else 0
        if done >= int(count or 1):
            return
        path.write_text(str(done + 1))
    log.error("crash point %s: killing the process", point)
    logging.shutdown()
    os._exit(137)


class Workspace:
    """Local copies of registry artifacts, and opened bases kept for reuse within a process.

    Downloads go to ``scratch/{bases,adapters}/<name>/<version>`` and are marked complete only
    once whole, so an interrupted download is redone, never half-used.
    """

    def __init__(self, settings: Settings, registry: Registry, *, keep_bases: int = 4) -> None:
        self.settings = settings
        self.registry = registry
        self.keep_bases = keep_bases
        self._bases: OrderedDict[VersionRef, OpenedBase] = OrderedDict()
        self._functional: FunctionalBench | None = None
        self.progress: ProgressFn | None = None

    def _download(self, kind: str, ref: VersionRef) -> Path:
        dest = self.settings.scratch_dir / kind / ref.name / ref.version
        done = dest / ".complete"
        if done.exists():
            return Path(done.read_text())
        if dest.exists():
            shutil.rmtree(dest)
        local = self.registry.download(ref, dest / "files")
        done.write_text(str(local))
        return local

    def adapter_files(self, ref: VersionRef) -> Path:
        """The adapter version's artifacts, downloaded once."""
        return self._download("adapters", ref)

    def base(self, info: ModelVersionInfo) -> OpenedBase:
        """The base version opened for migration (downloaded and opened once per process).

        Raises:
            InputError: no usable weights (named by ``name/version``).
        """
        ref = info.ref
        if ref in self._bases:
            self._bases.move_to_end(ref)
            return self._bases[ref]
        from migrator.bases import open_base

        root = self._download("bases", ref)
        base = open_base(
            root,
            self.settings,
            label=str(ref),
            weights_path=info.tags.get(Tag.WEIGHTS_PATH) or None,
            progress=self.progress,
        )
        self._bases[ref] = base
        while len(self._bases) > self.keep_bases:
            self._bases.popitem(last=False)
        return base

    def base_folder(self, info: ModelVersionInfo) -> BaseFolder:
        """The base version's downloaded folder and its ``lorax.weights_path``."""
        return self._download("bases", info.ref), info.tags.get(Tag.WEIGHTS_PATH) or None

    @property
    def functional(self) -> FunctionalBench:
        """Builds bases for the functional check, keeping the last pair (made on first use:
        it loads the model libraries)."""
        if self._functional is None:
            from migrator.functional.service import FunctionalBench

            self._functional = FunctionalBench(self.settings)
        return self._functional


@dataclass
class Context:
    """Everything one pass (``run_once``) works with."""

    settings: Settings
    registry: Registry
    engine: Engine
    sessions: sessionmaker[Session]
    workspace: Workspace
    executor: Executor
    stop: StopToken = field(default_factory=StopToken)
    breaker: Breaker = field(default_factory=Breaker)  # ends the pass on an outage
    on_progress: Callable[[str], None] | None = None
    on_count: Callable[[str, int, int], None] | None = None

    def say(self, message: str) -> None:
        log.info(message)
        if self.on_progress is not None:
            self.on_progress(message)

    def count(self, what: str, done: int, total: int) -> None:
        """Progress of a long step (``transferring``: jobs done of those runnable), for a
        terminal's progress bar; logs nothing."""
        if self.on_count is not None:
            self.on_count(what, done, total)
