"""Shared fixtures; GPU tests (``@pytest.mark.cuda``) skip cleanly on machines without one."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A seeded generator: every test draws fresh, reproducible random data from it."""
    return torch.Generator().manual_seed(1234)
