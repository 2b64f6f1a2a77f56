"""The layer-stack driver: layers of one or two directions over the one-direction core calls, forward
and backward, for the NumPy modules and the torch adapter alike.

A stack has L layers of D directions (D = 2 when bidirectional, direction 1 running in reverse).

- States h0, h_n and their gradients are (L*D, B, R), c0 and c_n (L*D, B, H), with R the width of h:
  H, or P for an LSTM with a projection (proj_size). Layer l's directions are the rows
  `layer_rows(l, D)`, direction d of them at row l*D + d.
- A layer's output y is (T, B, D*R): direction d writes the features `direction(y, d, R)`, that is
  d*R:(d+1)*R; the next layer reads all of them as its input.
- Weights: `weights[l][d]` is a LayerWeights (or a tuple in its order, weight_hr left off when there is
  none) in torch.nn's layout, the biases None without bias.
- Dropout (training only) multiplies every layer's output but the last; how the mask is drawn is the
  caller's (its own random generator, or torch's).

Nothing here checks its arguments: every entry point (modules, functional, torch operators) checks
each argument once, with the rules in _checks, and passes the checked values on (lengths as int64 (B,)
or None, cell_clip from _checks.cell_clip, finite inputs). Sequence-major (T, B, ...) throughout;
batch_first and unbatched inputs are the caller's business.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np

from . import _core, _device
from .functional import GATES, LayerGrads, _backward, _backward_directions, _forward, _forward_directions, has_cell_state


class LayerWeights(NamedTuple):
    """One layer direction's weights (or their gradients), torch.nn's names and shapes."""

    weight_ih: np.ndarray            # (G*H, I)
    weight_hh: np.ndarray            # (G*H, R)
    bias_ih: Optional[np.ndarray]    # (G*H,), None without bias
    bias_hh: Optional[np.ndarray]
    weight_hr: Optional[np.ndarray] = None  # (P, H) with a projection, else None


def state_size(weights) -> int:
    """R, the width of a layer's hidden state and of each direction's output: weight_hh's columns."""
    return weights[1].shape[1]


def layer_rows(layer: int, num_directions: int) -> slice:
    """The rows of layer `layer`'s directions in an (L*D, B, H) state array."""
    return slice(layer * num_directions, (layer + 1) * num_directions)


_weight_names: dict = {}


def weight_names(num_layers: int, bidirectional: bool) -> tuple:
    """torch.nn's parameter names of each layer and direction, [layer][direction] -> a name per
    LayerWeights field, formatted once per configuration (a one-step call would spend microseconds on
    them). A plain dict rather than functools.lru_cache, which torch.compile warns about."""
    key = (num_layers, bidirectional)
    names = _weight_names.get(key)
    if names is None:
        suffixes = ("", "_reverse") if bidirectional else ("",)
        names = _weight_names[key] = tuple(
            tuple(tuple(f"{n}_l{layer}{suffix}" for n in LayerWeights._fields) for suffix in suffixes)
            for layer in range(num_layers))
    return names


def weight_shapes(cell: str, input_size: int, hidden_size: int, num_layers: int, bidirectional: bool,
                  bias: bool, proj_size: int = 0):
    """(name, shape) of every parameter of a stack as torch.nn lays it out, layer by layer."""
    gh = GATES[cell] * hidden_size
    state = proj_size or hidden_size
    for layer, directions in enumerate(weight_names(num_layers, bidirectional)):
        layer_input = input_size if layer == 0 else state * (2 if bidirectional else 1)
        shapes = LayerWeights((gh, layer_input), (gh, state), (gh,) if bias else None, (gh,) if bias else None,
                              (proj_size, hidden_size) if proj_size else None)
        for names in directions:
            yield from ((name, shape) for name, shape in zip(names, shapes) if shape is not None)


def direction(a, d: int, width: int):
    """Direction d's (T, B, R) view of a layer's (T, B, D*R) output or its gradient (None: None); the
    array itself where it holds one direction."""
    if a is None or a.shape[2] == width:
        return a
    return a[:, :, d * width:(d + 1) * width]


def _at(a, index):
    return None if a is None else a[index]


def over_layers(run_layer: Callable, x, h0=None, c0=None, *, num_layers: int, num_directions: int,
                between: Callable | None = None):
    """The loop over a stack's layers, for any array type (NumPy arrays, torch tensors).

    `run_layer(layer, x, h0_l, c0_l)` runs one layer on its input x with its rows of h0 and c0 ((D, B, R)
    and (D, B, H), or None where the state is absent) and returns (y, h_n_l, c_n_l). `between(layer, y)`,
    when given, transforms each output but the last layer's before the next layer reads it (dropout).
    Returns the last layer's y and the lists of each layer's h_n_l and c_n_l, in layer order."""
    h_n, c_n = [], []
    for layer in range(num_layers):
        if num_layers == 1:  # the whole state: no view to make
            x, h, c = run_layer(layer, x, h0, c0)
        else:
            rows = layer_rows(layer, num_directions)
            x, h, c = run_layer(layer, x, _at(h0, rows), _at(c0, rows))
        h_n.append(h)
        c_n.append(c)
        if between is not None and layer < num_layers - 1:
            x = between(layer, x)
    return x, h_n, c_n


def forward_layer(cell: str, x, weights, h0=None, c0=None, *, lengths=None, training: bool, y, h_n,
                  c_n=None, cell_clip=None, backend: str = "cpu") -> list:
    """One layer, every direction: x (T, B, I); weights, one LayerWeights per direction; h0 (D, B, R)
    and c0 (D, B, H) or None. Writes y (T, B, D*R), h_n (D, B, R) and c_n (D, B, H; only for a cell with
    a cell state) and returns each direction's tape (None when not training). `backend`: the core's
    backend for NumPy arrays (functional._forward)."""
    x = _device.ascontiguous(x)  # every direction reads one contiguous host copy at most
    width = y.shape[2] // len(weights)
    weights = [w if isinstance(w, LayerWeights) else LayerWeights(*w) for w in weights]
    dirs = range(len(weights))
    if len(weights) == 2 and backend == "cpu" and not _device.is_cuda(x):
        outs = _forward_directions(cell, x, weights, [_at(h0, d) for d in dirs], [_at(c0, d) for d in dirs],
                                   lengths, training, [direction(y, d, width) for d in dirs], cell_clip)
    else:
        outs = [_forward(cell, x, w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh, _at(h0, d), _at(c0, d),
                         lengths, d == 1, training, direction(y, d, width), cell_clip, w.weight_hr, backend)
                for d, w in enumerate(weights)]
    for d, out in enumerate(outs):
        h_n[d] = out.h_n
        if c_n is not None:
            c_n[d] = out.c_n
    return [out.tape for out in outs]


def backward_layer(tapes: list, dy=None, dh_n=None, dc_n=None, *, dh0, dc0=None, dh_norm=None,
                   grads=None, grad_groups: int = 1):
    """Backward of one forward_layer(training=True): dy (T, B, D*R), dh_n (D, B, R) and dc_n (D, B, H)
    or None (zero). Writes dh0 (D, B, R), dc0 (D, B, H; only for a cell with a cell state) and dh_norm
    (D, T) when given. `grads[d]` (a LayerWeights of gradients) is added into for direction d; without
    it each direction's are created. `grad_groups` as in functional.layer_backward. Returns (dx (T, B, I),
    [LayerGrads of each direction])."""
    width = tapes[0].proj_size or tapes[0].shape[3]
    intos = [None] * len(tapes)
    if grads is not None:
        for d in range(len(tapes)):
            g = LayerWeights(*grads[d])
            intos[d] = LayerGrads(None, None, None, g.weight_ih, g.weight_hh, g.bias_ih, g.bias_hh,
                                  weight_hr=g.weight_hr)
    if len(tapes) == 2 and all(isinstance(t, _core.Tape) and t.backend == "cpu" for t in tapes):
        results = _backward_directions(tapes, [direction(dy, d, width) for d in (0, 1)],
                                       [_at(dh_n, d) for d in (0, 1)], [_at(dc_n, d) for d in (0, 1)], intos,
                                       grad_groups)
    else:
        dx = None  # the first direction's backward writes it, the second adds into it
        results = []
        for d, tape in enumerate(tapes):
            results.append(_backward(tape, direction(dy, d, width), _at(dh_n, d), _at(dc_n, d), dx, intos[d],
                                     grad_groups))
            dx = results[-1].dx
    for d, g in enumerate(results):
        dh0[d] = g.dh0
        if dc0 is not None:
            dc0[d] = g.dc0
        if dh_norm is not None:
            dh_norm[d] = g.dh_norm
    return results[-1].dx, results


class StackOutput(NamedTuple):
    y: np.ndarray              # (T, B, D*R), the last layer's output
    h_n: np.ndarray            # (L*D, B, R)
    c_n: np.ndarray | None     # (L*D, B, H) for a cell with a cell state, else None
    tapes: list                # tapes[layer][direction]; None entries when not training
    dropout_masks: list        # the mask applied to layer l's output (l < L-1), or None


class StackGrads(NamedTuple):
    dx: np.ndarray             # (T, B, I)
    dh0: np.ndarray            # (L*D, B, R)
    dc0: np.ndarray | None     # (L*D, B, H) for a cell with a cell state, else None
    dh_norm: np.ndarray        # (L*D, T) float64: each layer direction's gradient norms, time order
    weight_grads: list | None = None  # [layer][direction] LayerGrads, where backward made them (grads=None)


def forward(cell: str, x: np.ndarray, weights, h0=None, c0=None, *, lengths=None, training: bool = True,
            cell_clip=None, dropout: Callable | None = None, backend: str = "cpu") -> StackOutput:
    """The whole stack on NumPy arrays (or CUDA arrays, on the CUDA backend): x (T, B, I); weights[layer][direction]; h0 (L*D, B, R) and c0
    (L*D, B, H) or None. `dropout(shape)`, when given, draws the mask that multiplies each layer's
    output but the last. Each layer's output is 64-byte aligned, so ranks sharing a row write separate
    cache lines."""
    steps, batch, _ = x.shape
    num_layers, dirs = len(weights), len(weights[0])
    first = LayerWeights(*weights[0][0])
    width = state_size(first)
    hidden = width if first.weight_hr is None else first.weight_hr.shape[1]
    h_n = _device.empty(x, (num_layers * dirs, batch, width))
    c_n = _device.empty(x, (num_layers * dirs, batch, hidden)) if has_cell_state(cell) else None
    tapes, masks = [], [None] * (num_layers - 1)

    def run_layer(layer, layer_input, h0_l, c0_l):
        rows = layer_rows(layer, dirs)
        y = _device.empty(x, (steps, batch, dirs * width), aligned=True)
        tapes.append(forward_layer(cell, layer_input, weights[layer], h0_l, c0_l, lengths=lengths,
                                   training=training, y=y, h_n=h_n[rows], c_n=_at(c_n, rows),
                                   cell_clip=cell_clip, backend=backend))
        return y, None, None

    def drop(layer, y):
        masks[layer] = dropout(y.shape)
        return y * masks[layer]

    y, _, _ = over_layers(run_layer, x, h0, c0, num_layers=num_layers, num_directions=dirs,
                          between=None if dropout is None else drop)
    return StackOutput(y, h_n, c_n, tapes, masks)


def _tape_input(tape):
    """An array of the tape's dtype on its device, for new arrays beside it."""
    return tape.arrays["x"] if hasattr(tape, "arrays") else np.empty(0, tape.dtype)


def backward(tapes: list, dy=None, dh_n=None, dc_n=None, *, dropout_masks, grads,
             grad_groups: int = 1) -> StackGrads:
    """Backward of forward(training=True) on its tapes and dropout masks: dy (T, B, D*R), dh_n (L*D, B, R)
    and dc_n (L*D, B, H) or None (zero). `grads[layer][direction]` (LayerWeights of gradients) are added
    into, or with grads=None written into new arrays, returned as weight_grads; `grad_groups` as in
    functional.layer_backward (the gradients then (Q, ...))."""
    num_layers, dirs = len(tapes), len(tapes[0])
    first = tapes[0][0]
    steps, batch, _, hidden = first.shape
    like = _tape_input(first)
    dh0 = _device.empty(like, (num_layers * dirs, batch, first.proj_size or hidden))
    dc0 = _device.empty(like, (num_layers * dirs, batch, hidden)) if has_cell_state(first.cell) else None
    dh_norm = _device.empty(like, (num_layers * dirs, steps), "float64")
    grad_out = dy
    made = [None] * num_layers
    for layer in reversed(range(num_layers)):
        rows = layer_rows(layer, dirs)
        dx, made[layer] = backward_layer(tapes[layer], grad_out, _at(dh_n, rows), _at(dc_n, rows), dh0=dh0[rows],
                                         dc0=_at(dc0, rows), dh_norm=dh_norm[rows],
                                         grads=None if grads is None else grads[layer], grad_groups=grad_groups)
        if layer > 0 and dropout_masks[layer - 1] is not None:
            dx *= dropout_masks[layer - 1]
        grad_out = dx
    return StackGrads(grad_out, dh0, dc0, dh_norm, made if grads is None else None)
