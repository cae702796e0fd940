"""Object metadata (size, CRC32C, generation) of a folder's direct children, without reading them
(and, on gs://, of its sub-folders' children in one recursive listing: `list_subfolder_meta`).

On `gs://` this is one one-level listing (delimiter '/') of the folder through `transforms.io.storage`'s
per-process client and retries (`storage.gcs_client`, `storage.gcs_call`), asking only for the
fields it needs: the objects deeper down are never enumerated and no object is downloaded. GCS
reports an object's CRC32C as base64 of its 4 big-endian bytes; it is converted here to the same
8-digit lower-case hex that `crc32c_hex` computes from local bytes, so that the metadata of the
same bytes is equal wherever they are stored.

Locally, the size comes from `os.scandir` and the CRC32C is computed from the content (streamed).
Other schemes are not supported (a ValueError names the path).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import os

import google_crc32c

from transforms.io import storage

_CHUNK = 1024 * 1024
_LIST_FIELDS = "items(name,size,crc32c,generation),prefixes,nextPageToken"


@dataclasses.dataclass(frozen=True)
class ObjectMeta:
    size: int
    crc32c: str | None  # 8 hex digits, lower case; None when the store did not report one
    generation: int | None = None  # gs:// only


def crc32c_hex(data: bytes) -> str:
    """CRC32C of `data` as 8 lower-case hex digits."""
    return f"{google_crc32c.value(data):08x}"


def gcs_crc32c_to_hex(b64: str | None) -> str | None:
    """GCS's `crc32c` metadata (base64 of the big-endian 4-byte value) -> 8 lower-case hex digits;
    None for a missing or malformed value."""
    if not b64:
        return None
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 4:
        return None
    return raw.hex()


def local_file_meta(path: str) -> ObjectMeta | None:
    """Size and CRC32C of a local file (content streamed in 1 MiB chunks); None if it is not a file."""
    try:
        with open(path, "rb") as f:
            checksum = google_crc32c.Checksum()
            size = 0
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                checksum.update(chunk)
                size += len(chunk)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    return ObjectMeta(size, checksum.digest().hex())


def list_object_meta(folder: str, names: tuple[str, ...] | None = None) -> dict[str, ObjectMeta]:
    """{child file name: ObjectMeta} of the files directly in `folder` (sub-folders are left out).

    `names`, when given, limits the answer (and, locally, the files checksummed) to those names. A
    missing folder is empty; on gs:// a missing bucket raises FileNotFoundError, and storage
    errors surface as storage's OSErrors after its retries."""
    if storage.is_local(folder):
        if names is None:
            if not os.path.isdir(folder):
                return {}
            names = tuple(e.name for e in os.scandir(folder) if e.is_file())
        out = {}
        for name in names:
            meta = local_file_meta(os.path.join(folder, name))
            if meta is not None:
                out[name] = meta
        return out
    if storage.is_gcs(folder):
        found = _gcs_list_meta(folder)
        return found if names is None else {n: m for n, m in found.items() if n in names}
    raise ValueError(f"object metadata needs a local or gs:// folder, got {folder!r}")


def _gcs_list_meta(folder: str) -> dict[str, ObjectMeta]:
    bucket, key = storage.split_gcs(folder)
    prefix = storage.folder_prefix(key)

    def list_one_level() -> dict[str, ObjectMeta]:
        out = {}
        blobs = storage.gcs_client().list_blobs(bucket, prefix=prefix, delimiter="/", fields=_LIST_FIELDS,
                                                 retry=None, timeout=storage._TIMEOUT_S)
        for page in blobs.pages:  # a failed page restarts the whole listing (storage's retries)
            for blob in page:
                rest = blob.name[len(prefix):]
                if not rest or "/" in rest:  # the folder's own placeholder object
                    continue
                generation = int(blob.generation) if blob.generation is not None else None
                out[rest] = ObjectMeta(int(blob.size or 0), gcs_crc32c_to_hex(blob.crc32c), generation)
        return out

    return storage.gcs_call(folder, "list", list_one_level)


def list_subfolder_meta(folder: str) -> dict[str, dict[str, ObjectMeta]]:
    """{sub-folder name: {file name: ObjectMeta}} of the files exactly one folder below the gs://
    `folder` (`folder/<sub>/<file>`), from one recursive listing, paged (1,000 objects a page):
    e.g. every tile of a NAIP capture, `naip/<naip_id>/<x>_<y>/rgb.png`, at once. Storage errors
    surface as storage's OSErrors after its retries."""
    if not storage.is_gcs(folder):
        raise ValueError(f"a recursive listing needs a gs:// folder, got {folder!r}")
    bucket, key = storage.split_gcs(folder)
    prefix = storage.folder_prefix(key)

    def list_recursively() -> dict[str, dict[str, ObjectMeta]]:
        out: dict[str, dict[str, ObjectMeta]] = {}
        blobs = storage.gcs_client().list_blobs(bucket, prefix=prefix, fields=_LIST_FIELDS, retry=None,
                                                 timeout=storage._TIMEOUT_S)
        for page in blobs.pages:  # a failed page restarts the whole listing (storage's retries)
            for blob in page:
                parts = blob.name[len(prefix):].split("/")
                if len(parts) != 2 or not all(parts):  # deeper objects and folder placeholders
                    continue
                generation = int(blob.generation) if blob.generation is not None else None
                out.setdefault(parts[0], {})[parts[1]] = ObjectMeta(
                    int(blob.size or 0), gcs_crc32c_to_hex(blob.crc32c), generation)
        return out

    return storage.gcs_call(folder, "list", list_recursively)
