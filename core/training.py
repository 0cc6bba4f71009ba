"""Making LoRA-X adapters: a trainable dS around a frozen linear layer (paper section 4.1, eq. 1).

A :class:`LoraXLinear` wraps an ``nn.Linear`` (or a 1x1 ``nn.Conv2d``) with weight W (m, n) =
U S V^T and adds dW = U_r dS V_r^T, where U_r (m, r), V_r (n, r) and S_r (r,) are frozen buffers
from :func:`core.factorize.factorize` (the package's sign convention) and dS is the only trainable
tensor: diagonal (r,) by default, or full (r, r). The forward pass never forms dW: it computes
``base(x) + ((x V_r) dS^T) U_r^T`` right to left (a scaling by d for a diagonal dS).

The constraint sigma_i + d_i >= 0 (eq. 1) on a diagonal dS is kept by projection: the forward
pass (and :meth:`LoraXLinear.effective_ds`, hence every export) uses max(d_i, -sigma_i), and
:meth:`LoraXLinear.constrain_` (or :func:`constrain_lorax_`) writes that projection back into the
parameter after an optimizer step, so the stored values never drift below the bound. A full dS is
not constrained (the paper defines the bound for the diagonal form only).

:func:`inject_lorax` replaces matching modules of any torch model in place (that mutation is its
purpose) and freezes everything else; :func:`export_lorax` turns the layers into an adapter in
the expanded (up = U_r, down = dS V_r^T, scale 1) or compact (dS + base digest) form;
:func:`load_lorax` puts an adapter's dS back into injected layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from core.adapter import AdapterKind, AdapterLayout, LoraAdapter, LoraModule
from core.digest import tensor_digest
from core.errors import BaseMismatchError, ShapeMismatchError
from core.factorize import factorize
from core.factors import Factors
from core.formats.compact import subspace_ds
from core.formats.resolve import resolve_modules
from core.selection import ModuleSelector

__all__ = [
    "LoraXLinear",
    "constrain_lorax_",
    "export_lorax",
    "inject_lorax",
    "load_lorax",
    "lorax_layers",
]


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no weight tensor")
    return weight


def _matrix_shape(module: nn.Module) -> tuple[int, int] | None:
    """(m, n) of an adaptable module (Linear, or a 1x1 Conv2d without groups or non-zero
    padding modes), else None."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
    ):
        return module.out_channels, module.in_channels
    return None


class LoraXLinear(nn.Module):
    """A frozen linear layer (or 1x1 convolution) plus a trainable LoRA-X update U_r dS V_r^T.

    Args:
        base: the wrapped ``nn.Linear`` or 1x1 ``nn.Conv2d`` (kept as ``self.base``, frozen).
        factors: its weight's factors (rank r = ``factors.rank``), canonical signs.
        full: train a full (r, r) dS instead of a diagonal (r,) one.
        base_digest: digest of the base weight (default: computed from ``base.weight``), recorded
            in compact exports.

    Attributes:
        U (buffer): (m, r). V (buffer): (n, r). S (buffer): (r,) singular values.
        ds (parameter): (r,) or (r, r), initialised to zero (the wrapped layer's output at start).

    Raises:
        ValueError: a module that is not adaptable, or factors of another shape.
    """

    U: torch.Tensor
    V: torch.Tensor
    S: torch.Tensor

    def __init__(
        self, base: nn.Module, factors: Factors, *, full: bool = False, base_digest: str = ""
    ) -> None:
        super().__init__()
        shape = _matrix_shape(base)
        if shape is None:
            raise ValueError(f"cannot wrap {type(base).__name__}: need nn.Linear or a 1x1 Conv2d")
        if factors.shape != shape:
            raise ValueError(f"factors of shape {factors.shape} for a layer of shape {shape}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.register_buffer("U", factors.U.detach().float().clone())
        self.register_buffer("V", factors.V.detach().float().clone())
        self.register_buffer("S", factors.S.detach().float().clone())
        r = factors.rank
        self.ds = nn.Parameter(torch.zeros((r, r) if full else (r,)))
        self.base_digest = base_digest or tensor_digest(_weight(base))

    @classmethod
    def wrap(cls, base: nn.Module, rank: int | None, *, full: bool = False) -> LoraXLinear:
        """Factorize ``base``'s weight (exact thin SVD, leading min(rank, p) triplets; None = p)
        and wrap it."""
        shape = _matrix_shape(base)
        if shape is None:
            raise ValueError(f"cannot wrap {type(base).__name__}: need nn.Linear or a 1x1 Conv2d")
        weight = _weight(base).detach()
        digest = tensor_digest(weight)
        factors = factorize(weight.reshape(shape).float(), rank=rank, digest=digest)
        return cls(base, factors, full=full, base_digest=digest)

    @property
    def rank(self) -> int:
        """r."""
        return int(self.S.shape[0])

    @property
    def full(self) -> bool:
        """True for a full (r, r) dS."""
        return self.ds.ndim == 2

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the wrapped weight."""
        return int(self.U.shape[0]), int(self.V.shape[0])

    def factors(self) -> Factors:
        """The frozen factors (U_r, S_r, V_r) as :class:`Factors`."""
        return Factors(U=self.U, S=self.S, V=self.V, shape=self.shape, digest=self.base_digest)

    def effective_ds(self) -> torch.Tensor:
        """dS as used: max(d_i, -sigma_i) for a diagonal dS (eq. 1's bound), dS itself when full."""
        return self.ds if self.full else torch.maximum(self.ds, -self.S)

    def delta_weight(self) -> torch.Tensor:
        """dW = U_r dS V_r^T, (m, n). Forms the matrix: for tests and exports, not training."""
        ds = self.effective_ds()
        left = self.U @ ds if self.full else self.U * ds
        return left @ self.V.T

    @torch.no_grad()
    def constrain_(self) -> None:
        """Project a diagonal dS onto sigma_i + d_i >= 0 in place (after an optimizer step)."""
        if not self.full:
            self.ds.copy_(torch.maximum(self.ds, -self.S))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + x V_r dS^T U_r^T, right to left (channels of a 1x1 convolution likewise)."""
        out = self.base(x)
        ds = self.effective_ds()
        if isinstance(self.base, nn.Conv2d):
            conv = self.base
            r, (m, n) = self.rank, self.shape
            h = F.conv2d(
                x.to(self.V.dtype),
                self.V.T.reshape(r, n, 1, 1),
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
            )
            h = F.conv2d(h, ds.reshape(r, r, 1, 1)) if self.full else h * ds[:, None, None]
            delta = F.conv2d(h, self.U.reshape(m, r, 1, 1))
        else:
            h = x.to(self.V.dtype) @ self.V
            h = h @ ds.T if self.full else h * ds
            delta = h @ self.U.T
        return out + delta.to(out.dtype)


def lorax_layers(model: nn.Module) -> dict[str, LoraXLinear]:
    """The :class:`LoraXLinear` layers of a model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraXLinear)}


def constrain_lorax_(model: nn.Module) -> None:
    """:meth:`LoraXLinear.constrain_` on every LoRA-X layer of ``model`` (call after each step)."""
    for layer in lorax_layers(model).values():
        layer.constrain_()


def _selector(selector_or_patterns: ModuleSelector | str | Iterable[str]) -> ModuleSelector:
    if isinstance(selector_or_patterns, ModuleSelector):
        return selector_or_patterns
    if isinstance(selector_or_patterns, str):
        return ModuleSelector(include=(selector_or_patterns,))
    return ModuleSelector(include=tuple(selector_or_patterns))


def inject_lorax(
    model: nn.Module,
    selector_or_patterns: ModuleSelector | str | Iterable[str],
    *,
    rank: int | None,
    full: bool = False,
) -> dict[str, LoraXLinear]:
    """Replace the model's matching linear modules with :class:`LoraXLinear`, in place.

    Mutating ``model`` is the purpose. Every parameter of the model is frozen; only the new dS
    parameters train. Modules already wrapped are left as they are; selected modules that are
    not adaptable (convolutions other than 1x1, grouped convolutions) are left out.

    Args:
        model: any torch model.
        selector_or_patterns: a :class:`ModuleSelector`, or regexes (``re.search``) over module
            names as in :data:`core.selection.DEFAULT_PATTERNS`.
        rank: r per module, capped at the module's thin rank p; None = p.
        full: train full (r, r) dS matrices.

    Returns:
        Module name -> the new layer, in model order.

    Raises:
        ValueError: no adaptable module matched.
    """
    selector = _selector(selector_or_patterns)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped_inner = {f"{n}.base" for n in lorax_layers(model)}
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name
        and name not in wrapped_inner
        and not isinstance(module, LoraXLinear)
        and _matrix_shape(module) is not None
        and selector.matches(name)
    ]
    if not targets:
        raise ValueError(f"no linear module of the model matches {selector.include}")
    layers: dict[str, LoraXLinear] = {}
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoraXLinear.wrap(module, rank, full=full)
        setattr(parent, attr, layer)
        layers[name] = layer
    return layers


def _layers_of(model_or_layers: nn.Module | Mapping[str, LoraXLinear]) -> dict[str, LoraXLinear]:
    if isinstance(model_or_layers, nn.Module):
        return lorax_layers(model_or_layers)
    return dict(model_or_layers)


def export_lorax(
    model_or_layers: nn.Module | Mapping[str, LoraXLinear],
    *,
    form: Literal["expanded", "compact"] = "expanded",
    layout: AdapterLayout = AdapterLayout.PEFT,
    name_prefix: str = "",
) -> LoraAdapter:
    """The adapter the LoRA-X layers hold.

    Args:
        model_or_layers: a model with injected layers, or name -> layer.
        form: ``expanded``: up = U_r (m, r), down = dS V_r^T (r, n) (a diagonal dS scales the
            rows), scale 1, kind LORAX, ``ds`` and ``base_digest`` recorded; ``compact``: dS and
            base digest only (kind LORAX_COMPACT, layout COMPACT, expanding to ``layout``).
        layout: the layout the expanded adapter is written in.
        name_prefix: prepended to module names (``unet.`` for a UNet used in a pipeline).

    Returns:
        A :class:`LoraAdapter` with copies of the values (later training does not change it).

    Raises:
        ValueError: no LoRA-X layer, or an unknown form.
    """
    layers = _layers_of(model_or_layers)
    if not layers:
        raise ValueError("no LoraXLinear layer to export")
    if form not in ("expanded", "compact"):
        raise ValueError(f"unknown form {form!r}: expanded or compact")
    modules: dict[str, LoraModule] = {}
    for name, layer in layers.items():
        full_name = name_prefix + name
        ds = layer.effective_ds().detach().float().clone()
        conv = isinstance(layer.base, nn.Conv2d)
        weight_shape = tuple(_weight(layer.base).shape) if conv else None
        if form == "compact":
            modules[full_name] = LoraModule.from_ds(
                full_name, ds, layer.shape, layer.base_digest, weight_shape=weight_shape
            )
            continue
        down = (ds @ layer.V.T) if layer.full else ds[:, None] * layer.V.T
        modules[full_name] = LoraModule(
            name=full_name,
            up=layer.U.detach().clone(),
            down=down.detach().contiguous(),
            scale=1.0,
            ds=ds,
            base_digest=layer.base_digest,
            weight_shape=weight_shape,
        )
    if form == "compact":
        return LoraAdapter(
            modules=modules,
            kind=AdapterKind.LORAX_COMPACT,
            layout=AdapterLayout.COMPACT,
            config={"expanded_layout": AdapterLayout(layout).value, "expanded_config": {}},
        )
    return LoraAdapter(modules=modules, kind=AdapterKind.LORAX, layout=AdapterLayout(layout))


@torch.no_grad()
def load_lorax(
    model_or_layers: nn.Module | Mapping[str, LoraXLinear],
    adapter: LoraAdapter,
    *,
    strict: bool = True,
    tol: float = 1e-4,
) -> list[str]:
    """Set the layers' dS from an adapter (compact, or expanded in the layers' subspace).

    Module names are resolved onto the layers' names (:func:`core.formats.resolve_modules`), so
    an adapter read from a file with wrapper prefixes loads as well. An expanded module's dS is
    recovered as U_r^T (scale B A) V_r (:func:`core.formats.compact.subspace_ds`).

    Args:
        model_or_layers: a model with injected layers, or name -> layer.
        adapter: the adapter.
        strict: every adapter module must find its layer (else it is skipped).
        tol: relative residual allowed when recovering dS from an expanded module.

    Returns:
        The layer names loaded.

    Raises:
        MissingModuleError, ShapeMismatchError: (strict) a module with no layer of its shape.
        BaseMismatchError: a compact module made for another base weight.
        SubspaceError: an expanded module outside the layer's subspace.
        ShapeMismatchError: a dS of another rank, or a full dS for a diagonal layer.
    """
    layers = _layers_of(model_or_layers)
    resolved, _ = resolve_modules(
        adapter, {name: layer.shape for name, layer in layers.items()}, strict=strict
    )
    loaded = []
    for name, module in resolved.modules.items():
        layer = layers[name]
        if module.is_compact:
            if module.base_digest and module.base_digest != layer.base_digest:
                raise BaseMismatchError(
                    f"compact LoRA-X made for base tensor {module.base_digest}, the layer's "
                    f"weight is {layer.base_digest}",
                    path=adapter.source,
                    key=name,
                )
            assert module.ds is not None
            ds = module.ds.float()
        else:
            ds = subspace_ds(module, layer.factors(), tol=tol, source=adapter.source)
        if ds.shape[0] != layer.rank:
            raise ShapeMismatchError(
                f"dS of rank {ds.shape[0]} for a layer of rank {layer.rank}",
                path=adapter.source,
                key=name,
            )
        if layer.full:
            ds = ds if ds.ndim == 2 else torch.diag(ds)
        elif ds.ndim == 2:
            off = ds - torch.diag(torch.diagonal(ds))
            if float(off.norm()) > tol * max(float(ds.norm()), 1e-30):
                raise ShapeMismatchError(
                    "a full dS cannot be loaded into a diagonal LoRA-X layer",
                    path=adapter.source,
                    key=name,
                )
            ds = torch.diagonal(ds)
        layer.ds.copy_(ds.to(layer.ds.dtype))
        loaded.append(name)
    return loaded
