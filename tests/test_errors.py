"""Every public entry point rejects bad input with ValueError/TypeError (RuntimeError for a backward with
nothing to backpropagate through) whose message starts with the name of the offending argument."""

import platform
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import fusedrnn
from fusedrnn import functional as F
from helpers import CELLS, GATES, has_cell_state, make_module, needs_throwing_new

T, B, I, H = 4, 3, 5, 2


def f32(*shape, fill=0.5):
    return np.full(shape, fill, np.float32)


# ---- modules: forward -----------------------------------------------------------------------------------


@pytest.fixture(params=CELLS)
def cell(request):
    return request.param


@pytest.fixture
def module(cell):
    return make_module(cell, I, H, num_layers=2, seed=0)


def _hx(cell, h0, c0=None):
    return (h0, f32(2, B, H) if c0 is None else c0) if has_cell_state(cell) else h0


BAD_X = [
    (f32(T, B, I, 1), ValueError, r"^x: expected a 2-D or 3-D array"),
    (f32(I), ValueError, r"^x: expected a 2-D or 3-D array"),
    (np.float32(1.0), ValueError, r"^x: "),
    (np.zeros((T, B, I), np.float64), TypeError, r"^x: expected dtype float32, got float64"),
    (np.zeros((T, B, I), np.int32), TypeError, r"^x: expected dtype float32"),
    (np.zeros((T, B, I), np.float16), TypeError, r"^x: expected dtype float32"),
    ("not an array", TypeError, r"^x: "),
    (None, TypeError, r"^x: "),
    ({"x": 1}, TypeError, r"^x: "),
    ([[[0.5] * I] * B] * T, TypeError, r"^x: "),  # a list converts to float64, never silently cast
    (f32(T, 0, I), ValueError, r"^x: empty input"),
    (f32(0, B, I), ValueError, r"^x: empty input"),
    (f32(T, B, I + 1), ValueError, r"^x: expected input_size 5 .* got 6"),
    (f32(T, I + 1), ValueError, r"^x: expected input_size 5"),
]


@pytest.mark.parametrize("x, exc, match", BAD_X,
                         ids=["4d", "1d", "0d", "float64", "int32", "float16", "str", "None", "dict", "list",
                              "B0", "T0", "wrong_I", "unbatched_wrong_I"])
def test_forward_rejects_bad_x(module, x, exc, match):
    with pytest.raises(exc, match=match):
        module(x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_forward_rejects_non_finite_x(module, bad):
    x = f32(T, B, I)
    x[2, 1, 3] = bad
    with pytest.raises(ValueError, match=r"^x: contains NaN or infinite"):
        module(x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_finite_check_finds_one_bad_value_anywhere(simd_level, dtype, layout):
    # The native scan runs in memory order in blocks of 4096 values, in one share per rank of the team
    # for large arrays: the first value, both sides of block edges and of the shares' edges (halves
    # or thirds), the last (in the tail). Strided views take numpy's path.
    from fusedrnn import _checks
    shape = (3, 50000) if layout != "strided" else (3, 100000)
    base = np.ones(shape, dtype=dtype, order="F" if layout == "F" else "C")
    base[0, 0] = np.finfo(dtype).max  # the largest finite value passes
    view = base[:, ::2] if layout == "strided" else base
    edges = (0, 4095, 4096, 8191, 49999, 50000, 74999, 75000, 99999, 100000, view.size - 1)
    threads = fusedrnn.get_num_threads()
    try:
        for team in (1, 2, 3):
            fusedrnn.set_num_threads(team)
            _checks.finite("a", view)
            for flat in edges:
                for bad in (np.nan, np.inf, -np.inf):
                    a = view.copy(order="K") if layout != "strided" else base.copy()[:, ::2]
                    a[np.unravel_index(flat, a.shape, order="F" if layout == "F" else "C")] = bad
                    with pytest.raises(ValueError, match=r"^a: contains NaN or infinite"):
                        _checks.finite("a", a)
    finally:
        fusedrnn.set_num_threads(threads)


# glibc's FE_DOWNWARD on the machines the wheels are built for (Python does not expose <fenv.h>).
_FE_DOWNWARD = {"x86_64": 0x400, "aarch64": 0x800000}


@pytest.mark.skipif(platform.machine() not in _FE_DOWNWARD, reason="FE_DOWNWARD's value is not known here")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_check_holds_when_the_caller_rounds_downward(dtype):
    # x - x is -0, not +0, under downward rounding: a finite array must still pass, and NaN still fail.
    import ctypes
    import ctypes.util
    from fusedrnn import _checks
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    to_nearest, downward = 0x000, _FE_DOWNWARD[platform.machine()]
    threads = fusedrnn.get_num_threads()
    assert libm.fesetround(downward) == 0
    try:
        for team in (1, 2):
            fusedrnn.set_num_threads(team)
            for size in (7, 100000):
                a = np.linspace(-3, 3, size).astype(dtype)
                _checks.finite("a", a)
                a[size // 2] = np.nan
                with pytest.raises(ValueError, match=r"^a: contains NaN or infinite"):
                    _checks.finite("a", a)
    finally:
        libm.fesetround(to_nearest)
        fusedrnn.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_into_adds_every_value(simd_level, rng, dtype):
    # Shared across the team for large arrays: every share, edges included, gets added exactly once.
    from fusedrnn import _core
    threads = fusedrnn.get_num_threads()
    try:
        for team in (1, 2, 3):
            fusedrnn.set_num_threads(team)
            for size in (1, 4099, 3 * 65536 + 7):
                into, frm = rng.standard_normal(size).astype(dtype), rng.standard_normal(size).astype(dtype)
                want = into + frm
                _core.add_into(into, frm)
                np.testing.assert_array_equal(into, want)
    finally:
        fusedrnn.set_num_threads(threads)
    a = np.zeros(8, dtype)
    with pytest.raises(ValueError, match=r"^into, from: expected the same dtype and size"):
        _core.add_into(a, np.zeros(9, dtype))
    with pytest.raises(TypeError, match=r"^into, from: expected C-contiguous"):
        _core.add_into(a, np.zeros(16, dtype)[::2])
    # The native passes read whole elements: an array at an odd byte offset is refused, not misread.
    unaligned = np.frombuffer(np.zeros(8 * a.itemsize + 1, np.uint8).data, dtype, 8, offset=1)
    assert not unaligned.flags.aligned
    with pytest.raises(TypeError, match=r"^into, from: expected C-contiguous aligned"):
        _core.add_into(a, unaligned)
    with pytest.raises(TypeError, match=r"^a: expected an aligned array"):
        _core.all_finite(unaligned)


def test_forward_rejects_bad_x_batch_first(cell):
    m = make_module(cell, I, H, batch_first=True)
    with pytest.raises(ValueError, match=r"^x: expected input_size"):
        m(f32(B, T, I + 2))
    with pytest.raises(ValueError, match=rf"^x: empty input .*, got shape \(0, {T}, {I}\)$"):
        m(f32(0, T, I))  # the shape as given, not as transposed to (T, B, I)
    with pytest.raises(ValueError, match=rf"^x: empty input .*, got shape \(0, {I}\)$"):
        make_module(cell, I, H)(f32(0, I))  # unbatched: no batch axis added to the shape shown


def test_forward_rejects_bad_hidden_state(module, cell):
    name = "h0" if has_cell_state(cell) else "hx"
    cases = [
        (f32(2, B, H + 1), ValueError, rf"^{name}: expected shape \(2, 3, 2\), got \(2, 3, 3\)"),
        (f32(1, B, H), ValueError, rf"^{name}: expected shape \(2, 3, 2\)"),   # num_layers*dirs rows
        (f32(2, B + 1, H), ValueError, rf"^{name}: expected shape"),          # batch mismatch
        (f32(B, H), ValueError, rf"^{name}: expected a 3-D array"),           # unbatched state, batched x
        (np.zeros((2, B, H)), TypeError, rf"^{name}: expected dtype float32, got float64"),
        ("junk", TypeError, rf"^{name}: expected dtype float32"),
        (f32(2, B, H, fill=np.nan), ValueError, rf"^{name}: contains NaN"),
        (f32(2, B, H, fill=np.inf), ValueError, rf"^{name}: contains NaN"),
    ]
    for h0, exc, match in cases:
        with pytest.raises(exc, match=match):
            module(f32(T, B, I), _hx(cell, h0))


def test_forward_rejects_bad_cell_state():
    m = fusedrnn.LSTM(I, H, num_layers=2)
    good = f32(2, B, H)
    for c0, exc, match in [(f32(2, B, H + 1), ValueError, r"^c0: expected shape"),
                           (np.zeros((2, B, H)), TypeError, r"^c0: expected dtype float32"),
                           (f32(2, B, H, fill=np.nan), ValueError, r"^c0: contains NaN")]:
        with pytest.raises(exc, match=match):
            m(f32(T, B, I), (good, c0))


@pytest.mark.parametrize("hx", [f32(2, B, H), (f32(2, B, H),), (f32(2, B, H),) * 3, "hx"],
                         ids=["array", "1-tuple", "3-tuple", "str"])
def test_lstm_hx_must_be_a_pair(hx):
    m = fusedrnn.LSTM(I, H, num_layers=2)
    with pytest.raises(TypeError, match=r"^hx: expected a tuple \(h0, c0\)"):
        m(f32(T, B, I), hx)


def test_unbatched_input_needs_unbatched_state(module, cell):
    name = "h0" if has_cell_state(cell) else "hx"
    with pytest.raises(ValueError, match=rf"^{name}: expected a 2-D array"):
        module(f32(T, I), _hx(cell, f32(2, 1, H), f32(2, 1, H)))


BAD_LENGTHS = [
    ([0, 2, 3], ValueError, r"^lengths: each length must be in \[1, 4\] \(T\), got 0 at index 0"),
    ([1, 5, 3], ValueError, r"^lengths: each length must be in \[1, 4\] \(T\), got 5 at index 1"),
    ([1, 2, -1], ValueError, r"^lengths: each length must be in \[1, 4\].* index 2"),
    ([1, 2], ValueError, r"^lengths: expected shape \(3,\)"),
    ([1, 2, 3, 4], ValueError, r"^lengths: expected shape \(3,\)"),
    ([[1, 2, 3]], ValueError, r"^lengths: expected shape \(3,\)"),
    (3, ValueError, r"^lengths: expected shape \(3,\)"),
    ([1.0, np.nan, 2.0], ValueError, r"^lengths: contains NaN"),
    ([1.0, np.inf, 2.0], ValueError, r"^lengths: contains NaN or infinite"),
    ([1.5, 2.0, 3.0], ValueError, r"^lengths: expected whole numbers"),
    (["a", "b", "c"], TypeError, r"^lengths: expected integers"),
    (np.array([1, 2, 3], dtype=np.uint64) * np.uint64(2**62), ValueError, r"^lengths: each length"),
]


@pytest.mark.parametrize("lengths, exc, match", BAD_LENGTHS,
                         ids=["zero", "above_T", "negative", "short", "long", "2d", "scalar", "nan", "inf",
                              "fraction", "str", "huge_uint"])
def test_forward_rejects_bad_lengths(module, lengths, exc, match):
    with pytest.raises(exc, match=match):
        module(f32(T, B, I), lengths=lengths)


def test_whole_float_lengths_are_accepted(module):
    # Float lengths that are whole numbers mean the same as the integers.
    y_int, _ = module(f32(T, B, I, fill=0.3), lengths=[4, 1, 2])
    y_float, _ = module(f32(T, B, I, fill=0.3), lengths=np.array([4.0, 1.0, 2.0]))
    np.testing.assert_array_equal(y_int, y_float)
    assert np.all(y_int[1:, 1] == 0) and np.any(y_int[1, 0] != 0)


def test_lengths_rejected_for_unbatched_input(module):
    with pytest.raises(ValueError, match=r"^lengths: not meaningful for an unbatched"):
        module(f32(T, I), lengths=[T])


# ---- modules: backward ----------------------------------------------------------------------------------


def test_backward_without_forward_raises(module):
    with pytest.raises(RuntimeError, match=r"^backward: no training-mode forward"):
        module.backward(f32(T, B, 2 * H))


def test_backward_after_eval_forward_raises(module):
    module.eval()
    module(f32(T, B, I))
    with pytest.raises(RuntimeError, match=r"^backward: "):
        module.backward(f32(T, B, H))


def test_eval_forward_keeps_no_tape_of_its_own(module):
    module.eval()
    module(f32(T, B, I))
    with pytest.raises(RuntimeError, match=r"^backward: "):
        module.backward(f32(T, B, H))


def test_backward_consumes_the_forward(module):
    module(f32(T, B, I))
    module.backward(f32(T, B, H))
    with pytest.raises(RuntimeError, match=r"^backward: "):
        module.backward(f32(T, B, H))


def _dh(cell, dh_n, dc_n=None):
    return (dh_n, f32(2, B, H) if dc_n is None else dc_n) if has_cell_state(cell) else dh_n


@pytest.mark.parametrize("dy, exc, match", [
    (f32(T, B, H, 1), ValueError, r"^dy: expected a 3-D array"),
    (f32(T, H), ValueError, r"^dy: expected a 3-D array"),
    (f32(T, B, H + 1), ValueError, r"^dy: expected shape \(4, 3, 2\), got \(4, 3, 3\)"),
    (f32(T + 1, B, H), ValueError, r"^dy: expected shape \(4, 3, 2\)"),
    (f32(B, T, H), ValueError, r"^dy: expected shape \(4, 3, 2\)"),  # batch_first layout, module is not
    (np.zeros((T, B, H)), TypeError, r"^dy: expected dtype float32, got float64"),
    ("dy", TypeError, r"^dy: expected dtype float32"),
    (f32(T, B, H, fill=np.nan), ValueError, r"^dy: contains NaN"),
], ids=["4d", "2d", "wrong_H", "wrong_T", "transposed", "float64", "str", "nan"])
def test_backward_rejects_bad_dy(module, dy, exc, match):
    module(f32(T, B, I))
    with pytest.raises(exc, match=match):
        module.backward(dy)


@pytest.mark.parametrize("dh_n, exc, match", [
    (f32(2, B, H + 1), ValueError, r"^dh_n: expected shape \(2, 3, 2\)"),
    (f32(B, H), ValueError, r"^dh_n: expected a 3-D array"),
    (np.zeros((2, B, H)), TypeError, r"^dh_n: expected dtype float32"),
    (f32(2, B, H, fill=np.nan), ValueError, r"^dh_n: contains NaN"),
], ids=["shape", "rank", "dtype", "nan"])
def test_backward_rejects_bad_dh_n(module, cell, dh_n, exc, match):
    module(f32(T, B, I))
    with pytest.raises(exc, match=match):
        module.backward(None, _dh(cell, dh_n))


def test_backward_rejects_bad_dc_n():
    m = fusedrnn.LSTM(I, H, num_layers=2)
    for dc_n, exc, match in [(f32(2, B, H + 1), ValueError, r"^dc_n: expected shape"),
                             (np.zeros((2, B, H)), TypeError, r"^dc_n: expected dtype float32"),
                             (f32(2, B, H, fill=np.inf), ValueError, r"^dc_n: contains NaN")]:
        m(f32(T, B, I))
        with pytest.raises(exc, match=match):
            m.backward(None, (f32(2, B, H), dc_n))


def test_lstm_backward_dhx_must_be_a_pair():
    # The argument is `dhx`; the error must name it, not the forward's `hx`.
    m = fusedrnn.LSTM(I, H, num_layers=2)
    m(f32(T, B, I))
    with pytest.raises(TypeError, match=r"^dhx: "):
        m.backward(None, f32(2, B, H))


def test_failed_backward_keeps_the_tape(module, cell):
    # A backward rejected for a bad argument must not consume the forward: the corrected call works.
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    dy = np.random.default_rng(1).standard_normal((T, B, H)).astype(np.float32)
    module(x)
    with pytest.raises(ValueError, match=r"^dy: "):
        module.backward(dy[:, :, :1])
    with pytest.raises(TypeError, match=r"^per_sample: expected a bool, got str"):
        module.backward(dy, per_sample="yes")
    dx, _ = module.backward(dy, per_sample=np.False_)  # NumPy's bools are bools, as for every flag
    grads = {k: v.copy() for k, v in module.grads.items()}
    module.zero_grad()
    module(x)
    dx_fresh, _ = module.backward(dy)
    np.testing.assert_array_equal(dx, dx_fresh)
    for k, v in module.grads.items():
        np.testing.assert_array_equal(grads[k], v)
    assert np.any(dx != 0)


def test_linear_rejects_bad_input_and_keeps_its_forward():
    lin = fusedrnn.Linear(3, 2, seed=0)
    x = np.ones((4, 3), np.float32)
    for bad, match in ((np.float32(1), r"^x: expected a 1-D to 32-D array, got shape \(\)"),
                       (np.where(np.eye(4, 3) > 0, np.inf, x).astype(np.float32), r"^x: contains NaN or infinite")):
        with pytest.raises(ValueError, match=match):
            lin(bad)
    y = lin(x)
    for bad, match in ((np.ones((4, 5), np.float32), r"^dy: expected shape \(4, 2\)"),
                       (np.full((4, 2), np.nan, np.float32), r"^dy: contains NaN")):
        with pytest.raises(ValueError, match=match):
            lin.backward(bad)
    dx = lin.backward(np.ones_like(y))  # the forward was kept through the rejected calls
    np.testing.assert_allclose(dx, np.ones((4, 2)) @ lin.state_dict()["weight"], rtol=1e-6)


# ---- constructors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(hidden_size=0), ValueError, r"^hidden_size: expected an int >= 1, got 0"),
    (dict(hidden_size=-4), ValueError, r"^hidden_size: "),
    (dict(hidden_size=2.5), TypeError, r"^hidden_size: expected an int, got float"),
    (dict(hidden_size=True), TypeError, r"^hidden_size: expected an int, got bool"),
    (dict(hidden_size="8"), TypeError, r"^hidden_size: "),
    (dict(input_size=0), ValueError, r"^input_size: expected an int >= 1"),
    (dict(input_size=None), TypeError, r"^input_size: "),
    (dict(num_layers=0), ValueError, r"^num_layers: expected an int >= 1"),
    (dict(num_layers=1.0), TypeError, r"^num_layers: "),
    (dict(dropout=1.5), ValueError, r"^dropout: expected a probability in \[0, 1\], got 1.5"),
    (dict(dropout=-0.1), ValueError, r"^dropout: "),
    (dict(dropout=float("nan")), ValueError, r"^dropout: "),
    (dict(dropout="0.5"), TypeError, r"^dropout: "),
    (dict(dtype=np.int32), TypeError, r"^dtype: expected float32 or float64, got int32"),
    (dict(dtype=np.float16), TypeError, r"^dtype: expected float32 or float64"),
    (dict(dtype=np.complex64), TypeError, r"^dtype: expected float32 or float64"),
    (dict(dtype="not a dtype"), TypeError, r"^dtype: expected float32 or float64"),
    (dict(seed="x"), TypeError, r"^seed: expected an int, got str"),
    (dict(seed=-1), ValueError, r"^seed: expected an int >= 0, got -1"),
    (dict(seed=1.0), TypeError, r"^seed: expected an int, got float"),
], ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None)
def test_constructor_rejects_bad_arguments(cell, kwargs, exc, match):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        make_module(cell, args.pop("input_size"), args.pop("hidden_size"), **args)


def test_linear_rejects_a_bad_seed():
    with pytest.raises(ValueError, match=r"^seed: expected an int >= 0, got -2"):
        fusedrnn.Linear(3, 2, seed=-2)


@pytest.mark.parametrize("nonlinearity", ["sigmoid", "Tanh", None])
def test_rnn_rejects_unknown_nonlinearity(nonlinearity):
    with pytest.raises(ValueError, match=r"^nonlinearity: expected 'tanh' or 'relu'"):
        fusedrnn.RNN(3, 4, 1, nonlinearity)


# ---- load_state_dict -----------------------------------------------------------------------------------


def _assert_params_equal(m, snapshot):
    for name, value in m.state_dict().items():
        np.testing.assert_array_equal(value, snapshot[name], err_msg=name)


def test_load_state_dict_rejects_missing_and_unexpected_keys(module):
    before = module.state_dict()
    sd = module.state_dict()
    sd.pop("weight_hh_l1")
    with pytest.raises(ValueError, match=r"^state_dict: missing keys \['weight_hh_l1'\]"):
        module.load_state_dict(sd)
    sd = module.state_dict()
    sd["weight_hh_l2"] = sd["weight_hh_l1"]
    with pytest.raises(ValueError, match=r"^state_dict: .*unexpected keys \['weight_hh_l2'\]"):
        module.load_state_dict(sd)
    _assert_params_equal(module, before)


def test_load_state_dict_non_strict_loads_what_matches(module):
    new = {k: v + 1 for k, v in module.state_dict().items()}
    before = module.state_dict()
    partial = {"weight_ih_l0": new["weight_ih_l0"], "something_else": np.zeros(3)}
    module.load_state_dict(partial, strict=False)
    np.testing.assert_array_equal(module.weight_ih_l0, new["weight_ih_l0"])
    np.testing.assert_array_equal(module.weight_hh_l0, before["weight_hh_l0"])


@pytest.mark.parametrize("name", ["weight_ih_l0", "weight_hh_l1", "bias_hh_l1"])
def test_load_state_dict_rejects_wrong_shape(module, name):
    sd = module.state_dict()
    sd[name] = np.zeros(sd[name].shape + (1,), np.float32)
    with pytest.raises(ValueError, match=rf"^state_dict\['{name}'\]: expected shape"):
        module.load_state_dict(sd)
    sd[name] = sd[name].T
    with pytest.raises(ValueError, match=rf"^state_dict\['{name}'\]: expected shape"):
        module.load_state_dict(sd)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_load_state_dict_rejects_non_finite(module, bad):
    sd = module.state_dict()
    sd["weight_hh_l0"][1, 1] = bad
    with pytest.raises(ValueError, match=r"^state_dict\['weight_hh_l0'\]: contains NaN"):
        module.load_state_dict(sd)


def test_load_state_dict_rejects_values_beyond_the_dtype_range():
    # 1e39 has no float32 value. It must be refused naming the key and the range (the caller's array
    # holds no NaN or infinity), without a NumPy overflow warning escaping first (warnings are errors
    # here, as in strict test runs).
    module = fusedrnn.LSTM(I, H, num_layers=2)
    sd = {k: v.astype(np.float64) for k, v in module.state_dict().items()}
    sd["weight_ih_l1"][0, 0] = 1e39
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"^state_dict\['weight_ih_l1'\]: holds values past float32's range "
                                             r"\(largest magnitude 3\.403e\+38\)$"):
            module.load_state_dict(sd)


def test_load_state_dict_rejects_non_numeric(module):
    sd = module.state_dict()
    sd["bias_ih_l0"] = np.array(["a"] * sd["bias_ih_l0"].size)
    with pytest.raises(TypeError, match=r"^state_dict\['bias_ih_l0'\]: expected a real numeric array"):
        module.load_state_dict(sd)
    with pytest.raises(TypeError, match=r"^state_dict: expected a mapping"):
        module.load_state_dict([("weight_ih_l0", np.zeros(3))])


def test_failed_load_state_dict_leaves_parameters_unchanged(module):
    # Every value is checked before any is written: a bad LAST entry must not leave the earlier ones loaded.
    before = module.state_dict()
    for corrupt in ("shape", "nan", "dtype"):
        sd = {k: v + 1.0 for k, v in module.state_dict().items()}
        last = list(sd)[-1]
        if corrupt == "shape":
            sd[last] = np.zeros(3)
        elif corrupt == "nan":
            sd[last][0] = np.nan
        else:
            sd[last] = np.array(["x"] * sd[last].size)
        with pytest.raises((ValueError, TypeError), match=rf"^state_dict\['{last}'\]"):
            module.load_state_dict(sd)
        _assert_params_equal(module, before)


def test_state_dict_is_a_copy(module):
    sd = module.state_dict()
    sd["weight_ih_l0"][...] = 7.0
    assert not np.any(module.weight_ih_l0 == 7.0)


# ---- functional ----------------------------------------------------------------------------------------


def _layer_args(cell, dtype=np.float64):
    g = GATES[cell]
    rng = np.random.default_rng(0)
    r = lambda *s: rng.uniform(-0.5, 0.5, s).astype(dtype)  # noqa: E731
    return dict(x=r(T, B, I), weight_ih=r(g * H, I), weight_hh=r(g * H, H), bias_ih=r(g * H),
                bias_hh=r(g * H), h0=r(B, H), c0=r(B, H) if has_cell_state(cell) else None)


def _forward(cell, **overrides):
    args = _layer_args(cell)
    args.update(overrides)
    return F.layer_forward(cell, args.pop("x"), args.pop("weight_ih"), args.pop("weight_hh"),
                           args.pop("bias_ih"), args.pop("bias_hh"), args.pop("h0"), args.pop("c0"), **args)


def test_functional_valid_arguments_run(cell):
    # The baseline every case below breaks in exactly one place.
    out = _forward(cell)
    assert out.y.shape == (T, B, H) and np.all(np.isfinite(out.y)) and np.any(out.y != 0)


def test_functional_rejects_unknown_cell():
    args = _layer_args("lstm")
    with pytest.raises(ValueError, match=r"^cell: expected one of"):
        F.layer_forward("LSTM", args["x"], args["weight_ih"], args["weight_hh"])


def test_functional_rejects_bad_x(cell):
    g = GATES[cell]
    cases = [
        (dict(x=np.zeros((T, B))), ValueError, r"^x: expected a 3-D array"),
        (dict(x=np.zeros((T, B, I, 1))), ValueError, r"^x: expected a 3-D array"),
        (dict(x="abc"), ValueError, r"^x: expected a 3-D array"),
        (dict(x=np.zeros((T, B, I), np.int64)), TypeError, r"^x: expected dtype float32 or float64"),
        (dict(x=np.zeros((T, B, I), np.float16)), TypeError, r"^x: expected dtype float32 or float64"),
        (dict(x=np.zeros((0, B, I)), lengths=None), ValueError, r"^x: expected at least one time step"),
        (dict(x=np.zeros((T, 0, I)), h0=None, c0=None), ValueError, r"^x: empty batch"),
        (dict(x=np.zeros((T, B, 0)), weight_ih=np.zeros((g * H, 0))), ValueError, r"^x: input_size"),
        (dict(x=np.zeros((T, B, I + 1))), ValueError, r"^weight_ih: expected shape"),  # I from x
    ]
    for overrides, exc, match in cases:
        with pytest.raises(exc, match=match):
            _forward(cell, **overrides)


def test_functional_says_x_decides_the_dtype(cell):
    """A nested list for x converts to float64: float32 weights are told why float64 was expected."""
    a = _layer_args(cell, np.float32)
    with pytest.raises(TypeError, match=r"^weight_hh: expected dtype float64 \(x's\), got float32$"):
        F.layer_forward(cell, a["x"].tolist(), a["weight_ih"], a["weight_hh"])


def test_functional_rejects_bad_weights(cell):
    g = GATES[cell]
    a = _layer_args(cell)
    cases = [
        (dict(weight_ih=a["weight_ih"][:-1]), ValueError, rf"^weight_ih: expected shape \({g * H}, {I}\)"),
        (dict(weight_ih=a["weight_ih"].T), ValueError, r"^weight_ih: expected shape"),
        (dict(weight_ih=a["weight_ih"].astype(np.float32)), TypeError,
         r"^weight_ih: expected dtype float64 \(x's\), got float32$"),
        (dict(weight_hh=a["weight_hh"][:, 0]), ValueError, r"^weight_hh: expected a 2-D array"),
        (dict(weight_hh=None), ValueError, r"^weight_hh: expected a 2-D array"),
        (dict(weight_hh=a["weight_hh"][:-1]), ValueError,
         rf"^weight_hh: expected shape \({g}\*hidden_size, hidden_size\) for cell '{cell}', got \({g * H - 1}, {H}\)$"),
        (dict(weight_hh=np.zeros((g * H, 0))), ValueError, r"^weight_hh: hidden_size must be >= 1"),
        (dict(weight_hh=a["weight_hh"].astype(np.float32)), TypeError, r"^weight_hh: expected dtype float64"),
        # weight_hh alone shows it is not (G*h, h) for any h: its error names that rule, not a size
        # derived from one of its two wrong dimensions.
        (dict(weight_hh=np.zeros((g * H, H + 1))), ValueError,
         rf"^weight_hh: expected shape \({g}\*hidden_size, hidden_size\) for cell '{cell}', got \({g * H}, {H + 1}\)$"),
        (dict(bias_ih=a["bias_ih"][:-1]), ValueError, rf"^bias_ih: expected shape \({g * H},\)"),
        (dict(bias_hh=a["bias_hh"][None]), ValueError, r"^bias_hh: expected shape"),
        (dict(bias_hh=a["bias_hh"].astype(np.float32)), TypeError, r"^bias_hh: expected dtype float64"),
        (dict(bias_hh=None), ValueError, r"^bias_ih, bias_hh: pass both or neither"),
        (dict(bias_ih=None), ValueError, r"^bias_ih, bias_hh: pass both or neither"),
    ]
    if cell == "lstm":  # an empty projection is weight_hr's error: with one, weight_hh's columns are its size
        cases += [(dict(weight_hh=np.zeros((g * H, 0)), weight_hr=np.zeros((0, H))), ValueError,
                   r"^weight_hr: expected shape \(proj_size, hidden_size\) with 0 < proj_size < hidden_size, got \(0, 2\)")]
    for overrides, exc, match in cases:
        with pytest.raises(exc, match=match):
            _forward(cell, **overrides)


def test_functional_rejects_bad_states(cell):
    cases = [
        (dict(h0=np.zeros((B, H + 1))), ValueError, r"^h0: expected shape \(3, 2\), got \(3, 3\)"),
        (dict(h0=np.zeros((1, B, H))), ValueError, r"^h0: expected shape"),
        (dict(h0=np.zeros((B, H), np.float32)), TypeError, r"^h0: expected dtype float64"),
        (dict(h0="abc"), TypeError, r"^h0: expected dtype float32 or float64, got <U3"),
        (dict(h0=np.zeros((B, H), bool)), TypeError, r"^h0: expected dtype float32 or float64, got bool"),
    ]
    if has_cell_state(cell):
        cases += [(dict(c0=np.zeros((B + 1, H))), ValueError, r"^c0: expected shape"),
                  (dict(c0=np.zeros((B, H), np.float32)), TypeError, r"^c0: expected dtype float64")]
    else:
        cases += [(dict(c0=np.zeros((B, H))), ValueError, r"^c0: only an LSTM has a cell state")]
    for overrides, exc, match in cases:
        with pytest.raises(exc, match=match):
            _forward(cell, **overrides)


@pytest.mark.parametrize("lengths, exc, match", BAD_LENGTHS,
                         ids=["zero", "above_T", "negative", "short", "long", "2d", "scalar", "nan", "inf",
                              "fraction", "str", "huge_uint"])
def test_functional_rejects_bad_lengths(cell, lengths, exc, match):
    with pytest.raises(exc, match=match):
        _forward(cell, lengths=lengths)


def test_functional_cell_clip_follows_the_modules_rule(cell):
    # One rule for the functional layer and the modules: a positive finite bound, or None.
    cases = [(np.inf, ValueError, r"^cell_clip: expected a positive finite bound, got inf"),
             (0.0, ValueError, r"^cell_clip: expected a positive finite bound"),
             (-1, ValueError, r"^cell_clip: expected a positive finite bound"),
             (np.nan, ValueError, r"^cell_clip: expected a positive finite bound"),
             ("1", TypeError, r"^cell_clip: expected a positive float or None, got str"),
             (True, TypeError, r"^cell_clip: expected a positive float or None, got bool")]
    if not has_cell_state(cell):
        cases.append((1.0, ValueError, rf"^cell_clip: '{cell}' has no cell state to clip"))
    for value, exc, match in cases:
        with pytest.raises(exc, match=match):
            _forward(cell, cell_clip=value)
        if has_cell_state(cell):
            with pytest.raises(exc, match=match):
                make_module(cell, I, H, cell_clip=value)
    if has_cell_state(cell):
        assert np.all(np.abs(_forward(cell, cell_clip=np.float32(0.25)).c_n) <= 0.25)


def test_functional_rejects_bad_out(cell):
    cases = [
        (np.zeros((T, B, H + 1)), ValueError, r"^out: expected shape \(4, 3, 2\)"),
        (np.zeros((T, B, H), np.float32), TypeError, r"^out: expected dtype float64"),
        (np.zeros((T, B, 2 * H))[:, :, ::2], ValueError, r"^out: needs a contiguous last dimension"),
        (np.zeros((T, B, H))[::-1], ValueError, r"^out: needs a contiguous last dimension"),
        (1.0, TypeError, r"^out: expected a NumPy array, got float"),
        (np.zeros((T, B, H)).tolist(), TypeError, r"^out: expected a NumPy array, got list"),
    ]
    read_only = np.zeros((T, B, H))
    read_only.flags.writeable = False
    cases.append((read_only, ValueError, r"^out: array is read-only"))
    unaligned = np.frombuffer(bytearray(T * B * H * 8 + 1), np.float64, T * B * H, offset=1).reshape(T, B, H)
    cases.append((unaligned, ValueError, r"^out: its data is not aligned to its element size"))
    for out, exc, match in cases:
        with pytest.raises(exc, match=match):
            _forward(cell, out=out)
    # Unaligned gradient buffers likewise (dx; the grads' arrays share the check).
    out = _forward(cell, training=True)
    dx = np.frombuffer(bytearray(T * B * I * 8 + 1), np.float64, T * B * I, offset=1).reshape(T, B, I)
    with pytest.raises(ValueError, match=r"^dx: its data is not aligned to its element size"):
        F.layer_backward(out.tape, np.ones((T, B, H)), dx=dx)


def test_functional_refuses_outputs_sharing_memory_with_what_the_call_reads(cell):
    # The team would read values it is overwriting: a race, not an in-place update.
    a = _layer_args(cell)
    wide = np.zeros((T, B, 2 * H))
    for name, out in (("x", a["x"][:, :, :H]), ("h0", np.broadcast_to(a["h0"], (T, B, H))), ("weight_hh", None)):
        if out is None:  # out's memory inside weight_hh's
            buffer = np.zeros((T * B * H + a["weight_hh"].size,))
            a["weight_hh"] = buffer[:a["weight_hh"].size].reshape(a["weight_hh"].shape)
            out = buffer[:T * B * H].reshape(T, B, H)
        args = dict(a, out=out)
        with pytest.raises(ValueError, match=rf"^out: shares memory with {name}"):
            _forward(cell, **args)
    for name in ("weight_hh", "h0"):  # the memory read as another array type: a CPU torch tensor, a memoryview
        torch = pytest.importorskip("torch")
        buffer = np.zeros((T * B * H + a[name].size,))
        shared = buffer[:a[name].size].reshape(a[name].shape)
        shared[...] = a[name]
        out = buffer[:T * B * H].reshape(T, B, H)
        for read_as in (torch.from_numpy(shared), memoryview(shared)):
            with pytest.raises(ValueError, match=rf"^out: shares memory with {name}"):
                _forward(cell, **dict(a, out=out, **{name: read_as}))
    out = _forward(cell, out=wide[:, :, H:])  # a slice of an array the call does not read: fine
    assert out.y.base is not None and np.array_equal(wide[:, :, H:], out.y)
    # x and out as interleaved columns of one buffer: their bounds overlap, their elements do not.
    both = np.zeros((T, B, I + H))
    both[:, :, :I] = a["x"]
    out = _forward(cell, x=both[:, :, :I], out=both[:, :, I:])
    np.testing.assert_array_equal(out.y, _forward(cell).y)


def _tape(cell):
    return _forward(cell).tape


def test_functional_backward_rejects_bad_tape(cell):
    with pytest.raises(TypeError, match=r"^tape: expected the tape returned by layer_forward"):
        F.layer_backward("tape")
    eval_tape = _forward(cell, training=False).tape
    assert eval_tape is None
    with pytest.raises(TypeError, match=r"^tape: "):
        F.layer_backward(eval_tape)


def test_functional_backward_rejects_bad_gradients(cell):
    tape = _tape(cell)
    g = GATES[cell]
    cases = [
        (dict(dy=np.zeros((T, B, H + 1))), ValueError, r"^dy: expected shape \(4, 3, 2\)"),
        (dict(dy=np.zeros((T, B, H), np.float32)), TypeError,
         r"^dy: expected dtype float64 \(the forward's\), got float32$"),
        (dict(dy="dy"), TypeError, r"^dy: expected dtype float"),
        (dict(dh_n=np.zeros((B, H + 1))), ValueError, r"^dh_n: expected shape \(3, 2\)"),
        (dict(dh_n=np.zeros((B, H), np.float32)), TypeError, r"^dh_n: expected dtype float64"),
        (dict(dx=np.zeros((T, B, I + 1))), ValueError, r"^dx: expected shape \(4, 3, 5\)"),
        (dict(dx=np.zeros((T, B, I), np.float32)), TypeError, r"^dx: expected dtype float64"),
        (dict(dx=np.zeros((T, B, 2 * I))[:, :, :I]), ValueError, r"^dx: must be C-contiguous"),
        (dict(grads=F.LayerGrads(None, None, None, np.zeros((g * H, I + 1)), np.zeros((g * H, H)),
                                 np.zeros(g * H), np.zeros(g * H))),
         ValueError, r"^grads\.weight_ih: expected shape"),
        (dict(grads=F.LayerGrads(None, None, None, np.zeros((g * H, I)), np.zeros((g * H, H), np.float32),
                                 np.zeros(g * H), np.zeros(g * H))),
         TypeError, r"^grads\.weight_hh: expected dtype float64"),
        (dict(grads=F.LayerGrads(None, None, None, np.zeros((g * H, I)), np.zeros((g * H, H)), None, None)),
         ValueError, r"^grads\.bias_ih, grads\.bias_hh: "),
        (dict(grads=F.LayerGrads(None, None, None, np.zeros((g * H, I)), np.zeros((g * H, H)),
                                 np.zeros(2 * g * H)[::2], np.zeros(g * H))),
         ValueError, r"^grads\.bias_ih: needs a contiguous last dimension"),
    ]
    if has_cell_state(cell):
        cases.append((dict(dc_n=np.zeros((B + 1, H))), ValueError, r"^dc_n: expected shape"))
    else:
        cases.append((dict(dc_n=np.zeros((B, H))), ValueError, r"^dc_n: only an LSTM has a cell state"))
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            F.layer_backward(tape, **kwargs)


def test_functional_backward_rejects_bad_grad_groups(cell):
    tape, g = _tape(cell), GATES[cell]
    for groups, exc, match in ((2, ValueError, r"^grad_groups: expected a divisor of the batch \(3\), got 2"),
                               (0, ValueError, r"^grad_groups: expected an int >= 1"),
                               (True, TypeError, r"^grad_groups: expected an int"),
                               (1.5, TypeError, r"^grad_groups: expected an int")):
        with pytest.raises(exc, match=match):
            F.layer_backward(tape, grad_groups=groups)
    per_group = F.LayerGrads(None, None, None, np.zeros((B, g * H, I)), np.zeros((B, g * H, H)), np.zeros((B, g * H)),
                             np.zeros((B, g * H)))
    cases = [(per_group._replace(weight_ih=np.zeros((g * H, I))), ValueError, r"^grads\.weight_ih: expected shape"),
             (per_group._replace(bias_hh=np.zeros((B + 1, g * H))), ValueError, r"^grads\.bias_hh: expected shape"),
             (per_group._replace(weight_hh=np.zeros((g * H, B, H)).transpose(1, 0, 2)), ValueError,
              r"^grads\.weight_hh: needs a contiguous last dimension")]
    for grads, exc, match in cases:
        with pytest.raises(exc, match=match):
            F.layer_backward(tape, grads=grads, grad_groups=B)
    F.layer_backward(tape, grads=per_group, grad_groups=B)  # the baseline the cases break


def test_functional_backward_refuses_bad_grads_and_overlapping_buffers(cell):
    tape, g = _tape(cell), GATES[cell]
    for grads in ({"weight_ih": np.zeros((g * H, I))}, (np.zeros((g * H, I)),)):
        with pytest.raises(TypeError, match=r"^grads: expected an object with the attributes weight_ih"):
            F.layer_backward(tape, grads=grads)
    dy = np.zeros((T, B, H + I))
    buffers = F.LayerGrads(None, None, None, np.zeros((g * H, I)), np.zeros((g * H, H)), np.zeros(g * H),
                           np.zeros(g * H))
    cases = [(dict(dy=dy[:, :, :H], dx=dy[:, :, H:].copy()), None),  # apart: runs
             (dict(dy=dy[:, :, :H], dx=np.ascontiguousarray(dy[:, :, :I])), None)]
    shared = np.zeros(T * B * max(H, I) + g * H)
    cases += [(dict(dy=shared[:T * B * H].reshape(T, B, H), dx=shared[:T * B * I].reshape(T, B, I)), "dx"),
              (dict(dy=shared[:T * B * H].reshape(T, B, H),
                    grads=buffers._replace(bias_ih=shared[:g * H])), "grads.bias_ih"),
              (dict(grads=buffers._replace(bias_hh=buffers.bias_ih)), "grads.bias_ih")]
    for kwargs, name in cases:
        if name is None:
            F.layer_backward(_tape(cell), **kwargs)
        else:
            with pytest.raises(ValueError, match=rf"^{name}: shares memory with "):
                F.layer_backward(tape, **kwargs)


def test_functional_backward_refuses_buffers_sharing_the_forwards_arrays(cell):
    # Backward reads the forward's x and weights again (the tape references them): writing dx or a
    # gradient into them would change what the weight gradients are computed from.
    a = _layer_args(cell)
    g = GATES[cell]
    tape = _forward(cell, **a).tape
    buffers = F.LayerGrads(None, None, None, np.zeros((g * H, I)), np.zeros((g * H, H)), np.zeros(g * H),
                           np.zeros(g * H))
    cases = [(dict(dx=a["x"]), "dx", "x"),
             (dict(dx=np.zeros(T * B * I + g * H * I)[g * H * I:].reshape(T, B, I)), None, None),
             (dict(grads=buffers._replace(weight_ih=a["weight_ih"])), "grads.weight_ih", "weight_ih"),
             (dict(grads=buffers._replace(bias_hh=a["bias_ih"])), "grads.bias_hh", "bias_ih")]
    for kwargs, name, other in cases:
        if name is None:
            F.layer_backward(tape, **kwargs)
        else:
            with pytest.raises(ValueError, match=rf"^{name}: shares memory with the forward's {other}"):
                F.layer_backward(tape, **kwargs)
    both = np.zeros(g * H * I + T * B * I)  # dx inside weight_ih's memory
    a["weight_ih"] = both[:g * H * I].reshape(g * H, I)
    a["weight_ih"][...] = _layer_args(cell)["weight_ih"]
    with pytest.raises(ValueError, match=r"^dx: shares memory with the forward's weight_ih"):
        F.layer_backward(_forward(cell, **a).tape, dx=both[g * H * I - 1:-1].reshape(T, B, I))


def test_functional_backward_rejects_nonfinite_gradients(cell):
    dy, dh_n, dc_n = np.zeros((T, B, H)), np.zeros((B, H)), np.zeros((B, H))
    for name, arr in (("dy", dy), ("dh_n", dh_n), ("dc_n", dc_n)):
        if name == "dc_n" and not has_cell_state(cell):
            continue
        arr.flat[1] = np.nan if name != "dh_n" else -np.inf
        kwargs = dict(dy=dy, dh_n=dh_n, dc_n=dc_n if has_cell_state(cell) else None)
        with pytest.raises(ValueError, match=rf"^{name}: contains NaN or infinite values"):
            F.layer_backward(_tape(cell), **kwargs)
        arr.flat[1] = 0.0
    dy[0, 0, 0] = np.nan
    grads = F.layer_backward(_tape(cell), dy, check_finite=False)  # the caller's choice: NaN propagates
    assert np.isnan(grads.weight_hh).any()


def test_functional_backward_rejects_bias_gradients_of_a_layer_without_biases(cell):
    g = GATES[cell]
    tape = _forward(cell, bias_ih=None, bias_hh=None).tape
    grads = F.LayerGrads(None, None, None, np.zeros((g * H, I)), np.zeros((g * H, H)), np.zeros(g * H), None)
    with pytest.raises(ValueError, match=r"^grads\.bias_ih, grads\.bias_hh: the layer has no biases"):
        F.layer_backward(tape, grads=grads)
    got = F.layer_backward(tape, np.ones((T, B, H)), grads=grads._replace(bias_ih=None))
    assert got.bias_ih is None and got.weight_hh.any()


def test_functional_backward_refuses_a_huge_grad_groups_before_allocating(cell):
    for groups in (2**40, 2**63):
        with pytest.raises(ValueError, match=rf"^grad_groups: expected a divisor of the batch \(3\), got {groups}"):
            F.layer_backward(_tape(cell), grad_groups=groups)


@pytest.mark.parametrize("name", ["reverse", "training", "check_finite"])
def test_functional_forward_flags_must_be_bools(cell, name):
    for value in ("no", 1, None, np.array([True])):
        with pytest.raises(TypeError, match=rf"^{name}: expected a bool, got"):
            _forward(cell, **{name: value})
    assert _forward(cell, **{name: np.bool_(True)}).y.shape == (T, B, H)


# ---- the projection (proj_size, weight_hr) -------------------------------------------------------------


@pytest.mark.parametrize("proj_size, exc, match", [
    (-1, ValueError, r"^proj_size: expected an int >= 0 \(0: no projection\), got -1"),
    (4, ValueError, r"^proj_size: expected less than hidden_size \(4\), got 4"),
    (9, ValueError, r"^proj_size: expected less than hidden_size"),
    (2.0, TypeError, r"^proj_size: expected an int, got float"),
    (True, TypeError, r"^proj_size: expected an int, got bool"),
    ("2", TypeError, r"^proj_size: expected an int, got str"),
    (None, TypeError, r"^proj_size: expected an int, got NoneType"),
])
def test_lstm_rejects_bad_proj_size(proj_size, exc, match):
    with pytest.raises(exc, match=match):
        fusedrnn.LSTM(3, 4, proj_size=proj_size)


def test_only_an_lstm_takes_proj_size():
    with pytest.raises(TypeError, match="proj_size"):
        fusedrnn.GRU(3, 4, proj_size=2)
    with pytest.raises(TypeError, match="proj_size"):
        fusedrnn.RNN(3, 4, proj_size=2)
    with pytest.raises(ValueError, match=r"^proj_size: 'gru' takes no projection \(only an LSTM does\), got 2"):
        fusedrnn.modules.RNNBase("gru", 3, 4, proj_size=2)
    assert fusedrnn.GRU(3, 4).proj_size == 0 and fusedrnn.LSTM(3, 4, proj_size=0).proj_size == 0


def test_projected_lstm_states_need_their_own_widths(rng):
    m = fusedrnn.LSTM(I, 5, proj_size=2, dtype=np.float64)
    x = rng.standard_normal((T, B, I))
    with pytest.raises(ValueError, match=r"^h0: expected shape \(1, 3, 2\), got \(1, 3, 5\)"):
        m(x, (np.zeros((1, B, 5)), np.zeros((1, B, 5))))
    with pytest.raises(ValueError, match=r"^c0: expected shape \(1, 3, 5\), got \(1, 3, 2\)"):
        m(x, (np.zeros((1, B, 2)), np.zeros((1, B, 2))))
    y, _ = m(x)
    with pytest.raises(ValueError, match=r"^dy: expected shape \(4, 3, 2\)"):
        m.backward(np.zeros((T, B, 5)))
    with pytest.raises(ValueError, match=r"^dh_n: expected shape \(1, 3, 2\)"):
        m.backward(y, (np.zeros((1, B, 5)), None))
    with pytest.raises(ValueError, match=r"^state_dict\['weight_hr_l0'\]: expected shape \(2, 5\)"):
        m.load_state_dict(dict(m.state_dict(), weight_hr_l0=np.zeros((5, 2))))


def _projected_args(dtype=np.float64, proj=1, hidden=3):
    rng = np.random.default_rng(1)
    r = lambda *s: rng.uniform(-0.5, 0.5, s).astype(dtype)  # noqa: E731
    return dict(x=r(T, B, I), weight_ih=r(4 * hidden, I), weight_hh=r(4 * hidden, proj), bias_ih=r(4 * hidden),
                bias_hh=r(4 * hidden), h0=r(B, proj), c0=r(B, hidden), weight_hr=r(proj, hidden))


def test_functional_rejects_bad_projection(cell):
    a = _projected_args()
    if cell != "lstm":
        with pytest.raises(ValueError, match=r"^weight_hr: only an LSTM takes a projection"):
            _forward(cell, weight_hr=np.zeros((1, H)))
        return
    cases = [
        (dict(weight_hr=a["weight_hr"][0]), ValueError, r"^weight_hr: expected a 2-D array \(proj_size, hidden_size\)"),
        (dict(weight_hr="w"), ValueError, r"^weight_hr: expected a 2-D array"),
        (dict(weight_hr=np.zeros((3, 3))), ValueError,
         r"^weight_hr: expected shape \(proj_size, hidden_size\) with 0 < proj_size < hidden_size, got \(3, 3\)"),
        (dict(weight_hr=np.zeros((0, 3))), ValueError, r"^weight_hr: expected shape \(proj_size, hidden_size\)"),
        (dict(weight_hr=a["weight_hr"].astype(np.float32)), TypeError, r"^weight_hr: expected dtype float64"),
        (dict(weight_hr=np.zeros((2, 3))), ValueError, r"^weight_hh: expected shape \(12, 2\), got \(12, 1\)"),
        (dict(weight_hr=np.zeros((1, 4))), ValueError,
         r"^weight_hr, weight_hh: weight_hr's columns give hidden_size 4, so weight_hh needs gates\*hidden_size = 16 "
         r"rows, got shape \(12, 1\)"),
        (dict(h0=np.zeros((B, 3))), ValueError, r"^h0: expected shape \(3, 1\), got \(3, 3\)"),
        (dict(c0=np.zeros((B, 1))), ValueError, r"^c0: expected shape \(3, 3\), got \(3, 1\)"),
        (dict(out=np.zeros((T, B, 3))), ValueError, r"^out: expected shape \(4, 3, 1\)"),
    ]
    for overrides, exc, match in cases:
        args = dict(a, **overrides)
        with pytest.raises(exc, match=match):
            F.layer_forward("lstm", args.pop("x"), args.pop("weight_ih"), args.pop("weight_hh"),
                            args.pop("bias_ih"), args.pop("bias_hh"), args.pop("h0"), args.pop("c0"), **args)


def test_functional_backward_rejects_bad_projection_gradients():
    a = _projected_args()
    tape = F.layer_forward("lstm", *(a[k] for k in ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0",
                                                     "c0")), weight_hr=a["weight_hr"]).tape
    assert tape.proj_size == 1

    def grads(weight_hr):
        return F.LayerGrads(None, None, None, np.zeros((12, I)), np.zeros((12, 1)), np.zeros(12), np.zeros(12),
                            weight_hr=weight_hr)

    cases = [
        (dict(grads=grads(None)), ValueError, r"^grads\.weight_hr: the layer has a projection"),
        (dict(grads=grads(np.zeros((3, 1)))), ValueError, r"^grads\.weight_hr: expected shape \(1, 3\)"),
        (dict(grads=grads(np.zeros((1, 3), np.float32))), TypeError, r"^grads\.weight_hr: expected dtype float64"),
        (dict(dy=np.zeros((T, B, 3))), ValueError, r"^dy: expected shape \(4, 3, 1\)"),
        (dict(dh_n=np.zeros((B, 3))), ValueError, r"^dh_n: expected shape \(3, 1\)"),
        (dict(dc_n=np.zeros((B, 1))), ValueError, r"^dc_n: expected shape \(3, 3\)"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            F.layer_backward(tape, **kwargs)
    plain = _forward("lstm").tape
    with pytest.raises(ValueError, match=r"^grads\.weight_hr: the layer has no projection"):
        F.layer_backward(plain, grads=F.LayerGrads(None, None, None, np.zeros((4 * H, I)), np.zeros((4 * H, H)),
                                                   np.zeros(4 * H), np.zeros(4 * H), weight_hr=np.zeros((1, H))))


def test_layer_split_checks_proj_size():
    from fusedrnn import _core
    assert _core.layer_split("lstm", 8, 128, np.float32, 64)[0] >= 1
    for cell, proj, match in (("lstm", -1, r"^proj_size: expected 0 \(none\) or 0 < proj_size < hidden, got -1"),
                              ("lstm", 128, r"^proj_size: expected 0"),
                              ("gru", 4, r"^proj_size: only an LSTM takes a projection")):
        with pytest.raises(ValueError, match=match):
            _core.layer_split(cell, 8, 128, np.float32, proj)


# ---- arguments NumPy cannot read -------------------------------------------------------------------------


class Unreadable:
    """An array-like whose conversion fails, as a torch tensor that requires grad does."""

    def __array__(self, *args, **kwargs):
        raise RuntimeError("cannot be viewed as an array")


def _unreadable_calls():
    """(name, call(bad)): every public entry point taking an array, with `bad` in one argument."""
    from fusedrnn import bptt, gradients, losses, optim, sequences

    lstm = make_module("lstm", I, H, num_layers=1, seed=0)
    w = lstm.state_dict()
    x = f32(T, B, I)
    trained = make_module("lstm", I, H, num_layers=1, seed=0).train()
    trained(x)
    linear = fusedrnn.Linear(I, 1)
    sgd = optim.SGD({"w": np.zeros(3)}, lr=0.1)
    return [
        ("x", lambda bad: lstm(bad)),
        ("h0", lambda bad: lstm(x, (bad, f32(1, B, H)))),
        ("lengths", lambda bad: lstm(x, lengths=bad)),
        ("dy", lambda bad: trained.backward(bad)),
        ("x", lambda bad: linear(bad)),
        ("x", lambda bad: F.layer_forward("lstm", bad, w["weight_ih_l0"], w["weight_hh_l0"])),
        ("weight_ih", lambda bad: F.layer_forward("lstm", x, bad, w["weight_hh_l0"])),
        ("h0", lambda bad: F.layer_forward("lstm", x, w["weight_ih_l0"], w["weight_hh_l0"], h0=bad)),
        ("state_dict['weight_ih_l0']", lambda bad: lstm.load_state_dict(dict(w, weight_ih_l0=bad))),
        ("grads['w']", lambda bad: sgd.step({"w": bad})),
        ("prediction", lambda bad: losses.mse_loss(bad, f32(B, 1))),
        ("target", lambda bad: losses.mse_loss(f32(B, 1), bad)),
        ("mask", lambda bad: losses.mse_loss(f32(T, B, 1), f32(T, B, 1), mask=bad)),
        ("targets", lambda bad: losses.cross_entropy(f32(B, 3), bad)),
        ("sequences[0]", lambda bad: sequences.pad_sequences([bad])),
        ("padded", lambda bad: sequences.unpad_sequences(bad, [1])),
        ("lengths", lambda bad: sequences.length_mask(bad)),
        ("series", lambda bad: sequences.sliding_windows(bad, 3)),
        ("norms", lambda bad: gradients.diagnose_gradient_flow(bad)),
        ("loss_fn's gradient", lambda bad: bptt.truncated_bptt(trained, x, 2, lambda y, start, stop: (0.0, bad))),
    ]


@pytest.mark.parametrize("case", range(len(_unreadable_calls())))
def test_an_argument_numpy_cannot_read_is_named(case):
    name, call = _unreadable_calls()[case]
    prefix = "^" + re.escape(name)
    with pytest.raises(TypeError, match=prefix + ": cannot be read as an array: cannot be viewed"):
        call(Unreadable())
    # A masked array would be read without its mask: refused where an entry is masked.
    with pytest.raises(TypeError, match=prefix + ": a masked array, whose mask would be ignored"):
        call(np.ma.masked_array(np.zeros((2, 2)), mask=[[False, True], [False, False]]))
    if name not in ("lengths", "norms", "mask", "targets", "grads['w']"):
        with pytest.raises(ValueError, match=prefix + ": setting an array element with a sequence"):
            call([[[1.0, 2.0], [1.0]]])  # ragged


def test_tensors_without_memory_are_named():
    """torch's meta tensors (lazy initialisation) hold no values: named, not DLPack's bare error."""
    torch = pytest.importorskip("torch")
    module = make_module("lstm", I, H, num_layers=1, seed=0)
    with pytest.raises(ValueError, match=r"^x: arrays on meta are not supported \(CPU or CUDA only\)"):
        module(torch.zeros(T, B, I, device="meta"))
    with pytest.raises(ValueError, match=r"^h0: on meta, but x is on cpu"):
        module(np.zeros((T, B, I), np.float32), (torch.zeros(1, B, H, device="meta"),) * 2)
    before = module.state_dict()
    lazy = {k: torch.zeros(v.shape, device="meta") for k, v in before.items()}
    with pytest.raises(TypeError, match=r"^state_dict\['weight_ih_l0'\]: cannot be read as an array"):
        module.load_state_dict(lazy)
    for k, v in module.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_masked_arrays_without_masked_entries_are_read_as_their_values():
    module = make_module("gru", I, H, num_layers=1, seed=0)
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    np.testing.assert_array_equal(module(np.ma.masked_array(x))[0], module(x)[0])


def test_a_torch_tensor_that_requires_grad_is_named_with_torchs_advice():
    torch = pytest.importorskip("torch")
    module = make_module("gru", I, H, num_layers=1, seed=0)
    with pytest.raises(TypeError, match=r"^x: cannot be read as an array: .*detach\(\)"):
        module(torch.zeros(T, B, I, requires_grad=True))
    y, _ = module(torch.zeros(T, B, I))  # a CPU tensor that does not require grad is read in place
    assert isinstance(y, np.ndarray) and y.shape == (T, B, H)


# ---- sizes past the 32-bit BLAS ---------------------------------------------------------------------------


def test_sizes_past_the_blas_range_are_refused_by_name():
    """steps*batch rows past INT_MAX: a broadcast x costs no memory, and the refusal names the product."""
    rng = np.random.default_rng(0)
    w_ih, w_hh = rng.standard_normal((4, 1), np.float32), rng.standard_normal((4, 1), np.float32)
    x = np.broadcast_to(np.float32(0.5), (2**16 + 1, 2**15, 1))
    with pytest.raises(ValueError, match=r"^steps\*batch: 2147516416 exceeds the 32-bit BLAS index range"):
        F.layer_forward("lstm", x, w_ih, w_hh, check_finite=False, training=False)


def test_outputs_past_the_address_space_are_refused_as_memory_errors():
    """y of 2^61 values (a broadcast x and weights cost no memory): its byte count would wrap, which
    numpy reported as "negative dimensions are not allowed"."""
    z = np.zeros((1, 1, 1), np.float32)
    x = np.broadcast_to(z, (2**40, 1, 1))
    w_ih, w_hh = np.broadcast_to(z[0], (2**21, 1)), np.broadcast_to(z[0], (2**21, 2**21))
    for training in (False, True):
        with pytest.raises(MemoryError, match=r"^fusedrnn: a result or tape array: \d+ values of 4 bytes are "
                                              r"past the address space"):
            F.layer_forward("rnn_tanh", x, w_ih, w_hh, training=training, check_finite=False)


@needs_throwing_new
def test_a_call_out_of_memory_leaves_later_calls_working():
    """A call whose scratch (x projected onto W_ih: 2^48 bytes, past any address space; the inference
    call bound to run whole, not in chunks of steps) cannot be allocated raises MemoryError naming the
    bytes; the thread's smaller scratch kept from an earlier call was released first, and the next small
    call on the thread must not find a null buffer that claims the old size, which would crash the
    process. Run in a child, so such a crash fails the test."""
    code = textwrap.dedent("""
        import numpy as np, fusedrnn
        m = fusedrnn.LSTM(1, 2**22, proj_size=1).eval()
        fusedrnn._core.set_inference_chunk_bytes(1 << 62)
        small = np.ones((2, 1, 1), np.float32)
        before = m(small)[0]
        try:
            m(np.ones((2**22, 1, 1), np.float32))
        except MemoryError as e:
            print("MemoryError:", e)
        print("again equal:", np.array_equal(m(small)[0], before))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"MemoryError: fusedrnn: out of memory allocating 281474976710656 bytes \(262144\.0 GiB\) "
                     r"for a layer call's scratch", out.stdout), out.stdout
    assert "again equal: True" in out.stdout, out.stdout


def test_grouped_gradients_of_an_x_with_rows_far_apart():
    """Per-group gradients step B rows of x at a time: an x whose rows are 2^30 + 1 elements apart is
    copied for them, not refused (the buffer is virtual memory, untouched but for two pages)."""
    from numpy.lib.stride_tricks import as_strided

    gap = 2**30 + 1
    buffer = np.zeros(gap + 1, np.float32)
    x = as_strided(buffer, shape=(1, 2, 1), strides=(2 * gap * 4, gap * 4, 4))
    x[0, 0, 0], x[0, 1, 0] = 0.5, -1.0
    rng = np.random.default_rng(0)
    w_ih, w_hh = rng.standard_normal((4, 1), np.float32), rng.standard_normal((4, 1), np.float32)
    grads = [F.layer_backward(F.layer_forward("lstm", xx, w_ih, w_hh).tape, np.ones((1, 2, 1), np.float32),
                              grad_groups=2) for xx in (np.ascontiguousarray(x), x)]
    for dense, strided in zip(*grads):
        if dense is not None:
            np.testing.assert_array_equal(strided, dense)
    assert np.any(grads[0].weight_ih != 0)


def test_cell_facts_refuse_an_unknown_cell_by_name():
    for ask in (F.has_cell_state, F.takes_projection):
        with pytest.raises(ValueError, match=r"^cell: expected one of \('rnn_tanh', 'rnn_relu', 'gru', 'lstm'\), "
                                             r"got 'LSTM'$"):
            ask("LSTM")
    assert F.has_cell_state("lstm") and not F.takes_projection("gru")
