"""One run per output folder: what it holds, how a rerun is refused or replaced, and `_SUCCESS`.

A run writes its data folders, then `run.json`, then `_SUCCESS` (a JSON manifest of every data file)
last. Readers trust an output only when `_SUCCESS` exists, and read the files it lists. A rerun into
a folder that already holds a run is refused unless `--overwrite` is given; then the old `_SUCCESS`
is deleted first (readers see no complete run from that moment), the old files next, and the new
run publishes its own `_SUCCESS` at the end: readers never see shards of two runs as one dataset.
"""
from __future__ import annotations

import dataclasses
import json
import time

from apache_beam.io.filesystems import FileSystems

from transforms.io import storage

FORMATS = ("parquet", "tfrecord", "png")
# Folders a run writes: each format its own, so a reader pointed at one finds one format only.
FORMAT_FOLDERS = {"parquet": ("pairs",), "tfrecord": ("tfrecord",), "png": ("png", "png_rejects", "png_staging")}
ALWAYS_FOLDERS = ("rejects",)
SUCCESS = "_SUCCESS"
RUN_JSON = "run.json"


class OutputNotEmpty(Exception):
    """The output folder already holds a run (or part of one) and --overwrite was not given."""


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    path: str
    formats: tuple[str, ...] = ("parquet",)
    num_shards: int = 0
    tfrecord_gzip: bool = False

    def __post_init__(self):
        if not self.formats:
            raise ValueError("--format needs at least one of " + ", ".join(FORMATS))
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown --format {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
        if self.num_shards < 0:
            raise ValueError(f"--num-shards must be >= 0, got {self.num_shards}")

    @classmethod
    def parse(cls, path: str, formats: str, num_shards: int = 0, tfrecord_gzip: bool = False) -> "OutputSpec":
        names = tuple(dict.fromkeys(f.strip() for f in formats.split(",") if f.strip()))
        return cls(path, names, num_shards, tfrecord_gzip)


def count_text(n: int, noun: str) -> str:
    """'1 file', '2 files'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run_folders() -> tuple[str, ...]:
    """Every folder any run may write (a rerun clears them all, whatever formats it has)."""
    return ALWAYS_FOLDERS + tuple(folder for folders in FORMAT_FOLDERS.values() for folder in folders)


def _existing_run_files(output: str) -> list[str]:
    found = []
    for name in (SUCCESS, RUN_JSON):
        if storage.exists(storage.join(output, name)):
            found.append(storage.join(output, name))
    for folder in run_folders():
        pattern = storage.join(output, folder, "**")
        found += [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    return found


def prepare_output(output: str, overwrite: bool) -> int:
    """Refuses a non-empty output, or clears it for a rerun (`_SUCCESS` first); returns files deleted."""
    existing = _existing_run_files(output)
    if not existing:
        return 0
    if not overwrite:
        raise OutputNotEmpty(
            f"{output} already holds a run ({count_text(len(existing), 'file')}, e.g. {existing[0]}); "
            "choose a new --output or pass --overwrite to replace it"
        )
    success = storage.join(output, SUCCESS)
    if success in existing:
        FileSystems.delete([success])
        existing.remove(success)
    if existing:
        FileSystems.delete(existing)
    return len(existing) + 1


def success_content(run_info: dict, files: list[str]) -> dict:
    """What `_SUCCESS` holds: the run's file list, its version and output, when it was published."""
    return {
        "pipeline_version": run_info.get("pipeline_version"),
        "output": run_info.get("output"),
        "files": sorted(files),
        "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def publish(output: str, summary: dict, files: list[str]) -> str:
    """Writes run.json, then _SUCCESS (the manifest of files) last."""
    storage.write_bytes_atomic(storage.join(output, RUN_JSON), json.dumps(summary, indent=2, sort_keys=True).encode())
    path = storage.join(output, SUCCESS)
    storage.write_bytes_atomic(path, json.dumps(success_content(summary, files), indent=2).encode())
    return path


def read_success(output: str) -> dict | None:
    """The `_SUCCESS` manifest of a published run, or None when the folder holds no complete run."""
    try:
        return json.loads(storage.read_bytes(storage.join(output, SUCCESS), 256 * 1024 * 1024))
    except FileNotFoundError:
        return None
