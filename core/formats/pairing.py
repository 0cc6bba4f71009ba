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

from core.adapter import AdapterKind, LoraAdapter, LoraModule
from core.errors import ShapeMismatchError, UnknownLayoutError, UnpairedTensorError

__all__ = [
    "KIND_KEY",
    "KeyPair",
    "PairStyle",
    "kind_from_metadata",
    "metadata_for_write",
    "module_from_tensors",
    "scaled_up",
    "split_pairs",
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
) -> LoraModule:
    """A :class:`LoraModule` from a file's down and up tensors, convolution LoRAs viewed as 2-D.

    Args:
        name: module name.
        down: A, (r, n) or (r, in, *kernel).
        up: B, (m, r) or (m, r, 1, ...).
        scale: multiplier of up @ down.
        path, key: where the tensors came from, for messages.
        source_key: the key stem in the file.

    Raises:
        ShapeMismatchError: the ranks of down and up differ.
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
    return LoraModule(
        name=name,
        up=up,
        down=down,
        scale=float(scale),
        source_key=source_key,
        weight_shape=weight_shape,
    )


def tensors_of_module(
    module: LoraModule, up: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (down, up) tensors to store for a module, in its stored (possibly 4-D) shapes.

    Args:
        module: the module.
        up: a replacement for ``module.up`` (e.g. with the scale folded in), same shape.

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
    return down.contiguous(), up.contiguous()


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
