"""LoRA-X core: factorize base weights, compare bases, transfer adapters, read and write them.

A plain library (torch, safetensors, numpy, POT). See ``core/README.md`` for the map.

Names are imported on first use, so ``import core.errors`` (or ``from core import InputError``)
does not load torch and POT. The function ``factorize`` lives in ``core.factorize`` (the module
of the same name): ``from core.factorize import factorize``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.adapter import (
        AdapterKind,
        AdapterLayout,
        LoraAdapter,
        LoraModule,
    )
    from core.atc import (
        ATCResult,
        Combine,
        compute_atc,
        solve_transport,
    )
    from core.digest import (
        bytes_digest,
        tensor_digest,
    )
    from core.errors import (
        BaseMismatchError,
        CorruptFileError,
        FactorizationError,
        InputError,
        LoraxError,
        MissingModuleError,
        NonFiniteError,
        PickleRefusedError,
        ShapeMismatchError,
        SubspaceError,
        TransportError,
        UnknownLayoutError,
        UnpairedTensorError,
    )
    from core.factor_cache import (
        CacheStats,
        FactorCache,
    )
    from core.factorize import (
        FactorStore,
        FactorView,
        factorize_batch,
        resolve_device,
    )
    from core.factors import (
        Factors,
        canonical_signs,
    )
    from core.formats import (
        COMPACT_FORMAT,
        COMPACT_VERSION,
        CoverageReport,
        MatchRule,
        ModuleMatch,
        UnmatchedModule,
        UnmatchedReason,
        decode_compact,
        detect_layout,
        encode_compact,
        read_adapter,
        resolve_modules,
        write_adapter,
    )
    from core.matching import (
        Decision,
        ModuleDecision,
        match_modules,
    )
    from core.projection import (
        ModuleTransfer,
        TransferMode,
        needs_source_factors,
        project_pair,
        transfer_module,
    )
    from core.selection import (
        DEFAULT_PATTERNS,
        ModuleSelector,
        RoleRule,
        role_of,
    )
    from core.similarity import (
        ModuleRef,
        pair_validity,
        side_validity,
        similarity_matrix,
        subspace_similarity,
        subspace_similarity_batch,
        weighted_subspace_similarity,
    )
    from core.training import (
        LoraXLinear,
        constrain_lorax_,
        export_lorax,
        inject_lorax,
        load_lorax,
        lorax_layers,
    )
    from core.transfer import (
        ModuleReport,
        TransferResult,
        transfer_adapter,
    )
    from core.weights import (
        ModuleInfo,
        WeightSource,
    )

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "ATCResult": "core.atc",
    "AdapterKind": "core.adapter",
    "AdapterLayout": "core.adapter",
    "BaseMismatchError": "core.errors",
    "COMPACT_FORMAT": "core.formats",
    "COMPACT_VERSION": "core.formats",
    "CacheStats": "core.factor_cache",
    "Combine": "core.atc",
    "CorruptFileError": "core.errors",
    "CoverageReport": "core.formats",
    "DEFAULT_PATTERNS": "core.selection",
    "Decision": "core.matching",
    "FactorCache": "core.factor_cache",
    "FactorStore": "core.factorize",
    "FactorView": "core.factorize",
    "FactorizationError": "core.errors",
    "Factors": "core.factors",
    "InputError": "core.errors",
    "LoraAdapter": "core.adapter",
    "LoraModule": "core.adapter",
    "LoraXLinear": "core.training",
    "LoraxError": "core.errors",
    "MatchRule": "core.formats",
    "MissingModuleError": "core.errors",
    "ModuleDecision": "core.matching",
    "ModuleInfo": "core.weights",
    "ModuleMatch": "core.formats",
    "ModuleRef": "core.similarity",
    "ModuleReport": "core.transfer",
    "ModuleSelector": "core.selection",
    "ModuleTransfer": "core.projection",
    "NonFiniteError": "core.errors",
    "PickleRefusedError": "core.errors",
    "RoleRule": "core.selection",
    "ShapeMismatchError": "core.errors",
    "SubspaceError": "core.errors",
    "TransferMode": "core.projection",
    "TransferResult": "core.transfer",
    "TransportError": "core.errors",
    "UnknownLayoutError": "core.errors",
    "UnmatchedModule": "core.formats",
    "UnmatchedReason": "core.formats",
    "UnpairedTensorError": "core.errors",
    "WeightSource": "core.weights",
    "bytes_digest": "core.digest",
    "canonical_signs": "core.factors",
    "compute_atc": "core.atc",
    "constrain_lorax_": "core.training",
    "decode_compact": "core.formats",
    "detect_layout": "core.formats",
    "encode_compact": "core.formats",
    "export_lorax": "core.training",
    "factorize_batch": "core.factorize",
    "inject_lorax": "core.training",
    "load_lorax": "core.training",
    "lorax_layers": "core.training",
    "match_modules": "core.matching",
    "needs_source_factors": "core.projection",
    "pair_validity": "core.similarity",
    "project_pair": "core.projection",
    "read_adapter": "core.formats",
    "resolve_device": "core.factorize",
    "resolve_modules": "core.formats",
    "role_of": "core.selection",
    "side_validity": "core.similarity",
    "similarity_matrix": "core.similarity",
    "solve_transport": "core.atc",
    "subspace_similarity": "core.similarity",
    "subspace_similarity_batch": "core.similarity",
    "tensor_digest": "core.digest",
    "transfer_adapter": "core.transfer",
    "transfer_module": "core.projection",
    "weighted_subspace_similarity": "core.similarity",
    "write_adapter": "core.formats",
}

__all__ = [
    "COMPACT_FORMAT",
    "COMPACT_VERSION",
    "DEFAULT_PATTERNS",
    "ATCResult",
    "AdapterKind",
    "AdapterLayout",
    "BaseMismatchError",
    "CacheStats",
    "Combine",
    "CorruptFileError",
    "CoverageReport",
    "Decision",
    "FactorCache",
    "FactorStore",
    "FactorView",
    "FactorizationError",
    "Factors",
    "InputError",
    "LoraAdapter",
    "LoraModule",
    "LoraXLinear",
    "LoraxError",
    "MatchRule",
    "MissingModuleError",
    "ModuleDecision",
    "ModuleInfo",
    "ModuleMatch",
    "ModuleRef",
    "ModuleReport",
    "ModuleSelector",
    "ModuleTransfer",
    "NonFiniteError",
    "PickleRefusedError",
    "RoleRule",
    "ShapeMismatchError",
    "SubspaceError",
    "TransferMode",
    "TransferResult",
    "TransportError",
    "UnknownLayoutError",
    "UnmatchedModule",
    "UnmatchedReason",
    "UnpairedTensorError",
    "WeightSource",
    "bytes_digest",
    "canonical_signs",
    "compute_atc",
    "constrain_lorax_",
    "decode_compact",
    "detect_layout",
    "encode_compact",
    "export_lorax",
    "factorize_batch",
    "inject_lorax",
    "load_lorax",
    "lorax_layers",
    "match_modules",
    "needs_source_factors",
    "pair_validity",
    "project_pair",
    "read_adapter",
    "resolve_device",
    "resolve_modules",
    "role_of",
    "side_validity",
    "similarity_matrix",
    "solve_transport",
    "subspace_similarity",
    "subspace_similarity_batch",
    "tensor_digest",
    "transfer_adapter",
    "transfer_module",
    "weighted_subspace_similarity",
    "write_adapter",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
