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


NATIVE_THREADS = 1


@functools.cache
def limit_native_threads(threads: int = NATIVE_THREADS) -> bool:
    """Runs numpy's BLAS (and any OpenMP pool) on `threads` threads in this process.

    The selection multiplies matrices of a few dozen rows: a BLAS pool never speeds them up, and
    its threads spin while they wait. With OpenBLAS's default (one thread per core) the build used
    2.4x the CPU in one process, and with 2 worker processes on 2 cores it ran ~6x slower than with
    one thread each (`s2naip bench --companion-repo ...`, docs/performance.md); on Dataflow each vCPU
    runs a worker process, so every process's pool would compete with the others. Environment
    variables (OMP_NUM_THREADS, ...) act only before numpy is imported; threadpoolctl changes the
    loaded libraries' pools at run time. False when it could not."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)
    except Exception as err:  # noqa: BLE001 - a missing or unknown library: the build still runs, slower
        _LOG.warning("could not limit the BLAS/OpenMP threads (%s); the selection may run slower", err)
        return False
    return True


def tune_selection_process() -> None:
    """Everything a process that builds pairs applies once (`BuildPairDoFn.setup`, and the
    benchmarks, which measure what the workers run): the allocator settings and one BLAS thread."""
    tune_allocator()
    limit_native_threads()
