"""Errors of the service that callers map to messages and exit codes."""

from __future__ import annotations

from core.errors import InputError

__all__ = ["NothingToTransferError"]


class NothingToTransferError(InputError):
    """No module of the adapter clears the module similarity threshold on the target."""
