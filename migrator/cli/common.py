"""What every command shares: settings from the global options, output, errors and exit codes.

Exit codes: 0 success, 1 failure of the work, 2 bad usage or bad input. With ``--json`` a
command prints exactly one JSON document on stdout; tables, progress and logs go elsewhere
(tables to stdout only without ``--json``; progress and logs to stderr).

Loading this module (and every ``migrator.cli`` module) imports only typer, rich and the
standard library: ``--help`` and a bad argument answer before the settings, the job database,
MLflow or torch are imported. Commands import what they need when they run.
"""

from __future__ import annotations

import functools
import getpass
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from migrator.cli.progress import progress_bar
from migrator.cli.tables import Column, print_table

if TYPE_CHECKING:
    from migrator.settings import Settings

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "JSON_OPTION",
    "WIDE_OPTION",
    "State",
    "actor",
    "decisions_table",
    "emit_json",
    "fail",
    "fmt_atc",
    "guarded",
    "progress_bar",
    "state",
]

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

P = ParamSpec("P")
T = TypeVar("T")


def _width(stream: Any) -> int | None:
    """A terminal's width (or ``COLUMNS``); 160 for a pipe or a file, where rich assumes 80."""
    return None if stream.isatty() or os.environ.get("COLUMNS", "").isdigit() else 160


out = Console(soft_wrap=True, width=_width(sys.stdout))
err = Console(stderr=True, soft_wrap=True, width=_width(sys.stderr))
log = logging.getLogger("migrator.cli")

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON document.")
WIDE_OPTION = typer.Option(
    False, "--wide", "-w", help="Every column, names in full (the default fits the terminal)."
)


@dataclass
class State:
    """Global options, set by the app callback."""

    config: str | None = None
    log_level: str | None = None
    verbose: bool = False
    _settings: Settings | None = None

    def settings(self) -> Settings:
        if self._settings is None:
            from migrator.logs import configure_logging
            from migrator.settings import load_settings

            self._settings = load_settings(self.config)
            configure_logging(self.log_level or self._settings.log_level, self._settings.log_format)
        return self._settings


state = State()


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print one clear line on stderr and exit with ``code``. The message is printed as it is:
    rich markup is escaped, so keys such as ``[lora_unet_...]`` stay in the line."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


#: (module, class, message prefix, exit code), most specific first. A class is looked up only
#: when its module is loaded: an error of a module that was never imported cannot be raised.
_KNOWN_ERRORS: tuple[tuple[str, str, str, int], ...] = (
    ("migrator.errors", "NothingToTransferError", "", EXIT_FAILED),
    ("migrator.settings", "ConfigFileError", "configuration: ", EXIT_BAD_INPUT),
    ("pydantic", "ValidationError", "configuration: ", EXIT_BAD_INPUT),
    ("core.errors", "InputError", "", EXIT_BAD_INPUT),
    ("migrator.registry.base", "VersionNotFoundError", "", EXIT_BAD_INPUT),
    ("db.errors", "JobNotFoundError", "", EXIT_BAD_INPUT),
    ("builtins", "FileNotFoundError", "", EXIT_BAD_INPUT),
    ("db.errors", "JobStateError", "", EXIT_BAD_INPUT),
    ("db.errors", "DatabaseNotAtHeadError", "", EXIT_BAD_INPUT),
    ("migrator.registry.base", "RegistryUnavailableError", "registry unreachable: ", EXIT_FAILED),
    ("migrator.registry.base", "RegistryError", "registry: ", EXIT_FAILED),
    ("sqlalchemy.exc", "OperationalError", "job database unreachable: ", EXIT_FAILED),
    ("db.errors", "JobDatabaseError", "job database: ", EXIT_FAILED),
)


def classify(exc: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit code of a known error (None for an unexpected one)."""
    for module_name, class_name, prefix, code in _KNOWN_ERRORS:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if cls is not None and isinstance(exc, cls):
            text = str(exc)
            if class_name == "OperationalError":
                text = str(getattr(exc, "orig", exc)).splitlines()[0]
            return prefix + text, code
    return None


def guarded(fn: Callable[P, T]) -> Callable[P, T]:
    """Map the project's errors to one message and the documented exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as exc:
            known = classify(exc)
            if known is not None:
                fail(*known)
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


def fmt_atc(value: object) -> str:
    """A similarity or ATC with three decimals ("-" when there is none)."""
    return "-" if value is None else f"{float(value):.3f}"  # type: ignore[arg-type]


def fields(title: str | None, items: Sequence[tuple[str, object]]) -> None:
    """``name: value`` lines (``kubectl describe``), the long detail of one object."""
    if title:
        out.print(f"[bold]{title}[/]", highlight=False)
    width = min(18, max((len(k) for k, _ in items), default=0))
    for key, value in items:
        shown = "-" if value is None or value == "" else str(value)
        out.print(f"  {key + ':':<{width + 1}} {shown}", highlight=False, markup=False)


DECISION_COLUMNS = (
    Column("TARGET MODULE", squeeze=True),
    Column("SOURCE MODULE", squeeze=True),
    Column("PHI L", justify="right"),
    Column("PHI R", justify="right"),
    Column("DECISION"),
)


def decisions_table(
    title: str | None, modules: Sequence[dict[str, Any]], *, wide: bool = False
) -> None:
    """The module decisions (``migrator.documents.decision_document`` rows) as a table."""
    print_table(
        out,
        DECISION_COLUMNS,
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
        wide=wide,
        title=title,
    )
