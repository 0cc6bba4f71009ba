"""The package's public surface: every exported name exists, and the core imports no service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import core


def test_every_exported_name_resolves() -> None:
    assert len(core.__all__) == len(set(core.__all__))
    missing = [name for name in core.__all__ if not hasattr(core, name)]
    assert missing == []
    for name in ("WeightSource", "FactorStore", "compute_atc", "match_modules", "transfer_adapter"):
        assert name in core.__all__


def test_importing_core_pulls_no_service_library() -> None:
    code = (
        "import sys, core\n"
        "bad = [m for m in ('mlflow', 'sqlalchemy', 'apscheduler', 'ray') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    root = Path(core.__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == ""


def test_exports_are_lazy_and_do_not_shadow_submodules() -> None:
    code = (
        "import sys, core.errors\n"
        "assert 'torch' not in sys.modules and 'ot' not in sys.modules, 'eager import'\n"
        "import core.factorize as module\n"
        "assert callable(module.factorize) and hasattr(module, 'FactorStore')\n"
        "from core import WeightSource, compute_atc\n"
        "assert set(core.__all__) == set(core._EXPORTS)\n"
    )
    root = Path(core.__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr
