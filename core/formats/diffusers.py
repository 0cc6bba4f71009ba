"""The diffusers layout: one safetensors file of LoRA pairs keyed by dotted module paths.

Recognised key styles (the module path is often prefixed ``unet.`` / ``text_encoder.``):
``<module>.lora_A.weight`` / ``.lora_B.weight`` (PEFT-style, current diffusers),
``<module>.lora.down.weight`` / ``.lora.up.weight`` (LoRACompatibleLinear) and
``<block>.processor.to_q_lora.down.weight`` (attention processors, read as ``<block>.to_q``;
``to_out_lora`` is ``to_out.0``). The scale comes from the ``lora_adapter_metadata`` JSON that
diffusers stores in the file's metadata (a PEFT LoRA config, per component when its keys are
prefixed ``unet.`` ...), else from ``<module>.alpha`` tensors (alpha / r), else it is 1 (the
diffusers convention alpha = r).

Writing (decision): the scale is always folded into up (diffusers' convention, understood by every
diffusers version), in the key style the adapter was read with (attention-processor files are
written in the ``lora.down`` / ``lora.up`` style, which the same loaders read). A
``lora_adapter_metadata`` config is kept with ``lora_alpha = r`` and ``alpha_pattern`` =
``rank_pattern`` when it still gives every module its rank, and dropped otherwise (diffusers then
infers the ranks from the tensors).

DoRA: ``<module>.lora_magnitude_vector`` (PEFT's shape, (out,)) sits beside ``lora_A`` /
``lora_B``; diffusers' loader then sets ``use_dora`` itself. A DoRA adapter is always written in
the ``lora_A`` / ``lora_B`` style. Tensors are written in the adapter's input dtype.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from core.adapter import AdapterLayout, LoraAdapter, LoraModule
from core.errors import CorruptFileError, ShapeMismatchError, UnknownLayoutError
from core.formats.naming import PEFT_WRAPPER, dotted_stems, require_unique, split_component
from core.formats.pairing import (
    KeyPair,
    PairStyle,
    kind_from_metadata,
    magnitude_tensor,
    metadata_for_write,
    module_from_tensors,
    scaled_up,
    split_pairs,
    storage_dtype,
    tensors_of_module,
)
from core.formats.peft import implied_rank_and_scale
from core.formats.tensorfile import TensorFile, write_safetensors_atomic

__all__ = [
    "DIFFUSERS_STYLES",
    "METADATA_KEY",
    "looks_like_diffusers",
    "read_diffusers",
    "write_diffusers",
]

METADATA_KEY = "lora_adapter_metadata"
LORA_A_B = PairStyle(down=".lora_A.weight", up=".lora_B.weight")
LORA_DOWN_UP = PairStyle(down=".lora.down.weight", up=".lora.up.weight")
PROCESSOR = PairStyle(down="_lora.down.weight", up="_lora.up.weight")
DIFFUSERS_STYLES = (LORA_A_B, LORA_DOWN_UP, PROCESSOR)
_STYLE_NAMES = {"lora_A_B": LORA_A_B, "lora_down_up": LORA_DOWN_UP}
_ALPHA = ".alpha"
_MAGNITUDE = ".lora_magnitude_vector"


def looks_like_diffusers(keys: list[str]) -> bool:
    """True when some key ends like a diffusers LoRA half."""
    return any(k.endswith(style.down) for style in DIFFUSERS_STYLES for k in keys)


def _name_of(pair: KeyPair) -> str:
    if pair.style is PROCESSOR:
        block, _, proj = pair.stem.rpartition(".processor.")
        return f"{block}.{proj}.0" if proj == "to_out" else f"{block}.{proj}"
    return pair.stem.removeprefix(PEFT_WRAPPER)


def _component_configs(
    metadata: Mapping[str, str], path: Path
) -> dict[str | None, dict[str, object]]:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(
            f"unreadable {METADATA_KEY} ({exc})", path=path, key=METADATA_KEY
        ) from exc
    if not isinstance(flat, dict):
        raise CorruptFileError(f"{METADATA_KEY} is not a JSON object", path=path, key=METADATA_KEY)
    configs: dict[str | None, dict[str, object]] = {}
    for key, value in flat.items():
        component, rest = split_component(key)
        configs.setdefault(component, {})[rest] = value
    return configs


def _scale(
    name: str,
    r: int,
    alpha: torch.Tensor | None,
    configs: Mapping[str | None, Mapping[str, object]],
) -> tuple[int | None, float]:
    """(rank the file's config implies, or None without a config; scale) of one module."""
    component, rest = split_component(name)
    if component is not None and component in configs:
        config, relative = configs[component], rest
    else:
        config, relative = configs.get(None, {}), name
    if config:
        return implied_rank_and_scale(config, relative)
    if alpha is not None:
        return None, float(alpha.float().reshape(())) / r
    return None, 1.0


def read_diffusers(tensor_file: TensorFile) -> LoraAdapter:
    """Turn the tensors of a diffusers-style LoRA file into an adapter.

    Args:
        tensor_file: the file's tensors and metadata (already checked for NaN/Inf).

    Returns:
        A :class:`LoraAdapter` (layout DIFFUSERS), names as in the file (``unet.`` prefixes kept),
        ``config = {"key_style": ...}``, metadata kept.

    Raises:
        UnknownLayoutError: tensors that are not LoRA pairs; UnpairedTensorError: a missing half;
        ShapeMismatchError: ranks that differ between halves or from the stored config.
    """
    path, tensors = tensor_file.path, tensor_file.tensors
    pairs, rest = split_pairs(tensors, DIFFUSERS_STYLES, path=path)
    stems = {p.stem for p in pairs}
    is_alpha = {k: k.endswith(_ALPHA) and k[: -len(_ALPHA)] in stems for k in rest}
    alphas = {k[: -len(_ALPHA)]: tensors[k] for k, ok in is_alpha.items() if ok}
    magnitudes = {
        k[: -len(_MAGNITUDE)]: tensors[k]
        for k in rest
        if k.endswith(_MAGNITUDE) and k[: -len(_MAGNITUDE)] in stems
    }
    is_magnitude = {
        k for k in rest if k.endswith(_MAGNITUDE) and k[: -len(_MAGNITUDE)] in magnitudes
    }
    stray = [k for k, ok in is_alpha.items() if not ok and k not in is_magnitude]
    if stray:
        raise UnknownLayoutError("not a diffusers LoRA tensor", path=path, key=stray[0])
    if not pairs:
        raise UnknownLayoutError("diffusers file without LoRA tensors", path=path)
    configs = _component_configs(tensor_file.metadata, path)
    modules: dict[str, LoraModule] = {}
    for pair in pairs:
        name = _name_of(pair)
        r = int(tensors[pair.down_key].shape[0])
        implied_r, scale = _scale(name, r, alphas.get(pair.stem), configs)
        if implied_r is not None and implied_r != r:
            raise ShapeMismatchError(
                f"rank {r} in the file but {implied_r} in its {METADATA_KEY}",
                path=path,
                key=pair.down_key,
            )
        modules[name] = module_from_tensors(
            name,
            tensors[pair.down_key],
            tensors[pair.up_key],
            scale=scale,
            path=path,
            key=pair.down_key,
            source_key=name if pair.style is PROCESSOR else pair.stem,
            magnitude=(magnitudes[pair.stem], "peft") if pair.stem in magnitudes else None,
        )
    styles = [p.style for p in pairs]
    style = LORA_A_B if styles.count(LORA_A_B) * 2 >= len(styles) else LORA_DOWN_UP
    style_name = next(n for n, s in _STYLE_NAMES.items() if s is style)
    return LoraAdapter(
        modules=modules,
        kind=kind_from_metadata(tensor_file.metadata),
        layout=AdapterLayout.DIFFUSERS,
        config={"key_style": style_name},
        metadata=dict(tensor_file.metadata),
        source=str(path),
        dtype=storage_dtype(t for p in pairs for t in (tensors[p.down_key], tensors[p.up_key])),
    )


def _unit_scale_metadata(raw: str, ranks: Mapping[str, int], *, dora: bool) -> str | None:
    """The stored config rewritten for scale 1 (alpha = r), or None when it no longer gives every
    module (name -> rank) its rank."""
    configs = _component_configs({METADATA_KEY: raw}, Path(METADATA_KEY))
    for config in configs.values():
        config["lora_alpha"] = config.get("r", 8)
        patterns = config.get("rank_pattern")
        config["alpha_pattern"] = dict(patterns) if isinstance(patterns, Mapping) else {}
        config["use_rslora"] = False
        config["use_dora"] = dora
    for name, rank in ranks.items():
        implied_r, scale = _scale(name, rank, None, configs)
        if implied_r not in (None, rank) or scale != 1.0:
            return None
    flat = {
        (key if component is None else f"{component}.{key}"): value
        for component, config in configs.items()
        for key, value in config.items()
    }
    return json.dumps(flat, indent=2, sort_keys=True)


def write_diffusers(adapter: LoraAdapter, path: str | Path) -> list[Path]:
    """Write an adapter as a diffusers-style LoRA safetensors file (scale folded into up).

    Args:
        adapter: the adapter; names as the diffusers loader expects them (``unet.`` prefixed for
            a pipeline's ``load_lora_weights``, bare for a model's ``load_lora_adapter``).
        path: the output file.

    Returns:
        [path].

    Raises:
        ValueError: two modules that would share one key; an input-channel DoRA magnitude
            (LyCORIS), which diffusers' PEFT-based loader has no form for.
    """
    modules = list(adapter.modules.values())
    same_layout = adapter.layout is AdapterLayout.DIFFUSERS
    stems = dotted_stems(modules, default_add="", use_source_keys=same_layout)
    require_unique(stems)
    style = (
        _STYLE_NAMES.get(str(adapter.config.get("key_style")), LORA_A_B)
        if same_layout and not adapter.is_dora
        else LORA_A_B
    )
    tensors: dict[str, torch.Tensor] = {}
    for stem, module in zip(stems, modules, strict=True):
        down, up = tensors_of_module(module, scaled_up(module), dtype=adapter.dtype)
        tensors[stem + style.down] = down
        tensors[stem + style.up] = up
        if module.is_dora:
            tensors[stem + _MAGNITUDE] = magnitude_tensor(module, style="peft", dtype=adapter.dtype)
    metadata = metadata_for_write(adapter, keep=same_layout)
    raw = metadata.pop(METADATA_KEY, None)
    if raw is not None:
        ranks = {stem: module.rank for stem, module in zip(stems, modules, strict=True)}
        rewritten = _unit_scale_metadata(raw, ranks, dora=adapter.is_dora)
        if rewritten is not None:
            metadata[METADATA_KEY] = rewritten
    metadata.setdefault("format", "pt")
    return [write_safetensors_atomic(tensors, metadata, path)]
