"""Base model and adapter versions as the registry shows them: recorded once by name/version."""

from __future__ import annotations

from sqlalchemy.orm import Session

from db.enums import AdapterFormat, AdapterLayout, AdapterOrigin, BaseStatus
from db.idempotent import find_by_key, insert_or_get
from db.models import AdapterVersion, BaseModelVersion

__all__ = [
    "deprecate_base",
    "find_adapter_version",
    "find_base_version",
    "get_or_create_adapter_version",
    "get_or_create_base_version",
]


def find_base_version(name: str, version: str, *, session: Session) -> BaseModelVersion | None:
    """The base version ``name/version``, or None."""
    return find_by_key(BaseModelVersion, {"name": name, "version": version}, session=session)


def find_adapter_version(name: str, version: str, *, session: Session) -> AdapterVersion | None:
    """The adapter version ``name/version``, or None."""
    return find_by_key(AdapterVersion, {"name": name, "version": version}, session=session)


def get_or_create_base_version(
    name: str, version: str, *, session: Session, weights_digest: str | None = None
) -> BaseModelVersion:
    """Record a base version once; a second call with the same name/version returns the first."""
    row, _ = insert_or_get(
        BaseModelVersion,
        {"name": name, "version": version},
        lambda: BaseModelVersion(name=name, version=version, weights_digest=weights_digest),
        session=session,
    )
    return row


def get_or_create_adapter_version(
    name: str,
    version: str,
    *,
    base: BaseModelVersion,
    format: AdapterFormat,
    layout: AdapterLayout | None,
    session: Session,
    rank: int | None = None,
    digest: str | None = None,
    origin: AdapterOrigin = AdapterOrigin.REGISTERED,
) -> AdapterVersion:
    """Record an adapter version once; a second call with the same name/version returns the
    first unchanged."""
    row, _ = insert_or_get(
        AdapterVersion,
        {"name": name, "version": version},
        lambda: AdapterVersion(
            name=name,
            version=version,
            base=base,
            format=format,
            layout=layout,
            rank=rank,
            digest=digest,
            origin=origin,
        ),
        session=session,
    )
    return row


def deprecate_base(base: BaseModelVersion, superseded_by: str, *, session: Session) -> None:
    """Mark ``base`` deprecated, superseded by ``superseded_by`` (``name/version``)."""
    base.status = BaseStatus.DEPRECATED
    base.superseded_by = superseded_by
    session.flush()
