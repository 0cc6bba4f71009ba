"""Progress of long steps on a terminal (rich, on stderr, gone when done); nothing in JSON mode,
nothing when stderr is a pipe or a log file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

__all__ = ["PassProgress", "progress_bar"]

Counter = Callable[[int, int, str], None]


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[name]}", style="dim"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _shown(console: Console, enabled: bool) -> bool:
    return enabled and console.is_terminal


@contextmanager
def progress_bar(
    description: str, *, enabled: bool, console: Console | None = None
) -> Iterator[Counter | None]:
    """A progress bar fed by ``callback(done, total, name)``; None when not shown."""
    console = console or Console(stderr=True)
    if not _shown(console, enabled):
        yield None
        return
    with _progress(console) as progress:
        task = progress.add_task(description, total=None, name="")

        def callback(done: int, total: int, name: str) -> None:
            progress.update(task, completed=done, total=total, name=name[-50:])

        yield callback


class PassProgress:
    """A pass on a terminal: what it is doing now, the matrices it factorizes and the adapters
    it transfers, as bars that appear when those steps start."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self._step = progress.add_task("pass", total=None, name="")
        self._bars: dict[str, TaskID] = {}

    def say(self, message: str) -> None:
        """The step in hand (``assessing a -> b``, ``job 3: ...``)."""
        self.progress.update(self._step, name=message[-70:])

    def count(self, what: str, done: int, total: int, name: str = "") -> None:
        """``what`` done of ``total`` (``factorizing``, ``transferring``)."""
        if what not in self._bars:
            self._bars[what] = self.progress.add_task(what, total=total, name="")
        self.progress.update(self._bars[what], completed=done, total=total, name=name[-50:])

    @classmethod
    @contextmanager
    def shown(cls, console: Console, *, enabled: bool) -> Iterator[PassProgress | None]:
        """A pass progress display on ``console`` while the block runs; None when not shown."""
        if not _shown(console, enabled):
            yield None
            return
        with _progress(console) as progress:
            yield cls(progress)
