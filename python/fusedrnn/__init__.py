"""fusedrnn: fused LSTM, GRU and RNN forward and backward kernels with a NumPy API.

Modules (weights named and shaped exactly as torch.nn's)::

    lstm = fusedrnn.LSTM(64, 128, num_layers=2, bidirectional=True)
    y, (h_n, c_n) = lstm(x, lengths=lengths)
    dx, (dh0, dc0) = lstm.backward(dy)
    lstm.grads["weight_hh_l1_reverse"]

``fusedrnn.functional`` runs one layer in one direction with explicit weights. Training toolkit:
``fusedrnn.sequences`` (padding, bucketing, windows), ``fusedrnn.bptt`` (truncated BPTT),
``fusedrnn.losses``, ``fusedrnn.optim`` (SGD, Adam), ``fusedrnn.gradients`` (clipping, gradient-flow
diagnosis); ``fusedrnn.reference`` is the plain float64 NumPy implementation the kernels are tested
against.
"""

import numbers

from . import _blas_loader

_blas_loader.preload()

from . import _core, functional  # noqa: E402  (needs the BLAS library loaded first)
from . import bptt, gradients, losses, optim, reference, sequences  # noqa: E402
from .bptt import truncated_bptt  # noqa: E402
from .gradients import clip_grad_norm, clip_grad_value  # noqa: E402
from .modules import GRU, LSTM, RNN, Linear, RNNBase  # noqa: E402

__version__ = "0.1.0"
_MAX_THREADS = _core.max_threads  # the team's own bound, which its default size keeps within too

__all__ = ["LSTM", "GRU", "RNN", "RNNBase", "Linear", "functional", "set_num_threads", "get_num_threads",
           "build_info", "cuda_info", "set_simd_level", "release_scratch", "bptt", "gradients", "losses", "optim", "reference", "sequences",
           "truncated_bptt", "clip_grad_norm", "clip_grad_value"]


def release_scratch() -> int:
    """Frees the scratch memory layer calls keep between calls (grown to the largest call, so that a
    training loop allocates it once) and returns the bytes freed; the next call allocates afresh. The
    scratch is the process's, whichever threads make the calls (a server's, XLA's for fusedrnn.jax):
    layer calls take turns on the thread team, so one copy serves them all. Waits for a call in
    progress on another thread to finish; the arrays a fusedrnn.jax call still holds are kept."""
    return int(_core.release_scratch())


def set_num_threads(n: int) -> None:
    """Sets the number of native threads all fusedrnn compute uses (its one thread team; BLAS runs
    single-threaded inside it). Small layers use fewer: `fusedrnn._core.layer_split(cell, batch, hidden,
    dtype)` tells how a layer is shared (README, "How it is built"). Where the system refuses the
    threads (a cgroup's pids.max, a process limit), RuntimeError, and the team keeps its size."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n: expected an int thread count, got {type(n).__name__}")
    if not 1 <= n <= _MAX_THREADS:
        raise ValueError(f"n: expected a thread count in [1, {_MAX_THREADS}], got {n}")
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of native threads fusedrnn compute uses."""
    return _core.get_num_threads()


def _check_forced_simd_level() -> None:
    # The core falls back to the best supported level when FUSEDRNN_SIMD names one this machine
    # cannot run (or a misspelt one); say so rather than ignore the request silently.
    import os
    import warnings

    forced = os.environ.get("FUSEDRNN_SIMD")
    if forced and forced != _core.simd_level():
        warnings.warn(f"FUSEDRNN_SIMD={forced!r} is not a SIMD level this machine supports "
                      f"{_core.simd_levels_supported()}; using {_core.simd_level()!r}", RuntimeWarning,
                      stacklevel=2)


_check_forced_simd_level()


def set_simd_level(level: str) -> None:
    """Selects the SIMD level of the recurrence kernels: one of build_info()["simd_supported"]
    ("generic", "avx2", "avx512" on x86-64). The default is the best this CPU supports; the
    FUSEDRNN_SIMD environment variable, read at import, can name a lower one."""
    if not isinstance(level, str):
        raise TypeError(f"level: expected a str, got {type(level).__name__}")
    _core.set_simd_level(level)


def cuda_info() -> dict:
    """The CUDA module: "installed" (whether there is one: built into this fusedrnn, or the fusedrnn-cuda13
    plugin), "source" ("built in", "fusedrnn-cuda13 <version>" or None), "loaded" (whether it loads:
    the plugin must be fusedrnn's version, and the module needs cuBLAS 13 at run time, e.g. the
    nvidia-cublas wheel), and when loaded "module" (its import name), "architectures" (the compute
    capabilities compiled, comma-separated), "nvcc", "runtime" (the CUDA runtime it runs on, e.g.
    "13.0"), "devices" (visible GPUs, 0 without a driver), "device_names" (theirs, by index) and
    "jax_ffi" (the jaxlib its XLA FFI handlers for fusedrnn.jax on GPUs were built against, None: built
    without them); "error" says why it did not load, or how to get it."""
    from . import _cuda_layer

    return _cuda_layer.cuda_info()


def build_info() -> dict:
    """How this fusedrnn was built and what it runs with: version, SIMD level in use and those
    supported/compiled, CUDA (see cuda_info), the jaxlib whose XLA FFI headers fusedrnn.jax's handlers
    were built against (None: not built), the BLAS (package and version, OpenBLAS's build string, and
    the file it was loaded from), the thread team size and the size a process starts with (the CPUs
    it may run on, no more than `cgroup_cpu_limit`, its cgroups' CPU limit rounded up, 0: none), the
    OpenMP runtime whose threads run its jobs
(None: fusedrnn's own workers; see fusedrnn.torch.use_torch_threads), and the L2 size per core that
    decides whether a layer's threads share its batch rows or its hidden units."""
    try:
        blas, blas_library = _core.blas_config(), _core.blas_library()
    except RuntimeError as err:  # the bundled library missing or broken: every layer call says so too
        blas, blas_library = f"cannot load: {err}", ""
    return {
        "version": __version__,
        "simd": _core.simd_level(),
        "simd_supported": list(_core.simd_levels_supported()),
        "simd_compiled": list(_core.simd_levels_compiled()),
        "cuda": cuda_info(),
        "jax_ffi": getattr(_core, "jax_ffi_built_with_jaxlib", None),
        "blas": blas,
        "blas_name": _core.blas_name(),
        "blas_library": blas_library,
        "num_threads": _core.get_num_threads(),
        "default_num_threads": _core.default_num_threads(),
        "cgroup_cpu_limit": _core.cgroup_cpu_limit(),
        "openmp_runtime": _core.openmp_runtime() or None,
        "l2_cache_bytes": _core.l2_cache_bytes(),
    }
