"""HTTP for `fetch-nir`: a polite client, a STAC API client, and COGs read over HTTP range requests.

* `PoliteHttp`: one per worker process (`PoliteHttp.shared(policy)`, created in `DoFn.setup`, never
  pickled). Every request, first try or retry, takes a token from a per-process rate limiter
  (`max_requests_per_s`) and a slot of a per-process concurrency bound (`max_concurrency`).
  Throttling (429), server errors (5xx), 408, timeouts, refused or reset connections and bodies cut
  short are retried with exponential backoff and jitter (`storage.RetryPolicy`; a `Retry-After`
  answer is honoured up to the policy's longest delay). Each call counts its requests, bytes and
  retries into the `RequestStats` it is given (the pipeline turns those into Beam counters in the
  DoFn's own thread: a range fetched by a helper thread would be lost to a counter incremented
  there). URLs are logged without their query string: a signed URL's token never reaches a log or
  an error message.
* `StacClient`: STAC API `/search` (POST, following `next` links) and `/collections/{c}/items/{id}`.
* `RemoteFile` + `open_remote_dataset`: one HTTP object as a random-access file that GDAL reads
  through rasterio's Python opener. Its first `header_bytes` come with the first request (which also
  tells the object's size); `prefetch` fetches planned byte ranges (coalesced by the caller)
  concurrently; any read outside what was fetched is fetched on demand (counted, never wrong).
"""
from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import dataclasses
import http.client
import logging
import os
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Iterable

from transforms.io.storage import RetryPolicy
from transforms.version import PIPELINE_VERSION

_LOG = logging.getLogger(__name__)
NAMESPACE = "fetch_nir"  # of the pipeline's Beam counters

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
USER_AGENT = f"s2naip-pairs/{PIPELINE_VERSION} (fetch-nir)"


def redact(url: str) -> str:
    """The URL without query string or fragment (a signed URL's token is in its query)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


_QUERY = re.compile(r"\?[^\s'\"]*")


def scrub(text: str) -> str:
    """Error text with every URL query string cut (the HTTP stack quotes URLs in its messages)."""
    return _QUERY.sub("?...", text)


class HttpError(OSError):
    """An HTTP answer that is not retried (or no longer): `status` is None for connection errors."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class HttpNotFound(HttpError):
    pass


class HttpUnavailable(HttpError):
    """Transient errors until the retries ran out."""


# ---------------------------------------------------------------------------------------------
# Politeness: rate limit, concurrency bound, retries


@dataclasses.dataclass(frozen=True)
class HttpPolicy:
    """Per worker process. `max_requests_per_s` 0 means no rate limit."""

    max_requests_per_s: float = 20.0
    max_concurrency: int = 8
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    retry: RetryPolicy = RetryPolicy(attempts=8, initial_delay_s=0.5, max_delay_s=30.0, deadline_s=300.0)

    def __post_init__(self):
        if not self.max_requests_per_s >= 0:
            raise ValueError(f"max requests per second must be >= 0, got {self.max_requests_per_s}")
        if self.max_concurrency < 1:
            raise ValueError(f"max concurrency must be >= 1, got {self.max_concurrency}")
        if not (self.connect_timeout_s > 0 and self.read_timeout_s > 0):
            raise ValueError("timeouts must be > 0")
        if self.retry.attempts < 1:
            raise ValueError(f"retry attempts must be >= 1, got {self.retry.attempts}")


class RateLimiter:
    """Token bucket shared by the threads of a process: `rate` requests/s, bursts of `burst`."""

    def __init__(self, rate: float, burst: float | None = None):
        self.rate = float(rate)
        self.capacity = max(1.0, float(burst if burst is not None else min(self.rate, 10.0)))
        self._tokens = self.capacity
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Takes a token, sleeping until it is due; returns the seconds slept."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0  # negative: a reservation, later callers queue behind it
            wait = 0.0 if self._tokens >= 0 else -self._tokens / self.rate
        if wait > 0:
            time.sleep(wait)
        return wait


class RequestStats:
    """What the requests made for one unit of work cost (thread-safe)."""

    FIELDS = ("requests", "bytes_read", "retries", "stac_requests", "cog_requests")

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = self.bytes_read = self.retries = self.stac_requests = self.cog_requests = 0

    def add(self, *, requests: int = 0, bytes_read: int = 0, retries: int = 0, kind: str | None = None):
        with self._lock:
            self.requests += requests
            self.bytes_read += bytes_read
            self.retries += retries
            if kind == "stac":
                self.stac_requests += requests
            elif kind == "cog":
                self.cog_requests += requests

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {name: getattr(self, name) for name in self.FIELDS}


@dataclasses.dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    content: bytes


def _transient_exception_types() -> tuple[type, ...]:
    import requests
    import urllib3

    return (
        ConnectionError,
        TimeoutError,
        http.client.IncompleteRead,
        http.client.BadStatusLine,
        requests.exceptions.ConnectionError,
        requests.exceptions.ChunkedEncodingError,  # a body cut short
        requests.exceptions.ContentDecodingError,
        requests.exceptions.Timeout,
        urllib3.exceptions.ProtocolError,
        urllib3.exceptions.TimeoutError,
    )


class _Truncated(Exception):
    """A ranged answer shorter than asked for (treated as transient)."""


def _retry_after_s(headers: dict[str, str]) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: use the backoff


class PoliteHttp:
    """requests.Session with the politeness of the module docstring. Thread-safe."""

    _shared: dict[tuple, "PoliteHttp"] = {}
    _shared_lock = threading.Lock()

    def __init__(self, policy: HttpPolicy | None = None):
        import requests
        import requests.adapters

        self.policy = policy or HttpPolicy()
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=self.policy.max_concurrency + 2,
                                                max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = USER_AGENT
        self._slots = threading.BoundedSemaphore(self.policy.max_concurrency)
        self._limiter = RateLimiter(self.policy.max_requests_per_s)
        self._transient = _transient_exception_types()
        self._requests_error = requests.exceptions.RequestException
        self._rng = random.Random()
        self.in_flight = 0
        self.max_in_flight = 0  # the highest concurrency seen (tests check the bound)
        self._count_lock = threading.Lock()

    @classmethod
    def shared(cls, policy: HttpPolicy) -> "PoliteHttp":
        """The process's client for `policy` (re-created after a fork)."""
        key = (os.getpid(), policy)
        with cls._shared_lock:
            client = cls._shared.get(key)
            if client is None:
                client = cls._shared[key] = cls(policy)
            return client

    def request(
        self,
        method: str,
        url: str,
        *,
        stats: RequestStats | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
        json_body=None,
        ok_status: Iterable[int] = (200,),
        expected_length: int | None = None,
    ) -> Response:
        """One logical request with retries. Raises HttpNotFound (404), HttpError (other answers not
        in `ok_status`), HttpUnavailable (transient failures until the retries ran out)."""
        ok_status = frozenset(ok_status)
        retry = self.policy.retry
        started = time.monotonic()
        attempt = 0
        while True:
            retry_after = None
            try:
                resp = self._once(method, url, headers, json_body, stats, kind)
                if resp.status in ok_status:
                    if expected_length is not None and resp.status == 206 and len(resp.content) != expected_length:
                        raise _Truncated(f"{len(resp.content)} of {expected_length} bytes")
                    return resp
                if resp.status not in TRANSIENT_STATUS:
                    cls = HttpNotFound if resp.status == 404 else HttpError
                    raise cls(f"{method} {redact(url)}: HTTP {resp.status}", resp.status)
                retry_after = _retry_after_s(resp.headers)
                problem = f"HTTP {resp.status}"
                last_status = resp.status
            except HttpError:
                raise
            except self._transient + (_Truncated,) as e:
                problem = f"{type(e).__name__}: {scrub(str(e))[:200]}"
                last_status = None
            except self._requests_error as e:  # a bad URL, too many redirects...: not worth retrying
                raise HttpError(f"{method} {redact(url)}: {type(e).__name__}: {scrub(str(e))[:200]}") from None
            attempt += 1
            elapsed = time.monotonic() - started
            if attempt >= retry.attempts or elapsed >= retry.deadline_s:
                raise HttpUnavailable(
                    f"{method} {redact(url)}: still failing after {attempt} tries in {elapsed:.1f}s ({problem})",
                    last_status)
            delay = retry.delay(attempt - 1, self._rng)
            if retry_after is not None:
                delay = max(delay, min(retry_after, retry.max_delay_s))
            delay = min(delay, max(0.0, retry.deadline_s - elapsed))
            if stats is not None:
                stats.add(retries=1)
            _LOG.info("http: %s %s failed (%s, try %d), retrying in %.2fs", method, redact(url), problem,
                      attempt, delay)
            time.sleep(delay)

    def _once(self, method, url, headers, json_body, stats, kind) -> Response:
        self._limiter.acquire()
        with self._slots:
            with self._count_lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if stats is not None:
                    stats.add(requests=1, kind=kind)
                r = self.session.request(
                    method, url, headers=headers, json=json_body, allow_redirects=True,
                    timeout=(self.policy.connect_timeout_s, self.policy.read_timeout_s))
                content = r.content  # the whole body; a body cut short raises here
            finally:
                with self._count_lock:
                    self.in_flight -= 1
        if stats is not None:
            stats.add(bytes_read=len(content))
        return Response(r.status_code, {k.lower(): v for k, v in r.headers.items()}, content)


# ---------------------------------------------------------------------------------------------
# STAC API


class StacError(OSError):
    """The STAC API answered something that is not a STAC answer."""


class StacClient:
    """The two STAC API calls fetch-nir needs, with PoliteHttp's retries and limits."""

    def __init__(self, url: str, http: PoliteHttp, collection: str = "naip", page_size: int = 100,
                 max_pages: int = 10):
        if not re.match(r"^https?://", url or ""):
            raise ValueError(f"the STAC API URL must be http(s)://..., got {url!r}")
        self.url = url.rstrip("/")
        self.http = http
        self.collection = collection
        self.page_size = page_size
        self.max_pages = max_pages

    def search(self, *, bbox: tuple[float, float, float, float], datetime: str,
               stats: RequestStats | None = None) -> list[dict]:
        """Items of the collection intersecting `bbox` (lon/lat) within `datetime` (an RFC 3339
        interval), every page."""
        body = {"collections": [self.collection], "bbox": [round(v, 9) for v in bbox], "datetime": datetime,
                "limit": self.page_size}
        url, method = f"{self.url}/search", "POST"
        features: list[dict] = []
        for _ in range(self.max_pages):
            if method == "POST":
                resp = self.http.request("POST", url, json_body=body, stats=stats, kind="stac",
                                         headers={"Accept": "application/geo+json"})
            else:
                resp = self.http.request("GET", url, stats=stats, kind="stac",
                                         headers={"Accept": "application/geo+json"})
            page = _json(resp, url)
            if not isinstance(page.get("features"), list):
                raise StacError(f"{redact(url)}: a search answer without features")
            features += [f for f in page["features"] if isinstance(f, dict)]
            nxt = next((link for link in page.get("links") or [] if isinstance(link, dict)
                        and link.get("rel") == "next" and link.get("href")), None)
            if nxt is None or not page["features"]:
                return features
            url = nxt["href"]
            method = str(nxt.get("method", "GET")).upper()
            if method == "POST":
                next_body = nxt.get("body") or {}
                body = {**body, **next_body} if nxt.get("merge") else (next_body or body)
        _LOG.warning("stac: search still had pages after %d; using the first %d items", self.max_pages, len(features))
        return features

    def get_item(self, item_id: str, stats: RequestStats | None = None) -> dict | None:
        """The item, or None when the API answers 404."""
        url = f"{self.url}/collections/{urllib.parse.quote(self.collection, safe='')}/items/" \
              f"{urllib.parse.quote(item_id, safe='')}"
        try:
            resp = self.http.request("GET", url, stats=stats, kind="stac", headers={"Accept": "application/geo+json"})
        except HttpNotFound:
            return None
        item = _json(resp, url)
        if item.get("type") != "Feature":
            raise StacError(f"{redact(url)}: not a STAC item")
        return item


def _json(resp: Response, url: str) -> dict:
    import json

    try:
        value = json.loads(resp.content)
    except ValueError as e:
        raise StacError(f"{redact(url)}: answer is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise StacError(f"{redact(url)}: answer is not a JSON object")
    return value


# ---------------------------------------------------------------------------------------------
# A COG over HTTP range requests


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class RemoteFile:
    """Random access to one HTTP object through Range requests, keeping every fetched span.

    Reads never return wrong bytes: what was not prefetched is fetched on demand (at least
    `min_fetch` bytes at a time). Thread-safe."""

    def __init__(self, url: str, http: PoliteHttp, stats: RequestStats | None = None, *,
                 header_bytes: int = 64 * 1024, min_fetch: int = 16 * 1024):
        self.url = url
        self.http = http
        self.stats = stats
        self.header_bytes = max(1, int(header_bytes))
        self.min_fetch = max(1, int(min_fetch))
        self.size: int | None = None
        self._starts: list[int] = []
        self._spans: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self.on_demand_fetches = 0
        self.last_error: Exception | None = None  # what made a read fail (GDAL only sees a short read)

    # -- fetching --

    def open(self) -> "RemoteFile":
        """Fetches the first `header_bytes` (one request), learning the object's size."""
        if self.size is not None:
            return self
        resp = self.http.request("GET", self.url, headers={"Range": f"bytes=0-{self.header_bytes - 1}"},
                                 stats=self.stats, kind="cog", ok_status=(200, 206))
        if resp.status == 200:  # the server ignored Range: this is the whole object
            self.size = len(resp.content)
        else:
            m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
            if not m or m.group(3) == "*" or int(m.group(1)) != 0:
                raise HttpError(f"GET {redact(self.url)}: bad Content-Range {resp.headers.get('content-range')!r}")
            self.size = int(m.group(3))
            expected = min(self.header_bytes, self.size)
            if len(resp.content) != expected or int(m.group(2)) != expected - 1:
                raise HttpError(f"GET {redact(self.url)}: {len(resp.content)} bytes for the first {expected}")
        self._store(0, resp.content)
        return self

    def _fetch(self, start: int, end: int) -> None:
        """Fetches [start, end) with one request (and its retries)."""
        resp = self.http.request("GET", self.url, headers={"Range": f"bytes={start}-{end - 1}"}, stats=self.stats,
                                 kind="cog", ok_status=(206,), expected_length=end - start)
        m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
        if not m or int(m.group(1)) != start or int(m.group(2)) != end - 1:
            raise HttpError(f"GET {redact(self.url)}: Content-Range {resp.headers.get('content-range')!r} "
                            f"for bytes {start}-{end - 1}")
        self._store(start, resp.content)

    def _store(self, start: int, data: bytes) -> None:
        with self._lock:
            if start in self._spans and len(self._spans[start]) >= len(data):
                return
            if start not in self._spans:
                bisect.insort(self._starts, start)
            self._spans[start] = data

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) not fetched yet."""
        gaps = []
        pos = start
        with self._lock:
            i = max(0, bisect.bisect_right(self._starts, pos) - 1)
            while pos < end and i < len(self._starts):
                s = self._starts[i]
                e = s + len(self._spans[s])
                if e <= pos:
                    i += 1
                    continue
                if s > pos:
                    gaps.append((pos, min(s, end)))
                pos = max(pos, e)
                i += 1
        if pos < end:
            gaps.append((pos, end))
        return gaps

    def prefetch(self, ranges: Iterable[tuple[int, int]], max_workers: int = 1) -> int:
        """Fetches the missing parts of `ranges` ([start, end) pairs, already coalesced), up to
        `max_workers` at once; returns the number of requests made (before retries)."""
        self._require_open()
        todo = []
        for start, end in ranges:
            start, end = max(0, int(start)), min(self.size, int(end))
            if end > start:
                todo += self.missing(start, end)
        if not todo:
            return 0
        if max_workers <= 1 or len(todo) == 1:
            for start, end in todo:
                self._fetch(start, end)
        else:
            with concurrent.futures.ThreadPoolExecutor(min(max_workers, len(todo)),
                                                       thread_name_prefix="nir-range") as pool:
                for f in [pool.submit(self._fetch, s, e) for s, e in todo]:
                    f.result()
        return len(todo)

    # -- reading --

    def read_at(self, offset: int, n: int) -> bytes:
        self._require_open()
        if offset >= self.size or n <= 0:
            return b""
        end = min(self.size, offset + n)
        for start, stop in self.missing(offset, end):
            self.on_demand_fetches += 1
            self._fetch(start, min(self.size, max(stop, start + self.min_fetch)))
        return self._assemble(offset, end)

    def _assemble(self, start: int, end: int) -> bytes:
        out = []
        pos = start
        with self._lock:
            i = max(0, bisect.bisect_right(self._starts, pos) - 1)
            while pos < end:
                s = self._starts[i]
                data = self._spans[s]
                if s <= pos < s + len(data):
                    take = data[pos - s:min(len(data), end - s)]
                    out.append(take)
                    pos += len(take)
                i += 1
        return b"".join(out)

    def _require_open(self):
        if self.size is None:
            raise RuntimeError("RemoteFile.open() first")

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._spans.values())


class _Handle:
    """A file object over a RemoteFile for GDAL (read, seek, tell, close)."""

    def __init__(self, remote: RemoteFile):
        self._remote = remote
        self._pos = 0
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._remote.size - self._pos
        try:
            data = self._remote.read_at(self._pos, n)
        except Exception as e:  # GDAL gets a short read (an I/O error); the cause is kept
            self._remote.last_error = e
            return b""
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self._pos = offset
        elif whence == os.SEEK_CUR:
            self._pos += offset
        elif whence == os.SEEK_END:
            self._pos = self._remote.size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _container_class():
    from rasterio.abc import FileContainer

    class _OneFileContainer(FileContainer):
        """The opener GDAL sees: exactly one file (sidecar probes find nothing, fetch nothing)."""

        def __init__(self, path: str, remote: RemoteFile):
            self.path, self.remote = path, remote

        def _check(self, path):
            if path != self.path:
                raise FileNotFoundError(path)

        def open(self, path, mode="rb", **kwds):
            self._check(path)
            if "w" in mode or "a" in mode or "+" in mode:
                raise PermissionError("read-only")
            return _Handle(self.remote)

        def isfile(self, path):
            return path == self.path

        def isdir(self, path):
            return False

        def ls(self, path):
            return []

        def mtime(self, path):
            return 0

        def rm(self, path):
            raise PermissionError("read-only")

        def size(self, path):
            self._check(path)
            return self.remote.size

    return _OneFileContainer


@contextlib.contextmanager
def open_remote_dataset(remote: RemoteFile, name: str = "image.tif"):
    """rasterio dataset reading `remote` (opened first) through GDAL's Python opener plugin.

    GDAL sees `remote/<name>`, never the URL, so a signed URL's token stays out of GDAL's paths
    and messages."""
    import rasterio

    remote.open()
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200] or "image.tif"
    path = f"remote/{safe}"
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
        with rasterio.open(path, opener=_container_class()(path, remote), sharing=False) as ds:
            yield ds
