"""fusedrnn's native threads inside a torch program: the thread team's jobs run on torch's own OpenMP
threads rather than on fusedrnn's workers.

torch's OpenMP threads spin for a while after each of torch's parallel operators (GNU OpenMP's default
wait policy). In a training step, the fused layer's backward follows the head's backward and the next
forward follows the optimizer step, so a worker of fusedrnn's own would share a core with a spinning
torch thread and hold up every time step's barrier. Run on torch's threads instead, a job starts on
threads that are awake and shares no core with them. The split of the work still follows
fusedrnn.get_num_threads(), so results are the same bit for bit either way (bench/NOTES.md has the
measurements behind this default).
"""

from __future__ import annotations

import os
import re

import torch

from .. import _core

# GNU's libgomp, Intel's libiomp5 and LLVM's libomp (all three export GOMP_parallel), as the loader or
# auditwheel names them (libgomp-a34b3233.so.1).
_OPENMP_LIBRARY = re.compile(r"^lib(gomp|iomp5|omp)([-.][0-9a-f]+)?\.so(\.[0-9]+)*$")


def torch_openmp_runtime() -> str | None:
    """The path of the OpenMP runtime torch's parallel operators run on in this process, or None when
    torch's parallel backend is not OpenMP or its runtime cannot be told apart (Linux only)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6}
    except OSError:
        return None
    runtimes = sorted(p for p in paths if _OPENMP_LIBRARY.match(os.path.basename(p)))
    torch_dir = os.path.dirname(os.path.dirname(torch.__file__))
    # torch's own copy (torch/lib, or torch.libs in auditwheel-repaired wheels) when there are several.
    own = [p for p in runtimes if p.startswith(torch_dir + os.sep + "torch")]
    candidates = own or runtimes
    return candidates[0] if len(candidates) == 1 else None


def use_torch_threads(enabled: bool = True) -> bool:
    """Runs fusedrnn's native jobs (every call, NumPy modules included) on torch's OpenMP threads
    (enabled, the default once fusedrnn.torch is imported) or on fusedrnn's own workers. Only the
    first Python thread to call after this uses torch's threads (GNU OpenMP starts a pool for each
    thread that opens a parallel region); other threads' calls run on fusedrnn's workers, as do those
    of a thread where torch runs one thread. Returns whether jobs now run on torch's threads: False
    when torch's runtime could not be found (see torch_openmp_runtime), and in a process forked from
    one whose fusedrnn thread team had started (the runtime's threads did not survive the fork)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    library = torch_openmp_runtime() if enabled else None
    _core.use_openmp_runtime(library or "")
    return bool(_core.openmp_runtime())
