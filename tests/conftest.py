"""Shared test fixtures. ``../shared`` (fixtures and real EM data) must sit beside the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "fixtures").is_dir():
        pytest.fail(f"{SHARED} is missing: the tests need the project's shared/ folder beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    return shared_dir / "fixtures"


@pytest.fixture(scope="session")
def em_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "em"
