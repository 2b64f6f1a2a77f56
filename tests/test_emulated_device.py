"""The CUDA backend's device code, run on the host (the "emulated_device" backend: its orchestration,
kernel bodies and persistent kernels with host BLAS and loops over the grid), against the CPU backend on
every axis the CPU tests cover: cells, dtypes, odd sizes, lengths, directions, biases, initial states,
layers, strided inputs, inference, cell_clip, an LSTM's projection (proj_size), forward and backward.
Two independent implementations in the same dtype, so helpers.tolerances applies; bit-level equality is
not expected."""

import numpy as np
import pytest

from fusedrnn import _core, _stack
from fusedrnn import functional as F
from helpers import (CELLS, GATES, GRAD_NAMES, ODD_PROJECTED_SHAPES, PARAM_NAMES, assert_close, has_cell_state,
                     random_layer, random_lengths)

DTYPES = [np.float64, np.float32]
SHAPES = {  # (T, B, I, H)
    "T1": (1, 3, 4, 5),
    "B1": (6, 1, 4, 5),
    "H1": (5, 3, 2, 1),
    "H129": (3, 2, 5, 129),
    "I1": (4, 3, 1, 6),
    "I_gt_H": (4, 2, 33, 3),
    "all1": (1, 1, 1, 1),
    "B17": (3, 17, 6, 10),
}


@pytest.fixture(autouse=True, params=["per_step", "persistent"])
def recurrence(request):
    """Every test runs with the recurrence, forward and backward, per step and as the persistent
    kernels (which fall back to per step where they do not fit), restoring the default after."""
    _core.set_emulated_recurrence_path(request.param)
    yield request.param
    _core.set_emulated_recurrence_path("auto")


def _layer_case(rng, cell, shape, dtype, *, bias=True, with_state=True, lengths=True, proj=0):
    """Weights and arrays of one layer; with proj > 0 an LSTM projecting h to proj features."""
    steps, batch, inp, hidden = shape
    width = proj or hidden
    w = random_layer(rng, cell, inp, hidden, bias=bias, dtype=dtype, proj_size=proj)
    arrays = dict(
        x=rng.standard_normal((steps, batch, inp)).astype(dtype),
        h0=rng.standard_normal((batch, width)).astype(dtype) if with_state else None,
        c0=rng.standard_normal((batch, hidden)).astype(dtype) if with_state and has_cell_state(cell) else None,
        lengths=random_lengths(rng, steps, batch).astype(np.int64) if lengths else None,
        dy=rng.standard_normal((steps, batch, width)).astype(dtype),
        dh_n=rng.standard_normal((batch, width)).astype(dtype),
        dc_n=rng.standard_normal((batch, hidden)).astype(dtype) if has_cell_state(cell) else None,
    )
    return w, arrays


def _run(backend, cell, w, a, *, reverse, training=True, cell_clip=None, x=None):
    out = F._forward(cell, a["x"] if x is None else x, w["weight_ih"], w["weight_hh"], w["bias_ih"],
                     w["bias_hh"], a["h0"], a["c0"], a["lengths"], reverse, training, None, cell_clip,
                     w.get("weight_hr"), backend=backend)
    if not training:
        return out, None
    return out, F.layer_backward(out.tape, a["dy"], a["dh_n"], a["dc_n"])


def _compare(cell, dtype, got, want):
    (out, grads), (ref_out, ref_grads) = got, want
    assert_close(out.y, ref_out.y, dtype, "y")
    assert_close(out.h_n, ref_out.h_n, dtype, "h_n")
    if has_cell_state(cell):
        assert_close(out.c_n, ref_out.c_n, dtype, "c_n")
    if grads is None:
        return
    for name in ("dx", "dh0", "dc0", "dh_norm") + GRAD_NAMES:
        if getattr(ref_grads, name) is not None:
            assert_close(getattr(grads, name), getattr(ref_grads, name), dtype, name)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("cell", CELLS)
def test_layer_matches_cpu(rng, cell, dtype, shape, reverse):
    w, a = _layer_case(rng, cell, shape, dtype)
    got = _run("emulated_device", cell, w, a, reverse=reverse)
    assert got[0].tape.backend == "emulated_device"
    _compare(cell, dtype, got, _run("cpu", cell, w, a, reverse=reverse))


@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("cell", CELLS)
def test_layer_variants_match_cpu(rng, cell, bias, with_state, lengths):
    w, a = _layer_case(rng, cell, (7, 4, 6, 9), np.float64, bias=bias, with_state=with_state, lengths=lengths)
    for reverse in (False, True):
        _compare(cell, np.float64, _run("emulated_device", cell, w, a, reverse=reverse),
                 _run("cpu", cell, w, a, reverse=reverse))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("cell", CELLS)
def test_inference_matches_cpu(rng, cell, dtype):
    """Inference keeps two state slots, used alternately; odd and even step counts end in either."""
    for steps in (4, 5):
        w, a = _layer_case(rng, cell, (steps, 3, 4, 6), dtype)
        for reverse in (False, True):
            got = _run("emulated_device", cell, w, a, reverse=reverse, training=False)
            assert got[0].tape is None
            _compare(cell, dtype, got, _run("cpu", cell, w, a, reverse=reverse, training=False))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_cell_clip_matches_cpu(rng, dtype):
    w, a = _layer_case(rng, "lstm", (6, 3, 4, 5), dtype)
    a["x"] *= 4  # drives the cell state past the bound
    clip = 0.8
    got = _run("emulated_device", "lstm", w, a, reverse=False, cell_clip=clip)
    assert np.abs(got[0].c_n).max() == pytest.approx(clip)
    _compare("lstm", dtype, got, _run("cpu", "lstm", w, a, reverse=False, cell_clip=clip))


@pytest.mark.parametrize("cell", CELLS)
def test_strided_inputs_are_gathered(rng, cell):
    """x as a (T, B, I) view whose rows are not evenly spaced and weights in Fortran order: the GEMMs
    cannot read them in place, so the backend gathers them into its workspace first."""
    steps, batch, inp, hidden = 5, 3, 4, 6
    w, a = _layer_case(rng, cell, (steps, batch, inp, hidden), np.float64)
    x_bt = rng.standard_normal((batch, steps, inp))
    x = x_bt.transpose(1, 0, 2)
    a["x"] = np.ascontiguousarray(x)
    strided_w = {k: None if v is None else (np.asfortranarray(v) if v.ndim == 2 else v) for k, v in w.items()}
    assert not strided_w["weight_hh"].flags.c_contiguous or GATES[cell] * hidden == 1
    got = _run("emulated_device", cell, strided_w, a, reverse=True, x=x)
    _compare(cell, np.float64, got, _run("cpu", cell, w, a, reverse=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("cell", CELLS)
def test_stack_of_bidirectional_layers_matches_cpu(rng, cell, dtype):
    steps, batch, inp, hidden, layers, dirs = 6, 4, 5, 7, 2, 2
    weights = [[tuple(random_layer(rng, cell, inp if layer == 0 else dirs * hidden, hidden, dtype=dtype).values())
                for _ in range(dirs)] for layer in range(layers)]
    x = rng.standard_normal((steps, batch, inp)).astype(dtype)
    h0 = rng.standard_normal((layers * dirs, batch, hidden)).astype(dtype)
    c0 = rng.standard_normal((layers * dirs, batch, hidden)).astype(dtype) if has_cell_state(cell) else None
    lengths = random_lengths(rng, steps, batch).astype(np.int64)
    dy = rng.standard_normal((steps, batch, dirs * hidden)).astype(dtype)
    results = {}
    for backend in ("cpu", "emulated_device"):
        out = _stack.forward(cell, x, weights, h0, c0, lengths=lengths, backend=backend)
        grads = [[tuple(np.zeros_like(p) for p in direction) for direction in layer] for layer in weights]
        g = _stack.backward(out.tapes, dy, dropout_masks=out.dropout_masks, grads=grads)
        results[backend] = (out, g, grads)
    (out, g, grads), (ref, ref_g, ref_grads) = results["emulated_device"], results["cpu"]
    assert out.tapes[1][1].backend == "emulated_device"
    for name, got, want in [("y", out.y, ref.y), ("h_n", out.h_n, ref.h_n), ("c_n", out.c_n, ref.c_n),
                            ("dx", g.dx, ref_g.dx), ("dh0", g.dh0, ref_g.dh0), ("dc0", g.dc0, ref_g.dc0),
                            ("dh_norm", g.dh_norm, ref_g.dh_norm)]:
        if want is not None:
            assert_close(got, want, dtype, name)
    for layer in range(layers):
        for d in range(dirs):
            for name, got, want in zip(PARAM_NAMES, grads[layer][d], ref_grads[layer][d]):
                assert_close(got, want, dtype, f"{name} l{layer} d{d}")


@pytest.mark.parametrize("cell", CELLS)
def test_repeated_calls_are_bit_identical(rng, cell):
    w, a = _layer_case(rng, cell, (6, 5, 4, 33), np.float32)
    first, again = (_run("emulated_device", cell, w, a, reverse=False) for _ in range(2))
    for name in ("y", "h_n", "c_n"):
        if getattr(first[0], name) is not None:
            assert np.array_equal(getattr(first[0], name), getattr(again[0], name)), name
    for name in ("dx", "dh0", "dh_norm") + PARAM_NAMES:
        assert np.array_equal(getattr(first[1], name), getattr(again[1], name)), name


def test_backward_accumulates_and_writes_dx_and_gradients_as_asked(rng):
    cell, dtype = "gru", np.float64
    w, a = _layer_case(rng, cell, (4, 3, 5, 6), dtype)
    out, _ = _run("emulated_device", cell, w, a, reverse=False, training=True)
    once = F.layer_backward(out.tape, a["dy"])
    dx = np.full_like(a["x"], 2.0)
    grads = F.LayerGrads(None, None, None, *(np.ones_like(v) for v in w.values()))
    twice = F.layer_backward(out.tape, a["dy"], dx=dx, grads=grads)
    assert_close(twice.dx, once.dx + 2.0, dtype, "dx accumulated")
    for name in PARAM_NAMES:
        assert_close(getattr(twice, name), getattr(once, name) + 1.0, dtype, name)
    written = np.full_like(a["x"], np.nan)
    _core.layer_backward(out.tape, a["dy"], None, None, written, *(np.zeros_like(v) for v in w.values()), False)
    assert_close(written, once.dx, dtype, "dx written")
    written_grads = [np.full_like(v, np.nan) for v in w.values()]
    _core.layer_backward(out.tape, a["dy"], None, None, None, *written_grads, accumulate_grads=False)
    for name, got in zip(PARAM_NAMES, written_grads):
        assert_close(got, getattr(once, name), dtype, f"{name} written")


@pytest.mark.parametrize("groups", [6, 2], ids=["per_row", "triples"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("cell, proj", [(c, 0) for c in CELLS] + [("lstm", 3)])
def test_gradients_per_group_of_rows_match_cpu(rng, cell, proj, dtype, reverse, groups):
    """grad_groups on the device: each group's weight and bias gradients (batched GEMMs over the
    groups, a group's rows adding in turn) as the CPU backend's, written and added into given buffers."""
    w, a = _layer_case(rng, cell, (5, 6, 4, 7), dtype, proj=proj)
    results = {}
    for backend in ("cpu", "emulated_device"):
        out, _ = _run(backend, cell, w, a, reverse=reverse)
        results[backend] = (out.tape, F.layer_backward(out.tape, a["dy"], a["dh_n"], a["dc_n"], grad_groups=groups))
    (tape, got), (_, want) = results["emulated_device"], results["cpu"]
    for name in ("dx", "dh0", "dc0") + GRAD_NAMES:
        if getattr(want, name) is not None:
            assert getattr(got, name).shape == getattr(want, name).shape, name
            assert_close(getattr(got, name), getattr(want, name), dtype, name)
    start = {n: rng.standard_normal(getattr(want, n).shape).astype(dtype) for n in GRAD_NAMES
             if getattr(want, n) is not None}
    buffers = F.LayerGrads(None, None, None, None, None, None, None)._replace(**{n: v.copy() for n, v in start.items()})
    added = F.layer_backward(tape, a["dy"], a["dh_n"], a["dc_n"], grads=buffers, grad_groups=groups)
    for name in start:
        assert_close(getattr(added, name), start[name] + getattr(want, name), dtype, f"{name} added")


def _run_counting_launches(cell, w, a, *, reverse, backward_path=None):
    """_run on the emulated device, with the cooperative launches of its forward and of its backward;
    the backward on `backward_path` where given (the forward's path restored after)."""
    start = _core.emulated_cooperative_launches()
    out = F._forward(cell, a["x"], w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"], a["h0"], a["c0"],
                     a["lengths"], reverse, True, None, None, backend="emulated_device")
    middle = _core.emulated_cooperative_launches()
    forward_path = _core.get_emulated_recurrence_path()
    _core.set_emulated_recurrence_path(backward_path or forward_path)
    try:
        grads = F.layer_backward(out.tape, a["dy"], a["dh_n"], a["dc_n"])
    finally:
        _core.set_emulated_recurrence_path(forward_path)
    return (out, grads), (middle - start, _core.emulated_cooperative_launches() - middle)


def test_persistent_kernel_runs_where_it_fits_and_falls_back_where_not(rng, recurrence):
    """The forced persistent path launches one cooperative kernel per layer call, forward and backward;
    a layer whose W_hh slices need more blocks than the (emulated H200's) multiprocessors hold runs per
    step instead, both ways. 'auto' takes the persistent kernels only for small batches and layers."""
    cell, dtype = "lstm", np.float64

    def launches_for(shape):
        w, a = _layer_case(rng, cell, shape, dtype, lengths=False)
        got, launches = _run_counting_launches(cell, w, a, reverse=False)
        _compare(cell, dtype, got, _run("cpu", cell, w, a, reverse=False))
        return launches

    assert launches_for((3, 2, 3, 129)) == ((1, 1) if recurrence == "persistent" else (0, 0))
    # 70 rows x 4 gates: more sums than a block's threads, so the forward's are not split.
    assert launches_for((2, 70, 2, 20)) == ((1, 1) if recurrence == "persistent" else (0, 0))
    # 4 gates x 1024 units of float64: 7 units (229 KB) a block, 147 blocks, one resident per SM.
    assert launches_for((2, 1, 2, 1024)) == (0, 0)
    _core.set_emulated_recurrence_path("auto")
    assert launches_for((3, 16, 3, 20)) == (1, 1)
    assert launches_for((3, 17, 3, 20)) == (0, 0)
    assert launches_for((2, 4, 3, 257)) == (0, 0)


def test_persistent_kernels_split_their_sums_over_idle_threads(recurrence):
    """A block per multiprocessor (132 on the emulated H200), each with a few units; where a step's sums
    (forward: over H, for B rows x G*units gate rows; backward: over the G*H gate rows, for B rows x
    units) are fewer than the block's 256 threads, each is split over as many threads as are free, the
    partial sums in shared memory beside the W_hh slice."""
    def shapes(cell, batch, hidden, dtype):
        forward, backward = _core.emulated_persistent_shapes(cell, batch, hidden, dtype)
        return [(p["blocks"], p["units"], p["parts"]) for p in (forward, backward)]

    if recurrence == "per_step":
        assert shapes("lstm", 2, 101, np.float64) == [(0, 0, 1), (0, 0, 1)]
        return
    assert shapes("lstm", 2, 101, np.float64) == [(101, 1, 32), (101, 1, 128)]   # 8 and 2 sums a block
    assert shapes("gru", 1, 5, np.float32) == [(5, 1, 5), (5, 1, 15)]            # at most one term a part
    assert shapes("lstm", 16, 256, np.float32) == [(128, 2, 2), (128, 2, 8)]     # 128 and 32 sums a block
    assert shapes("lstm", 70, 20, np.float64) == [(20, 1, 1), (20, 1, 3)]        # 280 sums: none split
    # The slice (one unit's 4 x 64 weights), then the parts: 21 x 12 sums forward, 85 x 3 backward.
    forward, backward = _core.emulated_persistent_shapes("lstm", 3, 64, np.float64)
    assert (forward["parts"], forward["shared_bytes"]) == (21, 4 * 64 * 8 + 21 * 12 * 8)
    assert (backward["parts"], backward["shared_bytes"]) == (85, 4 * 64 * 8 + 85 * 3 * 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("cell", CELLS)
def test_persistent_backward_matches_cpu_and_repeats_bit_identically(rng, cell, dtype, recurrence):
    """The persistent backward, where the fixture forces it, on an odd size, lengths and both
    directions: the CPU backend's values to float tolerances and, run again on the same tape, the same
    bits. Each of its 101 blocks has one unit and splits its sums over the gate rows."""
    w, a = _layer_case(rng, cell, (5, 2, 7, 101), dtype)
    expected = (1, 1) if recurrence == "persistent" else (0, 0)
    for reverse in (False, True):
        got, launches = _run_counting_launches(cell, w, a, reverse=reverse)
        assert launches == expected
        _compare(cell, dtype, got, _run("cpu", cell, w, a, reverse=reverse))
        again = F.layer_backward(got[0].tape, a["dy"], a["dh_n"], a["dc_n"])
        for name in ("dx", "dh0", "dc0", "dh_norm") + PARAM_NAMES:
            if getattr(got[1], name) is not None:
                assert np.array_equal(getattr(again, name), getattr(got[1], name)), name


@pytest.mark.parametrize("cell", CELLS)
def test_backward_on_the_other_path_than_its_forward(rng, cell, recurrence):
    """The forward and backward kernels decide their path each on its own (a GPU may hold every block of
    the persistent forward but not of the backward, which needs more registers and shared memory): a
    tape recorded on one path is differentiated on the other, with the CPU backend's values."""
    other = "per_step" if recurrence == "persistent" else "persistent"
    w, a = _layer_case(rng, cell, (5, 3, 4, 37), np.float64)
    for reverse in (False, True):
        got, launches = _run_counting_launches(cell, w, a, reverse=reverse, backward_path=other)
        assert launches == ((1, 0) if recurrence == "persistent" else (0, 1))
        _compare(cell, np.float64, got, _run("cpu", cell, w, a, reverse=reverse))


def test_unknown_backend_and_path_are_refused(rng):
    w, a = _layer_case(rng, "rnn_tanh", (2, 2, 2, 2), np.float64)
    with pytest.raises(ValueError, match="backend"):
        _run("gpu", "rnn_tanh", w, a, reverse=False)
    with pytest.raises(ValueError, match="kind"):
        _core.set_emulated_recurrence_path("sometimes")


# ---- an LSTM with a projection (proj_size) ---------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("shape", list(ODD_PROJECTED_SHAPES.values()), ids=list(ODD_PROJECTED_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_projected_layer_matches_cpu(rng, dtype, shape, reverse):
    """Outputs, states and every gradient (weight_hr's too) against the CPU backend, with lengths."""
    *dims, proj = shape
    w, a = _layer_case(rng, "lstm", tuple(dims), dtype, proj=proj)
    got = _run("emulated_device", "lstm", w, a, reverse=reverse)
    assert got[0].tape.backend == "emulated_device" and got[0].tape.proj_size == proj
    assert got[0].y.shape == (dims[0], dims[1], proj) and got[1].weight_hr.shape == (proj, dims[3])
    _compare("lstm", dtype, got, _run("cpu", "lstm", w, a, reverse=reverse))


@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_projected_variants_match_cpu(rng, bias, with_state, lengths):
    w, a = _layer_case(rng, "lstm", (7, 4, 6, 9), np.float64, bias=bias, with_state=with_state, lengths=lengths,
                       proj=4)
    for reverse in (False, True):
        _compare("lstm", np.float64, _run("emulated_device", "lstm", w, a, reverse=reverse),
                 _run("cpu", "lstm", w, a, reverse=reverse))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_projected_inference_matches_cpu(rng, dtype):
    """Inference keeps one slot of cell outputs and two state slots; odd and even step counts."""
    for steps in (4, 5):
        w, a = _layer_case(rng, "lstm", (steps, 3, 4, 6), dtype, proj=2)
        for reverse in (False, True):
            got = _run("emulated_device", "lstm", w, a, reverse=reverse, training=False)
            assert got[0].tape is None
            _compare("lstm", dtype, got, _run("cpu", "lstm", w, a, reverse=reverse, training=False))


def test_projected_cell_clip_matches_cpu(rng):
    w, a = _layer_case(rng, "lstm", (6, 3, 4, 5), np.float64, proj=3)
    a["x"] *= 4
    got = _run("emulated_device", "lstm", w, a, reverse=True, cell_clip=0.8)
    assert np.abs(got[0].c_n).max() == pytest.approx(0.8)
    _compare("lstm", np.float64, got, _run("cpu", "lstm", w, a, reverse=True, cell_clip=0.8))


def test_projected_strided_weights_are_gathered(rng):
    """weight_hr (and the others) in Fortran order: the GEMMs cannot read them in place."""
    w, a = _layer_case(rng, "lstm", (5, 3, 4, 6), np.float64, proj=2)
    strided = {k: None if v is None else (np.asfortranarray(v) if v.ndim == 2 else v) for k, v in w.items()}
    assert not strided["weight_hr"].flags.c_contiguous
    _compare("lstm", np.float64, _run("emulated_device", "lstm", strided, a, reverse=False),
             _run("cpu", "lstm", w, a, reverse=False))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_projected_stack_of_bidirectional_layers_matches_cpu(rng, dtype):
    steps, batch, inp, hidden, proj, layers, dirs = 6, 4, 5, 7, 3, 2, 2
    weights = [[tuple(random_layer(rng, "lstm", inp if layer == 0 else dirs * proj, hidden, dtype=dtype,
                                   proj_size=proj).values()) for _ in range(dirs)] for layer in range(layers)]
    x = rng.standard_normal((steps, batch, inp)).astype(dtype)
    h0 = rng.standard_normal((layers * dirs, batch, proj)).astype(dtype)
    c0 = rng.standard_normal((layers * dirs, batch, hidden)).astype(dtype)
    lengths = random_lengths(rng, steps, batch).astype(np.int64)
    dy = rng.standard_normal((steps, batch, dirs * proj)).astype(dtype)
    results = {}
    for backend in ("cpu", "emulated_device"):
        out = _stack.forward("lstm", x, weights, h0, c0, lengths=lengths, backend=backend)
        grads = [[tuple(np.zeros_like(p) for p in direction) for direction in layer] for layer in weights]
        g = _stack.backward(out.tapes, dy, dropout_masks=out.dropout_masks, grads=grads)
        results[backend] = (out, g, grads)
    (out, g, grads), (ref, ref_g, ref_grads) = results["emulated_device"], results["cpu"]
    assert out.tapes[1][1].backend == "emulated_device" and out.y.shape == (steps, batch, dirs * proj)
    for name, got, want in [("y", out.y, ref.y), ("h_n", out.h_n, ref.h_n), ("c_n", out.c_n, ref.c_n),
                            ("dx", g.dx, ref_g.dx), ("dh0", g.dh0, ref_g.dh0), ("dc0", g.dc0, ref_g.dc0),
                            ("dh_norm", g.dh_norm, ref_g.dh_norm)]:
        assert_close(got, want, dtype, name)
    for layer in range(layers):
        for d in range(dirs):
            for name, got, want in zip(GRAD_NAMES, grads[layer][d], ref_grads[layer][d]):
                assert_close(got, want, dtype, f"{name} l{layer} d{d}")


def test_projected_repeated_calls_are_bit_identical(rng):
    w, a = _layer_case(rng, "lstm", (6, 5, 4, 33), np.float32, proj=11)
    first, again = (_run("emulated_device", "lstm", w, a, reverse=True) for _ in range(2))
    for name in ("y", "h_n", "c_n"):
        assert np.array_equal(getattr(first[0], name), getattr(again[0], name)), name
    for name in ("dx", "dh0", "dc0", "dh_norm") + GRAD_NAMES:
        assert np.array_equal(getattr(first[1], name), getattr(again[1], name)), name


def test_projected_backward_accumulates_weight_hr(rng):
    w, a = _layer_case(rng, "lstm", (4, 3, 5, 6), np.float64, proj=2)
    out, once = _run("emulated_device", "lstm", w, a, reverse=False)
    grads = F.LayerGrads(None, None, None, *(np.ones_like(w[n]) for n in PARAM_NAMES), weight_hr=np.ones_like(
        w["weight_hr"]))
    twice = F.layer_backward(out.tape, a["dy"], a["dh_n"], a["dc_n"], grads=grads)
    for name in GRAD_NAMES:
        assert_close(getattr(twice, name), getattr(once, name) + 1.0, np.float64, name)


def test_projected_gradients_from_the_final_states_alone_match_cpu(rng):
    """No dy (None: zero), so every step's dL/dh comes back through W_hh from dh_n and dc_n."""
    w, a = _layer_case(rng, "lstm", (5, 4, 3, 8), np.float64, proj=3)
    got, want = (_run(backend, "lstm", w, a, reverse=False)[0] for backend in ("emulated_device", "cpu"))
    grads, ref = (F.layer_backward(out.tape, None, a["dh_n"], a["dc_n"]) for out in (got, want))
    assert np.abs(ref.weight_hr).max() > 0
    for name in ("dx", "dh0", "dc0", "dh_norm") + GRAD_NAMES:
        assert_close(getattr(grads, name), getattr(ref, name), np.float64, name)


def test_projected_layer_runs_per_step_even_when_persistent_is_forced(rng, recurrence):
    """The persistent kernel keeps no W_hr: a projected layer that would otherwise fit it (a small
    batch, few units) runs per step under every path setting, with the CPU backend's results."""
    w, a = _layer_case(rng, "lstm", (3, 2, 3, 20), np.float64, proj=7)
    before = _core.emulated_cooperative_launches()
    got = _run("emulated_device", "lstm", w, a, reverse=False)
    assert _core.emulated_cooperative_launches() == before
    _compare("lstm", np.float64, got, _run("cpu", "lstm", w, a, reverse=False))
    # The same layer without the projection does take the persistent kernel where it is asked for.
    plain, b = _layer_case(rng, "lstm", (3, 2, 3, 20), np.float64)
    _run("emulated_device", "lstm", plain, b, reverse=False, training=False)
    assert _core.emulated_cooperative_launches() - before == (1 if recurrence == "persistent" else 0)
