"""Which modules take adapters, and what role each module plays.

A module's *name* is its weight key without ``.weight`` (``unet.down_blocks.0.attentions.0
.transformer_blocks.0.attn1.to_q``). Two things are decided from names alone:

- :class:`ModuleSelector` picks the modules an adapter may sit on (by default the attention
  projections the LoRA-X paper adapts: section B.2 applies LoRA-X to ``to_q``, ``to_k``,
  ``to_v``, ``to_out`` of the UNet and the text encoders).
- :class:`RoleRule` maps a name to its *role*: the name with numeric path segments replaced by
  ``*`` (``down_blocks.*.attentions.*.transformer_blocks.*.attn1.to_q``). Pairs of modules with
  different roles are invalid for the subspace similarity (paper appendix D, rule b: different
  network parts or different attention operations).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["DEFAULT_PATTERNS", "ModuleSelector", "RoleRule", "role_of"]

DEFAULT_PATTERNS: tuple[str, ...] = (
    # diffusers UNet / transformer attention: attn1.to_q, attn2.to_out.0, ...
    r"(^|\.)(to_q|to_k|to_v|to_out\.0)$",
    # Llama / Mistral / Qwen style self-attention
    r"(^|\.)(q_proj|k_proj|v_proj|o_proj)$",
    # CLIP text encoders of diffusers pipelines (their output projection is ``out_proj``)
    r"(^|\.)self_attn\.out_proj$",
    # BERT-style encoders
    r"(^|\.)attention\.self\.(query|key|value)$",
    r"(^|\.)attention\.output\.dense$",
)
"""Regexes (``re.search`` over module names) of the attention projections adapted by default."""


def _compile(patterns: Iterable[str], what: str) -> tuple[re.Pattern[str], ...]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ValueError(f"invalid {what} pattern {pattern!r}: {exc}") from exc
    return tuple(compiled)


@dataclass(frozen=True)
class ModuleSelector:
    """Selects module names by include and exclude regexes.

    A name is selected when at least one ``include`` pattern matches it (``re.search``) and no
    ``exclude`` pattern does.

    Attributes:
        include: regexes of names to take; defaults to :data:`DEFAULT_PATTERNS`.
        exclude: regexes of names to leave out even when included.

    Raises:
        ValueError: a pattern that does not compile (at construction).
    """

    include: tuple[str, ...] = DEFAULT_PATTERNS
    exclude: tuple[str, ...] = ()
    _include_re: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _exclude_re: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "_include_re", _compile(self.include, "include"))
        object.__setattr__(self, "_exclude_re", _compile(self.exclude, "exclude"))

    def matches(self, name: str) -> bool:
        """True when ``name`` is selected."""
        if not any(p.search(name) for p in self._include_re):
            return False
        return not any(p.search(name) for p in self._exclude_re)

    def select(self, names: Iterable[str]) -> tuple[str, ...]:
        """The selected names, in the order given."""
        return tuple(name for name in names if self.matches(name))


_NUMERIC_SEGMENT = re.compile(r"(?<![^.])\d+(?![^.])")  # a whole dot-separated segment of digits


@dataclass(frozen=True)
class RoleRule:
    """How a module name maps to its role.

    By default the role is the name with every all-digit path segment replaced by ``*``
    (``encoder.layer.3.attention.self.query`` -> ``encoder.layer.*.attention.self.query``).

    Attributes:
        wildcard_numeric: replace numeric segments by ``*`` (first step).
        substitutions: extra ``(regex, replacement)`` pairs applied with ``re.sub`` in order after
            the wildcarding, e.g. ``((r"^(down|up)_blocks", "blocks"),)`` to let down and up
            blocks pair.
        function: a custom ``name -> role`` function; when given it replaces both steps above.
    """

    wildcard_numeric: bool = True
    substitutions: tuple[tuple[str, str], ...] = ()
    function: Callable[[str], str] | None = None
    _compiled: tuple[tuple[re.Pattern[str], str], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        subs = tuple((str(p), str(r)) for p, r in self.substitutions)
        object.__setattr__(self, "substitutions", subs)
        patterns = _compile((pattern for pattern, _ in subs), "role substitution")
        compiled = tuple((pattern, repl) for pattern, (_, repl) in zip(patterns, subs, strict=True))
        object.__setattr__(self, "_compiled", compiled)

    def role(self, name: str) -> str:
        """The role of module ``name``."""
        if self.function is not None:
            return self.function(name)
        role = _NUMERIC_SEGMENT.sub("*", name) if self.wildcard_numeric else name
        for pattern, repl in self._compiled:
            role = pattern.sub(repl, role)
        return role


DEFAULT_ROLE_RULE = RoleRule()


def role_of(name: str, rule: RoleRule | None = None) -> str:
    """The role of module ``name`` under ``rule`` (default: numeric segments wildcarded)."""
    return (rule or DEFAULT_ROLE_RULE).role(name)
