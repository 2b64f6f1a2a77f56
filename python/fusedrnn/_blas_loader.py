"""Loads the BLAS library that ships inside the package (fusedrnn/lib) before the extension needs it.

The extension finds that library through its RPATH ($ORIGIN/lib) anyway; loading it here first, by its
path, is for its threads. fusedrnn calls this BLAS only single-threaded, from its own thread team, but
OpenBLAS starts its worker threads when the library loads, and they spin for a while before sleeping,
on cores the team is about to use; asking for one thread during the load starts none.

The library's functions carry a scipy_ prefix and it is loaded with RTLD_LOCAL, so it never stands in
for, or is replaced by, the BLAS of numpy, torch or anything else in the process.
"""

import ctypes
import glob
import os
import sys

LIB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib")


def library_files() -> list:
    """The BLAS shared libraries installed in fusedrnn/lib."""
    return sorted(glob.glob(os.path.join(LIB_DIR, "libscipy_openblas*.so*"))
                  + glob.glob(os.path.join(LIB_DIR, "libscipy_openblas*.dylib")))


def preload() -> None:
    if sys.platform == "win32":
        return
    previous = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        for path in library_files():
            ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    finally:
        if previous is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = previous
