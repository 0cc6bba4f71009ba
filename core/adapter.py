"""The in-memory form of a LoRA or LoRA-X adapter, independent of its file layout.

Readers in :mod:`core.formats` turn PEFT, kohya, diffusers and compact LoRA-X files into a
:class:`LoraAdapter`; writers turn one back into files. The math in :mod:`core.transfer` only
sees this form.

Conventions (PyTorch ``nn.Linear``): a module's weight W has shape (m, n) = (out, in); the
adapter's update is dW = scale * up @ down with up = B (m, r) and down = A (r, n). For a LoRA-X
in expanded form up = U_r, down = dS V_r^T and scale = 1 (DESIGN.md, "LoRA-X adapter").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import torch

__all__ = ["AdapterKind", "AdapterLayout", "LoraAdapter", "LoraModule"]


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
        weight_shape: shape of the base weight as stored (4-D for a 1x1 convolution), so a writer
            can restore the original tensor shapes; None means plain 2-D.
    """

    name: str
    up: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0
    ds: torch.Tensor | None = None
    base_digest: str | None = None
    source_key: str | None = None
    weight_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.up.ndim != 2 or self.down.ndim != 2 or self.up.shape[1] != self.down.shape[0]:
            raise ValueError(
                f"module {self.name}: up {tuple(self.up.shape)} and down "
                f"{tuple(self.down.shape)} do not form a LoRA pair (m, r) x (r, n)"
            )

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
        modules; the transfer code never calls it."""
        return self.scale * (self.up.float() @ self.down.float())

    def energy(self) -> float:
        """||dW||_F^2 computed in r x r products: trace((B^T B)(A A^T)) * scale^2."""
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
    """

    modules: Mapping[str, LoraModule]
    kind: AdapterKind
    layout: AdapterLayout
    config: Mapping[str, object] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    source: str | None = None

    @property
    def rank(self) -> int:
        """The largest module rank (0 for an empty adapter)."""
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def is_lorax(self) -> bool:
        return self.kind in (AdapterKind.LORAX, AdapterKind.LORAX_COMPACT)
