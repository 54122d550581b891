"""The layers hold (import-linter contracts in pyproject.toml) and there is no dead code
(vulture, with tests/vulture_whitelist.py for names only frameworks use)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: the [test] extra installs it")
        pytest.skip(f"{name} is not installed: pip install '.[test]'")
    return path


def test_the_import_contracts_hold():
    result = subprocess.run([_tool("lint-imports")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_there_is_no_dead_code():
    result = subprocess.run([_tool("vulture"), "df5t_deploy", "engines", "export", "tests", "benchmarks",
                             "--min-confidence", "60"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, "unused code (delete it, or whitelist a name only a framework uses):\n" + result.stdout
