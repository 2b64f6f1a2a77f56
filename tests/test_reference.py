"""The fused kernels (one layer, one direction) against the plain float64 reference in reference.py, and
float64 finite-difference checks of every gradient the kernels return."""

import numpy as np
import pytest

from fusedrnn import _core
from fusedrnn import functional as F
from fusedrnn import reference
from helpers import (CELL_CASES, CELLS, GRAD_NAMES, PARAM_NAMES, has_cell_state, numerical_gradient, proj_of,
                     random_layer, random_lengths)

T, B, I, H = 5, 4, 3, 6
LENGTHS = np.array([5, 1, 3, 2])  # unsorted, with a full row and a one-step row

REF_TOL = dict(rtol=1e-12, atol=1e-13)

# Every test here runs on each SIMD level of the kernels this machine supports.
pytestmark = pytest.mark.usefixtures("simd_level")


def _inputs(rng, cell, bias, with_state, batch=B, steps=T, inp=I, hidden=H, proj=0):
    w = random_layer(rng, cell, inp, hidden, bias=bias, proj_size=proj)
    x = rng.standard_normal((steps, batch, inp))
    h0 = rng.standard_normal((batch, proj or hidden)) if with_state else None
    c0 = rng.standard_normal((batch, hidden)) if with_state and has_cell_state(cell) else None
    return w, x, h0, c0


def _upstream(rng, cell, steps=T, batch=B, hidden=H, proj=0):
    # One shared random upstream gradient for every output the layer has.
    dy = rng.standard_normal((steps, batch, proj or hidden))
    dh_n = rng.standard_normal((batch, proj or hidden))
    dc_n = rng.standard_normal((batch, hidden)) if has_cell_state(cell) else None
    return dy, dh_n, dc_n


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "h0"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_kernel_matches_reference(rng, cell, projected, reverse, lengths, bias, with_state):
    proj = proj_of(H, projected)
    w, x, h0, c0 = _inputs(rng, cell, bias, with_state, proj=proj)
    out = F.layer_forward(cell, x, w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"], h0, c0,
                          lengths=lengths, reverse=reverse, weight_hr=w.get("weight_hr"))
    y, h_n, c_n, cache = reference.forward(cell, x, w["weight_ih"], w["weight_hh"], w["bias_ih"],
                                           w["bias_hh"], h0, c0, lengths=lengths, reverse=reverse,
                                           weight_hr=w.get("weight_hr"))
    np.testing.assert_allclose(out.y, y, **REF_TOL)
    np.testing.assert_allclose(out.h_n, h_n, **REF_TOL)
    if has_cell_state(cell):
        np.testing.assert_allclose(out.c_n, c_n, **REF_TOL)
    else:
        assert out.c_n is None

    dy, dh_n, dc_n = _upstream(rng, cell, proj=proj)
    got = F.layer_backward(out.tape, dy, dh_n, dc_n)
    want = reference.backward(cache, dy, dh_n, dc_n)
    for name in ("dx", "dh0", "dc0", "dh_norm") + GRAD_NAMES:
        if want[name] is None:
            assert getattr(got, name) is None, name
        else:
            np.testing.assert_allclose(getattr(got, name), want[name], err_msg=name, **REF_TOL)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell", CELLS)
def test_padded_steps_are_zero_and_final_state_is_the_rows_own(rng, cell, reverse):
    # A row of length L must give exactly what the same row alone, cut to L steps, gives.
    w, x, h0, c0 = _inputs(rng, cell, True, True)
    out = F.layer_forward(cell, x, *w.values(), h0, c0, lengths=LENGTHS, reverse=reverse)
    for b, length in enumerate(LENGTHS):
        alone = F.layer_forward(cell, x[:length, b:b + 1], *w.values(), h0[b:b + 1],
                                None if c0 is None else c0[b:b + 1], reverse=reverse)
        np.testing.assert_allclose(out.y[:length, b], alone.y[:, 0], **REF_TOL)
        assert np.all(out.y[length:, b] == 0.0)
        np.testing.assert_allclose(out.h_n[b], alone.h_n[0], **REF_TOL)
        if has_cell_state(cell):
            np.testing.assert_allclose(out.c_n[b], alone.c_n[0], **REF_TOL)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("which", ["dy_only", "dh_only", "dc_only", "none"])
def test_missing_upstream_gradients_count_as_zero(rng, cell, which):
    if which == "dc_only" and not has_cell_state(cell):
        which = "none"
    w, x, h0, c0 = _inputs(rng, cell, True, True)
    dy, dh_n, dc_n = _upstream(rng, cell)
    dy = dy if which == "dy_only" else None
    dh_n = dh_n if which == "dh_only" else None
    dc_n = dc_n if which == "dc_only" else None
    out = F.layer_forward(cell, x, *w.values(), h0, c0, lengths=LENGTHS)
    got = F.layer_backward(out.tape, dy, dh_n, dc_n)
    _, _, _, cache = reference.forward(cell, x, *w.values(), h0, c0, lengths=LENGTHS)
    want = reference.backward(cache, dy, dh_n, dc_n)
    for name in ("dx", "dh0") + PARAM_NAMES:
        np.testing.assert_allclose(getattr(got, name), want[name], err_msg=name, **REF_TOL)
    if which == "none":
        assert not np.any(got.dx) and not np.any(got.weight_hh) and not np.any(got.dh0)


@pytest.mark.parametrize("cell", CELLS)
def test_backward_accumulates_into_given_buffers(rng, cell):
    # dx and the gradient buffers are added to, never overwritten; dh0/dc0 are this call's.
    w, x, h0, c0 = _inputs(rng, cell, True, True)
    dy, dh_n, dc_n = _upstream(rng, cell)
    out = F.layer_forward(cell, x, *w.values(), h0, c0)
    once = F.layer_backward(out.tape, dy, dh_n, dc_n)
    start = {name: rng.standard_normal(np.shape(getattr(once, name))) for name in ("dx",) + PARAM_NAMES}
    buffers = F.LayerGrads(None, None, None, *(start[n].copy() for n in PARAM_NAMES))
    dx = start["dx"].copy()
    acc = F.layer_backward(out.tape, dy, dh_n, dc_n, dx=dx, grads=buffers)
    assert acc.dx is dx and acc.weight_ih is buffers.weight_ih
    for name in ("dx",) + PARAM_NAMES:
        np.testing.assert_allclose(getattr(acc, name), start[name] + getattr(once, name), err_msg=name,
                                   **REF_TOL)
    np.testing.assert_array_equal(acc.dh0, once.dh0)


@pytest.mark.parametrize("groups", [4, 2], ids=["per_row", "pairs"])
@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_weight_gradients_per_group_of_rows(rng, cell, projected, reverse, lengths, groups):
    # grad_groups: each group of consecutive rows gets the weight and bias gradients the reference gives
    # its rows alone; dx, dh0 and dc0 are the whole batch's, as without groups; into given buffers, they
    # are added to.
    proj = proj_of(H, projected)
    w, x, h0, c0 = _inputs(rng, cell, True, True, proj=proj)
    dy, dh_n, dc_n = _upstream(rng, cell, proj=proj)
    params, weight_hr = [w[n] for n in PARAM_NAMES], w.get("weight_hr")
    out = F.layer_forward(cell, x, *params, h0, c0, lengths=lengths, reverse=reverse, weight_hr=weight_hr)
    got = F.layer_backward(out.tape, dy, dh_n, dc_n, grad_groups=groups)
    whole = F.layer_backward(out.tape, dy, dh_n, dc_n)
    for name in ("dx", "dh0", "dc0"):
        np.testing.assert_array_equal(getattr(got, name), getattr(whole, name), err_msg=name)
    rows = B // groups
    for q in range(groups):
        part = slice(q * rows, (q + 1) * rows)
        _, _, _, cache = reference.forward(cell, x[:, part], *params, h0[part], None if c0 is None else c0[part],
                                           lengths=None if lengths is None else lengths[part], reverse=reverse,
                                           weight_hr=weight_hr)
        want = reference.backward(cache, dy[:, part], dh_n[part], None if dc_n is None else dc_n[part])
        for name in GRAD_NAMES:
            if want[name] is None:
                assert getattr(got, name) is None, name
            else:
                assert getattr(got, name).shape == (groups, *want[name].shape), name
                np.testing.assert_allclose(getattr(got, name)[q], want[name], err_msg=name, **REF_TOL)
    start = {name: rng.standard_normal(getattr(got, name).shape)
             for name in GRAD_NAMES if getattr(got, name) is not None}
    buffers = F.LayerGrads(None, None, None, None, None, None, None)._replace(**{n: start[n].copy() for n in start})
    acc = F.layer_backward(out.tape, dy, dh_n, dc_n, grads=buffers, grad_groups=groups)
    for name in start:
        np.testing.assert_allclose(getattr(acc, name), start[name] + getattr(got, name), err_msg=name, **REF_TOL)


@pytest.mark.parametrize("cell", CELLS)
def test_written_dx_ignores_what_the_buffer_held(rng, cell):
    # Without a dx to add into, the core writes dx (no clearing pass first): values already in the
    # buffer, NaN included, must not reach the result, and it must equal accumulating into zeros.
    w, x, h0, c0 = _inputs(rng, cell, True, True)
    dy, dh_n, dc_n = _upstream(rng, cell)
    out = F.layer_forward(cell, x, *w.values(), h0, c0, lengths=LENGTHS)
    added = F.layer_backward(out.tape, dy, dh_n, dc_n, dx=np.zeros_like(x))
    grads = [np.zeros_like(v) for v in w.values()]
    written = np.full_like(x, np.nan)
    _core.layer_backward(out.tape, dy, dh_n, dc_n, written, *grads, accumulate_dx=False)
    np.testing.assert_array_equal(written, added.dx)
    assert np.array_equal(F.layer_backward(out.tape, dy, dh_n, dc_n).dx, added.dx)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_float32_kernel_close_to_float64_reference(rng, cell, reverse):
    w, x, h0, c0 = _inputs(rng, cell, True, True)
    f32 = lambda a: None if a is None else a.astype(np.float32)  # noqa: E731
    out = F.layer_forward(cell, f32(x), *(f32(v) for v in w.values()), f32(h0), f32(c0), lengths=LENGTHS,
                          reverse=reverse)
    assert out.y.dtype == np.float32 and out.h_n.dtype == np.float32
    # The reference runs on the float32-rounded values, so only the kernels' arithmetic differs.
    args = [None if a is None else a.astype(np.float32).astype(np.float64)
            for a in (x, *w.values(), h0, c0)]
    y, h_n, _, cache = reference.forward(cell, *args, lengths=LENGTHS, reverse=reverse)
    dy, dh_n, dc_n = (None if a is None else a.astype(np.float32) for a in _upstream(rng, cell))
    got = F.layer_backward(out.tape, dy, dh_n, dc_n)
    want = reference.backward(cache, dy, dh_n, dc_n)
    pairs = [(out.y, y), (out.h_n, h_n)] + [(getattr(got, n), want[n]) for n in ("dx", "dh0") + PARAM_NAMES]
    for got_arr, want_arr in pairs:
        assert got_arr.dtype == np.float32
        np.testing.assert_allclose(got_arr, want_arr, rtol=1e-5, atol=1e-5 * np.abs(want_arr).max())


# ---- finite differences -------------------------------------------------------------------------------

# Central differences are exact to O(eps^2 * f''') ~ 1e-12; the loss is O(10), so rounding in the two
# evaluations contributes ~1e-15 * 10 / 1e-6 = 1e-8 absolute.
FD_TOL = dict(rtol=1e-6, atol=1e-7)


def _loss(cell, arrays, lengths, reverse, upstream):
    out = F.layer_forward(cell, arrays["x"], arrays["weight_ih"], arrays["weight_hh"], arrays["bias_ih"],
                          arrays["bias_hh"], arrays["h0"], arrays.get("c0"), lengths=lengths,
                          reverse=reverse, training=False, weight_hr=arrays.get("weight_hr"))
    dy, dh_n, dc_n = upstream
    loss = np.sum(out.y * dy) + np.sum(out.h_n * dh_n)
    return loss + (np.sum(out.c_n * dc_n) if dc_n is not None else 0.0)


@pytest.mark.parametrize("lengths", [None, np.array([4, 2, 1])], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_finite_differences_every_entry(rng, cell, projected, reverse, lengths):
    # Small enough to check every entry of every parameter, the input and the initial states.
    steps, batch, inp, hidden = 4, 3, 3, 3
    proj = proj_of(hidden, projected)
    w, x, h0, c0 = _inputs(rng, cell, True, True, batch=batch, steps=steps, inp=inp, hidden=hidden, proj=proj)
    arrays = dict(w, x=x, h0=h0)
    if has_cell_state(cell):
        arrays["c0"] = c0
    upstream = _upstream(rng, cell, steps=steps, batch=batch, hidden=hidden, proj=proj)

    out = F.layer_forward(cell, x, w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"], h0, c0,
                          lengths=lengths, reverse=reverse, weight_hr=w.get("weight_hr"))
    got = F.layer_backward(out.tape, *upstream)
    analytic = {"x": got.dx, "h0": got.dh0, "c0": got.dc0, **{n: getattr(got, n) for n in GRAD_NAMES}}

    f = lambda: _loss(cell, arrays, lengths, reverse, upstream)  # noqa: E731
    for name, arr in arrays.items():
        indices = list(np.ndindex(arr.shape))
        numeric = numerical_gradient(f, arr, indices)
        np.testing.assert_allclose(analytic[name][tuple(np.array(indices).T)], numeric, err_msg=name,
                                   **FD_TOL)
    if lengths is not None:
        # Padded steps do not reach the loss, so their inputs get exactly zero gradient.
        for b, length in enumerate(lengths):
            assert np.all(got.dx[length:, b] == 0.0)


@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_finite_differences_larger_layer_sampled(rng, cell, projected):
    # A longer sequence and wider layer with no bias; a random subset of entries per array.
    steps, batch, inp, hidden = 9, 5, 7, 10
    proj = proj_of(hidden, projected)
    w, x, h0, c0 = _inputs(rng, cell, False, True, batch=batch, steps=steps, inp=inp, hidden=hidden, proj=proj)
    arrays = {k: v for k, v in dict(w, x=x, h0=h0, c0=c0).items() if v is not None}
    lengths = random_lengths(rng, steps, batch)
    upstream = _upstream(rng, cell, steps=steps, batch=batch, hidden=hidden, proj=proj)
    out = F.layer_forward(cell, x, w["weight_ih"], w["weight_hh"], None, None, h0, c0, lengths=lengths,
                          reverse=True, weight_hr=w.get("weight_hr"))
    got = F.layer_backward(out.tape, *upstream)
    assert got.bias_ih is None and got.bias_hh is None
    analytic = {"x": got.dx, "h0": got.dh0, "c0": got.dc0, "weight_ih": got.weight_ih,
                "weight_hh": got.weight_hh, "weight_hr": got.weight_hr}
    f = lambda: _loss(cell, dict(arrays, bias_ih=None, bias_hh=None), lengths, True, upstream)  # noqa: E731
    for name, arr in arrays.items():
        flat = rng.choice(arr.size, size=min(arr.size, 25), replace=False)
        indices = [np.unravel_index(i, arr.shape) for i in flat]
        numeric = numerical_gradient(f, arr, indices)
        np.testing.assert_allclose([analytic[name][i] for i in indices], numeric, err_msg=name, **FD_TOL)


# ---- float activations ----------------------------------------------------------------------------------
# float32 kernels use their own polynomial exp/sigmoid/tanh; these read them out through one-unit layers.

ACTIVATION_GRID = np.concatenate([
    np.linspace(-60, 60, 4001),
    np.linspace(-0.7, 0.7, 1401),                   # dense where tanh(x) ~ x needs relative accuracy
    np.geomspace(1e-30, 1e-3, 50), -np.geomspace(1e-30, 1e-3, 50),
    [0.0, -0.0, 0.625, -0.625, 9.0, 10.0, -10.0, 88.0, -87.0, 89.0, -88.0],
]).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_accuracy_over_the_whole_range(dtype):
    x = ACTIVATION_GRID.astype(dtype).reshape(1, -1, 1)
    out = F.layer_forward("rnn_tanh", x, np.ones((1, 1), dtype), np.zeros((1, 1), dtype), training=False)
    want = np.tanh(ACTIVATION_GRID.astype(np.float64))
    rtol = 1e-6 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(out.y[0, :, 0], want, rtol=rtol, atol=0)
    assert np.all(np.abs(out.y) <= 1.0)
    np.testing.assert_array_equal(np.sign(out.y[0, :, 0]), np.sign(want))  # odd, including at tiny |x|


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_accuracy_over_the_whole_range(dtype):
    # LSTM with one unit, c0 = 0: i = sigmoid(x), g = tanh(big) = 1, so c_n = i * g = sigmoid(x).
    pre = ACTIVATION_GRID[np.abs(ACTIVATION_GRID) <= 60]
    x = pre.astype(dtype).reshape(1, -1, 1)
    w_ih = np.array([[1.0], [0.0], [0.0], [0.0]], dtype)
    bias = np.array([0.0, 0.0, 50.0, 0.0], dtype)
    out = F.layer_forward("lstm", x, w_ih, np.zeros((4, 1), dtype), bias, np.zeros(4, dtype), training=False)
    p = pre.astype(np.float64)
    want = np.where(p >= 0, 1.0 / (1.0 + np.exp(-np.abs(p))), np.exp(-np.abs(p)) / (1.0 + np.exp(-np.abs(p))))
    rtol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(out.c_n[:, 0], want, rtol=rtol, atol=0)
    assert np.all((out.c_n >= 0) & (out.c_n <= 1))


@pytest.mark.parametrize("cell", CELLS)
def test_float32_saturated_gates_match_reference(rng, cell):
    # Pre-activations in the tens: every activation in its flat tails, where exp clamps.
    w = random_layer(rng, cell, I, H, scale=4.0, dtype=np.float32)
    x = (20 * rng.standard_normal((T, B, I))).astype(np.float32)
    out = F.layer_forward(cell, x, *w.values(), lengths=LENGTHS)
    y, h_n, _, cache = reference.forward(cell, x, *(v.astype(np.float64) for v in w.values()), lengths=LENGTHS)
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    got = F.layer_backward(out.tape, dy)
    want = reference.backward(cache, dy)
    assert np.all(np.isfinite(out.y)) and np.all(np.isfinite(got.weight_hh))
    pairs = [(out.y, y), (out.h_n, h_n)] + [(getattr(got, n), want[n]) for n in ("dx", "dh0") + PARAM_NAMES]
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(np.abs(b).max(), 1.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_nan_input_propagates_to_its_own_row_only(rng, cell, dtype):
    # With the finiteness check off, a NaN must still show, never turn into a number.
    w = random_layer(rng, cell, I, H, dtype=dtype)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    x[2, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"^x: contains NaN"):
        F.layer_forward(cell, x, *w.values())
    out = F.layer_forward(cell, x, *w.values(), check_finite=False)
    assert np.all(np.isnan(out.y[2:, 1])) and np.all(np.isnan(out.h_n[1]))
    assert np.all(np.isfinite(out.y[:2])) and np.all(np.isfinite(np.delete(out.y, 1, axis=1)))
