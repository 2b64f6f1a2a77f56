"""Truncated backpropagation through time.

A module's own `forward` + `backward` is full BPTT: the gradient flows from every step back to the
first. For long sequences `truncated_bptt` runs the sequence in chunks of k steps instead: each chunk
is a forward and a backward of its own, its final hidden (and cell) state carries forward as the next
chunk's initial state, and no gradient crosses a chunk boundary (the carried state is a constant to the
next chunk). What is kept for backward (the tape) and the scratch then grow with k, not with the
sequence; the outputs returned, y and dx (and dx added into the module's input_grads), cover the whole
sequence. The weights may be updated after every chunk.

Bidirectional modules are refused: the reverse direction inside a chunk would see only that chunk's
future, and its state would have to carry backwards in time, so the result would not be the
bidirectional model that the module defines.

A module moved to a CUDA device (`to("cuda")`) runs there: x, hx and loss_fn's gradients are then
arrays on its device, and so are the output and the final state.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from . import _checks, _device


class TruncatedBPTTResult(NamedTuple):
    """What truncated_bptt returns (the fields' comments say what each holds)."""

    y: np.ndarray      # the whole output, in the module's layout; zero past each row's length
    hx: object         # the final state: h_n, or (h_n, c_n) for an LSTM
    losses: list       # the loss of each chunk, in order
    dx: np.ndarray     # the gradient reaching x, each chunk's at its steps; zero past each row's length
    dhx: object        # the gradient reaching hx (through the first chunk): dh0, or (dh0, dc0) for an LSTM


LossFn = Callable[[np.ndarray, int, int], tuple]


def truncated_bptt(module, x, k: int, loss_fn: LossFn, *, hx=None, lengths=None,
                   after_chunk: Callable[[int], None] | None = None) -> TruncatedBPTTResult:
    """Runs `module` (LSTM, GRU or RNN in train mode) over x in chunks of k steps.

    For each chunk of steps [start, stop): forward from the carried state, then
    `loss, dy = loss_fn(y_chunk, start, stop)` with y_chunk the chunk's output (the whole batch, in the
    module's layout, zero past each row's length), then the module's backward of dy, which adds the
    chunk's parameter gradients to `module.grads`, then `after_chunk(chunk_index)` if given: the place to clip,
    take an optimiser step and zero the gradients. Without it the gradients of all chunks add up.
    The gradients reaching x and hx are the result's `dx` and `dhx`; they are added into
    `module.input_grads` once, at the end, as one backward over the whole of x adds its own.

    With `lengths`, a row takes part in the chunks its length reaches; its state stays as it was at
    its own last step. Chunks past the longest length are not run. With k >= T this is exactly one
    forward and one backward over the whole sequence."""
    from .modules import RNNBase
    if not isinstance(module, RNNBase):
        raise TypeError(f"module: expected a fusedrnn LSTM, GRU or RNN (fusedrnn.LSTM, ...), got "
                        f"{type(module).__module__}.{type(module).__qualname__}")
    if module.bidirectional:
        raise ValueError("module: truncated BPTT needs a unidirectional module; a reverse direction "
                         "inside a chunk would see only that chunk")
    if not module.training:
        raise ValueError("module: truncated BPTT trains the module; call module.train() first")
    k = _checks.positive_int("k", k)
    for name, value in (("loss_fn", loss_fn), ("after_chunk", after_chunk)):
        if not callable(value) and not (name == "after_chunk" and value is None):
            raise TypeError(f"{name}: expected a function, got {type(value).__name__}")
    x = _checks.array("x", x, module.dtype, 3)
    t_axis = 1 if module.batch_first else 0
    b_axis = 1 - t_axis
    steps, batch = x.shape[t_axis], x.shape[b_axis]
    if steps == 0 or batch == 0:
        raise ValueError(f"x: empty input (no time steps or an empty batch), got shape {x.shape}")
    lens = _checks.lengths(lengths, steps, batch)
    stateful = module._has_cell_state
    h, c = _initial_state(module, x, hx, batch, stateful)
    # All of x and the state before the first chunk changes the module (its gradients, after_chunk's
    # optimiser steps), as the module's own forward checks its whole input before it runs.
    _checks.finite("x", x)
    for name, value in (("h0" if stateful else "hx", h), ("c0", c)):
        if value is not None:
            _checks.finite(name, value)

    out_shape = list(x.shape)
    out_shape[2] = module.num_directions * module._state_size
    y = _device.zeros(x, tuple(out_shape))
    dx = _device.zeros(x, x.shape)
    dh0 = dc0 = None
    xp = _device.array_module(x)
    losses = []
    last = steps if lens is None else int(lens.max())
    for index, start in enumerate(range(0, last, k)):
        stop = min(start + k, steps)
        time = (slice(None),) * t_axis + (slice(start, stop),)
        chunk_lens = None if lens is None else np.clip(lens - start, 0, stop - start)
        # The rows still running, as indices on x's device (all of them: a slice, no copies).
        active = (slice(None) if chunk_lens is None or chunk_lens.all()
                  else _device.move(np.flatnonzero(chunk_lens), _device.device_of(x)))
        rows = (slice(None),) * b_axis + (active,)
        x_chunk = x[time][rows]
        hx_chunk = (h[:, active], c[:, active]) if stateful else h[:, active]
        y_active, hx_out = module(x_chunk, hx_chunk,
                                  lengths=None if chunk_lens is None else chunk_lens[chunk_lens > 0])
        y_chunk = y[time]
        y_chunk[rows] = y_active
        # The carried state is a copy: the next chunk starts from its values, with no graph behind them.
        if stateful:
            h[:, active], c[:, active] = hx_out
        else:
            h[:, active] = hx_out
        loss, dy = _loss_and_gradient(loss_fn(y_chunk, start, stop), y_chunk, x)
        dy_active = xp.ascontiguousarray(dy[rows], module.dtype)
        _checks.finite("loss_fn's gradient", dy_active)  # the rows backward reads, named as the caller knows them
        dx_active, dh0_chunk, dc0_chunk = module._gradients(dy_active, None)
        dx[time][rows] = dx_active
        if index == 0:  # every row takes part in the first chunk
            dh0, dc0 = dh0_chunk, dc0_chunk
        losses.append(loss)
        if after_chunk is not None:
            after_chunk(index)
    module._grads_lock.run(lambda: module._accumulate_input_grads(x=dx, h0=dh0, c0=dc0))
    return TruncatedBPTTResult(y, (h, c) if stateful else h, losses, dx, (dh0, dc0) if stateful else dh0)


def _loss_and_gradient(result, y_chunk, x) -> tuple:
    """loss_fn's (loss, dloss/dy_chunk) checked: a number, and an array of the chunk output's shape on
    x's device."""
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TypeError(f"loss_fn: expected (loss, the loss's gradient with respect to the chunk's output), "
                        f"got {type(result).__name__}")
    loss, dy = result
    try:
        loss = float(loss)
    except (TypeError, ValueError) as err:
        raise TypeError(f"loss_fn: returned a loss that is not a number: {loss!r}") from err
    if dy is None:
        raise TypeError(f"loss_fn: returned no gradient (None); expected an array of the chunk output's shape "
                        f"{y_chunk.shape}")
    if _device.device_of(dy) != _device.device_of(x):
        raise ValueError(f"loss_fn: returned a gradient on {_device.device_of(dy)}, but x is on "
                         f"{_device.device_of(x)}")
    dy = _checks.as_array("loss_fn's gradient", dy, _device.array_module(x))
    if dy.dtype != y_chunk.dtype:  # never cast silently, as the module's backward
        raise TypeError(f"loss_fn: returned a gradient of dtype {dy.dtype}, expected the chunk output's "
                        f"{y_chunk.dtype}")
    if dy.shape != y_chunk.shape:
        raise ValueError(f"loss_fn: returned a gradient of shape {dy.shape}, expected the chunk "
                         f"output's {y_chunk.shape}")
    return loss, dy


def _initial_state(module, x, hx, batch: int, stateful: bool):
    """Writable copies (h, c) of the initial state on x's device, (L*D, B, R) and (L*D, B, H), zero
    where not given; c is None without a cell state."""
    h0, c0 = module._split_hx(hx)
    module._check_on_module_device(x=x, **{"h0" if stateful else "hx": h0}, c0=c0)
    layers = module.num_layers * module.num_directions

    def state(name, value, width):
        shape = (layers, batch, width)
        if value is None:
            return _device.zeros(x, shape)
        arr = _checks.array(name, value, module.dtype, 3)
        _checks.shape(name, arr, shape)
        return arr.copy()

    return (state("h0" if stateful else "hx", h0, module._state_size),
            state("c0", c0, module.hidden_size) if stateful else None)
