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
from torch.autograd import forward_ad as _forward_ad
from torch.utils import _python_dispatch

from .. import _checks, _device, _stack
from ..functional import has_cell_state


class _TapeArray(np.ndarray):
    """A 0-d int64 array (the handle's key) that carries the tapes of one layer call, and, for a call
    that ran a vmap's slices as one batch, which vmap that was (_merged_forward)."""

    tapes: list
    merged_slices: Optional[tuple] = None


_live_tapes: "weakref.WeakValueDictionary[int, _TapeArray]" = weakref.WeakValueDictionary()
_tape_keys = itertools.count(1)
_NO_TAPE = 0
_UNDER_NESTED_VMAP = -1  # see _stacked_handles


def _tape_handle(tapes) -> Tensor:
    key = next(_tape_keys)
    holder = np.array(key, np.int64).view(_TapeArray)
    holder.tapes = tapes
    _live_tapes[key] = holder
    return torch.from_numpy(holder)  # the tensor's storage holds a reference to `holder`


def _tapes_of(handle: Tensor) -> list:
    key = int(handle)
    if key == _UNDER_NESTED_VMAP:
        raise NotImplementedError("fusedrnn: backward through the fused recurrent layer under nested "
                                  "torch.func.vmap is not supported (one vmap level is)")
    holder = _live_tapes.get(key)
    if holder is None:
        raise RuntimeError("fusedrnn::rnn_layer_backward: this forward recorded nothing for backward "
                           "(it ran with record=False, or its tape handle was freed: saved-tensor hooks that "
                           "copy what autograd saves work in eager mode only, not under torch.compile)")
    return holder.tapes


def _array(t: Optional[Tensor]):
    """What the layer-stack driver takes for a tensor: a NumPy view of a CPU tensor, a CUDA tensor as it
    is (detached)."""
    if t is None:
        return None
    return t.detach() if t.is_cuda else t.numpy(force=True)  # force: detached (shares memory on the CPU)


SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_dtype(name: str, t: Tensor) -> None:
    """Float32 and float64 run; another floating dtype is one the kernels lack (NotImplementedError),
    anything else (integers, bool, complex) a wrong argument, as torch.nn has it."""
    if t.dtype not in SUPPORTED_DTYPES:
        error = NotImplementedError if t.dtype.is_floating_point else TypeError
        raise error(f"{name}: fusedrnn supports float32 and float64, got {t.dtype}")


def _plain_call(x: Tensor, tensors, weight_hh: Optional[Tensor] = None) -> bool:
    """x a 3-D float32 or float64 CPU tensor, weight_hh (where given) 2-D, and every tensor given (None
    skipped) on the CPU with x's dtype: the common case, told in one pass, with no need of
    _check_operands."""
    dtype = x.dtype
    if x.dim() != 3 or dtype not in SUPPORTED_DTYPES or (weight_hh is not None and weight_hh.dim() != 2):
        return False
    for t in tensors:
        if t is not None and (not t.is_cpu or t.dtype != dtype):
            return False
    return True


def _check_operands(x: Tensor, lengths: Optional[Tensor] = None, **named) -> None:
    """The operators' refusals that come before the kernels' own, each naming its argument: an input
    that is not a 3-D float32 or float64 tensor; a tensor (None skipped) of another dtype or on
    another device than the input; lengths elsewhere than on the input's device or the host (their
    values are checked with the call's, as NumPy values are). The fake
    implementations make them too: a meta tensor beside real ones would run those and return
    uninitialised tensors."""
    check_dtype("input", x)
    if x.dim() != 3:
        raise ValueError(f"input: expected a 3-D tensor (T, B, input_size), got shape {tuple(x.shape)}")
    for name, t in named.items():
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, but input is on {x.device}; every tensor of a call must "
                             "be on one device")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the input's), got {t.dtype}")
    weight_hh = named.get("weight_hh")
    if weight_hh is not None and weight_hh.dim() != 2:
        raise ValueError(f"weight_hh: expected a 2-D tensor (gates*hidden_size, hidden_size or proj_size), got "
                         f"shape {tuple(weight_hh.shape)}")
    if lengths is not None:
        if lengths.device not in (x.device, torch.device("cpu")):
            raise ValueError(f"lengths: on {lengths.device}, but input is on {x.device}; lengths may be on the "
                             "input's device or the host")


def _tensor(a) -> Tensor:
    return a if isinstance(a, Tensor) else torch.from_numpy(a)


def _empty(like: Tensor, shape) -> Tuple[Tensor, object]:
    """An uninitialised tensor of `shape` beside `like`, and what the layer-stack driver writes it
    through (_array of it). From torch's allocator, not over a NumPy array (see bench/NOTES.md, "The
    per-call Python")."""
    t = like.new_empty(*shape)  # the sizes as arguments: torch parses them faster than a tuple
    return t, _array(t)


# The weights of a layer as separate operator arguments, each direction's torch.nn parameters in
# _stack.LayerWeights' order: the reverse direction's None when the layer is unidirectional, the biases
# None without bias, weight_hr None without a projection. (Separate tensors rather than a Tensor[]
# argument: torch's autograd wrapper flattens and rebuilds list arguments on every call.)
PARAMETERS = _stack.LayerWeights._fields
WEIGHT_SLOTS = PARAMETERS + tuple(f"{name}_reverse" for name in PARAMETERS)
SLOTS_PER_DIRECTION = len(PARAMETERS)
_DIRECTION_STARTS = range(0, len(WEIGHT_SLOTS), SLOTS_PER_DIRECTION)


def _by_direction(weights):
    """The LayerWeights (arrays) of each direction present, as the driver takes them."""
    return [_stack.LayerWeights(*map(_array, weights[d:d + SLOTS_PER_DIRECTION]))
            for d in _DIRECTION_STARTS if weights[d] is not None]


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
    if _forward_ad._current_level >= 0:
        # torch's custom operators drop tangents without a word; no forward-mode formula is written here.
        raise NotImplementedError("fusedrnn: forward-mode AD (torch.func.jvp, jacfwd, hessian, "
                                  "torch.autograd.forward_ad) through the fused recurrent layer is not "
                                  "supported; reverse mode (backward, torch.func.grad, vjp, jacrev) is")
    weights = (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
               weight_ih_reverse, weight_hh_reverse, bias_ih_reverse, bias_hh_reverse, weight_hr_reverse)
    if not _plain_call(x, (*weights, h0, c0), weight_hh):
        _check_operands(x, lengths, **dict(zip(WEIGHT_SLOTS, weights)), h_0=h0, c_0=c0)
        _device.common_device(input=x)  # a device the kernels run on
    xa, h0a, c0a = _array(x), _array(h0), _array(c0)
    if check_finite:
        _checks.finite("input", xa)
        if h0a is not None:
            _checks.finite("h_0", h0a)
        if c0a is not None:
            _checks.finite("c_0", c0a)
    y_shape, state_shape, cell_shape = _state_shapes(x, weight_hh, weight_hr, weight_ih_reverse, cell)
    (y, ya), (h_n, h_na) = _empty(x, y_shape), _empty(x, state_shape)
    if has_cell_state(cell):
        c_n, c_na = _empty(x, cell_shape)
    else:
        c_n, c_na = x.new_empty(*cell_shape), None
    lens = None if lengths is None else _checks.lengths(_device.torch_values(lengths), x.shape[0], x.shape[1])
    tapes = _stack.forward_layer(cell, xa, _by_direction(weights), h0a, c0a, lengths=lens, training=record, y=ya,
                                 h_n=h_na, c_n=c_na)
    handle = _tape_handle(tapes) if record else torch.full((), _NO_TAPE, dtype=torch.int64)
    return y, h_n, c_n, handle


rnn_layer = torch.library.custom_op("fusedrnn::rnn_layer", mutates_args=(), device_types=("cpu", "cuda"))(_layer)
rnn_layer.__doc__ = _layer.__doc__  # the operator object's own is torch's generic text


@rnn_layer.register_fake
def _(x, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, weight_ih_reverse, weight_hh_reverse,
      bias_ih_reverse, bias_hh_reverse, weight_hr_reverse, h0, c0, lengths, cell, record, check_finite):
    weights = (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
               weight_ih_reverse, weight_hh_reverse, bias_ih_reverse, bias_hh_reverse, weight_hr_reverse)
    _check_operands(x, lengths, **dict(zip(WEIGHT_SLOTS, weights)), h_0=h0, c_0=c0)
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
    return _backward_by_groups(1, tape, x, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, weight_ih_reverse,
                               weight_hh_reverse, bias_ih_reverse, bias_hh_reverse, weight_hr_reverse, dy, dh_n,
                               dc_n, cell)


def _backward_by_groups(groups: int, tape, x, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, weight_ih_reverse,
                        weight_hh_reverse, bias_ih_reverse, bias_hh_reverse, weight_hr_reverse, dy, dh_n, dc_n,
                        cell):
    """_layer_backward with the weight gradients of `groups` consecutive groups of the batch's rows
    apart (functional.layer_backward's grad_groups), each with a leading dimension `groups` where it is
    more than one."""
    tapes = _tapes_of(tape)
    if not _plain_call(x, (dy, dh_n, dc_n)):
        _check_operands(x, dy=dy, dh_n=dh_n, dc_n=dc_n)
    _, state, cell_state = _state_shapes(x, weight_hh, weight_hr, weight_ih_reverse, cell)
    dh0, dh0a = _empty(x, state)
    dc0, dc0a = _empty(x, cell_state) if has_cell_state(cell) else (x.new_empty(*cell_state), None)
    dx, per_direction = _stack.backward_layer(tapes, _array(dy), _array(dh_n), _array(dc_n), dh0=dh0a, dc0=dc0a,
                                              grad_groups=groups)
    grads = [None] * len(WEIGHT_SLOTS)
    for d, g in enumerate(per_direction):
        for k, value in enumerate(getattr(g, name) for name in PARAMETERS):
            if value is not None:
                grads[d * SLOTS_PER_DIRECTION + k] = _tensor(value)
    # Distinct empty tensors for the absent weights: outputs may not alias.
    absent = (groups, 0) if groups > 1 else (0,)
    return (_tensor(dx), dh0, dc0, *(x.new_empty(*absent) if g is None else g for g in grads))


rnn_layer_backward = torch.library.custom_op("fusedrnn::rnn_layer_backward", mutates_args=(),
                                             device_types=("cpu", "cuda"))(_layer_backward)
rnn_layer_backward.__doc__ = _layer_backward.__doc__


@rnn_layer_backward.register_fake
def _(tape, x, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, weight_ih_reverse, weight_hh_reverse,
      bias_ih_reverse, bias_hh_reverse, weight_hr_reverse, dy, dh_n, dc_n, cell):
    weights = (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
               weight_ih_reverse, weight_hh_reverse, bias_ih_reverse, bias_hh_reverse, weight_hr_reverse)
    _check_operands(x, **dict(zip(WEIGHT_SLOTS, weights)), dy=dy, dh_n=dh_n, dc_n=dc_n)
    _, state, cell_state = _state_shapes(x, weight_hh, weight_hr, weight_ih_reverse, cell)
    return (x.new_empty(x.shape), x.new_empty(state), x.new_empty(cell_state),
            *(x.new_empty(0) if w is None else w.new_empty(w.shape) for w in weights))


_WEIGHTS_AT = slice(1, 1 + len(WEIGHT_SLOTS))  # where the weights sit among rnn_layer's arguments
_BACKWARD_WEIGHTS_AT = slice(2, 2 + len(WEIGHT_SLOTS))  # and among rnn_layer_backward's


# The saved-tensor hooks in force, where torch can tell (2.8 on); before, hooks are not looked for.
_saved_tensor_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _setup_context(ctx, inputs, output):
    x, weights = inputs[0], inputs[_WEIGHTS_AT]
    h0, c0, _lengths, cell, record, _check = inputs[_WEIGHTS_AT.stop:]
    ctx.cell, ctx.has_h0, ctx.has_c0 = cell, h0 is not None, c0 is not None
    ctx.present = [w is not None for w in weights]
    tape = output[3]
    if not record and not _traced(x):
        # A program traced where nothing recorded (torch.jit.trace or torch.export under no_grad, or with
        # frozen parameters) holds record=False as a constant; run where autograd needs this call's
        # backward, the call runs again recording (the same outputs, bit for bit) for its tape.
        tape = _layer(*inputs[:-2], True, False)[3]
    # Saved (not only referenced by the tape) so that autograd rejects an in-place change before backward.
    saved = (tape, x, *(w for w in weights if w is not None))
    # Where the forward read a contiguous copy of x (a batch_first transpose), a later change to x cannot
    # reach the tape, and torch.nn allows it there.
    x_copied = not (x.is_cuda or x.is_contiguous() or _traced(x) or _transformed())
    ctx.read_in_place = None
    if _saved_tensor_hooks is not None and _saved_tensor_hooks(False) is not None:
        # Saved-tensor hooks may hand backward copies (offloading, allow_mutation_on_saved_tensors) while
        # the tape reads the forward's memory, which can change, or a copied handle that holds no tapes;
        # what backward needs to run the forward again from the saved values is saved too.
        ctx.read_in_place = [(weakref.ref(t), t._version) for t in saved[1 + x_copied:]]
        saved += (h0, c0, _lengths)
    elif x_copied:
        # Backward keeps only x's shape, dtype and whether it needs a gradient (so that a double
        # backward is still refused).
        saved = (tape, x.new_zeros(()).requires_grad_(x.requires_grad).expand(x.shape), *saved[2:])
    ctx.save_for_backward(*saved)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no zero arrays


def _tape_for_backward(ctx, tape, x, weights, h0, c0, lengths) -> Tensor:
    """The tape to run backward on. Under saved-tensor hooks the forward runs again, recording, from the
    saved values where the tape no longer holds them: its handle came back as a copy whose tapes are
    gone, or an array it reads was changed in place after the forward, or is gone so that its version can
    no longer be read (a temporary view: its memory may have changed through the tensor it viewed)."""
    alive = _live_tapes.get(int(tape)) is not None
    changed = any(t is None or t._version != version for t, version in
                  ((ref(), version) for ref, version in ctx.read_in_place))
    if alive and not changed:
        return tape
    return _layer(x, *weights, h0, c0, lengths, ctx.cell, True, False)[3]


def _backward(ctx, dy, dh_n, dc_n, _dtape):
    if any(g is not None and torch._C._functorch.is_legacy_batchedtensor(g) for g in (dy, dh_n, dc_n)):
        raise NotImplementedError("fusedrnn: batched gradients through autograd's own vmap "
                                  "(torch.autograd.grad(is_grads_batched=True), autograd.functional.jacobian("
                                  "vectorize=True), gradcheck(check_batched_grad=True)) are not supported; "
                                  "torch.func.vmap over torch.func.vjp, or torch.func.jacrev, is")
    tape, x, *saved = ctx.saved_tensors
    present = iter(saved)
    weights = [next(present) if here else None for here in ctx.present]
    if ctx.read_in_place is not None:
        tape = _tape_for_backward(ctx, tape, x, weights, *present)
    if dc_n is not None and dc_n.numel() == 0:
        dc_n = None
    dx, dh0, dc0, *grads = _call_backward(tape, x, *weights, dy, dh_n, dc_n, ctx.cell)
    return (dx, *(g if here else None for g, here in zip(grads, ctx.present)),
            dh0 if ctx.has_h0 else None, dc0 if ctx.has_c0 else None, None, None, None, None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fusedrnn: double backward (gradients of gradients) through the fused "
                       "recurrent layer is not supported")


def _setup_nothing(ctx, inputs, output):
    pass


rnn_layer.register_autograd(_backward, setup_context=_setup_context)
rnn_layer_backward.register_autograd(_no_double_backward, setup_context=_setup_nothing)


def _traced(x: Tensor) -> bool:
    """Whether anything traces a call on x (torch.compile, torch.export, torch.jit.trace, a dispatch mode
    such as make_fx's): such calls must reach the operator itself."""
    return (type(x) is not Tensor or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or _python_dispatch._get_current_dispatch_mode() is not None)


def _transformed() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap, ...) is active. torch refuses custom
    operators' autograd formulas under them, so these calls go through autograd.Functions that torch.func
    accepts (_TransformableLayer, _BackwardOnce)."""
    return torch._C._are_functorch_transforms_active()


class _RecordedLayer(torch.autograd.Function):
    """rnn_layer with the autograd formula registered on it above. torch's autograd wrapper of a custom
    operator binds every argument to the schema again on each call that records, at a cost that grows
    with the square of the argument count (for these 17, more than a short layer's compute:
    bench/NOTES.md, "Per-call cost of the drop-in"); Function.apply skips it. The context is set up
    inside forward rather than by a separate setup_context, which apply would pay for with an
    inspect.signature binding on every call."""

    @staticmethod
    def forward(ctx, *args):
        output = _layer(*args)
        _setup_context(ctx, args, output)
        return output

    backward = staticmethod(_backward)


def _stacked_handles(handles) -> Tensor:
    """The tape handles of a vmap's slices as one batched handle whose storage keeps every slice's tapes
    alive. Slices that are themselves batched (nested vmap) cannot be held this way: their handles
    become _UNDER_NESTED_VMAP, which _tapes_of refuses."""
    if any(torch._C._functorch.is_functorch_wrapped_tensor(h) for h in handles):
        return torch.full_like(torch.stack(handles), _UNDER_NESTED_VMAP)
    holder = np.array([int(h) for h in handles], np.int64).view(_TapeArray)
    holder.tapes = handles  # each slice's handle tensor, whose storage holds that slice's tapes
    return torch.from_numpy(holder)


def _by_slices(function, info, in_dims, args, handle_output=None):
    """A vmap rule: `function` on each slice of the batched arguments, the outputs stacked along dim 0.
    The fused kernels already run a batch; a vmap's batch may also split the weights (an ensemble) or
    need a weight gradient per slice (per-sample gradients), which one fused call cannot give."""
    per_slice = [function(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
                 for i in range(info.batch_size)]
    outputs = tuple(_stacked_handles(column) if k == handle_output else torch.stack(column)
                    for k, column in enumerate(zip(*per_slice)))
    return outputs, (0,) * len(outputs)


def _layer_or_operator(*args):
    """rnn_layer's function, or the operator itself where something also traces the call (its fake
    implementation then gives the outputs' shapes)."""
    return rnn_layer(*args) if _traced(args[0]) else _layer(*args)


def _backward_or_operator(*args):
    return rnn_layer_backward(*args) if _traced(args[1]) else _layer_backward(*args)


class _TransformableLayer(torch.autograd.Function):
    """rnn_layer as torch.func transforms take it: the same function and autograd formula, the context
    set up apart, and a vmap rule."""

    forward = staticmethod(_layer_or_operator)
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)

    @staticmethod
    def vmap(info, in_dims, *args):
        if _merges_forward(in_dims, args):
            return _merged_forward(info, in_dims, args)
        return _by_slices(_record_if_needed, info, in_dims, args, handle_output=3)


# A vmap over the inputs alone (the weights shared), with no other transform beneath it on the CPU, runs
# its slices as one batch: the slices' rows one after another, one fused call. Its backward, under the
# same vmap, then gives each slice's weight gradients apart in one call (the core's gradients per group
# of rows): per-sample gradients, vmap(grad(loss)), at a small multiple of one batched step's cost. The
# tape's holder records the vmap's input (the batched x, its place and layout), by which the backward
# knows the vmap.


def _mergeable(in_dims, x: Tensor, weight_dims) -> bool:
    return (in_dims[0] is not None and all(d is None for d in weight_dims) and x.is_cpu
            and torch._C._functorch.maybe_current_level() is None)


def _merges_forward(in_dims, args) -> bool:
    """Whether _TransformableLayer's vmap rule runs the slices as one batch. Not with lengths: packed
    input never reaches a vmap rule (torch cannot vmap its packing)."""
    return _mergeable(in_dims, args[0], in_dims[_WEIGHTS_AT]) and args[_WEIGHTS_AT.stop + 2] is None


def _merged_rows(t: Optional[Tensor], dim: Optional[int], slices: int) -> Optional[Tensor]:
    """A vmap's (T or D, rows, F) tensor with its slices' rows one after another: the vmapped dimension
    `dim` folded into the rows, or an unbatched tensor repeated for every slice."""
    if t is None:
        return None
    t = t.unsqueeze(1).expand(t.shape[0], slices, *t.shape[1:]) if dim is None else t.movedim(dim, 1)
    return t.flatten(1, 2)


def _by_slice(t: Tensor, slices: int, rows: int) -> Tuple[Tensor, int]:
    """A merged call's (T or D, slices*rows, F) output as the vmap's (T or D, slices, rows, F) and its
    vmapped dimension; an empty one (no cell state) as one per slice."""
    if t.numel() == 0:
        return t.new_empty(slices, 0), 0
    return t.unflatten(1, (slices, rows)), 1


def _batched_x_key(x: Tensor, dim: int) -> tuple:
    return dim, x.data_ptr(), tuple(x.shape), x.stride()


def _merged_forward(info, in_dims, args):
    x, x_dim = args[0], in_dims[0]
    slices, rows = info.batch_size, x.select(x_dim, 0).shape[1]
    h0_dim, c0_dim = in_dims[_WEIGHTS_AT.stop:_WEIGHTS_AT.stop + 2]
    h0, c0 = args[_WEIGHTS_AT.stop:_WEIGHTS_AT.stop + 2]
    merged = (_merged_rows(x, x_dim, slices), *args[_WEIGHTS_AT], _merged_rows(h0, h0_dim, slices),
              _merged_rows(c0, c0_dim, slices), None, *args[-3:])
    *outputs, handle = _record_if_needed(*merged)
    holder = _live_tapes.get(int(handle))
    if holder is not None:
        holder.merged_slices = (slices, _batched_x_key(x, x_dim))
    outputs, dims = zip(*(_by_slice(t, slices, rows) for t in outputs))
    return (*outputs, handle), (*dims, None)


def _merged_backward(info, in_dims, args):
    """_BackwardOnce's vmap rule for the tape of a _merged_forward under the same vmap: one backward,
    each slice's weight gradients apart."""
    tape, x, weights = args[0], args[1], args[_BACKWARD_WEIGHTS_AT]
    dy, dh_n, dc_n, cell = args[_BACKWARD_WEIGHTS_AT.stop:]
    slices, x_dim = info.batch_size, in_dims[1]
    rows = x.select(x_dim, 0).shape[1]
    dy_dim, dh_dim, dc_dim = in_dims[_BACKWARD_WEIGHTS_AT.stop:_BACKWARD_WEIGHTS_AT.stop + 3]
    # x stands only for the shapes of dx and the states (the tape holds the forward's x): a view, no copy.
    x_shape = x.select(x_dim, 0)[:, :1].expand(-1, slices * rows, -1)
    dx, dh0, dc0, *grads = _backward_by_groups(
        slices, tape, x_shape, *weights, _merged_rows(dy, dy_dim, slices), _merged_rows(dh_n, dh_dim, slices),
        _merged_rows(dc_n, dc_dim, slices), cell)
    outputs, dims = zip(*(_by_slice(t, slices, rows) for t in (dx, dh0, dc0)))
    return (*outputs, *grads), (*dims, *(0,) * len(grads))  # the gradients (slices, ...) already


def _merged_in(info, in_dims, args) -> bool:
    """Whether _BackwardOnce's vmap rule runs the backward of a _merged_forward under the same vmap."""
    tape, x = args[0], args[1]
    if in_dims[0] is not None or not _mergeable(in_dims[1:], x, in_dims[_BACKWARD_WEIGHTS_AT]):
        return False
    holder = _live_tapes.get(int(tape))
    merged = None if holder is None else holder.merged_slices
    return merged == (info.batch_size, _batched_x_key(x, in_dims[1]))


def _record_if_needed(*args):
    """call_layer on a vmap's slice, recording where the caller asked (a grad transform above the vmap)
    or where the slice's tensors require grad: a batched tensor does not say whether it does (a grad
    transform below the vmap), its slices do."""
    record = args[-2] or (torch.is_grad_enabled()
                          and any(isinstance(a, Tensor) and a.requires_grad for a in args))
    return call_layer(*args[:-2], record, args[-1])


class _BackwardOnce(torch.autograd.Function):
    """rnn_layer_backward where its call is recorded (create_graph) or transformed: its own backward
    refuses double backward, as the operator's registered formula does."""

    forward = staticmethod(_backward_or_operator)
    setup_context = staticmethod(_setup_nothing)
    backward = staticmethod(_no_double_backward)

    @staticmethod
    def vmap(info, in_dims, *args):
        if _merged_in(info, in_dims, args):
            return _merged_backward(info, in_dims, args)
        return _by_slices(_call_backward, info, in_dims, args)


def check_later_states(h0: Optional[Tensor], c0: Optional[Tensor], first: int) -> None:
    """NaN/inf in the initial states from row `first` on: the layers above the first, whose calls check
    no states (what they check is their input, the layer below's output). Eager calls only; traced and
    transformed ones check the first layer's states inside its call, with the input."""
    states = [(name, t) for name, t in (("h_0", h0), ("c_0", c0)) if t is not None]
    if not states or _transformed() or _traced(states[0][1]):
        return
    for name, state in states:
        _checks.finite(name, _array(state[first:]))


def call_layer(*args):
    """rnn_layer(*args): torch.func transforms see _TransformableLayer (with the operator inside where
    they are traced in turn), other traced code the operator itself, and eager calls go straight to
    the operator's function (the dispatcher costs more than a one-step layer's compute: bench/NOTES.md,
    "One-step calls through the drop-in"), through _RecordedLayer where they record for backward."""
    if _transformed():  # first: a transform may also be traced (make_fx of grad)
        return _TransformableLayer.apply(*args)
    if _traced(args[0]):
        return rnn_layer(*args)
    record = args[-2]  # rnn_layer's arguments end (..., cell, record, check_finite)
    return _RecordedLayer.apply(*args) if record else _layer(*args)


def _call_backward(*args):
    """rnn_layer_backward(*args), routed as call_layer routes the forward; a backward that is recorded
    (create_graph) records a node that refuses double backward."""
    if _transformed():
        return _BackwardOnce.apply(*args)
    if _traced(args[1]):
        return rnn_layer_backward(*args)
    if torch.is_grad_enabled():
        return _BackwardOnce.apply(*args)
    return _layer_backward(*args)
