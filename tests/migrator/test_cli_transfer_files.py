"""``migrator transfer`` on real adapter files: a refusal names the key on stderr with its likely
cause (no rich markup eats it), a transfer that would leave modules out exits 1 listing them
unless ``--allow-partial``, and the JSON document keeps its fixed keys."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from migrator.cli import app
from tests.core.lora_models import save_weights, tiny_unet
from tests.core.sdxl_adapters import SDXL_KOHYA_MODULES, make_kohya_sdxl
from tests.fixtures.sdxl import TinySdxl

pytestmark = pytest.mark.interop

LOST = [  # the adapter's text_encoder_2 modules: a target without that encoder cannot take them
    "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj",
    "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj",
    "text_encoder_2.text_model.encoder.layers.0.mlp.fc2",
]


def _run(args: list[str], tmp_path: Path) -> tuple[int, str, str]:
    env = {
        "MIGRATOR_DATA_DIR": str(tmp_path / "data"),
        "MIGRATOR_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MIGRATOR_DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.db'}",
        "MIGRATOR_SIMILARITY_RANK": "4",
    }
    result = CliRunner().invoke(app, args, env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_refusal_names_the_key_and_the_likely_cause(tiny_sdxl: TinySdxl, tmp_path: Path) -> None:
    adapter = tmp_path / "sdxl-style.safetensors"
    make_kohya_sdxl(adapter, tiny_sdxl.components)
    sd_base = save_weights(tiny_unet(0), tmp_path / "sd" / "unet.safetensors")
    code, stdout, stderr = _run(
        ["transfer", str(adapter), "--from", str(sd_base), "--to", str(sd_base),
         "--output", str(tmp_path / "out"), "--same-name"],
        tmp_path,
    )  # fmt: skip
    assert code == 2, stderr
    line = stderr.strip()
    assert len(line.splitlines()) == 1
    key = re.search(r"\[(lora_\w+)\]", line)
    assert key is not None and key.group(1) in {stem for stem, _ in SDXL_KOHYA_MODULES}
    assert str(adapter) in line and "likely cause" in line and "SDXL" in line
    assert "is the adapter for another model?" not in line
    assert stdout == "" and not (tmp_path / "out").exists()


def test_left_out_modules_fail_the_transfer_unless_allowed(
    tiny_sdxl: TinySdxl, tiny_sdxl_successor: TinySdxl, tmp_path: Path
) -> None:
    adapter = tmp_path / "sdxl-style.safetensors"
    make_kohya_sdxl(adapter, tiny_sdxl.components)
    target = tmp_path / "no-te2"
    shutil.copytree(
        tiny_sdxl_successor.folder, target, ignore=shutil.ignore_patterns("text_encoder_2")
    )
    args = ["transfer", str(adapter), "--from", str(tiny_sdxl.single_file), "--to", str(target),
            "--same-name", "--json"]  # fmt: skip

    code, stdout, stderr = _run([*args, "--output", str(tmp_path / "o1")], tmp_path)
    assert code == 1, stderr
    assert "nothing written" in stderr and not (tmp_path / "o1").exists()
    document = json.loads(stdout)
    left = {item["module"]: item["reason"] for item in document["modules_left_out"]}
    assert set(left) == set(LOST) and document["files"] == []
    assert document["modules_skipped"] == len(left)
    for name, reason in left.items():  # every one named on stderr, with its reason
        assert f"left out: {name}: {reason}" in stderr
    assert left[LOST[0]] == "no module of that name in the target base"

    code, stdout, stderr = _run(
        [*args, "--output", str(tmp_path / "o2"), "--allow-partial"], tmp_path
    )
    assert code == 0, stderr
    document = json.loads(stdout)
    assert {
        "modules_transferred", "modules_rematched", "modules_skipped", "energy_retained", "atc",
    } <= set(document)  # fmt: skip
    assert document["modules_skipped"] == len(document["modules_left_out"]) == len(left)
    assert document["energy_retained"] < 1.0
    (written,) = document["files"]
    assert Path(written).name == adapter.name and Path(written).is_file()


def test_only_modules_missing_from_the_target_are_left_out(
    tiny_sdxl: TinySdxl, tiny_sdxl_successor: TinySdxl, tmp_path: Path
) -> None:
    adapter = tmp_path / "sdxl-style.safetensors"
    make_kohya_sdxl(adapter, tiny_sdxl.components)
    target = tmp_path / "no-te2"
    shutil.copytree(
        tiny_sdxl_successor.folder, target, ignore=shutil.ignore_patterns("text_encoder_2")
    )
    code, stdout, _ = _run(
        ["transfer", str(adapter), "--from", str(tiny_sdxl.single_file), "--to", str(target),
         "--same-name", "--json", "--allow-partial", "--output", str(tmp_path / "o")],
        tmp_path,
    )  # fmt: skip
    assert code == 0
    left = {item["module"] for item in json.loads(stdout)["modules_left_out"]}
    assert left == set(LOST)
