"""LoRA-X core: factorize base weights, compare bases, transfer adapters, read and write them.

A plain library (torch, safetensors, numpy, POT). See ``core/README.md`` for the map.
"""

from core.adapter import AdapterKind, AdapterLayout, LoraAdapter, LoraModule
from core.atc import ATCResult, Combine, compute_atc, solve_transport
from core.digest import bytes_digest, tensor_digest
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
    TransportError,
    UnknownLayoutError,
)
from core.factor_cache import CacheStats, FactorCache
from core.factorize import FactorStore, FactorView, factorize, factorize_batch, resolve_device
from core.factors import Factors, canonical_signs
from core.matching import Decision, ModuleDecision, match_modules
from core.projection import (
    ModuleTransfer,
    TransferMode,
    needs_source_factors,
    project_pair,
    transfer_module,
)
from core.selection import DEFAULT_PATTERNS, ModuleSelector, RoleRule, role_of
from core.similarity import (
    ModuleRef,
    pair_validity,
    side_validity,
    similarity_matrix,
    subspace_similarity,
    subspace_similarity_batch,
    weighted_subspace_similarity,
)
from core.transfer import ModuleReport, TransferResult, transfer_adapter
from core.weights import ModuleInfo, WeightSource

__all__ = [
    "DEFAULT_PATTERNS",
    "ATCResult",
    "AdapterKind",
    "AdapterLayout",
    "BaseMismatchError",
    "CacheStats",
    "Combine",
    "CorruptFileError",
    "Decision",
    "FactorCache",
    "FactorStore",
    "FactorView",
    "FactorizationError",
    "Factors",
    "InputError",
    "LoraAdapter",
    "LoraModule",
    "LoraxError",
    "MissingModuleError",
    "ModuleDecision",
    "ModuleInfo",
    "ModuleRef",
    "ModuleReport",
    "ModuleSelector",
    "ModuleTransfer",
    "NonFiniteError",
    "PickleRefusedError",
    "RoleRule",
    "ShapeMismatchError",
    "TransferMode",
    "TransferResult",
    "TransportError",
    "UnknownLayoutError",
    "WeightSource",
    "bytes_digest",
    "canonical_signs",
    "compute_atc",
    "factorize",
    "factorize_batch",
    "match_modules",
    "needs_source_factors",
    "pair_validity",
    "project_pair",
    "resolve_device",
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
]

# --- formats / training (core.formats, core.training): the other engineer appends below. ---
# Import their names here and extend ``__all__`` with ``__all__ += [...]``; keep the math
# section above unchanged.
from core.errors import SubspaceError, UnpairedTensorError
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
from core.training import (
    LoraXLinear,
    constrain_lorax_,
    export_lorax,
    inject_lorax,
    load_lorax,
    lorax_layers,
)

__all__ += [
    "COMPACT_FORMAT",
    "COMPACT_VERSION",
    "CoverageReport",
    "LoraXLinear",
    "MatchRule",
    "ModuleMatch",
    "SubspaceError",
    "UnmatchedModule",
    "UnmatchedReason",
    "UnpairedTensorError",
    "constrain_lorax_",
    "decode_compact",
    "detect_layout",
    "encode_compact",
    "export_lorax",
    "inject_lorax",
    "load_lorax",
    "lorax_layers",
    "read_adapter",
    "resolve_modules",
    "write_adapter",
]
