"""LSTM cell-state clipping (forward against the clamping reference, gradients by finite differences away
from the bound), the per-step gradient norms the backward pass reports, the gradient-flow verdicts on
networks whose answer is known, and the Linear readout."""

import numpy as np
import pytest

import fusedrnn
from fusedrnn import functional as F
from fusedrnn import reference
from fusedrnn.gradients import diagnose_gradient_flow
from helpers import CELLS, make_module, numerical_gradient, random_layer, random_lengths

TOL64 = dict(rtol=1e-12, atol=1e-13)
CLIP = 0.9


def _clip_setup(rng, steps=6, batch=3, inp=2, hidden=4):
    # Large weights so that many cell entries pass the bound and many stay inside it.
    w = random_layer(rng, "lstm", inp, hidden, scale=1.5)
    x = rng.standard_normal((steps, batch, inp))
    h0, c0 = rng.standard_normal((batch, hidden)), rng.standard_normal((batch, hidden))
    return w, x, h0, c0


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("lengths", [None, np.array([6, 2, 4])], ids=["full", "lengths"])
def test_cell_clip_forward_and_backward_match_the_reference(rng, reverse, lengths):
    w, x, h0, c0 = _clip_setup(rng)
    out = F.layer_forward("lstm", x, *w.values(), h0, c0, lengths=lengths, reverse=reverse, cell_clip=CLIP)
    y, h_n, c_n, cache = reference.forward("lstm", x, *w.values(), h0, c0, lengths=lengths, reverse=reverse,
                                           cell_clip=CLIP)
    np.testing.assert_allclose(out.y, y, **TOL64)
    np.testing.assert_allclose(out.h_n, h_n, **TOL64)
    np.testing.assert_allclose(out.c_n, c_n, **TOL64)
    assert np.abs(out.c_n).max() <= CLIP
    unclipped = F.layer_forward("lstm", x, *w.values(), h0, c0, lengths=lengths, reverse=reverse)
    assert np.abs(unclipped.c_n).max() > CLIP  # the bound is active in this test
    dy, dh_n, dc_n = rng.standard_normal(y.shape), rng.standard_normal(h_n.shape), rng.standard_normal(c_n.shape)
    got = F.layer_backward(out.tape, dy, dh_n, dc_n)
    want = reference.backward(cache, dy, dh_n, dc_n)
    for name in ("dx", "dh0", "dc0", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "dh_norm"):
        np.testing.assert_allclose(getattr(got, name), want[name], err_msg=name, **TOL64)


def test_cell_clip_gradients_by_finite_differences(rng):
    w, x, h0, c0 = _clip_setup(rng)
    arrays = dict(w, x=x, h0=h0, c0=c0)
    dy = rng.standard_normal((6, 3, 4))

    def loss():
        out = F.layer_forward("lstm", arrays["x"], arrays["weight_ih"], arrays["weight_hh"], arrays["bias_ih"],
                              arrays["bias_hh"], arrays["h0"], arrays["c0"], training=False, cell_clip=CLIP)
        return np.sum(out.y * dy)

    out = F.layer_forward("lstm", x, *w.values(), h0, c0, cell_clip=CLIP)
    got = F.layer_backward(out.tape, dy)
    analytic = dict(x=got.dx, h0=got.dh0, c0=got.dc0, weight_ih=got.weight_ih, weight_hh=got.weight_hh,
                    bias_ih=got.bias_ih, bias_hh=got.bias_hh)
    # Away from the bound: no unclamped cell value f*c + i*g lies within 1e-4 of +-CLIP, where the
    # 1e-6 nudges could carry it across; some lie beyond it, so clamped entries are checked too.
    _, _, _, cache = reference.forward("lstm", x, *w.values(), h0, c0, cell_clip=CLIP)
    raw = np.stack([s["f"] * c_prev + s["i"] * s["g"] for _, c_prev, s in cache.steps])
    assert np.abs(np.abs(raw) - CLIP).min() > 1e-4 and np.mean(np.abs(raw) > CLIP) > 0.1
    for name, arr in arrays.items():
        indices = list(np.ndindex(arr.shape))
        numeric = numerical_gradient(loss, arr, indices)
        np.testing.assert_allclose(analytic[name][tuple(np.array(indices).T)], numeric, rtol=1e-6, atol=1e-7,
                                   err_msg=name)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cell_clip_passes_no_gradient_at_the_bound(rng, dtype):
    """An update that lands exactly on the bound counts as clamped: the kernels store c clamped and
    cannot tell |c_raw| == cell_clip from |c_raw| > cell_clip, and the reference follows them. With
    x = h0 = 0 every gate is its bias: f = sigmoid(40) = 1 and g = tanh(0) = 0 exactly, so c_raw = c0."""
    hidden, clip = 4, 0.5
    w = random_layer(rng, "lstm", 2, hidden, dtype=dtype)
    w["bias_ih"][:] = 0
    w["bias_hh"][:] = 0
    w["bias_ih"][hidden:2 * hidden] = 40.0   # the forget gate saturates to exactly 1
    x, h0 = np.zeros((1, 2, 2), dtype), np.zeros((2, hidden), dtype)
    c0 = np.array([[clip, -clip, 0.25, 0.75], [-0.1, clip, -0.75, 0.3]], dtype)
    dy, dh_n, dc_n = (rng.standard_normal(s).astype(dtype) for s in ((1, 2, hidden), (2, hidden), (2, hidden)))
    out = F.layer_forward("lstm", x, *w.values(), h0, c0, cell_clip=clip)
    got = F.layer_backward(out.tape, dy, dh_n, dc_n)
    _, _, c_n, cache = reference.forward("lstm", x, *w.values(), h0, c0, cell_clip=clip)
    want = reference.backward(cache, dy, dh_n, dc_n)
    np.testing.assert_array_equal(out.c_n, np.clip(c0, -clip, clip))
    np.testing.assert_array_equal(c_n, np.clip(c0, -clip, clip))
    passes = np.abs(c0) < clip
    assert np.all(got.dc0[~passes] == 0) and np.all(want["dc0"][~passes] == 0)
    assert np.all(got.dc0[passes] != 0)
    np.testing.assert_allclose(got.dc0, want["dc0"], **TOL64 if dtype == np.float64 else dict(rtol=1e-5))


def test_module_cell_clip(rng):
    m = fusedrnn.LSTM(3, 4, num_layers=2, dtype=np.float64, seed=0, cell_clip=0.05)
    x = 3 * rng.standard_normal((7, 2, 3))
    y, (h_n, c_n) = m(x)
    want, _, want_c, _ = reference.stack_forward("lstm", m.state_dict(), x, num_layers=2, cell_clip=0.05)
    np.testing.assert_allclose(y, want, **TOL64)
    np.testing.assert_allclose(c_n, want_c, **TOL64)
    assert np.abs(c_n).max() == pytest.approx(0.05)
    assert "cell_clip=0.05" in repr(m)
    with pytest.raises(ValueError, match="cell_clip: expected a positive finite bound"):
        fusedrnn.LSTM(3, 4, cell_clip=0.0)
    with pytest.raises(TypeError, match="cell_clip: expected a positive float or None"):
        fusedrnn.LSTM(3, 4, cell_clip="1")
    with pytest.raises(TypeError):
        fusedrnn.GRU(3, 4, cell_clip=1.0)  # only an LSTM has a cell state


# ---- per-step gradient norms --------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_module_reports_hidden_grad_norms_per_layer_and_direction(rng, cell):
    m = make_module(cell, 3, 4, num_layers=2, bidirectional=True, dtype=np.float64, seed=1)
    x = rng.standard_normal((6, 3, 3))
    lengths = random_lengths(rng, 6, 3)
    y, _ = m(x, lengths=lengths)
    dy = rng.standard_normal(y.shape)
    assert m.hidden_grad_norms is None
    m.backward(dy)
    _, _, _, caches = reference.stack_forward(cell, m.state_dict(), x, num_layers=2, bidirectional=True,
                                              lengths=lengths)
    *_, want = reference.stack_backward(caches, dy, num_layers=2, bidirectional=True)
    assert m.hidden_grad_norms.shape == (4, 6) and m.hidden_grad_norms.dtype == np.float64
    np.testing.assert_allclose(m.hidden_grad_norms, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scale", [1e-20, 1e20])
@pytest.mark.parametrize("cell", [*CELLS, "lstm_projected"])
def test_float32_hidden_grad_norms_hold_tiny_and_huge_gradients(rng, cell, scale):
    """The squares of float32 gradients below ~1e-19 flush to zero and above ~2e19 overflow; the norms
    are float64 (as the reference's and the CUDA backend's), so a finite gradient has a finite, nonzero
    norm: the same as in float64, scaled."""
    proj_size = 2 if cell == "lstm_projected" else 0
    cell = cell.replace("_projected", "")
    kwargs = dict(num_layers=1, seed=3, proj_size=proj_size) if proj_size else dict(num_layers=1, seed=3)
    single, double = (make_module(cell, 3, 5, dtype=dtype, **kwargs) for dtype in (np.float32, np.float64))
    x = rng.standard_normal((4, 2, 3))
    dy = rng.standard_normal((4, 2, proj_size or 5))
    single(x.astype(np.float32))
    single.backward((dy * scale).astype(np.float32))
    double(x)
    double.backward(dy)
    assert np.all(single.hidden_grad_norms > 0) and np.all(np.isfinite(single.hidden_grad_norms))
    np.testing.assert_allclose(single.hidden_grad_norms / scale, double.hidden_grad_norms, rtol=1e-4)


def _loss_at_last_step(m, x):
    """Backward from a loss on the last step's output only; the forward direction's profile."""
    y, _ = m(x)
    dy = np.zeros_like(y)
    dy[-1] = 1.0
    m.backward(dy)
    return diagnose_gradient_flow(m.hidden_grad_norms[0])


def test_gradient_flow_verdicts_on_known_networks(rng):
    steps, hidden = 60, 16
    x = rng.standard_normal((steps, 4, 8))
    # Small recurrent weights and tanh: each step multiplies the gradient by well under one.
    rnn = fusedrnn.RNN(8, hidden, dtype=np.float64, seed=0)
    rnn.weight_hh_l0[...] *= 0.3
    flow = _loss_at_last_step(rnn, x)
    assert flow.verdict == "vanishing" and flow.factor_per_step < 0.6
    # The same length through an LSTM whose forget gates are held open: the cell carries it.
    lstm = fusedrnn.LSTM(8, hidden, dtype=np.float64, seed=0)
    lstm.bias_hh_l0[hidden:2 * hidden] = 6.0  # forget gate bias (gates i, f, g, o)
    lstm.weight_hh_l0[...] *= 0.3
    flow = _loss_at_last_step(lstm, x)
    assert flow.verdict == "healthy" and 0.9 < flow.factor_per_step <= 1.05
    # Large recurrent weights with relu: each step multiplies the gradient by more than one.
    relu = fusedrnn.RNN(8, hidden, nonlinearity="relu", dtype=np.float64, seed=0)
    relu.weight_hh_l0[...] = 1.5 * np.eye(hidden) + 0.05 * rng.standard_normal((hidden, hidden))
    relu.bias_ih_l0[...] = 1.0  # keep the units active
    flow = _loss_at_last_step(relu, np.abs(x))
    assert flow.verdict == "exploding" and flow.factor_per_step > 1.3


# ---- the Linear readout ----------------------------------------------------------------------------------


def test_linear_gradients_by_finite_differences(rng):
    lin = fusedrnn.Linear(4, 3, dtype=np.float64, seed=0)
    x, dy = rng.standard_normal((5, 2, 4)), rng.standard_normal((5, 2, 3))
    lin(x)
    dx = lin.backward(dy)
    params = dict(lin.named_parameters())
    arrays = dict(params, x=x)
    analytic = dict(lin.grads, x=dx)
    for name, arr in arrays.items():
        indices = list(np.ndindex(arr.shape))
        numeric = numerical_gradient(lambda: float(np.sum(lin.eval()(x) * dy)), arr, indices)
        np.testing.assert_allclose(analytic[name][tuple(np.array(indices).T)], numeric, rtol=1e-7, atol=1e-9)


def test_linear_matches_torch(rng):
    torch = pytest.importorskip("torch")
    lin = fusedrnn.Linear(6, 2, seed=1)
    ref = torch.nn.Linear(6, 2)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in lin.state_dict().items()})
    x = rng.standard_normal((3, 4, 6)).astype(np.float32)
    dy = rng.standard_normal((3, 4, 2)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    yt = ref(xt)
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(lin(x), yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lin.backward(dy), xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lin.grads["weight"], ref.weight.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lin.grads["bias"], ref.bias.grad.numpy(), rtol=1e-5, atol=1e-5)
    # torch's state dict loads as it is, checked before anything is written.
    other = torch.nn.Linear(6, 2)
    lin.load_state_dict(other.state_dict())
    np.testing.assert_array_equal(lin.state_dict()["weight"], other.weight.detach().numpy())
    with pytest.raises(ValueError, match=r"state_dict\['bias'\]: expected shape \(2,\)"):
        lin.load_state_dict({"weight": np.zeros((2, 6)), "bias": np.zeros(3)})
    np.testing.assert_array_equal(lin.state_dict()["weight"], other.weight.detach().numpy())


def test_linear_errors():
    lin = fusedrnn.Linear(3, 2)
    with pytest.raises(ValueError, match="x: expected 3 features in the last dimension, got 4"):
        lin(np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match="x: expected dtype float32, got float64"):
        lin(np.zeros((2, 3)))
    with pytest.raises(RuntimeError, match="backward: no training-mode forward"):
        lin.backward(np.zeros((2, 2), np.float32))
    lin(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"dy: expected shape \(2, 2\)"):
        lin.backward(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="out_features: expected an int >= 1"):
        fusedrnn.Linear(3, 0)


@pytest.mark.parametrize("backend", ["cpu", "emulated_device"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_passes_no_gradient_where_inactive_even_an_infinite_one(rng, simd_level, backend, dtype):
    # torch.nn's rule: where the relu is inactive the gradient is 0, whatever arrives there.
    steps, batch, inp, hidden = 5, 3, 4, 19
    w = {k: v.astype(dtype) for k, v in random_layer(rng, "rnn_relu", inp, hidden).items()}
    x = rng.standard_normal((steps, batch, inp)).astype(dtype)
    out = F._forward("rnn_relu", x, *w.values(), None, None, None, False, True, None, None, backend=backend)
    inactive = out.y == 0
    assert inactive.any() and not inactive.all()
    dy = np.where(inactive, np.inf, rng.standard_normal(out.y.shape)).astype(dtype)
    got = F._backward(out.tape, dy, None, None)
    assert all(np.isfinite(g).all() for g in (got.dx, got.dh0, got.weight_ih, got.weight_hh, got.bias_ih))
    _, _, _, cache = reference.forward("rnn_relu", x.astype(np.float64), *(v.astype(np.float64) for v in w.values()))
    want = reference.backward(cache, dy.astype(np.float64))
    tol = TOL64 if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    for name in ("dx", "dh0", "weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        np.testing.assert_allclose(getattr(got, name), want[name], **tol, err_msg=name)


@pytest.mark.parametrize("backend", ["cpu", "emulated_device"])
def test_a_gate_saturated_off_stays_off_against_huge_states(simd_level, backend):
    # sigmoid(-200) is 0 in float32 arithmetic: a forget gate (LSTM) or update gate (GRU) that far off
    # must pass nothing of a state of 1e30 or more along, forward or backward, as in float64.
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    x = np.ones((1, 1, 1), np.float32)
    for cell, gate, h0, c0 in (("lstm", 1, 1e30, 1e30), ("gru", 1, 1e36, None)):
        gates = 4 if cell == "lstm" else 3
        b_ih = zeros(gates)
        b_ih[gate] = -200.0
        b_ih[gates - 1] = 0.5  # an output (o) or candidate (n) gate that is on
        args = (x, zeros(gates, 1), zeros(gates, 1), b_ih, zeros(gates), np.full((1, 1), h0, np.float32),
                None if c0 is None else np.full((1, 1), c0, np.float32))
        out = F._forward(cell, *args, None, False, True, None, None, backend=backend)
        want_y, want_h, want_c, cache = reference.forward(cell, *(None if a is None else a.astype(np.float64)
                                                                  for a in args))
        np.testing.assert_allclose(out.h_n, want_h, rtol=1e-6, err_msg=cell)
        if c0 is not None:
            assert out.c_n[0, 0] == 0.0 and want_c[0, 0] == 0.0
        dc_n = np.ones((1, 1), np.float32) if c0 is not None else None
        got = F._backward(out.tape, np.ones((1, 1, 1), np.float32), None, dc_n)
        want = reference.backward(cache, np.ones((1, 1, 1)), None, None if dc_n is None else dc_n.astype(np.float64))
        for name in ("weight_ih", "weight_hh", "bias_ih", "dh0"):
            np.testing.assert_allclose(getattr(got, name), want[name], rtol=1e-5, atol=1e-6, err_msg=f"{cell} {name}")


@pytest.mark.parametrize("backend", ["cpu", "emulated_device"])
def test_an_infinite_cell_state_without_a_bound_passes_nan_back(rng, simd_level, backend):
    # With no cell_clip nothing was clamped: an infinite c is not an element the clamp held, and the
    # gradient through it is NaN (inf * 0 in the forget gate's), as in the float64 reference (and torch.nn).
    steps, batch, inp, hidden = 3, 2, 2, 4
    w = {k: v.astype(np.float32) for k, v in random_layer(rng, "lstm", inp, hidden, scale=0.5).items()}
    x = rng.standard_normal((steps, batch, inp)).astype(np.float32)
    h0, c0 = np.zeros((batch, hidden), np.float32), np.zeros((batch, hidden), np.float32)
    c0[0, 1] = np.inf
    out = F._forward("lstm", x, *w.values(), h0, c0, None, False, True, None, None, backend=backend)
    dy = np.ones((steps, batch, hidden), np.float32)
    got = F._backward(out.tape, dy, None, None)
    with np.errstate(invalid="ignore"):
        _, _, _, cache = reference.forward("lstm", *(a.astype(np.float64) for a in (x, *w.values(), h0, c0)))
        want = reference.backward(cache, dy.astype(np.float64))
    assert np.isnan(want["dc0"][0, 1]) and np.isfinite(want["dc0"][1]).all()
    for name in ("dx", "dh0", "dc0", "weight_ih", "weight_hh", "bias_ih"):
        np.testing.assert_array_equal(np.isnan(getattr(got, name)), np.isnan(want[name]), err_msg=name)
        np.testing.assert_allclose(getattr(got, name), want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_relu_passes_the_gradient_through_a_nan_unit_as_torch_does(rng):
    # After an overflow (or with check_finite=False) a unit can be NaN; torch's relu backward zeroes
    # only where the output is <= 0, so the gradient flows on through a NaN unit, and so it does here.
    steps, batch, inp, hidden = 4, 2, 3, 5
    w = random_layer(rng, "rnn_relu", inp, hidden)
    x = rng.standard_normal((steps, batch, inp))
    x[1, 0, 2] = np.nan  # row 0 is NaN from step 1 on
    out = F.layer_forward("rnn_relu", x, *w.values(), check_finite=False)
    dy = np.ones((steps, batch, hidden))
    got = F.layer_backward(out.tape, dy)
    _, _, _, cache = reference.forward("rnn_relu", x, *w.values())
    want = reference.backward(cache, dy)
    assert np.isnan(out.y[1:, 0]).all() and np.isfinite(got.dx).all() and got.dx[1:, 0].any()
    for name in ("dx", "dh0", "weight_ih", "weight_hh", "bias_ih"):
        np.testing.assert_allclose(getattr(got, name), want[name], **TOL64, err_msg=name)
    torch = pytest.importorskip("torch")
    module = torch.nn.RNN(inp, hidden, nonlinearity="relu", dtype=torch.float64)
    module.load_state_dict({f"{k}_l0": torch.from_numpy(v) for k, v in w.items()})
    xt = torch.from_numpy(x).requires_grad_()
    module(xt)[0].backward(torch.from_numpy(dy))
    np.testing.assert_allclose(got.dx, xt.grad.numpy(), **TOL64)
