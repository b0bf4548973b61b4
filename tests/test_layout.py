"""The package layout's import contracts (pyproject.toml [tool.importlinter]): who runs what stays visible."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    """lint-imports from the checkout (it puts the working folder first on the path): every contract KEPT."""
    r = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                        "sys.exit(lint_imports_command(['--no-cache']))"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"lint-imports failed:\n{r.stdout}\n{r.stderr}"
    assert "0 broken" in r.stdout
