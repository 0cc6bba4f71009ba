"""Mapping an adapter's module names onto a base model's module names, with a coverage report.

Rules, in order, for each adapter module (base names are weight keys without ``.weight``):

1. exact: the module's name is a base module name;
2. suffix: the names differ only by wrapper prefixes: the longest base name that is a dotted
   suffix of the module's name (``base_model.model.encoder.x`` -> ``encoder.x``), else the one
   base name of which the module's name is a dotted suffix (``down_blocks.0...`` ->
   ``unet.down_blocks.0...``; several such base names make the module *ambiguous*);
3. kohya: for a kohya stem (``lora_unet_down_blocks_0_...``), the base module whose underscored
   name, after the component the prefix names (``lora_unet_`` -> ``unet.``, ``lora_te_`` /
   ``lora_te1_`` -> ``text_encoder.``, ``lora_te2_`` -> ``text_encoder_2.``) or bare (a base that is
   the component itself), equals the stem's remainder; two base names with the same underscored
   form make it ambiguous;
4. kohya SGM: a ``lora_unet_`` stem in SDXL's SGM block names
   (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``) matches the UNet module whose
   SGM name (:func:`core.checkpoints.ldm_unet_name`, with the base UNet's block layout)
   underscored equals the stem's remainder; the adapter's config then records the naming and the
   blocks, so that it is written back in SGM names.

A matched module must have the base module's (m, n) shape. Two adapter modules on one base module
are a conflict: the second is reported as a duplicate. A module that matches nothing is reported
with its likely cause (:func:`core.formats.diagnose.likely_cause`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from core.adapter import LoraAdapter, LoraModule
from core.checkpoints.unet_blocks import UnetBlocks, ldm_unet_name
from core.errors import MissingModuleError, ShapeMismatchError
from core.formats.diagnose import likely_cause
from core.formats.naming import (
    KOHYA_COMPONENTS,
    sgm_config,
    split_component,
    split_kohya_stem,
    underscored,
)

__all__ = [
    "CoverageReport",
    "MatchRule",
    "ModuleMatch",
    "UnmatchedModule",
    "UnmatchedReason",
    "resolve_modules",
]


class MatchRule(StrEnum):
    """How an adapter module was matched to a base module."""

    EXACT = "exact"
    SUFFIX = "suffix"  # differs only by wrapper prefixes
    KOHYA = "kohya"  # underscored kohya stem
    KOHYA_SGM = "kohya-sgm"  # underscored kohya stem in SDXL's SGM block names


class UnmatchedReason(StrEnum):
    """Why an adapter module has no base module."""

    NO_SUCH_MODULE = "no such module"
    SHAPE_MISMATCH = "shape mismatch"
    AMBIGUOUS = "ambiguous"
    DUPLICATE = "duplicate"  # another adapter module already adapts that base module


@dataclass(frozen=True)
class ModuleMatch:
    """One adapter module matched to a base module."""

    adapter_name: str
    base_name: str
    rule: MatchRule


@dataclass(frozen=True)
class UnmatchedModule:
    """One adapter module left out, with the reason in words (candidates, shapes)."""

    adapter_name: str
    reason: UnmatchedReason
    detail: str


@dataclass(frozen=True)
class CoverageReport:
    """How an adapter covers a base model.

    Attributes:
        matched: adapter modules matched to base modules, in adapter order.
        unmatched: adapter modules left out, with reasons.
        untouched: targeted base modules (all given base modules unless ``targeted`` was passed)
            that no adapter module adapts, in base order.
    """

    matched: tuple[ModuleMatch, ...]
    unmatched: tuple[UnmatchedModule, ...]
    untouched: tuple[str, ...]

    @property
    def complete(self) -> bool:
        """True when every adapter module found its base module."""
        return not self.unmatched

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form."""
        return {
            "matched": [dataclasses.asdict(m) for m in self.matched],
            "unmatched": [dataclasses.asdict(u) for u in self.unmatched],
            "untouched": list(self.untouched),
        }


@dataclass(frozen=True)
class _Index:
    names: frozenset[str]
    by_suffix: Mapping[str, tuple[str, ...]]  # proper dotted suffix -> base names ending in it
    by_kohya: Mapping[tuple[str | None, str], tuple[str, ...]]  # (component, underscored) -> names
    by_sgm: Mapping[str, tuple[str, ...]]  # underscored SGM name of a UNet module -> base names
    blocks: UnetBlocks | None  # the base UNet's block layout


def _unet_of(names: list[str]) -> tuple[list[str], str]:
    """The UNet's module names (relative) and their prefix: ``unet.`` in a pipeline, or "" for
    a bare UNet."""
    piped = [n[len("unet.") :] for n in names if n.startswith("unet.")]
    return (piped, "unet.") if piped else (names, "")


def _index(base_names: Iterable[str]) -> _Index:
    by_suffix: dict[str, list[str]] = {}
    by_kohya: dict[tuple[str | None, str], list[str]] = {}
    names = list(base_names)
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(name)
        component, rest = split_component(name)
        by_kohya.setdefault((component, underscored(rest)), []).append(name)
        if component is not None:  # also bare: a model whose first segment merely looks like one
            by_kohya.setdefault((None, underscored(name)), []).append(name)
    unet, prefix = _unet_of(names)
    blocks = UnetBlocks.from_diffusers_names(unet)
    by_sgm: dict[str, list[str]] = {}
    if blocks is not None:
        for name in unet:
            sgm = ldm_unet_name(name, blocks)
            if sgm is not None:
                by_sgm.setdefault(underscored(sgm), []).append(prefix + name)
    return _Index(
        names=frozenset(names),
        by_suffix={k: tuple(v) for k, v in by_suffix.items()},
        by_kohya={k: tuple(v) for k, v in by_kohya.items()},
        by_sgm={k: tuple(v) for k, v in by_sgm.items()},
        blocks=blocks,
    )


def _candidates(name: str, index: _Index) -> tuple[tuple[str, ...], MatchRule | None]:
    """Base names the adapter module ``name`` may adapt, and the rule that found them."""
    if name in index.names:
        return (name,), MatchRule.EXACT
    parts = name.split(".")
    for i in range(1, len(parts)):  # longest dotted suffix of the adapter name that is a base name
        suffix = ".".join(parts[i:])
        if suffix in index.names:
            return (suffix,), MatchRule.SUFFIX
    longer = index.by_suffix.get(name, ())
    if longer:
        return longer, MatchRule.SUFFIX
    split = split_kohya_stem(name) if "." not in name else None
    if split is not None:
        prefix, rest = split
        found = index.by_kohya.get((KOHYA_COMPONENTS[prefix], rest), ()) + index.by_kohya.get(
            (None, rest), ()
        )
        if found:
            return found, MatchRule.KOHYA
        sgm = index.by_sgm.get(rest, ()) if prefix == "lora_unet_" else ()
        if sgm:
            return sgm, MatchRule.KOHYA_SGM
    return (), None


def _problem(
    name: str,
    module: LoraModule,
    found: tuple[str, ...],
    rule: MatchRule | None,
    adapter: LoraAdapter,
    index: _Index,
    base_modules: Mapping[str, tuple[int, int]],
    owner: Mapping[str, str],
) -> UnmatchedModule | None:
    """Why the adapter module ``name`` cannot take the base module it resolved to (None: it
    can): no match, several, another shape, or a base module another one adapts already."""
    if not found or rule is None:
        cause = likely_cause(name, adapter, index.names)
        return UnmatchedModule(
            name, UnmatchedReason.NO_SUCH_MODULE, f"matches no base module; likely cause: {cause}"
        )
    if len(found) > 1:
        shown = ", ".join(sorted(found)[:4])
        return UnmatchedModule(
            name, UnmatchedReason.AMBIGUOUS, f"matches {len(found)} base modules: {shown}"
        )
    if tuple(base_modules[found[0]]) != module.shape:
        return UnmatchedModule(
            name,
            UnmatchedReason.SHAPE_MISMATCH,
            f"base module {found[0]} has shape {tuple(base_modules[found[0]])}, "
            f"the adapter's update has shape {module.shape}",
        )
    if found[0] in owner:
        return UnmatchedModule(
            name,
            UnmatchedReason.DUPLICATE,
            f"base module {found[0]} is already adapted by {owner[found[0]]}",
        )
    return None


def resolve_modules(
    adapter: LoraAdapter,
    base_modules: Mapping[str, tuple[int, int]],
    *,
    strict: bool = True,
    targeted: Iterable[str] | None = None,
) -> tuple[LoraAdapter, CoverageReport]:
    """Rename an adapter's modules to the base's module names and check their shapes.

    Args:
        adapter: the adapter as read (names as its file implies).
        base_modules: base module name -> (m, n) weight shape (2-D view; a 1x1 convolution's
            (out, in)). Pass every adaptable module of the base, not only the selected ones, so
            that "no such module" means what it says.
        strict: raise on the first problem; False drops unmatched modules and reports them.
        targeted: base modules a selector targets, for ``untouched`` (default: all of
            ``base_modules``).

    Returns:
        (the adapter with modules renamed to base names, in adapter order; the coverage report).
        ``source_key`` is kept, so writers still produce the file's own keys.

    Raises:
        MissingModuleError: (strict) a module matching no base module, or ambiguously, or a
            second module on the same base module; names the adapter file and module.
        ShapeMismatchError: (strict) a matched module whose shape is not the base's; names the
            module, the expected and the actual shape.
    """
    index = _index(base_modules)
    matched: list[ModuleMatch] = []
    unmatched: list[UnmatchedModule] = []
    renamed: dict[str, LoraModule] = {}
    owner: dict[str, str] = {}
    for name, module in adapter.modules.items():
        found, rule = _candidates(name, index)
        problem = _problem(name, module, found, rule, adapter, index, base_modules, owner)
        if problem is not None:
            if strict:
                _raise(adapter, module, problem)
            unmatched.append(problem)
            continue
        assert rule is not None
        base_name = found[0]
        owner[base_name] = name
        matched.append(ModuleMatch(name, base_name, rule))
        renamed[base_name] = (
            module if module.name == base_name else dataclasses.replace(module, name=base_name)
        )
    wanted = list(base_modules) if targeted is None else list(targeted)
    report = CoverageReport(
        matched=tuple(matched),
        unmatched=tuple(unmatched),
        untouched=tuple(n for n in wanted if n not in owner),
    )
    config = adapter.config
    if index.blocks is not None and any(m.rule is MatchRule.KOHYA_SGM for m in matched):
        config = sgm_config(config, index.blocks)
    return dataclasses.replace(adapter, modules=renamed, config=config), report


def _raise(adapter: LoraAdapter, module: LoraModule, problem: UnmatchedModule) -> None:
    key = module.source_key or problem.adapter_name
    if problem.reason is UnmatchedReason.SHAPE_MISMATCH:
        raise ShapeMismatchError(
            f"does not fit the base: {problem.detail}", path=adapter.source, key=key
        )
    raise MissingModuleError(
        f"{problem.reason.value}: {problem.detail}", path=adapter.source, key=key
    )
