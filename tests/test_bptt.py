"""Truncated BPTT: k >= T is full BPTT exactly; smaller k gives the gradient of the chunked graph, built
here by hand from the float64 reference; variable lengths, layers, per-chunk updates, errors."""

import numpy as np
import pytest

import fusedrnn
from fusedrnn import reference
from fusedrnn.bptt import truncated_bptt
from fusedrnn.losses import mse_loss
from helpers import CELL_CASES, has_cell_state, make_module, proj_of

TOL = dict(rtol=1e-10, atol=1e-12)


def _mse_against(target, batch_first=False):
    """A loss_fn: MSE of each chunk's output against the target's same steps (sum, so chunks add up)."""
    def loss_fn(y, start, stop):
        t = target[:, start:stop] if batch_first else target[start:stop]
        return mse_loss(y, t, reduction="sum")
    return loss_fn


def _states(cell, hx):
    """The state as one flat array: h_n, or h_n and c_n (widths differ with a projection)."""
    return np.concatenate([a.ravel() for a in hx]) if has_cell_state(cell) else hx


def _kwargs(layers, projected):
    return dict(num_layers=layers, dtype=np.float64, seed=3, **({"proj_size": proj_of(5, True)} if projected else {}))


def _setup(rng, cell, steps=11, batch=4, inp=3, hidden=5, layers=2, projected=False):
    """A module and its data; with `projected`, an LSTM whose h has proj_of(5) features."""
    m = make_module(cell, inp, hidden, **_kwargs(layers, projected))
    width = m.proj_size or hidden
    x = rng.standard_normal((steps, batch, inp))
    target = rng.standard_normal((steps, batch, width))
    h0 = rng.standard_normal((layers, batch, width))
    hx = (h0, rng.standard_normal((layers, batch, hidden))) if has_cell_state(cell) else h0
    return m, x, target, hx


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_k_at_least_t_is_full_bptt_exactly(rng, cell, projected, with_lengths):
    m, x, target, hx = _setup(rng, cell, projected=projected)
    lengths = np.array([11, 3, 7, 1]) if with_lengths else None
    full = make_module(cell, 3, 5, **_kwargs(2, projected))
    y, hx_n = full(x, hx, lengths=lengths)
    loss, dy = mse_loss(y, target, reduction="sum")
    full.backward(dy)
    for k in (11, 50):
        m.zero_grad()
        res = truncated_bptt(m, x, k, _mse_against(target), hx=hx, lengths=lengths)
        assert res.losses == [loss]
        np.testing.assert_array_equal(res.y, y)
        np.testing.assert_array_equal(_states(cell, res.hx), _states(cell, hx_n))
        for name in full.grads:
            np.testing.assert_array_equal(m.grads[name], full.grads[name], err_msg=name)
        # The gradients reaching x and hx, returned and added into input_grads as one backward adds them.
        np.testing.assert_array_equal(res.dx, full.input_grads["x"])
        dhx = (res.dhx,) if not has_cell_state(cell) else res.dhx
        for got, name in zip(dhx, ("h0", "c0")):
            np.testing.assert_array_equal(got, full.input_grads[name])
        assert set(m.input_grads) == set(full.input_grads)
        for name, g in m.input_grads.items():
            np.testing.assert_array_equal(g, full.input_grads[name], err_msg=name)


def _chunked_by_hand(cell, params, x, target, hx, lengths, k, layers):
    """The chunked graph with the reference: each chunk from the detached carried state, every row
    running (a finished row has chunk length 0: state carried, no gradient); gradients summed."""
    steps, batch, _ = x.shape
    lens = np.full(batch, steps) if lengths is None else lengths
    h, c = (hx if has_cell_state(cell) else (hx, None))
    grads, losses, dx = {}, [], np.zeros_like(x)
    for start in range(0, int(lens.max()), k):
        stop = min(start + k, steps)
        chunk_lens = np.clip(lens - start, 0, stop - start)
        y, h, c, caches = reference.stack_forward(cell, params, x[start:stop], h, c, num_layers=layers,
                                                  lengths=chunk_lens)
        loss, dy = mse_loss(y, target[start:stop], reduction="sum")
        losses.append(loss)
        dx[start:stop], dh, dc, g, _ = reference.stack_backward(caches, dy, num_layers=layers)
        if start == 0:
            dhx = (dh, dc) if has_cell_state(cell) else dh
        for name, value in g.items():
            grads[name] = grads.get(name, 0.0) + value
    return grads, losses, h, c, dx, dhx


@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("cell, projected", CELL_CASES)
def test_chunked_gradient_matches_the_chunked_graph(rng, cell, projected, with_lengths, k):
    m, x, target, hx = _setup(rng, cell, projected=projected)
    lengths = np.array([11, 3, 7, 1]) if with_lengths else None
    want, want_losses, h_n, c_n, dx, dhx = _chunked_by_hand(cell, m.state_dict(), x, target, hx, lengths, k, 2)
    res = truncated_bptt(m, x, k, _mse_against(target), hx=hx, lengths=lengths)
    np.testing.assert_allclose(res.losses, want_losses, **TOL)
    assert len(res.losses) == -(-11 // k)
    for name, g in want.items():
        np.testing.assert_allclose(m.grads[name], g, err_msg=name, **TOL)
    np.testing.assert_allclose(res.dx, dx, **TOL)
    np.testing.assert_allclose(_states(cell, res.dhx), _states(cell, dhx), **TOL)
    np.testing.assert_array_equal(m.input_grads["x"], res.dx)
    np.testing.assert_allclose(_states(cell, res.hx), _states(cell, (h_n, c_n) if has_cell_state(cell) else h_n),
                               **TOL)
    # The truncation is real: the gradient differs from full BPTT's.
    full = make_module(cell, 3, 5, **_kwargs(2, projected))
    y, _ = full(x, hx, lengths=lengths)
    full.backward(mse_loss(y, target, reduction="sum")[1])
    assert not np.allclose(m.grads["weight_hh_l0"], full.grads["weight_hh_l0"])


def test_chunks_stop_at_the_longest_length_and_skip_finished_rows(rng):
    m, x, target, hx = _setup(rng, "gru", steps=10, layers=1)
    calls = []

    def loss_fn(y, start, stop):
        calls.append((start, stop))
        # Rows whose length ended before this chunk output zeros throughout it.
        assert not np.any(y[:, lengths <= start])
        return mse_loss(y, target[start:stop], reduction="sum")

    lengths = np.array([6, 2, 5, 1])
    res = truncated_bptt(m, x, 3, loss_fn, hx=hx, lengths=lengths)
    assert calls == [(0, 3), (3, 6)]
    assert not np.any(res.y[6:])
    # A finished row's state is its own last step's, as one forward with lengths gives.
    y, h_n = fusedrnn.GRU(3, 5, dtype=np.float64, seed=3).eval()(x, hx, lengths=lengths)
    np.testing.assert_allclose(res.hx, h_n, **TOL)
    np.testing.assert_allclose(res.y, y, **TOL)


def test_batch_first_and_updates_after_each_chunk(rng):
    # With an optimiser step after every chunk, chunk j runs on the weights left by chunk j-1.
    m, x, target, _ = _setup(rng, "lstm", steps=8, layers=1)
    m.batch_first = True
    xb, tb = x.transpose(1, 0, 2).copy(), target.transpose(1, 0, 2).copy()
    opt = fusedrnn.optim.SGD(m, lr=0.1)
    snapshots = []

    def after_chunk(index):
        snapshots.append(m.state_dict())
        fusedrnn.gradients.clip_grad_norm(m.grads, 1.0)
        opt.step()
        m.zero_grad()

    res = truncated_bptt(m, xb, 4, _mse_against(tb, batch_first=True), after_chunk=after_chunk)
    assert res.y.shape == (4, 8, 5) and len(snapshots) == 2
    # Replay chunk 1 by hand: the weights after the first update, the state the first chunk left.
    by_hand = fusedrnn.LSTM(3, 5, batch_first=True, dtype=np.float64)
    by_hand.load_state_dict(snapshots[0])
    _, hx = by_hand(xb[:, :4])
    replay = fusedrnn.LSTM(3, 5, batch_first=True, dtype=np.float64)
    replay.load_state_dict(snapshots[1])
    y1, _ = replay(xb[:, 4:], hx)
    np.testing.assert_allclose(res.y[:, 4:], y1, **TOL)
    assert not np.allclose(snapshots[0]["weight_hh_l0"], snapshots[1]["weight_hh_l0"])


def test_truncated_bptt_errors(rng):
    target = np.zeros((5, 2, 4))
    bi = fusedrnn.GRU(3, 4, bidirectional=True, dtype=np.float64)
    x = rng.standard_normal((5, 2, 3))
    with pytest.raises(ValueError, match="module: truncated BPTT needs a unidirectional module"):
        truncated_bptt(bi, x, 2, _mse_against(target))
    m = fusedrnn.GRU(3, 4, dtype=np.float64)
    with pytest.raises(ValueError, match=r"module: truncated BPTT trains the module; call module.train\(\)"):
        truncated_bptt(m.eval(), x, 2, _mse_against(target))
    m.train()
    with pytest.raises(ValueError, match="k: expected an int >= 1"):
        truncated_bptt(m, x, 0, _mse_against(target))
    with pytest.raises(ValueError, match="x: expected a 3-D array"):
        truncated_bptt(m, x[:, 0], 2, _mse_against(target))
    with pytest.raises(ValueError, match=r"lengths: each length must be in \[1, 5\]"):
        truncated_bptt(m, x, 2, _mse_against(target), lengths=[6, 1])
    with pytest.raises(ValueError, match=r"hx: expected shape \(1, 2, 4\)"):
        truncated_bptt(m, x, 2, _mse_against(target), hx=np.zeros((1, 3, 4)))
    with pytest.raises(ValueError, match=r"loss_fn: returned a gradient of shape \(2, 4\)"):
        truncated_bptt(m, x, 2, lambda y, s, e: (0.0, np.zeros((2, 4))))
    for dtype in (np.float32, bool, np.int64, np.complex128, object):  # never cast, as backward casts none
        with pytest.raises(TypeError, match=rf"^loss_fn: returned a gradient of dtype {np.dtype(dtype)}, "
                                            r"expected the chunk output's float64"):
            truncated_bptt(m, x, 2, lambda y, s, e: (0.0, np.zeros(y.shape, dtype)))
    for loss_fn, exc, match in ((lambda y, s, e: (0.0, None), TypeError, r"^loss_fn: returned no gradient \(None\)"),
                                (lambda y, s, e: ("abc", y), TypeError, r"^loss_fn: returned a loss that is not a number"),
                                (lambda y, s, e: 0.0, TypeError, r"^loss_fn: expected \(loss, the loss's gradient"),
                                (lambda y, s, e: (0.0, y, y), TypeError, r"^loss_fn: expected \(loss,")):
        before = {k: v.copy() for k, v in m.grads.items()}
        with pytest.raises(exc, match=match):
            truncated_bptt(m, x, 2, loss_fn)
        for k, v in m.grads.items():  # refused before its chunk's backward
            np.testing.assert_array_equal(v, before[k])
    with pytest.raises(ValueError, match=r"^x: empty input"):
        truncated_bptt(m, x[:0], 2, _mse_against(target))
    with pytest.raises(ValueError, match=r"^x: empty input"):
        truncated_bptt(m, x[:, :0], 2, _mse_against(target))
    for other in (fusedrnn.Linear(3, 4), object(), "gru"):
        with pytest.raises(TypeError, match=r"^module: expected a fusedrnn LSTM, GRU or RNN"):
            truncated_bptt(other, x, 2, _mse_against(target))
    for name, value in (("loss_fn", None), ("after_chunk", 5)):
        before = {k: v.copy() for k, v in m.grads.items()}
        with pytest.raises(TypeError, match=f"^{name}: expected a function, got"):
            truncated_bptt(m, x, 2, **{"loss_fn": _mse_against(target), name: value})
        for k, v in m.grads.items():  # refused before any chunk ran
            np.testing.assert_array_equal(v, before[k])
    with pytest.raises(TypeError, match=r"hx: expected a tuple \(h0, c0\) for an LSTM"):
        truncated_bptt(fusedrnn.LSTM(3, 4, dtype=np.float64), x, 2, _mse_against(target), hx=np.zeros((1, 2, 4)))


def test_non_finite_input_is_refused_before_any_chunk_runs(rng):
    """NaN in a late chunk of x (or in hx) raises before the first chunk changes the module: no
    gradients added, no after_chunk (an optimiser step) run."""
    m = fusedrnn.GRU(3, 4, dtype=np.float64, seed=0)
    x = rng.standard_normal((8, 2, 3))
    target = np.zeros((8, 2, 4))
    for name, bad_x, hx in (("x", x.copy(), None), ("hx", x, np.full((1, 2, 4), np.inf))):
        if hx is None:
            bad_x[6, 1, 0] = np.nan
        before = {k: v.copy() for k, v in m.grads.items()}
        chunks = []
        with pytest.raises(ValueError, match=rf"^{name}: contains NaN or infinite values"):
            truncated_bptt(m, bad_x, 2, _mse_against(target), hx=hx, after_chunk=chunks.append)
        assert chunks == []
        for k, v in m.grads.items():
            np.testing.assert_array_equal(v, before[k])
    with pytest.raises(ValueError, match=r"^loss_fn's gradient: contains NaN or infinite values"):
        truncated_bptt(m, x, 2, lambda y, s, e: (0.0, np.full(y.shape, np.nan)))
