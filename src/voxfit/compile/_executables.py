"""Executables a build keeps in the TVM worker process instead of linking a library.

A build with ``export=False`` leaves its executable here under the library path it would
have written; a local measurement in the same worker (``voxfit.latency``'s timing ops) runs
it from here (~2 s of linking saved per candidate). Only the last few are kept. Plain
Python: the objects are TVM executables, but this module imports no TVM.
"""

from __future__ import annotations

from typing import Any

KEEP = 4
_EXECUTABLES: dict[str, Any] = {}


def keep_executable(lib: str, executable: Any) -> None:
    """Keep ``executable`` for ``lib`` (dropping the oldest beyond :data:`KEEP`)."""
    _EXECUTABLES[lib] = executable
    while len(_EXECUTABLES) > KEEP:
        _EXECUTABLES.pop(next(iter(_EXECUTABLES)))


def kept_executable(lib: str) -> Any | None:
    """The executable a build kept for ``lib`` in this process, or None (load the file)."""
    return _EXECUTABLES.get(lib)
