"""Module behaviour: parameters and their initialisation, gradient accumulation, train/eval, dropout,
determinism and threads, and the functional layer's `out=`."""

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fusedrnn
from fusedrnn import functional as F
from fusedrnn import reference
from helpers import CELL_CASES, CELLS, GATES, has_cell_state, make_module, random_layer, saved_per_step

TOL64 = dict(rtol=1e-12, atol=1e-13)


def _hx(cell, h0, c0):
    return (h0, c0) if has_cell_state(cell) else h0


def _dhx(cell, dh_n, dc_n):
    return (dh_n, dc_n) if has_cell_state(cell) else dh_n


def _data(rng, cell, m, steps=5, batch=3, dtype=np.float64):
    lead = m.num_layers * m.num_directions
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    x = r(steps, batch, m.input_size)
    h0, c0 = r(lead, batch, m.hidden_size), r(lead, batch, m.hidden_size)
    dy = r(steps, batch, m.num_directions * m.hidden_size)
    dh_n, dc_n = r(lead, batch, m.hidden_size), r(lead, batch, m.hidden_size)
    return x, h0, (c0 if has_cell_state(cell) else None), dy, dh_n, (dc_n if has_cell_state(cell) else None)


# ---- parameters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell", CELLS)
def test_parameter_names_and_shapes(cell, bias, bidirectional):
    # torch.nn's names, order and shapes: layer by layer, forward direction before reverse.
    inp, hidden, layers = 7, 5, 3
    gh = GATES[cell] * hidden
    dirs = ("", "_reverse") if bidirectional else ("",)
    want = []
    for layer in range(layers):
        layer_in = inp if layer == 0 else hidden * len(dirs)
        for s in dirs:
            want += [(f"weight_ih_l{layer}{s}", (gh, layer_in)), (f"weight_hh_l{layer}{s}", (gh, hidden))]
            if bias:
                want += [(f"bias_ih_l{layer}{s}", (gh,)), (f"bias_hh_l{layer}{s}", (gh,))]
    m = make_module(cell, inp, hidden, num_layers=layers, bias=bias, bidirectional=bidirectional)
    assert [(n, p.shape) for n, p in m.named_parameters()] == want
    assert [p.shape for p in m.parameters()] == [s for _, s in want]
    assert list(m.grads) == [n for n, _ in want]
    for name, p in m.named_parameters():
        assert getattr(m, name) is p and p.dtype == np.float32
        assert m.grads[name].shape == p.shape and not np.any(m.grads[name])
    with pytest.raises(AttributeError):
        m.weight_ih_l9  # noqa: B018


def test_parameters_are_the_live_arrays(rng):
    # parameters() hands out the module's own arrays (for an optimiser to update in place).
    m = fusedrnn.GRU(3, 4, dtype=np.float64, seed=1)
    x = rng.standard_normal((4, 2, 3))
    m.eval()
    y0, _ = m(x)
    for p in m.parameters():
        p *= 0.5
    y1, _ = m(x)
    w = {k: v for k, v in m.named_parameters()}
    want, _, _, _ = reference.forward("gru", x, w["weight_ih_l0"], w["weight_hh_l0"], w["bias_ih_l0"],
                                      w["bias_hh_l0"])
    np.testing.assert_allclose(y1, want, **TOL64)
    assert not np.allclose(y0, y1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_init_is_uniform_in_plus_minus_one_over_sqrt_hidden(cell, dtype):
    hidden = 64
    m = make_module(cell, 48, hidden, num_layers=2, bidirectional=True, dtype=dtype, seed=5)
    bound = 1.0 / math.sqrt(hidden)
    values = np.concatenate([p.ravel().astype(np.float64) for p in m.parameters()])
    assert all(p.dtype == dtype for p in m.parameters())
    assert values.min() >= -bound and values.max() <= bound
    # Fills the whole range, evenly: U(-a, a) has mean 0 and variance a^2/3.
    assert values.min() < -0.999 * bound and values.max() > 0.999 * bound
    assert abs(values.mean()) < 0.02 * bound
    assert abs(values.var() / (bound**2 / 3) - 1) < 0.03
    for p in m.parameters():  # every tensor, not just the pooled values, spans the range
        assert p.min() < -0.5 * bound and p.max() > 0.5 * bound


def test_same_seed_same_parameters_different_seed_different():
    a = fusedrnn.LSTM(5, 6, 2, bidirectional=True, seed=123)
    b = fusedrnn.LSTM(5, 6, 2, bidirectional=True, seed=123)
    c = fusedrnn.LSTM(5, 6, 2, bidirectional=True, seed=124)
    d, e = fusedrnn.LSTM(5, 6, 2, bidirectional=True), fusedrnn.LSTM(5, 6, 2, bidirectional=True)
    for name, p in a.named_parameters():
        np.testing.assert_array_equal(p, getattr(b, name))
        assert not np.array_equal(p, getattr(c, name))
        assert not np.array_equal(getattr(d, name), getattr(e, name))  # seed=None: fresh entropy


def test_repr_follows_torch():
    assert repr(fusedrnn.LSTM(3, 5)) == "LSTM(3, 5)"
    assert repr(fusedrnn.LSTM(3, 5, 2, proj_size=2)) == "LSTM(3, 5, num_layers=2, proj_size=2)"
    assert repr(fusedrnn.GRU(3, 5, 2, bias=False, batch_first=True, dropout=0.25, bidirectional=True)) == (
        "GRU(3, 5, num_layers=2, bias=False, batch_first=True, dropout=0.25, bidirectional=True)")
    assert repr(fusedrnn.RNN(3, 5, 1, "relu")).startswith("RNN(3, 5")


def test_output_dtypes_follow_the_module(rng):
    for dtype in (np.float32, np.float64):
        m = fusedrnn.LSTM(3, 4, 2, bidirectional=True, dtype=dtype)
        y, (h_n, c_n) = m(rng.standard_normal((5, 2, 3)).astype(dtype))
        dx, (dh0, dc0) = m.backward(np.ones_like(y))
        assert {a.dtype for a in (y, h_n, c_n, dx, dh0, dc0)} == {np.dtype(dtype)}
        assert {g.dtype for g in m.grads.values()} == {np.dtype(dtype)}


def test_absent_state_equals_zero_state(rng):
    for cell in CELLS:
        m = make_module(cell, 3, 4, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
        x = rng.standard_normal((5, 2, 3))
        zeros = np.zeros((4, 2, 4))
        y0, s0 = m(x)
        y1, s1 = m(x, _hx(cell, zeros, zeros))
        np.testing.assert_array_equal(y0, y1)
        np.testing.assert_array_equal(s0[0] if has_cell_state(cell) else s0,
                                      s1[0] if has_cell_state(cell) else s1)


# ---- gradient accumulation -----------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_accumulate_across_backward_calls(rng, cell):
    m = make_module(cell, 4, 5, num_layers=2, bidirectional=True, dtype=np.float64, seed=2)
    x, h0, c0, dy, dh_n, dc_n = _data(rng, cell, m)

    m(x, _hx(cell, h0, c0))
    first = m.backward(dy, _dhx(cell, dh_n, dc_n))
    once = {k: v.copy() for k, v in m.grads.items()}
    once_inputs = {k: v.copy() for k, v in m.input_grads.items()}
    assert set(once_inputs) == ({"x", "h0", "c0"} if has_cell_state(cell) else {"x", "h0"})
    assert all(np.any(v != 0) for v in once.values())

    m(x, _hx(cell, h0, c0))
    second = m.backward(dy, _dhx(cell, dh_n, dc_n))
    for name, g in m.grads.items():
        np.testing.assert_allclose(g, 2 * once[name], err_msg=name, **TOL64)
    for name, g in m.input_grads.items():
        np.testing.assert_allclose(g, 2 * once_inputs[name], err_msg=name, **TOL64)
    # What backward returns is this call's gradient, not the running sum.
    np.testing.assert_array_equal(second[0], first[0])
    np.testing.assert_array_equal(second[0], once_inputs["x"])

    m.zero_grad()
    assert all(not np.any(g) for g in m.grads.values()) and m.input_grads == {}
    m(x, _hx(cell, h0, c0))
    m.backward(dy, _dhx(cell, dh_n, dc_n))
    for name, g in m.grads.items():
        np.testing.assert_array_equal(g, once[name], err_msg=name)


def test_a_replaced_grads_entry_is_checked_before_backward_changes_anything(rng):
    # grads' entries may be replaced (gradients into a buffer of one's own); one that cannot be added
    # into is named, and nothing is added nor the forward consumed, so a retry with a good one works.
    m = fusedrnn.LSTM(3, 4, num_layers=2, dtype=np.float64, seed=0)
    head = fusedrnn.Linear(4, 2, dtype=np.float64, seed=1)
    x = rng.standard_normal((5, 2, 3))
    want = fusedrnn.LSTM(3, 4, num_layers=2, dtype=np.float64, seed=0)
    want(x)
    want.backward(np.ones((5, 2, 4)))
    m(x)
    name = "weight_ih_l0"
    good = m.grads[name]
    bad = [(np.zeros_like(good, order="F"), ValueError, "must be C-contiguous, its data aligned"),
           (np.zeros(good.shape, np.float32), TypeError, r"expected dtype float64 \(the parameter's\), got float32"),
           (np.zeros((1, *good.shape[1:])), ValueError, r"expected shape \(16, 3\) \(the parameter's\), got \(1, 3\)"),
           (good.tolist(), TypeError, "expected an array like the parameter's, got list"),
           (None, ValueError, "missing; zero_grad"),
           (np.broadcast_to(np.zeros(1), good.shape), ValueError, "array is read-only"),
           (m.weight_ih_l0, ValueError, "shares memory with weight_ih_l0")]
    for value, error, match in bad:
        m.grads[name] = value
        with pytest.raises(error, match=rf"^grads\['{name}'\]: {match}"):
            m.backward(np.ones((5, 2, 4)))
        assert all(not g.any() for g in m.grads.values() if isinstance(g, np.ndarray) and g is not value)
    m.grads[name] = good
    good.flags.writeable = False  # the module's own array, changed in place
    with pytest.raises(ValueError, match=rf"^grads\['{name}'\]: array is read-only"):
        m.backward(np.ones((5, 2, 4)))
    good.flags.writeable = True
    m.grads["bias_hh_l0"] = m.grads["bias_ih_l0"]  # one sum would land in both
    with pytest.raises(ValueError, match=r"^grads\['bias_ih_l0'\]: shares memory with grads\['bias_hh_l0'\]"):
        m.backward(np.ones((5, 2, 4)))
    m.grads["bias_hh_l0"] = np.zeros_like(good[:, 0])
    buffer = np.zeros(good.size + 1)[1:].reshape(good.shape)  # one's own buffer, offset in memory
    m.grads[name] = buffer
    m.backward(np.ones((5, 2, 4)))
    assert m.grads[name] is buffer
    for key, g in want.grads.items():
        np.testing.assert_array_equal(m.grads[key], g, err_msg=key)
    head(np.ones((3, 4)))
    head.grads["bias"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"^grads\['bias'\]: expected shape \(2,\)"):
        head.backward(np.ones((3, 2)))
    head.grads["bias"] = np.zeros(2)
    head.grads["weight"] = np.zeros((2, 4), order="F")  # NumPy adds into any layout
    head.backward(np.ones((3, 2)))
    np.testing.assert_array_equal(head.grads["bias"], [3.0, 3.0])
    np.testing.assert_array_equal(head.grads["weight"], np.full((2, 4), 3.0))


def test_input_grads_restart_when_the_input_shape_changes(rng):
    m = fusedrnn.GRU(3, 4, dtype=np.float64, seed=0)
    x1, x2 = rng.standard_normal((5, 2, 3)), rng.standard_normal((6, 3, 3))
    m(x1)
    m.backward(np.ones((5, 2, 4)))
    w_after_first = m.grads["weight_hh_l0"].copy()
    m(x2)
    dx2, dh2 = m.backward(np.ones((6, 3, 4)))
    np.testing.assert_array_equal(m.input_grads["x"], dx2)
    np.testing.assert_array_equal(m.input_grads["h0"], dh2)
    # Parameter gradients keep accumulating whatever the input shape.
    m2 = fusedrnn.GRU(3, 4, dtype=np.float64, seed=0)
    m2(x2)
    m2.backward(np.ones((6, 3, 4)))
    np.testing.assert_allclose(m.grads["weight_hh_l0"], w_after_first + m2.grads["weight_hh_l0"], **TOL64)


@pytest.mark.parametrize("cell", CELLS)
def test_module_gradients_match_the_reference(rng, cell):
    # The whole module (2 layers, both directions, lengths) against the stacked reference in float64.
    m = make_module(cell, 4, 5, num_layers=2, bidirectional=True, dtype=np.float64, seed=9)
    x, h0, c0, dy, dh_n, dc_n = _data(rng, cell, m, steps=6, batch=4)
    lengths = np.array([6, 2, 1, 4])
    y, state = m(x, _hx(cell, h0, c0), lengths=lengths)
    dx, dstate = m.backward(dy, _dhx(cell, dh_n, dc_n))
    kw = dict(num_layers=2, bidirectional=True)
    ry, rh, rc, caches = reference.stack_forward(cell, m.state_dict(), x, h0, c0, lengths=lengths, **kw)
    rdx, rdh0, rdc0, rgrads, _ = reference.stack_backward(caches, dy, dh_n, dc_n, **kw)
    np.testing.assert_allclose(y, ry, **TOL64)
    np.testing.assert_allclose(state[0] if has_cell_state(cell) else state, rh, **TOL64)
    np.testing.assert_allclose(dx, rdx, **TOL64)
    np.testing.assert_allclose(dstate[0] if has_cell_state(cell) else dstate, rdh0, **TOL64)
    if has_cell_state(cell):
        np.testing.assert_allclose(state[1], rc, **TOL64)
        np.testing.assert_allclose(dstate[1], rdc0, **TOL64)
    for name, g in rgrads.items():
        np.testing.assert_allclose(m.grads[name], g, err_msg=name, **TOL64)


def test_backward_without_upstream_gradients_is_zero(rng):
    m = fusedrnn.LSTM(3, 4, 2, bidirectional=True, dtype=np.float64, seed=1)
    m(rng.standard_normal((5, 2, 3)))
    dx, (dh0, dc0) = m.backward()
    assert dx.shape == (5, 2, 3) and dh0.shape == dc0.shape == (4, 2, 4)
    assert not np.any(dx) and not np.any(dh0) and not np.any(dc0)
    assert all(not np.any(g) for g in m.grads.values())


@pytest.mark.parametrize("which", ["dh_only", "dc_only"])
def test_lstm_backward_with_half_of_dhx(rng, which):
    # (dh_n, None) and (None, dc_n): the missing half counts as zero.
    m = fusedrnn.LSTM(3, 4, 2, bidirectional=True, dtype=np.float64, seed=1)
    x, h0, c0, _, dh_n, dc_n = _data(rng, "lstm", m)
    dh_n, dc_n = (dh_n, None) if which == "dh_only" else (None, dc_n)
    m(x, (h0, c0))
    dx, (dh0, dc0) = m.backward(None, (dh_n, dc_n))
    kw = dict(num_layers=2, bidirectional=True)
    _, _, _, caches = reference.stack_forward("lstm", m.state_dict(), x, h0, c0, **kw)
    rdx, rdh0, rdc0, rgrads, _ = reference.stack_backward(caches, None, dh_n, dc_n, **kw)
    np.testing.assert_allclose(dx, rdx, **TOL64)
    np.testing.assert_allclose(dh0, rdh0, **TOL64)
    np.testing.assert_allclose(dc0, rdc0, **TOL64)
    np.testing.assert_allclose(m.grads["weight_hh_l0_reverse"], rgrads["weight_hh_l0_reverse"], **TOL64)
    assert np.any(dx)


def test_constructor_positional_order_follows_torch():
    m = fusedrnn.RNN(3, 4, 2, "relu", False, True, 0.25, True)
    assert (m.input_size, m.hidden_size, m.num_layers, m.nonlinearity, m.bias, m.batch_first, m.dropout,
            m.bidirectional) == (3, 4, 2, "relu", False, True, 0.25, True)
    assert m.cell == "rnn_relu"
    for cls in (fusedrnn.LSTM, fusedrnn.GRU):
        m = cls(3, 4, 2, False, True, 0.25, True)
        assert (m.num_layers, m.bias, m.batch_first, m.dropout, m.bidirectional) == (2, False, True, 0.25, True)
    m = fusedrnn.LSTM(3, 4, 2, False, True, 0.25, True, 3)  # proj_size 8th, as in torch.nn.LSTM
    assert (m.num_layers, m.bidirectional, m.proj_size) == (2, True, 3)
    with pytest.raises(TypeError):
        fusedrnn.LSTM(3, 4, 1, True, False, 0.0, False, 0, np.float64)  # dtype is keyword-only


def test_yes_no_options_take_bools_only():
    """batch_first="False" (read from a configuration file, say) ran batch-first, on the wrong axis of a
    (T, B, I) input with no error; torch.nn refuses it."""
    for name in ("bias", "batch_first", "bidirectional"):
        for value in ("False", None, 0):
            with pytest.raises(TypeError, match=rf"^{name}: expected a bool"):
                fusedrnn.GRU(3, 4, **{name: value})
    with pytest.raises(TypeError, match=r"^mode: expected a bool"):
        fusedrnn.LSTM(3, 4).train("False")
    assert fusedrnn.GRU(3, 4, batch_first=np.bool_(True)).train(np.bool_(False)).training is False
    with pytest.raises(TypeError, match=r"^bias: expected a bool"):
        fusedrnn.Linear(3, 2, bias="False")
    assert repr(fusedrnn.Linear(3, 2)) == "Linear(in_features=3, out_features=2, bias=True)"
    assert repr(fusedrnn.Linear(3, 2, bias=False)) == "Linear(in_features=3, out_features=2, bias=False)"


# ---- train / eval ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_eval_matches_train_without_dropout_and_keeps_no_tape(rng, cell):
    m = make_module(cell, 4, 5, num_layers=2, bidirectional=True, dtype=np.float64, seed=2)
    x, h0, c0, _, _, _ = _data(rng, cell, m)
    assert m.training
    y_train, s_train = m(x, _hx(cell, h0, c0), lengths=[5, 3, 1])
    m.backward(np.ones_like(y_train))
    assert m.eval() is m and not m.training
    y_eval, s_eval = m(x, _hx(cell, h0, c0), lengths=[5, 3, 1])
    np.testing.assert_allclose(y_eval, y_train, **TOL64)
    for a, b in zip(s_eval, s_train) if has_cell_state(cell) else [(s_eval, s_train)]:
        np.testing.assert_allclose(a, b, **TOL64)
    with pytest.raises(RuntimeError, match="backward"):
        m.backward(np.ones_like(y_eval))
    assert m.train() is m and m.training


# ---- dropout --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_changes_training_outputs_only(rng, cell):
    m = make_module(cell, 4, 6, num_layers=3, dropout=0.5, dtype=np.float64, seed=11)
    x, _, _, _, _, _ = _data(rng, cell, m)
    y_train1, _ = m(x)
    y_train2, _ = m(x)
    m.eval()
    y_eval1, _ = m(x)
    y_eval2, _ = m(x)
    assert not np.allclose(y_train1, y_eval1)
    assert not np.allclose(y_train1, y_train2)  # each training forward draws a fresh mask
    np.testing.assert_array_equal(y_eval1, y_eval2)


@pytest.mark.parametrize("cell", CELLS)
def test_zero_dropout_and_single_layer_dropout_are_identity(rng, cell):
    # dropout acts between layers only: none with p=0, none with one layer, which warns (as torch.nn).
    for kwargs in (dict(num_layers=3, dropout=0.0), dict(num_layers=1, dropout=0.7)):
        if kwargs["num_layers"] == 1:
            with pytest.warns(UserWarning, match=r"^dropout=0.7 with num_layers=1 does nothing"):
                m = make_module(cell, 4, 6, dtype=np.float64, seed=3, **kwargs)
        else:
            m = make_module(cell, 4, 6, dtype=np.float64, seed=3, **kwargs)
        x, _, _, _, _, _ = _data(rng, cell, m)
        y_train, _ = m(x)
        m.eval()
        y_eval, _ = m(x)
        np.testing.assert_allclose(y_train, y_eval, **TOL64)


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_same_seed_reproduces_outputs_and_gradients(rng, cell):
    make = lambda: make_module(cell, 4, 6, num_layers=3, bidirectional=True, dropout=0.3, seed=77)  # noqa: E731
    x, h0, c0, dy, dh_n, dc_n = _data(rng, cell, make(), dtype=np.float32)
    results = []
    for _ in range(2):
        m = make()
        run = []
        for _ in range(2):  # the second forward's mask must also be reproduced
            y, s = m(x, _hx(cell, h0, c0))
            dx, ds = m.backward(dy, _dhx(cell, dh_n, dc_n))
            run.append((y, s, dx, ds, {k: v.copy() for k, v in m.grads.items()}))
        results.append(run)
    for a, b in zip(results[0], results[1]):
        for u, v in zip(a[:4], b[:4]):
            np.testing.assert_array_equal(u, v)
        for name in a[4]:
            np.testing.assert_array_equal(a[4][name], b[4][name])
    assert not np.array_equal(results[0][0][0], results[0][1][0])


def test_dropout_masks_between_layers_have_the_right_rate_and_scale(rng):
    # With layer 1 an identity map (W_ih = I, W_hh = 0, no bias) on a relu RNN whose layer-0 outputs are
    # >= 0, the top output is exactly mask * (layer-0 output): the mask can be read off.
    p, hidden = 0.3, 32
    m = fusedrnn.RNN(hidden, hidden, 2, "relu", bias=False, dropout=p, dtype=np.float64, seed=5)
    sd = m.state_dict()
    sd["weight_ih_l1"] = np.eye(hidden)
    sd["weight_hh_l1"] = np.zeros((hidden, hidden))
    m.load_state_dict(sd)
    x = rng.standard_normal((20, 16, hidden))
    y, h_n = m(x)
    y0 = F.layer_forward("rnn_relu", x, sd["weight_ih_l0"], sd["weight_hh_l0"], training=False).y
    positive = y0 > 1e-3
    ratio = y[positive] / y0[positive]
    kept = ratio != 0
    np.testing.assert_allclose(ratio[kept], 1 / (1 - p), rtol=1e-12)
    assert abs((1 - kept.mean()) - p) < 0.03
    np.testing.assert_allclose(h_n[0], F.layer_forward("rnn_relu", x, sd["weight_ih_l0"],
                                                       sd["weight_hh_l0"]).h_n, **TOL64)


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_one_drops_everything_between_layers(rng, cell):
    # p=1: the second layer sees zeros, the first layer's final state is untouched.
    m = make_module(cell, 3, 4, num_layers=2, bidirectional=True, dropout=1.0, dtype=np.float64, seed=4)
    x, _, _, _, _, _ = _data(rng, cell, m)
    y, state = m(x)
    h_n = state[0] if has_cell_state(cell) else state
    zeros = np.zeros(x.shape[:2] + (8,))
    for d, suffix in enumerate(("", "_reverse")):
        w1 = [getattr(m, f"{n}_l1{suffix}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        top = F.layer_forward(cell, zeros, *w1, reverse=d == 1, training=False)
        np.testing.assert_allclose(y[:, :, d * 4:(d + 1) * 4], top.y, **TOL64)
        w0 = [getattr(m, f"{n}_l0{suffix}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        bottom = F.layer_forward(cell, x, *w0, reverse=d == 1, training=False)
        np.testing.assert_allclose(h_n[d], bottom.h_n, **TOL64)
    dx, _ = m.backward(rng.standard_normal(y.shape))
    # Nothing flows back through a dropped layer input: layer 0 and x get no gradient (dh_n is zero), and
    # layer 1's W_ih, whose input was all zeros, none either; its W_hh does.
    assert not np.any(dx) and not np.any(m.grads["weight_ih_l0"]) and not np.any(m.grads["weight_hh_l0"])
    assert not np.any(m.grads["weight_ih_l1"]) and np.any(m.grads["weight_hh_l1"])


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_backward_matches_finite_differences(rng, cell):
    # The mask is a function of the seed alone, so re-creating the module with the same seed for every
    # evaluation turns training-mode forward into a deterministic, differentiable function.
    seed, kwargs = 21, dict(num_layers=2, bidirectional=True, dropout=0.4, dtype=np.float64)
    probe = make_module(cell, 3, 4, seed=seed, **kwargs)
    x, h0, c0, dy, dh_n, dc_n = _data(rng, cell, probe, steps=4, batch=2)
    lengths = [4, 3]

    def loss(params, x, h0, c0):
        m = make_module(cell, 3, 4, seed=seed, **kwargs)
        m.load_state_dict(params)
        y, s = m(x, _hx(cell, h0, c0), lengths=lengths)
        h_n, c_n = s if has_cell_state(cell) else (s, None)
        return np.sum(y * dy) + np.sum(h_n * dh_n) + (np.sum(c_n * dc_n) if c_n is not None else 0.0)

    m = make_module(cell, 3, 4, seed=seed, **kwargs)
    y, _ = m(x, _hx(cell, h0, c0), lengths=lengths)
    dx, ds = m.backward(dy, _dhx(cell, dh_n, dc_n))
    dh0 = ds[0] if has_cell_state(cell) else ds
    m.eval()
    assert not np.allclose(m(x, _hx(cell, h0, c0), lengths=lengths)[0], y)  # dropout did act

    params = m.state_dict()
    targets = [(params[n], m.grads[n]) for n in params] + [(x, dx), (h0, dh0)]
    if has_cell_state(cell):
        targets.append((c0, ds[1]))
    eps = 1e-6
    for arr, grad in targets:
        for flat in rng.choice(arr.size, size=min(arr.size, 6), replace=False):
            idx = np.unravel_index(flat, arr.shape)
            saved = arr[idx]
            arr[idx] = saved + eps
            up = loss(params, x, h0, c0)
            arr[idx] = saved - eps
            down = loss(params, x, h0, c0)
            arr[idx] = saved
            np.testing.assert_allclose(grad[idx], (up - down) / (2 * eps), rtol=1e-6, atol=1e-7)


# ---- determinism and threads ----------------------------------------------------------------------------


@pytest.fixture
def restore_threads():
    before = fusedrnn.get_num_threads()
    yield
    fusedrnn.set_num_threads(before)


def _train_step(cell, dtype, x, h0, c0, dy, lengths):
    m = make_module(cell, x.shape[2], 96, num_layers=2, bidirectional=True, dropout=0.2, dtype=dtype, seed=8)
    y, s = m(x, _hx(cell, h0, c0), lengths=lengths)
    dx, ds = m.backward(dy)
    flat = lambda v: list(v) if isinstance(v, tuple) else [v]  # noqa: E731
    return [y, *flat(s), dx, *flat(ds), *m.grads.values()]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_same_inputs_same_threads_bit_identical(rng, cell, dtype, restore_threads):
    steps, batch, inp, hidden = 7, 48, 64, 96  # large enough that the BLAS calls split across threads
    x = rng.standard_normal((steps, batch, inp)).astype(dtype)
    h0 = rng.standard_normal((4, batch, hidden)).astype(dtype)
    c0 = rng.standard_normal((4, batch, hidden)).astype(dtype) if has_cell_state(cell) else None
    dy = rng.standard_normal((steps, batch, 2 * hidden)).astype(dtype)
    lengths = rng.integers(1, steps + 1, batch)
    by_threads = {}
    for n in (1, 2):
        fusedrnn.set_num_threads(n)
        assert fusedrnn.get_num_threads() == n
        first = _train_step(cell, dtype, x, h0, c0, dy, lengths)
        second = _train_step(cell, dtype, x, h0, c0, dy, lengths)
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a, b)
        by_threads[n] = first
    # Across thread counts only closeness is promised.
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for a, b in zip(by_threads[1], by_threads[2]):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def test_set_num_threads_round_trip_and_validation(restore_threads):
    for n in (1, 2, 3):
        fusedrnn.set_num_threads(n)
        assert fusedrnn.get_num_threads() == n
    for bad in (0, -1, fusedrnn._core.max_threads + 1):  # past the team's own bound, refused, not clamped
        with pytest.raises(ValueError, match=r"^n: expected a thread count in \[1, "):
            fusedrnn.set_num_threads(bad)
    for bad in (1.5, True, "2", None):
        with pytest.raises(TypeError, match=r"^n: expected an int"):
            fusedrnn.set_num_threads(bad)
    assert fusedrnn.get_num_threads() == 3  # rejected calls change nothing


def test_set_num_threads_out_of_range_names_the_argument(restore_threads):
    # A count too large for the native int must be rejected like any other bad count, naming `n`.
    with pytest.raises((ValueError, TypeError), match=r"^n: "):
        fusedrnn.set_num_threads(2**40)


def test_concurrent_calls_from_python_threads(rng):
    # The kernels run without the GIL; layers computed concurrently must equal the same layers run serially.
    steps, batch, inp, hidden = 12, 16, 24, 48
    jobs = []
    for k in range(12):
        cell = CELLS[k % 4]
        w = random_layer(rng, cell, inp, hidden, scale=0.3)
        jobs.append((cell, w, rng.standard_normal((steps, batch, inp)), rng.standard_normal((steps, batch, hidden)),
                     rng.integers(1, steps + 1, batch), k % 2 == 1))

    def run(job):
        cell, w, x, dy, lengths, reverse = job
        out = F.layer_forward(cell, x, *w.values(), lengths=lengths, reverse=reverse)
        g = F.layer_backward(out.tape, dy)
        return out.y, out.h_n, g.dx, g.dh0, g.weight_ih, g.weight_hh, g.bias_hh

    serial = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=6) as pool:
        for _ in range(3):
            concurrent = list(pool.map(run, jobs))
            for want, got in zip(serial, concurrent):
                for a, b in zip(got, want):
                    np.testing.assert_allclose(a, b, **TOL64)


# ---- functional out= --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["column_slice", "row_stride"])
@pytest.mark.parametrize("cell", CELLS)
def test_functional_out_writes_into_a_strided_view(rng, cell, layout):
    steps, batch, inp, hidden = 5, 3, 4, 6
    w = random_layer(rng, cell, inp, hidden)
    x = rng.standard_normal((steps, batch, inp))
    lengths = np.array([5, 2, 4])
    if layout == "column_slice":  # the middle third of a (T, B, 3H) array
        big = np.full((steps, batch, 3 * hidden), 7.0)
        out = big[:, :, hidden:2 * hidden]
        untouched = np.concatenate([big[:, :, :hidden], big[:, :, 2 * hidden:]], axis=2)
        outside = lambda: np.concatenate([big[:, :, :hidden], big[:, :, 2 * hidden:]], axis=2)  # noqa: E731
    else:  # every other batch row of a (T, 2B, H) array
        big = np.full((steps, 2 * batch, hidden), 7.0)
        out = big[:, ::2]
        untouched = big[:, 1::2].copy()
        outside = lambda: big[:, 1::2]  # noqa: E731
    result = F.layer_forward(cell, x, *w.values(), lengths=lengths, out=out)
    assert result.y is out
    y_ref, h_ref, _, cache = reference.forward(cell, x, *w.values(), lengths=lengths)
    np.testing.assert_allclose(out, y_ref, **TOL64)
    np.testing.assert_allclose(result.h_n, h_ref, **TOL64)
    np.testing.assert_array_equal(outside(), untouched)  # nothing written outside the view
    # The tape does not depend on `out`: overwriting it before backward changes nothing.
    out[...] = -3.0
    dy = rng.standard_normal((steps, batch, hidden))
    got = F.layer_backward(result.tape, dy)
    want = reference.backward(cache, dy)
    np.testing.assert_allclose(got.weight_hh, want["weight_hh"], **TOL64)
    np.testing.assert_allclose(got.dx, want["dx"], **TOL64)


def test_functional_out_and_dx_accept_any_c_contiguous_array(rng):
    # A (T, 1, H) array made by adding a batch axis to a (T, H) one is C-contiguous (NumPy ignores the
    # stride of a length-1 axis), so it is as valid an output buffer as a freshly allocated one.
    steps, inp, hidden = 4, 3, 5
    w = random_layer(rng, "lstm", inp, hidden)
    x = rng.standard_normal((steps, 1, inp))
    out = np.zeros((steps, hidden))[:, None, :]
    assert out.flags.c_contiguous
    result = F.layer_forward("lstm", x, *w.values(), out=out)
    y_ref, _, _, cache = reference.forward("lstm", x, *w.values())
    np.testing.assert_allclose(out, y_ref, **TOL64)
    dx = np.zeros((steps, inp))[:, None, :]
    assert dx.flags.c_contiguous
    F.layer_backward(result.tape, np.ones((steps, 1, hidden)), dx=dx)
    np.testing.assert_allclose(dx, reference.backward(cache, np.ones((steps, 1, hidden)))["dx"], **TOL64)


def test_functional_eval_returns_no_tape_and_same_outputs(rng):
    w = random_layer(rng, "gru", 3, 4)
    x = rng.standard_normal((5, 2, 3))
    train = F.layer_forward("gru", x, *w.values(), reverse=True)
    infer = F.layer_forward("gru", x, *w.values(), reverse=True, training=False)
    assert infer.tape is None and train.tape is not None
    assert train.tape.cell == "gru" and train.tape.reverse and train.tape.has_bias
    assert train.tape.shape == (5, 2, 3, 4) and train.tape.dtype == np.float64
    np.testing.assert_allclose(infer.y, train.y, **TOL64)
    np.testing.assert_allclose(infer.h_n, train.h_n, **TOL64)


@pytest.mark.parametrize("cell", CELLS)
def test_saved_nbytes_counts_what_backward_keeps(cell):
    steps, batch, hidden = 7, 3, 5
    m = make_module(cell, 4, hidden, num_layers=2, bidirectional=True, dropout=0.5, seed=0)
    x = np.ones((steps, batch, 4), np.float32)
    m.eval()
    m(x)
    assert m.saved_nbytes == 0
    m.train()
    m(x)
    row = batch * hidden * 4  # one (B, H) float32 state
    per_tape = (steps + 1) * row * (2 if has_cell_state(cell) else 1) + steps * row * saved_per_step(cell)
    inner_output = steps * batch * 2 * hidden * 4
    assert m.saved_nbytes == 4 * per_tape + inner_output + inner_output  # tapes, layer-1 input, mask
    m.backward(np.ones((steps, batch, 2 * hidden), np.float32))
    assert m.saved_nbytes == 0


def test_saved_nbytes_counts_the_copy_of_a_batch_first_input():
    m = make_module("gru", 4, 5, batch_first=True, seed=0)
    x = np.ones((3, 7, 4), np.float32)  # (B, T, I): the layer reads a (T, B, I) copy
    m(x)
    per_tape = 8 * 3 * 5 * 4 + 7 * 3 * 5 * 4 * saved_per_step("gru")
    assert m.saved_nbytes == per_tape + x.nbytes


def test_projected_lstm_saved_nbytes_counts_the_cell_outputs():
    # Beside an LSTM's tape, a projection keeps each step's cell output r (B, H) for weight_hr's
    # gradient; h has P features.
    steps, batch, hidden, proj = 7, 3, 5, 2
    m = fusedrnn.LSTM(4, hidden, num_layers=2, bidirectional=True, proj_size=proj, seed=0)
    m(np.ones((steps, batch, 4), np.float32))
    h_row, row = batch * proj * 4, batch * hidden * 4
    per_tape = (steps + 1) * (h_row + row) + steps * row * saved_per_step("lstm") + steps * row
    inner_output = steps * batch * 2 * proj * 4
    assert m.saved_nbytes == 4 * per_tape + inner_output


@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_pickled_and_copied_modules_compute_the_same(rng, cell, projected):
    # An unpickled array's dtype is an equal but distinct object: the core takes it by value.
    import copy
    import pickle

    kwargs = {"proj_size": 2} if projected else {}
    m = make_module(cell, 3, 6, num_layers=2, dtype=np.float64, seed=2, **kwargs)
    x = rng.standard_normal((4, 2, 3))
    y, _ = m(x)
    dx, _ = m.backward(np.ones_like(y))
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert clone.proj_size == (2 if projected else 0)
        got, _ = clone(x)
        np.testing.assert_array_equal(got, y)
        np.testing.assert_array_equal(clone.backward(np.ones_like(got))[0], dx)
        if projected:
            assert clone.weight_hr_l1.shape == (2, 6)


# ---- the input kept by reference for backward ---------------------------------------------------------


@pytest.mark.parametrize("team_size", [1, 2, 3, 8], indirect=True, ids=["t1", "t2", "t3", "t8"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fingerprint_sees_changes_and_not_the_team(rng, simd_level, team_size, dtype):
    # Large enough to be shared out over the team (passes.cpp), with a tail past the unrolled chains.
    a = rng.standard_normal(3 * (1 << 16) + 5).astype(dtype)
    first = fusedrnn._core.fingerprint(a)
    assert fusedrnn._core.fingerprint(a.copy()) == first
    assert fusedrnn._core.fingerprint(a.reshape(5, -1) if a.size % 5 == 0 else a[None]) == first
    changed = [a.copy() for _ in range(7)]
    changed[0][-1] = np.nextafter(a[-1], np.inf, dtype=dtype)   # the last bit of the last value
    changed[1][[7, 70001]] = a[[70001, 7]]                        # two values swapped, across shares
    changed[2][1 << 16] = -a[1 << 16]                             # a sign, at a share's edge
    changed[3][:] = np.roll(a, 1)
    changed[4][:-1] *= -1                                         # every sign but one: an even count
    changed[5][[3, 9]] *= -1                                      # two signs
    changed[6][:] = np.abs(a)
    assert all(fusedrnn._core.fingerprint(c) != first for c in changed)
    fusedrnn.set_num_threads(1)
    assert fusedrnn._core.fingerprint(a) == first


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fingerprint_sees_one_hot_rows_moved(rng, dtype):
    """Values of two kinds (zeros and ones): rows swapped, time reversed, or tokens moved by +k and -k
    keep the sum of the ones' positions, which the fingerprint once reduced to."""
    x = np.eye(5, dtype=dtype)[rng.integers(0, 5, (6, 4))]  # (T, B, V) one-hot
    first = fusedrnn._core.fingerprint(x)
    moved = [x[::-1].copy(), x[:, ::-1].copy(), x.copy(), x.copy()]
    moved[2][0, [0, 1]] = x[0, [1, 0]]
    moved[3][2, 0], moved[3][3, 0] = np.roll(x[2, 0], 1), np.roll(x[3, 0], -1)
    moved = [m for m in moved if not np.array_equal(m, x)]
    assert len(moved) >= 3
    assert all(fusedrnn._core.fingerprint(m) != first for m in moved)
    refills = [np.eye(5, dtype=dtype)[rng.integers(0, 5, (6, 4))] for _ in range(2000)]
    missed = sum(fusedrnn._core.fingerprint(r) == first for r in refills if not np.array_equal(r, x))
    assert missed == 0


@pytest.mark.parametrize("cell", CELLS)
def test_changing_x_in_place_before_backward_raises(rng, cell):
    m = make_module(cell, 4, 5, num_layers=2, bidirectional=True, seed=0)
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    m(x)
    x[2, 1, 3] += 1e-3  # a refilled input buffer, say
    with pytest.raises(RuntimeError, match=r"^backward: x was changed in place after the forward"):
        m.backward(np.ones((6, 3, 10), np.float32))
    with pytest.raises(RuntimeError, match="no training-mode forward"):  # consumed: run the forward again
        m.backward(np.ones((6, 3, 10), np.float32))
    m(x)
    x *= -1  # every sign, an even count of them
    with pytest.raises(RuntimeError, match=r"^backward: x was changed in place after the forward"):
        m.backward(np.ones((6, 3, 10), np.float32))
    for layout in ("unbatched", "batch_first"):  # unbatched: x itself; batch_first: a copy, free to change
        b = make_module(cell, 4, 5, batch_first=layout == "batch_first", seed=0)
        x = rng.standard_normal((6, 4) if layout == "unbatched" else (3, 6, 4)).astype(np.float32)
        y, _ = b(x)
        want = make_module(cell, 4, 5, batch_first=layout == "batch_first", seed=0)
        want(x.copy())
        x[0, 0] += 1.0
        if layout == "unbatched":
            with pytest.raises(RuntimeError, match="x was changed in place"):
                b.backward(np.ones_like(y))
        else:
            dx, _ = b.backward(np.ones_like(y))
            np.testing.assert_array_equal(dx, want.backward(np.ones_like(y))[0])
            np.testing.assert_array_equal(b.grads["weight_ih_l0"], want.grads["weight_ih_l0"])


def test_linear_keeps_its_input_safe_from_changes_in_place(rng):
    lin = fusedrnn.Linear(4, 2, seed=0)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    lin(x)
    x[1, 1] = 0.0
    with pytest.raises(RuntimeError, match="x was changed in place"):
        lin.backward(np.ones((5, 2), np.float32))
    strided = rng.standard_normal((4, 5)).astype(np.float32).T  # not contiguous: kept as a copy
    want = strided.copy()
    lin(strided)
    strided[:] = 0.0
    lin.zero_grad()
    lin.backward(np.ones((5, 2), np.float32))
    np.testing.assert_allclose(lin.grads["weight"], np.ones((5, 2), np.float32).T @ want, rtol=1e-6)


# ---- per-sample gradients ------------------------------------------------------------------------------

@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_per_sample_backward_gives_each_rows_gradients_from_one_backward(rng, cell, projected):
    """backward(per_sample=True): per_sample_grads[name][b] equals the gradients of row b run alone (two
    bidirectional layers, lengths, batch_first), `grads` is untouched, dx is the usual one; then
    sum_clipped_per_sample clips and sums them as by hand."""
    kwargs = dict(num_layers=2, bidirectional=True, dtype=np.float64, seed=3, batch_first=True)
    if projected:
        kwargs["proj_size"] = 3
    m = make_module(cell, 4, 5, **kwargs)
    width = 2 * (m.proj_size or 5)
    x, dy = rng.standard_normal((3, 6, 4)), rng.standard_normal((3, 6, width))
    lengths = np.array([6, 2, 5])
    m(x, lengths=lengths)
    whole_dx, _ = m.backward(dy)
    summed = {k: v.copy() for k, v in m.grads.items()}
    m.zero_grad()
    m(x, lengths=lengths)
    dx, _ = m.backward(dy, per_sample=True)
    np.testing.assert_allclose(dx, whole_dx, **TOL64)
    assert all(not g.any() for g in m.grads.values())
    for name, g in m.per_sample_grads.items():
        assert g.shape == (3, *m.state_dict()[name].shape), name
        np.testing.assert_allclose(g.sum(axis=0), summed[name], **TOL64, err_msg=name)
    per_sample = {k: v.copy() for k, v in m.per_sample_grads.items()}
    for b in range(3):
        m.zero_grad()
        m(x[b:b + 1], lengths=lengths[b:b + 1])
        m.backward(dy[b:b + 1])
        for name, g in m.grads.items():
            np.testing.assert_allclose(per_sample[name][b], g, **TOL64, err_msg=f"row {b} {name}")

    sums, norms = fusedrnn.gradients.sum_clipped_per_sample(per_sample, 0.5)
    want_norms = np.sqrt(sum((g.reshape(3, -1) ** 2).sum(axis=1) for g in per_sample.values()))
    np.testing.assert_allclose(norms, want_norms, rtol=1e-12)
    scale = np.minimum(0.5 / (want_norms + 1e-6), 1.0)
    for name, g in per_sample.items():
        np.testing.assert_allclose(sums[name], np.tensordot(scale, g, axes=1), rtol=1e-12, atol=1e-15)


def test_per_sample_backward_of_one_row_and_bad_arguments(rng):
    m = fusedrnn.GRU(3, 4, dtype=np.float64, seed=1)
    x = rng.standard_normal((5, 3))  # unbatched: one row
    m(x)
    m.backward(rng.standard_normal((5, 4)), per_sample=True)
    assert all(g.shape == (1, *p.shape) for g, p in zip(m.per_sample_grads.values(), m.parameters()))
    assert any(g.any() for g in m.per_sample_grads.values())
    m(x)
    with pytest.raises(TypeError, match=r"^per_sample: expected a bool"):
        m.backward(None, per_sample=1)
    G = fusedrnn.gradients
    with pytest.raises(ValueError, match=r"^max_norm: expected a number >= 0"):
        G.sum_clipped_per_sample(m.per_sample_grads, -1.0)
    with pytest.raises(TypeError, match=r"^per_sample_grads: expected a non-empty mapping"):
        G.sum_clipped_per_sample({}, 1.0)
    with pytest.raises(ValueError, match=r"^per_sample_grads\['b'\]: expected a leading sample dimension of 2"):
        G.sum_clipped_per_sample({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}, 1.0)
    with pytest.raises(TypeError, match=r"^per_sample_grads\['a'\]: expected a float array, got ndarray of int64$"):
        G.sum_clipped_per_sample({"a": np.ones((2, 3), np.int64)}, 1.0)
    sums, norms = G.sum_clipped_per_sample({"a": np.zeros((0, 3)), "b": np.zeros((0, 2, 2))}, 1.0)  # no samples
    assert norms.shape == (0,) and sums["a"].shape == (3,) and sums["b"].shape == (2, 2)
    assert not sums["a"].any() and not sums["b"].any()
    m.zero_grad()
    assert m.per_sample_grads == {}


@pytest.mark.parametrize("make, name", [(lambda: fusedrnn.GRU(3, 4, seed=0), "weight_ih_l0"),
                                        (lambda: fusedrnn.Linear(3, 2, seed=0), "weight"),
                                        (lambda: fusedrnn.Linear(3, 2, seed=0), "bias")])
def test_assigning_a_parameter_attribute_is_refused(make, name):
    """An attribute of a parameter's name would shadow the array the forward, state_dict() and the
    optimisers keep using (a silent no-op); writing into the parameter, or loading it, is the way."""
    m = make()
    held = m.state_dict()[name]
    with pytest.raises(TypeError, match=rf"^{name}: a parameter is not replaced by assignment"):
        setattr(m, name, np.zeros_like(held))
    np.testing.assert_array_equal(getattr(m, name), held)
    assert getattr(m, name) is dict(m.named_parameters())[name]
    getattr(m, name)[...] = 0.5
    np.testing.assert_array_equal(m.state_dict()[name], np.full_like(held, 0.5))
    m.load_state_dict({name: np.zeros_like(held)}, strict=False)
    assert not m.state_dict()[name].any()
    m.training = False  # other attributes stay assignable
    assert not m.training


@pytest.mark.parametrize("make", [lambda: fusedrnn.GRU(3, 5, seed=0), lambda: fusedrnn.Linear(3, 5, seed=0)])
def test_an_eval_forward_leaves_the_pending_training_forward(rng, make):
    """backward runs through the last training-mode forward: a monitoring call in eval mode between
    them does not discard it (as torch keeps its graph); a second training forward replaces it."""
    m, ref = make(), make()
    x = rng.standard_normal((4, 2, 3)).astype(np.float32)
    first = m(x)
    ref(x)
    m.eval()
    m(x + 1)
    m.train()
    y = first[0] if isinstance(first, tuple) else first
    m.backward(np.ones_like(y))
    ref.backward(np.ones_like(y))
    for name, g in ref.grads.items():
        np.testing.assert_array_equal(m.grads[name], g)
    with pytest.raises(RuntimeError, match=r"^backward: no training-mode forward .* each backward needs a forward"):
        m.backward(np.ones_like(y))


def test_load_state_dict_takes_jax_low_precision_arrays(rng):
    # NumPy arrays of ml_dtypes' types (JAX's bfloat16, float8) load cast, as torch's bfloat16 tensors do.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    m = fusedrnn.GRU(3, 4, seed=0)
    for dtype in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn):
        low = {k: (rng.standard_normal(v.shape) / 4).astype(dtype) for k, v in m.state_dict().items()}
        m.load_state_dict(low)
        for name, value in low.items():
            np.testing.assert_array_equal(getattr(m, name), value.astype(np.float32), err_msg=name)


def test_lengths_of_jax_low_precision_types_are_taken_as_their_values(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    m = fusedrnn.GRU(3, 4, seed=0)
    x = rng.standard_normal((5, 3, 3)).astype(np.float32)
    want = m(x, lengths=np.array([5, 2, 4]))[0]
    got = m(x, lengths=np.array([5, 2, 4]).astype(ml_dtypes.bfloat16))[0]
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"^lengths: expected whole numbers"):
        m(x, lengths=np.array([5, 2.5, 4]).astype(ml_dtypes.bfloat16))


def test_load_state_dict_reports_what_it_left_out():
    m = fusedrnn.GRU(3, 4, seed=0)
    full = m.state_dict()
    assert m.load_state_dict(full) == ([], [])
    got = m.load_state_dict({"rnn.weight_ih_l0": full["weight_ih_l0"], "bias_hh_l0": full["bias_hh_l0"]},
                            strict=False)
    assert got.missing_keys == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0"]
    assert got.unexpected_keys == ["rnn.weight_ih_l0"]
    with pytest.raises(TypeError, match=r"^strict: expected a bool, got str"):  # "no" is not False
        m.load_state_dict({"rnn.weight_ih_l0": full["weight_ih_l0"]}, strict="no")


def test_linear_refuses_an_empty_batch():
    lin = fusedrnn.Linear(3, 2, seed=0)
    for shape in ((0, 3), (4, 0, 3)):
        with pytest.raises(ValueError, match=r"^x: empty input"):
            lin(np.ones(shape, np.float32))
