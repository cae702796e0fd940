"""The `latest` pointer: a small JSON file naming the published dataset version readers should use.

    {"run": "gs://bucket/pairs/v20260301", "published": "2026-03-01T06:12:00Z"}

It is written atomically (readers see the old pointer or the new one, never a part), and only
ever to a run whose `_SUCCESS` exists: `point_latest` checks it first, so a run that failed or
was killed in the middle leaves the pointer on the previous version. The build moves it as its
very last step, after `_SUCCESS` (so it also moves on Dataflow, where the launcher does not wait).
"""
from __future__ import annotations

import json
import time

from transforms.io import publish, storage

MAX_POINTER_BYTES = 64 * 1024


class RunNotPublished(RuntimeError):
    """The pointer was asked to move to a run without `_SUCCESS`."""


def point_latest(pointer_path: str, run_dir: str) -> dict:
    """Points `pointer_path` at `run_dir` after checking that the run is complete; returns the
    pointer's content. Raises RunNotPublished (the pointer untouched) without `_SUCCESS`."""
    success = publish.read_success(run_dir)
    if success is None:
        raise RunNotPublished(f"{run_dir} has no {publish.SUCCESS}: the latest pointer stays where it is")
    pointer = {"run": run_dir.rstrip("/"), "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_bytes_atomic(pointer_path, (json.dumps(pointer, indent=2, sort_keys=True) + "\n").encode())
    return pointer


def read_latest(pointer_path: str) -> dict | None:
    """The pointer's content, None when there is no pointer yet; ValueError if it is not a pointer."""
    try:
        data = storage.read_bytes(pointer_path, MAX_POINTER_BYTES)
    except FileNotFoundError:
        return None
    try:
        pointer = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{pointer_path}: not a latest pointer ({e})") from None
    if not isinstance(pointer, dict) or not isinstance(pointer.get("run"), str) or not pointer["run"]:
        raise ValueError(f"{pointer_path}: not a latest pointer (no \"run\")")
    return pointer


def resolve_since(value: str | None, *, missing_pointer_ok: bool = False) -> str | None:
    """A `--since` value: a run folder as it is, or a pointer file (`*.json`) resolved to the run it
    names. None stays None. A pointer that does not exist is an error (a typo must not turn into a
    full rebuild), or None (no previous run: a full build) with `missing_pointer_ok`."""
    if not value:
        return None
    if value.endswith(".json"):
        pointer = read_latest(value)
        if pointer is None:
            if missing_pointer_ok:
                return None
            raise FileNotFoundError(f"latest pointer not found: {value}")
        return pointer["run"]
    return value.rstrip("/")
