"""A plain NumPy float64 reference of one recurrent layer in one direction, forward and backward: the
oracle the tests compare the fused kernels with, and the "numpy" peer of the benchmark.

Written for reading, not speed: an explicit loop over time, one small function per cell and step, and a
hand-written backpropagation through time (no autodiff). Weights and gate order follow torch.nn:

    RNN   h' = act(W_ih x + b_ih + W_hh h + b_hh)                     act = tanh or relu
    LSTM  gates i, f, g, o:  c' = f*c + i*g,  h' = o*tanh(c')
          with cell_clip: c' = clip(f*c + i*g, -cell_clip, cell_clip), and no gradient flows through an
          entry with |f*c + i*g| >= cell_clip: the kernels store c' clamped and cannot tell an update
          that landed exactly on the bound from one beyond it, so an entry at the bound counts as
          clamped (unlike torch.clamp, which passes the gradient there)
    GRU   gates r, z, n:     n = tanh(W_in x + b_in + r*(W_hn h + b_hn)),  h' = (1-z)*n + z*h
    LSTM with a projection (weight_hr, torch.nn.LSTM's proj_size): the cell's output r = o*tanh(c')
          becomes h' = W_hr r, of proj_size features

Shapes: x (T, B, I); weight_ih (G*H, I); weight_hh (G*H, R); biases (G*H,); h0 (B, R), c0 (B, H);
weight_hr (P, H); R = P with a projection, else H.

Variable lengths: row b takes part in step t only when t < lengths[b]. At any other step its state is
carried unchanged and its output is zero, so a forward layer ends at the row's last step and a reverse
layer (which walks t = T-1 .. 0) starts there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .functional import GATES, has_cell_state


def sigmoid(a):
    # The tanh form never overflows, unlike 1 / (1 + exp(-a)).
    return 0.5 * (1.0 + np.tanh(0.5 * a))


# ---- one step of each cell ----------------------------------------------------------------------------
# forward(xg, hg, h, c) -> (h_new, c_new, saved); xg = W_ih x + b_ih and hg = W_hh h + b_hh, (B, G*H).
# backward(saved, h, c, dh_new, dc_new) -> (dxg, dhg, dh_direct, dc): gradients of xg and hg, the part of
# dh that bypasses W_hh, and the gradient of the previous cell state.


def _split(a, gates):
    return np.split(a, gates, axis=1)


def rnn_forward(act, xg, hg, h, c):
    a = xg + hg
    h_new = np.tanh(a) if act == "tanh" else np.maximum(a, 0.0)
    return h_new, None, {"a": a, "h_new": h_new}


def rnn_backward(act, saved, h, c, dh_new, dc_new):
    if act == "tanh":
        da = dh_new * (1.0 - saved["h_new"] ** 2)
    else:
        da = np.where(saved["a"] <= 0.0, 0.0, dh_new)  # 0 where inactive, even for an infinite dh_new; NaN passes
    return da, da, np.zeros_like(h), None


def lstm_forward(xg, hg, h, c, cell_clip=None):
    ai, af, ag, ao = _split(xg + hg, 4)
    i, f, g, o = sigmoid(ai), sigmoid(af), np.tanh(ag), sigmoid(ao)
    c_raw = f * c + i * g
    # As the kernels (cells.h): an entry that reached the bound, exactly or beyond, passes no gradient.
    passes = np.ones_like(c_raw) if cell_clip is None else (np.abs(c_raw) < cell_clip).astype(np.float64)
    c_new = c_raw if cell_clip is None else np.clip(c_raw, -cell_clip, cell_clip)
    tanh_c = np.tanh(c_new)
    h_new = o * tanh_c
    return h_new, c_new, {"i": i, "f": f, "g": g, "o": o, "tanh_c": tanh_c, "passes": passes}


def lstm_backward(saved, h, c, dh_new, dc_new):
    i, f, g, o, tanh_c = (saved[k] for k in ("i", "f", "g", "o", "tanh_c"))
    do = dh_new * tanh_c
    dc_total = (dc_new + dh_new * o * (1.0 - tanh_c**2)) * saved["passes"]
    di = dc_total * g
    df = dc_total * c
    dg = dc_total * i
    dc = dc_total * f
    da = np.concatenate([di * i * (1 - i), df * f * (1 - f), dg * (1 - g**2), do * o * (1 - o)], axis=1)
    return da, da, np.zeros_like(h), dc


def gru_forward(xg, hg, h, c):
    xr, xz, xn = _split(xg, 3)
    hr, hz, hn = _split(hg, 3)
    r = sigmoid(xr + hr)
    z = sigmoid(xz + hz)
    n = np.tanh(xn + r * hn)
    h_new = (1.0 - z) * n + z * h
    return h_new, None, {"r": r, "z": z, "n": n, "hn": hn}


def gru_backward(saved, h, c, dh_new, dc_new):
    r, z, n, hn = (saved[k] for k in ("r", "z", "n", "hn"))
    dn = dh_new * (1.0 - z)
    dz = dh_new * (h - n)
    dh_direct = dh_new * z
    dan = dn * (1.0 - n**2)          # gradient of n's pre-activation
    dr = dan * hn
    dar = dr * r * (1.0 - r)
    daz = dz * z * (1.0 - z)
    dxg = np.concatenate([dar, daz, dan], axis=1)
    dhg = np.concatenate([dar, daz, dan * r], axis=1)  # only the recurrent part of n is scaled by r
    return dxg, dhg, dh_direct, None


def _cell_functions(cell, cell_clip=None):
    if cell == "lstm":
        return (lambda *a: lstm_forward(*a, cell_clip=cell_clip)), lstm_backward
    if cell == "gru":
        return gru_forward, gru_backward
    act = {"rnn_tanh": "tanh", "rnn_relu": "relu"}[cell]
    return ((lambda *a: rnn_forward(act, *a)), (lambda *a: rnn_backward(act, *a)))


# ---- a layer over a sequence ------------------------------------------------------------------------


@dataclass
class Cache:
    """What the reference forward keeps for its backward."""

    cell: str
    reverse: bool
    x: np.ndarray
    weight_ih: np.ndarray
    weight_hh: np.ndarray
    has_bias: bool
    valid: np.ndarray                           # (T, B) bool, t < lengths[b]
    steps: list = field(default_factory=list)   # per time index t: (h_prev, c_prev, saved)
    weight_hr: np.ndarray | None = None         # (P, H) with a projection
    outputs: list = field(default_factory=list)  # with a projection, per t: the cell's output r (B, H)


def time_order(steps, reverse):
    return range(steps - 1, -1, -1) if reverse else range(steps)


def forward(cell, x, weight_ih, weight_hh, bias_ih=None, bias_hh=None, h0=None, c0=None, *,
            lengths=None, reverse=False, cell_clip=None, weight_hr=None):
    """Returns (y (T, B, R), h_n, c_n or None, cache)."""
    x = np.asarray(x, np.float64)
    steps, batch, _ = x.shape
    width = weight_hh.shape[1]
    w_hr = None if weight_hr is None else np.asarray(weight_hr, np.float64)
    hidden = width if w_hr is None else w_hr.shape[1]
    gh = GATES[cell] * hidden
    b_ih = np.zeros(gh) if bias_ih is None else np.asarray(bias_ih, np.float64)
    b_hh = np.zeros(gh) if bias_hh is None else np.asarray(bias_hh, np.float64)
    lens = np.full(batch, steps) if lengths is None else np.asarray(lengths)
    valid = np.arange(steps)[:, None] < lens[None, :]

    step_forward, _ = _cell_functions(cell, cell_clip)
    h = np.zeros((batch, width)) if h0 is None else np.array(h0, np.float64)
    c = np.zeros((batch, hidden)) if c0 is None else np.array(c0, np.float64)
    y = np.zeros((steps, batch, width))
    cache = Cache(cell, reverse, x, np.asarray(weight_ih, np.float64), np.asarray(weight_hh, np.float64),
                  bias_ih is not None, valid, [None] * steps, w_hr, [None] * steps)
    for t in time_order(steps, reverse):
        xg = x[t] @ cache.weight_ih.T + b_ih
        hg = h @ cache.weight_hh.T + b_hh
        r, c_new, saved = step_forward(xg, hg, h, c)
        h_new = r if w_hr is None else r @ w_hr.T
        cache.steps[t] = (h, c, saved)
        cache.outputs[t] = r
        keep = valid[t][:, None]
        y[t] = np.where(keep, h_new, 0.0)
        h = np.where(keep, h_new, h)
        if has_cell_state(cell):
            c = np.where(keep, c_new, c)
    return y, h, (c if has_cell_state(cell) else None), cache


def backward(cache, dy=None, dh_n=None, dc_n=None):
    """Backpropagation through time. Returns a dict with dx, dh0, dc0 (None without a cell state), weight_ih,
    weight_hh, bias_ih and bias_hh (None without biases), and dh_norm (T,): the L2 norm over the rows
    that take part in step t and all hidden units of the whole gradient reaching the hidden state of
    step t (its output's plus the later steps')."""
    x, w_ih, w_hh, w_hr = cache.x, cache.weight_ih, cache.weight_hh, cache.weight_hr
    steps, batch, _ = x.shape
    width = w_hh.shape[1]
    hidden = width if w_hr is None else w_hr.shape[1]
    _, step_backward = _cell_functions(cache.cell)
    dy = np.zeros((steps, batch, width)) if dy is None else np.asarray(dy, np.float64)
    dh = np.zeros((batch, width)) if dh_n is None else np.array(dh_n, np.float64)
    dc = np.zeros((batch, hidden)) if dc_n is None else np.array(dc_n, np.float64)

    dx = np.zeros_like(x)
    dw_ih, dw_hh = np.zeros_like(w_ih), np.zeros_like(w_hh)
    dw_hr = None if w_hr is None else np.zeros_like(w_hr)
    db_ih, db_hh = np.zeros(w_ih.shape[0]), np.zeros(w_hh.shape[0])
    dh_norm = np.zeros(steps)
    # Walk time in the opposite order to forward.
    for t in reversed(list(time_order(steps, cache.reverse))):
        h_prev, c_prev, saved = cache.steps[t]
        keep = cache.valid[t][:, None]
        dh_new = dh + np.where(keep, dy[t], 0.0)   # a padded step's output is a constant zero
        dh_norm[t] = np.linalg.norm(dh_new * keep)
        dr = dh_new
        if w_hr is not None:                        # h_new = r W_hr^T
            dw_hr += (dh_new * keep).T @ cache.outputs[t]
            dr = dh_new @ w_hr
        dxg, dhg, dh_direct, dc_prev = step_backward(saved, h_prev, c_prev, dr, dc)
        dxg, dhg = dxg * keep, dhg * keep             # a padded step has no gate gradients
        dx[t] = dxg @ w_ih
        dw_ih += dxg.T @ x[t]
        dw_hh += dhg.T @ h_prev
        db_ih += dxg.sum(axis=0)
        db_hh += dhg.sum(axis=0)
        # A padded step passes the state (and its gradient) through unchanged.
        dh = np.where(keep, dh_direct + dhg @ w_hh, dh)
        if has_cell_state(cache.cell):
            dc = np.where(keep, dc_prev, dc)
    return {
        "dx": dx,
        "dh0": dh,
        "dc0": dc if has_cell_state(cache.cell) else None,
        "weight_ih": dw_ih,
        "weight_hh": dw_hh,
        "bias_ih": db_ih if cache.has_bias else None,
        "bias_hh": db_hh if cache.has_bias else None,
        "weight_hr": dw_hr,
        "dh_norm": dh_norm,
    }


# ---- layers and directions stacked as the modules stack them (no dropout) ----------------------------


PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


def _layer_params(params, layer, suffix):
    return tuple(params.get(f"{n}_l{layer}{suffix}") for n in PARAMS)


def stack_forward(cell, params, x, h0=None, c0=None, *, num_layers=1, bidirectional=False, lengths=None,
                  cell_clip=None):
    """Sequence-major x (T, B, I), params keyed as torch.nn names them, h0 (L*D, B, R), c0 (L*D, B, H).
    Returns (y (T, B, D*R), h_n, c_n or None, caches)."""
    suffixes = ("", "_reverse") if bidirectional else ("",)
    layer_input = np.asarray(x, np.float64)
    h_n, c_n, caches = [], [], []
    for layer in range(num_layers):
        outputs = []
        for d, suffix in enumerate(suffixes):
            k = layer * len(suffixes) + d
            w_ih, w_hh, b_ih, b_hh, w_hr = _layer_params(params, layer, suffix)
            y, h, c, cache = forward(cell, layer_input, w_ih, w_hh, b_ih, b_hh,
                                     None if h0 is None else h0[k], None if c0 is None else c0[k],
                                     lengths=lengths, reverse=d == 1, cell_clip=cell_clip, weight_hr=w_hr)
            outputs.append(y)
            h_n.append(h)
            c_n.append(c)
            caches.append(cache)
        layer_input = np.concatenate(outputs, axis=2)
    return layer_input, np.stack(h_n), (np.stack(c_n) if has_cell_state(cell) else None), caches


def stack_backward(caches, dy=None, dh_n=None, dc_n=None, *, num_layers=1, bidirectional=False):
    """Backward of stack_forward. Returns (dx, dh0, dc0 or None, grads keyed by parameter name, dh_norm
    (L*D, T))."""
    suffixes = ("", "_reverse") if bidirectional else ("",)
    dirs = len(suffixes)
    cell = caches[0].cell
    width = caches[0].weight_hh.shape[1]  # R: each direction's output features
    grads, dh0, dc0, dh_norm = {}, [None] * len(caches), [None] * len(caches), [None] * len(caches)
    grad_out = dy
    for layer in reversed(range(num_layers)):
        dx = 0.0
        for d, suffix in enumerate(suffixes):
            k = layer * dirs + d
            g = backward(caches[k], None if grad_out is None else grad_out[:, :, d * width:(d + 1) * width],
                         None if dh_n is None else dh_n[k], None if dc_n is None else dc_n[k])
            dx = dx + g["dx"]
            dh0[k], dc0[k], dh_norm[k] = g["dh0"], g["dc0"], g["dh_norm"]
            for name in PARAMS:
                if g[name] is not None:
                    grads[f"{name}_l{layer}{suffix}"] = g[name]
        grad_out = dx
    return grad_out, np.stack(dh0), (np.stack(dc0) if has_cell_state(cell) else None), grads, np.stack(dh_norm)
