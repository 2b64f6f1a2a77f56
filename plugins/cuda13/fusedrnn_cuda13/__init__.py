"""fusedrnn's CUDA module for NVIDIA GPUs with a CUDA 13 driver (the fusedrnn-cuda13 distribution).

Nothing here is meant to be imported directly: `import fusedrnn` finds `fusedrnn_cuda13._cuda` when this
package is installed and its version is fusedrnn's (`fusedrnn.build_info()["cuda"]` says so). This file
loads no CUDA library, so fusedrnn can read the version before loading the module.
"""

from ._version import __version__  # written at build time from fusedrnn's version

__all__ = ["__version__"]
