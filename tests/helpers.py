"""Small helpers shared by the tests: building modules and random weights, comparing with tolerances."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fusedrnn import _core
# Re-exported: the cell facts come from the core's one list of cells (fusedrnn._core.cells).
from fusedrnn.functional import CELLS, GATES, has_cell_state  # noqa: F401
from fusedrnn.modules import make_module  # noqa: F401  (re-exported)

# ASan's operator new aborts the process where it would throw std::bad_alloc: the tests of running out
# of memory skip under .ci/sanitize.sh's ASan run (and run everywhere else).
needs_throwing_new = pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                                        reason="ASan's operator new aborts the process where it would throw")

PARAM_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
# With a projection, also weight_hr.
GRAD_NAMES = PARAM_NAMES + ("weight_hr",)

# Every cell, and an LSTM whose hidden state is projected (torch.nn.LSTM's proj_size; proj_of gives
# the size): parametrise with @pytest.mark.parametrize("cell, projected", CELL_CASES).
CELL_CASES = [pytest.param(c, False, id=c) for c in CELLS] + [pytest.param("lstm", True, id="lstm_proj")]


def proj_of(hidden: int, projected: bool) -> int:
    """The projection size a projected case uses for a hidden size (>= 2): about a third, odd sizes
    included; 0 when not projected."""
    return max(1, hidden // 3) if projected else 0


def saved_per_step(cell: str) -> int:
    """Values per hidden unit a step saves for backward beside the states (the core's "saved")."""
    return _core.cells[cell]["saved"]


def random_layer(rng, cell, input_size, hidden_size, *, bias=True, dtype=np.float64, scale=0.6, proj_size=0):
    """Random weights of one layer direction, big enough that every gate leaves its linear range. With
    proj_size, also "weight_hr" (proj_size, hidden_size), and weight_hh has proj_size columns."""
    gh = GATES[cell] * hidden_size
    w = {
        "weight_ih": rng.uniform(-scale, scale, (gh, input_size)),
        "weight_hh": rng.uniform(-scale, scale, (gh, proj_size or hidden_size)),
        "bias_ih": rng.uniform(-scale, scale, gh) if bias else None,
        "bias_hh": rng.uniform(-scale, scale, gh) if bias else None,
    }
    if proj_size:
        w["weight_hr"] = rng.uniform(-scale, scale, (proj_size, hidden_size))
    return {k: None if v is None else v.astype(dtype) for k, v in w.items()}


def random_lengths(rng, steps, batch):
    """Distinct-ish lengths in [1, T], unsorted, always including 1 and T when the batch allows."""
    lengths = rng.integers(1, steps + 1, batch)
    lengths[0] = 1
    if batch > 1:
        lengths[-1] = steps
    return rng.permutation(lengths)


def tolerances(dtype, expected):
    """(rtol, atol) for comparing with an independent implementation in `dtype`.

    float64: both sides round to ~1e-16 per operation over a few dozen dependent operations, so 1e-10
    relative leaves four orders of margin; the tiny atol covers entries that are exactly or nearly zero.
    float32: eps is 6e-8 and the kernels' float activations are accurate to ~2e-7 relative; after a few
    steps of recurrence that is a few 1e-7 on typical entries, hence 1e-5 relative. An entry that is a
    sum of cancelling terms keeps the absolute error of the terms, not a relative one, so atol is scaled
    to the array's largest magnitude."""
    scale = float(np.max(np.abs(expected))) if np.size(expected) else 0.0
    if np.dtype(dtype) == np.float64:
        return 1e-10, 1e-13 * max(scale, 1.0)
    return 1e-5, 1e-5 * max(scale, 1e-3)


def assert_close(actual, expected, dtype, name="", factor=1.0):
    """`factor` widens the tolerances, for a reference less exact than the kernels."""
    assert actual is not None and expected is not None, name
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    rtol, atol = tolerances(dtype, expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol * factor, atol=atol * factor, err_msg=name)


def numerical_gradient(f, arr, indices, eps=1e-6):
    """Central differences of the scalar f() with respect to arr[idx] for each idx (arr is changed in
    place and restored). In float64 with eps=1e-6 the truncation error is ~1e-12 times f's third
    derivative and the rounding ~1e-16 * |f| / eps."""
    grad = np.zeros(len(indices))
    for n, idx in enumerate(indices):
        saved = arr[idx]
        arr[idx] = saved + eps
        up = f()
        arr[idx] = saved - eps
        down = f()
        arr[idx] = saved
        grad[n] = (up - down) / (2 * eps)
    return grad


def set_for_the_test(get, set_, value):
    """A fixture's body: sets a process-wide choice to `value` for the test and restores it after."""
    previous = get()
    set_(value)
    yield value
    set_(previous)


# (T, B, I, H, P) for a projected LSTM at odd sizes: P = 1, P = H - 1, H = 129 with odd P (more than one
# rank or block), one step, one row, one input feature, I > H, every size at its least, 17 rows.
ODD_PROJECTED_SHAPES = {
    "P1": (5, 3, 2, 4, 1),
    "P_H-1": (4, 3, 3, 7, 6),
    "H2-P1": (5, 3, 2, 2, 1),
    "H129-P43": (3, 2, 5, 129, 43),
    "H129-P1": (3, 2, 5, 129, 1),
    "T1": (1, 3, 4, 5, 2),
    "B1": (6, 1, 4, 5, 3),
    "I1": (4, 3, 1, 6, 5),
    "I_gt_H": (4, 2, 33, 3, 2),
    "H2-P1-all1": (1, 1, 1, 2, 1),
    "B17": (3, 17, 6, 10, 9),
}
