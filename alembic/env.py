"""Alembic environment of the job database.

The database URL comes from, in order: ``config.attributes["url"]`` (set by
``db.migrations``), ``-x url=...`` on the alembic command line, ``MIGRATOR_DATABASE_URL`` (the
service's setting). The revision table is ``migrator_alembic_version``: MLflow keeps its own
``alembic_version``. Only the job database's own tables are compared by autogenerate.
"""

from __future__ import annotations

import os
import sys
from logging.config import fileConfig
from pathlib import Path
from typing import Any

from alembic import context

_REPOSITORY = Path(__file__).resolve().parent.parent
if str(_REPOSITORY) not in sys.path:  # alembic run by hand, outside an install
    sys.path.insert(0, str(_REPOSITORY))

import db.models  # noqa: E402, F401  (registers the tables on the metadata)
from db.base import Base  # noqa: E402
from db.engine import make_engine  # noqa: E402
from db.migrations import VERSION_TABLE  # noqa: E402
from db.timestamps import UTCDateTime  # noqa: E402

config = context.config
if config.config_file_name is not None and not config.attributes.get("url"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    url = (
        config.attributes.get("url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("MIGRATOR_DATABASE_URL")
    )
    if not url:
        raise RuntimeError(
            "no job database URL: set MIGRATOR_DATABASE_URL or pass -x url=... to alembic"
        )
    return str(url)


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    # Migrations must not depend on db's Python types: a UTCDateTime is a timestamptz column.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    # Tables of another application sharing the database are not ours to drop.
    return not (type_ == "table" and reflected and compare_to is None)


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        compare_type=True,
        render_as_batch=True,  # SQLite can only ALTER by copying the table
        render_item=_render_item,
        include_object=_include_object,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade --sql``)."""
    _configure(url=_database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate a live database."""
    # Foreign keys off on SQLite: batch operations drop and recreate tables.
    engine = make_engine(_database_url(), sqlite_foreign_keys=False)
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
