"""Which MLflow errors are worth retrying: transient ones (the server is away, busy or slow)
against permanent ones (the request itself is wrong)."""

from __future__ import annotations

import sys

__all__ = ["first_line", "is_transient"]

_PERMANENT_CODES = {
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_PARAMETER_VALUE",
    "INVALID_STATE",
    "BAD_REQUEST",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "NOT_FOUND",
    "ENDPOINT_NOT_FOUND",
}
_TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
    "IO_ERROR",
    "ABORTED",
    "RESOURCE_EXHAUSTED",
}
_TRANSIENT_TEXT = (
    "max retries exceeded",
    "connection refused",
    "connection aborted",
    "connection broken",
    "connection reset",
    "connectionerror",
    "incompleteread",
    "timed out",
    "database is locked",
    "remote end closed",
    "temporarily unavailable",
    "502",
    "503",
    "504",
)


def _mlflow_code(exc: BaseException) -> str | None:
    """The error code of an ``MlflowException`` (None for any other error). MLflow is not
    imported for it: an error of a process that never loaded MLflow is not one of its."""
    exceptions = sys.modules.get("mlflow.exceptions")
    if exceptions is not None and isinstance(exc, exceptions.MlflowException):
        return str(exc.error_code)
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying a registry call that raised ``exc`` may succeed."""
    code = _mlflow_code(exc)
    if code is not None:
        if code in _PERMANENT_CODES:
            return False
        if code in _TRANSIENT_CODES:
            return True
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(marker in text for marker in _TRANSIENT_TEXT)


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type when it has none), at most 200 chars."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
