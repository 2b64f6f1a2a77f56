"""One layer direction on CUDA device arrays: functional._forward and _backward's counterparts over the
CUDA module, which cuda_module() finds (built in, or the fusedrnn-cuda13 plugin's). Outputs and the tape
are allocated with the caller's own array library (CuPy, or torch for CUDA tensors) on the input's
device, and every call is enqueued on that library's current stream, so results come back as the
caller's arrays, in stream order with the caller's own work. Other arrays exposing
__cuda_array_interface__ or a CUDA DLPack device go through CuPy."""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import sys

import numpy as np

from . import _core
from ._optional import require

# The CUDA module comes from one of two places: built into this package (a source build with
# FUSEDRNN_CUDA=ON or AUTO) or the plugin distribution (plugins/cuda13), the way wheels get it.
BUILT_IN = "fusedrnn._cuda"
PLUGIN_PACKAGE = "fusedrnn_cuda13"
PLUGIN_DISTRIBUTION = "fusedrnn-cuda13"
HOW_TO_GET = (f"pip install 'fusedrnn[cuda]' (the {PLUGIN_DISTRIBUTION} plugin: NVIDIA GPUs, a CUDA 13 driver), "
              "or build fusedrnn from source with FUSEDRNN_CUDA=ON")

_module = None  # the CUDA module, once loaded


def _version() -> str:
    from . import __version__
    return __version__


def locate_cuda_module() -> tuple[str, str | None] | None:
    """Where the CUDA module is, without loading it: (its import name, the plugin's version or None when
    it is built in), or None when there is none. The built-in module wins. The plugin's version comes
    from its pure-Python package, so a plugin of another version is refused before it is loaded."""
    if importlib.util.find_spec(BUILT_IN) is not None:
        return BUILT_IN, None
    if importlib.util.find_spec(PLUGIN_PACKAGE) is None:
        return None
    try:
        plugin_version = importlib.import_module(PLUGIN_PACKAGE).__version__
    except (ImportError, AttributeError) as err:  # AttributeError: a folder of that name, not the plugin
        raise ImportError(f"{PLUGIN_DISTRIBUTION} is installed, but its package does not import as the plugin ({err}): "
                          f"reinstall it (pip install --force-reinstall '{PLUGIN_DISTRIBUTION}=={_version()}')") from err
    return f"{PLUGIN_PACKAGE}._cuda", plugin_version


def cublas_wheel_library() -> str | None:
    """libcublas.so.13 of the nvidia-cublas wheel, wherever it is installed. The module's RPATH finds the
    wheel only in the module's own site-packages; loading the library first by path (the loader then
    matches its soname) also covers a wheel elsewhere on sys.path (a virtual environment that sees the
    system's packages, a user site). None: not installed (the loader's search path may still find one)."""
    try:
        spec = importlib.util.find_spec("nvidia.cu13")
    except ImportError:  # no nvidia namespace at all
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(location, "lib", "libcublas.so.13")
        if os.path.isfile(path):
            return path
    return None


def _source(plugin_version: str | None) -> str:
    return "built in" if plugin_version is None else f"{PLUGIN_DISTRIBUTION} {plugin_version}"


def cuda_module():
    """The CUDA module (built in, else the plugin's), or an ImportError saying why there is none that
    loads and what to install. The one way fusedrnn reaches the CUDA module."""
    global _module
    if _module is not None:
        return _module
    version = _version()
    found = locate_cuda_module()
    if found is None:
        raise ImportError(f"fusedrnn {version} has no CUDA module: {HOW_TO_GET}")
    name, plugin_version = found
    if plugin_version is not None and plugin_version != version:
        raise ImportError(f"{PLUGIN_DISTRIBUTION} {plugin_version} is installed, but fusedrnn is {version}: the CUDA "
                          f"plugin must be fusedrnn's own version (pip install '{PLUGIN_DISTRIBUTION}=={version}', "
                          "or pip install --upgrade 'fusedrnn[cuda]' for both)")
    try:
        cublas = cublas_wheel_library()
        if cublas is not None:
            ctypes.CDLL(cublas)
        module = importlib.import_module(name)
    except (ImportError, OSError) as err:
        raise ImportError(f"fusedrnn's CUDA module {name} ({_source(plugin_version)}) does not load: {err}") from err
    _module = module
    return module


def cuda_info() -> dict:
    """fusedrnn.cuda_info(): see there."""
    try:
        found = locate_cuda_module()
    except ImportError as err:  # the plugin is there but broken
        return {"installed": True, "source": PLUGIN_DISTRIBUTION, "loaded": False, "error": str(err)}
    info = {"installed": found is not None, "source": None if found is None else _source(found[1]), "loaded": False}
    try:
        module = cuda_module()
    except ImportError as err:
        info["error"] = str(err)
        return info
    version = module.runtime_version()  # 1000 * major + 10 * minor
    devices = module.device_count()
    info.update(loaded=True, module=module.__name__, architectures=module.architectures,
                nvcc=module.compiler_version, runtime=f"{version // 1000}.{version % 1000 // 10}", devices=devices,
                device_names=[module.device_name(d) for d in range(devices)],
                jax_ffi=getattr(module, "jax_ffi_built_with_jaxlib", None))
    return info


class _CuPy:
    """CuPy arrays: new arrays on the input's device, CuPy's current stream there."""

    def __init__(self):
        self.cp = require("cupy", "cupy")

    def adopt(self, a):
        """`a` as a CuPy array (no copy): any __cuda_array_interface__ or CUDA DLPack array."""
        cp = self.cp
        if isinstance(a, cp.ndarray) or a is None:
            return a
        return cp.asarray(a) if hasattr(a, "__cuda_array_interface__") else cp.from_dlpack(a)

    def empty(self, like, shape, dtype=None):
        with self.cp.cuda.Device(like.device.id):
            return self.cp.empty(shape, like.dtype if dtype is None else np.dtype(dtype))

    def zeros(self, like, shape):
        with self.cp.cuda.Device(like.device.id):
            return self.cp.zeros(shape, like.dtype)

    def from_host(self, like, host: np.ndarray):
        with self.cp.cuda.Device(like.device.id):
            return self.cp.asarray(host)

    def stream(self, like) -> int:
        with self.cp.cuda.Device(like.device.id):
            return self.cp.cuda.get_current_stream().ptr

    def all_finite(self, a) -> bool:
        return bool(self.cp.isfinite(a).all())

    def dtype_name(self, a) -> str:
        return str(a.dtype)


class _Torch:
    """torch CUDA tensors (detached: autograd is the torch adapter's business), torch's current stream."""

    def __init__(self):
        self.torch = sys.modules["torch"]

    def adopt(self, a):
        return None if a is None else a.detach()

    def empty(self, like, shape, dtype=None):
        dt = like.dtype if dtype is None else getattr(self.torch, str(np.dtype(dtype)))
        return self.torch.empty(shape, dtype=dt, device=like.device)

    def zeros(self, like, shape):
        return self.torch.zeros(shape, dtype=like.dtype, device=like.device)

    def from_host(self, like, host: np.ndarray):
        return self.torch.from_numpy(host).to(like.device, non_blocking=False)

    def stream(self, like) -> int:
        return self.torch.cuda.current_stream(like.device).cuda_stream

    def all_finite(self, a) -> bool:
        return bool(self.torch.isfinite(a).all())

    def dtype_name(self, a) -> str:
        return str(a.dtype).replace("torch.", "")


_libraries: dict = {}


def _library(kind: str):
    if kind not in _libraries:
        _libraries[kind] = _Torch() if kind == "torch" else _CuPy()
    return _libraries[kind]


def as_cupy(a):
    """A CUDA array as a CuPy array over the same memory (the NumPy-API modules' device arrays)."""
    return _library("cupy").adopt(a)


def cupy_on(host: np.ndarray, device: int):
    """A host array copied to CUDA device `device`, as a CuPy array."""
    cp = _library("cupy").cp
    with cp.cuda.Device(device):
        return cp.asarray(host)


def current_device() -> int:
    """CuPy's current CUDA device: the one "cuda" names."""
    return int(_library("cupy").cp.cuda.Device().id)


def to_device(like, host):
    """A host array copied to `like`'s device, as `like`'s library's array (None stays None)."""
    return None if host is None else library_of(like).from_host(like, np.ascontiguousarray(host))


def library_of(a):
    """The array library that allocates beside `a`: torch for torch tensors, else CuPy."""
    torch = sys.modules.get("torch")
    return _library("torch" if torch is not None and isinstance(a, torch.Tensor) else "cupy")


class CudaTape:
    """What a training-mode forward on device arrays keeps for backward (functional's tape on the CUDA
    backend): references to its inputs and the recorded states, gate values and, with a projection,
    cell outputs."""

    recurrence = "auto"  # how backward runs the recurrence: as its forward was asked to (set_recurrence)
    backend = "cuda"

    def __init__(self, lib, cell, reverse, shape, dtype, arrays, cell_clip, proj_size=0):
        self.lib, self.cell, self.reverse, self.shape, self.dtype = lib, cell, reverse, shape, dtype
        self.arrays, self.cell_clip, self.proj_size = arrays, cell_clip, proj_size
        self.has_bias = arrays["bias_ih"] is not None

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for k in ("hs", "cs", "saved", "rs") if (a := self.arrays[k]) is not None)


_recurrence = "auto"


def set_recurrence(path: str) -> str:
    """Tests and benchmarks: how forward, and the backward of its tape, run the recurrence from now on,
    "auto" (the default: the persistent kernels for small batches where they fit), "per_step" or
    "persistent" (where it fits). Returns the previous setting."""
    global _recurrence
    if path not in _core.recurrence_paths:
        raise ValueError(f"path: expected one of {_core.recurrence_paths}, got {path!r}")
    previous, _recurrence = _recurrence, path
    return previous


def _layer_sizes(cell, lib, x, weight_hh, weight_hr) -> tuple:
    """(steps, batch, input, hidden, proj) of a forward on device arrays, checked as the host call checks
    them (_core.layer_sizes, with its words) where the CUDA module would only name its shape argument;
    the rest, each array's shape and dtype against these sizes, the module checks."""
    if lib.dtype_name(x) not in ("float32", "float64"):
        raise TypeError(f"x: expected dtype float32 or float64, got {lib.dtype_name(x)}")
    return _core.layer_sizes(cell, tuple(x.shape), tuple(weight_hh.shape),
                             None if weight_hr is None else tuple(weight_hr.shape))


def forward(cell, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, reverse, training, out,
            cell_clip, recurrence: str | None = None, weight_hr=None):
    """functional._forward on device arrays (lengths: checked host int64 or None). Returns
    (y, h_n, c_n, tape). `recurrence`: as set_recurrence (None: its setting). weight_hr (P, H): an
    LSTM's projection; then y, h0 and h_n have P features."""
    cuda = cuda_module()
    lib = library_of(x)
    x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, out, weight_hr = (
        lib.adopt(a) for a in (x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, out, weight_hr))
    steps, batch, inp, hidden, proj = _layer_sizes(cell, lib, x, weight_hh, weight_hr)
    width = proj or hidden  # R, the width of h
    if out is not None and tuple(out.shape) != (steps, batch, width):
        raise ValueError(f"out: expected shape {(steps, batch, width)}, got {tuple(out.shape)}")
    y = lib.empty(x, (steps, batch, width)) if out is None else out
    h_n = lib.empty(x, (batch, width))
    c_n = lib.empty(x, (batch, hidden)) if _core.cells[cell]["has_cell_state"] else None
    tape_shapes = _core.tape_layout(cell, steps, batch, hidden, training, proj_size=proj)
    hs, cs, saved, rs = (lib.empty(x, tape_shapes[name]) if name in tape_shapes else None
                         for name in ("hs", "cs", "saved", "rs"))
    lens = None if lengths is None else lib.from_host(x, np.ascontiguousarray(lengths, np.int64))
    dtype = lib.dtype_name(x)
    shape = (steps, batch, inp, hidden, proj)
    cuda.layer_forward(cell, dtype, shape, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lens, reverse, y, h_n,
                       c_n, hs, cs, saved, training, cell_clip, lib.stream(x), recurrence or _recurrence,
                       weight_hr=weight_hr, rs=rs)
    tape = None
    if training:
        tape = CudaTape(lib, cell, reverse, (steps, batch, inp, hidden), dtype,
                        dict(x=x, weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh,
                             lengths=lens, hs=hs, cs=cs, saved=saved, weight_hr=weight_hr, rs=rs), cell_clip,
                        proj)
        tape.recurrence = recurrence or _recurrence
    return y, h_n, c_n, tape


def backward(tape: CudaTape, dy, dh_n, dc_n, dx=None, grads=None, grad_groups: int = 1):
    """functional._backward on a CudaTape; grads: (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)
    to add into, or None; grad_groups as functional.layer_backward's (the gradients gain a leading
    dimension of that size). Returns (dx, dh0, dc0, weight_ih, weight_hh, bias_ih, bias_hh, dh_norm,
    weight_hr) as functional.LayerGrads orders them."""
    cuda = cuda_module()
    lib, a = tape.lib, tape.arrays
    steps, batch, inp, hidden = tape.shape
    proj = tape.proj_size
    width = proj or hidden
    x = a["x"]
    gh = _core.cells[tape.cell]["gates"] * hidden
    has_c = _core.cells[tape.cell]["has_cell_state"]
    dy, dh_n, dc_n, dx = (lib.adopt(v) for v in (dy, dh_n, dc_n, dx))
    for name, value in (("dy", dy), ("dh_n", dh_n), ("dc_n", dc_n)):
        if value is not None and lib.dtype_name(value) not in ("float32", "float64"):
            raise TypeError(f"{name}: expected dtype float32 or float64, got {lib.dtype_name(value)}")
    accumulate_dx = dx is not None
    if dx is None:
        dx = lib.empty(x, (steps, batch, inp))
    if grads is None:
        lead = (grad_groups,) if grad_groups > 1 else ()
        grads = (lib.zeros(x, (*lead, gh, inp)), lib.zeros(x, (*lead, gh, width)),
                 lib.zeros(x, (*lead, gh)) if tape.has_bias else None,
                 lib.zeros(x, (*lead, gh)) if tape.has_bias else None,
                 lib.zeros(x, (*lead, proj, hidden)) if proj else None)
    else:
        grads = tuple(lib.adopt(g) for g in grads)
    dh0 = lib.empty(x, (batch, width))
    dc0 = lib.empty(x, (batch, hidden)) if has_c else None
    dh_norm = lib.empty(x, (steps,), "float64")
    cuda.layer_backward(tape.cell, tape.dtype, (*tape.shape, proj), tape.reverse, x, a["weight_ih"], a["weight_hh"],
                        a["bias_ih"], a["bias_hh"], a["lengths"], a["hs"], a["cs"], a["saved"], dy, dh_n, dc_n,
                        dx, accumulate_dx, dh0, dc0, *grads[:4], dh_norm, tape.cell_clip, lib.stream(x),
                        tape.recurrence, weight_hr=a["weight_hr"], rs=a["rs"], grad_weight_hr=grads[4],
                        grad_groups=grad_groups)
    return (dx, dh0, dc0, *grads[:4], dh_norm, grads[4])
