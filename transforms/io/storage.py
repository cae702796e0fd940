"""One small storage layer for local paths and cloud URLs (gs:// ...).

* Local paths take a direct fast path.
* `gs://` goes through one google-cloud-storage client per process (the library under Beam's own
  GcsIO), created lazily on first use and never pickled: a read is one ranged GET (a missing object
  is a 404, mapped to FileNotFoundError without a separate existence check), and a folder listing
  is one level with the '/' delimiter, never the whole subtree. Beam's FileSystems cannot do either
  (its `match` lists every object under the prefix).
* Other schemes (s3://, ...) go through `apache_beam.io.filesystems.FileSystems`.

Transient errors (HTTP 408/429/5xx, connection reset or refused, truncated responses, timeouts)
are retried with exponential backoff and jitter; each retry increments the Beam counter
`storage/retries` (and `retry_count()` in this process). A 404 is never retried. When the
retries run out, `StorageUnavailableError` (an OSError) is raised.

Credentials are those of Application Default Credentials (the worker's service account on
Dataflow); with `STORAGE_EMULATOR_HOST` set, the client talks to that endpoint anonymously. No
credential, token or request header is ever logged.
"""
from __future__ import annotations

import dataclasses
import http.client
import logging
import mimetypes
import os
import random
import stat
import threading
import time
import uuid
from typing import BinaryIO, Callable, TypeVar

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

_LOG = logging.getLogger(__name__)
T = TypeVar("T")

GCS_SCHEME = "gs://"
_TIMEOUT_S = (10.0, 60.0)  # (connect, read) per request


def join(root: str, *parts: str) -> str:
    """Joins path parts with '/', for local paths and gs:// URLs alike."""
    return "/".join([root.rstrip("/"), *parts])


def open_file(path: str) -> BinaryIO:
    """A run's file opened for reading, as bytes: a local file, or a stream through Beam's
    filesystems (gs://), never decompressed (`.gz` files are read as they are stored)."""
    return open(path, "rb") if is_local(path) else FileSystems.open(
        path, compression_type=CompressionTypes.UNCOMPRESSED)


def is_local(path: str) -> bool:
    return "://" not in path


def is_gcs(path: str) -> bool:
    return path.startswith(GCS_SCHEME)


def absolute(path: str | None) -> str | None:
    """A local path made absolute (so that a record of it is valid from any folder); a URL as it is."""
    if not path or not is_local(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


class StorageUnavailableError(OSError):
    """A storage operation still failed with transient errors after every retry."""


# ---------------------------------------------------------------------------------------------
# Retries


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: before retry i (0-based), sleep a uniformly random time in
    [d/2, d] with d = min(max_delay_s, initial_delay_s * multiplier**i); at most `attempts` tries
    and no new try after `deadline_s` seconds."""

    attempts: int = 8
    initial_delay_s: float = 0.25
    multiplier: float = 2.0
    max_delay_s: float = 16.0
    deadline_s: float = 120.0

    def delay(self, retry_index: int, rng: random.Random | None = None) -> float:
        d = min(self.max_delay_s, self.initial_delay_s * self.multiplier**retry_index)
        return (rng or random).uniform(d / 2, d)


RETRY_POLICY = RetryPolicy()
_RETRIES = Metrics.counter("storage", "retries")
_retry_lock = threading.Lock()
_retry_count = 0

_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def set_retry_policy(policy: RetryPolicy) -> RetryPolicy:
    """Replaces the retry policy of this process; returns the previous one (for tests)."""
    global RETRY_POLICY
    previous, RETRY_POLICY = RETRY_POLICY, policy
    return previous


def retry_count() -> int:
    """Retries made by this process so far (the Beam counter `storage/retries` sums all workers)."""
    return _retry_count


_unreported_retries = 0  # retries made on threads without a Beam metrics context (reader pools)


def _count_retry() -> None:
    """Counts one retry: in the Beam counter when this thread runs a DoFn; otherwise (a reader
    thread of `transforms.io.prefetch`, where Beam would drop the increment) for `report_retries`."""
    global _retry_count, _unreported_retries
    from apache_beam.metrics.execution import MetricsEnvironment

    in_beam = MetricsEnvironment.current_container() is not None
    with _retry_lock:
        _retry_count += 1
        if not in_beam:
            _unreported_retries += 1
    if in_beam:
        _RETRIES.inc()


def report_retries() -> None:
    """Adds the retries made on threads without a Beam context to the `storage/retries` counter;
    called by the DoFns that use reader threads, on their own thread."""
    global _unreported_retries
    with _retry_lock:
        n, _unreported_retries = _unreported_retries, 0
    if n:
        _RETRIES.inc(n)


def _status_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


_TRANSIENT_TYPES: tuple[type, ...] | None = None


def _transient_types() -> tuple[type, ...]:
    """Connection-level errors of the HTTP stack under google-cloud-storage (imported lazily)."""
    global _TRANSIENT_TYPES
    if _TRANSIENT_TYPES is None:
        import requests
        import urllib3
        from google.auth import exceptions as auth_exceptions
        from google.cloud.storage import exceptions as storage_exceptions

        _TRANSIENT_TYPES = (
            ConnectionError,  # refused, reset, aborted, broken pipe
            TimeoutError,
            http.client.IncompleteRead,
            http.client.BadStatusLine,  # incl. RemoteDisconnected
            http.client.ResponseNotReady,
            requests.exceptions.ConnectionError,
            requests.exceptions.ChunkedEncodingError,  # a body cut short
            requests.exceptions.Timeout,
            urllib3.exceptions.ProtocolError,
            urllib3.exceptions.TimeoutError,
            urllib3.exceptions.PoolError,
            auth_exceptions.TransportError,  # the token endpoint was unreachable
            storage_exceptions.DataCorruption,  # a download's checksum mismatched: fetch it again
        )
    return _TRANSIENT_TYPES


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is worth retrying: throttling (429), server errors (5xx), request timeouts
    (408), broken, refused or timed-out connections. A 404, or any other 4xx, is not."""
    from google.api_core.exceptions import GoogleAPICallError
    from google.cloud.storage.exceptions import InvalidResponse

    if isinstance(exc, GoogleAPICallError):
        return exc.code in _TRANSIENT_STATUS
    if isinstance(exc, InvalidResponse):
        return _status_code(exc) in _TRANSIENT_STATUS
    return isinstance(exc, _transient_types())


def _with_retries(what: str, op: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """op(), retried on transient errors; any other exception propagates at once."""
    policy = policy or RETRY_POLICY
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return op()
        except Exception as e:
            if not is_transient(e):
                raise
            attempt += 1
            elapsed = time.monotonic() - started
            if attempt >= policy.attempts or elapsed >= policy.deadline_s:
                raise StorageUnavailableError(
                    f"{what}: still failing after {attempt} tries in {elapsed:.1f}s: {_describe(e)}") from e
            delay = min(policy.delay(attempt - 1), max(0.0, policy.deadline_s - elapsed))
            _count_retry()
            _LOG.info("storage: transient error on %s (try %d), retrying in %.2fs: %s",
                      what, attempt, delay, _describe(e))
            time.sleep(delay)


def _describe(exc: BaseException) -> str:
    """Type and message of an error, shortened; never a request's headers."""
    text = str(exc).replace("\n", " ")
    return f"{type(exc).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------------------
# The gs:// client: one per process, created on first use

_client_lock = threading.Lock()
_client = None
_client_pid: int | None = None


def gcs_client():
    """The process's google-cloud-storage client (re-created after a fork)."""
    global _client, _client_pid
    client, pid = _client, os.getpid()
    if client is not None and _client_pid == pid:
        return client
    with _client_lock:
        if _client is None or _client_pid != pid:
            _client = _new_gcs_client()
            _client_pid = pid
        return _client


HTTP_POOL_SIZE = 64  # connections kept per host, >= the reader threads of a process


def _new_gcs_client():
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        client = storage.Client(project=None)  # the library then talks to the emulator, anonymously
    else:
        import google.auth.exceptions

        try:
            client = storage.Client(project=None)  # Application Default Credentials; no project needed
        except google.auth.exceptions.DefaultCredentialsError:
            _LOG.warning("storage: no Google credentials found; reading gs:// anonymously (public data only)")
            client = storage.Client.create_anonymous_client()
    # google-cloud-storage >= 3.x fetches each bucket's metadata in a background thread (and checks
    # the bucket again after every 404) only to label OpenTelemetry spans: requests (and a
    # storage.buckets.get permission) this job does not need.
    if getattr(client, "_bucket_metadata_cache", None) is not None:
        client._bucket_metadata_cache = None
    # One client serves every thread of the process (`transforms.io.prefetch`'s readers too): keep a
    # connection per thread instead of requests' default 10, which would open (and TLS-handshake) a
    # new connection for every request beyond them.
    import requests

    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=HTTP_POOL_SIZE)
    for scheme in ("https://", "http://"):
        client._http.mount(scheme, adapter)
    return client


def reset_client() -> None:
    """Drops the process's client (the next call creates one under the current environment)."""
    global _client, _client_pid
    with _client_lock:
        _client, _client_pid = None, None


def split_gcs(path: str) -> tuple[str, str]:
    rest = path[len(GCS_SCHEME):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"not a gs://bucket/... path: {path!r}")
    return bucket, key


def folder_prefix(key: str) -> str:
    key = key.strip("/")
    return key + "/" if key else ""


def _gcs_permanent_error(path: str, exc: Exception) -> OSError:
    """A non-transient API error as an OSError (PermissionError for 401/403)."""
    code = _status_code(exc)
    if code in (401, 403):
        return PermissionError(f"{path}: access denied ({code})")
    return OSError(f"{path}: {_describe(exc)}")


def gcs_call(path: str, what: str, op: Callable[[], T]) -> T:
    """op() with retries; 404 -> FileNotFoundError, other API errors -> OSError (PermissionError
    for 401/403 and credential failures)."""
    from google.api_core.exceptions import GoogleAPICallError, NotFound
    from google.auth.exceptions import GoogleAuthError
    from google.cloud.storage.exceptions import InvalidResponse

    try:
        return _with_retries(f"{what} {path}", op)
    except NotFound:
        raise FileNotFoundError(path) from None
    except (GoogleAPICallError, InvalidResponse) as e:
        if _status_code(e) == 404:
            raise FileNotFoundError(path) from None
        raise _gcs_permanent_error(path, e) from None
    except GoogleAuthError as e:  # e.g. RefreshError; its text is not logged (it may quote a server reply)
        raise PermissionError(f"{path}: could not obtain credentials ({type(e).__name__})") from None


# ---------------------------------------------------------------------------------------------
# The API


def read_local(path: str, limit: int) -> bytes:
    """A local file's bytes, at most `limit` + 1 of them (one more than `limit` says it is larger).
    Asks for the size `fstat` reports plus one byte, unbuffered: `open(path, "rb").read(limit + 1)`
    allocates `limit` + 1 bytes first (64 MiB for a PNG: ~45 us of CPU per file, most of a small
    file's read). A regular file's short read is its end; anything else (a file that grew since
    `fstat`, a pipe) is read on in chunks up to `limit` + 1."""
    with open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        want = min(st.st_size, limit) + 1
        data = f.read(want)
        if len(data) < want and stat.S_ISREG(st.st_mode):
            return data
        parts, total = [data], len(data)
        while data and total <= limit:
            data = f.read(min(limit + 1 - total, 1 << 20))
            parts.append(data)
            total += len(data)
        return b"".join(parts)


def read_bytes(path: str, limit: int) -> bytes:
    """The whole file; FileNotFoundError when absent; ValueError when larger than `limit` bytes."""
    if is_local(path):
        try:
            data = read_local(path, limit)
        except IsADirectoryError:
            raise FileNotFoundError(path) from None
    elif is_gcs(path):
        bucket, key = split_gcs(path)
        if not key or key.endswith("/"):
            raise FileNotFoundError(path)

        def download() -> bytes:
            blob = gcs_client().bucket(bucket).blob(key)
            # One ranged GET of at most limit+1 bytes: no existence check first, and a huge
            # object is never downloaded whole. urllib3 enforces Content-Length, so a response
            # cut short raises (and is retried) instead of returning a truncated file.
            return blob.download_as_bytes(start=0, end=limit, raw_download=True, retry=None,
                                          timeout=_TIMEOUT_S)

        data = gcs_call(path, "read", download)
    else:
        try:
            f = FileSystems.open(path)
        except Exception as e:
            if not FileSystems.exists(path):
                raise FileNotFoundError(path) from None
            raise OSError(f"{path}: {_describe(e)}") from e
        with f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data


def dir_has_files(path: str) -> bool:
    """Whether anything lies under the folder `path` (folders are prefixes on object stores)."""
    if is_local(path):
        return os.path.isdir(path) and any(os.scandir(path))
    if is_gcs(path):
        bucket, key = split_gcs(path)
        prefix = folder_prefix(key)

        def any_object() -> bool:
            blobs = gcs_client().list_blobs(bucket, prefix=prefix, max_results=1, fields="items(name),nextPageToken",
                                             retry=None, timeout=_TIMEOUT_S)
            return any(True for _ in blobs)

        try:
            return gcs_call(path, "list", any_object)
        except FileNotFoundError:  # no such bucket
            return False
    result = FileSystems.match([path.rstrip("/") + "/*"], limits=[1])[0]
    return bool(result.metadata_list)


def list_children(path: str) -> list[str]:
    """Names of the direct children (files or folders) of folder `path`, sorted.

    On gs:// this is a one-level listing (delimiter '/'): the objects deeper down are never
    enumerated. A missing bucket raises FileNotFoundError (a missing folder is just empty)."""
    if is_local(path):
        if not os.path.isdir(path):
            return []
        return sorted(entry.name for entry in os.scandir(path))
    if is_gcs(path):
        bucket, key = split_gcs(path)
        prefix = folder_prefix(key)

        def list_one_level() -> list[str]:
            names = set()
            blobs = gcs_client().list_blobs(bucket, prefix=prefix, delimiter="/",
                                             fields="items(name),prefixes,nextPageToken",
                                             retry=None, timeout=_TIMEOUT_S)
            for page in blobs.pages:  # a failed page restarts the whole listing
                for blob in page:
                    rest = blob.name[len(prefix):]
                    if rest:  # not the folder's own placeholder object
                        names.add(rest)
                for sub in page.prefixes:
                    rest = sub[len(prefix):].rstrip("/")
                    if rest:
                        names.add(rest)
            return sorted(names)

        return gcs_call(path, "list", list_one_level)
    prefix = path.rstrip("/") + "/"
    names = set()
    for meta in FileSystems.match([prefix + "**"])[0].metadata_list:
        rest = meta.path[len(prefix):]
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
    if is_gcs(path):
        bucket, key = split_gcs(path)
        content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"

        def upload() -> None:
            # An object is published only when its upload completes, so a reader never sees a
            # part; writing the same bytes again after a lost response is harmless.
            gcs_client().bucket(bucket).blob(key).upload_from_string(
                data, content_type=content_type, retry=None, timeout=_TIMEOUT_S)

        gcs_call(path, "write", upload)
        return
    # Object stores publish an object only when its upload completes.
    with FileSystems.create(path) as f:
        f.write(data)


def exists(path: str) -> bool:
    if is_local(path):
        return os.path.exists(path)
    if is_gcs(path):
        bucket, key = split_gcs(path)
        if not key:
            return gcs_call(path, "exists", lambda: gcs_client().bucket(bucket).exists(retry=None,
                                                                                          timeout=_TIMEOUT_S))
        return gcs_call(path, "exists", lambda: gcs_client().bucket(bucket).blob(key).exists(
            retry=None, timeout=_TIMEOUT_S))
    return FileSystems.exists(path)


def makedirs(path: str) -> None:
    if is_local(path):
        os.makedirs(path, exist_ok=True)


def move(src: str, dst: str) -> None:
    """Moves a file (replacing `dst`); on object stores a server-side copy, then a delete."""
    if is_local(src) and is_local(dst):
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        os.replace(src, dst)
        return
    _with_retries(f"move {src}", lambda: FileSystems.rename([src], [dst]))


def delete(paths: list[str]) -> None:
    """Deletes files; missing ones are ignored."""
    for path in paths:
        if is_local(path):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        elif exists(path):
            _with_retries(f"delete {path}", lambda p=path: FileSystems.delete([p]))


def remove_empty_tree(path: str) -> None:
    """Removes a local folder tree that holds no files any more (object stores have no folders)."""
    if not is_local(path) or not os.path.isdir(path):
        return
    for dirpath, _, _ in sorted(os.walk(path), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass  # not empty: a file is still there, keep it visible
