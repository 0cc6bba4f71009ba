"""Base checkpoints in other namings: single-file SD 1.x / 2.x / SDXL (LDM / SGM) named in the
canonical diffusers naming, the UNet block arithmetic that kohya's SGM names also need, and the
identification of a Stable Diffusion family from names and metadata."""

from __future__ import annotations

from core.checkpoints.architecture import (
    Architecture,
    architecture_of_adapter,
    architecture_of_base,
    describe,
)
from core.checkpoints.ldm_names import (
    COMPONENT_PREFIXES,
    CheckpointMap,
    KeyView,
    checkpoint_key,
    is_ldm_checkpoint,
    map_checkpoint,
)
from core.checkpoints.unet_blocks import UnetBlocks, diffusers_unet_name, ldm_unet_name

__all__ = [
    "COMPONENT_PREFIXES",
    "Architecture",
    "CheckpointMap",
    "KeyView",
    "UnetBlocks",
    "architecture_of_adapter",
    "architecture_of_base",
    "checkpoint_key",
    "describe",
    "diffusers_unet_name",
    "is_ldm_checkpoint",
    "ldm_unet_name",
    "map_checkpoint",
]
