"""Files the service publishes get the modes the umask gives (0644 under umask 022), not the
0600 of a temporary file: an artifact volume shared by several users must be able to read them."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from core.formats.tensorfile import json_writer, write_folder_atomic, write_safetensors_atomic


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_file_gets_the_umask_mode(tmp_path: Path, umask_022: None) -> None:
    out = write_safetensors_atomic({"w": torch.ones(2, 2)}, {}, tmp_path / "a.safetensors")
    assert _mode(out) == 0o644


def test_a_replaced_file_gets_the_umask_mode(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"old")
    path.chmod(0o600)
    write_safetensors_atomic({"w": torch.ones(2, 2)}, {}, path)
    assert _mode(path) == 0o644


def test_a_new_folder_and_its_files_get_the_umask_modes(tmp_path: Path, umask_022: None) -> None:
    folder = tmp_path / "adapter"
    files = write_folder_atomic(folder, {"config.json": json_writer({"r": 4})})
    assert _mode(folder) == 0o755
    assert [_mode(f) for f in files] == [0o644]


def test_a_stricter_umask_is_respected(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        out = write_safetensors_atomic({"w": torch.ones(1)}, {}, tmp_path / "b.safetensors")
        folder = tmp_path / "f"
        write_folder_atomic(folder, {"c.json": json_writer({})})
    finally:
        os.umask(previous)
    assert _mode(out) == 0o600
    assert _mode(folder) == 0o700
    assert _mode(folder / "c.json") == 0o600
