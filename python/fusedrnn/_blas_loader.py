"""Loads scipy-openblas32's shared library before the extension module needs it.

The extension carries an RPATH to the library for the usual layout (both packages in one site-packages).
When they live in different directories (a virtual environment with system site packages, a user site),
that path misses; loading the library by its full path first makes the dynamic loader reuse it.
"""

import ctypes
import os
import sys


def preload() -> None:
    if sys.platform == "win32":
        return
    import scipy_openblas32

    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    path = os.path.join(scipy_openblas32.get_lib_dir(), f"lib{scipy_openblas32.get_library()}{suffix}")
    if os.path.exists(path):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
