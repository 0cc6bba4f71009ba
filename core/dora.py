"""DoRA: the adapted weight, and the rule that carries a magnitude vector to a new base.

DoRA (Liu et al., 2024; PEFT ``tuners/lora/dora.py``) adapts a weight W (m, n) as

    W' = m * (W + dW) / ||W + dW||,        dW = s B A,

with one magnitude per unit: per output row (PEFT: ``torch.linalg.norm(W + s B A, dim=1)``,
m of shape (out,); LyCORIS with ``wd_on_out``) or per input channel (LyCORIS ``dora_scale`` by
default: the norm over the output rows and the kernel of each input channel, m of shape
(1, in)). A convolution is its (out, in * kh * kw) view; input channel c is the columns
[c kh kw, (c + 1) kh kw). PEFT detaches the norm from the gradient; the adapted weight is the
same. Written with the gain g = m / ||W + dW|| (one per unit):

    W' = diag(g) (W + dW)  (rows),        W' = (W + dW) diag(g)  (input channels).

**Carrying DoRA to a new base** (the rule of :func:`carry_magnitude`). The direction part dW is
carried like any LoRA update (eq. 3: dW_t = s B' A'); the gain is carried unchanged, g_t = g_s:

    m_t = g_s * ||W_t + dW_t|| = m_s * ||W_t + dW_t|| / ||W_s + dW_s||        (per unit).

Why the gain and not m itself: DoRA's change of a base is "add dW, then rescale each unit by g".
With a successor W_t = W_s + E and the carried update dW_t,

    W'_t - W'_s = diag(g) (E + (dW_t - dW_s)),

so the adapted weights differ by the base's own change and the change of the carried update,
each scaled by g (close to 1 for a trained DoRA): within the noise of the successor. On
W_t = W_s with dW_t = dW_s the rule is exactly the identity (m_t = m_s). Copying m (m_t = m_s)
would instead impose the source base's row norms on the successor's rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch

from core.adapter import LoraAdapter, LoraModule, MagnitudeAxis
from core.errors import NonFiniteError
from core.finite import all_finite

__all__ = [
    "carry_dora_magnitudes",
    "carry_magnitude",
    "dora_weight",
    "weight_norms",
    "with_carried_magnitude",
]


def weight_norms(
    weight: torch.Tensor,
    update: torch.Tensor,
    *,
    axis: MagnitudeAxis = MagnitudeAxis.OUT,
    channels: int | None = None,
) -> torch.Tensor:
    """||W + dW|| per unit, float64.

    Args:
        weight: W, (m, n) (a convolution's (out, in * kh * kw) view).
        update: dW, (m, n).
        axis: output rows (shape (m,)) or input channels (shape (channels,)).
        channels: the input channels (n for a linear module, ``in`` of a convolution); default n.

    Raises:
        ValueError: shapes that do not agree.
    """
    if weight.shape != update.shape or weight.ndim != 2:
        raise ValueError(f"weight {tuple(weight.shape)} and update {tuple(update.shape)} differ")
    total = weight.double() + update.double()
    if axis is MagnitudeAxis.OUT:
        return torch.linalg.vector_norm(total, dim=1)
    n = int(total.shape[1])
    c = n if channels is None else channels
    if n % c:
        raise ValueError(f"{n} columns do not split into {c} input channels")
    grouped = total.reshape(total.shape[0], c, n // c)
    return torch.linalg.vector_norm(grouped, dim=(0, 2))


def _gain_shape(gain: torch.Tensor, n: int, axis: MagnitudeAxis) -> torch.Tensor:
    if axis is MagnitudeAxis.OUT:
        return gain[:, None]
    return gain.repeat_interleave(n // int(gain.shape[0]))[None, :]


def dora_weight(
    weight: torch.Tensor,
    update: torch.Tensor,
    magnitude: torch.Tensor,
    *,
    axis: MagnitudeAxis = MagnitudeAxis.OUT,
    channels: int | None = None,
) -> torch.Tensor:
    """The DoRA-adapted weight W' = m * (W + dW) / ||W + dW|| (per unit), float32 (m, n).

    Args:
        weight, update: W and dW, (m, n).
        magnitude: m, one per unit of ``axis``.
        axis, channels: see :func:`weight_norms`.
    """
    norms = weight_norms(weight, update, axis=axis, channels=channels)
    gain = magnitude.double() / norms
    total = weight.double() + update.double()
    return (total * _gain_shape(gain, int(total.shape[1]), axis)).float()


def carry_magnitude(
    magnitude: torch.Tensor, source_norms: torch.Tensor, target_norms: torch.Tensor
) -> torch.Tensor:
    """The magnitude on the target base: m_t = m_s * ||W_t + dW_t|| / ||W_s + dW_s|| (the gain
    carried unchanged; see the module docstring for the derivation).

    Args:
        magnitude: m_s, one per unit.
        source_norms: ||W_s + dW_s|| per unit (:func:`weight_norms`).
        target_norms: ||W_t + dW_t|| per unit, dW_t the carried update.

    Returns:
        m_t in ``magnitude``'s dtype. A unit whose source norm is 0 has no defined gain: it gets
        gain 1 (m_t = ||W_t + dW_t||, the plain LoRA on that unit).

    Raises:
        ValueError: lengths that differ.
        NonFiniteError: a non-finite result.
    """
    if not magnitude.shape == source_norms.shape == target_norms.shape:
        raise ValueError(
            f"magnitude {tuple(magnitude.shape)}, source norms {tuple(source_norms.shape)} and "
            f"target norms {tuple(target_norms.shape)} must have one length"
        )
    source = source_norms.double()
    gain = torch.where(source > 0, magnitude.double() / source.clamp_min(1e-300), 1.0)
    carried = gain * target_norms.double()
    if not all_finite(carried):
        raise NonFiniteError("the carried DoRA magnitude is not finite")
    return carried.to(magnitude.dtype)


def _channels(module: LoraModule) -> int | None:
    shape = module.weight_shape
    return int(shape[1]) if shape is not None and len(shape) > 2 else None


def with_carried_magnitude(
    source_module: LoraModule,
    carried: LoraModule,
    source_weight: torch.Tensor,
    target_weight: torch.Tensor,
) -> tuple[LoraModule, tuple[str, ...]]:
    """``carried`` (the direction part on the target) with the magnitude of ``source_module``
    carried by :func:`carry_magnitude`.

    Args:
        source_module: the DoRA module on the source base (its magnitude and update).
        carried: the transferred module (its update dW_t), without magnitude.
        source_weight, target_weight: W_s and W_t, (m, n) float32.

    Returns:
        (the module with its magnitude, notes). When the units differ in number between source
        and target (a different-shape transfer), the gain cannot be carried: the module gets
        gain 1 (m_t = ||W_t + dW_t||) and a note says so.
    """
    magnitude = source_module.magnitude
    if magnitude is None:
        return carried, ()
    axis = source_module.magnitude_axis
    target_norms = weight_norms(
        target_weight, carried.delta(), axis=axis, channels=_channels(carried)
    )
    notes: tuple[str, ...] = ()
    if target_norms.shape != magnitude.shape:
        notes = (
            f"DoRA gain not carried ({magnitude.shape[0]} {axis.value} units on the source, "
            f"{target_norms.shape[0]} on the target): gain 1",
        )
        value = target_norms.to(magnitude.dtype)
    else:
        source_norms = weight_norms(
            source_weight, source_module.delta(), axis=axis, channels=_channels(source_module)
        )
        value = carry_magnitude(magnitude, source_norms, target_norms)
    return dataclasses.replace(carried, magnitude=value, magnitude_axis=axis), notes


def carry_dora_magnitudes(
    source: LoraAdapter,
    transferred: LoraAdapter,
    fed_by: Mapping[str, str],
    source_weight: Callable[[str], torch.Tensor],
    target_weight: Callable[[str], torch.Tensor],
) -> tuple[LoraAdapter, tuple[str, ...]]:
    """:func:`with_carried_magnitude` for every transferred module fed by a DoRA module.

    Args:
        source: the adapter on the source base (its modules hold the magnitudes).
        transferred: the transferred adapter (direction parts carried).
        fed_by: target module name -> the source module whose update it received.
        source_weight, target_weight: module name -> the base's (m, n) float32 weight.

    Returns:
        (the transferred adapter with magnitudes, notes prefixed by the module name).
    """
    modules = dict(transferred.modules)
    notes: list[str] = []
    for target_name, module in transferred.modules.items():
        own = source.modules.get(fed_by.get(target_name, ""))
        if own is None or own.magnitude is None:
            continue
        modules[target_name], extra = with_carried_magnitude(
            own, module, source_weight(own.name), target_weight(target_name)
        )
        notes.extend(f"{target_name}: {note}" for note in extra)
    return dataclasses.replace(transferred, modules=modules), tuple(notes)
