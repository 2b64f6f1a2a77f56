"""Truncated backpropagation through time.

A module's own `forward` + `backward` is full BPTT: the gradient flows from every step back to the
first. For long sequences `truncated_bptt` runs the sequence in chunks of k steps instead: each chunk
is a forward and a backward of its own, its final hidden (and cell) state carries forward as the next
chunk's initial state, and no gradient crosses a chunk boundary (the carried state is a constant to the
next chunk). Memory then grows with k, not with the sequence, and the weights may be updated after
every chunk.

Bidirectional modules are refused: the reverse direction inside a chunk would see only that chunk's
future, and its state would have to carry backwards in time, so the result would not be the
bidirectional model that the module defines.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from . import _checks


class TruncatedBPTTResult(NamedTuple):
    y: np.ndarray      # the whole output, in the module's layout; zero past each row's length
    hx: object         # the final state: h_n, or (h_n, c_n) for an LSTM
    losses: list       # the loss of each chunk, in order


LossFn = Callable[[np.ndarray, int, int], tuple]


def truncated_bptt(module, x, k: int, loss_fn: LossFn, *, hx=None, lengths=None,
                   after_chunk: Callable[[int], None] | None = None) -> TruncatedBPTTResult:
    """Runs `module` (LSTM, GRU or RNN in train mode) over x in chunks of k steps.

    For each chunk of steps [start, stop): forward from the carried state, then
    `loss, dy = loss_fn(y_chunk, start, stop)` with y_chunk the chunk's output (the whole batch, in the
    module's layout, zero past each row's length), then `module.backward(dy)`, which adds the chunk's
    parameter gradients to `module.grads`, then `after_chunk(chunk_index)` if given: the place to clip,
    take an optimiser step and zero the gradients. Without it the gradients of all chunks add up.

    With `lengths`, a row takes part in the chunks its length reaches; its state stays as it was at
    its own last step. Chunks past the longest length are not run. With k >= T this is exactly one
    forward and one backward over the whole sequence."""
    if getattr(module, "bidirectional", False):
        raise ValueError("module: truncated BPTT needs a unidirectional module; a reverse direction "
                         "inside a chunk would see only that chunk")
    if not getattr(module, "training", False):
        raise ValueError("module: truncated BPTT trains the module; call module.train() first")
    k = _checks.positive_int("k", k)
    x = _checks.array("x", x, module.dtype, 3)
    t_axis = 1 if module.batch_first else 0
    b_axis = 1 - t_axis
    steps, batch = x.shape[t_axis], x.shape[b_axis]
    lens = _checks.lengths(lengths, steps, batch)
    stateful = module._has_cell_state
    h, c = _initial_state(module, hx, batch, stateful)

    out_shape = list(x.shape)
    out_shape[2] = module.num_directions * module.hidden_size
    y = np.zeros(out_shape, module.dtype)
    losses = []
    last = steps if lens is None else int(lens.max())
    for index, start in enumerate(range(0, last, k)):
        stop = min(start + k, steps)
        time = (slice(None),) * t_axis + (slice(start, stop),)
        chunk_lens = None if lens is None else np.clip(lens - start, 0, stop - start)
        active = np.ones(batch, bool) if chunk_lens is None else chunk_lens > 0
        rows = (slice(None),) * b_axis + (active,)
        x_chunk = x[time][rows]
        hx_chunk = (h[:, active], c[:, active]) if stateful else h[:, active]
        y_active, hx_out = module(x_chunk, hx_chunk, lengths=None if chunk_lens is None else chunk_lens[active])
        y_chunk = y[time]
        y_chunk[rows] = y_active
        # The carried state is a copy: the next chunk starts from its values, with no graph behind them.
        if stateful:
            h[:, active], c[:, active] = hx_out
        else:
            h[:, active] = hx_out
        loss, dy = loss_fn(y_chunk, start, stop)
        dy = np.asarray(dy)
        if dy.shape != y_chunk.shape:
            raise ValueError(f"loss_fn: returned a gradient of shape {dy.shape}, expected the chunk "
                             f"output's {y_chunk.shape}")
        module.backward(np.ascontiguousarray(dy[rows], module.dtype))
        losses.append(float(loss))
        if after_chunk is not None:
            after_chunk(index)
    return TruncatedBPTTResult(y, (h, c) if stateful else h, losses)


def _initial_state(module, hx, batch: int, stateful: bool):
    """Writable copies (h, c) of the initial state, (L*D, B, H), zero where not given; c is None
    without a cell state."""
    shape = (module.num_layers * module.num_directions, batch, module.hidden_size)
    h0, c0 = module._split_hx(hx)

    def state(name, value):
        if value is None:
            return np.zeros(shape, module.dtype)
        arr = _checks.array(name, value, module.dtype, 3)
        _checks.shape(name, arr, shape)
        return arr.copy()

    return state("h0" if stateful else "hx", h0), (state("c0", c0) if stateful else None)
