"""Progress of a build on a local runner, across worker processes: done/total, %, rate and ETA.

Beam's metrics reach the launcher only when the job ends (the in-process runner returns them with
its result), and `--direct_running_mode=multi_processing` workers are other processes, whose logs do
not reach the console. So the workers count into a folder on the launcher's disk instead:

* `CountProgress(folder, field)` passes its elements through and counts them per process; each
  process rewrites its own small JSON file (`<pid>-<nonce>.json`: cumulative counts) at most once a
  second, and at the end of each bundle (a file replace, atomic);
* `ProgressReporter(folder)` runs on the launcher, on a thread: it sums the files every second and
  prints a line every `every_s` seconds, and a last one when the job ends.

The build counts `listed` (tile ids read from the listing or the manifest, before deduplication)
and `done` (pair and reject records, built or carried: every listed id ends in exactly one). The
listing finishes before the first record is made (ids are deduplicated by a GroupByKey first), so
once records flow, `listed` is the total. A worker that cannot see the folder (a remote runner)
counts nothing: the build passes a folder only to local runners.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
import uuid
from typing import Callable, TextIO

import apache_beam as beam

FIELDS = ("listed", "done")
FLUSH_EVERY_S = 1.0  # a worker process rewrites its file at most this often
REPORT_EVERY_S = 10.0  # the launcher prints a line this often
RATE_WINDOW_S = 30.0  # the rate (and so the ETA) is measured over this last stretch


class _ProcessCounts:
    """This process's counts towards one progress folder."""

    def __init__(self, folder: str):
        self.folder = folder
        self.counts = dict.fromkeys(FIELDS, 0)
        self.pid = os.getpid()
        self.name = f"{self.pid}-{uuid.uuid4().hex[:8]}.json"
        self.last_flush = 0.0
        self.dirty = False


_LOCK = threading.Lock()
_COUNTS: dict[str, _ProcessCounts] = {}


def _process_counts(folder: str) -> _ProcessCounts:
    state = _COUNTS.get(folder)
    if state is None or state.pid != os.getpid():  # first use, or a forked child
        state = _COUNTS[folder] = _ProcessCounts(folder)
    return state


def add(folder: str, field: str, n: int = 1) -> None:
    """Counts `n` towards `field`; the process's file is rewritten when it is a second old."""
    with _LOCK:
        state = _process_counts(folder)
        state.counts[field] += n
        state.dirty = True
        if time.monotonic() - state.last_flush >= FLUSH_EVERY_S:
            _write(state)


def flush(folder: str) -> None:
    with _LOCK:
        state = _process_counts(folder)
        if state.dirty:
            _write(state)


def _write(state: _ProcessCounts) -> None:
    state.last_flush = time.monotonic()
    state.dirty = False
    if not os.path.isdir(state.folder):  # not the launcher's machine, or the job is over
        return
    path = os.path.join(state.folder, state.name)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(state.counts, f)
        os.replace(tmp, path)
    except OSError:  # progress is informative: never fail a bundle for it
        pass


def read(folder: str) -> dict[str, int]:
    """The counts of every worker process, summed."""
    total = dict.fromkeys(FIELDS, 0)
    try:
        names = [n for n in os.listdir(folder) if n.endswith(".json")]
    except OSError:
        return total
    for name in names:
        try:
            with open(os.path.join(folder, name)) as f:
                counts = json.load(f)
        except (OSError, ValueError):  # replaced while read: the next poll gets it
            continue
        for field in FIELDS:
            total[field] += int(counts.get(field, 0))
    return total


class CountProgressDoFn(beam.DoFn):
    """Passes each element through (or `fn(element)`), counting it towards `field`."""

    def __init__(self, folder: str, field: str, fn: Callable | None = None):
        self.folder, self.field, self.fn = folder, field, fn

    def process(self, element):
        add(self.folder, self.field)
        yield element if self.fn is None else self.fn(element)

    def finish_bundle(self):
        flush(self.folder)


def identity(element):
    return element


def count(folder: str | None, field: str, fn: Callable | None = None) -> beam.PTransform:
    """The counting step (`fn` applied to each element), or just `fn` (identity) without a folder."""
    if folder is None:
        return beam.Map(fn or identity)
    return beam.ParDo(CountProgressDoFn(folder, field, fn))


# ---------------------------------------------------------------------------------------------
# The launcher's side


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(listed: int, done: int, rate: float | None, elapsed: float) -> str:
    """One progress line: the listing so far, then done/total, %, rate and ETA."""
    if not done:
        return f"progress: {listed:,} tile ids listed ({duration(elapsed)} elapsed)"
    total = max(listed, done)
    line = f"progress: {done:,}/{total:,} tiles ({100 * done / total:.1f}%)"
    if rate:
        line += f", {rate:,.1f} tiles/s, ETA {duration((total - done) / rate)}"
    return line + f" ({duration(elapsed)} elapsed)"


class ProgressReporter:
    """Prints the build's progress from a folder the workers count into (see the module doc)."""

    def __init__(self, folder: str, every_s: float | None = None, out: TextIO | None = None,
                 poll_s: float | None = None):
        self.every_s = REPORT_EVERY_S if every_s is None else every_s
        self.poll_s = min(1.0, self.every_s) if poll_s is None else poll_s
        self.folder = folder
        self.out = out
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._started = time.monotonic()
        self.lines: list[str] = []

    def __enter__(self) -> "ProgressReporter":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop(final=exc[0] is None)

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="s2naip-progress", daemon=True)
        self._thread.start()

    def stop(self, final: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if final:
            counts = read(self.folder)
            elapsed = time.monotonic() - self._started
            if counts["done"]:
                self._print(f"progress: {counts['done']:,}/{max(counts['listed'], counts['done']):,} tiles "
                            f"in {duration(elapsed)}, {counts['done'] / max(elapsed, 1e-9):,.1f} tiles/s overall")

    def rate(self, now: float, done: int) -> float | None:
        """Tiles per second over the last RATE_WINDOW_S (None before two samples with records)."""
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()
        first_t, first_done = self._samples[0]
        if now - first_t <= 0 or done <= first_done:
            return None
        return (done - first_done) / (now - first_t)

    def _loop(self) -> None:
        last_print = time.monotonic()
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            counts = read(self.folder)
            rate = self.rate(now, counts["done"]) if counts["done"] else None
            if now - last_print < self.every_s or not (counts["listed"] or counts["done"]):
                continue
            self._print(progress_line(counts["listed"], counts["done"], rate, now - self._started))
            last_print = now

    def _print(self, line: str) -> None:
        self.lines.append(line)
        print(line, file=self.out or sys.stderr, flush=True)
