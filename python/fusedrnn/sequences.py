"""Batching variable-length sequences: padding and unpadding, length masks, a bucketing batch iterator,
and windows cut from one long series for forecasting.

A sequence is an array of shape (length, *features); a batch is sequence-major (T, B, *features), or
(B, T, *features) with batch_first=True, plus `lengths` (B,) as the modules take them.
"""

from __future__ import annotations

import numbers
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from . import _checks

_MAX_STEPS = 2**31 - 1  # the longest length a mask is made for


def _sequence(name: str, index: int, value) -> np.ndarray:
    seq = _checks.as_array(f"{name}[{index}]", value)
    if seq.dtype.kind not in "fiub":
        raise TypeError(f"{name}[{index}]: expected a numeric array, got dtype {seq.dtype}")
    if seq.ndim == 0:
        raise ValueError(f"{name}[{index}]: expected an array of shape (length, ...), got a scalar")
    if seq.shape[0] == 0:
        raise ValueError(f"{name}[{index}]: empty sequence (length 0)")
    if seq.dtype.kind == "f" and not np.all(np.isfinite(seq)):
        raise ValueError(f"{name}[{index}]: contains NaN or infinite values")
    return seq


def _checked_sequences(name: str, sequences) -> list[np.ndarray]:
    """The sequences as arrays, each non-empty and finite, all with one feature shape."""
    if isinstance(sequences, np.ndarray) or not isinstance(sequences, Sequence):
        raise TypeError(f"{name}: expected a list of arrays, got {type(sequences).__name__}")
    if len(sequences) == 0:
        raise ValueError(f"{name}: expected at least one sequence, got none")
    seqs = [_sequence(name, i, s) for i, s in enumerate(sequences)]
    features = seqs[0].shape[1:]
    for i, s in enumerate(seqs):
        if s.shape[1:] != features:
            raise ValueError(f"{name}[{i}]: feature shape {s.shape[1:]} differs from {name}[0]'s {features}")
    return seqs


def _padding_dtype(dtype) -> np.dtype | None:
    """The dtype a padded array is made in: None (the sequences'), or a numeric or boolean dtype."""
    if dtype is None:
        return None
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"dtype: expected a numeric dtype, got {dtype!r}") from err
    if dt.kind not in "fiub":
        raise TypeError(f"dtype: expected a numeric dtype, got {dt}")
    return dt


def _exactly_in(name: str, values, dtype: np.dtype) -> np.ndarray:
    """`values` cast to `dtype`, refused where the cast would change a value beyond rounding: into an
    integer or boolean dtype every value must be one of its values; into a float dtype none may overflow."""
    arr = np.asarray(values)
    if arr.dtype == object:  # a Python int past every NumPy integer type
        if dtype.kind != "f" or abs(values) > int(np.finfo(dtype).max):
            raise ValueError(f"{name}: {values} is not a value of the padded dtype {dtype}")
        arr = np.asarray(float(values))
    with np.errstate(all="ignore"):
        cast = arr.astype(dtype)
        changed = (~np.isfinite(cast) & np.isfinite(arr)) if dtype.kind == "f" else cast != arr
    if changed.any():
        value = arr[np.unravel_index(int(np.argmax(changed)), arr.shape)] if arr.ndim else arr
        raise ValueError(f"{name}: {value.item()} is not a value of the padded dtype {dtype}")
    return cast


def pad_sequences(sequences, *, steps: int | None = None, batch_first: bool = False,
                  padding_value: float = 0.0, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Stacks sequences of shapes (L_b, *features) into one padded array (T, B, *features) (or
    (B, T, *features) with batch_first) and returns it with `lengths` (B,) int64. T is the longest
    length, or `steps` when given (every sequence must fit). The dtype is the sequences' common one
    unless `dtype` is given; a value it cannot hold (a fraction or an out-of-range integer in an integer
    dtype, a finite value past a float dtype's range), padding_value included, raises ValueError."""
    seqs = _checked_sequences("sequences", sequences)
    lengths = np.array([s.shape[0] for s in seqs], np.int64)
    if steps is None:
        steps = int(lengths.max())
    else:
        steps = _checks.positive_int("steps", steps)
        too_long = np.flatnonzero(lengths > steps)
        if too_long.size:
            i = int(too_long[0])
            raise ValueError(f"sequences[{i}]: length {lengths[i]} does not fit in steps={steps}")
    dtype = _padding_dtype(dtype) or np.result_type(*seqs)
    if isinstance(padding_value, bool) or not isinstance(padding_value, numbers.Real):
        raise TypeError(f"padding_value: expected a number, got {padding_value!r}")
    out = np.full((len(seqs), steps) + seqs[0].shape[1:], _exactly_in("padding_value", padding_value, dtype), dtype)
    for b, s in enumerate(seqs):
        out[b, :s.shape[0]] = _exactly_in(f"sequences[{b}]", s, dtype)
    return (out if batch_first else np.ascontiguousarray(out.swapaxes(0, 1))), lengths


def unpad_sequences(padded, lengths, *, batch_first: bool = False) -> list[np.ndarray]:
    """The inverse of pad_sequences: a list of B arrays (lengths[b], *features), views into `padded`."""
    arr = _checks.as_array("padded", padded)
    if arr.ndim < 2:
        raise ValueError(f"padded: expected an array of shape (T, B, ...), got shape {arr.shape}")
    given = arr.shape
    if not batch_first:
        arr = arr.swapaxes(0, 1)
    batch, steps = arr.shape[:2]
    if steps == 0:
        raise ValueError(f"padded: no time steps, got shape {given}{' (batch_first)' if batch_first else ''}")
    lens = _checks.lengths(lengths, steps, batch)
    if lens is None:
        lens = np.full(batch, steps, np.int64)
    return [arr[b, :lens[b]] for b in range(batch)]


def length_mask(lengths, steps: int | None = None, *, batch_first: bool = False) -> np.ndarray:
    """Boolean mask (T, B) (or (B, T)): True where step t < lengths[b], i.e. at real, unpadded steps.
    T is `steps`, or the longest length."""
    lens = _checks.as_array("lengths", lengths)
    if lens.dtype.kind not in "iuf":
        raise TypeError(f"lengths: expected integers, got dtype {lens.dtype}")
    if lens.ndim != 1 or lens.size == 0:
        raise ValueError(f"lengths: expected a non-empty 1-D array, got shape {lens.shape}")
    if steps is None:
        _checks.lengths(lens, _MAX_STEPS, lens.shape[0])  # whole, positive and of a size a mask can have
        steps = int(lens.max())
    else:
        steps = _checks.positive_int("steps", steps)
        _checks.lengths(lens, steps, lens.shape[0])
    mask = np.arange(steps)[:, None] < lens[None, :]
    return np.ascontiguousarray(mask.T) if batch_first else mask


# ---- bucketing batch iterator ------------------------------------------------------------------------


class Batch(NamedTuple):
    """One padded batch as BucketBatches yields it."""

    x: np.ndarray                  # (T, B, *features), or (B, T, ...) with batch_first
    lengths: np.ndarray            # (B,) int64
    indices: np.ndarray            # (B,) positions of these sequences in the iterator's list
    targets: np.ndarray | None     # per-sequence targets stacked (B, ...), or None
    step_targets: np.ndarray | None  # per-step targets padded like x, or None


class BucketBatches:
    """Iterates over mini-batches of sequences of similar length, so little of each batch is padding.

    Each pass shuffles the sequences, cuts the order into pools of `pool_batches * batch_size`, sorts
    each pool by length and splits it into batches, then shuffles the batches. The order comes from
    `seed` and the pass number alone: the same seed gives the same batches on every run, and each pass
    a different order. `shuffle=False` sorts the whole list by length once (the least padding).

    `targets` (one per sequence, stacked) and `step_targets` (one array per sequence with that
    sequence's length, padded like the inputs) travel with their sequences. After each pass,
    `padding_fraction` is the share of the padded batches' time steps that were padding."""

    def __init__(self, sequences, batch_size: int, *, targets=None, step_targets=None, shuffle: bool = True,
                 seed: int | None = 0, pool_batches: int = 8, drop_last: bool = False,
                 batch_first: bool = False, dtype=None):
        self._seqs = _checked_sequences("sequences", sequences)
        count = len(self._seqs)
        self.batch_size = _checks.positive_int("batch_size", batch_size)
        self.pool_batches = _checks.positive_int("pool_batches", pool_batches)
        self.lengths = np.array([s.shape[0] for s in self._seqs], np.int64)
        self._targets = None
        if targets is not None:
            self._targets = _checks.as_array("targets", targets)
            if self._targets.ndim == 0 or self._targets.shape[0] != count:
                raise ValueError(f"targets: expected one target per sequence ({count}), got shape "
                                 f"{self._targets.shape}")
        self._step_targets = None
        if step_targets is not None:
            self._step_targets = _checked_sequences("step_targets", step_targets)
            if len(self._step_targets) != count:
                raise ValueError(f"step_targets: expected one array per sequence ({count}), got "
                                 f"{len(self._step_targets)}")
            for i, (s, t) in enumerate(zip(self._seqs, self._step_targets)):
                if t.shape[0] != s.shape[0]:
                    raise ValueError(f"step_targets[{i}]: length {t.shape[0]} differs from sequences[{i}]'s "
                                     f"{s.shape[0]}")
        self.shuffle = bool(shuffle)
        if seed is not None:
            seed = _checks.positive_int("seed", seed, minimum=0)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.batch_first = bool(batch_first)
        self.dtype = _padding_dtype(dtype)
        if self.dtype is not None:  # every value checked now, by its index here, not a batch's way through a pass
            for i, seq in enumerate(self._seqs):
                _exactly_in(f"sequences[{i}]", seq, self.dtype)
        self.epoch = 0
        self.padding_fraction: float | None = None

    def __len__(self) -> int:
        count = len(self._seqs)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def batch_indices(self, epoch: int) -> list[np.ndarray]:
        """The batches (as index arrays) of pass `epoch`, without building them."""
        epoch = _checks.positive_int("epoch", epoch, minimum=0)
        if not self.shuffle:
            order = np.argsort(self.lengths, kind="stable")
            return self._split(order)
        rng = np.random.default_rng(None if self.seed is None else [self.seed, epoch])
        order = rng.permutation(len(self._seqs))
        pool = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, len(order), pool):
            chunk = order[start:start + pool]
            batches += self._split(chunk[np.argsort(self.lengths[chunk], kind="stable")])
        return [batches[i] for i in rng.permutation(len(batches))]

    def _split(self, order: np.ndarray) -> list[np.ndarray]:
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        return batches

    def __iter__(self) -> Iterator[Batch]:
        batches = self.batch_indices(self.epoch)
        self.epoch += 1
        real = padded = 0
        for idx in batches:
            lens = self.lengths[idx]
            real += int(lens.sum())
            padded += int(lens.max()) * len(idx)
            self.padding_fraction = 1.0 - real / padded
            x, _ = pad_sequences([self._seqs[i] for i in idx], batch_first=self.batch_first, dtype=self.dtype)
            step_targets = None
            if self._step_targets is not None:
                step_targets, _ = pad_sequences([self._step_targets[i] for i in idx],
                                                batch_first=self.batch_first)
            yield Batch(x, lens, idx, None if self._targets is None else self._targets[idx], step_targets)


# ---- one long series -----------------------------------------------------------------------------------


def _series(series) -> np.ndarray:
    arr = _checks.as_array("series", series)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"series: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"series: expected shape (length,) or (length, features), got {arr.shape}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(arr), axis=1))[0])
        raise ValueError(f"series: NaN or infinite value at step {bad}; fill or drop gaps first")
    return arr


def _windows(arr: np.ndarray, size: int, stride: int, count: int) -> np.ndarray:
    # (count, size, features): count windows starting every `stride` steps, a read-only view of arr.
    view = np.lib.stride_tricks.sliding_window_view(arr, size, axis=0)[::stride][:count]
    return np.moveaxis(view, -1, 1)


def _layout(windows: np.ndarray, batch_first: bool) -> np.ndarray:
    # Always a new array: never the caller's series, nor memory shared between inputs and targets.
    return (windows if batch_first else windows.swapaxes(0, 1)).copy()


def sliding_windows(series, window: int, horizon: int = 1, *, stride: int = 1,
                    batch_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) for forecasting the `horizon` values after each `window` of the series.

    series: (L,) or (L, F). Window n starts at step n*stride: inputs (window, N, F) hold steps
    [s, s+window), targets (horizon, N, F) steps [s+window, s+window+horizon); batch-first with
    batch_first=True."""
    arr = _series(series)
    window = _checks.positive_int("window", window)
    horizon = _checks.positive_int("horizon", horizon)
    stride = _checks.positive_int("stride", stride)
    span = window + horizon
    if span > arr.shape[0]:
        raise ValueError(f"window: window + horizon = {span} steps do not fit in a series of "
                         f"{arr.shape[0]} steps")
    count = (arr.shape[0] - span) // stride + 1
    both = _windows(arr, span, stride, count)
    return _layout(both[:, :window], batch_first), _layout(both[:, window:], batch_first)


def next_step_chunks(series, steps: int, *, stride: int | None = None,
                     batch_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) for next-step prediction along chunks of a long series: each chunk's inputs
    are steps [s, s+steps) and its targets the same steps shifted by one, [s+1, s+steps+1). Chunks
    start every `stride` steps (default `steps`: back to back, no overlap); a tail too short for a
    whole chunk is left out. Shapes (steps, N, F), or batch-first."""
    arr = _series(series)
    steps = _checks.positive_int("steps", steps)
    stride = steps if stride is None else _checks.positive_int("stride", stride)
    if steps + 1 > arr.shape[0]:
        raise ValueError(f"steps: a chunk needs steps + 1 = {steps + 1} values, the series has {arr.shape[0]}")
    count = (arr.shape[0] - steps - 1) // stride + 1
    both = _windows(arr, steps + 1, stride, count)
    return _layout(both[:, :-1], batch_first), _layout(both[:, 1:], batch_first)
