"""Where an array lives, and new arrays beside it: the one place that tells NumPy arrays from CUDA device
arrays (CuPy arrays, torch CUDA tensors, anything exposing __cuda_array_interface__ or a CUDA
__dlpack_device__), so the functional layer and the layer-stack driver send each call to the CPU core
or to the CUDA module, and mixing devices in one call is refused by name. Needs no CUDA itself."""

from __future__ import annotations

import sys

import numpy as np

from . import _core

# DLPack device types (dlpack.h): host memory, CUDA device memory, pinned host, managed.
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


def device_of(a) -> str | None:
    """"cpu", "cuda:N", "cuda" (a CUDA array whose device number is not exposed) or another DLPack
    device's name; None for None. NumPy arrays, lists and scalars are "cpu"."""
    if a is None:
        return None
    if type(a) is np.ndarray:
        return "cpu"
    if getattr(a, "is_cpu", None) is True:  # a torch CPU tensor: an attribute read, not a Python call
        return "cpu"
    dlpack_device = getattr(type(a), "__dlpack_device__", None)
    if dlpack_device is not None:
        try:
            kind, index = dlpack_device(a)
        except (BufferError, RuntimeError, TypeError, ValueError):  # torch's meta tensors: no memory at all
            return str(getattr(a, "device", "a device DLPack cannot name"))
        if kind in (_DL_CUDA, _DL_CUDA_MANAGED):
            return f"cuda:{int(index)}"
        if kind in (_DL_CPU, _DL_CUDA_HOST):
            return "cpu"
        return f"dlpack device type {int(kind)}:{int(index)}"
    if hasattr(a, "__cuda_array_interface__"):
        return "cuda"
    return "cpu"


def is_cuda(a) -> bool:
    device = device_of(a)
    return device is not None and device.startswith("cuda")


def common_device(**arrays) -> str:
    """The device every given array (None skipped) is on, in argument order; a ValueError naming the
    first argument on another device (the device of an array with no device number is checked by the
    CUDA module against its pointer)."""
    first_name, first = None, None
    for name, a in arrays.items():
        device = device_of(a)
        if device is None:
            continue
        if first is None:
            first_name, first = name, device
        elif not same_device(device, first):
            raise ValueError(f"{name}: on {device}, but {first_name} is on {first}; every array of a call must "
                             f"be on one device")
    if first is not None and not (first == "cpu" or first.startswith("cuda")):
        raise ValueError(f"{first_name}: arrays on {first} are not supported (CPU or CUDA only)")
    return first or "cpu"


def empty(like, shape, dtype=None, *, aligned: bool = False):
    """An uninitialised array of `shape` on `like`'s device, of `like`'s dtype or "float64".
    `aligned`: on the host, 64-byte aligned (_core.aligned_empty: rows the thread team shares)."""
    if not is_cuda(like):
        dt = like.dtype if dtype is None else np.dtype(dtype)
        return _core.aligned_empty(shape, dt) if aligned else np.empty(shape, dt)
    from . import _cuda_layer
    return _cuda_layer.library_of(like).empty(like, shape, dtype)


def zeros(like, shape):
    """Zeros of `shape` and `like`'s dtype on `like`'s device."""
    if not is_cuda(like):
        return np.zeros(shape, like.dtype)
    from . import _cuda_layer
    return _cuda_layer.library_of(like).zeros(like, shape)


def canonical_device(device) -> str:
    """"cpu" or "cuda:N" from what a user names a device by: "cpu", "cuda" (CuPy's current device),
    "cuda:N", a torch.device, or a CuPy Device."""
    torch, cupy = sys.modules.get("torch"), sys.modules.get("cupy")
    if isinstance(device, str):
        name = device
    elif torch is not None and isinstance(device, torch.device):
        name = str(device)
    elif cupy is not None and isinstance(device, cupy.cuda.Device):
        name = f"cuda:{device.id}"
    else:
        raise TypeError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {type(device).__name__}")
    kind, _, index = name.partition(":")
    if kind == "cpu" and not index:
        return "cpu"
    if kind == "cuda" and (not index or index.isdigit()):
        if not index:
            from . import _cuda_layer
            index = _cuda_layer.current_device()
        return f"cuda:{int(index)}"
    raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {name!r}")


def same_device(a: str, b: str) -> bool:
    """Whether two device names (device_of) are one device; "cuda" (no number exposed) may be any
    CUDA device, whose pointer the CUDA module checks."""
    return a == b or ("cuda" in (a, b) and a.startswith("cuda") and b.startswith("cuda"))


def move(a, device: str):
    """`a` on `device` ("cpu" or "cuda:N", from canonical_device): `a` itself when it is there already,
    else a copy (a NumPy array on the host, a CuPy array on a CUDA device)."""
    if device_of(a) == device:
        return a
    host = np.ascontiguousarray(to_host(a))
    if device == "cpu":
        return host
    from . import _cuda_layer
    return _cuda_layer.cupy_on(host, int(device.partition(":")[2]))


def copy_into(dst, src) -> None:
    """Writes `src` (an array on any device, of dst's shape) into `dst` in place, across devices."""
    if is_cuda(dst):
        dst[...] = move(src, device_of(dst))
    else:
        np.copyto(dst, to_host(src))


def array_module(a):
    """The NumPy-like module of `a`'s arrays: numpy on the host, cupy for a CUDA array."""
    if not is_cuda(a):
        return np
    from ._optional import require
    return require("cupy", "cupy")


def to_host(a):
    """A device array copied to a NumPy array (waits for it); anything else as it is."""
    if not is_cuda(a):
        return a
    if hasattr(a, "get"):  # CuPy
        return a.get()
    if hasattr(a, "cpu"):  # torch
        return a.detach().cpu().numpy()
    from . import _cuda_layer
    return _cuda_layer.as_cupy(a).get()


def torch_values(t):
    """A torch tensor's values on the host as a NumPy array (detached), its float types NumPy lacks
    (bfloat16, float8) widened to float64, which holds each of their values exactly."""
    t = t.detach().cpu()
    if t.is_floating_point() and str(t.dtype) not in ("torch.float16", "torch.float32", "torch.float64"):
        t = t.double()
    return t.numpy()


def ascontiguous(a):
    """A C-contiguous host array, or a device array as it is (the CUDA backend reads any strides)."""
    return a if is_cuda(a) else np.ascontiguousarray(a)
