"""Optional dependencies of the tests, one rule for all of them.

CI installs every extra, so there a missing one is an error: a broken install step must fail
the run, not skip its tests. Elsewhere (the GPU machine, which receives only the checkout and
has the runtime alone; a developer's partial install) the tests that need it skip, saying
which extra brings it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(module: str, extra: str) -> ModuleType:
    """``module`` imported, which the ``[extra]`` extra of df5t-deploy installs."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed: pip install '.[{extra}]'")
