"""The small vocabularies stored in the job database (besides :class:`~db.status.JobStatus`).

``AdapterFormat`` and ``AdapterLayout`` carry the same values as ``core.adapter.AdapterKind`` and
``core.adapter.AdapterLayout`` (a test keeps them equal); they are repeated here so that ``db``
does not import torch through ``core``.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "AdapterFormat",
    "AdapterLayout",
    "AdapterOrigin",
    "AuditAction",
    "BaseStatus",
    "RegistryAction",
]


class BaseStatus(StrEnum):
    """A base model version's standing."""

    ACTIVE = "active"
    DEPRECATED = "deprecated"  # superseded by a newer base; its adapters are transfer sources
    MISSING = "missing"  # named by an adapter's lorax.base tag but absent from the registry


class AdapterFormat(StrEnum):
    """The registry's ``lorax.format`` tag."""

    LORA = "lora"
    LORAX = "lorax"
    LORAX_COMPACT = "lorax-compact"


class AdapterLayout(StrEnum):
    """How an adapter's files are laid out."""

    PEFT = "peft"
    KOHYA = "kohya"
    DIFFUSERS = "diffusers"
    COMPACT = "compact"


class AdapterOrigin(StrEnum):
    """Where an adapter version came from."""

    REGISTERED = "registered"  # registered by a person or another system
    TRANSFERRED = "transferred"  # produced by a transfer job of this service


class AuditAction(StrEnum):
    """What an audit row records. Every approval, rejection, force and retry writes one."""

    APPROVE = (
        "approve"  # pending_approval -> approved by an admin, or planned -> approved by policy
    )
    REJECT = "reject"  # pending_approval -> rejected by an admin
    FORCE = "force"  # skipped|rejected -> approved by an admin
    RETRY = "retry"  # failed -> approved, automatic (actor "system") or by an admin
    POLICY = "policy"  # planned -> pending_approval|skipped by the ATC policy


class RegistryAction(StrEnum):
    """What a registry event row records."""

    # A version that doubles another one (same lineage, source and target) was tagged
    # ``lorax.duplicate_of`` with the version kept, and the job database points at the kept one.
    DUPLICATE_MARKED = "duplicate_marked"
