"""``migrator lineage``: where an adapter version came from and what was made from it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer
from rich.tree import Tree

from migrator.cli.common import EXIT_BAD_INPUT, JSON_OPTION, emit_json, fail, guarded, out
from migrator.cli.jobdb import did_you_mean, open_job_db

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from db import AdapterVersion

__all__ = ["lineage_command"]


def _versions_of(name: str, session: Session) -> list[AdapterVersion]:
    from sqlalchemy import select

    from db import AdapterVersion

    rows = session.scalars(select(AdapterVersion).where(AdapterVersion.name == name)).all()
    return sorted(rows, key=lambda a: int(a.version) if a.version.isdigit() else 0)


def _parent_of(adapter_id: int, session: Session) -> tuple[str, int | None] | None:
    from sqlalchemy import select

    from db import Lineage

    edge = session.scalars(select(Lineage).where(Lineage.child_id == adapter_id)).first()
    return None if edge is None else (edge.parent.ref, edge.job_id)


def _lineage_of_name(name: str, session: Session) -> dict[str, Any] | None:
    versions = _versions_of(name, session)
    if not versions:
        return None
    rows = []
    for v in versions:
        parent = _parent_of(v.id, session)
        rows.append(
            {
                "version": v.ref,
                "base": v.base.ref,
                "origin": v.origin.value,
                "parent": parent and parent[0],
                "job": parent and parent[1],
            }
        )
    return {"name": name, "versions": rows}


def _lineage_of_version(adapter: AdapterVersion, session: Session) -> dict[str, Any]:
    from db import ancestors, descendants

    def edges(entries: list[Any]) -> list[dict[str, Any]]:
        return [
            {"version": e.adapter.ref, "base": e.adapter.base.ref, "depth": e.depth}
            for e in entries
        ]

    return {
        "version": adapter.ref,
        "base": adapter.base.ref,
        "origin": adapter.origin.value,
        "ancestors": edges(ancestors(adapter.id, session=session)),
        "descendants": edges(descendants(adapter.id, session=session)),
    }


def _print_lineage(what: str, doc: dict[str, Any]) -> None:
    if "versions" not in doc:
        chain = [*reversed(doc["ancestors"]), {"version": doc["version"], "base": doc["base"]}]
        out.print(" -> ".join(f"{c['version']} ({c['base']})" for c in chain), highlight=False)
        for d in doc["descendants"]:
            out.print(f"{'  ' * int(d['depth'])}└ {d['version']} ({d['base']})", highlight=False)
        return
    children: dict[str | None, list[dict[str, object]]] = {}
    for v in doc["versions"]:
        children.setdefault(v["parent"], []).append(v)
    tree = Tree(f"[bold]{what}[/]")

    def grow(node: Tree, parent: str | None) -> None:
        for v in children.get(parent, []):
            label = f"{v['version']} on {v['base']} ({v['origin']}"
            label += f", job {v['job']})" if v["job"] else ")"
            grow(node.add(label), str(v["version"]))

    grow(tree, None)
    out.print(tree)


def _known_names(session: Session) -> list[str]:
    from sqlalchemy import select

    from db import AdapterVersion

    return list(session.scalars(select(AdapterVersion.name).distinct()))


@guarded
def lineage_command(
    what: str = typer.Argument(..., help="An adapter registered model NAME, or NAME/VERSION."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Where an adapter version came from and what was made from it (across bases)."""
    from db import find_adapter_version, session_scope
    from migrator.registry import VersionRef

    db = open_job_db(read_only=True)
    try:
        ref: VersionRef | None = VersionRef.parse(what)
    except ValueError:
        ref = None
    with session_scope(db.sessions) as session:
        adapter = None
        if ref is not None:  # else a name that merely ends in /<digits>
            adapter = find_adapter_version(ref.name, ref.version, session=session)
        doc = (
            _lineage_of_version(adapter, session)
            if adapter is not None
            else _lineage_of_name(what, session)
        )
        known = _known_names(session) if doc is None else []
    if doc is None:
        hint = did_you_mean(ref.name if ref is not None else what, known)
        if not known:
            hint = ": it knows no adapter yet (has a pass run against this registry?)"
        fail(f"no adapter named {what!r} in {db.where}{hint}", EXIT_BAD_INPUT)
    if as_json:
        emit_json(doc)
    else:
        _print_lineage(what, doc)
