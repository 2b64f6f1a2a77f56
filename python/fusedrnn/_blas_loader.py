"""Loads the BLAS library that ships inside the package (fusedrnn/lib) before the extension needs it.

The extension opens that library by its path anyway (cpu/blas.cpp); loading it here first is for its
threads. fusedrnn calls this BLAS only single-threaded, from its own thread team, but OpenBLAS starts
its worker threads when the library loads, and they spin for a while before sleeping, on cores the
team is about to use; asking for one thread during the load starts none.

The library is loaded with RTLD_LOCAL, by its path, and the extension looks its functions up in it
(they carry a scipy_ prefix besides), so it never stands in for, or is replaced by, the BLAS of numpy,
torch, scipy or anything else in the process, another copy of the same library included.
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
