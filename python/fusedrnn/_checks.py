"""Argument checks shared by the functional layer and the modules. Each raises TypeError/ValueError
naming the argument, what it got and what it needs."""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _core, _device

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_TOO_HARD = getattr(np, "exceptions", np).TooHardError  # numpy.exceptions from NumPy 1.25


def cell(value) -> str:
    """A cell name from the core's list (fusedrnn._core.cells)."""
    if not isinstance(value, str) or value not in _core.cells:
        raise ValueError(f"cell: expected one of {tuple(_core.cells)}, got {value!r}")
    return value


def cell_clip(value, cell: str | None = None) -> float | None:
    """The bound on an LSTM's cell state: a positive finite number, or None for no bound. With `cell`,
    also that the cell has a cell state to clip."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"cell_clip: expected a positive float or None, got {type(value).__name__}")
    if not 0 < value < math.inf:
        raise ValueError(f"cell_clip: expected a positive finite bound, got {value}")
    if cell is not None and not _core.cells[cell]["has_cell_state"]:
        raise ValueError(f"cell_clip: {cell!r} has no cell state to clip")
    return float(value)


def proj_size(value, hidden_size: int, cell: str | None = None) -> int:
    """An LSTM's projection size (torch.nn's rule): an int with 0 <= proj_size < hidden_size, 0 for none;
    with `cell`, also that the cell takes a projection."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"proj_size: expected an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"proj_size: expected an int >= 0 (0: no projection), got {value}")
    if value and cell is not None and not _core.cells[cell]["projection"]:
        raise ValueError(f"proj_size: {cell!r} takes no projection (only an LSTM does), got {value}")
    if value >= hidden_size:
        raise ValueError(f"proj_size: expected less than hidden_size ({hidden_size}), got {value}")
    return int(value)


def positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def distinct(name: str, values) -> None:
    """A ValueError naming `name` where one of `values` is given more than once."""
    values = list(values)
    twice = sorted({v for v in values if values.count(v) > 1}, key=repr)
    if twice:
        raise ValueError(f"{name}: {', '.join(map(repr, twice))} given more than once")


def described(value) -> str:
    """What `value` is, for an error message: its type (with its package outside NumPy's and Python's
    own) and dtype."""
    kind = type(value)
    got = kind.__name__ if kind.__module__ in ("builtins", "numpy") else f"{kind.__module__.split('.')[0]}.{kind.__name__}"
    return f"{got} of {value.dtype}" if getattr(value, "dtype", None) is not None else got


IN_PLACE = "NumPy or CUDA float arrays are changed in place; a CPU torch tensor as t.numpy()"


def probability(name: str, value) -> float:
    """A probability in [0, 1] (a dropout rate), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float in [0, 1], got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {value}")
    return float(value)


def flag(name: str, value) -> bool:
    """A yes/no option: a bool (NumPy's too), never any truthy value ("no" is not False)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def float_dtype(name: str, dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"{name}: expected float32 or float64, got {dtype!r}") from err
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32 or float64, got {dt}")
    return dt


def as_array(name: str, value, xp=np):
    """xp.asarray(value) (xp numpy or cupy) for a caller's argument, a failure naming it: a ragged nested
    list is a ValueError, what the library cannot read (a torch tensor that requires grad, ...) a TypeError."""
    if xp is np and type(value) is np.ndarray:
        return value
    refuse_masked(name, value)
    try:
        return xp.asarray(value)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err
    except (TypeError, RuntimeError) as err:
        raise TypeError(f"{name}: cannot be read as an array: {err}") from err


def refuse_masked(name: str, value) -> None:
    """A TypeError for a NumPy masked array with masked entries: the kernels and the update rules would
    use the values under its mask as if nothing were masked."""
    if isinstance(value, np.ma.MaskedArray) and np.ma.is_masked(value):
        raise TypeError(f"{name}: a masked array, whose mask would be ignored; pass the array's .filled(value) "
                        f"(and leave masked steps out with lengths= or a loss's mask=)")


def plain_view(a):
    """A host ndarray subclass (np.matrix, whose * and ** are matrix products; a memmap) as a plain
    ndarray over the same memory, so arithmetic and writes act element by element; anything else as
    it is."""
    if isinstance(a, np.ndarray) and type(a) is not np.ndarray and not _device.is_cuda(a):
        return np.asarray(a)
    return a


def elements_apart(name: str, arr) -> None:
    """A ValueError where elements of an array written in place may share memory (a broadcast or an
    overlapping strided view): each would be written once for every element over it, the last write
    kept. Decided from the strides: the axes, ordered by stride, must each step past the ones inside."""
    if 0 in arr.shape:
        return
    reach = arr.dtype.itemsize  # bytes spanned by the axes checked so far
    for stride, size in sorted((abs(s), n) for n, s in zip(arr.shape, arr.strides) if n > 1):
        if stride < reach:
            raise ValueError(f"{name}: elements share memory (strides {arr.strides} for shape {arr.shape}: a "
                             f"broadcast or overlapping view); an array changed in place needs memory of "
                             f"its own for every element: pass a copy")
        reach += stride * (size - 1)


def array(name: str, value, dtype: np.dtype, ndim: int | tuple[int, ...]) -> np.ndarray:
    """`value` as an ndarray of exactly `dtype` (never silently cast) with one of the given ranks. A
    CUDA device array stays on its device, as a CuPy array."""
    if _device.is_cuda(value):
        from . import _cuda_layer
        arr = _cuda_layer.as_cupy(value)
    else:
        arr = as_array(name, value)
    if arr.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {arr.dtype}")
    ranks = (ndim,) if isinstance(ndim, int) else ndim
    if arr.ndim not in ranks:
        consecutive = len(ranks) > 2 and list(ranks) == list(range(ranks[0], ranks[-1] + 1))
        want = f"{ranks[0]}-D to {ranks[-1]}-D" if consecutive else " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{name}: expected a {want} array, got shape {arr.shape}")
    return arr


def shape(name: str, arr: np.ndarray, expected: tuple[int, ...]) -> None:
    if arr.shape != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {arr.shape}")


def finite(name: str, arr: np.ndarray) -> None:
    """No NaN or infinity in `arr`: a NumPy array, or a CUDA array (CuPy, torch), checked on its device."""
    if type(arr) is not np.ndarray and _device.is_cuda(arr):
        from . import _cuda_layer
        ok = _cuda_layer.library_of(arr).all_finite(arr)
    elif arr.dtype.kind != "f":
        raise TypeError(f"{name}: expected dtype float32 or float64, got {arr.dtype}")
    elif arr.size == 0:
        return
    elif arr.dtype in FLOAT_DTYPES and _dense(arr.flags):
        ok = _core.all_finite(arr)  # one native pass (csrc/fusedrnn/cpu/checks.h), shared by the team when large
    else:
        # min and max propagate NaN and expose +-inf: two vectorised passes, no temporary array.
        ok = np.isfinite(arr.min()) and np.isfinite(arr.max())
    if not ok:
        raise ValueError(f"{name}: contains NaN or infinite values")


def _dense(flags) -> bool:
    """Aligned and contiguous in C or Fortran order, from an array's flags."""
    return flags.aligned and (flags.c_contiguous or flags.f_contiguous)


def apart(written: dict, read: dict) -> None:
    """No array a call writes (`written`, name -> array or None) shares memory with another it writes or
    with one it reads (`read`): the call would read values it is overwriting. NumPy arrays, and CUDA
    arrays by their byte ranges; anything else is left to the argument's own checks."""
    outputs = [(name, a) for name, a in written.items() if _addressable(a)]
    if not outputs:
        return
    others = outputs + [(name, a) for name, a in read.items() if _addressable(a)]
    for i, (name, a) in enumerate(outputs):
        for other, b in others[i + 1:]:
            if overlap(a, b):
                raise ValueError(f"{name}: shares memory with {other}; the call writes {name} while it reads "
                                 f"or writes {other}")


def _addressable(a) -> bool:
    return isinstance(a, np.ndarray) or (a is not None and _device.is_cuda(a))


def overlap(a, b) -> bool:
    """Whether two arrays share an element (interleaved columns of one buffer need not); where that is
    too hard to tell quickly, or for CUDA arrays whose byte ranges overlap, assume they do."""
    host_a, host_b = isinstance(a, np.ndarray), isinstance(b, np.ndarray)
    if host_a and host_b:
        if not np.may_share_memory(a, b):
            return False
        try:
            return np.shares_memory(a, b, max_work=100_000)
        except _TOO_HARD:
            return True
    if host_a or host_b:  # host and device memory are apart
        return False
    (a_low, a_high), (b_low, b_high) = _device_bytes(a), _device_bytes(b)
    return a_low < b_high and b_low < a_high


def _device_bytes(a) -> tuple[int, int]:
    """[first byte, past the last byte) of a CUDA array's elements (addresses are unique across devices),
    from its __cuda_array_interface__; an empty array spans none."""
    interface = (a.detach() if hasattr(a, "detach") else a).__cuda_array_interface__  # torch's needs no grad
    start, shape = interface["data"][0], interface["shape"]
    itemsize = np.dtype(interface["typestr"]).itemsize
    if 0 in shape:
        return start, start
    strides = interface.get("strides") or tuple(itemsize * math.prod(shape[k + 1:]) for k in range(len(shape)))
    reach = [(n - 1) * s for n, s in zip(shape, strides)]
    return start + sum(r for r in reach if r < 0), start + sum(r for r in reach if r > 0) + itemsize


def state_dict_keys(state_dict, names, strict) -> tuple[list, list]:
    """The keys of a module (`names`) that `state_dict` lacks, and those it has that the module lacks,
    as torch's load_state_dict reports them; with `strict`, either is a ValueError."""
    if not hasattr(state_dict, "keys"):
        raise TypeError(f"state_dict: expected a mapping of name -> array, got {type(state_dict).__name__}")
    missing = [k for k in names if k not in state_dict]
    unexpected = [k for k in state_dict.keys() if k not in names]
    if flag("strict", strict) and (missing or unexpected):
        raise ValueError(f"state_dict: missing keys {missing}, unexpected keys {unexpected}")
    return missing, unexpected


def plain_numbers(arr: np.ndarray) -> np.ndarray:
    """`arr`, or, of one of ml_dtypes' types (JAX's bfloat16, float8, int4: NumPy kind "V", which NumPy's
    own checks do not take as numbers), its values as float64, which holds each of them exactly."""
    if arr.dtype.kind == "V" and arr.dtype.type.__module__ == "ml_dtypes":
        return arr.astype(np.float64)
    return arr


def lengths(value, steps: int, batch: int) -> np.ndarray | None:
    """Sequence lengths as int64 (B,), each in [1, T]; None when absent or all equal to T."""
    if value is None:
        return None
    arr = plain_numbers(as_array("lengths", _device.to_host(value)))
    if arr.ndim != 1 or arr.shape[0] != batch:
        raise ValueError(f"lengths: expected shape ({batch},) (one length per batch row), got {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ValueError("lengths: contains NaN or infinite values")
        if not np.all(arr == np.round(arr)):
            raise ValueError("lengths: expected whole numbers")
    elif arr.dtype.kind not in "iu":
        raise TypeError(f"lengths: expected integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 1 or arr.max() > steps):
        bad = int(np.flatnonzero((arr < 1) | (arr > steps))[0])
        raise ValueError(f"lengths: each length must be in [1, {steps}] (T), got {arr[bad]} at index {bad}")
    out = arr.astype(np.int64)
    return None if np.all(out == steps) else out


def named_arrays(name: str, value) -> list:
    """[(key, array)] from a mapping name -> array, a list or tuple of arrays, or one array (key 0)."""
    if isinstance(value, np.ndarray):
        return [(0, value)]
    if hasattr(value, "keys"):
        return [(k, value[k]) for k in value.keys()]
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__"):
        return list(enumerate(value))
    raise TypeError(f"{name}: expected an array, a list of arrays or a mapping of name -> array, got "
                    f"{type(value).__name__}")
