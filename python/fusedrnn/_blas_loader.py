"""Loads scipy-openblas32's shared library before the extension module needs it.

The extension carries an RPATH to the library for the usual layout (both packages in one site-packages).
When they live in different directories (a virtual environment with system site packages, a user site),
that path misses; loading the library by its full path first makes the dynamic loader reuse it.

fusedrnn calls this BLAS only single-threaded, from its own thread team. OpenBLAS starts its worker
threads when the library loads, and they spin for a while before sleeping, on cores the team is about to
use; asking for one thread during the load starts none.
"""

import ctypes
import os
import sys


def preload() -> None:
    if sys.platform == "win32":
        return
    previous = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import scipy_openblas32  # loads the library

        suffix = ".dylib" if sys.platform == "darwin" else ".so"
        path = os.path.join(scipy_openblas32.get_lib_dir(), f"lib{scipy_openblas32.get_library()}{suffix}")
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    finally:
        if previous is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = previous
