"""One recurrent layer in one direction, with explicit weights: the layer below the modules, for
people who manage their own parameters.

Shapes: x (T, B, I); weight_ih (G*H, I); weight_hh (G*H, H); bias_ih, bias_hh (G*H,); h0, c0 (B, H);
with G = 1 (RNN), 3 (GRU), 4 (LSTM) and gates in torch.nn's order (i, f, g, o and r, z, n).

An LSTM may project its hidden state, as torch.nn.LSTM(proj_size=P) does: with weight_hr (P, H),
0 < P < H, h = W_hr (o * tanh(c)), so weight_hh is (4*H, P) and h0, y, h_n and their gradients have P
features, while c0 and c_n keep H.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _checks, _core, _device

# The core's list of cells (cells.h): name -> {"gates", "saved", "has_cell_state", "projection"}. Every
# table of cells in the package derives from it.
CELLS = tuple(_core.cells)
GATES = {name: facts["gates"] for name, facts in _core.cells.items()}


def has_cell_state(cell: str) -> bool:
    """Whether the cell carries a cell state c beside h (c0, c_n, dc0): True for "lstm"."""
    return _core.cells[_checks.cell(cell)]["has_cell_state"]


def takes_projection(cell: str) -> bool:
    """Whether the cell's hidden state may be projected (weight_hr, proj_size): True for "lstm"."""
    return _core.cells[_checks.cell(cell)]["projection"]


class LayerOutput(NamedTuple):
    """What layer_forward returns: the outputs, the final states and the tape backward needs."""

    y: np.ndarray            # (T, B, R): R = P with a projection, else H
    h_n: np.ndarray          # (B, R)
    c_n: np.ndarray | None   # (B, H) for LSTM, else None
    tape: _core.Tape | None  # what backward needs; None when training=False


class LayerGrads(NamedTuple):
    """What layer_backward returns: the gradients of x and the initial states, each weight's (the
    arrays of `grads` where given, accumulated into; (Q, *shape) with grad_groups Q > 1), and the
    gradient-flow profile dh_norm."""

    dx: np.ndarray
    dh0: np.ndarray
    dc0: np.ndarray | None
    weight_ih: np.ndarray
    weight_hh: np.ndarray
    bias_ih: np.ndarray | None
    bias_hh: np.ndarray | None
    dh_norm: np.ndarray | None = None  # (T,) float64: norm over (B, R) of dL/dh_t at each step, time order
    weight_hr: np.ndarray | None = None  # (P, H) with a projection, else None


def layer_forward(cell: str, x, weight_ih, weight_hh, bias_ih=None, bias_hh=None, h0=None, c0=None, *,
                  lengths=None, reverse: bool = False, training: bool = True, out=None,
                  check_finite: bool = True, cell_clip: float | None = None, weight_hr=None) -> LayerOutput:
    """Runs one layer over a sequence. With `lengths` (B,), row b stops at its own last step: later
    outputs are zero and h_n/c_n hold its state there (reverse=True starts each row at its last step).
    `out` may be a (T, B, H) view with a row stride, e.g. one direction's half of a (T, B, 2H) array.
    NaN or infinity in x, h0 or c0 raises ValueError unless check_finite=False (then a non-finite
    value in x's padding, past a row's length, still reaches weight_ih's gradient: 0 * NaN is NaN). `cell_clip` (a positive
    finite number; only for a cell with a cell state) bounds the cell state to [-cell_clip, cell_clip]
    after every update; no gradient flows through an element whose update reached the bound.
    `weight_hr` (P, H), for an LSTM only: the projection of the hidden state (module docstring).

    The tape references x and the weights rather than copying them: change neither in place before
    layer_backward.

    CUDA device arrays (CuPy arrays, torch CUDA tensors, any __cuda_array_interface__ or CUDA DLPack
    array) run on their device and the array library's current stream, and the results are that
    library's arrays; every array of a call must be on one device (lengths may be host or device)."""
    _checks.cell(cell)
    reverse, training = _checks.flag("reverse", reverse), _checks.flag("training", training)
    check_finite = _checks.flag("check_finite", check_finite)
    device = _device.common_device(x=x, weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih,
                                   bias_hh=bias_hh, h0=h0, c0=c0, out=out, weight_hr=weight_hr)
    if device != "cpu":
        return _forward_on_device(cell, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, reverse,
                                  training, out, check_finite, cell_clip, weight_hr)
    x = _checks.as_array("x", x)
    if x.ndim != 3:
        raise ValueError(f"x: expected a 3-D array (T, B, input_size), got shape {x.shape}")
    lens = _checks.lengths(lengths, x.shape[0], x.shape[1])
    cell_clip = _checks.cell_clip(cell_clip, cell)
    # As arrays before the overlap check, which sees memory only through them (a CPU torch tensor too).
    weight_ih, weight_hh = _checks.as_array("weight_ih", weight_ih), _checks.as_array("weight_hh", weight_hh)
    bias_ih, bias_hh, weight_hr = (_as_optional("bias_ih", bias_ih), _as_optional("bias_hh", bias_hh),
                                   _as_optional("weight_hr", weight_hr))
    h0, c0 = _as_optional("h0", h0), _as_optional("c0", c0)
    _checks.apart(dict(out=out), dict(x=x, weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih,
                                      bias_hh=bias_hh, h0=h0, c0=c0, weight_hr=weight_hr))
    if check_finite:
        for name, value in (("x", x), ("h0", h0), ("c0", c0)):
            if value is not None:
                _checks.finite(name, value)
    return _forward(cell, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lens, reverse, training, out,
                    cell_clip, weight_hr)


def _forward_on_device(cell, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, reverse, training, out,
                       check_finite, cell_clip, weight_hr) -> LayerOutput:
    from . import _cuda_layer
    lib = _cuda_layer.library_of(x)
    if len(x.shape) != 3:
        raise ValueError(f"x: expected a 3-D array (T, B, input_size), got shape {tuple(x.shape)}")
    lens = _checks.lengths(lengths, x.shape[0], x.shape[1])  # checked on the host, copied over by the call
    cell_clip = _checks.cell_clip(cell_clip, cell)
    for name, w in (("weight_ih", weight_ih), ("weight_hh", weight_hh), ("weight_hr", weight_hr)):
        if (w is not None or name != "weight_hr") and len(getattr(w, "shape", ())) != 2:
            got = f"shape {tuple(w.shape)}" if hasattr(w, "shape") else type(w).__name__
            raise ValueError(f"{name}: expected a 2-D array, got {got}")
    _checks.apart(dict(out=out), dict(x=x, weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih,
                                      bias_hh=bias_hh, h0=h0, c0=c0, weight_hr=weight_hr))
    if check_finite:
        for name, value in (("x", x), ("h0", h0), ("c0", c0)):
            if value is not None:
                _checks.finite(name, lib.adopt(value))
    return _forward(cell, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lens, reverse, training, out,
                    cell_clip, weight_hr)


def _forward(cell, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, reverse, training, out,
             cell_clip, weight_hr=None, backend="cpu") -> LayerOutput:
    """layer_forward on arguments its checks have passed: x a 3-D ndarray, lengths int64 (B,) or None
    (from _checks.lengths), cell_clip from _checks.cell_clip. The core still checks shapes and dtypes
    (and weight_hr against the cell). `backend` "emulated_device" runs the CUDA backend's device code on
    the host (tests); the tape's backward runs on the backend its forward ran on. Device arrays go to
    the CUDA backend."""
    if _device.is_cuda(x):
        from . import _cuda_layer
        return LayerOutput(*_cuda_layer.forward(cell, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths,
                                                reverse, training, out, cell_clip, weight_hr=weight_hr))
    return LayerOutput(*_core.layer_forward(cell, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0,
                                            lengths, reverse, training, out, cell_clip, backend=backend,
                                            weight_hr=weight_hr))


def _forward_directions(cell, x, weights, h0, c0, lengths, training, out, cell_clip) -> list:
    """Both directions of a bidirectional layer on the CPU backend, as _forward on each (direction 1
    reversed) but in one core call, which may run them at once: x a NumPy array; weights, h0, c0 and
    out one per direction (weights in LayerWeights order: weight_ih, weight_hh, bias_ih, bias_hh,
    weight_hr)."""
    results = _core.layer_forward_directions(cell, x, [tuple(w) for w in weights], list(h0), list(c0), lengths,
                                             training, list(out), cell_clip)
    return [LayerOutput(*r) for r in results]


def layer_backward(tape: _core.Tape, dy=None, dh_n=None, dc_n=None, *, dx=None, grads=None,
                   grad_groups: int = 1, check_finite: bool = True) -> LayerGrads:
    """Backpropagation through time for one `layer_forward(..., training=True)`.

    dy (T, B, R), dh_n (B, R) and dc_n (B, H) are the gradients of the outputs (None: zero); NaN or
    infinity in them raises ValueError unless check_finite=False. dx and the arrays in `grads` (a
    LayerGrads-like object with weight_ih, weight_hh, bias_ih, bias_hh and, with a projection,
    weight_hr; the biases None for a layer without them) are accumulated into when given, and created
    otherwise; none of them may share memory with an array the call reads, the forward's x and weights
    included. Every array must be on the tape's device. The result's dh_norm[t] is the L2 norm over
    the valid rows and hidden features of the total gradient reaching h_t (dy_t plus what flows back
    from later steps): the gradient-flow profile of this direction.

    `grad_groups` Q > 1: the batch's rows form Q consecutive groups of B/Q rows, and the
    weight and bias gradients of each group come apart, with a leading dimension Q (weight_ih
    (Q, G*H, I), bias_ih (Q, G*H), ...; buffers in `grads` of those shapes, C-contiguous): Q = B gives
    per-sample gradients in one call. dx, dh0 and dc0 are as without."""
    from ._cuda_layer import CudaTape
    on_device = isinstance(tape, CudaTape)
    if not on_device and not isinstance(tape, _core.Tape):
        raise TypeError(f"tape: expected the tape returned by layer_forward(training=True), got "
                        f"{type(tape).__name__}")
    grad_groups = _checks.positive_int("grad_groups", grad_groups)
    check_finite = _checks.flag("check_finite", check_finite)
    batch = tape.shape[1]
    if batch % grad_groups:
        raise ValueError(f"grad_groups: expected a divisor of the batch ({batch}), got {grad_groups}")
    grad_names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    if grads is not None and not all(hasattr(grads, name) for name in grad_names):
        raise TypeError(f"grads: expected an object with the attributes {', '.join(grad_names)} (and weight_hr "
                        f"with a projection), such as a LayerGrads, got {type(grads).__name__}")
    written = {"dx": dx}
    if grads is not None:
        written.update({f"grads.{name}": getattr(grads, name) for name in (*grad_names, "weight_hr")
                        if getattr(grads, name, None) is not None})
    inputs = tape.arrays if on_device else tape.inputs  # the forward's x and weights, by their names
    # The tape's device first: every array of the call must be there.
    _device.common_device(**{"the tape": inputs["x"]}, dy=dy, dh_n=dh_n, dc_n=dc_n, **written)
    if not on_device:
        dy, dh_n, dc_n = _as_optional("dy", dy), _as_optional("dh_n", dh_n), _as_optional("dc_n", dc_n)
    if check_finite:
        for name, value in (("dy", dy), ("dh_n", dh_n), ("dc_n", dc_n)):
            if value is not None:
                _checks.finite(name, value)
    if any(a is not None for a in written.values()):
        read = dict(dy=dy, dh_n=dh_n, dc_n=dc_n, **{f"the forward's {n}": a for n, a in inputs.items()})
        _checks.apart(written, read)
    return _backward(tape, dy, dh_n, dc_n, dx, grads, grad_groups)


def _backward(tape, dy, dh_n, dc_n, dx=None, grads=None, grad_groups: int = 1) -> LayerGrads:
    """layer_backward on a tape known to be one; the rest as layer_backward takes it."""
    if not isinstance(tape, _core.Tape):  # a CudaTape, told apart without importing _cuda_layer each call
        from . import _cuda_layer
        return LayerGrads(*_cuda_layer.backward(tape, dy, dh_n, dc_n, dx,
                                                None if grads is None else (grads.weight_ih, grads.weight_hh,
                                                                            grads.bias_ih, grads.bias_hh,
                                                                            getattr(grads, "weight_hr", None)),
                                                grad_groups))
    accumulate_dx, accumulate_grads = dx is not None, grads is not None
    dx = _dx_buffer(tape) if dx is None else dx
    grads = _grad_buffers(tape, groups=grad_groups) if grads is None else grads
    weight_hr = getattr(grads, "weight_hr", None)
    dh0, dc0, dh_norm = _core.layer_backward(tape, dy, dh_n, dc_n, dx, grads.weight_ih, grads.weight_hh,
                                             grads.bias_ih, grads.bias_hh, accumulate_dx, weight_hr,
                                             accumulate_grads, grad_groups)
    return LayerGrads(dx, dh0, dc0, grads.weight_ih, grads.weight_hh, grads.bias_ih, grads.bias_hh,
                      dh_norm, weight_hr)


def _backward_directions(tapes, dy, dh_n, dc_n, grads, grad_groups: int = 1) -> list:
    """Backward of _forward_directions: tapes, dy, dh_n, dc_n and grads (LayerGrads-like or None) one per
    direction. One dx for both, written by the first direction and added into by the second; returns
    each direction's LayerGrads (the same dx in both). `grad_groups` as in layer_backward."""
    dx = _dx_buffer(tapes[0])
    accumulate_grads = any(g is not None for g in grads)  # else both directions' are written, not added to
    grads = [_grad_buffers(t, zeroed=accumulate_grads, groups=grad_groups) if g is None else g
             for t, g in zip(tapes, grads)]
    in_order = [(g.weight_ih, g.weight_hh, g.bias_ih, g.bias_hh, getattr(g, "weight_hr", None)) for g in grads]
    results = _core.layer_backward_directions(list(tapes), list(dy), list(dh_n), list(dc_n), dx, in_order, False,
                                              accumulate_grads, grad_groups)
    return [LayerGrads(dx, dh0, dc0, g.weight_ih, g.weight_hh, g.bias_ih, g.bias_hh, dh_norm, w[4])
            for (dh0, dc0, dh_norm), g, w in zip(results, grads, in_order)]


def _dx_buffer(tape):
    steps, batch, inp, _ = tape.shape
    return np.empty((steps, batch, inp), tape.dtype)  # written, not added to: no clearing pass


def _grad_buffers(tape, zeroed: bool = False, groups: int = 1) -> LayerGrads:
    """Weight and bias gradients for the layer direction of `tape`: uninitialised, for a backward that
    writes them (accumulate_grads=False: a memset of the weights' size saved), or zeroed; with a
    leading dimension of `groups` where it is more than one (layer_backward's grad_groups)."""
    _, _, inp, hidden = tape.shape
    proj = tape.proj_size
    dtype = tape.dtype
    gh = GATES[tape.cell] * hidden
    lead = (groups,) if groups > 1 else ()
    new = np.zeros if zeroed else np.empty
    bias = (new((*lead, gh), dtype), new((*lead, gh), dtype)) if tape.has_bias else (None, None)
    return LayerGrads(None, None, None, new((*lead, gh, inp), dtype), new((*lead, gh, proj or hidden), dtype), *bias,
                      None, new((*lead, proj, hidden), dtype) if proj else None)


def _as_optional(name: str, value):
    return None if value is None else _checks.as_array(name, value)
