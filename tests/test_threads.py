"""The thread team: every team size, SIMD level and way of sharing a step (by batch rows or by hidden
units) gives the reference's answer on sizes that split unevenly across ranks and leave partial row
blocks and weight panels; repeats are bit-identical; small layers run on fewer threads."""

import itertools
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _core, _stack
from fusedrnn import functional as F
from fusedrnn import reference
from fusedrnn.modules import make_module
from helpers import (CELL_CASES, CELLS, GATES, GRAD_NAMES, PARAM_NAMES, assert_close, has_cell_state, proj_of,
                     random_layer, random_lengths, set_for_the_test)


# (T, B, I, H): row blocks are 12 rows with AVX-512 and 6 otherwise, so B=13 leaves a 1-row remainder
# and B=23 an 11-row (AVX-512) or 5-row one; H=129 and H=200 split unevenly and leave partial panels;
# H=200 with 3 ranks gives ranks 64, 64 and 72 units, B=7 with 3 ranks 2, 2 and 3 rows. Every shape is
# big enough that the layer runs on more than one rank; T=2 reads W_hh in place instead of packing it.
SHAPES = [(4, 13, 5, 129), (3, 7, 6, 200), (3, 23, 4, 128), (2, 13, 5, 129)]


@pytest.mark.parametrize("split", ["rows", "units"], indirect=True)
@pytest.mark.parametrize("team_size", [1, 2, 3], indirect=True, ids=["t1", "t2", "t3"])
@pytest.mark.parametrize("shape", SHAPES, ids=["B13-H129", "B7-H200", "B23-H128", "T2-unpacked"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_every_team_size_matches_reference(rng, simd_level, team_size, split, cell, projected, shape):
    steps, batch, inp, hidden = shape
    proj = proj_of(hidden, projected)
    expected_ranks = min(team_size, batch // 2 if split == "rows" else hidden // 64)
    expected_kind = split if expected_ranks > 1 else "units"
    assert _core.layer_split(cell, batch, hidden, np.float64, proj) == (expected_ranks, expected_kind)
    check_against_reference(rng, cell, shape, proj)


@pytest.mark.parametrize("team_size", [1, 2, 3], indirect=True, ids=["t1", "t2", "t3"])
@pytest.mark.parametrize("shape", [(1, 3, 37, 70), (2, 16, 9, 33), (1, 17, 5, 40), (1, 5, 1000, 150),
                                   (5, 2, 20, 300)],
                         ids=["T1-B3", "T2-B16", "T1-B17", "T1-wide-input", "T5-B2-wide"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_short_calls_multiply_the_weights_in_place_match_reference(rng, simd_level, team_size, cell, projected,
                                                                   shape):
    """Calls too short to pack the weights (T < 3, or a few steps of one or two rows with wide
    recurrent weights) multiply them as they are: up to 16 rows with the few-rows kernel (here with row
    and column remainders in its blocks, and depths that are no multiple of the vector width), more
    with BLAS, in the input projection and each step. A wide W_ih (600 KB and more) is shared out by
    its rows among the ranks, unevenly on three."""
    check_against_reference(rng, cell, shape, proj_of(shape[3], projected))


# (T, B, I, H, P) for teams larger than the machine: by units each of 8 ranks gets 64 or 72 units and
# the P columns split unevenly, some ranks getting none (P = 1: all but one); T=2 reads the weights
# in place.
PROJECTED_TEAM_SHAPES = {"H520-P67": (3, 17, 5, 520, 67), "H520-P1": (3, 9, 4, 520, 1),
                         "T2-H520-P67": (2, 17, 5, 520, 67)}


@pytest.mark.parametrize("split", ["rows", "units"], indirect=True)
@pytest.mark.parametrize("team_size", [3, 5, 8], indirect=True, ids=["t3", "t5", "t8"])
@pytest.mark.parametrize("shape", list(PROJECTED_TEAM_SHAPES.values()), ids=list(PROJECTED_TEAM_SHAPES))
def test_projection_on_oversubscribed_teams_matches_reference(rng, simd_level, team_size, split, shape):
    """A projected LSTM on teams of 3 to 8 ranks (more than a small machine's cores): every step's two
    phases (the gates and cell outputs by units, then the projection by state columns) meet at
    barriers; the answer is the reference's whichever rank gets which share, an empty one included."""
    steps, batch, inp, hidden, proj = shape
    expected = min(team_size, batch // 2 if split == "rows" else hidden // 64)
    assert _core.layer_split("lstm", batch, hidden, np.float64, proj) == (expected, split)
    check_against_reference(rng, "lstm", shape[:4], proj)


@pytest.mark.parametrize("team_size", [2, 3], indirect=True, ids=["t2", "t3"])
@pytest.mark.parametrize("cell", CELLS)
def test_one_row_shared_by_units_matches_reference(rng, simd_level, team_size, cell):
    """One batch row, the units shared by two ranks (a third would get too few units to pay): every
    step's new state crosses between the ranks, forward and backward."""
    assert _core.layer_split(cell, 1, 128, np.float64) == (2, "units")
    check_against_reference(rng, cell, (5, 1, 3, 128))


@pytest.fixture
def projection(request):
    """Forces where forward projects x: 'in_steps', 'up_front' or 'up_front_by_rank'."""
    yield from set_for_the_test(_core.get_input_projection, _core.set_input_projection, request.param)


@pytest.mark.parametrize("projection", ["in_steps", "up_front", "up_front_by_rank"], indirect=True)
@pytest.mark.parametrize("split", ["rows", "units"], indirect=True)
@pytest.mark.parametrize("team_size", [1, 2], indirect=True, ids=["t1", "t2"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=["B13-H129", "T2-unpacked"])
@pytest.mark.parametrize("cell", CELLS)
def test_both_input_projections_match_reference(rng, simd_level, team_size, split, projection, cell, shape):
    """Forward projects x onto W_ih in one GEMM before the sequence, or each rank for its own share
    inside each step (by default where its weights fit in L2 beside W_hh) or for every step before the
    first (by default by units, where its W_ih slice fits in half the L2); all give the reference's
    answer whichever way the step is shared, and on a team of one."""
    check_against_reference(rng, cell, shape)


@pytest.mark.parametrize("projection", ["in_steps"], indirect=True)
@pytest.mark.parametrize("split", ["rows", "units"], indirect=True)
@pytest.mark.parametrize("team_size", [1, 2, 3], indirect=True, ids=["t1", "t2", "t3"])
@pytest.mark.parametrize("cell, projected", [("lstm", True), ("rnn_relu", False)], ids=["lstm_proj", "rnn_relu"])
def test_stacked_input_pass_matches_reference(rng, simd_level, team_size, split, projection, cell, projected):
    """Projecting x inside the steps, LSTM and the RNNs multiply x_t and h_{t-1} by one set of panels
    holding W_ih above W_hh (GRU, whose n gate keeps the two apart, takes two passes): 37 inputs above
    a 43-wide projected state or 129 units, so neither part fills whole vectors and the second part
    starts mid-loop; 13 rows leave a 1-row remainder block; three ranks are more than this machine's
    cores."""
    hidden = 129
    check_against_reference(rng, cell, (4, 13, 37, hidden), proj_of(hidden, projected))


@pytest.mark.parametrize("projection", ["up_front_by_rank"], indirect=True)
@pytest.mark.parametrize("split", ["rows", "units"], indirect=True)
@pytest.mark.parametrize("team_size", [2], indirect=True, ids=["t2"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_projection_by_rank_in_chunks_matches_reference(rng, simd_level, team_size, split, projection, cell):
    """A rank projecting every step before the first takes its rows of x in chunks that stay in L2
    (600 inputs: 54 rows of float64 a chunk, so 10 steps of 7 rows by units take two passes, of 7
    steps and 3), or step by step when it has only some of each step's rows."""
    check_against_reference(rng, cell, (10, 7, 600, 128))


@pytest.fixture
def weight_grad_split(request):
    """Forces how backward splits the weight gradients: 'rows' or 'gate_rows'."""
    yield from set_for_the_test(_core.get_weight_grad_split, _core.set_weight_grad_split, request.param)


@pytest.mark.parametrize("weight_grad_split", ["rows", "gate_rows"], indirect=True)
@pytest.mark.parametrize("team_size", [2, 3], indirect=True, ids=["t2", "t3"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]], ids=["B13-H129", "B7-H200"])
@pytest.mark.parametrize("cell", CELLS)
def test_both_weight_grad_splits_match_reference(rng, simd_level, team_size, weight_grad_split, cell, shape):
    """Backward's weight gradients are split across the team by gate rows, or by the steps' rows with
    each further thread summing into a partial that is added after (by default for small layers);
    both give the reference's answer, with two partials as with one."""
    check_against_reference(rng, cell, shape)


@pytest.mark.parametrize("weight_grad_split", ["rows", "gate_rows"], indirect=True)
@pytest.mark.parametrize("team_size", [1, 2, 3], indirect=True, ids=["t1", "t2", "t3"])
@pytest.mark.parametrize("shape", [(1, 1, 5, 200), (2, 3, 4, 129)], ids=["one-row", "T2-B3"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_written_weight_gradients_ignore_what_the_buffers_held(rng, team_size, weight_grad_split, cell, projected,
                                                               shape):
    """accumulate_grads=False (what a backward without gradient buffers of the caller's runs): the
    weight, bias and weight_hr gradients are written, and whatever the buffers held (NaN here) does not
    reach them; they equal, bit for bit, the gradients added into zeros. With one row and two or three
    ranks splitting by rows, the rank that sums into the gradients has no rows of its own. Both
    directions of a layer at once as well."""
    steps, batch, inp, hidden = shape
    proj = proj_of(hidden, projected)
    w = random_layer(rng, cell, inp, hidden, scale=0.3, proj_size=proj)
    w_hr = w.pop("weight_hr", None)
    x = rng.standard_normal((steps, batch, inp))
    dy = rng.standard_normal((steps, batch, proj or hidden))
    layer = (w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"], w_hr)
    tapes = [F.layer_forward(cell, x, *layer[:4], reverse=reverse, weight_hr=w_hr).tape for reverse in (False, True)]

    def buffers(fill):
        return [None if v is None else np.full_like(v, fill) for v in layer]

    for tape in tapes:
        added, written = buffers(0.0), buffers(np.nan)
        for grads, accumulate in ((added, True), (written, False)):
            _core.layer_backward(tape, dy, None, None, np.empty_like(x), *grads[:4], False, grads[4], accumulate)
        for name, a, b in zip(GRAD_NAMES, written, added):
            if b is not None:
                np.testing.assert_array_equal(a, b, err_msg=f"{name}, reverse={tape.reverse}")
    added, written = [buffers(0.0), buffers(0.0)], [buffers(np.nan), buffers(np.nan)]
    for grads, accumulate in ((added, True), (written, False)):
        _core.layer_backward_directions(tapes, [dy, dy], [None, None], [None, None], np.empty_like(x), grads, False,
                                        accumulate)
    for d in (0, 1):
        for name, a, b in zip(GRAD_NAMES, written[d], added[d]):
            if b is not None:
                np.testing.assert_array_equal(a, b, err_msg=f"{name}, both directions, direction {d}")


def check_against_reference(rng, cell, shape, proj=0):
    """Forward and backward of one layer, each direction, in float64 and float32, against the float64
    reference on the same (rounded) inputs: every output (y, h_n, c_n), every gradient (dx, dh0, dc0,
    the weights' and biases', weight_hr's with a projection of `proj` features) and the per-step
    gradient norms (dh_norm). float64 to within a few hundred ulps; float32 with the tolerances of
    helpers.tolerances."""
    steps, batch, inp, hidden = shape
    width = proj or hidden
    w = random_layer(rng, cell, inp, hidden, scale=0.3, proj_size=proj)
    w_hr = w.pop("weight_hr", None)
    x = rng.standard_normal((steps, batch, inp))
    h0 = rng.standard_normal((batch, width))
    c0 = rng.standard_normal((batch, hidden)) if has_cell_state(cell) else None
    lengths = random_lengths(rng, steps, batch)
    dy = rng.standard_normal((steps, batch, width))
    dh_n = rng.standard_normal((batch, width))
    dc_n = rng.standard_normal((batch, hidden)) if has_cell_state(cell) else None
    for dtype in (np.float64, np.float32):
        as_dtype = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
        args = [as_dtype(a) for a in (x, *w.values(), h0, c0)]
        grads_in = [as_dtype(a) for a in (dy, dh_n, dc_n)]
        for reverse in (False, True):
            kw = dict(lengths=lengths, reverse=reverse, weight_hr=as_dtype(w_hr))
            out = F.layer_forward(cell, *args, **kw)
            # Inference keeps nothing for backward (with a projection, one step's cell outputs) and
            # computes the same values.
            inference = F.layer_forward(cell, *args, training=False, **kw)
            for name in ("y", "h_n", "c_n"):
                a, b = getattr(inference, name), getattr(out, name)
                assert (a is None and b is None) or np.array_equal(a, b), f"inference {name}"
            y, h_n, c_n, cache = reference.forward(cell, *args, **kw)
            got = F.layer_backward(out.tape, *grads_in)
            want = reference.backward(cache, *grads_in)
            pairs = [("y", out.y, y), ("h_n", out.h_n, h_n)]
            pairs += [(name, getattr(got, name), want[name])
                      for name in ("dx", "dh0", "dh_norm") + GRAD_NAMES if want[name] is not None]
            if has_cell_state(cell):
                pairs += [("c_n", out.c_n, c_n), ("dc0", got.dc0, want["dc0"])]
            for name, actual, expected in pairs:
                assert_matches_reference(name, actual, expected, dtype, f"reverse={reverse}")


def assert_matches_reference(name, actual, expected, dtype, context):
    """One output or gradient against the float64 reference: float64 to within a few hundred ulps,
    float32 with the tolerances of helpers.tolerances."""
    context = f"{name} ({np.dtype(dtype)}, {context})"
    if dtype == np.float64:
        forward_output = name in ("y", "h_n", "c_n")
        np.testing.assert_allclose(actual, expected, rtol=1e-12 if forward_output else 1e-11,
                                   atol=1e-13 if forward_output else 1e-12, err_msg=context)
    else:
        assert_close(actual, expected, dtype, context)


@pytest.fixture
def directions(request):
    """Forces whether a bidirectional layer's directions run at once ('together') or in turn ('apart')."""
    yield from set_for_the_test(_core.get_directions, _core.set_directions, request.param)


@pytest.mark.parametrize("directions", ["together", "apart"], indirect=True)
@pytest.mark.parametrize("split", ["rows", "units"], indirect=True)
@pytest.mark.parametrize("team_size", [1, 2, 3, 5], indirect=True, ids=["t1", "t2", "t3", "t5"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_both_directions_in_one_call_match_reference(rng, simd_level, team_size, split, directions, cell,
                                                     projected):
    """Both directions of a bidirectional layer in one core call: at once, each on its part of the team
    (1 and 1 ranks of 2, 1 and 2 of 3, 2 and 3 of 5, each meeting only its own ranks at the step
    barriers), or one after the other on all of it. Each direction gives its reference's answer and
    dx the sum of theirs, with 13 rows and 129 units splitting unevenly."""
    check_directions_against_reference(rng, cell, (4, 13, 5, 129), proj_of(129, projected))


@pytest.mark.parametrize("team_size", [1, 2], indirect=True)
def test_ranks_holding_whole_rows_project_inside_the_steps_from_four_rows_each(team_size):
    # LSTM, I = H = 64: both weights 128 KB, in half of any L2 here. On one thread the recurrence has
    # one rank; on two, 8 rows are shared by rows.
    rows = 4 * team_size
    assert _core.input_projection_choice("lstm", 100, rows, 64, 64) == "in_steps"
    fewer = _core.input_projection_choice("lstm", 100, rows - 1, 64, 64)
    assert fewer == ("up_front_by_rank" if team_size == 1 else "up_front")
    assert _core.input_projection_choice("lstm", 2, rows, 64, 64) == "up_front"  # too few steps to pack
    # One row, a narrow input and W_hh more than an eighth of the L2 a rank: from 9 steps the weights
    # are packed and each rank projects its own columns with them; for fewer they are multiplied in
    # place, x projected up front.
    wide = int((_core.l2_cache_bytes() / 64) ** 0.5) // 64 * 64 + 128
    assert _core.input_projection_choice("lstm", 9, 1, 16, wide) == "up_front_by_rank"
    assert _core.input_projection_choice("lstm", 8, 1, 16, wide) == "up_front"
    # Both weights four times half the L2: they would stream from L3 every step.
    wide = int((_core.l2_cache_bytes() / 64) ** 0.5) * 2
    assert _core.input_projection_choice("lstm", 100, rows, wide, wide) != "in_steps"
    # Shared by units, 32 rows make each weight read serve enough FMAs to stream it from L3: inside the
    # steps after all.
    if team_size == 2:
        assert _core.input_projection_choice("lstm", 100, 32, wide, wide) == "in_steps"


@pytest.mark.parametrize("team_size", [2], indirect=True)
def test_directions_run_together_where_a_direction_would_do_little_per_weight_read(team_size):
    # The largest hidden size (a multiple of 64) whose LSTM W_hh (4H, H) float32 fits in half the L2.
    fits = int((_core.l2_cache_bytes() / 2 / 16) ** 0.5) // 64 * 64
    assert _core.directions_together("lstm", 1, 128)       # by units: a barrier a step
    assert _core.directions_together("rnn_tanh", 2, 64)    # one rank: the other core idle
    assert _core.directions_together("lstm", 8, 128)       # by rows, 4 a rank: W_hh read for few rows
    assert not _core.directions_together("lstm", 16, 128)  # by rows, 8 a rank: no barrier inside the sequence
    assert _core.directions_together("lstm", 4, fits)      # by units, W_hh in one rank's L2
    assert not _core.directions_together("lstm", 4, 2 * fits)  # by units, but W_hh would stream from L3
    fusedrnn.set_num_threads(1)
    assert not _core.directions_together("lstm", 1, 128)   # nothing to divide


def check_directions_against_reference(rng, cell, shape, proj=0):
    steps, batch, inp, hidden = shape
    width = proj or hidden
    layers = [random_layer(rng, cell, inp, hidden, scale=0.3, proj_size=proj) for _ in range(2)]
    x = rng.standard_normal((steps, batch, inp))
    lengths = np.asarray(random_lengths(rng, steps, batch), np.int64)
    h0, dy, dh_n = ([rng.standard_normal(s) for _ in range(2)]
                    for s in ((batch, width), (steps, batch, width), (batch, width)))
    c0, dc_n = ([rng.standard_normal((batch, hidden)) if has_cell_state(cell) else None for _ in range(2)]
                for _ in range(2))
    for dtype in (np.float64, np.float32):
        cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
        weights = [tuple(cast(w.get(n)) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"))
                   for w in layers]
        outs = F._forward_directions(cell, cast(x), weights, [cast(a) for a in h0], [cast(a) for a in c0],
                                     lengths, True, [np.empty((steps, batch, width), dtype) for _ in range(2)],
                                     None)
        got = F._backward_directions([o.tape for o in outs], [cast(a) for a in dy], [cast(a) for a in dh_n],
                                     [cast(a) for a in dc_n], [None, None])
        dx = 0
        for d in (0, 1):
            y, h_n, c_n, cache = reference.forward(cell, cast(x), *weights[d][:4], cast(h0[d]), cast(c0[d]),
                                                   lengths=lengths, reverse=d == 1, weight_hr=weights[d][4])
            want = reference.backward(cache, cast(dy[d]), cast(dh_n[d]), cast(dc_n[d]))
            dx = dx + want["dx"]
            pairs = [("y", outs[d].y, y), ("h_n", outs[d].h_n, h_n)]
            pairs += [(name, getattr(got[d], name), want[name])
                      for name in ("dh0", "dh_norm") + GRAD_NAMES if want[name] is not None]
            if has_cell_state(cell):
                pairs += [("c_n", outs[d].c_n, c_n), ("dc0", got[d].dc0, want["dc0"])]
            for name, actual, expected in pairs:
                assert_matches_reference(name, actual, expected, dtype, f"direction {d}")
        assert got[0].dx is got[1].dx
        assert_matches_reference("dx", got[0].dx, dx, dtype, "both directions")


@pytest.mark.parametrize("split", ["rows", "units"], indirect=True)
@pytest.mark.parametrize("team_size", [1, 2, 3, 5], indirect=True, ids=["t1", "t2", "t3", "t5"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_gradients_per_group_of_rows_on_every_team(rng, team_size, split, cell, projected):
    """grad_groups with 7 groups of 2 rows, split unevenly across the ranks, lengths and both
    directions (at once, through the layer-stack driver): each group's weight and bias gradients are
    the reference's for its rows alone, and a repeat gives the same bits."""
    steps, batch, inp, hidden, groups = 5, 14, 6, 129, 7
    proj = proj_of(hidden, projected)
    w = random_layer(rng, cell, inp, hidden, scale=0.3, proj_size=proj)
    layer = _stack.LayerWeights(w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"], w.get("weight_hr"))
    x = rng.standard_normal((steps, batch, inp))
    lengths = random_lengths(rng, steps, batch)
    dy = rng.standard_normal((steps, batch, 2 * (proj or hidden)))
    y, h_n = np.empty_like(dy), np.empty((2, batch, proj or hidden))
    c_n = np.empty((2, batch, hidden)) if has_cell_state(cell) else None
    tapes = _stack.forward_layer(cell, x, [layer, layer], lengths=lengths, training=True, y=y, h_n=h_n, c_n=c_n)
    runs = [_stack.backward_layer(tapes, dy, dh0=np.empty_like(h_n), dc0=None if c_n is None else np.empty_like(c_n),
                                  grad_groups=groups)[1] for _ in range(2)]
    rows = batch // groups
    for d, reverse in enumerate((False, True)):
        for name in GRAD_NAMES:
            got = getattr(runs[0][d], name)
            assert (got is None and getattr(runs[1][d], name) is None) or np.array_equal(got, getattr(runs[1][d], name))
        for q in range(groups):
            part = slice(q * rows, (q + 1) * rows)
            *_, cache = reference.forward(cell, x[:, part], *layer[:4], lengths=lengths[part], reverse=reverse,
                                          weight_hr=layer.weight_hr)
            want = reference.backward(cache, _stack.direction(dy, d, proj or hidden)[:, part])
            for name in GRAD_NAMES:
                if want[name] is not None:
                    assert_matches_reference(name, getattr(runs[0][d], name)[q], want[name], np.float64,
                                             f"direction {d}, group {q}")


@pytest.mark.parametrize("split", ["rows", "units"], indirect=True)
@pytest.mark.parametrize("team_size", [2, 3, 5], indirect=True, ids=["t2", "t3", "t5"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_repeats_are_bit_identical(rng, team_size, split, cell, projected):
    proj = proj_of(129, projected)
    w = random_layer(rng, cell, 9, 129, dtype=np.float32, proj_size=proj)
    w_hr = w.pop("weight_hr", None)
    x = rng.standard_normal((7, 10, 9)).astype(np.float32)
    dy = rng.standard_normal((7, 10, proj or 129)).astype(np.float32)
    runs = []
    for _ in range(3):
        out = F.layer_forward(cell, x, *w.values(), weight_hr=w_hr)
        runs.append((out.y, out.h_n, out.c_n, F.layer_backward(out.tape, dy)))
    for *outputs, grads in runs[1:]:
        for got, first in zip(outputs, runs[0]):
            assert (got is None and first is None) or np.array_equal(got, first)
        for name in ("dx", "dh0", "dc0", "dh_norm") + GRAD_NAMES:
            assert np.array_equal(getattr(grads, name), getattr(runs[0][3], name)), name


@pytest.mark.parametrize("team_size", [2], indirect=True)
def test_blas_threads_set_by_another_library_are_reset_at_each_call(rng, team_size):
    # threadpoolctl's limits reach every BLAS in the process, the bundled one too: its GEMMs must stay
    # single-threaded inside the team's jobs (one pool, and the same bits as before).
    import ctypes
    blas = ctypes.CDLL(_core.blas_library())
    w = random_layer(rng, "lstm", 256, 64, dtype=np.float32)
    x = rng.standard_normal((100, 32, 256)).astype(np.float32)
    dy = rng.standard_normal((100, 32, 64)).astype(np.float32)

    def gradients():
        return F.layer_backward(F.layer_forward("lstm", x, *w.values()).tape, dy)

    before = gradients()
    blas.scipy_openblas_set_num_threads(4)
    after = gradients()
    assert blas.scipy_openblas_get_num_threads() == 1
    for name in ("dx",) + GRAD_NAMES:
        assert np.array_equal(getattr(after, name), getattr(before, name)), name


@pytest.mark.parametrize("team_size", [2], indirect=True)
def test_small_layers_use_fewer_threads(team_size):
    assert _core.layer_split("lstm", 8, 4) == (1, "units")      # ~1K flops a step
    assert _core.layer_split("lstm", 1, 32) == (1, "units")     # ~8K flops a step: a barrier costs more
    assert _core.layer_split("lstm", 1, 128) == (2, "units")    # one row: only units can be shared
    assert _core.layer_split("lstm", 4, 128) == (2, "units")    # 2 rows a rank: units pay more
    assert _core.layer_split("lstm", 8, 128) == (2, "rows")
    assert _core.layer_split("lstm", 4, 64) == (2, "rows")      # 32 units a rank would be too few
    assert _core.layer_split("gru", 1, 128) == (2, "units")     # 98K flops a step
    assert _core.layer_split("rnn_tanh", 1, 128) == (2, "units")  # 33K flops a step
    assert _core.layer_split("rnn_tanh", 1, 96) == (1, "units")   # 18K flops, and 48 units a rank
    assert _core.layer_split("rnn_tanh", 2, 64) == (1, "units")   # 16K flops a step
    assert fusedrnn.build_info()["num_threads"] == 2


@pytest.mark.parametrize("team_size", [2], indirect=True)
def test_rows_are_shared_while_the_weights_stream_cheaply(team_size):
    """By rows, every rank streams the whole W_hh each step: rows are shared while it fits in half the
    L2; beyond, units are, each rank streaming only its columns."""
    l2 = fusedrnn.build_info()["l2_cache_bytes"]
    assert l2 >= 1 << 16
    for cell, batch, hidden in [("lstm", 8, 64), ("lstm", 32, 256), ("gru", 64, 512), ("gru", 62, 512),
                                ("lstm", 16, 1024)]:
        gates = GATES[cell]
        for dtype in (np.float32, np.float64):
            fits = gates * hidden * hidden * np.dtype(dtype).itemsize <= l2 / 2
            want = (2, "rows") if fits else (2, "units")
            assert _core.layer_split(cell, batch, hidden, dtype) == want, (cell, batch, hidden, dtype)
    with pytest.raises(TypeError, match=r"^dtype: expected float32 or float64, got int32"):
        _core.layer_split("lstm", 8, 64, np.int32)
    with pytest.raises(ValueError, match="^kind: expected 'auto', 'rows' or 'units', got 'cols'"):
        _core.set_layer_split("cols")
    with pytest.raises(ValueError, match="^kind: expected 'auto', 'in_steps', 'up_front' or 'up_front_by_rank', "
                                         "got 'later'"):
        _core.set_input_projection("later")
    assert _core.get_input_projection() == "auto"
    with pytest.raises(ValueError, match="^kind: expected 'auto', 'rows' or 'gate_rows', got 'cols'"):
        _core.set_weight_grad_split("cols")
    assert _core.get_weight_grad_split() == "auto"


def test_larger_teams_never_give_the_recurrence_fewer_ranks():
    """Teams of 2 to 16 (more than a small machine's cores): by rows, the team stops at the most ranks that
    still get enough rows each (4 where units could be shared, 32 where W_hh streams from beyond L2)
    instead of falling back to units; rows win while they give at least as many ranks as units, except
    where W_hh streams from beyond L2 and units can be shared: units then."""
    l2 = fusedrnn.build_info()["l2_cache_bytes"]
    teams = range(2, 17)
    shapes = list(itertools.product(CELLS, (np.float32, np.float64), (1, 4, 8, 13, 32, 64, 100, 256),
                                    (64, 128, 256, 512, 1024)))
    previous = fusedrnn.get_num_threads()
    try:
        splits = {shape: [] for shape in shapes}
        for team in teams:  # resizing starts and stops threads: once a size, not once a shape
            fusedrnn.set_num_threads(team)
            for cell, dtype, batch, hidden in shapes:
                splits[cell, dtype, batch, hidden].append(_core.layer_split(cell, batch, hidden, dtype))
        for (cell, dtype, batch, hidden), got in splits.items():
            fits = GATES[cell] * hidden * hidden * np.dtype(dtype).itemsize <= l2 / 2
            case = (cell, np.dtype(dtype).name, batch, hidden, got)
            ranks = [r for r, _ in got]
            assert ranks == sorted(ranks), case
            if 2 * batch * GATES[cell] * hidden * hidden < 3e4:
                assert set(got) == {(1, "units")}, case
                continue
            units = [min(team, max(1, hidden // 64)) for team in teams]
            rows = [min(team, batch // 2, batch // 32 if not fits else batch, batch // 4 if u > 1 else batch)
                    for team, u in zip(teams, units)]
            want = [(u, "units") if (not fits and u > 1) or not (r > 1 and r >= u) else (r, "rows")
                    for r, u in zip(rows, units)]
            assert got == want, case
        # The 16-core case that showed the fall-back: LSTM (B=32, H=256) in float32 kept 8 ranks by rows
        # where its weights fit (1 MB in half an L2 of 2 MB), instead of 4 by units.
        fusedrnn.set_num_threads(16)
        fits = 4 * 256 * 256 * 4 <= l2 / 2
        assert _core.layer_split("lstm", 32, 256, np.float32) == ((8, "rows") if fits else (4, "units"))
    finally:
        fusedrnn.set_num_threads(previous)


@pytest.mark.parametrize("cell", CELLS)
def test_arrays_the_ranks_write_start_on_cache_lines(rng, cell):
    """Ranks own 64-byte-aligned ranges of units in each row; arrays aligned to 64 bytes keep the two
    sides of a boundary out of one cache line (numpy itself aligns to 16 bytes)."""
    w = random_layer(rng, cell, 5, 64, dtype=np.float32)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    out = F.layer_forward(cell, x, *w.values())
    arrays = [out.y, out.h_n] + ([out.c_n] if has_cell_state(cell) else [])
    grads = F.layer_backward(out.tape, np.ones_like(out.y))
    arrays += [grads.dh0] + ([grads.dc0] if has_cell_state(cell) else [])
    module = make_module(cell, 5, 64, bidirectional=True)
    arrays.append(module(x)[0])
    for a in arrays:
        assert a.ctypes.data % 64 == 0 and a.flags.c_contiguous and a.flags.writeable
    for dtype in (np.float32, np.float64):
        assert _core.aligned_empty((2, 3), dtype).ctypes.data % 64 == 0
    with pytest.raises(TypeError, match=r"^dtype: expected float32 or float64, got int32"):
        _core.aligned_empty((2,), np.int32)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity (Linux)")
def test_team_follows_the_callers_cpu_mask():
    """The workers are kept off the caller's CPU within the caller's affinity mask. Confined to one
    CPU after the team started, a two-rank layer sharing its units must still finish (its ranks take
    turns at each step's barrier) and give the two-rank answer unconfined, bit for bit, and the
    one-rank answer to float32 rounding (two ranks project x by their own gate columns, one rank in
    one GEMM: the sums run in different orders)."""
    code = textwrap.dedent("""
        import os
        import numpy as np
        import fusedrnn
        from fusedrnn import _core, functional as F
        rng = np.random.default_rng(0)
        x = rng.standard_normal((20, 4, 8)).astype(np.float32)
        w = [rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((512, 8), (512, 128), (512,), (512,))]
        _core.set_layer_split("units")  # a barrier every step
        fusedrnn.set_num_threads(1)
        one = F.layer_forward("lstm", x, *w, training=False).y
        fusedrnn.set_num_threads(2)
        spread = F.layer_forward("lstm", x, *w, training=False).y
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        confined = F.layer_forward("lstm", x, *w, training=False).y
        print(_core.layer_split("lstm", 4, 128)[0], np.abs(spread - one).max(), np.array_equal(confined, spread))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    ranks, spread_err, confined_same = out.stdout.split()
    assert ranks == "2"
    assert float(spread_err) < 1e-5 and confined_same == "True"


@pytest.mark.skipif(not (hasattr(os, "sched_getaffinity") and os.path.isdir("/proc/self/task")),
                    reason="needs os.sched_getaffinity and /proc (Linux)")
def test_a_team_larger_than_the_mask_spreads_over_all_of_it():
    """Workers are kept off the caller's CPU only where the other CPUs hold them all: a team larger than
    the caller's mask (set_num_threads past the CPUs, or a mask narrowed after) lets every worker run
    anywhere in the mask, rather than stacking them all on the CPUs left over."""
    code = textwrap.dedent("""
        import os
        import threading
        import numpy as np
        # A thread started and joined first, so that a runtime's helper thread started at the first
        # thread (ThreadSanitizer's) is among the others: the main thread and numpy's BLAS threads.
        helper = threading.Thread(target=lambda: None)
        helper.start()
        helper.join()
        others = set(os.listdir("/proc/self/task"))
        import fusedrnn
        from fusedrnn import functional as F
        cpus = sorted(os.sched_getaffinity(0))
        x = np.ones((3, 8, 4), np.float32)
        w = [np.full(s, 0.1, np.float32) for s in ((512, 4), (512, 128), (512,), (512,))]
        def worker_masks(threads):
            fusedrnn.set_num_threads(threads)
            F.layer_forward("lstm", x, *w, training=False)
            workers = set(os.listdir("/proc/self/task")) - others
            assert len(workers) == threads - 1, (len(workers), threads)
            return {frozenset(os.sched_getaffinity(int(tid))) for tid in workers}
        caller = frozenset(os.sched_getaffinity(0))
        fitting = worker_masks(len(cpus))
        larger = worker_masks(len(cpus) + 2)
        off_one = len(fitting) == 1 and all(m < caller and len(m) == len(caller) - 1 for m in fitting)
        print(len(cpus), off_one, larger == {caller})
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cpus, fitting_off_one_cpu, larger_spread = out.stdout.split()
    if int(cpus) > 1:  # one CPU: nothing to keep apart, the workers always share the caller's mask
        assert fitting_off_one_cpu == "True"
    assert larger_spread == "True"


@pytest.mark.skipif(not (hasattr(os, "fork") and hasattr(os, "sched_setaffinity")),
                    reason="needs os.fork and os.sched_setaffinity (Linux)")
def test_a_forked_child_takes_its_own_default_team():
    """A forked child that narrows its mask before its first call (a worker pinned to a CPU) gets the
    default of that mask; a size set in the parent is kept."""
    code = textwrap.dedent("""
        import os
        import numpy as np
        import fusedrnn
        from fusedrnn import functional as F
        w = [np.full(s, 0.1, np.float32) for s in ((512, 4), (512, 128), (512,), (512,))]
        def child_team():
            F.layer_forward("lstm", np.ones((3, 8, 4), np.float32), *w, training=False)
            pid = os.fork()
            if pid == 0:
                os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
                F.layer_forward("lstm", np.ones((3, 8, 4), np.float32), *w, training=False)
                os._exit(fusedrnn.get_num_threads())
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        by_default = child_team()
        fusedrnn.set_num_threads(3)
        print(by_default, child_team())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "3"]


def test_the_team_never_outgrows_the_bundled_blas():
    """Every rank of a job may be inside a GEMM of the bundled OpenBLAS at once, and its buffer table
    holds 2 * MAX_THREADS callers (past that it warns, and further on ends the process)."""
    config = fusedrnn.build_info()["blas"]
    built_for = re.search(r"MAX_THREADS=(\d+)", config)
    assert built_for, config
    assert _core.max_threads <= 2 * int(built_for.group(1))
    with pytest.raises(ValueError, match=r"^n: expected a thread count in \[1, "):
        fusedrnn.set_num_threads(_core.max_threads + 1)


# sched_getaffinity as a kernel with 4096 possible CPUs answers it: a mask shorter than that is refused
# (EINVAL), so a fixed 1024-CPU cpu_set_t cannot be read there.
_MANY_CPUS_SHIM = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int sched_getaffinity(pid_t pid, size_t bytes, cpu_set_t* mask) {
  if (bytes * 8 < 4096) { errno = EINVAL; return -1; }
  long copied = syscall(SYS_sched_getaffinity, pid, bytes, mask);
  if (copied < 0) return -1;
  memset((char*)mask + copied, 0, bytes - copied);
  return 0;
}
"""


@pytest.mark.skipif(not (hasattr(os, "sched_setaffinity") and os.path.isdir("/proc/self/task")),
                    reason="needs os.sched_setaffinity and /proc (Linux)")
def test_the_mask_is_read_where_the_kernel_knows_more_than_1024_cpus(tmp_path):
    """The default team follows the affinity mask, and the workers are kept off the caller's CPU, on a
    kernel whose masks are longer than a plain cpu_set_t (simulated by a preloaded sched_getaffinity)."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler to build the simulated sched_getaffinity")
    (tmp_path / "shim.c").write_text(_MANY_CPUS_SHIM)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(tmp_path / "shim.so"), str(tmp_path / "shim.c")],
                   check=True, timeout=120)
    code = textwrap.dedent("""
        import os
        import threading
        import numpy as np
        # A thread started and joined first, so that a runtime's helper thread started at the first
        # thread (ThreadSanitizer's) is not taken for a worker.
        helper = threading.Thread(target=lambda: None)
        helper.start()
        helper.join()
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[0]})
        import fusedrnn
        from fusedrnn import functional as F
        default = fusedrnn.get_num_threads()
        os.sched_setaffinity(0, set(cpus))
        fusedrnn.set_num_threads(1)
        others = set(os.listdir("/proc/self/task"))
        fusedrnn.set_num_threads(2)
        w = [np.full(s, 0.1, np.float32) for s in ((512, 4), (512, 128), (512,), (512,))]
        F.layer_forward("lstm", np.ones((3, 8, 4), np.float32), *w, training=False)
        masks = [os.sched_getaffinity(int(t)) for t in set(os.listdir("/proc/self/task")) - others]
        print(default, len(cpus), len(masks) == 1 and len(masks[0]) == len(cpus) - 1)
    """)
    preload = " ".join(filter(None, [os.environ.get("LD_PRELOAD"), str(tmp_path / "shim.so")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LD_PRELOAD": preload})
    assert out.returncode == 0, out.stderr
    default, cpus, kept_off_the_callers_cpu = out.stdout.split()
    assert default == "1"
    if int(cpus) > 1:  # one CPU: nothing to keep apart
        assert kept_off_the_callers_cpu == "True"


def _write_tree(root, files: dict) -> str:
    for path, text in files.items():
        full = os.path.join(root, path.lstrip("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)
    return str(root)


_V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
_V1_CPU_MOUNT = "32 31 0:29 {root} /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"


@pytest.mark.parametrize("files, cpus", [
    # cgroup v2 in a container (its own cgroup at the mount's top): `docker --cpus 2.5` rounds up.
    ({"/proc/self/mountinfo": _V2_MOUNT, "/proc/self/cgroup": "0::/\n",
      "/sys/fs/cgroup/cpu.max": "250000 100000\n"}, 3),
    ({"/proc/self/mountinfo": _V2_MOUNT, "/proc/self/cgroup": "0::/\n",
      "/sys/fs/cgroup/cpu.max": "max 100000\n"}, 0),
    # cgroup v2 on a host: a parent's limit binds its child, the least one counts.
    ({"/proc/self/mountinfo": _V2_MOUNT, "/proc/self/cgroup": "0::/pods/p1/c1\n",
      "/sys/fs/cgroup/pods/cpu.max": "400000 100000\n", "/sys/fs/cgroup/pods/p1/cpu.max": "50000 100000\n",
      "/sys/fs/cgroup/pods/p1/c1/cpu.max": "max 100000\n"}, 1),
    # cgroup v1 bind-mounted into a container: the mount's top is the process's cgroup.
    ({"/proc/self/mountinfo": _V1_CPU_MOUNT.format(root="/docker/abc") + _V2_MOUNT.replace("/cgroup ", "/cgroup/unified "),
      "/proc/self/cgroup": "4:cpu,cpuacct:/docker/abc\n0::/docker/abc\n",
      "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "400000\n",
      "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 4),
    # cgroup v1 without a limit (quota -1), and no cgroup file system at all.
    ({"/proc/self/mountinfo": _V1_CPU_MOUNT.format(root="/"), "/proc/self/cgroup": "4:cpu,cpuacct:/user\n",
      "/sys/fs/cgroup/cpu,cpuacct/user/cpu.cfs_quota_us": "-1\n",
      "/sys/fs/cgroup/cpu,cpuacct/user/cpu.cfs_period_us": "100000\n"}, 0),
    # A process moved out of its cgroup namespace's top sees a path above the mount: the mount's own.
    ({"/proc/self/mountinfo": _V2_MOUNT, "/proc/self/cgroup": "0::/../other\n",
      "/sys/fs/cgroup/cpu.max": "200000 100000\n", "/sys/other/cpu.max": "100000 100000\n"}, 2),
    ({"/proc/self/mountinfo": "", "/proc/self/cgroup": ""}, 0),
    # A mount point with a space, as mountinfo escapes it; a quota past int's range is clamped.
    ({"/proc/self/mountinfo": _V2_MOUNT.replace("/sys/fs/cgroup ", "/sys/fs/c\\040group "),
      "/proc/self/cgroup": "0::/\n", "/sys/fs/c group/cpu.max": "17592186044415 1000\n"}, 2**31 - 1),
], ids=["v2-container", "v2-max", "v2-parent", "v1-container", "v1-unlimited", "v2-outside", "none", "escaped-huge"])
def test_cgroup_cpu_limit_reads_the_process_s_hierarchy(tmp_path, files, cpus):
    assert _core.cgroup_cpu_limit(_write_tree(tmp_path, files)) == cpus


def _cgroup_made_for_test(controller: str):
    """A new cgroup v1 `controller` cgroup under the process's own, or None where cgroups cannot be made
    here (not root, read-only, cgroup v2 without delegation)."""
    with open("/proc/self/cgroup") as f:
        own = next((line.split(":", 2)[2].strip() for line in f
                    if controller in line.split(":")[1].split(",")), None)
    path = os.path.join("/sys/fs/cgroup", controller, (own or "/").lstrip("/"), f"fusedrnn-test-{os.getpid()}")
    try:
        os.mkdir(path)
    except OSError:
        return None
    return path


def _run_in_cgroup(path: str, code: str, env=None) -> subprocess.CompletedProcess:
    """`code` in a new Python process that moves itself into the cgroup at `path` before anything else."""
    enter = f"open({os.path.join(path, 'cgroup.procs')!r}, 'w').write(str(__import__('os').getpid()))\n"
    return subprocess.run([sys.executable, "-c", enter + code], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.skipif(not os.path.isdir("/sys/fs/cgroup/cpu"), reason="needs a cgroup v1 cpu hierarchy (Linux)")
def test_default_team_keeps_within_the_cgroup_cpu_limit():
    """A process whose cgroup may use half a CPU starts with a one-thread team; with no limit of its
    own, with the CPUs of its mask within what the cgroups above it allow (this process's limit)."""
    path = _cgroup_made_for_test("cpu")
    if path is None:
        pytest.skip("cannot make a cgroup here (needs root and a writable cgroup v1 cpu hierarchy)")
    code = ("import os, fusedrnn; print(fusedrnn.get_num_threads(), len(os.sched_getaffinity(0)), "
            "fusedrnn.build_info()['cgroup_cpu_limit'])")
    try:
        runs = {}
        for quota in ("50000", "-1"):
            try:
                with open(os.path.join(path, "cpu.cfs_quota_us"), "w") as f:
                    f.write(quota)
            except OSError as err:  # a parent's quota below half a CPU refuses a larger one here
                pytest.skip(f"cannot set this cgroup's quota to {quota}: {err}")
            out = _run_in_cgroup(path, code)
            assert out.returncode == 0, out.stderr
            runs[quota] = tuple(map(int, out.stdout.split()))
    finally:
        os.rmdir(path)
    above = _core.cgroup_cpu_limit()  # the cgroups above the new one: 0 where none is limited
    assert runs["50000"][0] == 1 and runs["50000"][2] == 1
    threads, cpus, limit = runs["-1"]
    assert limit == above and threads == (min(cpus, above) if above else cpus)


@pytest.mark.skipif(not os.path.isdir("/sys/fs/cgroup/pids"), reason="needs a cgroup v1 pids hierarchy (Linux)")
def test_a_team_the_system_refuses_threads_for_keeps_its_size():
    """Where the system will not start the threads a resize asks for (a cgroup's pids.max, a process
    limit), set_num_threads raises RuntimeError saying so, and the team keeps its size and computes."""
    path = _cgroup_made_for_test("pids")
    if path is None:
        pytest.skip("cannot make a cgroup here (needs root and a writable cgroup v1 pids hierarchy)")
    code = textwrap.dedent("""
        import os
        import numpy as np
        import fusedrnn
        from fusedrnn import functional as F
        fusedrnn.set_num_threads(2)
        x = np.ones((3, 8, 4), np.float32)
        w = [np.full(s, 0.1, np.float32) for s in ((512, 4), (512, 128), (512,), (512,))]
        before = F.layer_forward("lstm", x, *w, training=False).y
        with open(os.path.join(os.environ["CGROUP"], "pids.max"), "w") as f:
            f.write(str(len(os.listdir("/proc/self/task")) + 4))
        try:
            fusedrnn.set_num_threads(64)
        except RuntimeError as err:
            print("refused:", err)
        print("threads:", fusedrnn.get_num_threads())
        print("same:", np.array_equal(F.layer_forward("lstm", x, *w, training=False).y, before))
    """)
    try:
        os.environ["CGROUP"] = path
        out = _run_in_cgroup(path, code)
    finally:
        del os.environ["CGROUP"]
        os.rmdir(path)
    assert out.returncode == 0, out.stderr
    assert "refused: fusedrnn: could not start a team of 64 threads (" in out.stdout
    assert "threads: 2\nsame: True\n" in out.stdout


@pytest.mark.skipif(not os.path.isdir("/sys/fs/cgroup/pids"), reason="needs a cgroup v1 pids hierarchy (Linux)")
def test_a_process_the_system_gives_no_worker_threads_computes_on_one():
    """A process that may start no further thread (its cgroup's pids.max reached) still computes: the
    default team falls back to the calling thread alone rather than failing every call."""
    path = _cgroup_made_for_test("pids")
    if path is None:
        pytest.skip("cannot make a cgroup here (needs root and a writable cgroup v1 pids hierarchy)")
    code = textwrap.dedent("""
        import os
        with open(os.path.join(os.environ["CGROUP"], "pids.max"), "w") as f:
            f.write(str(len(os.listdir("/proc/self/task"))))
        import numpy as np
        import fusedrnn
        from fusedrnn import functional as F, reference
        x = np.ones((3, 8, 4), np.float32)
        w = [np.full(s, 0.1, np.float32) for s in ((512, 4), (512, 128), (512,), (512,))]
        y = F.layer_forward("lstm", x, *w, training=False).y
        print("threads:", fusedrnn.get_num_threads(), "finite:", bool(np.isfinite(y).all()), y.shape)
    """)
    try:
        out = _run_in_cgroup(path, code, env={**os.environ, "CGROUP": path, "OPENBLAS_NUM_THREADS": "1"})
    finally:
        os.rmdir(path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "threads: 1 finite: True (3, 8, 128)\n"


@pytest.mark.skipif(not (os.path.isdir("/sys/fs/cgroup/pids") and hasattr(os, "fork")),
                    reason="needs a cgroup v1 pids hierarchy and os.fork (Linux)")
def test_a_forked_child_the_system_gives_no_worker_threads_computes():
    """A forked child starts its team again at its first call. Where the system refuses the threads,
    a default team runs on the calling thread alone; a size the parent set is refused as set_num_threads
    refuses it (RuntimeError, the team keeps one rank). Either way the calls after compute."""
    path = _cgroup_made_for_test("pids")
    if path is None:
        pytest.skip("cannot make a cgroup here (needs root and a writable cgroup v1 pids hierarchy)")
    code = textwrap.dedent("""
        import os, sys, time
        import numpy as np
        import fusedrnn
        from fusedrnn import functional as F
        x = np.ones((3, 8, 4), np.float32)
        w = [np.full(s, 0.1, np.float32) for s in ((512, 4), (512, 128), (512,), (512,))]
        limit = os.path.join(os.environ["CGROUP"], "pids.max")
        def child_calls():
            F.layer_forward("lstm", x, *w, training=False)
            pid = os.fork()
            if pid == 0:
                with open(os.path.join(os.environ["CGROUP"], "pids.current")) as f:
                    current = f.read().strip()
                with open(limit, "w") as f:
                    f.write(current)  # no further thread in the cgroup
                calls = []
                for _ in range(2):
                    try:
                        F.layer_forward("lstm", x, *w, training=False)
                        calls.append("ok")
                    except RuntimeError as err:
                        calls.append("refused" if "could not start a team of 2 threads" in str(err) else repr(err))
                print(*calls, fusedrnn.get_num_threads(), flush=True)
                os._exit(0)
            for _ in range(200):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                print("hung", flush=True)
            with open(limit, "w") as f:
                f.write("max")
        child_calls()
        fusedrnn.set_num_threads(2)
        child_calls()
    """)
    try:
        out = _run_in_cgroup(path, code, env={**os.environ, "CGROUP": path, "OPENBLAS_NUM_THREADS": "1"})
    finally:
        os.rmdir(path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok ok 1\nrefused ok 1\n"


def test_import_starts_no_blas_threads():
    """The BLAS runs single-threaded inside the team, so loading it starts none of its own workers
    (they would spin on the team's cores), and the caller's OPENBLAS_NUM_THREADS is left as it was.
    Threads are counted in /proc (Linux); the variable is checked everywhere."""
    code = textwrap.dedent("""
        import os
        import numpy
        def threads():
            return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None
        before = threads()
        import fusedrnn
        after = threads()
        print("new_threads", None if before is None else after - before)
        print("variable", os.environ.get("OPENBLAS_NUM_THREADS"))
    """)
    env = {key: value for key, value in os.environ.items() if key != "OPENBLAS_NUM_THREADS"}
    counted = os.path.isdir("/proc/self/task")
    for variable in (None, "3"):
        run_env = env if variable is None else dict(env, OPENBLAS_NUM_THREADS=variable)
        out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, check=True)
        report = dict(line.split() for line in out.stdout.splitlines())
        assert report["variable"] == str(variable)
        assert report["new_threads"] == ("0" if counted else "None")


def test_simd_level_choice_is_checked():
    info = fusedrnn.build_info()
    assert info["simd"] in info["simd_supported"]
    assert set(info["simd_supported"]) <= set(info["simd_compiled"])
    assert info["simd_supported"][0] == "generic"
    with pytest.raises(ValueError, match=r"^level: 'sse9' is not supported here"):
        fusedrnn.set_simd_level("sse9")
    with pytest.raises(TypeError, match=r"^level: expected a str"):
        fusedrnn.set_simd_level(2)
    assert fusedrnn.build_info()["simd"] == info["simd"]


def test_simd_environment_variable_forces_a_level():
    code = "import fusedrnn; print(fusedrnn.build_info()['simd'])"
    env = dict(os.environ, FUSEDRNN_SIMD="generic")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "generic"


def test_unsupported_simd_environment_value_warns():
    code = "import fusedrnn; print(fusedrnn.build_info()['simd'])"
    env = dict(os.environ, FUSEDRNN_SIMD="sse9")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "FUSEDRNN_SIMD='sse9' is not a SIMD level this machine supports" in out.stderr
    assert out.stdout.strip() == fusedrnn.build_info()["simd_supported"][-1]


def test_release_scratch_frees_the_scratch_and_later_calls_give_the_same_bits(rng):
    x = rng.standard_normal((40, 16, 24)).astype(np.float32)
    weights = random_layer(rng, "lstm", 24, 64, dtype=np.float32)

    def step():
        out = F.layer_forward("lstm", x, **weights)
        return out.y, F.layer_backward(out.tape, np.ones_like(out.y)).weight_hh

    fusedrnn.release_scratch()
    want = step()
    assert fusedrnn.release_scratch() > 0
    assert fusedrnn.release_scratch() == 0  # nothing kept after a release
    for got, expected in zip(step(), want):
        np.testing.assert_array_equal(got, expected)


@pytest.fixture
def chunk_bytes():
    """Restores the default bound on an inference call's scratch after the test."""
    yield from set_for_the_test(_core.get_inference_chunk_bytes, _core.set_inference_chunk_bytes, 0)


def forward_keeping(module, x, lengths, bound, training=False):
    """module(x) (in inference, or training mode) with the chunk bound `bound` (bytes), its outputs and
    the scratch the call kept."""
    _core.set_inference_chunk_bytes(bound)
    fusedrnn.release_scratch()
    module.train(training)
    y, state = module(x, lengths=lengths)
    return (y, *(state if isinstance(state, tuple) else (state,))), fusedrnn.release_scratch()


# How the layer runs: (team size, directions, batch_first). One direction; both at once on parts of the
# team, reading x in place; both in turn, x batch-first, which the core copies a chunk at a time.
CHUNKED_RUNS = {"t1": (1, None, False), "t3-together": (3, "together", False), "t2-apart": (2, "apart", True)}
# Where x is projected, in float32; and in float64 the packed kernel's projection before the steps, whose
# passes (the steps the chunks must start on) depend on the value size.
CHUNKED_PROJECTIONS = ([pytest.param(p, np.float32, id=f"{p}-f32") for p in ("auto", "in_steps", "up_front",
                                                                             "up_front_by_rank")]
                       + [pytest.param("up_front_by_rank", np.float64, id="up_front_by_rank-f64")])


def check_chunked_inference(rng, cell, projected, dtype, run, projection):
    """Inference run in chunks of steps gives the training-mode forward's bits, and the whole inference
    call's where the ranks project x themselves (BLAS rounds a row by where it falls in its call, so a
    projection by BLAS is the chunks' in training too); where x is projected before the steps, it keeps
    less scratch."""
    team, directions, batch_first = CHUNKED_RUNS[run]
    steps, batch, hidden = 256, 4, 64
    previous = (fusedrnn.get_num_threads(), _core.get_directions())
    fusedrnn.set_num_threads(team)
    _core.set_directions(directions or "auto")
    try:
        kwargs = {"proj_size": proj_of(hidden, projected)} if projected else {}
        module = make_module(cell, hidden, hidden, bidirectional=directions is not None, batch_first=batch_first,
                             dtype=dtype, seed=3, **kwargs)
        x = rng.standard_normal((batch, steps, hidden) if batch_first else (steps, batch, hidden)).astype(dtype)
        lengths = np.array([steps, 1, 129, 75])
        whole, whole_scratch = forward_keeping(module, x, lengths, 1 << 40)
        chunked, chunked_scratch = forward_keeping(module, x, lengths, 1)
        trained, _ = forward_keeping(module, x, lengths, 1, training=True)
        in_steps = _core.input_projection_choice(cell, steps, batch, hidden, hidden, dtype) == "in_steps"
    finally:
        fusedrnn.set_num_threads(previous[0])
        _core.set_directions(previous[1])
    for got, want in zip(chunked, trained, strict=True):
        np.testing.assert_array_equal(got, want)
    if projection in ("in_steps", "up_front_by_rank"):
        for got, want in zip(chunked, whole, strict=True):
            np.testing.assert_array_equal(got, want)
    if not in_steps:
        assert chunked_scratch < whole_scratch, (chunked_scratch, whole_scratch)


@pytest.mark.parametrize("run", CHUNKED_RUNS)
@pytest.mark.parametrize("projection, dtype", CHUNKED_PROJECTIONS, indirect=["projection"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_inference_in_chunks_of_steps_gives_the_training_forwards_bits(rng, chunk_bytes, cell, projected,
                                                                       projection, dtype, run):
    """Inference whose scratch would pass the bound runs in chunks of steps, the state handed from one to
    the next, and gives exactly the outputs and final states of the same forward in training mode
    (which runs whole), with lengths ending inside and before chunks, in either direction; where x is
    projected before the steps, the scratch kept shrinks."""
    check_chunked_inference(rng, cell, projected, dtype, run, projection)


@pytest.mark.parametrize("projection", ["up_front_by_rank"], indirect=True)
@pytest.mark.parametrize("run", ["t1", "t3-together"])
def test_inference_in_chunks_projected_by_rank_at_every_simd_level(rng, simd_level, chunk_bytes, projection, run):
    """Each level's panel kernel blocks rows its own way (12 or 6 a block); the chunks end on whole blocks
    of every level."""
    check_chunked_inference(rng, "lstm", False, np.float32, run, projection)


@pytest.mark.parametrize("team_size", [3], indirect=True, ids=["t3"])
def test_concurrent_callers_in_chunks_of_steps_give_each_calls_bits(rng, chunk_bytes, team_size):
    """Python threads running inference in chunks at once (each call's carried state its own, the
    scratch taken in turn), on a team larger than the machine: each gets what it gets alone."""
    import threading
    _core.set_inference_chunk_bytes(1)
    modules = [make_module(cell, 64, 64, seed=i) for i, cell in enumerate(["lstm", "gru", "rnn_tanh", "lstm"])]
    xs = [rng.standard_normal((256, 4, 64)).astype(np.float32) for _ in modules]
    want = [m.eval()(x)[0] for m, x in zip(modules, xs)]
    got, errors = [[] for _ in modules], []

    def serve(i):
        try:
            for _ in range(3):
                got[i].append(modules[i](xs[i])[0])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(modules))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for mine, expected in zip(got, want):
        assert len(mine) == 3
        for y in mine:
            np.testing.assert_array_equal(y, expected)


def test_long_inference_keeps_its_scratch_near_the_default_bound(rng):
    """A long sequence of one row, whose input projection would take 98 MiB, keeps no more than the
    default bound of scratch after the call, and gives the same outputs again."""
    steps, inp, hidden = 100000, 8, 64
    module = fusedrnn.LSTM(inp, hidden, seed=0)
    module.eval()
    x = rng.standard_normal((steps, 1, inp)).astype(np.float32)
    assert _core.get_inference_chunk_bytes() == 64 << 20
    fusedrnn.release_scratch()
    y, (h_n, c_n) = module(x)
    kept = fusedrnn.release_scratch()
    assert 0 < kept <= (64 << 20) * 1.1, kept
    np.testing.assert_array_equal(module(x)[0], y)
    np.testing.assert_array_equal(h_n[0], y[-1])


@pytest.mark.parametrize("team_size", [1, 2, 5], indirect=True, ids=["t1", "t2", "t5"])
def test_threads_calling_in_turn_keep_one_scratch_for_the_process(rng, team_size):
    """A server's threads (or XLA's) each calling once keep one scratch between them, not one each until
    they end, and any thread frees it."""
    import threading
    x = rng.standard_normal((40, 16, 24)).astype(np.float32)
    weights = random_layer(rng, "lstm", 24, 64, dtype=np.float32)

    def step():
        out = F.layer_forward("lstm", x, **weights)
        F.layer_backward(out.tape, np.ones_like(out.y))

    fusedrnn.release_scratch()
    step()
    one_call = fusedrnn.release_scratch()
    done, finish = threading.Barrier(4), threading.Event()

    def serve():
        step()
        done.wait()
        finish.wait()  # alive while the main thread releases

    servers = [threading.Thread(target=serve) for _ in range(3)]
    for t in servers:
        t.start()
    try:
        done.wait()
        assert fusedrnn.release_scratch() == one_call
    finally:
        finish.set()
        for t in servers:
            t.join()
