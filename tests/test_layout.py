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


def test_every_test_the_docs_name_exists():
    """A security claim in the README or docs/ names the test that checks it: that test must exist."""
    import re

    defined = set()
    for f in (REPO / "tests").glob("*.py"):
        defined |= set(re.findall(r"^(?:def|class) (test_\w+|Test\w+)", f.read_text(), re.M))
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = {(d.name, t) for d in docs for t in re.findall(r"`(test_\w+)`", d.read_text())}
    missing = sorted(f"{d}: {t}" for d, t in named if t not in defined)
    assert named and not missing, missing
