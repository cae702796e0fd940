"""Process-level tuning for the per-tile core, applied once per worker process (DoFn.setup)."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

_LOG = logging.getLogger(__name__)

# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024


@functools.cache
def tune_allocator() -> bool:
    """Keeps glibc from mmap-ing and trimming every ~1 MB temporary of the selection.

    Each tile allocates and frees a few dozen arrays of 0.1-2 MB. With glibc's defaults these come
    from fresh mmaps or a heap top that is trimmed after each free, so every tile pays thousands of
    page faults: measured here, that doubles the selection's cost. Serving them from the heap keeps
    at most TRIM_THRESHOLD_BYTES of freed memory in the process. A no-op where libc has no mallopt.
    """
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not ok:
        _LOG.warning("mallopt refused the allocator settings; the selection may run slower")
    return ok
