"""Typed errors of the LoRA-X core.

Every error raised for bad input derives from :class:`InputError` and names the file (and the
tensor key or module, where there is one) in its message, so that a caller can print it as the
single line a user sees. The service maps :class:`InputError` to exit code 2 and to a failed or
skipped job with that message as the reason.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "BaseMismatchError",
    "CorruptFileError",
    "FactorizationError",
    "InputError",
    "LoraxError",
    "MissingModuleError",
    "NonFiniteError",
    "PickleRefusedError",
    "ShapeMismatchError",
    "SubspaceError",
    "TransportError",
    "UnknownLayoutError",
    "UnpairedTensorError",
]


class LoraxError(Exception):
    """Base class of every error raised by ``core``."""


class InputError(LoraxError):
    """Bad input: a file, tensor or adapter that cannot be used as given.

    Args:
        message: what is wrong, in words a user can act on.
        path: the file or folder concerned, if any.
        key: the tensor key or module name concerned, if any.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, key: str | None = None):
        self.path = None if path is None else str(path)
        self.key = key
        self.reason = message
        where = []
        if self.path is not None:
            where.append(self.path)
        if key is not None:
            where.append(f"[{key}]")
        prefix = " ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class CorruptFileError(InputError):
    """A file that is truncated, not safetensors, or whose header or index is unreadable."""


class PickleRefusedError(InputError):
    """A pickle-based checkpoint (``.bin``, ``.pt``, ``.ckpt``, ``.pth``) that was not opted into."""


class NonFiniteError(InputError):
    """A tensor holding NaN or Inf values."""


class ShapeMismatchError(InputError):
    """Tensor shapes that do not fit each other or the base model."""


class UnknownLayoutError(InputError):
    """Keys or files in a layout that no reader recognises."""


class MissingModuleError(InputError):
    """An adapter module with no matching module in the base model."""


class BaseMismatchError(InputError):
    """A compact LoRA-X decoded against a base tensor other than the one it was trained on."""


class UnpairedTensorError(InputError):
    """A LoRA half without its partner: a down/A tensor without its up/B, or the reverse."""


class FactorizationError(LoraxError):
    """An SVD that failed to converge or returned non-finite factors for a finite matrix."""


class TransportError(LoraxError):
    """The optimal-transport solver did not reach an optimal plan (``ot.emd`` result code)."""


class SubspaceError(InputError):
    """An adapter module that is not a LoRA-X of the given base: its update leaves the span of the
    base's leading singular vectors, so it has no compact (dS) form there."""
