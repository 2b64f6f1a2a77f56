"""The fused layer as torch operators: `fusedrnn::rnn_layer` (one layer, every direction) and its
backward `fusedrnn::rnn_layer_backward`, registered with torch.library so that autograd,
torch.compile and torch.export see them as single opaque operators with known output shapes.

CPU tensors reach the core as NumPy views of their memory (`.detach().numpy()`, no copy); outputs are
tensors over the arrays the core writes. CUDA tensors go to the CUDA backend as they are (detached),
on torch's current stream, and the outputs are CUDA tensors allocated by torch. The directions of a layer run through the layer-stack driver
(fusedrnn._stack), as the NumPy modules' do; the loop over layers is the torch modules'.

What a forward records for backward (the core's tapes) is not a tensor, so the forward returns a
0-d int64 "tape handle" tensor instead. Its storage is a small NumPy array that also holds the tapes:
torch keeps that array alive exactly as long as any tensor shares the storage, so the tapes live as
long as autograd (eager or compiled) keeps the handle for backward, and no longer.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils import _python_dispatch

from .. import _checks, _device, _stack
from ..functional import has_cell_state


class _TapeArray(np.ndarray):
    """A 0-d int64 array (the handle's key) that carries the tapes of one layer call."""

    tapes: list


_live_tapes: "weakref.WeakValueDictionary[int, _TapeArray]" = weakref.WeakValueDictionary()
_tape_keys = itertools.count(1)
_NO_TAPE = 0


def _tape_handle(tapes) -> Tensor:
    key = next(_tape_keys)
    holder = np.array(key, np.int64).view(_TapeArray)
    holder.tapes = tapes
    _live_tapes[key] = holder
    return torch.from_numpy(holder)  # the tensor's storage holds a reference to `holder`


def _tapes_of(handle: Tensor) -> list:
    holder = _live_tapes.get(int(handle))
    if holder is None:
        raise RuntimeError("fusedrnn::rnn_layer_backward: this forward recorded nothing for backward "
                           "(it ran with record=False, or its tape handle was freed)")
    return holder.tapes


def _array(t: Optional[Tensor]):
    """What the layer-stack driver takes for a tensor: a NumPy view of a CPU tensor, a CUDA tensor as it
    is (detached)."""
    if t is None:
        return None
    return t.detach() if t.is_cuda else t.detach().numpy()


def _tensor(a) -> Tensor:
    return a if isinstance(a, Tensor) else torch.from_numpy(a)


def _empty(like: Tensor, shape) -> Tuple[Tensor, object]:
    """An uninitialised tensor of `shape` beside `like`, and what the layer-stack driver writes it
    through (_array of it). From torch's allocator, not over a NumPy array (see bench/NOTES.md, "The
    per-call Python")."""
    t = like.new_empty(shape)
    return t, _array(t)


# The weights of a layer as separate operator arguments, each direction's torch.nn parameters in
# _stack.LayerWeights' order: the reverse direction's None when the layer is unidirectional, the biases
# None without bias, weight_hr None without a projection. (Separate tensors rather than a Tensor[]
# argument: torch's autograd wrapper flattens and rebuilds list arguments on every call.)
PARAMETERS = _stack.LayerWeights._fields
WEIGHT_SLOTS = PARAMETERS + tuple(f"{name}_reverse" for name in PARAMETERS)
SLOTS_PER_DIRECTION = len(PARAMETERS)


def _by_direction(weights):
    """The LayerWeights (arrays) of each direction present, as the driver takes them."""
    return [_stack.LayerWeights(*(_array(t) for t in weights[d:d + SLOTS_PER_DIRECTION]))
            for d in range(0, len(WEIGHT_SLOTS), SLOTS_PER_DIRECTION) if weights[d] is not None]


def _state_shapes(x, weight_hh, weight_hr, weight_ih_reverse, cell):
    """(y, h_n, c_n) shapes of a layer call; c_n is empty unless the cell has a cell state. h has
    weight_hh's columns (hidden_size, or proj_size with a projection), c hidden_size."""
    steps, batch, _ = x.shape
    dirs, width = 1 if weight_ih_reverse is None else 2, weight_hh.shape[1]
    hidden = width if weight_hr is None else weight_hr.shape[1]
    cell_state = (dirs, batch, hidden) if has_cell_state(_checks.cell(cell)) else (0,)
    return (steps, batch, dirs * width), (dirs, batch, width), cell_state


def _layer(x: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
           bias_hh: Optional[Tensor], weight_hr: Optional[Tensor], weight_ih_reverse: Optional[Tensor],
           weight_hh_reverse: Optional[Tensor], bias_ih_reverse: Optional[Tensor],
           bias_hh_reverse: Optional[Tensor], weight_hr_reverse: Optional[Tensor], h0: Optional[Tensor],
           c0: Optional[Tensor], lengths: Optional[Tensor], cell: str, record: bool,
           check_finite: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One recurrent layer over a sequence, every direction given weights.

    x (T, B, I) sequence-major; weights in torch.nn's layout (see WEIGHT_SLOTS; weight_hr (P, H) for an
    LSTM with a projection); h0 (D, B, R), c0 (D, B, H) or None (zeros), R = P with a projection, else
    H; lengths (B,) integers in [1, T] or None (all T). Returns y (T, B, D*R) (zero past each row's
    length), h_n (D, B, R), c_n (D, B, H) for a cell with a cell state and an empty tensor otherwise,
    and a tape handle for rnn_layer_backward (meaningful when `record`). `check_finite` rejects NaN/inf
    in x, h0 and c0 with a ValueError."""
    weights = (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
               weight_ih_reverse, weight_hh_reverse, bias_ih_reverse, bias_hh_reverse, weight_hr_reverse)
    if not all(t is None or t.is_cpu for t in (x, *weights, h0, c0)):  # the common case, checked first
        _device.common_device(input=x, **dict(zip(WEIGHT_SLOTS, weights)), h_0=h0, c_0=c0)
    xa, h0a, c0a = _array(x), _array(h0), _array(c0)
    if check_finite:
        for name, a in (("input", xa), ("h_0", h0a), ("c_0", c0a)):
            if a is not None:
                _checks.finite(name, a)
    (y, ya), (h_n, h_na), (c_n, c_na) = (_empty(x, shape)
                                         for shape in _state_shapes(x, weight_hh, weight_hr, weight_ih_reverse, cell))
    lens = _checks.lengths(None if lengths is None else lengths.detach().cpu().numpy(), x.shape[0], x.shape[1])
    tapes = _stack.forward_layer(cell, xa, _by_direction(weights), h0a, c0a, lengths=lens, training=record, y=ya,
                                 h_n=h_na, c_n=c_na if has_cell_state(cell) else None)
    handle = _tape_handle(tapes) if record else torch.full((), _NO_TAPE, dtype=torch.int64)
    return y, h_n, c_n, handle


rnn_layer = torch.library.custom_op("fusedrnn::rnn_layer", mutates_args=(), device_types=("cpu", "cuda"))(_layer)


@rnn_layer.register_fake
def _(x, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, weight_ih_reverse, weight_hh_reverse,
      bias_ih_reverse, bias_hh_reverse, weight_hr_reverse, h0, c0, lengths, cell, record, check_finite):
    shapes = _state_shapes(x, weight_hh, weight_hr, weight_ih_reverse, cell)
    return (*(x.new_empty(shape) for shape in shapes),
            torch.empty((), dtype=torch.int64))  # the tape handle lives on the host whatever x's device


def _layer_backward(tape: Tensor, x: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                    bias_ih: Optional[Tensor], bias_hh: Optional[Tensor], weight_hr: Optional[Tensor],
                    weight_ih_reverse: Optional[Tensor], weight_hh_reverse: Optional[Tensor],
                    bias_ih_reverse: Optional[Tensor], bias_hh_reverse: Optional[Tensor],
                    weight_hr_reverse: Optional[Tensor], dy: Optional[Tensor], dh_n: Optional[Tensor],
                    dc_n: Optional[Tensor], cell: str) -> Tuple[(Tensor,) * (3 + len(WEIGHT_SLOTS))]:
    """Backpropagation through time for one `rnn_layer(..., record=True)`, whose x and weights are
    passed again for the shapes of the gradients. dy (T, B, D*R), dh_n (D, B, R), dc_n (D, B, H) or
    None (zero). Returns dx, dh0, dc0 and the gradient of each weight slot; dc0 and the gradients of
    absent weights are empty tensors."""
    tapes = _tapes_of(tape)
    _, state, cell_state = _state_shapes(x, weight_hh, weight_hr, weight_ih_reverse, cell)
    (dh0, dh0a), (dc0, dc0a) = _empty(x, state), _empty(x, cell_state)
    dx, per_direction = _stack.backward_layer(tapes, _array(dy), _array(dh_n), _array(dc_n), dh0=dh0a,
                                              dc0=dc0a if has_cell_state(cell) else None)
    grads = [None] * len(WEIGHT_SLOTS)
    for d, g in enumerate(per_direction):
        for k, value in enumerate(getattr(g, name) for name in PARAMETERS):
            if value is not None:
                grads[d * SLOTS_PER_DIRECTION + k] = _tensor(value)
    # Distinct empty tensors for the absent weights: outputs may not alias.
    return (_tensor(dx), dh0, dc0, *(x.new_empty(0) if g is None else g for g in grads))


rnn_layer_backward = torch.library.custom_op("fusedrnn::rnn_layer_backward", mutates_args=(),
                                             device_types=("cpu", "cuda"))(_layer_backward)


@rnn_layer_backward.register_fake
def _(tape, x, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, weight_ih_reverse, weight_hh_reverse,
      bias_ih_reverse, bias_hh_reverse, weight_hr_reverse, dy, dh_n, dc_n, cell):
    weights = (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
               weight_ih_reverse, weight_hh_reverse, bias_ih_reverse, bias_hh_reverse, weight_hr_reverse)
    _, state, cell_state = _state_shapes(x, weight_hh, weight_hr, weight_ih_reverse, cell)
    return (x.new_empty(x.shape), x.new_empty(state), x.new_empty(cell_state),
            *(x.new_empty(0) if w is None else w.new_empty(w.shape) for w in weights))


_WEIGHTS_AT = slice(1, 1 + len(WEIGHT_SLOTS))  # where the weights sit among rnn_layer's arguments


def _setup_context(ctx, inputs, output):
    x, weights = inputs[0], inputs[_WEIGHTS_AT]
    h0, c0, _lengths, cell, _record, _check = inputs[_WEIGHTS_AT.stop:]
    ctx.cell, ctx.has_h0, ctx.has_c0 = cell, h0 is not None, c0 is not None
    ctx.present = [w is not None for w in weights]
    # Saved (not only referenced by the tape) so that autograd rejects an in-place change before backward.
    ctx.save_for_backward(output[3], x, *(w for w in weights if w is not None))
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no zero arrays


def _backward(ctx, dy, dh_n, dc_n, _dtape):
    tape, x, *saved = ctx.saved_tensors
    present = iter(saved)
    weights = [next(present) if here else None for here in ctx.present]
    if dc_n is not None and dc_n.numel() == 0:
        dc_n = None
    # The operator where anything traces this backward or records it (create_graph: its own formula
    # refuses double backward); its function directly otherwise, as for the forward.
    backward = _layer_backward if _eager(x) and not torch.is_grad_enabled() else rnn_layer_backward
    dx, dh0, dc0, *grads = backward(tape, x, *weights, dy, dh_n, dc_n, ctx.cell)
    return (dx, *(g if here else None for g, here in zip(grads, ctx.present)),
            dh0 if ctx.has_h0 else None, dc0 if ctx.has_c0 else None, None, None, None, None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fusedrnn: double backward (gradients of gradients) through the fused "
                       "recurrent layer is not supported")


def _setup_nothing(ctx, inputs, output):
    pass


rnn_layer.register_autograd(_backward, setup_context=_setup_context)
rnn_layer_backward.register_autograd(_no_double_backward, setup_context=_setup_nothing)


def _eager(x: Tensor) -> bool:
    """Whether a call on x runs as it is, with nothing tracing it (torch.compile, torch.export,
    torch.jit.trace, a dispatch mode such as make_fx's) or transforming it (torch.func), so that the
    operator's function can be called without the dispatcher (~20 us a call, more than a one-step
    layer's compute)."""
    return (type(x) is Tensor and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and _python_dispatch._get_current_dispatch_mode() is None
            and not torch._C._are_functorch_transforms_active())


class _RecordedLayer(torch.autograd.Function):
    """rnn_layer with the autograd formula registered on it above. torch's autograd wrapper of a custom
    operator binds every argument to the schema again on each call that records, at a cost that grows
    with the square of the argument count (~50 us for these 17, more than a short layer's compute);
    Function.apply skips it. The context is set up inside forward rather than by a separate
    setup_context, which apply would pay for with an inspect.signature binding on every call."""

    @staticmethod
    def forward(ctx, *args):
        output = _layer(*args)
        _setup_context(ctx, args, output)
        return output

    backward = staticmethod(_backward)


def call_layer(*args):
    """rnn_layer(*args): eager calls straight to the operator's function, through _RecordedLayer where
    they record for backward; traced and transformed code sees the operator itself."""
    if not _eager(args[0]):
        return rnn_layer(*args)
    record = args[-2]  # rnn_layer's arguments end (..., cell, record, check_finite)
    return _RecordedLayer.apply(*args) if record else _layer(*args)
