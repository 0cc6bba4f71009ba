from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from migrator.settings import ConfigFileError, Device, load_settings

FIXED_ENV = [
    "MIGRATOR_TRACKING_URI",
    "MIGRATOR_REGISTRY_URI",
    "MIGRATOR_DATABASE_URL",
    "MIGRATOR_POLL_INTERVAL_S",
    "MIGRATOR_SIMILARITY_RANK",
    "MIGRATOR_MODULE_MIN_SIMILARITY",
    "MIGRATOR_AUTO_APPROVE_ATC",
    "MIGRATOR_MAX_ATC",
    "MIGRATOR_CACHE_DIR",
    "MIGRATOR_DEVICE",
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*FIXED_ENV, "MIGRATOR_CONFIG", "MLFLOW_TRACKING_URI", "MIGRATOR_DATA_DIR"]:
        monkeypatch.delenv(name, raising=False)


def test_embedded_defaults_need_nothing(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path)
    assert s.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert s.registry_uri == s.tracking_uri
    assert s.database_url.get_secret_value() == f"sqlite:///{tmp_path}/migrator.db"
    assert (
        s.database_url.get_secret_value() != s.tracking_uri
    )  # MLflow and the job database never share a file
    assert s.device is Device.AUTO
    assert s.auto_approve_atc <= s.max_atc


def test_fixed_environment_names_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    values = {
        "MIGRATOR_TRACKING_URI": "http://127.0.0.1:5000",
        "MIGRATOR_REGISTRY_URI": "http://127.0.0.1:5001",
        "MIGRATOR_DATABASE_URL": "postgresql+psycopg://u@127.0.0.1:5433/jobs",
        "MIGRATOR_POLL_INTERVAL_S": "7.5",
        "MIGRATOR_SIMILARITY_RANK": "16",
        "MIGRATOR_MODULE_MIN_SIMILARITY": "0.4",
        "MIGRATOR_AUTO_APPROVE_ATC": "0.2",
        "MIGRATOR_MAX_ATC": "0.7",
        "MIGRATOR_CACHE_DIR": str(tmp_path / "cache"),
        "MIGRATOR_DEVICE": "cuda",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    s = load_settings()
    assert s.tracking_uri == "http://127.0.0.1:5000"
    assert s.registry_uri == "http://127.0.0.1:5001"
    assert s.database_url.get_secret_value() == "postgresql+psycopg://u@127.0.0.1:5433/jobs"
    assert s.poll_interval_s == 7.5
    assert s.similarity_rank == 16
    assert s.module_min_similarity == 0.4
    assert (s.auto_approve_atc, s.max_atc) == (0.2, 0.7)
    assert s.cache_dir == tmp_path / "cache"
    assert s.device is Device.CUDA


def test_mlflow_tracking_uri_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert load_settings().tracking_uri == "http://127.0.0.1:5999"
    monkeypatch.setenv("MIGRATOR_TRACKING_URI", "http://127.0.0.1:6000")
    assert load_settings().tracking_uri == "http://127.0.0.1:6000"


def test_toml_file_then_env_then_kwargs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "migrator.toml"
    cfg.write_text('max_atc = 0.8\nsimilarity_rank = 8\nmodule_patterns = ["to_q$"]\n')
    s = load_settings(cfg)
    assert (s.max_atc, s.similarity_rank, s.module_patterns) == (0.8, 8, ["to_q$"])
    monkeypatch.setenv("MIGRATOR_SIMILARITY_RANK", "12")
    assert load_settings(cfg).similarity_rank == 12  # env beats the file
    assert load_settings(cfg, similarity_rank=4).similarity_rank == 4  # arguments beat env
    monkeypatch.setenv("MIGRATOR_CONFIG", str(cfg))
    assert load_settings().max_atc == 0.8


def test_bad_configuration_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="not found"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("max_atc = = 1\n")
    with pytest.raises(ConfigFileError, match="not valid TOML"):
        load_settings(bad)
    with pytest.raises(ValidationError, match="auto_approve_atc"):
        load_settings(auto_approve_atc=0.9, max_atc=0.5)
    with pytest.raises(ValidationError, match="SQLAlchemy URL"):
        load_settings(database_url="jobs.db")
    with pytest.raises(ValidationError, match=r"unknown_setting|extra"):
        load_settings(unknown_setting=1)


def test_factorization_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path)
    assert s.assessment_factors == "randomized"
    assert s.cache_max_gb == 40.0 and s.cache_max_bytes == 40_000_000_000
    monkeypatch.setenv("MIGRATOR_CACHE_MAX_GB", "1.5")
    monkeypatch.setenv("MIGRATOR_ASSESSMENT_FACTORS", "exact")
    s = load_settings(data_dir=tmp_path)
    assert (s.assessment_factors, s.cache_max_bytes) == ("exact", 1_500_000_000)
    assert load_settings(data_dir=tmp_path, cache_max_gb=0).cache_max_bytes is None  # no cap
    with pytest.raises(ValidationError, match="cache_max_gb"):
        load_settings(data_dir=tmp_path, cache_max_gb=-1)
    with pytest.raises(ValidationError, match="assessment_factors"):
        load_settings(data_dir=tmp_path, assessment_factors="power")
