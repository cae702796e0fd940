"""Object metadata (size, CRC32C, generation) of a folder's direct children, without reading them
(and, on gs://, of many folders at once in a few range listings: `list_folders_meta`).

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
import stat
from typing import Iterable

import google_crc32c

from transforms.io import storage

_CHUNK = 1024 * 1024
_LIST_FIELDS = "items(name,size,crc32c,generation),prefixes,nextPageToken"
PAGE_SIZE = 1000  # GCS's largest listing page


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
    """Size and CRC32C of a local file (content streamed in chunks of at most 1 MiB, the first one
    the size `fstat` reports: a small file is one read, without a 1 MiB buffer allocated for it);
    None if it is not a file."""
    try:
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            checksum = google_crc32c.Checksum()
            size = 0
            want = min(st.st_size + 1, _CHUNK)
            while True:
                chunk = f.read(want)
                if not chunk:
                    break
                checksum.update(chunk)
                size += len(chunk)
                if len(chunk) < want and stat.S_ISREG(st.st_mode):  # a regular file's end
                    break
                want = _CHUNK
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
                out[rest] = _blob_meta(blob)
        return out

    return storage.gcs_call(folder, "list", list_one_level)


def _blob_meta(blob) -> ObjectMeta:
    generation = int(blob.generation) if blob.generation is not None else None
    return ObjectMeta(int(blob.size or 0), gcs_crc32c_to_hex(blob.crc32c), generation)


def _after(prefix: str) -> str:
    """The first name after every name that starts with the folder prefix `prefix` ('.../x/'):
    '/' is followed by '0' in byte order."""
    return prefix[:-1] + "0"


class FolderMeta(dict):
    """{file name: ObjectMeta} of one folder's direct files, from a range listing (its own
    placeholder object, if any, under the name ''); `holds_any`: whether the listing saw any object
    at all under the folder, those deeper down included (what `storage.dir_has_files` answers)."""

    deeper = False  # an object below one of the folder's sub-folders was listed

    @property
    def holds_any(self) -> bool:
        return bool(self) or self.deeper


def list_folders_meta(folders: Iterable[str]) -> dict[str, FolderMeta | OSError]:
    """{folder: {file name: ObjectMeta}} of the files directly in each gs:// folder, from range
    listings of each bucket: the folders' prefixes sorted, one recursive listing from the first
    (`startOffset`, `endOffset` after the last), followed page by page (1,000 objects each) while
    it is inside a wanted folder, and started again at the next wanted folder whenever a page ends
    before it. Folders next to each other in name order (the tiles of a NAIP capture, the Sentinel-2
    chips of neighbouring zoom-17 columns) share pages: about one request per 1,000 objects, never
    more than one per folder (plus one per page of a folder of over 1,000 objects). Objects deeper
    than a folder's own files are not in its dict (only its `FolderMeta.holds_any` counts them); a
    missing folder is empty.

    A listing that fails after storage's retries gives its OSError (FileNotFoundError for a
    missing bucket) to every folder it had not finished. Correct on a server that ignores the
    offsets too (it then answers the folders' common prefix whole)."""
    by_bucket: dict[str, dict[str, str]] = {}
    for folder in folders:
        if not storage.is_gcs(folder):
            raise ValueError(f"a range listing needs gs:// folders, got {folder!r}")
        bucket, key = storage.split_gcs(folder)
        prefix = storage.folder_prefix(key)
        if not prefix:
            raise ValueError(f"a range listing needs folders inside a bucket, got {folder!r}")
        by_bucket.setdefault(bucket, {})[prefix] = folder
    out: dict[str, FolderMeta | OSError] = {}
    for bucket, prefixes in by_bucket.items():
        for prefix, found in _scan(bucket, sorted(prefixes)).items():
            out[prefixes[prefix]] = found
    return out


def _scan(bucket: str, prefixes: list[str]) -> dict[str, FolderMeta | OSError]:
    found: dict[str, FolderMeta | OSError] = {p: FolderMeta() for p in prefixes}
    end = _after(prefixes[-1])
    i, start, token = 0, prefixes[0], None
    while True:
        common = os.path.commonprefix([start, prefixes[-1]])

        def list_page(start=start, token=token, common=common):
            blobs = storage.gcs_client().list_blobs(
                bucket, prefix=common or None, start_offset=start, end_offset=end, page_token=token,
                page_size=PAGE_SIZE, fields=_LIST_FIELDS, retry=None, timeout=storage._TIMEOUT_S)
            page = next(blobs.pages)
            return [(blob.name, _blob_meta(blob)) for blob in page], blobs.next_page_token

        try:
            items, token = storage.gcs_call(f"{storage.GCS_SCHEME}{bucket}/{start}", "list", list_page)
        except OSError as e:
            for p in prefixes[i:]:
                found[p] = e
            return found
        for name, meta in items:
            folder = name[: name.rfind("/") + 1]
            if folder in found:
                found[folder][name[len(folder):]] = meta
            else:  # deeper down: it still says that a wanted folder above holds something
                cut = name.find("/") + 1
                while 0 < cut < len(folder):
                    if name[:cut] in found:
                        found[name[:cut]].deeper = True
                    cut = name.find("/", cut) + 1
        if token is None:  # listed to `end`: every folder from prefixes[i] on is complete
            return found
        if not items:
            continue
        last = items[-1][0]
        while i < len(prefixes) and _after(prefixes[i]) <= last:  # folders listed whole
            i += 1
        if i == len(prefixes):
            return found
        if prefixes[i] > last:  # the next wanted folder lies past this page: start again there
            start, token = prefixes[i], None
