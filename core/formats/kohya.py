"""The kohya (sd-scripts) layout: one safetensors file with ``lora_unet_*`` / ``lora_te*_`` keys.

Each module is a key stem (the module path with '.' replaced by '_', after a component prefix)
with ``.lora_down.weight`` (r x in, or r x in x kh x kw: LoCon on a k x k convolution),
``.lora_up.weight`` (out x r, or out x r x 1 x 1) and an optional scalar ``.alpha``:
dW = (alpha / r) * up @ down, alpha = r when absent. Module paths are diffusers paths in SD 1.x /
2.x files (``lora_unet_down_blocks_0_attentions_0_proj_in``) and SGM block paths in SDXL files
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``lora_te1_text_model_...``,
``lora_te2_text_model_...``). Underscored names cannot be turned back into dotted ones on their
own: read without a base, a module's name is its key stem; :func:`core.formats.resolve_modules`
maps it onto the base's names (recording ``{"unet_naming": "sgm", "unet_blocks": ...}`` in the
adapter's config for an SGM-named file, so that writing derives SGM stems again).

Also read: ``.dora_scale`` (DoRA, LyCORIS: (out, 1, ...) per output row with ``wd_on_out``, else
(1, in, ...) per input channel) into :attr:`LoraModule.magnitude`; LyCORIS LoHa / LoKr / Tucker
LoCon / full-diff modules, converted to LoRA modules by :mod:`core.formats.lycoris` and recorded
in :attr:`LoraAdapter.conversions`.

Writing stores every module's scale as ``alpha = scale * r``, keeps the original key stems (see
:mod:`core.formats.naming`), writes every tensor in the adapter's input dtype (alpha in float32
when that dtype cannot hold it exactly) and keeps the ``ss_*`` metadata, updated where it
describes what changed: ``ss_network_dim`` / ``ss_network_alpha`` from the modules written
(``Dynamic`` when they differ, as kohya's resize script writes), and after a LyCORIS conversion
``ss_network_module = networks.lora`` without the ``algo`` network argument. kohya's
``sshs_*`` hashes of the old tensors are dropped (stale).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from core.adapter import AdapterLayout, LoraAdapter, LoraModule, ModuleConversion
from core.errors import UnknownLayoutError, UnpairedTensorError
from core.formats.lycoris import (
    LYCORIS_PARTS,
    LycorisOptions,
    expand_lycoris,
    locon_with_mid,
    lora_of_update,
    split_lycoris,
)
from core.formats.naming import kohya_stems, require_unique, sgm_blocks_of
from core.formats.pairing import (
    KeyPair,
    PairStyle,
    kind_from_metadata,
    magnitude_tensor,
    metadata_for_write,
    module_from_tensors,
    split_pairs,
    storage_dtype,
    tensors_of_module,
)
from core.formats.tensorfile import TensorFile, write_safetensors_atomic

__all__ = ["KOHYA_STYLE", "looks_like_kohya", "read_kohya", "write_kohya"]

KOHYA_STYLE = PairStyle(down=".lora_down.weight", up=".lora_up.weight")
_ALPHA = ".alpha"
_DORA = ".dora_scale"
_SUFFIXES = (KOHYA_STYLE.down, *LYCORIS_PARTS)


def looks_like_kohya(keys: list[str]) -> bool:
    """True when the keys are kohya's: ``lora_unet_`` / ``lora_te*`` stems with LoRA or LyCORIS
    tensors."""
    return any(k.startswith(("lora_unet_", "lora_te")) and k.endswith(_SUFFIXES) for k in keys)


def _extras(
    rest: list[str], stems: set[str], tensors: Mapping[str, torch.Tensor], path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(alphas, dora scales) by stem, from the keys that are neither LoRA nor LyCORIS tensors."""
    found: dict[str, dict[str, torch.Tensor]] = {_ALPHA: {}, _DORA: {}}
    for key in rest:
        suffix = next((s for s in found if key.endswith(s)), None)
        if suffix is None:
            raise UnknownLayoutError("not a kohya LoRA or LyCORIS tensor", path=path, key=key)
        stem = key[: -len(suffix)]
        if stem not in stems:
            raise UnpairedTensorError(
                f"{suffix[1:]} of a module with no LoRA tensors", path=path, key=key
            )
        found[suffix][stem] = tensors[key]
    for stem, alpha in found[_ALPHA].items():
        if alpha.numel() != 1:
            raise UnknownLayoutError(
                f"alpha must be a scalar, got shape {tuple(alpha.shape)}",
                path=path,
                key=stem + _ALPHA,
            )
    return found[_ALPHA], found[_DORA]


def _pair_module(
    pair: KeyPair,
    tensors: Mapping[str, torch.Tensor],
    alpha: torch.Tensor | None,
    dora: torch.Tensor | None,
    mid: Mapping[str, str] | None,
    path: Path,
) -> tuple[LoraModule, ModuleConversion | None]:
    down, up = tensors[pair.down_key], tensors[pair.up_key]
    r = int(down.shape[0])
    scale = 1.0 if alpha is None else float(alpha.float().reshape(())) / r
    record = None
    if mid is not None:
        if set(mid) != {".lora_mid.weight"}:
            raise UnknownLayoutError(
                "LoRA tensors and LyCORIS tensors on one module", path=path, key=pair.down_key
            )
        parts = {".lora_mid.weight": tensors[mid[".lora_mid.weight"]].float()}
        up2, down4 = locon_with_mid(parts, down.float(), up.float())
        up, down = up2.reshape(*up2.shape, *([1] * (down4.ndim - 2))), down4
        record = ModuleConversion(pair.stem, "locon-tucker", r, 1.0)
    module = module_from_tensors(
        pair.stem,
        down,
        up,
        scale=scale,
        path=path,
        key=pair.down_key,
        source_key=pair.stem,
        magnitude=None if dora is None else (dora, "kohya"),
    )
    return module, record


def _converted_module(
    stem: str,
    keys: Mapping[str, str],
    tensors: Mapping[str, torch.Tensor],
    alpha: torch.Tensor | None,
    dora: torch.Tensor | None,
    options: LycorisOptions,
    path: Path,
) -> tuple[LoraModule, ModuleConversion]:
    parts = {part: tensors[key] for part, key in keys.items()}
    alpha_value = None if alpha is None else float(alpha.float().reshape(()))
    kind, update, scale = expand_lycoris(stem, parts, alpha=alpha_value, path=path)
    up, down, record = lora_of_update(scale * update, options, key=stem, kind=kind)
    if update.ndim > 2:  # restore the convolution's shapes for module_from_tensors
        down = down.reshape(down.shape[0], *update.shape[1:])
        up = up.reshape(*up.shape, *([1] * (update.ndim - 2)))
    module = module_from_tensors(
        stem,
        down,
        up,
        scale=1.0,
        path=path,
        key=next(iter(keys.values())),
        source_key=stem,
        magnitude=None if dora is None else (dora, "kohya"),
    )
    return module, record


def read_kohya(tensor_file: TensorFile, *, lycoris: LycorisOptions | None = None) -> LoraAdapter:
    """Turn the tensors of a kohya file into an adapter.

    Args:
        tensor_file: the file's tensors and metadata (already checked for NaN/Inf).
        lycoris: how LyCORIS modules become LoRA modules (default :class:`LycorisOptions`).

    Returns:
        A :class:`LoraAdapter` (layout KOHYA) whose module names are the key stems; metadata kept;
        ``dtype`` the LoRA tensors' dtype; ``conversions`` one record per converted module.

    Raises:
        UnknownLayoutError: tensors that are neither LoRA nor expandable LyCORIS tensors (OFT,
            GLoRA, IA3, ...), named by key.
        UnpairedTensorError, ShapeMismatchError: a missing half, factor or alpha's module; ranks
            or factor shapes that do not fit.
    """
    path, tensors = tensor_file.path, tensor_file.tensors
    pairs, rest = split_pairs(tensors, [KOHYA_STYLE], path=path)
    lyco, rest = split_lycoris(rest, path=path)
    by_stem = {p.stem: p for p in pairs}
    alphas, doras = _extras(rest, set(by_stem) | set(lyco), tensors, path)
    if not pairs and not lyco:
        raise UnknownLayoutError("kohya file without LoRA tensors", path=path)
    modules: dict[str, LoraModule] = {}
    conversions: list[ModuleConversion] = []
    for stem in dict.fromkeys(k.partition(".")[0] for k in tensors):
        if stem in by_stem:
            module, record = _pair_module(
                by_stem[stem], tensors, alphas.get(stem), doras.get(stem), lyco.get(stem), path
            )
        elif stem in lyco:
            module, record = _converted_module(
                stem, lyco[stem], tensors, alphas.get(stem), doras.get(stem),
                lycoris or LycorisOptions(), path,
            )  # fmt: skip
        else:
            continue
        modules[stem] = module
        if record is not None:
            conversions.append(record)
    stored = [tensors[k] for p in pairs for k in (p.down_key, p.up_key)]
    stored += [tensors[k] for parts in lyco.values() for k in parts.values()]
    return LoraAdapter(
        modules=modules,
        kind=kind_from_metadata(tensor_file.metadata),
        layout=AdapterLayout.KOHYA,
        metadata=dict(tensor_file.metadata),
        source=str(path),
        dtype=storage_dtype(stored),
        conversions=tuple(conversions),
    )


def _alpha_tensor(value: float, dtype: torch.dtype | None) -> torch.Tensor:
    """alpha in ``dtype`` when that dtype holds it exactly, else float32."""
    exact = torch.tensor(value, dtype=torch.float32)
    if dtype is not None and dtype.is_floating_point:
        cast = exact.to(dtype)
        if float(cast) == float(exact):
            return cast
    return exact


def _updated_metadata(
    metadata: dict[str, str], modules: list[LoraModule], converted: bool
) -> dict[str, str]:
    ranks = Counter(m.rank for m in modules)
    alphas = Counter(round(m.scale * m.rank, 6) for m in modules)
    if "ss_network_dim" in metadata:
        metadata["ss_network_dim"] = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
    if "ss_network_alpha" in metadata:
        metadata["ss_network_alpha"] = str(next(iter(alphas))) if len(alphas) == 1 else "Dynamic"
    if converted:
        metadata["ss_network_module"] = "networks.lora"
        try:
            args = json.loads(metadata.get("ss_network_args") or "{}")
        except json.JSONDecodeError:
            args = None
        if isinstance(args, dict) and "algo" in args:
            args.pop("algo")
            metadata["ss_network_args"] = json.dumps(args)
    for key in [k for k in metadata if k.startswith("sshs_")]:
        del metadata[key]
    return metadata


def write_kohya(adapter: LoraAdapter, path: str | Path) -> list[Path]:
    """Write an adapter as a kohya safetensors file.

    Args:
        adapter: the adapter; names are base module names (``unet.`` / ``text_encoder.`` prefixed
            for a pipeline) or kohya stems.
        path: the output file.

    Returns:
        [path].

    Raises:
        ValueError: two modules that would share one kohya key; a UNet module without an SGM
            name in an SGM-named adapter.
    """
    modules = list(adapter.modules.values())
    same_layout = adapter.layout is AdapterLayout.KOHYA
    blocks = sgm_blocks_of(adapter.config) if same_layout else None
    stems = kohya_stems(modules, use_source_keys=same_layout, sgm_blocks=blocks)
    require_unique(stems)
    tensors: dict[str, torch.Tensor] = {}
    for stem, module in zip(stems, modules, strict=True):
        down, up = tensors_of_module(module, dtype=adapter.dtype)
        tensors[stem + KOHYA_STYLE.down] = down
        tensors[stem + KOHYA_STYLE.up] = up
        tensors[stem + _ALPHA] = _alpha_tensor(module.scale * module.rank, adapter.dtype)
        if module.is_dora:
            tensors[stem + _DORA] = magnitude_tensor(module, style="kohya", dtype=adapter.dtype)
    metadata = metadata_for_write(adapter, keep=same_layout)
    if same_layout:
        metadata = _updated_metadata(metadata, modules, bool(adapter.conversions))
    return [write_safetensors_atomic(tensors, metadata, path)]
