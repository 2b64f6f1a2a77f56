"""Imports of optional dependencies, with the extra that installs each when it is missing."""

from __future__ import annotations

import functools
import importlib


def require(module: str, extra: str):
    """Imports `module`, or raises ImportError saying which extra of fusedrnn brings it (or, for a
    package that is installed but fails to import, why)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        if _missing_is(err, top):
            raise ImportError(f"this needs {top}: pip install 'fusedrnn[{extra}]'") from err
        raise ImportError(f"this needs {top}, which is installed but fails to import: {_one_line(err)}") from err


NOT_INSTALLED = "not installed"


@functools.lru_cache(maxsize=None)
def import_problem(module: str) -> str | None:
    """None where `module` imports; else why not: NOT_INSTALLED, or the error of an installed package
    that fails to import (a missing or mismatched dependency of its own), on one line."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        if _missing_is(err, module.split(".")[0]):
            return NOT_INSTALLED
        return _one_line(err)
    except Exception as err:  # a broken package may raise anything as it loads
        return _one_line(err)
    return None


def _missing_is(err: ImportError, top: str) -> bool:
    """The import failed because `top` itself (or a module of it) is absent, not one of its dependencies."""
    name = getattr(err, "name", None) or ""
    return isinstance(err, ModuleNotFoundError) and (name == top or name.startswith(top + "."))


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"
