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
    result = subprocess.run([_tool("vulture"), "df5t_deploy", "engines", "export", "tests", "benchmarks", "training",
                             "--min-confidence", "60"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, "unused code (delete it, or whitelist a name only a framework uses):\n" + result.stdout


#: The modules above the Restorer's line, and the packages outside the runtime's layers.
ABOVE_THE_LINE = {"api", "watch", "service", "client", "cluster", "napari_plugin", "pipeline", "batch", "cli", "gpu_verify", "doctor", "export", "engines", "models", "samples"}


def test_every_runtime_module_is_under_the_layer_contract():
    """A new module must be placed: below the Restorer (listed in the contract) or above it."""
    import pkgutil

    import tomllib

    import df5t_deploy

    contract = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    below = {name.removeprefix("df5t_deploy.") for name in contract["source_modules"]}
    modules = {info.name for info in pkgutil.iter_modules(df5t_deploy.__path__)}
    assert modules - below - ABOVE_THE_LINE == set(), "place these modules in pyproject's import contract"
    assert below <= modules, f"the contract names modules that do not exist: {below - modules}"
