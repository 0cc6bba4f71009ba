"""The README and deploy/ say true things: every setting is documented, the registration example
runs, the deploy files parse and set only real settings, the image installs like `make`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from migrator.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SETTINGS = {f"MIGRATOR_{name.upper()}" for name in Settings.model_fields} | {"MIGRATOR_CONFIG"}


def test_every_setting_is_in_the_readme_table() -> None:
    table = README[README.index("<!-- settings-table") :]
    documented = set(re.findall(r"^\| `(MIGRATOR_[A-Z_]+)` \|", table, flags=re.M))
    assert documented, "the settings table was not found"
    assert documented == SETTINGS, (
        f"missing from README: {sorted(SETTINGS - documented)}; "
        f"not settings: {sorted(documented - SETTINGS)}"
    )


def test_readme_names_the_two_commands_and_ci_runs_one() -> None:
    assert "make demo" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_registration_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    example = next(b for b in blocks if "create_model_version" in b)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = example.replace('"http://127.0.0.1:5000"', repr(uri))
    for folder in ("models/minilm", "adapters/docs"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "weights.safetensors").write_bytes(b"x")
    code += (
        "\nfrom migrator.registry.mlflow_registry import MlflowRegistry\n"
        f"r = MlflowRegistry({uri!r}, retries=0)\n"
        "assert [str(v.ref) for v in r.list_versions(role='base')] == ['minilm/1']\n"
        "assert r.list_versions(role='adapter')[0].tags['lorax.base'] == 'minilm/1'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def _deploy_yaml() -> list[Path]:
    return sorted((ROOT / "deploy").rglob("*.yaml"))


@pytest.mark.parametrize("path", _deploy_yaml(), ids=lambda p: str(p.relative_to(ROOT)))
def test_deploy_yaml_parses_and_sets_only_real_settings(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents, f"{path} holds no YAML document"
    names = set(re.findall(r"\b(MIGRATOR_[A-Z_]+)\b", path.read_text()))
    assert names <= SETTINGS, f"{path}: not settings: {sorted(names - SETTINGS)}"


def test_env_files_set_only_real_settings() -> None:
    for path in (ROOT / "deploy").rglob("*.env"):
        keys = {
            line.split("=", 1)[0].strip()
            for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        }
        assert {k for k in keys if k.startswith("MIGRATOR_")} <= SETTINGS, path


def test_kubernetes_manifests_have_the_expected_objects() -> None:
    kinds = {}
    for path in (ROOT / "deploy" / "k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                kinds.setdefault(doc["kind"], []).append(doc)
    assert {"ConfigMap", "Secret", "Job", "Deployment", "Service", "PersistentVolumeClaim"} <= set(
        kinds
    )
    deployment = kinds["Deployment"][0]
    assert deployment["spec"]["replicas"] >= 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["run"]
    assert kinds["Job"][0]["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]
    assert "MIGRATOR_DATABASE_URL" in kinds["Secret"][0]["stringData"]


def test_compose_runs_migration_before_the_daemon() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "mlflow", "migrate", "migrator"} <= set(services)
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrator"]["command"] == ["run"]
    assert (
        services["migrator"]["depends_on"]["migrate"]["condition"]
        == "service_completed_successfully"
    )
    for name in ("postgres", "mlflow", "migrator"):
        assert "healthcheck" in services[name], name
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert all(str(p).startswith("127.0.0.1:") for p in published), published


def test_image_installs_with_the_makefile() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"make install\b", dockerfile)
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q torch==2.13.0" in makefile
    assert "-c constraints.txt" in makefile
    copied = set(re.findall(r"^COPY (\S+)", dockerfile, flags=re.M))
    for needed in ("core", "db", "migrator", "alembic"):
        assert needed in copied, f"the image lacks {needed}/"


def test_readme_states_the_delivery_guarantees_in_one_table() -> None:
    section = README[README.index("## Delivery guarantees") :]
    section = section[: section.index("\n## ")]
    rows = re.findall(r"^\| (?!fault |---)(.+?) \|", section, flags=re.M)
    for fault in (
        "killed right after claiming",
        "killed mid-transfer",
        "after registering",
        "reply is lost",
        "registered twice",
        "registry unreachable",
        "job database unreachable",
        "replayed",
        "forged",
        "oversize",
    ):
        assert any(fault in row for row in rows), f"no row for {fault!r}"
    for signal_ in ("migrator health", "exits 1", "ERROR", "WARNING"):
        assert signal_ in section, signal_
