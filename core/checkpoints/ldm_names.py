"""Single-file Stable Diffusion checkpoints (LDM / SGM naming) named in the diffusers naming.

A single-file SD 1.x, SD 2.x or SDXL checkpoint keeps each pipeline component under a prefix;
this table says which diffusers component each prefix is and how its names translate:

======================================  ==================  ====================================
checkpoint prefix                       component           names
======================================  ==================  ====================================
``model.diffusion_model.``              ``unet``            LDM/SGM blocks (:mod:`.unet_blocks`)
``first_stage_model.``                  ``vae``             LDM VAE (table below)
``cond_stage_model.transformer.``       ``text_encoder``    transformers CLIP (SD 1.x), as is
``cond_stage_model.model.``             ``text_encoder``    OpenCLIP (SD 2.x)
``conditioner.embedders.0.transformer.``  ``text_encoder``  transformers CLIP-L (SDXL), as is
``conditioner.embedders.1.model.``      ``text_encoder_2``  OpenCLIP-G (SDXL)
``conditioner.embedders.0.model.``      ``text_encoder_2``  OpenCLIP-G (SDXL refiner)
======================================  ==================  ====================================

OpenCLIP names: ``transformer.resblocks.N`` -> ``text_model.encoder.layers.N``, ``ln_1`` /
``ln_2`` -> ``layer_norm1`` / ``layer_norm2``, ``mlp.c_fc`` / ``mlp.c_proj`` -> ``mlp.fc1`` /
``mlp.fc2``, ``attn.out_proj`` -> ``self_attn.out_proj``; the fused ``attn.in_proj_weight``
(3d x d: q, k, v as row blocks) is three modules ``self_attn.{q,k,v}_proj``, each a row slice;
``token_embedding`` / ``positional_embedding`` / ``ln_final`` ->
``text_model.embeddings.token_embedding`` / ``position_embedding`` / ``final_layer_norm``;
``text_projection`` (d x p, applied as x @ P) -> ``text_projection`` (p x d, its transpose).
These are the rules of diffusers' ``convert_open_clip_checkpoint``; SD 2.x's unused last layer
is kept (one more module, not an error).

VAE names: ``{encoder,decoder}.{down,up}.i.block.j`` -> ``...{down,up}_blocks.i'.resnets.j``
(decoder up blocks in reverse order, i' = n - 1 - i), ``downsample.conv`` /
``upsample.conv`` -> ``downsamplers.0.conv`` / ``upsamplers.0.conv``, ``nin_shortcut`` ->
``conv_shortcut``, ``mid.block_1`` / ``block_2`` -> ``mid_block.resnets.0`` / ``1``,
``mid.attn_1.{norm,q,k,v,proj_out}`` -> ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,
to_out.0}`` (1x1 convolutions there, linear in diffusers: the same (m, n) matrix),
``norm_out`` -> ``conv_norm_out``.

:func:`map_checkpoint` applies the table to a file's keys; :func:`checkpoint_key` is the inverse
for one parameter (used to write a diffusers state dict in single-file naming).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from core.checkpoints.unet_blocks import UnetBlocks, diffusers_unet_name, ldm_unet_name

__all__ = [
    "COMPONENT_PREFIXES",
    "CheckpointMap",
    "KeyView",
    "checkpoint_key",
    "is_ldm_checkpoint",
    "map_checkpoint",
]


@dataclass(frozen=True)
class _Prefix:
    prefix: str
    component: str
    family: str  # "unet", "vae", "clip" (transformers names) or "openclip"


COMPONENT_PREFIXES: tuple[_Prefix, ...] = (
    _Prefix("model.diffusion_model.", "unet", "unet"),
    _Prefix("first_stage_model.", "vae", "vae"),
    _Prefix("cond_stage_model.transformer.", "text_encoder", "clip"),
    _Prefix("cond_stage_model.model.", "text_encoder", "openclip"),
    _Prefix("conditioner.embedders.0.transformer.", "text_encoder", "clip"),
    _Prefix("conditioner.embedders.1.model.", "text_encoder_2", "openclip"),
    _Prefix("conditioner.embedders.0.model.", "text_encoder_2", "openclip"),
)
"""Checkpoint key prefixes, the diffusers component each holds and its naming family."""

_OPENCLIP_LAYER: tuple[tuple[str, str], ...] = (
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
    ("attn.out_proj", "self_attn.out_proj"),
)
_OPENCLIP_TOP: dict[str, str] = {  # parameter key -> diffusers parameter key
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
}
_QKV = ("q_proj", "k_proj", "v_proj")
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_VAE_FIXED: dict[str, str] = {
    "encoder.norm_out": "encoder.conv_norm_out",
    "decoder.norm_out": "decoder.conv_norm_out",
}
_VAE_ATTENTION: tuple[tuple[str, str], ...] = (
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
)
_VAE_BLOCK = re.compile(
    r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)$"
)
_VAE_MID = re.compile(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)$")


@dataclass(frozen=True)
class KeyView:
    """How one diffusers-named parameter is read from a checkpoint tensor.

    Attributes:
        key: the tensor's key in the checkpoint.
        rows: [begin, end) row slice of the stored tensor (a fused OpenCLIP q/k/v), or None.
        transpose: the parameter is the stored 2-D tensor transposed (OpenCLIP text_projection).
    """

    key: str
    rows: tuple[int, int] | None = None
    transpose: bool = False


@dataclass(frozen=True)
class CheckpointMap:
    """A checkpoint's keys named in the diffusers naming.

    Attributes:
        params: diffusers parameter key (``unet.down_blocks.0...to_q.weight``) -> its view.
        unmapped: checkpoint keys the table has no name for, with the reason.
        components: the diffusers components found, in table order.
        families: component -> naming family (``unet``, ``vae``, ``clip``, ``openclip``).
        unet_blocks: the UNet's block layout, when it has input blocks.
    """

    params: Mapping[str, KeyView]
    unmapped: Mapping[str, str]
    components: tuple[str, ...]
    families: Mapping[str, str] = field(default_factory=dict)
    unet_blocks: UnetBlocks | None = None


def is_ldm_checkpoint(keys: Iterable[str]) -> bool:
    """True when some key carries a single-file component prefix (``model.diffusion_model.``,
    ``cond_stage_model.``, ``conditioner.embedders.N.``, ``first_stage_model.``)."""
    prefixes = tuple(p.prefix for p in COMPONENT_PREFIXES)
    return any(key.startswith(prefixes) for key in keys)


def _split_param(key: str) -> tuple[str, str]:
    """(module path, parameter) of a key: ``a.b.weight`` -> (``a.b``, ``weight``)."""
    module, _, param = key.rpartition(".")
    return module, param


def _rename_head(name: str, pairs: Sequence[tuple[str, str]]) -> str | None:
    for old, new in pairs:
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


def _openclip(rest: str, shape: Sequence[int]) -> dict[str, KeyView] | str:
    """Diffusers parameters of one OpenCLIP key (relative to its prefix), or the reason why not."""
    if rest in _OPENCLIP_TOP:
        return {_OPENCLIP_TOP[rest]: KeyView(rest, transpose=rest == "text_projection")}
    match = _RESBLOCK.match(rest)
    if match is None:
        return "not an OpenCLIP text-encoder weight"
    layer, tail = match.groups()
    head = f"text_model.encoder.layers.{layer}"
    if tail in ("attn.in_proj_weight", "attn.in_proj_bias"):
        if not shape or shape[0] % 3:
            return f"fused q/k/v of {shape[0] if shape else 0} rows is not three equal blocks"
        d, param = shape[0] // 3, "weight" if tail.endswith("weight") else "bias"
        return {
            f"{head}.self_attn.{proj}.{param}": KeyView(rest, rows=(i * d, (i + 1) * d))
            for i, proj in enumerate(_QKV)
        }
    module, param = _split_param(tail)
    renamed = _rename_head(module, _OPENCLIP_LAYER)
    if renamed is None:
        return "not an OpenCLIP text-encoder weight"
    return {f"{head}.{renamed}.{param}": KeyView(rest)}


def _clip(rest: str) -> str:
    """SD 1.x checkpoints before transformers 4.x lack the ``text_model.`` level."""
    return rest if rest.startswith("text_model.") else f"text_model.{rest}"


def _vae_name(module: str, n_up: int) -> str | None:
    if module in _VAE_FIXED:
        return _VAE_FIXED[module]
    if module.split(".")[-1] in ("conv_in", "conv_out") or module in (
        "quant_conv",
        "post_quant_conv",
    ):
        return module
    match = _VAE_BLOCK.match(module)
    if match is not None:
        part, direction, index, inner, resnet, rest = match.groups()
        block = int(index) if direction == "down" else n_up - 1 - int(index)
        base = f"{part}.{direction}_blocks.{block}"
        if inner in ("downsample", "upsample"):
            return f"{base}.{inner}rs.0.{rest}"
        rest = (
            "conv_shortcut" + rest[len("nin_shortcut") :]
            if rest.startswith("nin_shortcut")
            else rest
        )
        return f"{base}.resnets.{resnet}.{rest}"
    match = _VAE_MID.match(module)
    if match is None:
        return None
    part, inner, rest = match.groups()
    if inner == "attn_1":
        renamed = _rename_head(rest, _VAE_ATTENTION)
        return None if renamed is None else f"{part}.mid_block.attentions.0.{renamed}"
    rest = (
        "conv_shortcut" + rest[len("nin_shortcut") :] if rest.startswith("nin_shortcut") else rest
    )
    return f"{part}.mid_block.resnets.{int(inner[-1]) - 1}.{rest}"


def _prefix_of(key: str) -> _Prefix | None:
    return next((p for p in COMPONENT_PREFIXES if key.startswith(p.prefix)), None)


def map_checkpoint(shapes: Mapping[str, Sequence[int]]) -> CheckpointMap:
    """Name every tensor of a single-file checkpoint in the diffusers naming.

    Args:
        shapes: checkpoint key -> stored shape, every tensor of the file(s).

    Returns:
        The map: diffusers parameter keys (component-prefixed, ``unet.``, ``text_encoder_2.``,
        ...) with their views; keys outside the table (EMA copies, buffers, unknown prefixes)
        in ``unmapped`` with the reason.
    """
    unet_names = [
        _split_param(k[len("model.diffusion_model.") :])[0]
        for k in shapes
        if k.startswith("model.diffusion_model.")
    ]
    blocks = UnetBlocks.from_ldm_names(unet_names)
    n_up = 1 + max(
        (
            int(m.group(3))
            for k in shapes
            if (m := _VAE_BLOCK.match(k.removeprefix("first_stage_model."))) and m.group(2) == "up"
        ),
        default=-1,
    )
    params: dict[str, KeyView] = {}
    unmapped: dict[str, str] = {}
    components: dict[str, str] = {}
    for key, shape in shapes.items():
        prefix = _prefix_of(key)
        if prefix is None:
            unmapped[key] = "outside every single-file component prefix"
            continue
        rest = key[len(prefix.prefix) :]
        found = _map_one(prefix, rest, shape, blocks, n_up)
        if isinstance(found, str):
            unmapped[key] = found
            continue
        components.setdefault(prefix.component, prefix.family)
        for param, view in found.items():
            params[f"{prefix.component}.{param}"] = KeyView(
                prefix.prefix + view.key, view.rows, view.transpose
            )
    order = [p.component for p in COMPONENT_PREFIXES]
    return CheckpointMap(
        params=params,
        unmapped=unmapped,
        components=tuple(sorted(components, key=order.index)),
        families=components,
        unet_blocks=blocks,
    )


def _map_one(
    prefix: _Prefix, rest: str, shape: Sequence[int], blocks: UnetBlocks | None, n_up: int
) -> dict[str, KeyView] | str:
    if prefix.family == "openclip":
        return _openclip(rest, shape)
    if prefix.family == "clip":
        return {_clip(rest): KeyView(rest)}
    module, param = _split_param(rest)
    if prefix.family == "unet":
        name = diffusers_unet_name(module, blocks) if blocks is not None else None
        if name is None and blocks is None and module in ("time_embed.0", "time_embed.2"):
            name = diffusers_unet_name(module, UnetBlocks(1))
    else:
        name = _vae_name(module, n_up)
    if name is None:
        return f"no diffusers name for this {prefix.family.upper()} module"
    return {f"{name}.{param}": KeyView(rest)}


def checkpoint_key(
    param: str,
    *,
    family: str,
    blocks: UnetBlocks | None = None,
    n_up: int = 0,
) -> str | None:
    """The checkpoint key (relative to its component prefix) of one diffusers parameter key
    (relative to its component), the inverse of :func:`map_checkpoint`; None for a parameter
    the single-file naming does not hold. OpenCLIP q/k/v parameters return the fused key
    (``transformer.resblocks.N.attn.in_proj_weight``): the caller stacks q, k, v in that order.

    Args:
        param: e.g. ``down_blocks.1.attentions.0.proj_in.weight`` (no ``unet.``).
        family: ``unet``, ``vae``, ``clip`` or ``openclip``.
        blocks: the UNet's blocks (``unet`` only).
        n_up: the VAE decoder's number of up blocks (``vae`` only).
    """
    if family == "clip":
        return param
    if family == "openclip":
        back = {v: k for k, v in _OPENCLIP_TOP.items()}
        if param in back:
            return back[param]
        match = re.match(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$", param)
        if match is None:
            return None
        layer, tail = match.groups()
        module, name = _split_param(tail)
        if module in (f"self_attn.{p}" for p in _QKV):
            return f"transformer.resblocks.{layer}.attn.in_proj_{name}"
        renamed = _rename_head(module, [(new, old) for old, new in _OPENCLIP_LAYER])
        return None if renamed is None else f"transformer.resblocks.{layer}.{renamed}.{name}"
    module, name = _split_param(param)
    if family == "unet":
        if blocks is None:
            return None
        found = ldm_unet_name(module, blocks)
        return None if found is None else f"{found}.{name}"
    return _vae_key(module, name, n_up)


def _vae_key(module: str, name: str, n_up: int) -> str | None:
    back = {v: k for k, v in _VAE_FIXED.items()}
    if module in back:
        return f"{back[module]}.{name}"
    if module.split(".")[-1] in ("conv_in", "conv_out") or module in (
        "quant_conv",
        "post_quant_conv",
    ):
        return f"{module}.{name}"
    match = re.match(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(.+)$", module)
    if match is not None:
        part, direction, index, rest = match.groups()
        block = int(index) if direction == "down" else n_up - 1 - int(index)
        base = f"{part}.{direction}.{block}"
        sampler = re.match(r"^(down|up)samplers\.0\.(.+)$", rest)
        if sampler is not None:
            return f"{base}.{sampler.group(1)}sample.{sampler.group(2)}.{name}"
        resnet = re.match(r"^resnets\.(\d+)\.(.+)$", rest)
        if resnet is None:
            return None
        tail = resnet.group(2).replace("conv_shortcut", "nin_shortcut")
        return f"{base}.block.{resnet.group(1)}.{tail}.{name}"
    match = re.match(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", module)
    if match is None:
        return None
    part, inner, index, rest = match.groups()
    if inner == "attentions":
        renamed = _rename_head(rest, [(new, old) for old, new in _VAE_ATTENTION])
        return None if renamed is None else f"{part}.mid.attn_1.{renamed}.{name}"
    tail = rest.replace("conv_shortcut", "nin_shortcut")
    return f"{part}.mid.block_{int(index) + 1}.{tail}.{name}"
