"""The package's public surface: each module's exported names exist, and core imports no service."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import core

ROOT = Path(core.__file__).resolve().parents[1]


def _modules() -> list[str]:
    return [
        info.name
        for info in pkgutil.walk_packages(core.__path__, prefix="core.")
        if not info.name.rsplit(".", 1)[-1].startswith("_")
    ]


def test_every_module_exports_names_that_resolve() -> None:
    names = _modules()
    assert {"core.transfer", "core.atc", "core.formats", "core.weights"} <= set(names)
    for name in names:
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"{name} has no __all__"
        assert len(exported) == len(set(exported)), name
        missing = [n for n in exported if not hasattr(module, n)]
        assert missing == [], (name, missing)


def test_importing_core_pulls_no_service_library_and_no_torch() -> None:
    code = (
        "import sys, core, core.errors\n"
        "bad = [m for m in ('mlflow', 'sqlalchemy', 'apscheduler', 'ray', 'torch', 'ot')"
        " if m in sys.modules]\n"
        "print(','.join(bad))\n"
        "import core.transfer, core.formats\n"
        "bad = [m for m in ('mlflow', 'sqlalchemy', 'apscheduler', 'ray') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.splitlines() == ["", ""]
