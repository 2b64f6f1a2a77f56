"""A host stand-in for CuPy and the CUDA module, so the code above the CUDA backend (modules moved to a
device, optimisers and clipping on device arrays, state dicts across devices) runs where there is no GPU.

- `cupy`: "device" arrays are NumPy arrays of a subclass, DeviceArray, that says it lives on CUDA
  device N (its __dlpack_device__), on the device current when it was made (`cuda.Device(N)`). Like
  CuPy, an operation that mixes a host array (other than a scalar) or another device's array with it
  raises; unlike CuPy, np.asarray() of one does not (no test here can rely on that refusal).
- The CUDA module: its layer_forward and layer_backward run the device code's host emulation
  (_core's "emulated_device" backend) on the arrays' memory and write into the buffers the backend
  handed it, as the real module writes into device memory.

`installed(monkeypatch)` puts both in place for one test."""

from __future__ import annotations

import sys
import types

import numpy as np

from fusedrnn import _core, _cuda_layer
from fusedrnn import functional as F

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
    cp.cuda = types.SimpleNamespace(Device=_Device, runtime=types.SimpleNamespace(getDeviceCount=lambda: 2),
                                    get_current_stream=lambda: types.SimpleNamespace(ptr=0))
    # The rest of the NumPy-like namespace (ones, sqrt, clip, isfinite, ...): NumPy's, on DeviceArrays.
    def numpy_function(name):
        if name.startswith("_"):
            raise AttributeError(name)
        return _on_device(getattr(np, name))
    cp.__getattr__ = numpy_function
    return cp


def _on_device(function):
    """A NumPy function as CuPy's: host array arguments refused, its arrays made on the device."""
    def on_device(*args, **kwargs):
        if any(_is_host_array(a) for a in list(args) + list(kwargs.values())):
            raise TypeError(f"fake cupy: {function.__name__} given a host ndarray")
        result = function(*args, **kwargs)
        return result.view(DeviceArray) if type(result) is np.ndarray else result
    return on_device


class CudaModule:
    """The CUDA module's layer calls, on the host emulation of its device code."""

    __name__ = "fake_cuda.CudaModule"

    def layer_forward(self, cell, dtype, shape, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, reverse,
                      y, h_n, c_n, hs, cs, saved, training, cell_clip, stream, recurrence="auto", weight_hr=None,
                      rs=None):
        out = _core.layer_forward(cell, np.ascontiguousarray(_plain(x)), *map(_plain, (weight_ih, weight_hh, bias_ih,
                                                                                       bias_hh, h0, c0, lengths)),
                                  reverse, training, None, cell_clip, backend="emulated_device",
                                  weight_hr=_plain(weight_hr))
        y[...], h_n[...] = _asarray(out[0]), _asarray(out[1])
        if c_n is not None:
            c_n[...] = _asarray(out[2])
        hs.emulated_tape = out[3]  # the buffer the tape's backward is handed again

    def layer_backward(self, cell, dtype, shape, reverse, x, weight_ih, weight_hh, bias_ih, bias_hh, lengths, hs, cs,
                       saved, dy, dh_n, dc_n, dx, accumulate_dx, dh0, dc0, grad_weight_ih, grad_weight_hh,
                       grad_bias_ih, grad_bias_hh, dh_norm, cell_clip, stream, recurrence="auto", weight_hr=None,
                       rs=None, grad_weight_hr=None, grad_groups=1):
        grads = F.LayerGrads(None, None, None, *map(_plain, (grad_weight_ih, grad_weight_hh, grad_bias_ih,
                                                             grad_bias_hh)), None, _plain(grad_weight_hr))
        g = F._backward(hs.emulated_tape, *map(_plain, (dy, dh_n, dc_n)), _plain(dx) if accumulate_dx else None,
                        grads, grad_groups)
        if not accumulate_dx:
            dx[...] = _asarray(g.dx)
        dh0[...], dh_norm[...] = _asarray(g.dh0), _asarray(g.dh_norm)
        if dc0 is not None:
            dc0[...] = _asarray(g.dc0)


def installed(monkeypatch):
    """Puts the stand-ins in place (undone with the monkeypatch); returns the fake cupy."""
    cp = _module()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(_cuda_layer, "_module", CudaModule())
    monkeypatch.setattr(_cuda_layer, "_libraries", {})
    return cp
