"""What the registry holds right now, and who supersedes whom.

Succession rules (DESIGN.md, registry conventions): a new version of a base registered model
deprecates its earlier versions; ``lorax.supersedes=name/version[,...]`` names other
predecessors (a distilled successor under another name). A base version whose weights cannot be
used neither deprecates nor is deprecated by it: bad content affects nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace

from db.enums import AdapterFormat
from migrator.registry import (
    ROLE_ADAPTER,
    ROLE_BASE,
    ModelVersionInfo,
    Registry,
    Tag,
    VersionRef,
)

__all__ = [
    "AdapterEntry",
    "Snapshot",
    "adapter_entry",
    "parse_refs",
    "read_lineages",
    "read_registry",
]


def parse_refs(raw: str) -> tuple[list[VersionRef], list[str]]:
    """The ``name/version`` entries of a comma-separated tag value (``lorax.supersedes``):
    (references in order, entries that are not ``name/version``)."""
    refs, bad = [], []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        try:
            refs.append(VersionRef.parse(part))
        except ValueError:
            bad.append(part)
    return refs, bad


@dataclass(frozen=True)
class AdapterEntry:
    """An adapter version as the registry describes it."""

    info: ModelVersionInfo
    base: VersionRef | None
    format: AdapterFormat

    @property
    def ref(self) -> VersionRef:
        return self.info.ref

    @property
    def lineage(self) -> str:
        """The lineage of an adapter is its registered model."""
        return self.info.name

    @property
    def transferred(self) -> bool:
        return Tag.TRANSFERRED_FROM in self.info.tags


@dataclass
class Snapshot:
    """Base and adapter versions in the registry, and the problems found reading them.

    Every base version is read; the adapter versions are those of every lineage when
    ``complete``, else those of the registered models in ``lineages_read`` (all their versions).
    """

    bases: dict[VersionRef, ModelVersionInfo]
    adapters: dict[VersionRef, AdapterEntry]
    problems: list[str] = field(default_factory=list)
    complete: bool = True
    lineages_read: frozenset[str] = frozenset()

    def with_lineages(self, other: Snapshot) -> Snapshot:
        """This snapshot with ``other``'s bases, and ``other``'s versions of the lineages it
        read in place of these."""
        kept = {r: e for r, e in self.adapters.items() if r.name not in other.lineages_read}
        return replace(self, bases=other.bases, adapters={**kept, **other.adapters})

    def drop_marked_duplicates(self) -> None:
        """Leave out the versions the reconciler tagged as doubling another."""
        for ref in [r for r, e in self.adapters.items() if Tag.DUPLICATE_OF in e.info.tags]:
            del self.adapters[ref]

    def direct_predecessors(self, ref: VersionRef) -> list[VersionRef]:
        """Earlier versions of the same registered model, then those ``lorax.supersedes`` names."""
        earlier = [
            other
            for other in self.bases
            if other.name == ref.name and int(other.version) < int(ref.version)
        ]
        refs, _ = parse_refs(self.bases[ref].tags.get(Tag.SUPERSEDES, ""))  # bad: reported
        named = [other for other in refs if other != ref and other in self.bases]
        return sorted(set(earlier)) + [n for n in named if n not in earlier]

    def successions(
        self, usable: Callable[[VersionRef], bool]
    ) -> dict[VersionRef, list[VersionRef]]:
        """Active targets -> every predecessor they deprecate (transitively), newest first.

        A target is a base version no usable base version supersedes. Unusable versions are
        targets too (their jobs end skipped with the reason) but deprecate nothing.
        """
        superseded: set[VersionRef] = set()
        for ref in self.bases:
            if usable(ref):
                superseded.update(self.direct_predecessors(ref))
        out: dict[VersionRef, list[VersionRef]] = {}
        for ref in sorted(self.bases):
            if ref in superseded:
                continue
            seen: list[VersionRef] = []
            stack = list(self.direct_predecessors(ref))
            while stack:
                p = stack.pop()
                if p in seen or p == ref:
                    continue
                seen.append(p)
                stack.extend(self.direct_predecessors(p))
            seen.sort(key=lambda r: (r.name != ref.name, -int(r.version), r.name))
            out[ref] = seen
        return out

    def ghost_bases(self) -> set[VersionRef]:
        """Bases that adapters name but the registry does not hold."""
        return {a.base for a in self.adapters.values() if a.base and a.base not in self.bases}

    def lineages(self) -> dict[str, list[AdapterEntry]]:
        out: dict[str, list[AdapterEntry]] = {}
        for entry in self.adapters.values():
            out.setdefault(entry.lineage, []).append(entry)
        return out


def adapter_entry(info: ModelVersionInfo, problems: list[str] | None = None) -> AdapterEntry | None:
    """The adapter version as its tags describe it; None when ``lorax.base`` is not a base
    reference. What is wrong with its tags is added to ``problems``."""
    problems = [] if problems is None else problems
    raw_base = info.tags.get(Tag.BASE, "")
    try:
        base = VersionRef.parse(raw_base)
    except ValueError:
        problems.append(
            f"adapter {info.ref}: tag {Tag.BASE}={raw_base!r} is not a base name/version; ignored"
        )
        return None
    raw_format = info.tags.get(Tag.FORMAT, AdapterFormat.LORA.value)
    try:
        fmt = AdapterFormat(raw_format)
    except ValueError:
        problems.append(
            f"adapter {info.ref}: unknown {Tag.FORMAT}={raw_format!r} "
            f"(expected {', '.join(f.value for f in AdapterFormat)}); read as its files say"
        )
        fmt = AdapterFormat.LORA
    return AdapterEntry(info, base, fmt)


def _snapshot(
    base_infos: Iterable[ModelVersionInfo], adapter_infos: Iterable[ModelVersionInfo]
) -> Snapshot:
    problems: list[str] = []
    bases = {v.ref: v for v in base_infos if v.version.isdigit()}
    for info in bases.values():
        refs, bad = parse_refs(info.tags.get(Tag.SUPERSEDES, ""))
        problems += [
            f"base {info.ref}: {Tag.SUPERSEDES} entry {p!r} is not name/version" for p in bad
        ]
        for named in refs:
            if named not in bases:
                problems.append(
                    f"base {info.ref}: supersedes {named}, which is not a registered base"
                )
    adapters: dict[VersionRef, AdapterEntry] = {}
    for info in adapter_infos:
        entry = adapter_entry(info, problems)
        if entry is not None:
            adapters[entry.ref] = entry
    for entry in adapters.values():
        if entry.base is not None and entry.base not in bases:
            problems.append(f"adapter {entry.ref}: its base {entry.base} is not in the registry")
    return Snapshot(bases, adapters, problems)


def read_registry(registry: Registry) -> Snapshot:
    """Read every base and adapter version (two searches) into a :class:`Snapshot`."""
    return _snapshot(
        registry.list_versions(role=ROLE_BASE), registry.list_versions(role=ROLE_ADAPTER)
    )


def read_lineages(registry: Registry, names: Collection[str]) -> Snapshot:
    """Read every base version, and the adapter versions of the registered models ``names``
    only (an incomplete :class:`Snapshot`)."""
    bases = registry.list_versions(role=ROLE_BASE)
    adapters = registry.list_model_versions(names, role=ROLE_ADAPTER) if names else []
    snapshot = _snapshot(bases, adapters)
    snapshot.complete, snapshot.lineages_read = False, frozenset(names)
    return snapshot
