"""The compact LoRA-X file: per module only dS, plus the fingerprint of the base it belongs to.

File format, version 1 (a safetensors file):

* tensors: ``<module name>.ds``, float32, (r,) for a diagonal dS or (r, r) for a full one
  (r may be the full thin rank p when a full-rank projection produced the module);
* metadata (all strings):

  - ``lorax.format`` = ``lorax-compact``, ``lorax.version`` = ``1``;
  - ``lorax.modules``: JSON object, module name -> ``{"shape": [m, n], "rank": r,
    "ds": "diagonal" | "full", "base_digest": "sha256:...", "weight_shape": [...] | null,
    "source_key": str | null}``, in file order. ``base_digest`` is :func:`core.digest`'s digest
    of the base weight tensor (as stored) the module was trained on or encoded against;
  - ``lorax.layout`` / ``lorax.config``: the layout (``peft``, ``kohya``, ``diffusers``) and its
    configuration (JSON) that decoding gives back, so an adapter keeps its layout through the
    compact form;
  - any other metadata of the adapter (kohya ``ss_*`` ...), verbatim.

Meaning: dW = U_r dS V_r^T with U_r, V_r the base weight's leading singular vectors under the
package's sign convention (:mod:`core.factors`); decoding gives the expanded pair up = U_r,
down = dS V_r^T, scale 1. In memory, a compact adapter (kind ``LORAX_COMPACT``, layout
``COMPACT``) holds :meth:`LoraModule.from_ds` modules and ``config = {"expanded_layout": ...,
"expanded_config": {...}}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from core.adapter import AdapterKind, AdapterLayout, LoraAdapter, LoraModule
from core.errors import (
    BaseMismatchError,
    CorruptFileError,
    MissingModuleError,
    ShapeMismatchError,
    SubspaceError,
    UnknownLayoutError,
)
from core.factors import Factors
from core.formats.tensorfile import TensorFile, read_safetensors, write_safetensors_atomic

__all__ = [
    "COMPACT_FORMAT",
    "COMPACT_VERSION",
    "decode_compact",
    "encode_compact",
    "is_compact_file",
    "read_compact",
    "subspace_ds",
    "write_compact",
]

COMPACT_FORMAT = "lorax-compact"
COMPACT_VERSION = 1
_DS = ".ds"
_FORMAT_KEY, _VERSION_KEY, _MODULES_KEY = "lorax.format", "lorax.version", "lorax.modules"
_LAYOUT_KEY, _CONFIG_KEY = "lorax.layout", "lorax.config"


def is_compact_file(metadata: Mapping[str, str]) -> bool:
    """True when a safetensors file's metadata marks a compact LoRA-X."""
    return metadata.get(_FORMAT_KEY) == COMPACT_FORMAT


def _corrupt(message: str, path: Path, key: str | None = None) -> CorruptFileError:
    return CorruptFileError(f"compact LoRA-X: {message}", path=path, key=key)


def read_compact(tensor_file: TensorFile) -> LoraAdapter:
    """Turn a compact LoRA-X file into an adapter of kind ``LORAX_COMPACT``.

    Raises:
        UnknownLayoutError: a version newer than this reader, or tensors not in the module table.
        CorruptFileError: a missing or inconsistent module table or dS tensor (names the key).
    """
    path, metadata = tensor_file.path, tensor_file.metadata
    version = metadata.get(_VERSION_KEY, "")
    if version != str(COMPACT_VERSION):
        raise UnknownLayoutError(
            f"compact LoRA-X version {version!r} is not supported (this reader: {COMPACT_VERSION})",
            path=path,
            key=_VERSION_KEY,
        )
    try:
        table = json.loads(metadata[_MODULES_KEY])
        config = json.loads(metadata.get(_CONFIG_KEY, "{}"))
        layout = AdapterLayout(metadata.get(_LAYOUT_KEY, AdapterLayout.PEFT.value))
    except (KeyError, ValueError) as exc:
        raise _corrupt(f"unreadable metadata ({exc})", path, _MODULES_KEY) from exc
    if not isinstance(table, dict):
        raise _corrupt("module table is not a JSON object", path, _MODULES_KEY)
    listed = {name + _DS for name in table}
    stray = [k for k in tensor_file.tensors if k not in listed]
    if stray:
        raise UnknownLayoutError("tensor not in the compact module table", path=path, key=stray[0])
    modules: dict[str, LoraModule] = {}
    for name, entry in table.items():
        key = name + _DS
        ds = tensor_file.tensors.get(key)
        if ds is None:
            raise _corrupt("module listed without its dS tensor", path, key)
        try:
            m, n = (int(v) for v in entry["shape"])
            rank, form, digest = int(entry["rank"]), entry["ds"], str(entry["base_digest"])
            weight_shape = entry.get("weight_shape")
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(f"bad module entry ({exc})", path, key) from exc
        expected = (rank,) if form == "diagonal" else (rank, rank)
        if form not in ("diagonal", "full") or tuple(ds.shape) != expected:
            raise _corrupt(
                f"dS of shape {tuple(ds.shape)} but the table says {form} rank {rank}", path, key
            )
        modules[name] = LoraModule.from_ds(
            name,
            ds.float(),
            (m, n),
            digest,
            source_key=entry.get("source_key"),
            weight_shape=None if weight_shape is None else tuple(int(s) for s in weight_shape),
        )
    other = {k: v for k, v in metadata.items() if not k.startswith("lorax.") and k != "format"}
    return LoraAdapter(
        modules=modules,
        kind=AdapterKind.LORAX_COMPACT,
        layout=AdapterLayout.COMPACT,
        config={"expanded_layout": layout.value, "expanded_config": config},
        metadata=other,
        source=str(path),
    )


def write_compact(adapter: LoraAdapter, path: str | Path) -> list[Path]:
    """Write a compact adapter (kind ``LORAX_COMPACT``, e.g. from :func:`encode_compact`).

    Returns:
        [path].

    Raises:
        ValueError: an adapter that is not compact.
    """
    if adapter.kind is not AdapterKind.LORAX_COMPACT:
        raise ValueError("only a compact LoRA-X can be written as one: use encode_compact first")
    tensors: dict[str, torch.Tensor] = {}
    table: dict[str, object] = {}
    for name, module in adapter.modules.items():
        if module.ds is None or module.base_digest is None:
            raise ValueError(f"module {name} has no dS or base digest")
        tensors[name + _DS] = module.ds.detach().float()
        table[name] = {
            "shape": list(module.shape),
            "rank": module.rank,
            "ds": "diagonal" if module.ds.ndim == 1 else "full",
            "base_digest": module.base_digest,
            "weight_shape": None if module.weight_shape is None else list(module.weight_shape),
            "source_key": module.source_key,
        }
    metadata = {str(k): str(v) for k, v in adapter.metadata.items()}
    metadata.update(
        {
            "format": "pt",
            _FORMAT_KEY: COMPACT_FORMAT,
            _VERSION_KEY: str(COMPACT_VERSION),
            _MODULES_KEY: json.dumps(table),
            _LAYOUT_KEY: str(adapter.config.get("expanded_layout", AdapterLayout.PEFT.value)),
            _CONFIG_KEY: json.dumps(adapter.config.get("expanded_config", {})),
        }
    )
    return [write_safetensors_atomic(tensors, metadata, path)]


def _factors_for(
    name: str,
    shape: tuple[int, int],
    adapter: LoraAdapter,
    base_factors: Mapping[str, Factors],
    base_digests: Mapping[str, str] | None,
) -> tuple[Factors, str]:
    factors = base_factors.get(name)
    if factors is None:
        raise MissingModuleError("no base factors for this module", path=adapter.source, key=name)
    if factors.shape != shape:
        raise ShapeMismatchError(
            f"base weight has shape {factors.shape}, the adapter's update {shape}",
            path=adapter.source,
            key=name,
        )
    if not factors.exact:
        raise ValueError(f"module {name}: compact LoRA-X needs exact factors, not randomized ones")
    digest = base_digests.get(name, "") if base_digests is not None else factors.digest
    if not digest:
        raise ValueError(f"module {name}: no digest of the base weight given")
    return factors, digest


def _residual_sq(
    energy: float, c: torch.Tensor, d: torch.Tensor, gu: torch.Tensor, gv: torch.Tensor
) -> float:
    """||B A - U D V^T||_F^2 from k x k products (exact identity, no orthonormality assumed):
    ||BA||^2 - 2 <C, D> + <G_U D G_V, D>, with C = (U^T B)(A V), G_U = U^T U, G_V = V^T V."""
    return energy - 2.0 * float((c * d).sum()) + float(((gu @ d @ gv) * d).sum())


def subspace_ds(
    module: LoraModule, factors: Factors, *, tol: float = 1e-4, source: str | None = None
) -> torch.Tensor:
    """dS of an expanded module in the base's subspace: dW = U_k dS V_k^T.

    dS = scale * (U_k^T B)(A V_k) (k x k, float64 products), k = the module's rank r, or the
    factors' rank when the module is a full-rank projection; returned diagonal (k,) when that
    alone keeps the relative residual ||B A - U_k dS V_k^T||_F / ||B A||_F within ``tol`` (and
    the module's own dS, if known, is not full), else full (k, k); float32.

    Args:
        module: an expanded module of the factors' shape.
        factors: exact factors of its base weight.
        tol: the relative residual allowed.
        source: the adapter file, for messages.

    Raises:
        SubspaceError: the module is not in the subspace (names it and the residual).
    """
    energy = module.energy()
    ranks = list(dict.fromkeys(k for k in (module.rank, factors.rank) if k <= factors.rank))
    ranks = ranks or [factors.rank]
    full_only = module.ds is not None and module.ds.ndim == 2
    best = math.inf
    for k in ranks:
        f = factors.truncate(k)
        u, v = f.U.double(), f.V.double()
        c = ((u.T @ module.up.double()) @ (module.down.double() @ v)) * module.scale
        gu, gv = u.T @ u, v.T @ v
        diagonal = torch.diagonal(c)
        forms = [(c, c)] if full_only else [(torch.diag(diagonal), diagonal), (c, c)]
        for d, stored in forms:
            residual = max(_residual_sq(energy, c, d, gu, gv), 0.0)
            rel = math.sqrt(residual / energy) if energy > 0 else 0.0
            if rel <= tol:
                return stored.float().contiguous()
            best = min(best, rel)
    raise SubspaceError(
        f"not a LoRA-X of this base: its update leaves the base's top-{max(ranks)} singular "
        f"subspace (relative residual {best:.2e} > {tol:.0e})",
        path=source,
        key=module.name,
    )


def encode_compact(
    adapter: LoraAdapter,
    base_factors: Mapping[str, Factors],
    base_digests: Mapping[str, str] | None = None,
    *,
    tol: float = 1e-4,
) -> LoraAdapter:
    """The compact form of an adapter whose modules are LoRA-X of the given base.

    dS = scale * (U_k^T B)(A V_k), k = the module's rank r (or the factors' full rank when the
    module is a full-rank projection), computed in float64 from k x k products; the module must
    lie in the base's subspace: ||B A - U_k dS V_k^T||_F <= tol * ||B A||_F. dS is stored
    diagonal when that alone meets ``tol`` (and the module's own dS is not full), else full.

    Args:
        adapter: modules named by base module names (resolve them first).
        base_factors: base module name -> exact :class:`Factors` (at least r triplets).
        base_digests: base module name -> digest of the base weight as stored; default: each
            ``Factors.digest``.
        tol: relative residual allowed.

    Returns:
        A compact adapter (kind ``LORAX_COMPACT``) keeping the adapter's layout and config for
        decoding.

    Raises:
        MissingModuleError: no factors for a module. ShapeMismatchError: factors of another shape.
        SubspaceError: a module that is not in the base's subspace (names it and the residual).
        BaseMismatchError: a compact module whose digest differs from the given base's.
    """
    modules: dict[str, LoraModule] = {}
    for name, module in adapter.modules.items():
        factors, digest = _factors_for(name, module.shape, adapter, base_factors, base_digests)
        if module.is_compact:
            if module.base_digest != digest:
                raise BaseMismatchError(
                    f"compact module made for base {module.base_digest}, given base {digest}",
                    path=adapter.source,
                    key=name,
                )
            modules[name] = module
            continue
        ds = subspace_ds(module, factors, tol=tol, source=adapter.source)
        modules[name] = LoraModule.from_ds(
            name,
            ds,
            module.shape,
            digest,
            source_key=module.source_key,
            weight_shape=module.weight_shape,
        )
    layout, config = _expanded_layout(adapter)
    return LoraAdapter(
        modules=modules,
        kind=AdapterKind.LORAX_COMPACT,
        layout=AdapterLayout.COMPACT,
        config={"expanded_layout": layout.value, "expanded_config": dict(config)},
        metadata=dict(adapter.metadata),
        source=adapter.source,
    )


def _expanded_layout(adapter: LoraAdapter) -> tuple[AdapterLayout, Mapping[str, object]]:
    if adapter.layout is AdapterLayout.COMPACT:
        layout = AdapterLayout(str(adapter.config.get("expanded_layout", AdapterLayout.PEFT.value)))
        config = adapter.config.get("expanded_config", {})
        return layout, config if isinstance(config, Mapping) else {}
    return adapter.layout, adapter.config


def decode_compact(
    file_or_adapter: str | Path | LoraAdapter,
    base_factors: Mapping[str, Factors],
    base_digests: Mapping[str, str] | None = None,
) -> LoraAdapter:
    """Expand a compact LoRA-X against its base: up = U_r, down = dS V_r^T, scale 1.

    Args:
        file_or_adapter: a compact file, or an adapter of kind ``LORAX_COMPACT``.
        base_factors: base module name -> exact :class:`Factors` with at least r triplets.
        base_digests: base module name -> digest of the base weight; default ``Factors.digest``.

    Returns:
        An expanded adapter (kind ``LORAX``, ``ds`` and ``base_digest`` kept) in the layout and
        config the compact file recorded.

    Raises:
        BaseMismatchError: a module whose recorded base digest differs from the given base's
            (names the module and both digests).
        MissingModuleError, ShapeMismatchError: no factors, or factors of another shape.
    """
    if isinstance(file_or_adapter, LoraAdapter):
        compact = file_or_adapter
    else:
        tensor_file = read_safetensors(file_or_adapter)
        if not is_compact_file(tensor_file.metadata):
            raise UnknownLayoutError("not a compact LoRA-X file", path=file_or_adapter)
        compact = read_compact(tensor_file)
    if compact.kind is not AdapterKind.LORAX_COMPACT:
        raise ValueError("decode_compact needs a compact LoRA-X adapter")
    modules: dict[str, LoraModule] = {}
    for name, module in compact.modules.items():
        factors, digest = _factors_for(name, module.shape, compact, base_factors, base_digests)
        if module.base_digest != digest:
            raise BaseMismatchError(
                f"compact LoRA-X made for base tensor {module.base_digest}, but the given base's "
                f"tensor is {digest}",
                path=compact.source,
                key=name,
            )
        ds = module.ds
        assert ds is not None
        if module.rank > factors.rank:
            raise ShapeMismatchError(
                f"dS has rank {module.rank}, the base factors only {factors.rank} triplets",
                path=compact.source,
                key=name,
            )
        f = factors.truncate(module.rank)
        ds32 = ds.float()
        down = ds32[:, None] * f.V.T if ds32.ndim == 1 else ds32 @ f.V.T
        modules[name] = LoraModule(
            name=name,
            up=f.U.float().contiguous(),
            down=down.contiguous(),
            scale=1.0,
            ds=ds32,
            base_digest=module.base_digest,
            source_key=module.source_key,
            weight_shape=module.weight_shape,
        )
    layout, config = _expanded_layout(compact)
    return LoraAdapter(
        modules=modules,
        kind=AdapterKind.LORAX,
        layout=layout,
        config=dict(config),
        metadata=dict(compact.metadata),
        source=compact.source,
    )
