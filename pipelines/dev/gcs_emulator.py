"""A Google Cloud Storage emulator on loopback for tests, and a fault-injecting proxy in front of it.

* `GcsEmulator`: runs `gcp-storage-emulator` (PyPI) in a subprocess on a free 127.0.0.1 port, waits
  for it with an HTTP probe, and offers helpers: create a bucket, upload / download a folder tree.
* `FakeMetadataServer`: a GCE metadata server on loopback handing out a fake token, so that
  `google.auth.default()` (which Beam's GcsIO calls in every process) answers at once instead of
  probing 169.254.169.254 and then retrying for ~20 s before falling back to anonymous access.
* `emulator_environment()`: the environment variables that send Beam's gs:// filesystem (GcsIO on
  google-cloud-storage), google-cloud-storage clients, gcsfs and `transforms.io.storage` to the
  emulator, with no real credentials and no metadata-server traffic off loopback. Worker processes
  (`--direct_running_mode=multi_processing`) inherit it.
* `FaultyProxy`: an HTTP proxy on loopback that forwards to the emulator and injects transient
  faults (the first N requests 503, every k-th request 429/500/503, connection resets in the middle
  of a response), counting what it did, and every request by its kind as GCS bills it
  (`request_kinds`: media and metadata GETs, listings, inserts, composes, copies, deletes; the
  parts of a JSON batch one by one). It also pages object listings as GCS does (`GcsListPaging`:
  at most 1,000 entries a page, `pageToken`, `startOffset`/`endOffset`), which the emulator does
  not: without it a listing of any size would be one request.

Nothing here ever connects anywhere but 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import socket
import struct
import re
import subprocess
import sys
import tempfile
import threading
import time
import base64
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

LOOPBACK = "127.0.0.1"
FAKE_PROJECT = "s2naip-test"
FAKE_TOKEN = "fake-emulator-token-not-a-secret"
FAKE_ACCOUNT = f"emulator@{FAKE_PROJECT}.iam.gserviceaccount.com"


def free_port() -> int:
    """A TCP port free on loopback right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wait_http_ok(url: str, timeout_s: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Polls `url` until it answers 200 (a readiness probe, not a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        try:
            with _NO_PROXY_OPENER.open(url, timeout=2) as r:  # loopback, never through a proxy
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            last = e
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    raise TimeoutError(f"{url} not ready after {timeout_s}s: {last}")


def _split_gs(url: str) -> tuple[str, str]:
    assert url.startswith("gs://"), url
    bucket, _, key = url[len("gs://"):].partition("/")
    return bucket, key


# ---------------------------------------------------------------------------------------------
# The emulator


class GcsEmulator:
    """gcp-storage-emulator in a subprocess on 127.0.0.1:<free port>, in memory."""

    def __init__(self):
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._client = None
        self._log = None

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, attempts: int = 3) -> "GcsEmulator":
        last = None
        for _ in range(attempts):  # a port picked free can be taken before the emulator binds it
            self.port = free_port()
            self._log = tempfile.TemporaryFile()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "gcp_storage_emulator", "start", f"--host={LOOPBACK}",
                 f"--port={self.port}", "--in-memory", "--quiet"],
                stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if k not in ("PORT", "HOST")},
            )
            try:
                wait_http_ok(self.endpoint + "/", proc=self._proc)
                return self
            except (RuntimeError, TimeoutError) as e:
                last = e
                self.stop()
        raise RuntimeError(f"gcp-storage-emulator did not start: {last}; output: {self.output()}")

    def output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None
        self._client = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- helpers (a google-cloud-storage client of their own, pinned to this endpoint, anonymous) --

    @property
    def client(self):
        if self._client is None:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            self._client = storage.Client(project=FAKE_PROJECT, credentials=AnonymousCredentials(),
                                          client_options={"api_endpoint": self.endpoint})
        return self._client

    def bucket(self, name: str) -> str:
        """Creates bucket `name` if needed; returns `gs://name`."""
        from google.api_core.exceptions import Conflict

        try:
            self.client.create_bucket(name)
        except Conflict:
            pass
        return f"gs://{name}"

    def upload_tree(self, local_dir: str | os.PathLike, gs_prefix: str) -> list[str]:
        """Uploads every file under `local_dir` to `gs_prefix/<relative path>`; returns the URLs."""
        bucket_name, key = _split_gs(gs_prefix.rstrip("/"))
        bucket = self.client.bucket(bucket_name)
        urls = []
        root = Path(local_dir)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            name = "/".join(filter(None, [key, path.relative_to(root).as_posix()]))
            bucket.blob(name).upload_from_filename(str(path))
            urls.append(f"gs://{bucket_name}/{name}")
        return urls

    def upload_bytes(self, url: str, data: bytes) -> None:
        bucket_name, key = _split_gs(url)
        self.client.bucket(bucket_name).blob(key).upload_from_string(data)

    def read_bytes(self, url: str) -> bytes:
        bucket_name, key = _split_gs(url)
        return self.client.bucket(bucket_name).blob(key).download_as_bytes()

    def list(self, gs_prefix: str) -> list[str]:
        """Every object URL under `gs_prefix` (recursive)."""
        bucket_name, key = _split_gs(gs_prefix)
        return sorted(f"gs://{bucket_name}/{b.name}" for b in self.client.list_blobs(bucket_name, prefix=key))

    def download_tree(self, gs_prefix: str, local_dir: str | os.PathLike) -> list[Path]:
        """Downloads every object under `gs_prefix/` into `local_dir/<relative path>`."""
        prefix = gs_prefix.rstrip("/") + "/"
        bucket_name, key = _split_gs(prefix)
        out = []
        for blob in self.client.list_blobs(bucket_name, prefix=key):
            path = Path(local_dir) / blob.name[len(key):]
            path.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(path))
            out.append(path)
        return sorted(out)


# ---------------------------------------------------------------------------------------------
# A fake GCE metadata server, so that Beam's credential lookup is instant and stays on loopback


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    ROUTES = {
        "/": "",
        "/computeMetadata/v1/project/project-id": FAKE_PROJECT,
        "/computeMetadata/v1/project/numeric-project-id": "1234",
        "/computeMetadata/v1/universe/universe-domain": "googleapis.com",
        "/computeMetadata/v1/instance/service-accounts/default/email": FAKE_ACCOUNT,
    }

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        # google-auth asks by the account's email once it knows it (a second refresh of the same
        # credentials, e.g. two threads at once): the same account as `default`
        path = path.replace(f"/service-accounts/{FAKE_ACCOUNT}", "/service-accounts/default")
        if path in self.ROUTES:
            body, ctype = self.ROUTES[path].encode(), "text/plain"
        elif path.rstrip("/") == "/computeMetadata/v1/instance/service-accounts/default":
            body, ctype = json.dumps({"email": FAKE_ACCOUNT, "aliases": ["default"],
                                      "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}).encode(), \
                "application/json"
        elif path == "/computeMetadata/v1/instance/service-accounts/default/token":
            body, ctype = json.dumps({"access_token": FAKE_TOKEN, "expires_in": 3600,
                                      "token_type": "Bearer"}).encode(), "application/json"
        else:
            self.send_response(404)
            self.send_header("Metadata-Flavor", "Google")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


class _ThreadingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class FakeMetadataServer:
    """A GCE metadata server on 127.0.0.1:<free port> (threads in this process)."""

    def __init__(self):
        self._server = _ThreadingServer((LOOPBACK, 0), _MetadataHandler)
        self.host = f"{LOOPBACK}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-metadata", daemon=True)

    def start(self) -> "FakeMetadataServer":
        self._thread.start()
        wait_http_ok(f"http://{self.host}/")
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------------------------------------
# Environment


def emulator_environment(endpoint: str, metadata_host: str, scratch_dir: str) -> dict[str, str | None]:
    """Variables (None: unset) that point every GCS client at `endpoint` with no real credentials.

    * STORAGE_EMULATOR_HOST: google-cloud-storage (so Beam's GcsIO) and gcsfs use this endpoint, and a
      google-cloud-storage client created without credentials is anonymous.
    * GCE_METADATA_HOST / GCE_METADATA_IP: google-auth's metadata server, i.e. the fake one above, so
      `google.auth.default()` returns (fake) GCE credentials at once; NO_GCE_CHECK stays unset so the
      fake answers the probe. Any token request goes to loopback and the emulator ignores the token.
    * GOOGLE_APPLICATION_CREDENTIALS unset and CLOUDSDK_CONFIG an empty folder: no real user or
      service-account credentials are ever picked up (they would be sent to the emulator, or
      refreshed against Google).
    """
    gcloud_dir = os.path.join(scratch_dir, "gcloud-config")
    os.makedirs(gcloud_dir, exist_ok=True)
    return {
        "STORAGE_EMULATOR_HOST": endpoint,
        "GCE_METADATA_HOST": metadata_host,
        "GCE_METADATA_ROOT": metadata_host,
        "GCE_METADATA_IP": metadata_host,
        "NO_GCE_CHECK": None,
        "GOOGLE_APPLICATION_CREDENTIALS": None,
        "CLOUDSDK_CONFIG": gcloud_dir,
        "GOOGLE_CLOUD_PROJECT": FAKE_PROJECT,
        "GCLOUD_PROJECT": FAKE_PROJECT,
        "GOOGLE_API_USE_CLIENT_CERTIFICATE": "false",
        "GOOGLE_API_USE_MTLS_ENDPOINT": "never",
        # gcsfs >= 2025 asks a gRPC control-plane API for each bucket's layout first; the emulator
        # has none (each probe then waits for its timeout). Read at gcsfs's import.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # an HTTP(S)_PROXY of the machine must never see (or relay) this loopback traffic
        "NO_PROXY": _no_proxy(os.environ.get("NO_PROXY")),
        "no_proxy": _no_proxy(os.environ.get("no_proxy")),
    }


def _no_proxy(current: str | None) -> str:
    hosts = [h for h in (current or "").split(",") if h.strip()]
    return ",".join(hosts + [h for h in (LOOPBACK, "localhost") if h not in hosts])


@contextlib.contextmanager
def applied_environment(env: dict[str, str | None]):
    """Sets `env` in os.environ, and in the google-auth / Beam state that was read at import time;
    restores everything on exit."""
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    patched = []

    def patch(obj, name, value):
        patched.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    from google.auth.compute_engine import _metadata

    patch(_metadata, "_GCE_METADATA_HOST", env["GCE_METADATA_HOST"])
    patch(_metadata, "_NO_GCE_CHECK", False)
    try:  # Beam caches its credentials once per process: look them up again under this environment
        from apache_beam.internal.gcp import auth as beam_auth

        patch(beam_auth._Credentials, "_credentials_init", False)
        patch(beam_auth._Credentials, "_credentials", None)
    except ImportError:
        pass
    from transforms.io import storage

    storage.reset_client()
    try:
        yield
    finally:
        storage.reset_client()
        for obj, name, value in reversed(patched):
            setattr(obj, name, value)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# Fault-injecting proxy

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
               "upgrade", "proxy-authorization", "proxy-authenticate"}


class FaultPlan:
    """Which requests fail, by their 1-based arrival number n (only requests `applies(method, path)`
    selects are numbered and can fail):

    * n <= fail_first: answered `first_status` (503) without reaching the emulator;
    * every_k and n % every_k == 0: answered `every_status` (429, 500 or 503);
    * reset_every and n % reset_every == 0: the connection is reset (RST). A GET or HEAD is
      forwarded first and cut after half of its response body; any other request is dropped before
      it reaches the emulator. (Cutting the response of a completed upload would be a fault the
      emulator cannot recover from: it forgets a resumable upload session once it completes and
      answers the client's retry 404, where GCS answers 200 with the object.)
    """

    def __init__(self, fail_first: int = 0, first_status: int = 503, every_k: int = 0,
                 every_status: int = 500, reset_every: int = 0, applies=None, max_faults: int | None = None):
        self.fail_first, self.first_status = fail_first, first_status
        self.every_k, self.every_status = every_k, every_status
        self.reset_every = reset_every
        self.applies = applies or (lambda method, path: True)
        self.max_faults = max_faults

    def decide(self, n: int, faults_so_far: int) -> tuple[str, int] | None:
        if self.max_faults is not None and faults_so_far >= self.max_faults:
            return None
        if n <= self.fail_first:
            return ("status", self.first_status)
        if self.reset_every and n % self.reset_every == 0:
            return ("reset", 0)
        if self.every_k and n % self.every_k == 0:
            return ("status", self.every_status)
        return None


# ---------------------------------------------------------------------------------------------
# Requests by kind, as GCS bills them


# (kind, GCS operation class): Class A and B are billed per 10,000; deletes are free
KIND_CLASS = {
    "get_media": "B",       # objects.get ?alt=media (a download, found or 404)
    "get_metadata": "B",    # objects.get (metadata only)
    "get_bucket": "B",      # buckets.get
    "list": "A",            # objects.list (one page)
    "insert": "A",          # objects.insert: a simple or multipart upload, or a resumable upload's start
    "upload_part": "A",     # a resumable upload's PUT (billed as Class A, as its start is)
    "compose": "A",
    "copy": "A",            # objects.copy / objects.rewrite
    "patch": "A",           # objects.patch / update
    "delete": "free",
    "other": "?",
}

_OBJECT = r"/storage/v1/b/[^/?]+/o/[^/?]+"


def request_kind(method: str, path: str) -> str:
    """The kind (a key of KIND_CLASS) of one JSON API request, from its method and path."""
    url = urllib.parse.urlsplit(path)
    p, query = url.path, urllib.parse.parse_qs(url.query)
    if p.startswith("/upload/storage/v1/b/"):
        return "upload_part" if method == "PUT" else "insert"
    if method == "GET":
        if re.fullmatch(r"/download/storage/v1/b/[^/?]+/o/.+", p) or (
                re.fullmatch(_OBJECT, p) and query.get("alt") == ["media"]):
            return "get_media"
        if re.fullmatch(_OBJECT, p):
            return "get_metadata"
        if re.fullmatch(r"/storage/v1/b/[^/?]+/o/?", p):
            return "list"
        if re.fullmatch(r"/storage/v1/b/[^/?]+/?", p):
            return "get_bucket"
        return "other"
    if method == "POST":
        if p.endswith("/compose") and re.fullmatch(_OBJECT + "/compose", p):
            return "compose"
        if re.fullmatch(_OBJECT + r"/(copyTo|rewriteTo)/b/[^/?]+/o/[^/?]+", p):
            return "copy"
        if re.fullmatch(r"/storage/v1/b/[^/?]+/o/?", p):
            return "insert"
        return "other"
    if method == "DELETE" and re.fullmatch(_OBJECT, p):
        return "delete"
    if method in ("PATCH", "PUT") and re.fullmatch(_OBJECT, p):
        return "patch"
    return "other"


_BATCH_PART = re.compile(rb"^(GET|POST|PUT|PATCH|DELETE) (\S+) HTTP/1\.1\r?$", re.MULTILINE)


def request_operations(method: str, path: str, body: bytes | None) -> list[tuple[str, str]]:
    """(kind, path) of each billed operation of one HTTP request: itself, or each part of a JSON
    batch (with the part's own path)."""
    if method == "POST" and urllib.parse.urlsplit(path).path.startswith("/batch/"):
        parts = [(m.decode(), u.decode()) for m, u in _BATCH_PART.findall(body or b"")]
        return [(request_kind(m, u), u) for m, u in parts]
    return [(request_kind(method, path), path)]


def request_kinds(method: str, path: str, body: bytes | None) -> list[str]:
    """The billed operations of one HTTP request by kind: itself, or each part of a JSON batch."""
    return [kind for kind, _ in request_operations(method, path, body)]


def operation_object(path: str) -> str:
    """The object name (or listing prefix / start) an operation's path names, decoded."""
    url = urllib.parse.urlsplit(path)
    if "/o/" in url.path:
        return urllib.parse.unquote(url.path.split("/o/", 1)[1])
    query = urllib.parse.parse_qs(url.query)
    return (query.get("startOffset") or query.get("prefix") or [""])[0]


class GcsListPaging:
    """objects.list as GCS answers it, over the emulator's one-page answer: entries (objects and,
    with a delimiter, prefixes) in name order, only those in [startOffset, endOffset), at most
    `maxResults` (default and cap 1,000) a page, with a `nextPageToken` while more remain."""

    PAGE = 1000
    OWN = ("maxResults", "pageToken", "startOffset", "endOffset")

    @staticmethod
    def applies(method: str, path: str) -> bool:
        return method == "GET" and bool(re.fullmatch(r"/storage/v1/b/[^/?]+/o/?", urllib.parse.urlsplit(path).path))

    @classmethod
    def upstream_path(cls, path: str) -> str:
        """The request as forwarded: without the paging parameters the emulator ignores."""
        url = urllib.parse.urlsplit(path)
        query = [(k, v) for k, v in urllib.parse.parse_qsl(url.query, keep_blank_values=True) if k not in cls.OWN]
        return urllib.parse.urlunsplit(("", "", url.path, urllib.parse.urlencode(query), ""))

    @classmethod
    def page(cls, path: str, answer: dict) -> dict:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))
        size = min(int(query.get("maxResults") or cls.PAGE), cls.PAGE)
        start, end = query.get("startOffset"), query.get("endOffset")
        after = base64.urlsafe_b64decode(query["pageToken"]).decode() if query.get("pageToken") else None
        entries = [(o["name"], "item", o) for o in answer.get("items") or []]
        entries += [(p, "prefix", p) for p in answer.get("prefixes") or []]
        entries = sorted(e for e in entries if (start is None or e[0] >= start) and (end is None or e[0] < end)
                         and (after is None or e[0] > after)) if entries else []
        shown = entries[:size]
        out = {k: v for k, v in answer.items() if k not in ("items", "prefixes", "nextPageToken")}
        out["items"] = [e[2] for e in shown if e[1] == "item"]
        out["prefixes"] = [e[2] for e in shown if e[1] == "prefix"]
        if len(entries) > size:
            out["nextPageToken"] = base64.urlsafe_b64encode(shown[-1][0].encode()).decode()
        return out


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body are two writes: with Nagle's algorithm the body waits for the client's
    # delayed ACK, 40 ms per request on Linux loopback
    disable_nagle_algorithm = True
    server: "_ProxyServer"

    def _body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is not None:
            return self.rfile.read(int(length))
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return None

    def _handle(self):
        proxy = self.server.proxy
        body = self._body()
        action = proxy._next_action(self.command, self.path, self.headers.get("User-Agent", ""), body)
        if proxy.latency_s:
            time.sleep(proxy.latency_s)  # the round trip to a distant object store
        if action and action[0] == "status":
            status = action[1]
            payload = json.dumps({"error": {"code": status, "message": "injected by FaultyProxy"}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if action and action[0] == "reset" and self.command not in ("GET", "HEAD"):
            self._reset()
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        paged = proxy.list_paging and GcsListPaging.applies(self.command, self.path)
        upstream = http.client.HTTPConnection(LOOPBACK, proxy.upstream_port, timeout=60)
        try:
            path = GcsListPaging.upstream_path(self.path) if paged else self.path
            upstream.request(self.command, path, body=body, headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
            if paged and resp.status == 200:
                data = json.dumps(GcsListPaging.page(self.path, json.loads(data))).encode()
            resp_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP | {"content-length"}]
            status, reason = resp.status, resp.reason
        except OSError as e:  # the emulator is gone: a real 502, not a fault of the plan
            status, reason, resp_headers = 502, "Bad Gateway", [("Content-Type", "text/plain")]
            data = f"upstream: {type(e).__name__}".encode()
        finally:
            upstream.close()
        with proxy._lock:
            proxy.counts["forwarded"] += 1
        self.send_response(status, reason)
        for k, v in resp_headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if action and action[0] == "reset":
            with proxy._lock:
                proxy.cut_answers.append((self.command, self.path, status))
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._reset()
            return
        self.wfile.write(data)

    def _reset(self):
        # SO_LINGER 0: close() sends RST, the client sees "connection reset by peer"
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    def log_message(self, *args):
        pass


class _ProxyServer(_ThreadingServer):
    proxy: "FaultyProxy"


class FaultyProxy:
    """Forwards HTTP from 127.0.0.1:<free port> to the emulator, injecting the faults of `plan` and,
    with `latency_s`, delaying every request by that much (each request on its own thread, so
    concurrent requests overlap their delays as they would on a real object store)."""

    def __init__(self, upstream_port: int, plan: FaultPlan | None = None, latency_s: float = 0.0,
                 list_paging: bool = True):
        self.upstream_port = upstream_port
        self.list_paging = list_paging  # page object listings as GCS does (GcsListPaging)
        self.kinds: dict[str, int] = {}  # billed operations by kind (request_kinds), batch parts included
        self.operations: list[tuple[str, str]] = []  # (kind, path) of each, batch parts one by one
        self.plan = plan or FaultPlan()
        self.latency_s = latency_s
        self._lock = threading.Lock()
        self.counts = {"requests": 0, "selected": 0, "forwarded": 0, "injected_status": 0, "resets": 0}
        self.by_status: dict[int, int] = {}
        self.log: list[tuple[str, str]] = []  # (method, path) of every request, no headers
        # (fault, method, path, client) of each injected fault; client: "beam" (Beam's gcsio, which
        # retries on its own), "gcsfs", or "storage" (google-cloud-storage as transforms.io.storage uses it)
        self.fault_log: list[tuple[str, str, str, str]] = []
        # (method, path, upstream status) of each answer cut by a reset (the status line gets through)
        self.cut_answers: list[tuple[str, str, int]] = []
        self._server = _ProxyServer((LOOPBACK, 0), _ProxyHandler)
        self._server.proxy = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def faults(self) -> int:
        return self.counts["injected_status"] + self.counts["resets"]

    def faults_of(self, client: str) -> int:
        """Injected faults that hit requests of `client` (see fault_log)."""
        return sum(f[3] == client for f in self.fault_log)

    @staticmethod
    def client_of(user_agent: str) -> str:
        if "apache-beam" in user_agent:
            return "beam"
        return "gcsfs" if "gcsfs" in user_agent else "storage"

    def _next_action(self, method: str, path: str, user_agent: str = "", body: bytes | None = None):
        operations = request_operations(method, path, body)
        with self._lock:
            self.counts["requests"] += 1
            self.operations += operations
            for kind, _ in operations:
                self.kinds[kind] = self.kinds.get(kind, 0) + 1
            self.log.append((method, path))
            if not self.plan.applies(method, path):
                return None
            self.counts["selected"] += 1
            action = self.plan.decide(self.counts["selected"], self.faults)
            if action and action[0] == "status":
                self.counts["injected_status"] += 1
                self.by_status[action[1]] = self.by_status.get(action[1], 0) + 1
            elif action:
                self.counts["resets"] += 1
            if action:
                self.fault_log.append((str(action[1]) if action[0] == "status" else "reset", method, path,
                                       self.client_of(user_agent)))
            return action

    def reset(self, plan: FaultPlan | None = None) -> None:
        with self._lock:
            if plan is not None:
                self.plan = plan
            for k in self.counts:
                self.counts[k] = 0
            self.kinds.clear()
            self.operations.clear()
            self.by_status.clear()
            self.log.clear()
            self.fault_log.clear()
            self.cut_answers.clear()

    def start(self) -> "FaultyProxy":
        if not self._thread.is_alive():
            self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------------------------------
# What the `gcs_emulator` fixture yields


class GcsTestServer:
    """The emulator and the fake metadata server for a test session, and the environment to use them."""

    def __init__(self, scratch_dir: str):
        self.scratch_dir = scratch_dir
        self.emulator = GcsEmulator()
        self.metadata: FakeMetadataServer | None = None

    def start(self) -> "GcsTestServer":
        self.emulator.start()
        self.metadata = FakeMetadataServer().start()
        return self

    def stop(self) -> None:
        if self.metadata is not None:
            self.metadata.stop()
            self.metadata = None
        self.emulator.stop()

    @property
    def endpoint(self) -> str:
        return self.emulator.endpoint

    @property
    def port(self) -> int:
        return self.emulator.port

    def bucket(self, name: str) -> str:
        return self.emulator.bucket(name)

    def upload_tree(self, local_dir, gs_prefix: str) -> list[str]:
        return self.emulator.upload_tree(local_dir, gs_prefix)

    def upload_bytes(self, url: str, data: bytes) -> None:
        self.emulator.upload_bytes(url, data)

    def read_bytes(self, url: str) -> bytes:
        return self.emulator.read_bytes(url)

    def download_tree(self, gs_prefix: str, local_dir) -> list[Path]:
        return self.emulator.download_tree(gs_prefix, local_dir)

    def list(self, gs_prefix: str) -> list[str]:
        return self.emulator.list(gs_prefix)

    def env(self, endpoint: str | None = None) -> dict[str, str | None]:
        return emulator_environment(endpoint or self.endpoint, self.metadata.host, self.scratch_dir)

    def environment(self, endpoint: str | None = None):
        """Context manager: every GCS client of this process (and of worker processes started inside
        it) talks to `endpoint` (default: the emulator itself; pass a FaultyProxy's endpoint)."""
        return applied_environment(self.env(endpoint))

    def proxy(self, plan: FaultPlan | None = None, latency_s: float = 0.0, list_paging: bool = True) -> FaultyProxy:
        """A FaultyProxy in front of the emulator (started; stop it, or use it as a context manager)."""
        return FaultyProxy(self.emulator.port, plan, latency_s, list_paging).start()

    def gcsfs(self, endpoint: str | None = None):
        """A gcsfs filesystem on the emulator, anonymous (the core class: no gRPC layout probes)."""
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(token="anon", endpoint_url=endpoint or self.endpoint, skip_instance_cache=True)
