"""The job database as the admin commands open it: read-only commands create nothing, and
"not found" messages say which database (and registry) they looked in, with close matches."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from migrator.cli.common import EXIT_BAD_INPUT, fail, state

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

__all__ = ["JobDb", "did_you_mean", "open_job_db", "sqlite_file"]


@dataclass
class JobDb:
    """An opened job database and how messages name it.

    Attributes:
        sessions: the session factory.
        url: the database URL, password hidden.
        registry: the registry URI the settings name (what the catalog mirrors).
    """

    sessions: sessionmaker[Session]
    url: str
    registry: str

    @property
    def where(self) -> str:
        """``job database URL (registry URI)``, for "not found" messages."""
        return f"the job database {self.url} (registry {self.registry})"


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for another database or an in-memory one)."""
    from sqlalchemy import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def open_job_db(*, read_only: bool) -> JobDb:
    """Open the job database the settings name.

    Read-only commands (lists, ``show``, ``lineage``) refuse a SQLite file that does not exist
    instead of creating an empty one, and never migrate; the others create the embedded
    database at head when it is missing (``migrator.database.prepare_database``).
    """
    from sqlalchemy import make_url

    from db import make_engine, make_session_factory, migrations
    from migrator.database import prepare_database

    settings = state.settings()
    url = settings.database_url.get_secret_value()
    shown = make_url(url).render_as_string(hide_password=True)
    if read_only:
        path = sqlite_file(url)
        if path is not None and not path.is_file():
            fail(
                f"no job database at {path} (MIGRATOR_DATABASE_URL={shown}): nothing has run "
                "with these settings here; set MIGRATOR_DATA_DIR or MIGRATOR_DATABASE_URL to "
                "the service's",
                EXIT_BAD_INPUT,
            )
        migrations.ensure_at_head(url)
    else:
        prepare_database(url)
    return JobDb(make_session_factory(make_engine(url)), shown, settings.registry_uri)


def did_you_mean(wanted: str, known: Iterable[str]) -> str:
    """``; did you mean: a, b?`` for the close matches of ``wanted`` (empty without any)."""
    names = sorted(set(known))
    close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.5)
    close += [n for n in names if wanted in n and n not in close][: 3 - len(close)]
    return f"; did you mean: {', '.join(close)}?" if close else ""
