"""Fixtures: the dirs a test's run writes to. (Shared helpers are in helpers.py.)"""

from pathlib import Path

import pytest


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Where a test's run writes its outputs (hydra.run.dir); not created."""
    return tmp_path / "run"


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A data cache of the test's own (data.cache_dir): no run shares one with another test."""
    return tmp_path / "cache"
