"""Shared test fixtures.

The project's shared/ folder (fixtures and real EM data) is found at ``$DF5T_SHARED``, else
beside the checkout at ``../shared``. Machines that receive only the checkout (the GPU test
machine) have ``tests/data``: the reference checkpoint and crops of two real EM tiles, enough
for every GPU test and the GPU benchmark (README there).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[1]
TRAVELLING = REPO / "tests" / "data"
MUSSEL_TILE3 = "micrograph_vemstitch-mussel_tile3_2_2_1768x2048.tif"


def shared_root() -> Path | None:
    for candidate in (os.environ.get("DF5T_SHARED"), REPO.parent / "shared"):
        if candidate and (Path(candidate) / "fixtures").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Caches (kernels, engines, device verdicts) of this session only, never the user's."""
    previous = os.environ.get("DF5T_CACHE")
    os.environ["DF5T_CACHE"] = str(tmp_path_factory.mktemp("df5t-cache"))
    yield
    if previous is None:
        os.environ.pop("DF5T_CACHE", None)
    else:
        os.environ["DF5T_CACHE"] = previous


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    root = shared_root()
    if root is None:
        pytest.fail("the project's shared/ folder is missing: put it beside the checkout or set DF5T_SHARED")
    return root


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    root = shared_root()
    return root / "fixtures" if root is not None else TRAVELLING / "fixtures"


@pytest.fixture(scope="session")
def em_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "em"


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """The test model most tests restore with: tile 32, eps = 0.5 (x - the tile's mean), which
    depends on the whole tile (tests/onnx_models.py)."""
    from onnx_models import tile_mean_model

    return tile_mean_model(tmp_path_factory.mktemp("model") / "mean.onnx", 32, gain=0.5)


@pytest.fixture(scope="session")
def mussel_tile3() -> np.ndarray:
    """Held-out real EM (mussel tile 3): the whole tile from shared/, else its travelling
    crop (rows 0-900, columns 0-300), which holds every region the GPU tests use."""
    root = shared_root()
    if root is not None and (root / "data" / "em" / MUSSEL_TILE3).is_file():
        return tifffile.imread(root / "data" / "em" / MUSSEL_TILE3)
    return tifffile.imread(next((TRAVELLING / "em").glob(MUSSEL_TILE3.removesuffix(".tif") + "_crop_*.tif")))


def pytest_sessionstart(session) -> None:
    """``DF5T_MUTATION=NAME``: run the suite against a deliberate bug (tests/mutations.py)."""
    name = os.environ.get("DF5T_MUTATION")
    if name:
        from mutations import apply

        session.config._df5t_mutation = pytest.MonkeyPatch()
        apply(name, session.config._df5t_mutation)
