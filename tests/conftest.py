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


def pytest_configure(config):
    """Two tests at a time (pytest-xdist, make test): the in-process ones use one torch thread,
    like the CLI runs the tests start (helpers.cli_env)."""
    import os

    if "PYTEST_XDIST_WORKER" in os.environ:
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The slow tests first: the two workers then take the long runs early and finish together,
    with the quick unit tests filling in at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
