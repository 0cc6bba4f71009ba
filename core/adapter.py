"""The in-memory form of a LoRA or LoRA-X adapter, independent of its file layout.

Readers in :mod:`core.formats` turn PEFT, kohya, diffusers and compact LoRA-X files into a
:class:`LoraAdapter`; writers turn one back into files. The math in :mod:`core.transfer` only
sees this form.

Conventions (PyTorch ``nn.Linear``): a module's weight W has shape (m, n) = (out, in); the
adapter's update is dW = scale * up @ down with up = B (m, r) and down = A (r, n). For a LoRA-X
in expanded form up = U_r, down = dS V_r^T and scale = 1 (DESIGN.md, "LoRA-X adapter").

A DoRA module (PEFT ``use_dora``, LyCORIS ``dora_scale``) also holds a magnitude vector m: the
adapted weight is W' = m * (W + dW) / ||W + dW||, the norm taken per output row
(:attr:`MagnitudeAxis.OUT`, PEFT) or per input channel (:attr:`MagnitudeAxis.IN`, LyCORIS
without ``wd_on_out``); :mod:`core.dora` holds the formulas.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from core.checkpoints.architecture import Architecture, architecture_of_adapter

__all__ = [
    "AdapterKind",
    "AdapterLayout",
    "LoraAdapter",
    "LoraModule",
    "MagnitudeAxis",
    "ModuleConversion",
]


class AdapterKind(StrEnum):
    """What the adapter is; the values are the registry's ``lorax.format`` tag values."""

    LORA = "lora"  # an ordinary LoRA pair per module: not constrained to the base's subspace
    LORAX = "lorax"  # a LoRA-X stored as an ordinary pair (expanded form)
    LORAX_COMPACT = "lorax-compact"  # a LoRA-X stored as dS per module + base fingerprint


class AdapterLayout(StrEnum):
    """How the adapter's files are laid out on disk."""

    PEFT = "peft"  # adapter_config.json + adapter_model.safetensors
    KOHYA = "kohya"  # lora_unet_* / lora_te*_ keys, .alpha tensors, ss_* metadata
    DIFFUSERS = "diffusers"  # lora_A/lora_B or lora.down/lora.up keys in one safetensors file
    COMPACT = "compact"  # the native LoRA-X compact file


class MagnitudeAxis(StrEnum):
    """Which units a DoRA magnitude vector scales."""

    OUT = "out"  # one per output row of W (PEFT use_dora; LyCORIS wd_on_out): shape (m,)
    IN = "in"  # one per input channel (LyCORIS dora_scale by default): shape (in_channels,)


@dataclass(frozen=True)
class ModuleConversion:
    """A module that was not a LoRA in its file and became one (LoHa, LoKr, ...).

    Attributes:
        key: the module's key stem in the file.
        kind: what it was: ``loha``, ``lokr``, ``locon-tucker`` or ``full``.
        rank: the rank of the LoRA it became.
        energy_kept: ||dW_r||_F^2 / ||dW||_F^2 of that LoRA against the expanded update (1.0 for
            an exact conversion).
    """

    key: str
    kind: str
    rank: int
    energy_kept: float


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One adapted module.

    Attributes:
        name: the base model's module name this adapts (its weight key without ``.weight``),
            once resolved against a base; before resolution, the name the file implies.
        up: B, shape (m, r).
        down: A, shape (r, n).
        scale: multiplier of up @ down (alpha / r for PEFT and kohya, alpha / sqrt(r) for rsLoRA,
            1 for LoRA-X expanded form).
        ds: for a LoRA-X, its dS: (r,) when diagonal or (r, r) when full; None for plain LoRA or
            when unknown.
        base_digest: content digest of the base tensor the LoRA-X was trained on (compact form).
        source_key: the key prefix the module had in its file, so a writer can keep it.
        weight_shape: shape of the base weight as stored (4-D for a convolution), so a writer
            can restore the original tensor shapes; None means plain 2-D.
        magnitude: for a DoRA module, its magnitude vector m (1-D, float32 or as stored): (m,)
            for :attr:`MagnitudeAxis.OUT`, (in_channels,) for :attr:`MagnitudeAxis.IN`; None for
            a plain LoRA.
        magnitude_axis: the units ``magnitude`` scales.

    Compact modules: a compact LoRA-X read without its base (adapter kind ``LORAX_COMPACT``)
    has no U_r / V_r to expand with. Its module holds ``ds`` and ``base_digest``, and ``up`` /
    ``down`` are shape-only placeholders on the ``meta`` device, (m, r) and (r, n) with r the
    size of dS, so names, shapes and ranks work as usual while no values exist.
    :attr:`is_compact` tells them apart; :meth:`delta` refuses them and :meth:`energy` is
    ||dS||_F^2 (exact, because U_r and V_r are orthonormal). Build them with :meth:`from_ds`;
    ``core.formats.decode_compact`` expands them against their base.
    """

    name: str
    up: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0
    ds: torch.Tensor | None = None
    base_digest: str | None = None
    source_key: str | None = None
    weight_shape: tuple[int, ...] | None = None
    magnitude: torch.Tensor | None = None
    magnitude_axis: MagnitudeAxis = MagnitudeAxis.OUT

    def __post_init__(self) -> None:
        if self.up.ndim != 2 or self.down.ndim != 2 or self.up.shape[1] != self.down.shape[0]:
            raise ValueError(
                f"module {self.name}: up {tuple(self.up.shape)} and down "
                f"{tuple(self.down.shape)} do not form a LoRA pair (m, r) x (r, n)"
            )
        if self.magnitude is not None:
            units = self.magnitude_units
            if self.magnitude.ndim != 1 or int(self.magnitude.shape[0]) != units:
                raise ValueError(
                    f"module {self.name}: a DoRA magnitude per {self.magnitude_axis.value} unit "
                    f"must have shape ({units},), got {tuple(self.magnitude.shape)}"
                )

    @property
    def magnitude_units(self) -> int:
        """How many units a magnitude vector of this module scales: m for the output axis, the
        input channels (``weight_shape[1]`` for a convolution, else n) for the input axis."""
        if self.magnitude_axis is MagnitudeAxis.OUT:
            return int(self.up.shape[0])
        if self.weight_shape is not None and len(self.weight_shape) > 2:
            return int(self.weight_shape[1])
        return int(self.down.shape[1])

    @property
    def is_dora(self) -> bool:
        """True for a DoRA module (it has a magnitude vector)."""
        return self.magnitude is not None

    @classmethod
    def from_ds(
        cls,
        name: str,
        ds: torch.Tensor,
        shape: tuple[int, int],
        base_digest: str,
        *,
        source_key: str | None = None,
        weight_shape: tuple[int, ...] | None = None,
    ) -> LoraModule:
        """A compact LoRA-X module: dS plus the digest of its base, with placeholder up/down.

        Args:
            name: module name.
            ds: dS, (r,) diagonal or (r, r) full.
            shape: (m, n) of the base weight (2-D view).
            base_digest: digest of the base tensor dS was trained on.
            source_key: key prefix in the file it came from, if any.
            weight_shape: stored shape of the base weight when it is not 2-D.

        Returns:
            A module with ``is_compact`` True.

        Raises:
            ValueError: when ds is neither (r,) nor (r, r).
        """
        if ds.ndim not in (1, 2) or (ds.ndim == 2 and ds.shape[0] != ds.shape[1]):
            raise ValueError(f"module {name}: dS must be (r,) or (r, r), got {tuple(ds.shape)}")
        r = int(ds.shape[0])
        m, n = shape
        return cls(
            name=name,
            up=torch.empty((m, r), device="meta"),
            down=torch.empty((r, n), device="meta"),
            scale=1.0,
            ds=ds,
            base_digest=base_digest,
            source_key=source_key,
            weight_shape=weight_shape,
        )

    @property
    def is_compact(self) -> bool:
        """True for a compact LoRA-X module (placeholder up/down, values only in ``ds``)."""
        return self.up.is_meta or self.down.is_meta

    @property
    def rank(self) -> int:
        """r."""
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the update."""
        return (int(self.up.shape[0]), int(self.down.shape[1]))

    def delta(self) -> torch.Tensor:
        """dW = scale * up @ down, shape (m, n). Forms the full matrix: for tests and small
        modules; the transfer code never calls it.

        Raises:
            ValueError: for a compact module (no U_r / V_r to expand with)."""
        if self.is_compact:
            raise ValueError(f"module {self.name} is compact: decode it against its base first")
        return self.scale * (self.up.float() @ self.down.float())

    def energy(self) -> float:
        """||dW||_F^2 computed in r x r products: trace((B^T B)(A A^T)) * scale^2 (for a compact
        module, ||dS||_F^2)."""
        if self.is_compact:
            assert self.ds is not None
            return float(self.ds.double().square().sum()) * self.scale**2
        up, down = self.up.double(), self.down.double()
        gram = (up.T @ up) * (down @ down.T)
        return float(gram.sum()) * self.scale**2


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """An adapter: modules keyed by module name, plus what is needed to write it back.

    Attributes:
        modules: module name -> :class:`LoraModule`, in file order.
        kind: plain LoRA, expanded LoRA-X or compact LoRA-X.
        layout: the file layout it was read from (and is written in by default).
        config: the layout's configuration (PEFT ``adapter_config.json`` contents), if any.
        metadata: the safetensors ``__metadata__`` strings (kohya ``ss_*`` and others), kept on
            write.
        source: where it was read from, for messages.
        dtype: the dtype its LoRA tensors were stored in (the most common one); writers store
            every LoRA tensor in it. None: as the tensors are.
        conversions: modules that were not LoRAs in the file (LoHa, LoKr, ...) and became one,
            with the energy each kept; empty for a plain LoRA file.
    """

    modules: Mapping[str, LoraModule]
    kind: AdapterKind
    layout: AdapterLayout
    config: Mapping[str, object] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    source: str | None = None
    dtype: torch.dtype | None = None
    conversions: tuple[ModuleConversion, ...] = ()

    @property
    def rank(self) -> int:
        """The largest module rank (0 for an empty adapter)."""
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def is_lorax(self) -> bool:
        return self.kind in (AdapterKind.LORAX, AdapterKind.LORAX_COMPACT)

    @property
    def is_dora(self) -> bool:
        """True when some module is a DoRA module."""
        return any(m.is_dora for m in self.modules.values())

    @property
    def architecture(self) -> Architecture | None:
        """The Stable Diffusion family its metadata names (kohya ``ss_base_model_version``,
        ``modelspec.architecture``), or None."""
        return architecture_of_adapter(self.metadata)
