"""The MLflow Model Registry behind the :class:`~migrator.registry.base.Registry` Protocol.

Works with the embedded SQLite store (``sqlite:///...``) and with ``mlflow server`` over HTTP.
MLflow is imported on the first call that needs its client (seconds of start-up): which
versions changed is read by a probe that needs none (:mod:`migrator.registry.mlflow_probe`),
so a pass that finds nothing new never loads it.
MLflow's own HTTP retries are turned off: they re-send any request whose reply timed out, a
POST that creates a model version included, so a registry that committed and then answered too
late got a second version. This module's bounded retries decide instead: reads are retried as
they are, and a retried create first looks for the version an earlier try may have committed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from migrator.registry.base import (
    TRANSFER_IDENTITY,
    ModelVersionInfo,
    RegistryError,
    RegistryUnavailableError,
    RunInfo,
    Tag,
    VersionNotFoundError,
    VersionRef,
)
from migrator.registry.mlflow_errors import first_line, is_transient
from migrator.registry.mlflow_pages import MlflowPages
from migrator.registry.mlflow_probe import probe_for
from migrator.registry.mlflow_watch import MlflowWatch, quote_value, tag_clauses
from migrator.registry.retry import retry_call

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from migrator.settings import Settings

__all__ = ["MlflowRegistry", "is_transient"]

T = TypeVar("T")
log = logging.getLogger(__name__)


def _info(mv: ModelVersion) -> ModelVersionInfo:
    return ModelVersionInfo(
        name=mv.name,
        version=str(mv.version),
        tags=dict(mv.tags or {}),
        description=mv.description or "",
        run_id=mv.run_id or None,
        source=mv.source or "",
        created_ms=int(mv.creation_timestamp or 0),
        updated_ms=int(mv.last_updated_timestamp or 0),
    )


class MlflowRegistry(MlflowWatch, MlflowPages):
    """An MLflow tracking server or store plus its model registry.

    Args:
        tracking_uri: MLflow tracking URI (``sqlite:///...``, ``http://127.0.0.1:5000``...).
        registry_uri: registry URI (defaults to the tracking URI).
        artifact_root: artifact location used when this class creates the migration experiment.
        retries: retries of a call that fails transiently.
        backoff_s: first retry delay (doubles each retry).
    """

    def __init__(
        self,
        tracking_uri: str,
        registry_uri: str | None = None,
        *,
        artifact_root: str | None = None,
        retries: int = 5,
        backoff_s: float = 1.0,
    ) -> None:
        # MLflow retries HTTP calls 7 times with growing backoff by default (minutes), and
        # re-sends non-idempotent POSTs whose reply timed out. The retry policy is ours: none
        # of MLflow's, whatever the environment says.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # Over HTTP, MLflow prints "View run ... at: URL" on stdout when a run ends, which breaks
        # the CLI's one-JSON-document stdout (``migrator tick --json``). The version description
        # links the run.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self.artifact_root = artifact_root
        self.retries = retries
        self.backoff_s = backoff_s
        self._client: MlflowClient | None = None
        self._probe = probe_for(self.registry_uri)
        self._experiment_ids: dict[str, str] = {}

    @property
    def client(self) -> MlflowClient:
        """The MLflow client (MLflow is imported on first use)."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(
                tracking_uri=self.tracking_uri, registry_uri=self.registry_uri
            )
        return self._client

    @client.setter
    def client(self, value: Any) -> None:
        self._client = value

    @classmethod
    def from_settings(cls, settings: Settings) -> MlflowRegistry:
        """The registry the settings name (URIs, artifact root, retry policy)."""
        return cls(
            settings.tracking_uri,
            settings.registry_uri,
            artifact_root=settings.artifact_root,
            retries=settings.registry_retries,
            backoff_s=settings.registry_backoff_s,
        )

    def address(self) -> tuple[str, str]:
        """(tracking URI, registry URI): another process opens the same registry with them."""
        return (self.tracking_uri, self.registry_uri)

    def __repr__(self) -> str:
        return f"MlflowRegistry({self.tracking_uri!r}, {self.registry_uri!r})"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        from mlflow.exceptions import MlflowException

        try:
            return retry_call(
                fn,
                is_transient=is_transient,
                retries=self.retries,
                backoff_s=self.backoff_s,
                what=f"registry: {what}",
            )
        except MlflowException as exc:
            if str(exc.error_code) == "RESOURCE_DOES_NOT_EXIST":
                raise VersionNotFoundError(f"{what}: {exc.message}") from exc
            if is_transient(exc):
                raise RegistryUnavailableError(f"{what}: {exc.message}") from exc
            raise RegistryError(f"{what}: {exc.message}") from exc
        except Exception as exc:
            if is_transient(exc):
                raise RegistryUnavailableError(f"{what}: {exc}") from exc
            raise

    # --- reading -----------------------------------------------------------------------
    def _search_pages(self, filter_string: str | None) -> list[ModelVersionInfo]:
        """Every page of a model version search (no retries: callers wrap it)."""
        out: list[ModelVersionInfo] = []
        token: str | None = None
        while True:
            page = self.client.search_model_versions(
                filter_string=filter_string, max_results=1000, page_token=token
            )
            out.extend(_info(mv) for mv in page)
            token = page.token
            if not token:
                return out

    def _search(self, filter_string: str | None) -> list[ModelVersionInfo]:
        return self._call(
            f"search model versions ({filter_string or 'all'})",
            partial(self._search_pages, filter_string),
        )

    def list_versions(
        self, *, role: str | None = None, tags: Mapping[str, str] | None = None
    ) -> list[ModelVersionInfo]:
        wanted = {**({Tag.ROLE: role} if role is not None else {}), **(tags or {})}
        return self._search(" AND ".join(tag_clauses(wanted)) or None)

    def get_version(self, ref: VersionRef) -> ModelVersionInfo:
        return _info(
            self._call(f"get {ref}", lambda: self.client.get_model_version(ref.name, ref.version))
        )

    def find_version_by_tag(self, name: str, key: str, value: str) -> ModelVersionInfo | None:
        found = self._search(f"name = {quote_value(name)} AND tags.`{key}` = {quote_value(value)}")
        return min(found, key=lambda v: int(v.version)) if found else None

    @staticmethod
    def _tags_filter(name: str, tags: Mapping[str, str]) -> str:
        clauses = [f"name = {quote_value(name)}"]
        clauses += [f"tags.`{k}` = {quote_value(v)}" for k, v in tags.items()]
        return " AND ".join(clauses)

    def find_versions(self, name: str, tags: Mapping[str, str]) -> list[ModelVersionInfo]:
        found = self._search(self._tags_filter(name, tags))
        return sorted(found, key=lambda v: int(v.version))

    def download(self, ref: VersionRef, dst: Path) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        uri = self._call(
            f"resolve artifacts of {ref}",
            lambda: self.client.get_model_version_download_uri(ref.name, ref.version),
        )
        local = self._call(f"download artifacts of {ref}", partial(self._fetch, ref, uri, dst))
        return Path(local)

    def _fetch(self, ref: VersionRef, uri: str, dst: Path) -> str:
        """One download try. MLflow reports a transfer cut short (a server killed mid-download)
        as missing artifacts ("please ensure that the path is correct"); when the registry
        cannot be reached right after, it is an outage, raised as one."""
        import mlflow.artifacts

        try:
            return str(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=uri,
                    dst_path=str(dst),
                    tracking_uri=self.tracking_uri,
                    registry_uri=self.registry_uri,
                )
            )
        except Exception as exc:
            if str(getattr(exc, "error_code", "")) != "RESOURCE_DOES_NOT_EXIST":
                raise
            try:
                self.client.get_model_version(ref.name, ref.version)
            except Exception as probe:
                if is_transient(probe):
                    raise ConnectionError(
                        f"registry unreachable while downloading {ref} ({first_line(probe)})"
                    ) from exc
            raise

    # --- writing -----------------------------------------------------------------------
    def set_tags(self, ref: VersionRef, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._call(
                f"set tag {key} on {ref}",
                partial(self.client.set_model_version_tag, ref.name, ref.version, key, value),
            )

    def _experiment_id(self, name: str) -> str:
        if name in self._experiment_ids:
            return self._experiment_ids[name]
        exp = self._call(f"get experiment {name}", lambda: self.client.get_experiment_by_name(name))
        if exp is None:
            try:
                exp_id = self._call(
                    f"create experiment {name}",
                    lambda: self.client.create_experiment(
                        name, artifact_location=self.artifact_root
                    ),
                )
            except RegistryError:  # created meanwhile by another replica
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
        self._experiment_ids[name] = exp_id
        return exp_id

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
        from mlflow.entities import Metric, Param, RunStatus

        exp_id = self._experiment_id(experiment)
        runs = self._call(
            f"search runs of job {job_key}",
            lambda: self.client.search_runs(
                [exp_id], filter_string=f"tags.`{Tag.JOB}` = {quote_value(job_key)}"
            ),
        )
        # Job ids are unique only within one job database; several may share a registry (two
        # deployments, a database rebuilt). A run is this job's only if its tags (adapter,
        # target base) say so too.
        own = [r for r in runs if all(r.data.tags.get(k) == v for k, v in tags.items())]
        for run in own:
            if run.info.status == RunStatus.to_string(RunStatus.FINISHED):
                return RunInfo(run.info.run_id, exp_id)
        for run in own:  # left behind by a crash: mark it, then start afresh
            if run.info.status == RunStatus.to_string(RunStatus.RUNNING):
                self._call(
                    f"end stale run {run.info.run_id}",
                    partial(self.client.set_terminated, run.info.run_id, "KILLED"),
                )
        run = self._call(
            f"create run for job {job_key}",
            lambda: self.client.create_run(
                exp_id, tags={Tag.JOB: job_key, **tags}, run_name=run_name
            ),
        )
        run_id = run.info.run_id
        self._call(
            f"log params/metrics of run {run_id}",
            lambda: self.client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                params=[Param(k, str(v)[:6000]) for k, v in params.items()],
            ),
        )
        for artifact_path, local in artifacts.items():
            self._log_artifact(run_id, artifact_path, local)
        self._call(f"finish run {run_id}", lambda: self.client.set_terminated(run_id, "FINISHED"))
        return RunInfo(run_id, exp_id)

    def _log_artifact(self, run_id: str, artifact_path: str, local: Path) -> None:
        """A local file or folder as the run's artifact at ``artifact_path``."""
        if local.is_dir():
            self._call(
                f"log artifacts {artifact_path} of run {run_id}",
                partial(self.client.log_artifacts, run_id, str(local), artifact_path),
            )
            return
        parent = str(Path(artifact_path).parent)
        self._call(
            f"log artifact {artifact_path} of run {run_id}",
            partial(
                self.client.log_artifact, run_id, str(local), None if parent == "." else parent
            ),
        )

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
        tries = 0

        def create() -> ModelVersionInfo:
            nonlocal tries
            tries += 1
            if tries > 1 and Tag.JOB in identity:
                # The try before may have been committed with its reply lost (a timeout):
                # look before creating again.
                committed = self._search_pages(self._tags_filter(name, identity))
                if committed:
                    return min(committed, key=lambda v: int(v.version))
            return _info(
                self.client.create_model_version(
                    name,
                    source=f"runs:/{run.run_id}/{artifact_path}",
                    run_id=run.run_id,
                    tags=dict(tags),
                    description=description,
                )
            )

        return self._call(f"register a version of {name}", create)

    def version_link(self, ref: VersionRef) -> str:
        return f"#/models/{quote(ref.name, safe='')}/versions/{ref.version}"

    def run_link(self, run: RunInfo) -> str:
        # The UI opens in its GenAI layout unless told otherwise: a migration run is training.
        return f"#/experiments/{run.experiment_id}/runs/{run.run_id}?workflowType=machine_learning"
