"""Why an adapter module matches no base module: the likely cause, in words a user can act on.

The causes, tried in order: the adapter's metadata names another Stable Diffusion family than
the base's names show; the module adapts a pipeline component the base lacks (an SDXL
``lora_te2_`` module on an SD 1.x base); the base holds modules of the same kind (``to_q``,
``conv1``, ``mlp_fc1``, ...) but none at this path, which is another naming or another block
layout, not necessarily another model; the base holds no module of that kind at all.
"""

from __future__ import annotations

from collections.abc import Collection

from core.adapter import LoraAdapter
from core.checkpoints.architecture import Architecture, describe
from core.formats.naming import KOHYA_COMPONENTS, split_component, split_kohya_stem, underscored

__all__ = ["likely_cause"]

_SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")


def _base_family(base_names: Collection[str]) -> str | None:
    """``SDXL`` or ``SD 1.x/2.x`` from names alone (None for a base without a UNet)."""
    unet = [n for n in base_names if n.startswith(("unet.", "down_blocks.", "mid_block."))]
    if not unet:
        return None
    if any(n.endswith("add_embedding.linear_1") for n in unet):
        return "SDXL"
    return "SD 1.x/2.x"


def _adapter_family(adapter: LoraAdapter) -> str | None:
    arch = adapter.architecture
    if arch is None:
        return None
    if arch in (Architecture.SDXL, Architecture.SDXL_REFINER):
        return "SDXL"
    return "SD 1.x/2.x"


def _tokens(name: str) -> list[str]:
    """The underscored path of a module name or kohya stem, split into tokens."""
    split = split_kohya_stem(name) if "." not in name else None
    path = split[1] if split is not None else underscored(split_component(name)[1])
    return path.split("_")


def likely_cause(name: str, adapter: LoraAdapter, base_names: Collection[str]) -> str:
    """The likely reason why adapter module ``name`` matches none of ``base_names``."""
    base, ours = _base_family(base_names), _adapter_family(adapter)
    if base is not None and ours is not None and base != ours:
        return (
            f"the adapter's metadata says it is for {describe(adapter.architecture)} but the "
            f"base looks like {base}: an adapter for another model"
        )
    split = split_kohya_stem(name) if "." not in name else None
    if split is not None:
        component = KOHYA_COMPONENTS[split[0]]
        components = {split_component(n)[0] for n in base_names}
        if None not in components and component not in components:
            return (
                f"the base has no {component} (the adapter adapts it: "
                f"{'SDXL' if component == 'text_encoder_2' else 'another'} pipeline)"
            )
        if any(block in split[1] for block in _SGM_BLOCKS) and base is None:
            return "SGM block names (kohya SDXL) but the base has no UNet"
    ours_tokens = _tokens(name)
    best = 0
    for base_name in base_names:
        theirs = _tokens(base_name)
        shared = 0
        while shared < min(len(ours_tokens), len(theirs)) and (
            ours_tokens[-1 - shared] == theirs[-1 - shared]
        ):
            shared += 1
        best = max(best, shared)
    kind = "_".join(ours_tokens[-2:])
    if best >= min(2, len(ours_tokens)):
        return (
            f"the base has {kind} modules but none at this path: another naming or another "
            "block layout (compare the key with the base's module names), or another model"
        )
    return (
        f"the base has no module of this kind ({kind}): a kind it does not hold or whose "
        "weights are not matrices, or an adapter for another model"
    )
