"""One small storage layer for local paths and cloud URLs (gs:// ...), on Beam's FileSystems.

Local paths take a direct fast path; everything else goes through `apache_beam.io.filesystems`,
so the same code reads a local sample and a bucket.
"""
from __future__ import annotations

import os
import uuid

from apache_beam.io.filesystems import FileSystems


def is_local(path: str) -> bool:
    return "://" not in path


def read_bytes(path: str, limit: int) -> bytes:
    """The whole file; FileNotFoundError when absent; ValueError when larger than `limit` bytes."""
    if is_local(path):
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except IsADirectoryError:
            raise FileNotFoundError(path) from None
    else:
        if not FileSystems.exists(path):
            raise FileNotFoundError(path)
        with FileSystems.open(path) as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data


def dir_has_files(path: str) -> bool:
    """Whether anything lies under the folder `path` (folders are prefixes on object stores)."""
    if is_local(path):
        return os.path.isdir(path) and any(os.scandir(path))
    result = FileSystems.match([path.rstrip("/") + "/*"], limits=[1])[0]
    return bool(result.metadata_list)


def list_children(path: str) -> list[str]:
    """Names of the direct children (files or folders) of folder `path`, sorted."""
    if is_local(path):
        if not os.path.isdir(path):
            return []
        return sorted(entry.name for entry in os.scandir(path))
    prefix = path.rstrip("/") + "/"
    names = set()
    for meta in FileSystems.match([prefix + "**"])[0].metadata_list:
        rest = meta.path[len(prefix) :]
        if rest:
            names.add(rest.split("/", 1)[0])
    return sorted(names)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Writes `path` so that readers see the old file or the whole new one, never a part."""
    if is_local(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    # Object stores publish an object only when its upload completes.
    with FileSystems.create(path) as f:
        f.write(data)


def exists(path: str) -> bool:
    if is_local(path):
        return os.path.exists(path)
    return FileSystems.exists(path)


def makedirs(path: str) -> None:
    if is_local(path):
        os.makedirs(path, exist_ok=True)

