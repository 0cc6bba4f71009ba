"""Which Stable Diffusion family a base or an adapter is for, from names and metadata alone.

A base is identified from its module names in the canonical (diffusers) naming and the stored
shape of one weight, so that a diffusers folder and the same model as one single-file checkpoint
give the same answer:

- ``sdxl``: a UNet with ``add_embedding`` (SDXL's added conditioning) and both text encoders;
- ``sdxl-refiner``: ``add_embedding`` and only ``text_encoder_2``;
- ``sd2``: a UNet whose transformers project with linear layers (``proj_in`` 2-D) and no
  ``add_embedding``; for a single-file checkpoint also an OpenCLIP text encoder;
- ``sd1``: a UNet whose ``proj_in`` is a 1x1 convolution;
- None otherwise (an LLM, a bare text encoder, ...).

An adapter is identified from its metadata: kohya's ``ss_base_model_version`` (``sd_v1``,
``sd_v2``, ``sdxl_base_v1-0``) or the ModelSpec ``modelspec.architecture``
(``stable-diffusion-v1/lora``, ``stable-diffusion-v2-512/lora``,
``stable-diffusion-xl-v1-base/lora``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum

__all__ = ["Architecture", "architecture_of_adapter", "architecture_of_base", "describe"]


class Architecture(StrEnum):
    """A Stable Diffusion family."""

    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl-refiner"


def architecture_of_base(
    stored_shapes: Mapping[str, Sequence[int]], *, families: Mapping[str, str] | None = None
) -> Architecture | None:
    """The family of a base from its module names (canonical naming) and stored shapes.

    Args:
        stored_shapes: module name -> stored weight shape.
        families: for a single-file checkpoint, component -> naming family (``openclip`` marks
            SD 2.x's text encoder).
    """
    names = list(stored_shapes)
    has = {
        c: any(n.startswith(c + ".") for n in names)
        for c in ("unet", "text_encoder", "text_encoder_2")
    }
    bare_unet = not has["unet"] and any(n.startswith("down_blocks.") for n in names)
    unet_prefix = "unet." if has["unet"] else ("" if bare_unet else None)
    if unet_prefix is None:
        return None
    if any(n == f"{unet_prefix}add_embedding.linear_1" for n in names):
        refiner = has["text_encoder_2"] and not has["text_encoder"]
        return Architecture.SDXL_REFINER if refiner else Architecture.SDXL
    if families is not None and families.get("text_encoder") == "openclip":
        return Architecture.SD2
    proj = next((s for n, s in stored_shapes.items() if _is_proj_in(n, unet_prefix)), None)
    if proj is None:
        return None
    return Architecture.SD1 if len(proj) == 4 else Architecture.SD2


def _is_proj_in(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and name.endswith(".attentions.0.proj_in")


_SS_VERSIONS = (("sdxl_refiner", Architecture.SDXL_REFINER), ("sdxl", Architecture.SDXL))
_MODELSPEC = (
    ("stable-diffusion-xl-v1-refiner", Architecture.SDXL_REFINER),
    ("stable-diffusion-xl", Architecture.SDXL),
    ("stable-diffusion-v2", Architecture.SD2),
    ("stable-diffusion-v1", Architecture.SD1),
)


def architecture_of_adapter(metadata: Mapping[str, str]) -> Architecture | None:
    """The family an adapter was trained for, from its kohya or ModelSpec metadata; None when
    neither names a Stable Diffusion family."""
    spec = str(metadata.get("modelspec.architecture", "")).lower()
    for head, arch in _MODELSPEC:
        if spec.startswith(head):
            return arch
    version = str(metadata.get("ss_base_model_version", "")).lower()
    for head, arch in _SS_VERSIONS:
        if version.startswith(head):
            return arch
    if version.startswith(("sd_v2", "sd_2")):
        return Architecture.SD2
    if version.startswith(("sd_v1", "sd_1")):
        return Architecture.SD1
    if str(metadata.get("ss_v2", "")).lower() == "true":
        return Architecture.SD2
    return None


_WORDS = {
    Architecture.SD1: "SD 1.x",
    Architecture.SD2: "SD 2.x",
    Architecture.SDXL: "SDXL",
    Architecture.SDXL_REFINER: "the SDXL refiner",
}


def describe(arch: Architecture | None) -> str:
    """Words for messages: ``SDXL``, ``SD 1.x``, ... (``an unknown model`` for None)."""
    return "an unknown model" if arch is None else _WORDS[arch]
