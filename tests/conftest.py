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


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The test models are tiny: one intra-op thread is as fast as two on a quiet 2-core
    machine, several times faster on a busy one, and makes float reductions reproducible."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def writable_cache(tmp_path_factory, monkeypatch):
    """Decoded-data caches go to a per-session temporary folder, never the user's cache."""
    monkeypatch.setenv("METACORRECT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
