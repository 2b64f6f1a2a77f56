"""Memory figures of a benchmark row: the bytes a training forward keeps for backward, and the peak
resident memory one call adds.

Kept for backward (`{peer}_saved_bytes`, training rows): fusedrnn's tape (states, cell states and gate
values, the sizes the core's tape layout gives) and torch.nn's autograd-saved tensors, counted by
`benchmark.saved_for_backward_nbytes`; peers that keep neither have no such field.

Peak of a call (`{peer}_peak_rss_bytes`, every row): how far one call raises the process's resident set
above what it was just before, on Linux: glibc's malloc first hands its free pages back to the system
(`malloc_trim`), then the kernel's high-water mark is reset (writing 5 to /proc/self/clear_refs, see
proc(5)) and VmHWM after the call less VmRSS before it is the figure. It counts every page the call
touches that was not resident: outputs, tape, workspace, whichever allocator they come from, fusedrnn's
own scratch included (released before the call, as a first call would find it); it does not count
memory another allocator kept from earlier calls and reuses without giving it back (glibc's is trimmed
first; caches such as oneDNN's or XLA's are not), and it is page-granular. Where the method is
not available (not Linux, or the files are not writable) the field is None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Callable

from . import release_scratch

# Which entry of saved_for_backward_nbytes describes each peer's backward state.
SAVED_BYTES_SOURCE = {"fusedrnn": "fusedrnn", "torch": "torch", "torch-1t": "torch"}

PEAK_METHOD = ("peak resident-set growth of one call: VmHWM after the call less VmRSS before it, the "
               "high-water mark reset through /proc/self/clear_refs after fusedrnn's release_scratch() "
               "and glibc's malloc_trim(0)")
SAVED_METHOD = ("bytes kept for backward after a training forward, beyond the input and weights: "
                "fusedrnn's tape, torch.nn's autograd-saved tensors")


def _proc_status_bytes(*keys: str) -> dict:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                values[key] = int(value.split()[0]) * 1024  # the kernel writes these in kB
    return values


def _malloc_trim() -> Callable[[], None]:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


def peak_rss_growth(fn: Callable[[], None]) -> int | None:
    """Bytes by which one call of fn raises the resident set above its level just before (see the
    module's docstring for what that counts), or None where the method is not available."""
    try:
        gc.collect()
        release_scratch()
        _malloc_trim()()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_bytes("VmRSS")["VmRSS"]
    except (OSError, KeyError):
        return None
    fn()
    return max(0, _proc_status_bytes("VmHWM")["VmHWM"] - before)


def memory_fields(problem, fns: dict) -> dict:
    """Per mode, the memory fields of a row: {peer}_peak_rss_bytes for every (peer, mode) in fns (the
    callables timed, already warmed up) and, for training, {peer}_saved_bytes where the peer's backward
    state is counted."""
    from .benchmark import saved_for_backward_nbytes

    fields = {mode: {} for _, mode in fns}
    for (name, mode), fn in fns.items():
        fields[mode][f"{name}_peak_rss_bytes"] = peak_rss_growth(fn)
    if "training" in fields:
        saved = saved_for_backward_nbytes(problem, {SAVED_BYTES_SOURCE.get(name) for name, _ in fns})
        for name, _ in fns:
            source = SAVED_BYTES_SOURCE.get(name)
            if source in saved:
                fields["training"][f"{name}_saved_bytes"] = saved[source]
    return fields
