"""Shared fixtures; GPU tests (``@pytest.mark.cuda``) skip cleanly on machines without one.

Hypothesis profiles (tests/test_properties.py): ``ci`` (the default: few, derandomized examples,
bounded run time) and ``long`` (many examples, for a run by hand):
``HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py``.
"""
import os

# The tests compare the CPU kernel with the float64 reference at fp32 accuracy: they run its exact
# mode. The int8 default is tested on its own (test_cpu_kernel.py: FLUTE_CPU_MODE unset in a
# subprocess, and against its executable spec). Set before flute loads; subprocesses inherit it.
os.environ.setdefault("FLUTE_CPU_MODE", "exact")

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    from hypothesis import HealthCheck, settings

    _quiet = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                              suppress_health_check=_quiet, print_blob=True)
    settings.register_profile("long", max_examples=400, deadline=None,
                              suppress_health_check=_quiet, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a test dependency; without it test_properties.py skips
    pass


def _test_bits(item):
    """The bit width a test exercises: its `bits` parameter, else its `bits` marker, else None."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "bits" in callspec.params:
        return callspec.params["bits"]
    marker = item.get_closest_marker("bits")
    return marker.args[0] if marker else None


def pytest_collection_modifyitems(config, items):
    # FLUTE_TEST_BITS=3 (or "3,4"): keep only the tests of those bit widths (deselected, not
    # skipped), so that the GPU check runs each width in its own process: a sticky CUDA error in one
    # kernel poisons only its own process's context.
    only = os.environ.get("FLUTE_TEST_BITS")
    if only:
        keep = {int(b) for b in only.split(",")}
        chosen = [it for it in items if _test_bits(it) is None or _test_bits(it) in keep]
        dropped = [it for it in items if it not in chosen]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = chosen
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
