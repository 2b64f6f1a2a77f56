"""Odd sizes (T=1, B=1, H=1, H=129, I != H), batch_first, unbatched input and non-contiguous views, all
against the float64 reference."""

import numpy as np
import pytest

from fusedrnn import functional as F
from fusedrnn import reference
from helpers import (CELL_CASES, CELLS, GATES, GRAD_NAMES, ODD_PROJECTED_SHAPES, has_cell_state, make_module, proj_of,
                     random_layer)

TOL = dict(rtol=1e-12, atol=1e-13)

SHAPES = {  # (T, B, I, H)
    "T1": (1, 3, 4, 5),
    "B1": (6, 1, 4, 5),
    "H1": (5, 3, 2, 1),
    "H129": (3, 2, 5, 129),
    "I1": (4, 3, 1, 6),
    "I_gt_H": (4, 2, 33, 3),
    "all1": (1, 1, 1, 1),
}


def _lengths(steps, batch):
    return np.maximum(1, steps - np.arange(batch) % steps)


def _check_layer(cell, x, w, h0, c0, lengths, reverse, dy, dh_n, dc_n):
    """Runs the kernel on the given (possibly strided) arrays and the reference on contiguous copies.
    `w` may hold "weight_hr" (a projection)."""
    out = F.layer_forward(cell, x, w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"], h0, c0,
                          lengths=lengths, reverse=reverse, weight_hr=w.get("weight_hr"))
    got = F.layer_backward(out.tape, dy, dh_n, dc_n)
    c = lambda a: None if a is None else np.array(a, order="C")  # noqa: E731
    y, h_n, c_n, cache = reference.forward(cell, c(x), c(w["weight_ih"]), c(w["weight_hh"]),
                                           c(w["bias_ih"]), c(w["bias_hh"]), c(h0), c(c0),
                                           lengths=c(lengths), reverse=reverse, weight_hr=c(w.get("weight_hr")))
    want = reference.backward(cache, c(dy), c(dh_n), c(dc_n))
    np.testing.assert_allclose(out.y, y, **TOL)
    np.testing.assert_allclose(out.h_n, h_n, **TOL)
    if has_cell_state(cell):
        np.testing.assert_allclose(out.c_n, c_n, **TOL)
    for name in ("dx", "dh0", "dc0") + GRAD_NAMES:
        if want[name] is not None:
            np.testing.assert_allclose(getattr(got, name), want[name], err_msg=name, **TOL)
    return out, got


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("cell", CELLS)
def test_layer_odd_sizes(rng, cell, shape, reverse):
    steps, batch, inp, hidden = shape
    w = random_layer(rng, cell, inp, hidden)
    x = rng.standard_normal((steps, batch, inp))
    h0 = rng.standard_normal((batch, hidden))
    c0 = rng.standard_normal((batch, hidden)) if has_cell_state(cell) else None
    dy = rng.standard_normal((steps, batch, hidden))
    dh_n = rng.standard_normal((batch, hidden))
    dc_n = rng.standard_normal((batch, hidden)) if has_cell_state(cell) else None
    out, _ = _check_layer(cell, x, w, h0, c0, _lengths(steps, batch), reverse, dy, dh_n, dc_n)
    assert out.y.shape == (steps, batch, hidden)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("shape", list(ODD_PROJECTED_SHAPES.values()), ids=list(ODD_PROJECTED_SHAPES))
def test_layer_odd_sizes_projected(rng, shape, reverse):
    steps, batch, inp, hidden, proj = shape
    w = random_layer(rng, "lstm", inp, hidden, proj_size=proj)
    x = rng.standard_normal((steps, batch, inp))
    h0, c0 = rng.standard_normal((batch, proj)), rng.standard_normal((batch, hidden))
    dy = rng.standard_normal((steps, batch, proj))
    dh_n, dc_n = rng.standard_normal((batch, proj)), rng.standard_normal((batch, hidden))
    out, got = _check_layer("lstm", x, w, h0, c0, _lengths(steps, batch), reverse, dy, dh_n, dc_n)
    assert out.y.shape == (steps, batch, proj) and out.c_n.shape == (batch, hidden)
    assert got.weight_hr.shape == (proj, hidden) and got.weight_hh.shape == (4 * hidden, proj)


@pytest.mark.parametrize("shape", [SHAPES["H129"], SHAPES["B1"], SHAPES["H1"]], ids=["H129", "B1", "H1"])
@pytest.mark.parametrize("cell", CELLS)
def test_layer_odd_sizes_float32(rng, cell, shape):
    steps, batch, inp, hidden = shape
    w = random_layer(rng, cell, inp, hidden, dtype=np.float32)
    x = rng.standard_normal((steps, batch, inp)).astype(np.float32)
    out = F.layer_forward(cell, x, *w.values())
    dy = rng.standard_normal((steps, batch, hidden)).astype(np.float32)
    got = F.layer_backward(out.tape, dy)
    y, h_n, _, cache = reference.forward(cell, x, *(v.astype(np.float64) for v in w.values()))
    want = reference.backward(cache, dy)
    for a, b in [(out.y, y), (out.h_n, h_n), (got.dx, want["dx"]), (got.weight_hh, want["weight_hh"]),
                 (got.weight_ih, want["weight_ih"]), (got.bias_hh, want["bias_hh"])]:
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


# ---- non-contiguous arrays ------------------------------------------------------------------------------


def _strided(rng, shape, kind):
    """A random array of `shape` that is a view with unusual strides."""
    if kind == "step":     # every other element along every axis of a larger array
        big = rng.standard_normal(tuple(2 * n + 1 for n in shape))
        return big[tuple(slice(1, None, 2) for _ in shape)]
    if kind == "fortran":
        return np.asfortranarray(rng.standard_normal(shape))
    if kind == "reversed":  # negative strides
        return rng.standard_normal(shape)[tuple(slice(None, None, -1) for _ in shape)]
    if kind == "transposed":  # the transpose of a C array: last axis not contiguous
        return rng.standard_normal(shape[::-1]).T
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["step", "fortran", "reversed", "transposed"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_layer_non_contiguous_everything(rng, cell, projected, kind):
    steps, batch, inp, hidden = 5, 3, 4, 6
    width = proj_of(hidden, projected) or hidden  # of h: P with a projection
    gh = GATES[cell] * hidden
    s = lambda *shape: _strided(rng, shape, kind)  # noqa: E731
    w = {"weight_ih": s(gh, inp), "weight_hh": s(gh, width), "bias_ih": s(gh), "bias_hh": s(gh)}
    if projected:
        w["weight_hr"] = s(width, hidden)
        w["weight_hr"] *= 0.6
    w["weight_ih"] *= 0.6  # in place: the views keep their strides
    w["weight_hh"] *= 0.6
    x, h0 = s(steps, batch, inp), s(batch, width)
    c0 = s(batch, hidden) if has_cell_state(cell) else None
    dy, dh_n = s(steps, batch, width), s(batch, width)
    dc_n = s(batch, hidden) if has_cell_state(cell) else None
    lengths = np.array([[5, 0], [2, 0], [4, 0]])[:, 0]  # an int64 view with a stride
    assert not x.flags.c_contiguous and not w["weight_ih"].flags.c_contiguous
    x_before = x.copy()
    _check_layer(cell, x, w, h0, c0, lengths, kind in ("reversed", "transposed"), dy, dh_n, dc_n)
    np.testing.assert_array_equal(x, x_before)  # inputs are never written


@pytest.mark.parametrize("team_size", [1, 2, 5], indirect=True)
@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
def test_rows_further_apart_than_blas_indexes(rng, tmp_path, cell, team_size):
    # Rows 2^31 + 64 elements apart (views of a sparse file): the 32-bit BLAS takes no such leading
    # dimension, so the core copies them instead of reading them in place, on any rank.
    steps, batch, inp, hidden = 2, 2, 4, 256  # wide enough for every rank of the team to take a share
    stride = 2**31 + 64
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(steps * batch * stride * 4 + 4096)
    big = np.memmap(path, np.float32, "r+")
    view = lambda offset, width: np.lib.stride_tricks.as_strided(  # noqa: E731
        big[offset:], (steps, batch, width), (batch * stride * 4, stride * 4, 4))
    x, dy = view(0, inp), view(inp, hidden)
    x[...] = rng.standard_normal(x.shape)
    dy[...] = rng.standard_normal(dy.shape)
    w = random_layer(rng, cell, inp, hidden, dtype=np.float32)
    args = (w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"])
    out = F.layer_forward(cell, x, *args)
    grads = F.layer_backward(out.tape, dy)
    dense = F.layer_forward(cell, np.array(x), *args)
    want = F.layer_backward(dense.tape, np.array(dy))
    np.testing.assert_array_equal(out.y, dense.y)
    np.testing.assert_array_equal(grads.dx, want.dx)
    np.testing.assert_array_equal(grads.weight_ih, want.weight_ih)
    np.testing.assert_array_equal(grads.weight_hh, want.weight_hh)


@pytest.mark.parametrize("cell", CELLS)
def test_layer_dy_column_slice_of_wider_gradient(rng, cell):
    # The modules pass one direction's half of a (T, B, 2H) gradient; a slice must read the right columns.
    steps, batch, inp, hidden = 4, 3, 2, 5
    w = random_layer(rng, cell, inp, hidden)
    x = rng.standard_normal((steps, batch, inp))
    wide = rng.standard_normal((steps, batch, 3 * hidden))
    for k in range(3):
        dy = wide[:, :, k * hidden:(k + 1) * hidden]
        _check_layer(cell, x, w, None, None, None, False, dy, None, None)


def _unaligned(rng, shape, dtype):
    """A random array whose data pointer is NOT a multiple of its itemsize (a view at a 1-byte offset)."""
    n = int(np.prod(shape))
    buf = np.zeros(n * np.dtype(dtype).itemsize + 1, np.uint8)
    arr = np.frombuffer(buf.data, dtype=dtype, count=n, offset=1).reshape(shape)
    arr[...] = 0.6 * rng.standard_normal(shape)
    return arr


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_layer_unaligned_arrays(rng, cell, dtype):
    steps, batch, inp, hidden = 6, 5, 9, 17
    gh = GATES[cell] * hidden
    u = lambda *shape: _unaligned(rng, shape, dtype)  # noqa: E731
    w = {"weight_ih": u(gh, inp), "weight_hh": u(gh, hidden), "bias_ih": u(gh), "bias_hh": u(gh)}
    x, h0, dy, dh_n = u(steps, batch, inp), u(batch, hidden), u(steps, batch, hidden), u(batch, hidden)
    c0, dc_n = (u(batch, hidden), u(batch, hidden)) if has_cell_state(cell) else (None, None)
    assert not x.flags.aligned and not w["weight_hh"].flags.aligned and not dy.flags.aligned
    if dtype == np.float64:
        _check_layer(cell, x, w, h0, c0, _lengths(steps, batch), True, dy, dh_n, dc_n)
        return
    out = F.layer_forward(cell, x, *w.values(), h0, c0, lengths=_lengths(steps, batch), reverse=True)
    got = F.layer_backward(out.tape, dy, dh_n, dc_n)
    as64 = lambda a: None if a is None else np.array(a, np.float64)  # noqa: E731
    y, _, _, cache = reference.forward(cell, as64(x), *(as64(v) for v in w.values()), as64(h0), as64(c0),
                                       lengths=_lengths(steps, batch), reverse=True)
    want = reference.backward(cache, as64(dy), as64(dh_n), as64(dc_n))
    for a, b in [(out.y, y), (got.dx, want["dx"]), (got.weight_hh, want["weight_hh"])]:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("cell", CELLS)
def test_module_unaligned_input(rng, cell):
    m = make_module(cell, 9, 7, num_layers=2, bidirectional=True, dtype=np.float64, seed=1)
    x = _unaligned(rng, (6, 5, 9), np.float64)
    y, _ = m(x)
    want, _, _, _ = reference.stack_forward(cell, m.state_dict(), np.array(x), num_layers=2, bidirectional=True)
    np.testing.assert_allclose(y, want, **TOL)
    dx, _ = m.backward(_unaligned(rng, y.shape, np.float64))
    assert np.all(np.isfinite(dx)) and np.any(dx)


@pytest.mark.parametrize("cell", CELLS)
def test_read_only_and_broadcast_inputs(rng, cell):
    # Inputs are only read: read-only arrays and zero-stride broadcasts are valid everywhere.
    steps, batch, inp, hidden = 5, 3, 4, 6
    w = random_layer(rng, cell, inp, hidden)
    for v in w.values():
        v.flags.writeable = False
    x = np.broadcast_to(rng.standard_normal((1, batch, inp)), (steps, batch, inp))
    h0 = np.broadcast_to(rng.standard_normal(hidden), (batch, hidden))
    c0 = np.broadcast_to(rng.standard_normal(hidden), (batch, hidden)) if has_cell_state(cell) else None
    dy = np.broadcast_to(rng.standard_normal((steps, 1, hidden)), (steps, batch, hidden))
    dh_n = np.broadcast_to(rng.standard_normal((batch, 1)), (batch, hidden))
    dc_n = np.broadcast_to(rng.standard_normal(hidden), (batch, hidden)) if has_cell_state(cell) else None
    assert not x.flags.writeable and x.strides[0] == 0
    _check_layer(cell, x, w, h0, c0, np.array([5, 2, 4]), False, dy, dh_n, dc_n)
    m = make_module(cell, inp, hidden, dtype=np.float64, seed=0)
    y, _ = m(x)
    want, _, _, _ = reference.stack_forward(cell, m.state_dict(), np.array(x))
    np.testing.assert_allclose(y, want, **TOL)


# ---- module-level layouts --------------------------------------------------------------------------------


def _module_case(rng, cell, inp, hidden, *, batch_first=False, num_layers=2, bidirectional=True):
    m = make_module(cell, inp, hidden, num_layers=num_layers, bidirectional=bidirectional,
                    batch_first=batch_first, dtype=np.float64, seed=int(rng.integers(2**31)))
    lead = num_layers * (2 if bidirectional else 1)
    return m, lead


def _reference_module(m, cell, x_seq, h0, c0, lengths, dy_seq, dh_n, dc_n):
    """The reference on sequence-major float64 arrays with the module's parameters."""
    kw = dict(num_layers=m.num_layers, bidirectional=m.bidirectional)
    y, h_n, c_n, caches = reference.stack_forward(cell, m.state_dict(), x_seq, h0, c0, lengths=lengths, **kw)
    dx, dh0, dc0, grads, _ = reference.stack_backward(caches, dy_seq, dh_n, dc_n, **kw)
    return y, h_n, c_n, dx, dh0, dc0, grads


def _call(m, cell, x, h0, c0, lengths, dy, dh_n, dc_n):
    hx = ((h0, c0) if h0 is not None else None) if has_cell_state(cell) else h0
    y, state = m(x, hx, lengths=lengths)
    dx, dstate = m.backward(dy, (dh_n, dc_n) if has_cell_state(cell) else dh_n)
    h_n, c_n = state if has_cell_state(cell) else (state, None)
    dh0, dc0 = dstate if has_cell_state(cell) else (dstate, None)
    return y, h_n, c_n, dx, dh0, dc0


def _assert_module_matches(got, want, grads_got, grads_want, cell):
    names = ("y", "h_n", "c_n", "dx", "dh0", "dc0")
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
        else:
            np.testing.assert_allclose(a, b, err_msg=name, **TOL)
    assert set(grads_got) == set(grads_want)
    for name in grads_want:
        np.testing.assert_allclose(grads_got[name], grads_want[name], err_msg=name, **TOL)


@pytest.mark.parametrize("shape", [SHAPES["T1"], SHAPES["B1"], SHAPES["H1"], SHAPES["I_gt_H"]],
                         ids=["T1", "B1", "H1", "I_gt_H"])
@pytest.mark.parametrize("cell", CELLS)
def test_module_batch_first(rng, cell, shape):
    steps, batch, inp, hidden = shape
    m, lead = _module_case(rng, cell, inp, hidden, batch_first=True)
    x = rng.standard_normal((batch, steps, inp))
    h0 = rng.standard_normal((lead, batch, hidden))
    c0 = rng.standard_normal((lead, batch, hidden)) if has_cell_state(cell) else None
    dy = rng.standard_normal((batch, steps, 2 * hidden))
    dh_n = rng.standard_normal((lead, batch, hidden))
    dc_n = rng.standard_normal((lead, batch, hidden)) if has_cell_state(cell) else None
    lengths = _lengths(steps, batch)
    got = _call(m, cell, x, h0, c0, lengths, dy, dh_n, dc_n)
    y, h_n, c_n, dx, dh0, dc0, grads = _reference_module(m, cell, x.transpose(1, 0, 2), h0, c0, lengths,
                                                         dy.transpose(1, 0, 2), dh_n, dc_n)
    want = (y.transpose(1, 0, 2), h_n, c_n, dx.transpose(1, 0, 2), dh0, dc0)
    assert got[0].shape == (batch, steps, 2 * hidden) and got[3].shape == x.shape
    _assert_module_matches(got, want, m.grads, grads, cell)


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_major", "batch_first"])
@pytest.mark.parametrize("cell", CELLS)
def test_module_unbatched(rng, cell, batch_first):
    # A 2-D (T, input_size) input is one sequence whatever batch_first says, as in torch.nn.
    steps, inp, hidden = 5, 3, 4
    m, lead = _module_case(rng, cell, inp, hidden, batch_first=batch_first)
    x = rng.standard_normal((steps, inp))
    h0 = rng.standard_normal((lead, hidden))
    c0 = rng.standard_normal((lead, hidden)) if has_cell_state(cell) else None
    dy = rng.standard_normal((steps, 2 * hidden))
    dh_n = rng.standard_normal((lead, hidden))
    dc_n = rng.standard_normal((lead, hidden)) if has_cell_state(cell) else None
    got = _call(m, cell, x, h0, c0, None, dy, dh_n, dc_n)
    add_batch = lambda a: None if a is None else a[:, None, :]  # noqa: E731
    ref = _reference_module(m, cell, add_batch(x), add_batch(h0), add_batch(c0), None, add_batch(dy),
                            add_batch(dh_n), add_batch(dc_n))
    want = tuple(None if a is None else a[:, 0, :] for a in ref[:6])
    assert got[0].shape == (steps, 2 * hidden) and got[1].shape == (lead, hidden)
    assert got[3].shape == (steps, inp) and got[4].shape == (lead, hidden)
    _assert_module_matches(got, want, m.grads, ref[6], cell)
    assert m.input_grads["x"].shape == (steps, inp)


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_major", "batch_first"])
@pytest.mark.parametrize("kind", ["step", "fortran", "reversed"])
@pytest.mark.parametrize("cell", CELLS)
def test_module_non_contiguous_inputs(rng, cell, kind, batch_first):
    steps, batch, inp, hidden = 4, 3, 5, 3
    m, lead = _module_case(rng, cell, inp, hidden, batch_first=batch_first)
    s = lambda *shape: _strided(rng, shape, kind)  # noqa: E731
    x = s(batch, steps, inp) if batch_first else s(steps, batch, inp)
    h0 = s(lead, batch, hidden)
    c0 = s(lead, batch, hidden) if has_cell_state(cell) else None
    dy = s(batch, steps, 2 * hidden) if batch_first else s(steps, batch, 2 * hidden)
    dh_n = s(lead, batch, hidden)
    dc_n = s(lead, batch, hidden) if has_cell_state(cell) else None
    lengths = np.array([3, 0, 4, 0, 1, 0])[::2]  # a strided view
    got = _call(m, cell, x, h0, c0, lengths, dy, dh_n, dc_n)
    seq = (lambda a: a.transpose(1, 0, 2)) if batch_first else (lambda a: a)
    y, h_n, c_n, dx, dh0, dc0, grads = _reference_module(m, cell, seq(x), h0, c0, lengths, seq(dy), dh_n,
                                                         dc_n)
    _assert_module_matches(got, (seq(y), h_n, c_n, seq(dx), dh0, dc0), m.grads, grads, cell)


def test_module_x_slice_with_strides_from_larger_array(rng):
    # x[::2, :, 1::2] of a larger array, non-contiguous in two axes at once: the same as its contiguous copy.
    big = rng.standard_normal((10, 3, 8))
    x = big[::2, :, 1::2]
    m = make_module("lstm", 4, 5, dtype=np.float64, seed=3)
    y, (h_n, c_n) = m(x)
    y2, (h2, c2) = m(np.ascontiguousarray(x))
    np.testing.assert_allclose(y, y2, **TOL)
    np.testing.assert_allclose(h_n, h2, **TOL)
    np.testing.assert_allclose(c_n, c2, **TOL)
    ref_y, ref_h, ref_c, _ = reference.stack_forward("lstm", m.state_dict(), np.ascontiguousarray(x))
    np.testing.assert_allclose(y, ref_y, **TOL)
    np.testing.assert_allclose(h_n, ref_h, **TOL)
    np.testing.assert_allclose(c_n, ref_c, **TOL)
