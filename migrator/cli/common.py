"""What every command shares: settings from the global options, output, errors and exit codes.

Exit codes: 0 success, 1 failure of the work, 2 bad usage or bad input. With ``--json`` a
command prints exactly one JSON document on stdout; tables, progress and logs go elsewhere
(tables to stdout only without ``--json``; progress and logs to stderr).
"""

from __future__ import annotations

import functools
import getpass
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, ParamSpec, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import OperationalError

from core.errors import InputError
from db import DatabaseNotAtHeadError, JobDatabaseError, JobNotFoundError, JobStateError
from migrator.errors import NothingToTransferError
from migrator.logs import configure_logging
from migrator.registry import RegistryError, RegistryUnavailableError, VersionNotFoundError
from migrator.settings import ConfigFileError, Settings, load_settings

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "State",
    "actor",
    "decisions_table",
    "emit_json",
    "fail",
    "guarded",
    "progress_bar",
    "state",
    "table",
]

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

P = ParamSpec("P")
T = TypeVar("T")

# Wide enough for the tables when the output goes to a file or a pipe (rich assumes 80).
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)
log = logging.getLogger("migrator.cli")


@dataclass
class State:
    """Global options, set by the app callback."""

    config: str | None = None
    log_level: str | None = None
    verbose: bool = False
    _settings: Settings | None = None

    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config)
            configure_logging(self.log_level or self._settings.log_level, self._settings.log_format)
        return self._settings


state = State()


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print one clear line on stderr and exit with ``code``. The message is printed as it is:
    rich markup is not interpreted, so keys such as ``[lora_unet_...]`` stay in the line."""
    err.print(Text.assemble(("error: ", "bold red"), message), highlight=False)
    raise typer.Exit(code)


def guarded(fn: Callable[P, T]) -> Callable[P, T]:
    """Map the project's errors to one message and the documented exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except NothingToTransferError as exc:
            fail(str(exc))
        except (ConfigFileError, ValidationError) as exc:
            fail(f"configuration: {exc}", EXIT_BAD_INPUT)
        except (InputError, VersionNotFoundError, JobNotFoundError, FileNotFoundError) as exc:
            fail(str(exc), EXIT_BAD_INPUT)
        except JobStateError as exc:
            fail(str(exc), EXIT_BAD_INPUT)
        except DatabaseNotAtHeadError as exc:
            fail(str(exc), EXIT_BAD_INPUT)
        except RegistryUnavailableError as exc:
            fail(f"registry unreachable: {exc}")
        except RegistryError as exc:
            fail(f"registry: {exc}")
        except OperationalError as exc:
            fail(f"job database unreachable: {str(exc.orig).splitlines()[0]}")
        except JobDatabaseError as exc:
            fail(f"job database: {exc}")
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as exc:
            log.debug("unexpected error", exc_info=True)
            fail(f"{type(exc).__name__}: {exc} (run with --log-level DEBUG for the traceback)")

    return wrapper


def actor(by: str | None) -> str:
    """Who acts: ``--by`` or the OS user."""
    if by:
        return by
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def emit_json(document: Any) -> None:
    """Print exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    t = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        t.add_column(column, overflow="fold")
    for row in rows:
        t.add_row(*("" if cell is None else str(cell) for cell in row))
    out.print(t)


def decisions_table(title: str, modules: Sequence[dict[str, Any]]) -> None:
    """The module decisions (``migrator.documents.decision_document`` rows) as a table."""
    table(
        title,
        ["target module", "source module", "phi left", "phi right", "decision"],
        [
            (
                m["target"],
                m["source"] or "-",
                fmt_atc(m["phi_left"]),
                fmt_atc(m["phi_right"]),
                m["decision"],
            )
            for m in modules
        ],
    )


def fmt_atc(value: object) -> str:
    """A similarity or ATC with three decimals ("-" when there is none)."""
    return "-" if value is None else f"{float(value):.3f}"  # type: ignore[arg-type]


@contextmanager
def progress_bar(
    description: str, *, enabled: bool
) -> Iterator[Callable[[int, int, str], None] | None]:
    """A rich progress bar on stderr fed by ``callback(done, total, name)``; nothing when
    disabled or when stderr is not a terminal."""
    if not enabled or not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[name]}", style="dim"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=None, name="")

        def callback(done: int, total: int, name: str) -> None:
            progress.update(task, completed=done, total=total, name=name[-60:])

        yield callback
