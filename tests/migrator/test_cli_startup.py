"""Admin commands start fast: loading the CLI does not load torch, POT or MLflow."""

from __future__ import annotations

import subprocess
import sys


def test_cli_import_loads_no_heavy_library() -> None:
    code = (
        "import sys, migrator.cli\n"
        "heavy = [m for m in ('torch', 'ot', 'mlflow', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
