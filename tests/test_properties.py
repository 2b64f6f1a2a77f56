"""Property-based tests of the modules with hypothesis: over drawn cells, sizes, stackings, states,
lengths, dtypes, layouts, thread-team sizes and SIMD levels, the module agrees with the float64
reference composed layer by layer and direction by direction, repeats itself bit for bit, and rejects
bad input naming the argument."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fusedrnn
from fusedrnn import _core, reference
from helpers import CELLS, GRAD_NAMES, has_cell_state, make_module, tolerances

settings.register_profile(
    "fusedrnn-properties",
    derandomize=True,       # the same examples on every run and machine: failures reproduce in CI
    deadline=None,          # timings vary with the host's load: noise, not a property
    database=None,          # no .hypothesis directory
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = settings.get_profile("fusedrnn-properties")


# ---- what is drawn --------------------------------------------------------------------------------------

# Where the layer runs on more than one rank of the team (see layer_split in csrc/fusedrnn/cpu/layer.cpp): a few rows
# with 128 or more hidden units share the units (2 ranks; 3 from H=192), 8 or more rows with H=64 share
# the rows (up to one rank per 2 rows). "small" layers run on one rank.
SHAPE_KINDS = {
    "small": (st.integers(1, 6), st.integers(1, 70)),
    "units": (st.integers(1, 3), st.integers(128, 130) | st.integers(192, 194)),
    "rows": (st.integers(8, 13), st.integers(64, 66)),
}
LAYOUTS = ("contiguous", "strided", "fortran", "reversed")
SIMD_LEVELS = tuple(fusedrnn.build_info()["simd_supported"])


@dataclass(frozen=True)
class Case:
    """One drawn configuration; the arrays come from `seed`, so a failing case prints short."""

    cell: str
    shape_kind: str
    steps: int
    batch: int
    input_size: int
    hidden: int
    num_layers: int
    bidirectional: bool
    bias: bool
    dtype: type
    batch_first: bool
    unbatched: bool           # a 2-D (T, input_size) input: one sequence, states without a batch axis
    with_state: bool
    lengths: Optional[tuple]
    lengths_type: str         # how lengths are passed: a list, an int32 or an int64 array
    layout: str               # memory layout of x, the initial states and the upstream gradients
    threads: int
    simd: str                 # SIMD level of the kernels
    weight_scale: float
    cell_clip: Optional[float]
    with_dh_n: bool
    with_dc_n: bool
    seed: int
    proj_size: int = 0        # an LSTM's projection of its hidden state (0: none)

    @property
    def width(self) -> int:
        """R, the width of h and of each direction's output."""
        return self.proj_size or self.hidden

    @property
    def dirs(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def lead(self) -> int:
        return self.num_layers * self.dirs


@st.composite
def cases(draw, shape_kinds=tuple(SHAPE_KINDS)):
    cell = draw(st.sampled_from(CELLS))
    kind = draw(st.sampled_from(shape_kinds))
    batch_st, hidden_st = SHAPE_KINDS[kind]
    steps, batch, inp, hidden = draw(st.integers(1, 7)), draw(batch_st), draw(st.integers(1, 9)), draw(hidden_st)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    unbatched = batch == 1 and draw(st.booleans())
    lengths = None
    if not unbatched and draw(st.booleans()):
        lengths = tuple(draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch)))
    # Near the clip bound float32 rounding decides whether an entry is clamped (and passes no gradient),
    # so the clip is drawn in float64 only. So are weights at 3x the initialisation range (every gate in
    # its flat tails): there a wide tanh RNN amplifies rounding from step to step and layer to layer, and
    # float32 drifts from the float64 reference by more than rounding after 7 steps and 3 layers.
    float64 = dtype == np.float64
    clip = draw(st.sampled_from([None, 0.5, 1.5])) if cell == "lstm" and float64 else None
    scale = draw(st.sampled_from([1.0, 3.0])) if float64 else 1.0
    # An LSTM may project its hidden state: to one feature, or to a share of the units.
    proj = draw(st.sampled_from([0, 1, max(1, hidden // 3)])) if cell == "lstm" and hidden > 1 else 0
    return Case(
        cell=cell, shape_kind=kind, steps=steps, batch=batch, input_size=inp, hidden=hidden,
        num_layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()), bias=draw(st.booleans()),
        dtype=dtype, batch_first=draw(st.booleans()), unbatched=unbatched, with_state=draw(st.booleans()),
        lengths=lengths, lengths_type=draw(st.sampled_from(["list", "int32", "int64"])),
        layout=draw(st.sampled_from(LAYOUTS)), threads=draw(st.integers(1, 6)),
        simd=draw(st.sampled_from(SIMD_LEVELS)),
        weight_scale=scale, cell_clip=clip,
        with_dh_n=draw(st.booleans()), with_dc_n=cell == "lstm" and draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)), proj_size=proj,
    )


# ---- arrays of a case -----------------------------------------------------------------------------------


def laid_out(rng, a, layout):
    """`a`'s values in the given memory layout: a C-contiguous copy, every other entry of a larger array
    (offset by one in every axis, with finite values in between), Fortran order, or negative strides."""
    if layout == "contiguous":
        return np.ascontiguousarray(a)
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "reversed":
        return np.flip(np.flip(a).copy())
    big = rng.standard_normal(tuple(2 * n + 1 for n in a.shape)).astype(a.dtype)
    view = big[(slice(1, None, 2),) * a.ndim]
    view[...] = a
    return view


@dataclass
class Data:
    """A case's arrays, sequence-major and batched (T, B, .) / (L*D, B, R or H), in the module's dtype."""

    x: np.ndarray
    h0: Optional[np.ndarray]
    c0: Optional[np.ndarray]
    dy: np.ndarray
    dh_n: Optional[np.ndarray]
    dc_n: Optional[np.ndarray]


def make_data(case: Case, rng) -> Data:
    T, B, lead, H, R = case.steps, case.batch, case.lead, case.hidden, case.width
    r = lambda *shape: rng.standard_normal(shape).astype(case.dtype)  # noqa: E731
    state = case.with_state
    return Data(x=r(T, B, case.input_size), h0=r(lead, B, R) if state else None,
                c0=r(lead, B, H) if state and has_cell_state(case.cell) else None,
                dy=r(T, B, case.dirs * R), dh_n=r(lead, B, R) if case.with_dh_n else None,
                dc_n=r(lead, B, H) if case.with_dc_n else None)


def to_module_layout(case: Case, rng, name: str, a):
    """A sequence-major batched array as the module takes it for this case, in the case's layout."""
    if a is None:
        return None
    if case.unbatched:
        a = a[:, 0, :]
    elif case.batch_first and name in ("x", "dy"):
        a = a.transpose(1, 0, 2)
    return laid_out(rng, a, case.layout)


def to_sequence_major(case: Case, name: str, a):
    """The inverse for the module's results: (T, B, .) and (L*D, B, R or H)."""
    if a is None:
        return None
    if case.unbatched:
        return a[:, None, :]
    if case.batch_first and name in ("y", "dx"):
        return a.transpose(1, 0, 2)
    return a


def build_module(case: Case):
    m = make_module(case.cell, case.input_size, case.hidden, num_layers=case.num_layers, bias=case.bias,
                    batch_first=case.batch_first, dropout=0.0, bidirectional=case.bidirectional,
                    dtype=case.dtype, seed=case.seed, **({"cell_clip": case.cell_clip} if case.cell_clip else {}),
                    **({"proj_size": case.proj_size} if case.proj_size else {}))
    if case.weight_scale != 1.0:
        m.load_state_dict({k: v * case.weight_scale for k, v in m.state_dict().items()})
    return m


def case_lengths(case: Case):
    if case.lengths is None:
        return None
    return list(case.lengths) if case.lengths_type == "list" else np.array(case.lengths, case.lengths_type)


@contextlib.contextmanager
def running_as(case: Case):
    """fusedrnn's thread team size and SIMD level as the case draws them inside, the previous after."""
    threads, simd = fusedrnn.get_num_threads(), fusedrnn.build_info()["simd"]
    try:
        fusedrnn.set_num_threads(case.threads)
        fusedrnn.set_simd_level(case.simd)
        yield
    finally:
        fusedrnn.set_num_threads(threads)
        fusedrnn.set_simd_level(simd)


def run_module(m, case: Case, data: Data, rng) -> dict:
    """One forward and one backward of the module; every result sequence-major and batched."""
    lstm = has_cell_state(case.cell)
    arg = {name: to_module_layout(case, rng, name, getattr(data, name))
           for name in ("x", "h0", "c0", "dy", "dh_n", "dc_n")}
    hx = ((arg["h0"], arg["c0"]) if case.with_state else None) if lstm else arg["h0"]
    y, state = m(arg["x"], hx, lengths=case_lengths(case))
    dhx = (None if arg["dh_n"] is None and arg["dc_n"] is None else (arg["dh_n"], arg["dc_n"])) if lstm \
        else arg["dh_n"]
    dx, dstate = m.backward(arg["dy"], dhx)
    h_n, c_n = state if lstm else (state, None)
    dh0, dc0 = dstate if lstm else (dstate, None)
    out = {"y": y, "h_n": h_n, "c_n": c_n, "dx": dx, "dh0": dh0, "dc0": dc0}
    for name, a in out.items():
        assert (a is None) == (name in ("c_n", "dc0") and not lstm), name
        if a is not None:
            assert a.dtype == case.dtype, name
    out = {name: to_sequence_major(case, name, a) for name, a in out.items()}
    np.testing.assert_array_equal(to_sequence_major(case, "dx", m.input_grads["x"]), out["dx"])
    out.update({f"grads[{k}]": v.copy() for k, v in m.grads.items()})
    out["hidden_grad_norms"] = m.hidden_grad_norms.copy()
    return out


def run_reference(case: Case, params: dict, data: Data) -> dict:
    """The float64 reference on the module's parameters, one reference.forward/backward per layer and
    direction, stacked as torch.nn stacks them: state index k = layer * D + direction, a layer's output is
    the directions' outputs side by side, the gradient reaching a layer's input is the directions' sum."""
    f64 = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
    params = {k: f64(v) for k, v in params.items()}
    R, D = case.width, case.dirs
    suffixes = ("", "_reverse")[:D]
    lengths = None if case.lengths is None else np.array(case.lengths)
    state = lambda a, k: None if a is None else f64(a[k])  # noqa: E731

    layer_input, caches = f64(data.x), {}
    h_n, c_n = [None] * case.lead, [None] * case.lead
    for layer in range(case.num_layers):
        outputs = []
        for d, suffix in enumerate(suffixes):
            k = layer * D + d
            w_ih, w_hh, b_ih, b_hh, w_hr = (params.get(f"{n}_l{layer}{suffix}") for n in GRAD_NAMES)
            y, h_n[k], c_n[k], caches[k] = reference.forward(
                case.cell, layer_input, w_ih, w_hh, b_ih, b_hh, state(data.h0, k), state(data.c0, k),
                lengths=lengths, reverse=d == 1, cell_clip=case.cell_clip, weight_hr=w_hr)
            outputs.append(y)
        layer_input = np.concatenate(outputs, axis=2)
    out = {"y": layer_input, "h_n": np.stack(h_n)}
    out["c_n"] = np.stack(c_n) if has_cell_state(case.cell) else None

    grad_out, grads = f64(data.dy), {}
    dh0, dc0, norms = [None] * case.lead, [None] * case.lead, [None] * case.lead
    for layer in reversed(range(case.num_layers)):
        dx = 0.0
        for d, suffix in enumerate(suffixes):
            k = layer * D + d
            g = reference.backward(caches[k], grad_out[:, :, d * R:(d + 1) * R], state(data.dh_n, k),
                                   state(data.dc_n, k))
            dx = dx + g["dx"]
            dh0[k], dc0[k], norms[k] = g["dh0"], g["dc0"], g["dh_norm"]
            for name in GRAD_NAMES:
                if g[name] is not None:
                    grads[f"grads[{name}_l{layer}{suffix}]"] = g[name]
        grad_out = dx
    out.update(dx=grad_out, dh0=np.stack(dh0), dc0=np.stack(dc0) if has_cell_state(case.cell) else None)
    out.update(grads, hidden_grad_norms=np.stack(norms))
    return out


def assert_matches(actual, expected, dtype, name):
    """helpers.assert_close, with the absolute tolerance's scale at least 1 in float32 too, as
    helpers.tolerances has it for float64. Every entry is built from drawn values of size ~1 (x, states and
    upstream gradients from N(0, 1)), so its float32 rounding is ~eps in absolute terms; where it comes
    out small (a weight gradient whose terms cancel, or a saturated tanh whose derivative 1 - tanh^2 is
    taken from a float32 tanh near 1) and the array holds only that entry (H=1, B=1), the array's own
    largest value would understate the error."""
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    rtol, atol = tolerances(dtype, [np.max(np.abs(expected)), 1.0])
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


def report_split(case: Case) -> None:
    ranks, kind = _core.layer_split(case.cell, case.batch, case.hidden, case.dtype, case.proj_size)
    event(f"{case.shape_kind} layer on {ranks} rank(s) by {kind}" + (" projected" if case.proj_size else ""))


# ---- properties -----------------------------------------------------------------------------------------


@settings(PROFILE, max_examples=500)
@given(case=cases())
def test_module_matches_the_float64_reference(case):
    """Outputs, final states, the input, initial-state and parameter gradients and the per-step
    gradient norms all equal the float64 reference's on the module's own weights, within the tolerances
    of the module's dtype, whatever the cell, sizes, stacking, lengths, layout, team size and SIMD
    level; padded outputs are exactly zero and padded inputs get exactly zero gradient."""
    rng = np.random.default_rng(case.seed)
    data = make_data(case, rng)
    with running_as(case):
        report_split(case)
        m = build_module(case)
        got = run_module(m, case, data, rng)
    want = run_reference(case, m.state_dict(), data)
    assert set(got) == set(want)
    for name, expected in want.items():
        if expected is None:
            assert got[name] is None, name
        else:
            assert_matches(got[name], expected, case.dtype, name)
    if case.lengths is not None:
        padded = np.arange(case.steps)[:, None] >= np.array(case.lengths)[None, :]   # (T, B)
        assert not np.any(got["y"][padded]) and not np.any(got["dx"][padded])


@settings(PROFILE, max_examples=120)
@given(case=cases())
def test_repeat_calls_are_bit_identical(case):
    """The same inputs on the same module with the same team size give the same bits, outputs and every
    gradient alike: each value is computed by one rank in a fixed order, whatever the split."""
    rng = np.random.default_rng(case.seed)
    data = make_data(case, rng)
    with running_as(case):
        report_split(case)
        m = build_module(case)
        first = run_module(m, case, data, np.random.default_rng(case.seed + 1))
        m.zero_grad()
        second = run_module(m, case, data, np.random.default_rng(case.seed + 2))
    assert set(first) == set(second)
    for name, a in first.items():
        if a is None:
            assert second[name] is None, name
        else:
            np.testing.assert_array_equal(second[name], a, err_msg=name)


# ---- bad input ----------------------------------------------------------------------------------------

# In forward: lengths out of [1, T] or of the wrong count, a wrong input size, a wrong dtype, NaN or
# infinity in x or the initial state. In backward: a wrong dy shape, NaN or infinity in dy or dh_n.
FAULTS = ("length_below_1", "length_above_T", "lengths_count", "input_size", "x_dtype", "x_nonfinite",
          "h0_nonfinite", "dy_shape", "dy_nonfinite", "dh_n_nonfinite")


@settings(PROFILE, max_examples=150)
@given(case=cases(shape_kinds=("small",)), fault=st.sampled_from(FAULTS), data=st.data())
def test_bad_input_raises_naming_the_argument(case, fault, data):
    """Every such fault raises ValueError or TypeError whose message starts with the argument's name,
    and leaves the module usable: no gradient is accumulated, and after a rejected backward the forward
    is still there to backpropagate through."""
    rng = np.random.default_rng(case.seed)
    arrays = make_data(case, rng)
    m = build_module(case)
    lstm = has_cell_state(case.cell)
    x, h0, c0 = arrays.x, arrays.h0, arrays.c0
    lengths = case_lengths(case)
    bad = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]), label="bad value")
    where = lambda a: tuple(data.draw(st.integers(0, n - 1), label="index") for n in a.shape)  # noqa: E731

    if fault in ("length_below_1", "length_above_T", "lengths_count"):
        lengths = list(case.lengths or [case.steps] * case.batch)
        if fault == "lengths_count":
            lengths = lengths + [1] if case.batch == 1 or data.draw(st.booleans(), label="longer") else lengths[1:]
        else:
            value = data.draw(st.integers(-3, 0) if fault == "length_below_1"
                              else st.integers(case.steps + 1, case.steps + 5), label="length")
            lengths[data.draw(st.integers(0, case.batch - 1), label="row")] = value
        name, exc = "lengths", ValueError    # an unbatched input takes no lengths at all
    elif fault == "input_size":
        size = data.draw(st.integers(1, 12).filter(lambda n: n != case.input_size), label="input size")
        x, name, exc = rng.standard_normal(x.shape[:2] + (size,)).astype(case.dtype), "x", ValueError
    elif fault == "x_dtype":
        other = data.draw(st.sampled_from([np.float32, np.float64, np.float16, np.int32])
                          .filter(lambda t: t != case.dtype), label="dtype")
        x, name, exc = x.astype(other), "x", TypeError
    elif fault == "x_nonfinite":
        x[where(x)] = bad
        name, exc = "x", ValueError
    elif fault == "h0_nonfinite":
        h0 = h0 if h0 is not None else np.zeros((case.lead, case.batch, case.width), case.dtype)
        c0 = np.zeros((case.lead, case.batch, case.hidden), case.dtype) if lstm else None
        h0[where(h0)] = bad
        name, exc = ("h0" if lstm else "hx"), ValueError

    layout = lambda n, a: to_module_layout(case, rng, n, a)  # noqa: E731
    x, h0, c0 = layout("x", x), layout("h0", h0), layout("c0", c0)
    hx = ((h0, c0) if h0 is not None else None) if lstm else h0
    if fault not in ("dy_shape", "dy_nonfinite", "dh_n_nonfinite"):
        with pytest.raises(exc, match=rf"^{name}: "):
            m(x, hx, lengths=lengths)
        assert all(not np.any(g) for g in m.grads.values()) and m.input_grads == {}
        return

    m(x, hx, lengths=lengths)
    dy, dh_n = arrays.dy.copy(), None
    if fault == "dy_shape":
        grown = list(dy.shape)
        grown[data.draw(st.sampled_from((0, 2) if case.unbatched else (0, 1, 2)), label="axis")] += 1
        dy = rng.standard_normal(grown).astype(case.dtype)
    elif fault == "dy_nonfinite":
        dy[where(dy)] = bad
    else:
        dh_n = rng.standard_normal((case.lead, case.batch, case.width)).astype(case.dtype)
        dh_n[where(dh_n)] = bad
    name = "dh_n" if fault == "dh_n_nonfinite" else "dy"
    dh_n = layout("dh_n", dh_n)
    with pytest.raises(ValueError, match=rf"^{name}: "):
        m.backward(layout("dy", dy), (dh_n, None) if lstm else dh_n)
    assert all(not np.any(g) for g in m.grads.values()) and m.input_grads == {}
    m.backward(layout("dy", arrays.dy))   # the rejected call did not consume the forward
