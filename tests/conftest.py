import importlib
import os
import sys

import numpy as np
import pytest

import fusedrnn

# The tests import their shared helpers as a top-level module.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import set_for_the_test  # noqa: E402


@pytest.fixture
def rng(request):
    # A generator seeded from the test's id: every test is reproducible on its own, whatever runs first.
    seed = np.frombuffer(request.node.nodeid.encode(), np.uint8).astype(np.uint64)
    return np.random.default_rng(seed.tolist())


@pytest.fixture
def team_size(request):
    """The thread team's size for the test (indirect parametrization)."""
    yield from set_for_the_test(fusedrnn.get_num_threads, fusedrnn.set_num_threads, request.param)


@pytest.fixture
def split(request):
    """Forces the layers to share their steps by 'rows' or 'units' for the test."""
    yield from set_for_the_test(fusedrnn._core.get_layer_split, fusedrnn._core.set_layer_split, request.param)


def simd_levels_under_test():
    """The SIMD levels this machine supports, or the subset FUSEDRNN_TEST_SIMD_LEVELS names (comma-
    separated). The ThreadSanitizer run takes one (.ci/sanitize.sh): the ranks' shares of the arrays they
    exchange do not depend on the level."""
    supported = fusedrnn.build_info()["simd_supported"]
    named = [n.strip() for n in os.environ.get("FUSEDRNN_TEST_SIMD_LEVELS", "").split(",") if n.strip()]
    unsupported = [n for n in named if n not in supported]
    if unsupported:
        raise pytest.UsageError(f"FUSEDRNN_TEST_SIMD_LEVELS names {unsupported}; this machine supports {supported}")
    return [n for n in supported if n in named] if named else supported


@pytest.fixture(params=simd_levels_under_test())
def simd_level(request):
    """Runs a test once per SIMD level of the kernels this machine supports (the portable fallback
    included; see simd_levels_under_test), restoring the level in use afterwards."""
    previous = fusedrnn.build_info()["simd"]
    fusedrnn.set_simd_level(request.param)
    yield request.param
    fusedrnn.set_simd_level(previous)


def pytest_configure(config):
    # Tests that need an optional package (torch, matplotlib) skip where it is not installed. CI names
    # the packages its environment does install (FUSEDRNN_TEST_REQUIRES=torch,matplotlib), so there a
    # missing or broken one stops the run instead of skipping those tests unseen.
    for name in filter(None, (n.strip() for n in os.environ.get("FUSEDRNN_TEST_REQUIRES", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise pytest.UsageError(f"FUSEDRNN_TEST_REQUIRES names {name!r}, which does not import: {err}")
    # torch.nn.LSTM(proj_size=P), the reference of the projection tests, warns on every call that its
    # oneDNN path takes no projection and it runs its own; warnings are errors otherwise.
    config.addinivalue_line("filterwarnings",
                            "ignore:LSTM with projections is not supported with oneDNN:UserWarning")


@pytest.fixture(autouse=True, scope="session")
def jobs_on_fusedrnns_own_workers():
    """Collecting the torch tests imports fusedrnn.torch, which moves fusedrnn's jobs onto torch's
    OpenMP threads; the suite runs on fusedrnn's own workers unless a module or test says otherwise
    (test_torch_dropin.py runs on torch's threads, as the drop-in's users do)."""
    fusedrnn._core.use_openmp_runtime("")
