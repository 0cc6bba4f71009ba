"""The block arithmetic between a UNet's LDM/SGM module names and its diffusers module names.

Stable Diffusion's original code (LDM for SD 1.x/2.x, SGM for SDXL; kohya's SDXL UNet uses the
same names) numbers a UNet's blocks flat, diffusers nests them. With L = ``layers_per_block``
(the resnets of a down block; an up block has L + 1):

===================================  ================================================
LDM / SGM                            diffusers
===================================  ================================================
``input_blocks.0.0``                 ``conv_in``
``input_blocks.i.0`` (resnet)        ``down_blocks.b.resnets.j``, b = (i-1)//(L+1), j = (i-1)%(L+1)
``input_blocks.i.1`` (transformer)   ``down_blocks.b.attentions.j``
``input_blocks.i.0.op``              ``down_blocks.b.downsamplers.0.conv`` (j = L)
``middle_block.0`` / ``.1`` / ``.2`` ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``
``output_blocks.i.0`` (resnet)       ``up_blocks.b.resnets.j``, b = i//(L+1), j = i%(L+1)
``output_blocks.i.1`` (transformer)  ``up_blocks.b.attentions.j``
``output_blocks.i.{1,2}.conv``       ``up_blocks.b.upsamplers.0.conv`` (index 2 when the block has
                                     attentions, else 1; j = L)
``time_embed.0`` / ``.2``            ``time_embedding.linear_1`` / ``linear_2``
``label_emb.0.0`` / ``.0.2``         ``add_embedding.linear_1`` / ``linear_2`` (SDXL)
``out.0`` / ``out.2``                ``conv_norm_out`` / ``conv_out``
===================================  ================================================

Inside a resnet: ``in_layers.0`` -> ``norm1``, ``in_layers.2`` -> ``conv1``, ``out_layers.0`` ->
``norm2``, ``out_layers.3`` -> ``conv2``, ``emb_layers.1`` -> ``time_emb_proj``,
``skip_connection`` -> ``conv_shortcut``. Inside a transformer the names agree
(``proj_in``, ``transformer_blocks.N.attn1.to_q``, ``ff.net.0.proj``, ...).

This is the arithmetic of diffusers' ``convert_ldm_unet_checkpoint`` (single-file loading) and
``_maybe_map_sgm_blocks_to_diffusers`` (kohya SDXL LoRAs), checked in the tests against
diffusers' own converter. Names here are relative to the UNet (no ``model.diffusion_model.`` or
``unet.`` prefix).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["UnetBlocks", "diffusers_unet_name", "ldm_unet_name"]

_FIXED: dict[str, str] = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_FIXED_BACK = {v: k for k, v in _FIXED.items()}
_RESNET: tuple[tuple[str, str], ...] = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
)
_LDM = re.compile(r"^(input_blocks|output_blocks)\.(\d+)(?:\.(\d+))?(?:\.(.+))?$")
_LDM_MID = re.compile(r"^middle_block\.(\d+)(?:\.(.+))?$")
_DIFFUSERS = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)"
    r"(?:\.(.+))?$"
)
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?$")


def _rename(rest: str | None, pairs: Iterable[tuple[str, str]]) -> str | None:
    """``rest`` with its leading segment(s) renamed by the first pair that matches; None if none."""
    if rest is None:
        return None
    for old, new in pairs:
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return None


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


@dataclass(frozen=True)
class UnetBlocks:
    """What the block arithmetic needs to know about one UNet.

    Attributes:
        layers_per_block: L, the resnets per down block (SDXL: 2).
        up_attention: per up block, whether it has attentions (it decides whether an upsampler
            sits at index 1 or 2 of its last LDM output block).
    """

    layers_per_block: int
    up_attention: tuple[bool, ...] = ()

    @classmethod
    def from_ldm_names(cls, names: Iterable[str]) -> UnetBlocks | None:
        """The blocks of a UNet from its LDM/SGM module names (relative to the UNet); None when
        the names hold no input blocks."""
        inputs: set[int] = set()
        ops: list[int] = []
        outputs: dict[int, set[str]] = {}
        for name in names:
            match = _LDM.match(name)
            if match is None:
                continue
            kind, index, inner, rest = match.groups()
            i = int(index)
            if kind == "input_blocks" and i > 0:
                inputs.add(i)
                if inner == "0" and rest is not None and rest.split(".")[0] == "op":
                    ops.append(i)
            elif kind == "output_blocks":
                outputs.setdefault(i, set()).add(f"{inner}.{(rest or '').split('.')[0]}")
        if not inputs:
            return None
        per = (min(ops) - 1) if ops else max(inputs)
        step = per + 1
        n_up = (max(outputs) + 1 + per) // step if outputs else 0
        up_attention = tuple(
            any(
                inner_head.startswith("1.") and inner_head != "1.conv"
                for i in range(b * step, (b + 1) * step)
                for inner_head in outputs.get(i, ())
            )
            for b in range(n_up)
        )
        return cls(per, up_attention)

    @classmethod
    def from_diffusers_names(cls, names: Iterable[str]) -> UnetBlocks | None:
        """The blocks of a UNet from its diffusers module names (relative to the UNet); None when
        the names hold no down block resnets."""
        resnets: set[int] = set()
        up_blocks: dict[int, bool] = {}
        for name in names:
            match = _DIFFUSERS.match(name)
            if match is None:
                continue
            kind, block, inner, index, _ = match.groups()
            if kind == "down_blocks" and block == "0" and inner == "resnets":
                resnets.add(int(index))
            if kind == "up_blocks":
                b = int(block)
                up_blocks[b] = up_blocks.get(b, False) or inner == "attentions"
        if not resnets:
            return None
        n_up = max(up_blocks) + 1 if up_blocks else 0
        return cls(max(resnets) + 1, tuple(up_blocks.get(b, False) for b in range(n_up)))

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form (:meth:`from_dict` reads it back)."""
        return {"layers_per_block": self.layers_per_block, "up_attention": list(self.up_attention)}

    @classmethod
    def from_dict(cls, value: object) -> UnetBlocks | None:
        """The blocks from :meth:`as_dict`'s form; None for anything else."""
        if not isinstance(value, dict):
            return None
        per, up = value.get("layers_per_block"), value.get("up_attention", [])
        if not isinstance(per, int) or not isinstance(up, list):
            return None
        return cls(per, tuple(bool(u) for u in up))


def diffusers_unet_name(name: str, blocks: UnetBlocks) -> str | None:
    """The diffusers name of an LDM/SGM UNet module name, or None when it has no counterpart.

    Examples (L = 2): ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` ->
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``; ``output_blocks.2.2.conv`` ->
    ``up_blocks.0.upsamplers.0.conv``; ``input_blocks.1.0.in_layers.2`` ->
    ``down_blocks.0.resnets.0.conv1``.
    """
    for old, new in _FIXED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    mid = _LDM_MID.match(name)
    if mid is not None:
        k, rest = int(mid.group(1)), mid.group(2)
        if k % 2 == 0:
            renamed = _rename(rest, _RESNET)
            return None if renamed is None else _join(f"mid_block.resnets.{k // 2}", renamed)
        return _join(f"mid_block.attentions.{k // 2}", rest)
    match = _LDM.match(name)
    if match is None or match.group(3) is None:
        return None
    kind, index, inner, rest = match.groups()
    i, k, step = int(index), int(inner), blocks.layers_per_block + 1
    if kind == "input_blocks":
        b, j = (i - 1) // step, (i - 1) % step
        if k == 0 and rest is not None and (rest == "op" or rest.startswith("op.")):
            return f"down_blocks.{b}.downsamplers.0.conv" + rest[2:]
        prefix = f"down_blocks.{b}"
    else:
        b, j = i // step, i % step
        if k in (1, 2) and rest is not None and (rest == "conv" or rest.startswith("conv.")):
            return f"up_blocks.{b}.upsamplers.0.conv" + rest[4:]
        prefix = f"up_blocks.{b}"
    if k == 0:
        renamed = _rename(rest, _RESNET)
        return None if renamed is None else _join(f"{prefix}.resnets.{j}", renamed)
    if k == 1:
        return _join(f"{prefix}.attentions.{j}", rest)
    return None


def ldm_unet_name(name: str, blocks: UnetBlocks) -> str | None:
    """The LDM/SGM name of a diffusers UNet module name (the inverse of
    :func:`diffusers_unet_name`), or None when it has no counterpart."""
    for old, new in _FIXED_BACK.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    back = tuple((new, old) for old, new in _RESNET)
    mid = _MID.match(name)
    if mid is not None:
        inner, index, rest = mid.groups()
        if inner == "attentions":
            return _join(f"middle_block.{2 * int(index) + 1}", rest)
        renamed = _rename(rest, back)
        return None if renamed is None else _join(f"middle_block.{2 * int(index)}", renamed)
    match = _DIFFUSERS.match(name)
    if match is None:
        return None
    kind, block, inner, index, rest = match.groups()
    b, j, step = int(block), int(index), blocks.layers_per_block + 1
    per = blocks.layers_per_block
    if kind == "down_blocks":
        if inner == "downsamplers":
            tail = _rename(rest, (("conv", "op"),))
            return None if tail is None else f"input_blocks.{(b + 1) * step}.0.{tail}"
        i = 1 + b * step + j
        head = "input_blocks"
    else:
        if inner == "upsamplers":
            attention = b < len(blocks.up_attention) and blocks.up_attention[b]
            return _join(f"output_blocks.{b * step + per}.{2 if attention else 1}", rest)
        i = b * step + j
        head = "output_blocks"
    if inner == "resnets":
        renamed = _rename(rest, back)
        return None if renamed is None else _join(f"{head}.{i}.0", renamed)
    if inner == "attentions":
        return _join(f"{head}.{i}.1", rest)
    return None
