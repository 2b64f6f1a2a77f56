"""A host stand-in for CuPy and the CUDA module, so the code above the CUDA backend (modules moved to a
device, optimisers and clipping on device arrays, state dicts across devices) runs where there is no GPU.

- `cupy`: "device" arrays are NumPy arrays of a subclass, DeviceArray, that says it lives on CUDA
  device N (its __dlpack_device__), on the device current when it was made (`cuda.Device(N)`). Like
  CuPy, an operation that mixes a host array (other than a scalar) or another device's array with it
  raises; unlike CuPy, np.asarray() of one does not (no test here can rely on that refusal).
- The CUDA module: fusedrnn._cuda_emulated, the real module's bindings over the device code's host
  emulation. A DeviceArray hands it its memory through __cuda_array_interface__, declaring that memory
  to be on its device first, so the bindings' own checks (devices, shapes, dtypes, outputs) run too.

`installed(monkeypatch)` puts both in place for one test."""

from __future__ import annotations

import sys
import types
import weakref

import numpy as np

from fusedrnn import _cuda_emulated, _cuda_layer

_DL_CUDA = 2
_current_device = [0]


def _is_host_array(a) -> bool:
    return isinstance(a, np.ndarray) and not isinstance(a, DeviceArray) and a.ndim > 0


def _plain(a):
    return a.view(np.ndarray) if isinstance(a, DeviceArray) else a


class _Device:
    def __init__(self, index: int | None = None):
        self.id = _current_device[-1] if index is None else int(index)

    def __enter__(self):
        _current_device.append(self.id)
        return self

    def __exit__(self, *exc):
        _current_device.pop()


class DeviceArray(np.ndarray):
    """A NumPy array that says it is on CUDA device `device_id`."""

    def __array_finalize__(self, obj):
        self.device_id = getattr(obj, "device_id", _current_device[-1])

    def __dlpack_device__(self):
        return _DL_CUDA, self.device_id

    @property
    def device(self):
        return _Device(self.device_id)

    @property
    def __cuda_array_interface__(self) -> dict:
        _declare(self)
        return {"shape": self.shape, "typestr": self.dtype.str, "version": 3,
                "data": (self.__array_interface__["data"][0], not self.flags.writeable),
                "strides": None if self.flags.c_contiguous else self.strides}

    def get(self) -> np.ndarray:
        return self.view(np.ndarray).copy()

    def _check_operands(self, operands) -> None:
        for a in operands:
            if _is_host_array(a):
                raise TypeError("fake cupy: a host ndarray mixed with a device array")
            if isinstance(a, DeviceArray) and a.device_id != self.device_id:
                raise ValueError(f"fake cupy: arrays on devices {a.device_id} and {self.device_id} mixed")

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        self._check_operands(inputs + (out or ()))
        if out is not None:
            kwargs["out"] = tuple(_plain(o) for o in out)
        result = getattr(ufunc, method)(*(_plain(a) for a in inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        with _Device(self.device_id):
            if isinstance(result, tuple):
                return tuple(np.asarray(r).view(DeviceArray) for r in result)
            return np.asarray(result).view(DeviceArray)

    def __array_function__(self, func, types, args, kwargs):
        self._check_operands([a for a in list(args) + list(kwargs.values()) if isinstance(a, np.ndarray)])
        return super().__array_function__(func, types, args, kwargs)


_declared: dict = {}  # first address -> the array owning that memory, while it lives


def _declare(a: np.ndarray) -> None:
    """Declares the memory under `a` (its owning array's, whole) as on a's device to the CUDA module,
    until that array is freed."""
    owner = a
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    address = owner.__array_interface__["data"][0]
    known = _declared.get(address)
    if known is not None and known() is owner:
        return
    _cuda_emulated.declare_device_memory(address, owner.nbytes, a.device_id)
    _declared[address] = weakref.ref(owner)
    weakref.finalize(owner, _forget, address)


def _forget(address: int) -> None:
    _declared.pop(address, None)
    _cuda_emulated.forget_device_memory(address)


def _asarray(a, dtype=None):
    if isinstance(a, DeviceArray) and (dtype is None or a.dtype == dtype):
        return a
    host = a.get() if isinstance(a, DeviceArray) else np.asarray(a, dtype)
    with _Device():
        return np.array(host, dtype, copy=True).view(DeviceArray)


def _module() -> types.ModuleType:
    cp = types.ModuleType("cupy")
    cp.ndarray = DeviceArray
    cp.asarray = _asarray
    cp.array = _asarray
    cp.from_dlpack = _asarray
    cp.asnumpy = lambda a: a.get() if isinstance(a, DeviceArray) else np.asarray(a)
    cp.empty = lambda shape, dtype=np.float64: np.empty(shape, dtype).view(DeviceArray)
    cp.zeros = lambda shape, dtype=np.float64: np.zeros(shape, dtype).view(DeviceArray)
    cp.broadcast_to = _broadcast_to
    cp.cuda = types.SimpleNamespace(Device=_Device, runtime=types.SimpleNamespace(getDeviceCount=lambda: 2),
                                    get_current_stream=lambda: types.SimpleNamespace(ptr=0))
    # The rest of the NumPy-like namespace (ones, sqrt, clip, isfinite, ...): NumPy's, on DeviceArrays.
    def numpy_function(name):
        if name.startswith("_"):
            raise AttributeError(name)
        return _on_device(getattr(np, name))
    cp.__getattr__ = numpy_function
    return cp


def _broadcast_to(a, shape):
    """CuPy's broadcast_to: a view with zero strides that, unlike NumPy's, is writable."""
    strides = np.broadcast_to(a, shape).strides
    with _Device(a.device_id):
        return np.lib.stride_tricks.as_strided(a, shape, strides).view(DeviceArray)


def _on_device(function):
    """A NumPy function as CuPy's: host array arguments refused, its arrays made on the device."""
    def on_device(*args, **kwargs):
        if any(_is_host_array(a) for a in list(args) + list(kwargs.values())):
            raise TypeError(f"fake cupy: {function.__name__} given a host ndarray")
        result = function(*args, **kwargs)
        return result.view(DeviceArray) if type(result) is np.ndarray else result
    return on_device


def installed(monkeypatch):
    """Puts the stand-ins in place (undone with the monkeypatch); returns the fake cupy."""
    cp = _module()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(_cuda_layer, "_module", _cuda_emulated)
    monkeypatch.setattr(_cuda_layer, "_libraries", {})
    return cp
