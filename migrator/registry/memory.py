"""An in-memory registry with the same behaviour as the MLflow one, for unit tests.

Artifacts live in a local folder. Faults, to exercise outage handling without a server:
``fail_next`` makes the next calls raise :class:`RegistryUnavailableError`; ``drop_replies``
makes the next ``create_version`` calls commit the version and then raise it (the registry
committed, its reply was lost: a timeout).

Update times follow MLflow's: a version's moves when it is created or described, not when a
tag or an alias is set (:meth:`changed_since`); the clock here only moves forward.
"""

from __future__ import annotations

import itertools
import shutil
import time
from collections.abc import Collection, Mapping
from dataclasses import replace
from pathlib import Path

from migrator.registry.base import (
    TRANSFER_IDENTITY,
    ModelVersionInfo,
    RegistryUnavailableError,
    RunInfo,
    Tag,
    VersionNotFoundError,
    VersionRef,
    VersionStamp,
)
from migrator.registry.pages import RegisteredModelInfo

__all__ = ["MemoryRegistry"]


class MemoryRegistry:
    """Model versions and runs held in dictionaries; artifacts copied under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions: dict[VersionRef, ModelVersionInfo] = {}
        self.runs: dict[str, dict[str, object]] = {}
        self._run_ids = itertools.count(1)
        self.fail_next = 0
        self.drop_replies = 0
        self.calls: list[str] = []
        self.models: dict[str, RegisteredModelInfo] = {}
        self._clock_ms = 0

    def _now_ms(self) -> int:
        """Milliseconds since the epoch, later than every time handed out before."""
        self._clock_ms = max(int(time.time() * 1000), self._clock_ms + 1)
        return self._clock_ms

    def _enter(self, what: str) -> None:
        self.calls.append(what)
        if self.fail_next > 0:
            self.fail_next -= 1
            raise RegistryUnavailableError(f"{what}: registry unreachable (simulated)")

    # --- test helpers ------------------------------------------------------------------
    def add_version(
        self, name: str, files: Path | None, tags: Mapping[str, str], description: str = ""
    ) -> ModelVersionInfo:
        """Register ``files`` (a file or folder, or None for no artifacts) as a new version."""
        version = str(1 + max((int(r.version) for r in self.versions if r.name == name), default=0))
        dest = self.root / "versions" / name / version
        dest.mkdir(parents=True, exist_ok=True)
        if files is not None:
            if files.is_dir():
                shutil.copytree(files, dest, dirs_exist_ok=True)
            else:
                shutil.copy2(files, dest / files.name)
        info = ModelVersionInfo(
            name=name,
            version=version,
            tags=dict(tags),
            description=description,
            source=dest.as_uri(),
            created_ms=(now := self._now_ms()),
            updated_ms=now,
        )
        self.versions[info.ref] = info
        return info

    # --- the Registry protocol ---------------------------------------------------------
    def list_versions(
        self, *, role: str | None = None, tags: Mapping[str, str] | None = None
    ) -> list[ModelVersionInfo]:
        self._enter("list_versions")
        wanted = {**(tags or {}), **({Tag.ROLE: role} if role is not None else {})}
        return [
            v for v in self.versions.values() if all(v.tags.get(k) == x for k, x in wanted.items())
        ]

    def list_model_versions(
        self, names: Collection[str], *, role: str | None = None
    ) -> list[ModelVersionInfo]:
        self._enter("list_model_versions")
        chosen = set(names)
        return [
            v
            for v in self.versions.values()
            if v.name in chosen and (role is None or v.tags.get(Tag.ROLE) == role)
        ]

    def changed_since(self, since_ms: int) -> list[VersionStamp]:
        self._enter("changed_since")
        stamps = [
            VersionStamp(v.name, v.version, v.updated_ms)
            for v in self.versions.values()
            if v.updated_ms >= since_ms
        ]
        return sorted(stamps, key=lambda s: s.updated_ms, reverse=True)

    def get_version(self, ref: VersionRef) -> ModelVersionInfo:
        self._enter(f"get_version {ref}")
        try:
            return self.versions[ref]
        except KeyError:
            raise VersionNotFoundError(f"model version {ref} not found") from None

    def set_tags(self, ref: VersionRef, tags: Mapping[str, str]) -> None:
        self._enter(f"set_tags {ref}")
        info = self.get_version(ref)
        self.versions[ref] = ModelVersionInfo(**{**info.__dict__, "tags": {**info.tags, **tags}})

    def delete_version(self, ref: VersionRef) -> None:
        """Delete a version (not in the Protocol: people delete, the service never does). As
        in MLflow, it is gone from every search, :meth:`changed_since` included."""
        self._enter(f"delete {ref}")
        self.get_version(ref)
        del self.versions[ref]

    def download(self, ref: VersionRef, dst: Path) -> Path:
        self._enter(f"download {ref}")
        info = self.get_version(ref)
        src = Path(info.source.removeprefix("file://"))
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return dst

    def find_version_by_tag(self, name: str, key: str, value: str) -> ModelVersionInfo | None:
        self._enter(f"find_version_by_tag {name}")
        found = [v for v in self.versions.values() if v.name == name and v.tags.get(key) == value]
        return min(found, key=lambda v: int(v.version)) if found else None

    def find_versions(self, name: str, tags: Mapping[str, str]) -> list[ModelVersionInfo]:
        self._enter(f"find_versions {name}")
        found = [
            v
            for v in self.versions.values()
            if v.name == name and all(v.tags.get(k) == value for k, value in tags.items())
        ]
        return sorted(found, key=lambda v: int(v.version))

    def log_run(
        self,
        *,
        experiment: str,
        run_name: str,
        job_key: str,
        params: Mapping[str, str],
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
        artifacts: Mapping[str, Path],
    ) -> RunInfo:
        self._enter(f"log_run {job_key}")
        for run_id, run in self.runs.items():
            if run["job"] == job_key and run["tags"] == dict(tags):  # same job, same transfer
                return RunInfo(run_id, experiment)
        run_id = f"run{next(self._run_ids)}"
        dest = self.root / "runs" / run_id
        for artifact_path, local in artifacts.items():
            target = dest / artifact_path
            if local.is_dir():
                shutil.copytree(local, target, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(local, target)
        self.runs[run_id] = {
            "job": job_key,
            "name": run_name,
            "params": dict(params),
            "metrics": dict(metrics),
            "tags": dict(tags),
            "dir": dest,
        }
        return RunInfo(run_id, experiment)

    def create_version(
        self,
        *,
        name: str,
        run: RunInfo,
        artifact_path: str,
        tags: Mapping[str, str],
        description: str,
    ) -> ModelVersionInfo:
        identity = {k: tags[k] for k in (Tag.JOB, *TRANSFER_IDENTITY) if k in tags}
        if Tag.JOB in identity and (existing := self.find_versions(name, identity)):
            return existing[0]
        self._enter(f"create_version {name}")
        src = Path(str(self.runs[run.run_id]["dir"])) / artifact_path
        info = self.add_version(name, src, tags, description)
        info = ModelVersionInfo(**{**info.__dict__, "run_id": run.run_id})
        self.versions[info.ref] = info
        if self.drop_replies > 0:  # committed; the caller never hears of it
            self.drop_replies -= 1
            raise RegistryUnavailableError(f"create_version {name}: reply lost (simulated)")
        return info

    def address(self) -> None:
        """None: this registry lives in this process only."""
        return None

    def version_link(self, ref: VersionRef) -> str:
        return f"#/models/{ref.name}/versions/{ref.version}"

    def run_link(self, run: RunInfo) -> str:
        return f"#/experiments/{run.experiment_id}/runs/{run.run_id}"

    # --- RegistryPages -----------------------------------------------------------------
    def _model(self, name: str) -> RegisteredModelInfo:
        return self.models.get(name) or RegisteredModelInfo(name)

    def list_models(self) -> list[RegisteredModelInfo]:
        self._enter("list_models")
        names = sorted({r.name for r in self.versions} | set(self.models))
        return [self._model(n) for n in names]

    def find_models(self, names: Collection[str]) -> list[RegisteredModelInfo]:
        self._enter("find_models")
        held = {r.name for r in self.versions} | set(self.models)
        return [self._model(n) for n in sorted(set(names) & held)]

    def set_version_description(self, ref: VersionRef, description: str) -> None:
        self._enter(f"describe {ref}")
        info = self.get_version(ref)
        self.versions[ref] = replace(info, description=description, updated_ms=self._now_ms())

    def set_model_description(self, name: str, description: str) -> None:
        self._enter(f"describe model {name}")
        self.models[name] = replace(self._model(name), description=description)

    def set_model_tags(self, name: str, tags: Mapping[str, str]) -> None:
        self._enter(f"tag model {name}")
        model = self._model(name)
        self.models[name] = replace(model, tags={**model.tags, **tags})

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._enter(f"set alias {alias} of {name}")
        self.get_version(VersionRef(name, version))
        model = self._model(name)
        self.models[name] = replace(model, aliases={**model.aliases, alias: version})

    def delete_alias(self, name: str, alias: str) -> None:
        self._enter(f"delete alias {alias} of {name}")
        model = self._model(name)
        aliases = {k: v for k, v in model.aliases.items() if k != alias}
        self.models[name] = replace(model, aliases=aliases)

    def prepare_experiment(self, name: str) -> None:
        """Nothing to prepare: runs live in a dictionary."""
