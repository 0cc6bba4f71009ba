"""Adapter files: PEFT, kohya, diffusers and the compact LoRA-X format.

:func:`read_adapter` detects the layout and returns a :class:`core.adapter.LoraAdapter`;
:func:`write_adapter` writes one back (its own layout by default) atomically;
:func:`resolve_modules` maps module names onto a base's and reports coverage;
:func:`encode_compact` / :func:`decode_compact` convert between the expanded and compact LoRA-X
forms. Each layout lives in its own module (``peft``, ``kohya``, ``diffusers``, ``compact``).
"""

from __future__ import annotations

from core.formats.adapter_io import read_adapter, write_adapter
from core.formats.compact import (
    COMPACT_FORMAT,
    COMPACT_VERSION,
    decode_compact,
    encode_compact,
)
from core.formats.detect import detect_layout
from core.formats.lycoris import LycorisOptions
from core.formats.resolve import (
    CoverageReport,
    MatchRule,
    ModuleMatch,
    UnmatchedModule,
    UnmatchedReason,
    resolve_modules,
)

__all__ = [
    "COMPACT_FORMAT",
    "COMPACT_VERSION",
    "CoverageReport",
    "LycorisOptions",
    "MatchRule",
    "ModuleMatch",
    "UnmatchedModule",
    "UnmatchedReason",
    "decode_compact",
    "detect_layout",
    "encode_compact",
    "read_adapter",
    "resolve_modules",
    "write_adapter",
]
