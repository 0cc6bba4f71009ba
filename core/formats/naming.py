"""Module names and file key stems: kohya's underscored names, wrapper prefixes, and the rules
that turn a (possibly renamed) module's name back into the key stem its layout expects.

A reader keeps each module's key stem in :attr:`LoraModule.source_key`; a writer reuses it when it
still agrees with the module's name, and otherwise derives a stem with the rule the other modules
of the adapter follow. That covers modules a transfer renamed (a target block matched to another
source block) without ever writing one module's key under another's name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from core.adapter import LoraModule
from core.checkpoints.unet_blocks import UnetBlocks, ldm_unet_name

__all__ = [
    "KOHYA_COMPONENTS",
    "KOHYA_PREFIX_OF_COMPONENT",
    "PEFT_WRAPPER",
    "dotted_stems",
    "kohya_stems",
    "require_unique",
    "sgm_blocks_of",
    "sgm_config",
    "split_component",
    "split_kohya_stem",
    "underscored",
]

PEFT_WRAPPER = "base_model.model."

# kohya key prefixes and the diffusers pipeline component each one adapts.
KOHYA_COMPONENTS: dict[str, str] = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "lora_transformer_": "transformer",
}
KOHYA_PREFIX_OF_COMPONENT: dict[str, str] = {
    "unet": "lora_unet_",
    "text_encoder": "lora_te_",
    "text_encoder_2": "lora_te2_",
    "text_encoder_3": "lora_te3_",
    "transformer": "lora_transformer_",
}
PIPELINE_COMPONENTS = frozenset(KOHYA_PREFIX_OF_COMPONENT)
# Adapter config keys of a kohya file whose UNet keys use the SGM block names (set on resolve).
UNET_NAMING_KEY, UNET_BLOCKS_KEY = "unet_naming", "unet_blocks"


def sgm_config(config: Mapping[str, object], blocks: UnetBlocks) -> dict[str, object]:
    """``config`` marking SGM-named UNet keys resolved with ``blocks``."""
    return {**config, UNET_NAMING_KEY: "sgm", UNET_BLOCKS_KEY: blocks.as_dict()}


def sgm_blocks_of(config: Mapping[str, object]) -> UnetBlocks | None:
    """The UNet blocks an SGM-named kohya adapter was resolved with, or None."""
    if config.get(UNET_NAMING_KEY) != "sgm":
        return None
    return UnetBlocks.from_dict(config.get(UNET_BLOCKS_KEY))


def require_unique(stems: Sequence[str]) -> None:
    """Raise ValueError when two modules would be written under one key stem."""
    seen: set[str] = set()
    for stem in stems:
        if stem in seen:
            raise ValueError(f"two modules map to the key stem {stem}")
        seen.add(stem)


def underscored(name: str) -> str:
    """kohya's form of a dotted module name: every '.' replaced by '_'."""
    return name.replace(".", "_")


def split_component(name: str) -> tuple[str | None, str]:
    """(pipeline component, rest) of a module name: ``unet.down_blocks.0`` -> (unet, down_blocks.0);
    a name without a known component first segment gives (None, name)."""
    head, _, rest = name.partition(".")
    if rest and head in PIPELINE_COMPONENTS:
        return head, rest
    return None, name


def split_kohya_stem(stem: str) -> tuple[str, str] | None:
    """(kohya prefix, underscored remainder) of a kohya key stem, or None if it is not one."""
    for prefix in sorted(KOHYA_COMPONENTS, key=len, reverse=True):
        if stem.startswith(prefix) and len(stem) > len(prefix):
            return prefix, stem[len(prefix) :]
    return None


def _segments(name: str) -> list[str]:
    return name.split(".") if name else []


def _rule(name: str, stem: str) -> tuple[str, str] | None:
    """(strip, add) such that stem = add + name[len(strip):], found from the longest common dotted
    suffix; None when there is none or the rule touches numbered segments (a renamed block)."""
    a, b = _segments(name), _segments(stem)
    common = 0
    while common < min(len(a), len(b)) and a[-1 - common] == b[-1 - common]:
        common += 1
    if common == 0:
        return None
    strip, add = a[: len(a) - common], b[: len(b) - common]
    if any(seg.isdigit() for seg in strip + add):
        return None
    return ("".join(s + "." for s in strip), "".join(s + "." for s in add))


def dotted_stems(
    modules: Sequence[LoraModule], *, default_add: str, use_source_keys: bool = True
) -> list[str]:
    """Key stems for a dotted layout (PEFT, diffusers), one per module, in order.

    Each module keeps its ``source_key`` when that agrees with its name: they share a dotted
    suffix and differ only by wrapper prefixes without numbered segments (``base_model.model.``,
    ``unet.``), so a key of another block never passes. Otherwise the rule (strip, add) most
    common among the agreeing modules is applied to its name (``default_add + name`` when no
    module agrees). ``use_source_keys=False`` (a conversion from another layout) derives every
    stem as ``default_add + name``.
    """
    rules = [
        _rule(m.name, m.source_key) if use_source_keys and m.source_key is not None else None
        for m in modules
    ]
    counts = Counter(r for r in rules if r is not None)
    strip, add = counts.most_common(1)[0][0] if counts else ("", default_add)
    stems = []
    for module, rule in zip(modules, rules, strict=True):
        if rule is not None and module.source_key is not None:
            stems.append(module.source_key)
        else:
            stems.append(add + module.name.removeprefix(strip))
    return stems


def _unet_path(bare: str, prefix: str, blocks: UnetBlocks | None) -> str:
    """The underscored path of a module under ``prefix``: SGM block names for the UNet of an
    SGM-named adapter, else the name itself.

    Raises:
        ValueError: a UNet module with no SGM name.
    """
    if blocks is None or prefix != "lora_unet_":
        return underscored(bare)
    sgm = ldm_unet_name(bare, blocks)
    if sgm is None:
        raise ValueError(f"UNet module {bare} has no SGM name (kohya SDXL naming)")
    return underscored(sgm)


def _kohya_agrees(name: str, stem: str, blocks: UnetBlocks | None) -> bool:
    if name == stem:
        return True
    split = split_kohya_stem(stem)
    if split is None:
        return False
    prefix, rest = split
    component, bare = split_component(name)
    if component is not None and component != KOHYA_COMPONENTS[prefix]:
        return False
    try:
        return _unet_path(bare, prefix, blocks) == rest
    except ValueError:
        return False


def kohya_stems(
    modules: Sequence[LoraModule],
    *,
    use_source_keys: bool = True,
    sgm_blocks: UnetBlocks | None = None,
) -> list[str]:
    """kohya key stems (``lora_unet_...``), one per module, in order.

    A module keeps its ``source_key`` when it agrees with its name; otherwise the stem is derived:
    the component prefix of a pipeline name (``unet.`` -> ``lora_unet_``; ``text_encoder.`` ->
    ``lora_te1_`` when the adapter already uses ``lora_te1_``/``lora_te2_``, else ``lora_te_``),
    and for a name without a component the prefix most common among the other bare names
    (``lora_unet_`` by default), followed by the underscored name (for the UNet of an SGM-named
    adapter, ``sgm_blocks`` given, its SGM block name: ``lora_unet_input_blocks_4_1_...``).
    ``use_source_keys=False`` derives every stem.

    Raises:
        ValueError: with ``sgm_blocks``, a UNet module that has no SGM name.
    """
    agrees = [
        use_source_keys
        and m.source_key is not None
        and _kohya_agrees(m.name, m.source_key, sgm_blocks)
        for m in modules
    ]
    used = Counter(
        split[0]
        for m, ok in zip(modules, agrees, strict=True)
        if ok and m.source_key is not None and (split := split_kohya_stem(m.source_key))
    )
    bare_prefixes = Counter(
        split[0]
        for m, ok in zip(modules, agrees, strict=True)
        if ok
        and m.source_key is not None
        and split_component(m.name)[0] is None
        and (split := split_kohya_stem(m.source_key))
    )
    bare_prefix = bare_prefixes.most_common(1)[0][0] if bare_prefixes else "lora_unet_"
    te_prefix = "lora_te1_" if ("lora_te1_" in used or "lora_te2_" in used) else "lora_te_"
    stems = []
    for module, ok in zip(modules, agrees, strict=True):
        if ok and module.source_key is not None:
            stems.append(module.source_key)
            continue
        if module.name.startswith(tuple(KOHYA_COMPONENTS)) and "." not in module.name:
            stems.append(module.name)  # already a kohya stem (unresolved)
            continue
        component, bare = split_component(module.name)
        if component is None:
            prefix = bare_prefix
        elif component == "text_encoder":
            prefix = te_prefix
        else:
            prefix = KOHYA_PREFIX_OF_COMPONENT[component]
        stems.append(prefix + _unet_path(bare, prefix, sgm_blocks))
    return stems
