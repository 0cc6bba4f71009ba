"""``migrator db upgrade|check``: the job database's schema."""

from __future__ import annotations

import typer

from migrator.cli.common import EXIT_FAILED, emit_json, guarded, out, state
from migrator.cli.help import App

__all__ = ["db_app"]

db_app = App(help="The job database's schema: upgrade it, check it.", no_args_is_help=True)


@db_app.command("upgrade")
@guarded
def db_upgrade(
    revision: str = typer.Argument("head", help="Target revision (default: head)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Migrate the job database (MIGRATOR_DATABASE_URL) to the code's schema."""
    from db import migrations
    from migrator.database import ensure_sqlite_parent

    url = state.settings().database_url.get_secret_value()
    ensure_sqlite_parent(url)
    before = migrations.current(url)
    migrations.upgrade(url, revision)
    after = migrations.current(url)
    if as_json:
        emit_json({"from": before, "to": after, "head": migrations.head()})
    else:
        out.print(f"job database at {after} (was {before or 'empty'})")


@db_app.command("check")
@guarded
def db_check(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Exit 0 when the job database is at head and matches the models; 1 otherwise.

    Creates nothing: a SQLite file that does not exist is reported, not made.
    """
    from db import DatabaseNotAtHeadError, SchemaDriftError, migrations
    from migrator.cli.jobdb import sqlite_file

    url = state.settings().database_url.get_secret_value()
    path = sqlite_file(url)
    missing = path is not None and not path.is_file()
    current, head = (None if missing else migrations.current(url)), migrations.head()
    problem = None
    if missing:
        # Named as other commands name an empty database, and where it would be.
        problem = f"no job database at {path}: {DatabaseNotAtHeadError(None, head)}"
    elif current != head:
        problem = str(DatabaseNotAtHeadError(current, head))  # the message other commands give
    else:
        try:
            migrations.check(url)
        except SchemaDriftError as exc:
            problem = str(exc)
    if as_json:
        emit_json({"revision": current, "head": head, "ok": problem is None, "problem": problem})
    else:
        out.print(problem or f"job database at head ({head}), no drift")
    if problem:
        raise typer.Exit(EXIT_FAILED)
