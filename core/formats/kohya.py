"""The kohya (sd-scripts) layout: one safetensors file with ``lora_unet_*`` / ``lora_te*_`` keys.

Each module is a key stem such as ``lora_unet_down_blocks_0_attentions_0_proj_in`` (the module
path with '.' replaced by '_', after a component prefix) with ``.lora_down.weight`` (r x in, or
r x in x kh x kw), ``.lora_up.weight`` (out x r, or out x r x 1 x 1) and an optional scalar
``.alpha``: dW = (alpha / r) * up @ down, alpha = r when absent. ``ss_*`` metadata (training
settings) is kept on write. Underscored names cannot be turned back into dotted ones on their
own: read without a base, a module's name is its key stem; :func:`core.formats.resolve_modules`
maps it onto the base's dotted names.

Writing stores every module's scale as ``alpha = scale * r`` (float32), so tensors are written as
they are, and keeps the original key stems (see :mod:`core.formats.naming`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.adapter import AdapterLayout, LoraAdapter, LoraModule
from core.errors import UnknownLayoutError, UnpairedTensorError
from core.formats.naming import kohya_stems, require_unique
from core.formats.pairing import (
    PairStyle,
    kind_from_metadata,
    metadata_for_write,
    module_from_tensors,
    split_pairs,
    tensors_of_module,
)
from core.formats.tensorfile import TensorFile, write_safetensors_atomic

__all__ = ["KOHYA_STYLE", "looks_like_kohya", "read_kohya", "write_kohya"]

KOHYA_STYLE = PairStyle(down=".lora_down.weight", up=".lora_up.weight")
_ALPHA = ".alpha"
_UNSUPPORTED_KEYS = {
    ".dora_scale": "DoRA (kohya dora_scale) adapters are not supported",
    ".lora_mid.": "LoCon with a Tucker mid tensor is not supported",
    ".hada_": "LoHa adapters are not supported",
    ".lokr_": "LoKr adapters are not supported",
}


def looks_like_kohya(keys: list[str]) -> bool:
    """True when the keys are kohya's: ``lora_unet_`` / ``lora_te*`` stems with lora_down/up."""
    return any(
        k.startswith(("lora_unet_", "lora_te")) and k.endswith(KOHYA_STYLE.down) for k in keys
    )


def read_kohya(tensor_file: TensorFile) -> LoraAdapter:
    """Turn the tensors of a kohya file into an adapter.

    Args:
        tensor_file: the file's tensors and metadata (already checked for NaN/Inf).

    Returns:
        A :class:`LoraAdapter` (layout KOHYA) whose module names are the key stems; metadata kept.

    Raises:
        UnknownLayoutError: LoHa, LoKr, DoRA or other tensors that are not LoRA pairs.
        UnpairedTensorError, ShapeMismatchError: a missing half or alpha's module; ranks differ.
    """
    path, tensors = tensor_file.path, tensor_file.tensors
    pairs, rest = split_pairs(tensors, [KOHYA_STYLE], path=path)
    stems = {p.stem for p in pairs}
    alphas: dict[str, torch.Tensor] = {}
    for key in rest:
        if key.endswith(_ALPHA):
            if key[: -len(_ALPHA)] not in stems:
                raise UnpairedTensorError(
                    "alpha of a module with no LoRA tensors", path=path, key=key
                )
            alphas[key[: -len(_ALPHA)]] = tensors[key]
            continue
        reason = next((why for part, why in _UNSUPPORTED_KEYS.items() if part in key), None)
        raise UnknownLayoutError(reason or "not a kohya LoRA tensor", path=path, key=key)
    if not pairs:
        raise UnknownLayoutError("kohya file without LoRA tensors", path=path)
    modules: dict[str, LoraModule] = {}
    for pair in pairs:
        r = int(tensors[pair.down_key].shape[0])
        alpha = alphas.get(pair.stem)
        if alpha is not None and alpha.numel() != 1:
            raise UnknownLayoutError(
                f"alpha must be a scalar, got shape {tuple(alpha.shape)}",
                path=path,
                key=pair.stem + _ALPHA,
            )
        scale = 1.0 if alpha is None else float(alpha.float().reshape(())) / r
        modules[pair.stem] = module_from_tensors(
            pair.stem,
            tensors[pair.down_key],
            tensors[pair.up_key],
            scale=scale,
            path=path,
            key=pair.down_key,
            source_key=pair.stem,
        )
    return LoraAdapter(
        modules=modules,
        kind=kind_from_metadata(tensor_file.metadata),
        layout=AdapterLayout.KOHYA,
        metadata=dict(tensor_file.metadata),
        source=str(path),
    )


def write_kohya(adapter: LoraAdapter, path: str | Path) -> list[Path]:
    """Write an adapter as a kohya safetensors file.

    Args:
        adapter: the adapter; names are base module names (``unet.`` / ``text_encoder.`` prefixed
            for a pipeline) or kohya stems.
        path: the output file.

    Returns:
        [path].

    Raises:
        ValueError: two modules that would share one kohya key.
    """
    modules = list(adapter.modules.values())
    same_layout = adapter.layout is AdapterLayout.KOHYA
    stems = kohya_stems(modules, use_source_keys=same_layout)
    require_unique(stems)
    tensors: dict[str, torch.Tensor] = {}
    for stem, module in zip(stems, modules, strict=True):
        down, up = tensors_of_module(module)
        tensors[stem + KOHYA_STYLE.down] = down
        tensors[stem + KOHYA_STYLE.up] = up
        tensors[stem + _ALPHA] = torch.tensor(module.scale * module.rank, dtype=torch.float32)
    metadata = metadata_for_write(adapter, keep=same_layout)
    return [write_safetensors_atomic(tensors, metadata, path)]
