"""Imports of optional dependencies, with the extra that installs each when it is missing."""

from __future__ import annotations

import importlib


def require(module: str, extra: str):
    """Imports `module`, or raises ImportError saying which extra of fusedrnn brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"this needs {module.split('.')[0]}: pip install 'fusedrnn[{extra}]'") from err
