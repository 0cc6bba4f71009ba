"""Pairing the two halves of LoRA modules in a key space, shared by every layout.

Layouts differ in how a module's keys end (``.lora_A.weight`` / ``.lora_B.weight``,
``.lora_down.weight`` / ``.lora_up.weight``, ...) but agree on the rest: a module is a key stem
with one down (A, r x n) and one up (B, m x r) tensor. Convolution LoRAs store 4-D tensors,
down (r, in, kh, kw) and up (out, r, 1, 1); they are viewed as 2-D, down (r, in*kh*kw) and up
(out, r), which is the LoRA of the weight reshaped to (out, in*kh*kw), and the stored shape is
kept in :attr:`LoraModule.weight_shape` so that writers can restore it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from core.adapter import AdapterKind, LoraAdapter, LoraModule, MagnitudeAxis
from core.errors import ShapeMismatchError, UnknownLayoutError, UnpairedTensorError

__all__ = [
    "KIND_KEY",
    "KeyPair",
    "PairStyle",
    "kind_from_metadata",
    "magnitude_from_tensor",
    "magnitude_tensor",
    "metadata_for_write",
    "module_from_tensors",
    "scaled_up",
    "split_pairs",
    "storage_dtype",
    "tensors_of_module",
]

# Metadata key marking an expanded LoRA-X in any layout (loaders ignore unknown metadata).
KIND_KEY = "lorax.kind"


@dataclass(frozen=True)
class PairStyle:
    """How a layout names the two halves of a module: ``stem + down`` and ``stem + up``."""

    down: str
    up: str


@dataclass(frozen=True)
class KeyPair:
    """The keys of one module in a file.

    Attributes:
        stem: the key prefix shared by both halves.
        down_key: key of A / lora_down, (r, n) or (r, in, kh, kw).
        up_key: key of B / lora_up, (m, r) or (m, r, 1, 1).
        style: the naming style the keys follow.
    """

    stem: str
    down_key: str
    up_key: str
    style: PairStyle


def split_pairs(
    keys: Iterable[str], styles: Sequence[PairStyle], *, path: str | Path
) -> tuple[list[KeyPair], list[str]]:
    """Group keys into module pairs.

    Args:
        keys: the file's tensor keys, in file order.
        styles: the naming styles to recognise, tried in order for each key.
        path: the file, for messages.

    Returns:
        (pairs in file order of their first key, keys that belong to no style).

    Raises:
        UnpairedTensorError: a down tensor without its up, or the reverse (names the key).
    """
    halves: dict[str, dict[str, str]] = {}
    style_of: dict[str, PairStyle] = {}
    rest: list[str] = []
    for key in keys:
        for style in styles:
            for half, suffix in (("down", style.down), ("up", style.up)):
                if key.endswith(suffix):
                    stem = key[: -len(suffix)]
                    halves.setdefault(stem, {})[half] = key
                    style_of.setdefault(stem, style)
                    break
            else:
                continue
            break
        else:
            rest.append(key)
    pairs: list[KeyPair] = []
    for stem, found in halves.items():
        style = style_of[stem]
        if "down" not in found or "up" not in found:
            have, missing = (
                (found["up"], stem + style.down)
                if "up" in found
                else (found["down"], stem + style.up)
            )
            raise UnpairedTensorError(f"has no partner tensor {missing}", path=path, key=have)
        pairs.append(KeyPair(stem=stem, down_key=found["down"], up_key=found["up"], style=style))
    return pairs, rest


def module_from_tensors(
    name: str,
    down: torch.Tensor,
    up: torch.Tensor,
    *,
    scale: float,
    path: str | Path,
    key: str,
    source_key: str | None = None,
    magnitude: tuple[torch.Tensor, str] | None = None,
) -> LoraModule:
    """A :class:`LoraModule` from a file's down and up tensors, convolution LoRAs viewed as 2-D.

    Args:
        name: module name.
        down: A, (r, n) or (r, in, *kernel).
        up: B, (m, r) or (m, r, 1, ...).
        scale: multiplier of up @ down.
        path, key: where the tensors came from, for messages.
        source_key: the key stem in the file.
        magnitude: a DoRA magnitude as stored and its style (``peft`` / ``kohya``), see
            :func:`magnitude_from_tensor`.

    Raises:
        ShapeMismatchError: the ranks of down and up differ; a magnitude that does not fit.
        UnknownLayoutError: tensors of unsupported dimensionality (a non-1x1 up kernel, 1-D).
    """
    if down.ndim < 2 or up.ndim < 2 or down.ndim != up.ndim:
        raise UnknownLayoutError(
            f"LoRA halves of shapes {tuple(down.shape)} and {tuple(up.shape)} are not a "
            "linear or convolution LoRA",
            path=path,
            key=key,
        )
    r = int(down.shape[0])
    if int(up.shape[1]) != r:
        raise ShapeMismatchError(
            f"rank mismatch: down has rank {r} {tuple(down.shape)}, up has rank "
            f"{int(up.shape[1])} {tuple(up.shape)}",
            path=path,
            key=key,
        )
    weight_shape: tuple[int, ...] | None = None
    if down.ndim > 2:
        if any(int(s) != 1 for s in up.shape[2:]):
            raise UnknownLayoutError(
                f"convolution LoRA with a {tuple(up.shape[2:])} up kernel is not supported "
                "(expected 1x1)",
                path=path,
                key=key,
            )
        weight_shape = (int(up.shape[0]), *(int(s) for s in down.shape[1:]))
        down = down.reshape(r, -1)
        up = up.reshape(int(up.shape[0]), r)
    vector, axis = None, MagnitudeAxis.OUT
    if magnitude is not None:
        channels = weight_shape[1] if weight_shape is not None else int(down.shape[1])
        vector, axis = magnitude_from_tensor(
            magnitude[0],
            out_units=int(up.shape[0]),
            in_channels=channels,
            style=magnitude[1],
            path=path,
            key=key,
        )
    return LoraModule(
        name=name,
        up=up,
        down=down,
        scale=float(scale),
        source_key=source_key,
        weight_shape=weight_shape,
        magnitude=vector,
        magnitude_axis=axis,
    )


def tensors_of_module(
    module: LoraModule, up: torch.Tensor | None = None, *, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (down, up) tensors to store for a module, in its stored (possibly 4-D) shapes.

    Args:
        module: the module.
        up: a replacement for ``module.up`` (e.g. with the scale folded in), same shape.
        dtype: store in this dtype (the adapter's input dtype); None keeps the tensors' own.

    Raises:
        ValueError: for a compact module, which has no up/down values.
    """
    if module.is_compact:
        raise ValueError(f"module {module.name} is compact: decode it against its base first")
    up = module.up if up is None else up
    down = module.down
    if module.weight_shape is not None and len(module.weight_shape) > 2:
        r = module.rank
        down = down.reshape(r, *module.weight_shape[1:])
        up = up.reshape(int(up.shape[0]), r, *([1] * (len(module.weight_shape) - 2)))
    if dtype is not None:
        down, up = down.to(dtype), up.to(dtype)
    return down.contiguous(), up.contiguous()


def storage_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype | None:
    """The most common dtype among a file's LoRA tensors (None for none)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in tensors:
        counts[tensor.dtype] = counts.get(tensor.dtype, 0) + 1
    return max(counts, key=lambda d: counts[d]) if counts else None


def magnitude_from_tensor(
    tensor: torch.Tensor,
    *,
    out_units: int,
    in_channels: int,
    style: str,
    path: str | Path,
    key: str,
) -> tuple[torch.Tensor, MagnitudeAxis]:
    """A DoRA magnitude as stored, as (vector, axis).

    Args:
        tensor: PEFT ``lora_magnitude_vector``, (m,) or (1, m, 1, 1) for a convolution; or
            kohya/LyCORIS ``dora_scale``, (m, 1, ...) per output row (``wd_on_out``) or
            (1, in_channels, ...) per input channel.
        out_units, in_channels: the module's m and input channels.
        style: ``peft`` or ``kohya``.
        path, key: for messages.

    Raises:
        ShapeMismatchError: a shape neither convention gives this module.
    """
    shape = tuple(int(s) for s in tensor.shape)
    flat = tensor.reshape(-1)
    conv_peft = len(shape) > 2 and shape[:2] == (1, out_units) and all(s == 1 for s in shape[2:])
    if style == "peft" and (shape == (out_units,) or conv_peft):
        return flat, MagnitudeAxis.OUT
    if style == "kohya" and len(shape) >= 2 and all(s == 1 for s in shape[2:]):
        if shape[:2] == (out_units, 1):
            return flat, MagnitudeAxis.OUT
        if shape[:2] == (1, in_channels):
            return flat, MagnitudeAxis.IN
    raise ShapeMismatchError(
        f"DoRA magnitude of shape {list(shape)} fits neither {out_units} output rows nor "
        f"{in_channels} input channels of its module",
        path=path,
        key=key,
    )


def magnitude_tensor(module: LoraModule, *, style: str, dtype: torch.dtype | None) -> torch.Tensor:
    """The module's magnitude in a layout's stored shape (see :func:`magnitude_from_tensor`).

    Raises:
        ValueError: no magnitude; an input-channel magnitude for the PEFT style, which has none.
    """
    if module.magnitude is None:
        raise ValueError(f"module {module.name} has no DoRA magnitude")
    conv = module.weight_shape is not None and len(module.weight_shape) > 2
    ones = [1] * (len(module.weight_shape) - 2) if conv and module.weight_shape else []
    vector = module.magnitude if dtype is None else module.magnitude.to(dtype)
    if style == "peft":
        if module.magnitude_axis is not MagnitudeAxis.OUT:
            raise ValueError(
                f"module {module.name}: a DoRA magnitude per input channel (LyCORIS dora_scale) "
                "has no PEFT form (PEFT's DoRA scales output rows); write it as kohya"
            )
        return (vector.reshape(1, -1, *ones) if conv else vector).contiguous()
    if module.magnitude_axis is MagnitudeAxis.OUT:
        return vector.reshape(-1, 1, *ones).contiguous()
    return vector.reshape(1, -1, *ones).contiguous()


def scaled_up(module: LoraModule) -> torch.Tensor:
    """``scale * up`` in up's dtype (up itself when the scale is 1), for writing the scale folded."""
    if module.scale == 1.0:
        return module.up
    return (module.up.float() * module.scale).to(module.up.dtype)


def kind_from_metadata(metadata: Mapping[str, str]) -> AdapterKind:
    """LORAX when the file's metadata marks an expanded LoRA-X, else LORA."""
    return AdapterKind.LORAX if metadata.get(KIND_KEY) == "lorax" else AdapterKind.LORA


def metadata_for_write(adapter: LoraAdapter, *, keep: bool) -> dict[str, str]:
    """The string metadata to store with an adapter's tensors.

    Args:
        adapter: the adapter written.
        keep: keep the metadata it was read with (same layout as read).

    Returns:
        The kept metadata with ``lorax.kind`` set for an expanded LoRA-X (removed otherwise).
    """
    metadata = {str(k): str(v) for k, v in adapter.metadata.items()} if keep else {}
    metadata.pop(KIND_KEY, None)
    if adapter.kind is AdapterKind.LORAX:
        metadata[KIND_KEY] = "lorax"
    return metadata
