"""Shared test fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline data root ``shared/data`` beside the repository (``../shared/data`` in CI);
    tests that use it skip when it is absent. Read-only: caches go to ``cache_dir()``."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"offline data folder {path} is absent (expected at shared/data beside the repository)")
    return path
