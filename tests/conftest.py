import os
import sys

import numpy as np
import pytest

# The tests import their shared helpers as a top-level module.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def rng(request):
    # A generator seeded from the test's id: every test is reproducible on its own, whatever runs first.
    seed = np.frombuffer(request.node.nodeid.encode(), np.uint8).astype(np.uint64)
    return np.random.default_rng(seed.tolist())
