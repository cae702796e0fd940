"""Reading ahead: a worker's reads overlap each other and its computing.

On an object store every read is a round trip (tens of milliseconds on GCS) and a tile reads 4 to 8
files. Read one after the other, a worker process would wait ~0.2-0.4 s per tile for ~10 ms of
computing. `ReadAhead` runs the reads of a batch of tiles on a small thread pool (reads release the
GIL) while the calling thread decodes and selects the tiles in order; `TileReads` hands each tile's
bytes to `pairs.load_tile` exactly as a direct read would, exceptions included (a missing file
raises FileNotFoundError when its bytes are asked for, not before).

Memory stays bounded by the batch: a batch of 32 robust tiles holds ~5 MB of PNG bytes. A runner
may run several bundles of a step at once in one process (one DoFn instance each): they share the
process's pool (`shared_read_ahead`), so the threads and connections per process stay bounded.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Callable, Iterable

from transforms.io import storage


class TileReads:
    """The reads of one tile, started ahead: `reads(path, limit)` is `storage.read_bytes(path, limit)`,
    answered from the read started ahead when there is one for that path and limit, directly
    otherwise; a path of `absent` (files a listing showed are not there) raises FileNotFoundError
    at once, without a request; `folders` ({folder: whether anything lies under it}) are folders
    the listing saw whole, `holds_any`."""

    def __init__(self, futures: dict[str, concurrent.futures.Future], limit: int, absent: frozenset[str] = frozenset(),
                 listed: bool = False, folders: dict[str, bool] | None = None):
        self._futures = futures
        self._limit = limit
        self._absent = absent
        self._listed = listed
        self._folders = dict(folders or {})
        self._kept: dict[str, object] = {}  # what `first_decides` made of a first file's bytes
        self._lock = threading.Lock()  # a reader thread may add the reads a first file let start
        self._cancelled = False

    @property
    def listed_absent(self) -> frozenset[str] | None:
        """The paths a listing showed absent, None when the reads were started without a listing
        (then `absent` is not known to be complete): `pairs.load_tile` plans its optional reads
        from it (`pairs.planned_extra_bands`)."""
        return self._absent if self._listed else None

    def holds_any(self, folder: str) -> bool | None:
        """Whether anything lies under `folder`, as the listing that started these reads saw it;
        None when it did not list that folder whole (`pairs.load_tile` then lists it itself)."""
        return self._folders.get(folder)

    def kept(self, path: str):
        """What the read-ahead's `first_decides` made of `path`'s bytes (e.g. the decoded image), once
        the tile has read them (`self(path, limit)`); None when there is nothing."""
        with self._lock:
            return self._kept.get(path)

    def __call__(self, path: str, limit: int) -> bytes:
        if path in self._absent:
            raise FileNotFoundError(path)
        with self._lock:
            future = self._futures.pop(path, None) if limit == self._limit else None
        if future is None:
            return storage.read_bytes(path, limit)
        return future.result()

    def _add(self, path: str, future_of) -> None:
        """Starts `future_of()` for `path` unless the tile was cancelled or has it already."""
        with self._lock:
            if not self._cancelled and path not in self._futures:
                self._futures[path] = future_of()

    def cancel(self) -> None:
        """Drops the reads the tile did not ask for (e.g. after an early reject): those not started
        are cancelled, those running finish and are discarded."""
        with self._lock:
            self._cancelled = True
            futures = list(self._futures.values())
            self._futures.clear()
            self._kept.clear()
        for future in futures:
            future.cancel()


class ReadAhead:
    """A pool of `threads` reader threads (0: no pool, every read is direct). A thread pool cannot be
    pickled: DoFns get theirs in `setup`, from `shared_read_ahead`."""

    def __init__(self, threads: int):
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.threads = threads
        self._pool = (concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="s2naip-read")
                      if threads else None)

    def start(self, paths: Iterable[str], limit: int, absent: frozenset[str] = frozenset(),
              first_decides: Callable[[bytes], bool | tuple] | None = None, listed: bool = False,
              folders: dict[str, bool] | None = None) -> TileReads:
        """Starts reading `paths` (in order; those in `absent` are never read) and returns their
        reader. With `first_decides`, only the first path is read at once; on its reader thread,
        `first_decides(its bytes)` then says whether to start the others (False: the tile will not
        ask for them, e.g. a NAIP image the build rejects before reading its Sentinel-2); it may
        return `(go_on, value)` instead, and the tile finds `value` (e.g. the image it decoded to
        decide) with `TileReads.kept(first)`. A path not started is still read directly if the tile
        asks for it, so this changes requests, never results. `listed`: `absent` comes from a
        listing of the tile's folders (every file it does not name is there),
        `TileReads.listed_absent`; `folders`: {folder: whether anything lies under it} for those it
        listed whole, `TileReads.holds_any`."""
        if self._pool is None:
            return TileReads({}, limit, absent, listed, folders)
        paths = [p for p in dict.fromkeys(paths) if p not in absent]
        tile_reads = TileReads({}, limit, absent, listed, folders)
        if first_decides is None or not paths:
            for path in paths:
                tile_reads._add(path, lambda path=path: self._pool.submit(storage.read_bytes, path, limit))
            return tile_reads
        first, rest = paths[0], paths[1:]
        pool = self._pool

        def read_first() -> bytes:
            data = storage.read_bytes(first, limit)
            try:
                go_on = first_decides(data)
            except Exception:  # noqa: BLE001 - the check only saves requests: when unsure, read all
                go_on = True
            if isinstance(go_on, tuple):
                go_on, value = go_on
                if value is not None:
                    with tile_reads._lock:
                        tile_reads._kept[first] = value
            if go_on:
                for path in rest:
                    tile_reads._add(path, lambda path=path: pool.submit(storage.read_bytes, path, limit))
            return data

        tile_reads._add(first, lambda: pool.submit(read_first))
        return tile_reads

    def map(self, fn, items: list) -> Iterable:
        """`fn` over `items` on the pool, results in order (directly without a pool)."""
        if self._pool is None:
            return map(fn, items)
        return self._pool.map(fn, items)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


_shared: dict[int, ReadAhead] = {}
_shared_pid: int | None = None
_shared_lock = threading.Lock()


def shared_read_ahead(threads: int) -> ReadAhead:
    """The process's ReadAhead of `threads` threads (created on first use, again after a fork; it
    lives as long as the process: DoFns share it and do not close it)."""
    global _shared_pid
    with _shared_lock:
        if _shared_pid != os.getpid():
            _shared.clear()  # a forked child does not inherit the parent's threads
            _shared_pid = os.getpid()
        if threads not in _shared:
            _shared[threads] = ReadAhead(threads)
        return _shared[threads]
