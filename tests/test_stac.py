"""The HTTP layer of fetch-nir (transforms/nir/stac.py), its pure functions (transforms/nir/nir_fetch.py) and
signing (transforms/nir/signing.py).

* PoliteHttp against a scripted HTTP server on loopback: 429 (with Retry-After), 503, 500, bodies
  cut short and reset connections are retried and counted; 404 and other 4xx are not; the rate
  limit and the concurrency bound hold; a signed URL's token never reaches an error message.
* RemoteFile: byte-exact random reads over Range requests, prefetch of coalesced ranges, and a
  server that ignores Range.
* StacClient against the real stac-fastapi-pgstac of the `naip_servers` fixture: search (with
  pagination), items by id, 404.
* Folder-id resolution rules, grouping, range coalescing, the mapping file, signing (the
  planetary-computer package against a SAS token endpoint on loopback).
"""
from __future__ import annotations

import datetime as dt
import gzip
import http.server
import json
import os
import socket
import struct
import sys
import threading
import time

import pytest

from pipelines.dev.gcs_emulator import LOOPBACK
from transforms.io import storage
from transforms.nir import geo, nir_fetch, signing, stac

FAST = storage.RetryPolicy(attempts=6, initial_delay_s=0.01, max_delay_s=0.05, deadline_s=20)


pytestmark = pytest.mark.usefixtures("loopback_only")  # tests/conftest.py


@pytest.fixture(autouse=True)
def no_proxy_for_loopback(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


# ---------------------------------------------------------------------------------------------
# A scripted HTTP server


class _QuickServer(http.server.ThreadingHTTPServer):
    """Handler threads are daemons and not waited for at close (a client's idle keep-alive
    connection would hold one)."""

    daemon_threads = True
    block_on_close = False


class Scripted:
    """Answers GET /<anything> from a queue of actions, then with the object (Range honoured):
    ("status", code, headers) | ("truncate",) (full Content-Length, half the body, close) |
    ("reset",) (RST before answering) | ("slow", seconds) | ("short",) (a well-formed 206 whose
    Content-Length and body are half of the range asked for: the client's own length check)."""

    def __init__(self, body: bytes, honour_range: bool = True):
        self.body = body
        self.honour_range = honour_range
        self.actions: list[tuple] = []
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str | None]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no delayed-ACK stalls

            def do_GET(self):
                with outer.lock:
                    outer.requests.append((self.path, self.headers.get("Range")))
                    action = outer.actions.pop(0) if outer.actions else None
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    self._answer(action)
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def _answer(self, action):
                if action and action[0] == "status":
                    payload = b'{"error": "scripted"}'
                    self.send_response(action[1])
                    for k, v in (action[2] if len(action) > 2 else {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if action and action[0] == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if action and action[0] == "slow":
                    time.sleep(action[1])
                data, status, extra = outer.body, 200, {}
                rng = self.headers.get("Range")
                if rng and outer.honour_range:
                    start, end = (int(v) for v in rng.split("=")[1].split("-"))
                    end = min(end, len(outer.body) - 1)
                    data, status = outer.body[start:end + 1], 206
                    if action and action[0] == "short":
                        end = start + (end - start + 1) // 2 - 1
                        data = outer.body[start:end + 1]
                    extra = {"Content-Range": f"bytes {start}-{end}/{len(outer.body)}"}
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if action and action[0] == "truncate":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = _QuickServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}/obj.tif"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    servers = []

    def make(body=bytes(range(256)) * 1000, honour_range=True):
        s = Scripted(body, honour_range)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def client(**kw) -> stac.PoliteHttp:
    return stac.PoliteHttp(stac.HttpPolicy(**{"max_requests_per_s": 0, "retry": FAST, **kw}))


def test_transient_answers_are_retried_and_counted(scripted):
    srv = scripted()
    srv.actions = [("status", 429, {"Retry-After": "0"}), ("status", 503), ("truncate",), ("reset",), ("status", 500)]
    stats = stac.RequestStats()
    resp = client().request("GET", srv.url, headers={"Range": "bytes=10-19"}, stats=stats, ok_status=(206,),
                            expected_length=10)
    assert resp.content == srv.body[10:20]
    assert stats.retries == 5 and stats.requests == 6


def test_a_short_ranged_answer_is_retried(scripted, caplog):
    """A 206 that is complete by its own Content-Length but shorter than the range asked for (a proxy
    or CDN cutting the answer) is retried, not returned: stac.py's _Truncated path."""
    srv = scripted()
    srv.actions = [("short",), ("short",)]
    stats = stac.RequestStats()
    caplog.set_level("INFO")
    resp = client().request("GET", srv.url, headers={"Range": "bytes=100-199"}, stats=stats, ok_status=(206,),
                            expected_length=100)
    assert resp.content == srv.body[100:200]
    assert stats.retries == 2 and stats.requests == 3
    assert "_Truncated: 50 of 100 bytes" in caplog.text
    srv.actions = [("short",)] * FAST.attempts
    with pytest.raises(stac.HttpUnavailable, match="50 of 100 bytes"):
        client().request("GET", srv.url, headers={"Range": "bytes=100-199"}, ok_status=(206,), expected_length=100)


def test_permanent_answers_are_not_retried(scripted):
    srv = scripted()
    srv.actions = [("status", 404)]
    stats = stac.RequestStats()
    with pytest.raises(stac.HttpNotFound):
        client().request("GET", srv.url, stats=stats)
    srv.actions = [("status", 403)]
    with pytest.raises(stac.HttpError) as e:
        client().request("GET", srv.url, stats=stats)
    assert e.value.status == 403
    assert stats.requests == 2 and stats.retries == 0


def test_retries_run_out_and_the_token_is_never_shown(scripted):
    srv = scripted()
    srv.actions = [("status", 503)] * 10
    stats = stac.RequestStats()
    with pytest.raises(stac.HttpUnavailable) as e:
        client().request("GET", srv.url + "?st=2026&sig=SECRET-TOKEN", stats=stats)
    assert "SECRET" not in str(e.value) and "sig=" not in str(e.value)
    assert stats.requests == FAST.attempts and stats.retries == FAST.attempts - 1
    from pipelines.dev.gcs_emulator import free_port

    closed = f"http://{LOOPBACK}:{free_port()}/x.tif?sig=SECRET-TOKEN"  # connection refused
    with pytest.raises(stac.HttpUnavailable) as e:
        client().request("GET", closed)
    assert "SECRET" not in str(e.value) and "sig=" not in str(e.value)
    assert "ConnectionError" in str(e.value)
    with pytest.raises(stac.HttpError) as e:
        client().request("GET", "htp://bad-scheme/x?sig=SECRET-TOKEN")
    assert "SECRET" not in str(e.value)


def test_retry_after_is_honoured(scripted):
    srv = scripted()
    srv.actions = [("status", 429, {"Retry-After": "0.3"})]
    http = stac.PoliteHttp(stac.HttpPolicy(max_requests_per_s=0, retry=storage.RetryPolicy(
        attempts=3, initial_delay_s=0.01, max_delay_s=1.0, deadline_s=10)))
    t = time.monotonic()
    http.request("GET", srv.url)
    assert time.monotonic() - t >= 0.3


def test_rate_limit(scripted):
    srv = scripted()
    http = stac.PoliteHttp(stac.HttpPolicy(max_requests_per_s=20.0, retry=FAST))
    t = time.monotonic()
    for _ in range(30):  # a burst of 10, then 20 more at 20/s
        http.request("GET", srv.url, headers={"Range": "bytes=0-0"}, ok_status=(206,))
    assert time.monotonic() - t >= 0.9


def test_concurrency_bound(scripted):
    srv = scripted()
    srv.actions = [("slow", 0.1)] * 24
    http = client(max_concurrency=3)
    threads = [threading.Thread(target=http.request, args=("GET", srv.url)) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 2 <= http.max_in_flight <= 3  # the bound is reached, never passed
    assert srv.max_in_flight <= 3


def test_remote_file_reads_exact_bytes(scripted):
    body = os.urandom(300_000)
    srv = scripted(body)
    stats = stac.RequestStats()
    remote = stac.RemoteFile(srv.url, client(), stats, header_bytes=4096, min_fetch=1000).open()
    assert remote.size == len(body) and stats.requests == 1
    assert remote.prefetch([(10_000, 20_000), (50_000, 60_000)], max_workers=2) == 2
    assert stats.requests == 3
    assert remote.read_at(12_000, 5000) == body[12_000:17_000]  # cached: no request
    assert stats.requests == 3
    assert remote.read_at(19_000, 2000) == body[19_000:21_000]  # 1000 bytes missing: one request
    assert stats.requests == 4 and remote.on_demand_fetches == 1
    assert remote.prefetch([(0, 4096), (10_000, 21_000)]) == 0  # all there already
    rng = __import__("random").Random(0)
    for _ in range(200):
        off = rng.randrange(0, len(body))
        n = rng.randrange(0, 5000)
        assert remote.read_at(off, n) == body[off:off + n]
    assert remote.read_at(len(body) + 5, 10) == b""


def test_remote_file_when_the_server_ignores_range(scripted):
    body = os.urandom(50_000)
    srv = scripted(body, honour_range=False)
    stats = stac.RequestStats()
    remote = stac.RemoteFile(srv.url, client(), stats, header_bytes=4096).open()
    assert remote.size == len(body) and remote.read_at(40_000, 10_000) == body[40_000:]
    assert stats.requests == 1


def test_remote_file_bad_content_range_is_an_error(scripted):
    srv = scripted()
    srv.actions = [("status", 206, {"Content-Range": "bytes 5-9/100"})]
    with pytest.raises(stac.HttpError):
        stac.RemoteFile(srv.url, client()).open()


def test_open_remote_dataset_touches_no_sidecar(tmp_path, scripted):
    """GDAL probes for .ovr/.aux.xml/.msk sidecars; the opener answers 'no such file' without a request."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    path = tmp_path / "cog.tif"
    data = (np.arange(4 * 300 * 200) % 251).astype("uint8").reshape(4, 300, 200)
    with rasterio.open(path, "w", driver="COG", width=200, height=300, count=4, dtype="uint8", crs="EPSG:26914",
                       transform=from_origin(500000, 5200000, 1, 1), BLOCKSIZE=64) as dst:
        dst.write(data)
    srv = scripted(path.read_bytes())
    stats = stac.RequestStats()
    remote = stac.RemoteFile(srv.url + "?sig=SECRET", client(), stats, header_bytes=65536)
    with stac.open_remote_dataset(remote, "item.tif") as ds:
        assert "SECRET" not in ds.name and "127.0.0.1" not in ds.name
        assert (ds.read(4) == data[3]).all()
    assert all(path_ == "/obj.tif?sig=SECRET" for path_, _ in srv.requests)


# ---------------------------------------------------------------------------------------------
# STAC API (real stac-fastapi-pgstac)


def test_stac_search_and_items(naip_servers):
    http = client()
    api = stac.StacClient(naip_servers.stac_url, http, "naip")
    cog = naip_servers.cog("m_4709963_se_14_1_20190904")
    lon = (cog.bbox[0] + cog.bbox[2]) / 2
    lat = (cog.bbox[1] + cog.bbox[3]) / 2
    stats = stac.RequestStats()
    found = api.search(bbox=(lon - 0.001, lat - 0.001, lon + 0.001, lat + 0.001),
                       datetime="2019-09-03T00:00:00Z/2019-09-05T23:59:59Z", stats=stats)
    assert [f["id"] for f in found] == [cog.item_id] and stats.stac_requests == 1
    # every capture of the quad, through pages of 3 (the API's next links)
    paged = stac.StacClient(naip_servers.stac_url, http, "naip", page_size=3)
    stats = stac.RequestStats()
    everything = paged.search(bbox=(lon - 0.001, lat - 0.001, lon + 0.001, lat + 0.001),
                              datetime="2000-01-01T00:00:00Z/2030-01-01T00:00:00Z", stats=stats)
    ids = [f["id"] for f in everything]
    assert len(ids) == len(set(ids)) >= len(naip_servers.cogs)
    assert {c.item_id for c in naip_servers.cogs} <= set(ids)
    assert stats.stac_requests >= 4
    item = api.get_item(cog.item_id)
    assert item["id"] == cog.item_id and item["properties"]["proj:epsg"] == 26914
    assert item["assets"]["image"]["href"].startswith(naip_servers.data_endpoint)
    assert api.get_item("nd_m_0000000_ne_14_1_20000101_20000101") is None


def test_stac_url_must_be_http():
    with pytest.raises(ValueError):
        stac.StacClient("file:///etc/passwd", None)


# ---------------------------------------------------------------------------------------------
# Resolution rules, grouping, planning (pure)


def feature(item_id, date="2019-11-28"):
    return {"type": "Feature", "id": item_id, "properties": {"datetime": f"{date}T00:00:00Z", "proj:epsg": 26917},
            "assets": {"image": {"href": f"https://example.invalid/{item_id}.tif"}}}


def test_folder_id_parsing():
    f = nir_fetch.parse_folder_id("m_2408115_sw_17_060_20191128")
    assert (f.quad, f.quarter, f.zone, f.resolution, f.date) == ("2408115", "sw", "17", "060", dt.date(2019, 11, 28))
    assert f.quarter_quad == "m_2408115_sw"
    for bad in ("m_2408115_sw_17_060_20191332", "x_2408115_sw_17_060_20191128", "m_2408115_sw_17_060_20191128/.."):
        with pytest.raises(ValueError):
            nir_fetch.parse_folder_id(bad)
    assert nir_fetch.search_datetime(dt.date(2019, 11, 28)) == "2019-11-27T00:00:00Z/2019-11-29T23:59:59Z"


def test_choose_item():
    folder = nir_fetch.parse_folder_id("m_2408115_sw_17_060_20191128")
    # Planetary Computer's id: state prefix and publication date around the folder id
    best, why = nir_fetch.choose_item(folder, [
        feature("fl_m_2408115_se_17_060_20191128_20200113"),  # the neighbouring quarter, same day
        feature("fl_m_2408115_sw_17_060_20191128_20200113"),
        feature("fl_m_2408115_sw_17_060_20171206_20180201", "2017-12-06"),  # another year
    ])
    assert best["id"] == "fl_m_2408115_sw_17_060_20191128_20200113" and "contains" in why
    # republished: the latest publication wins, whatever the state prefix
    best, _ = nir_fetch.choose_item(folder, [feature("zz_m_2408115_sw_17_060_20191128_20200113"),
                                             feature("aa_m_2408115_sw_17_060_20191128_20210101")])
    assert best["id"] == "aa_m_2408115_sw_17_060_20191128_20210101"
    # an id with another resolution/zone spelling: the quarter-quad name and the capture date decide
    best, why = nir_fetch.choose_item(folder, [feature("fl_m_2408115_sw_17_h_20191128"),
                                               feature("fl_m_2408115_sw_17_h_20171206", "2017-12-06")])
    assert best["id"] == "fl_m_2408115_sw_17_h_20191128" and "captured 2019-11-28" in why
    none, why = nir_fetch.choose_item(folder, [feature("fl_m_2408115_se_17_060_20191128_20200113")])
    assert none is None and "fl_m_2408115_se_17_060_20191128_20200113" in why
    assert nir_fetch.choose_item(folder, [])[0] is None


def test_item_ref():
    ref = nir_fetch.item_ref(feature("fl_m_2408115_sw_17_060_20191128_20200113"))
    assert ref.epsg == 26917 and ref.href.endswith(".tif")
    assert nir_fetch.ItemRef.from_tuple(ref.to_tuple()) == ref
    bad = feature("x")
    bad["assets"]["image"]["href"] = "file:///etc/passwd"
    with pytest.raises(ValueError):
        nir_fetch.item_ref(bad)
    with pytest.raises(ValueError):
        nir_fetch.item_ref({"id": "y", "assets": {}})


def test_tiles_bbox_lonlat_contains_the_tiles():
    import rasterio.warp

    xys = [(33000, 47000), (33002, 47001)]
    west, south, east, north = nir_fetch.tiles_bbox_lonlat(xys)
    for x, y in xys:
        l, b, r, t = geo.tile_bounds_3857(x, y)
        lon, lat = rasterio.warp.transform("EPSG:3857", "EPSG:4326", [l, r], [b, t])
        assert west <= min(lon) + 1e-9 and max(lon) <= east + 1e-9
        assert south <= min(lat) + 1e-9 and max(lat) <= north + 1e-9
    assert nir_fetch.search_bbox(xys) == nir_fetch.tiles_bbox_lonlat([(33000, 47000)])


def test_groups_are_bounded_and_deterministic():
    import random

    dense = [(x, y) for x in range(1000, 1030) for y in range(2000, 2013)]
    shuffled = dense[:] + dense[:5]
    random.Random(1).shuffle(shuffled)
    groups = nir_fetch.split_groups(shuffled, 8)
    assert groups == nir_fetch.split_groups(dense, 8)
    assert all(len(g) <= 64 for g in groups) and len(groups) == -(-len(dense) // 64)
    assert sorted(t for g in groups for t in g) == sorted(dense)
    # a full 8x8 block is one group
    block = [(x, y) for x in range(1000, 1008) for y in range(2000, 2008)]
    assert nir_fetch.split_groups(block, 8) == [sorted(block, key=lambda t: (t[1], t[0]))]
    # a sparse item: tiles of many blocks share one group
    sparse = [(1000 + 9 * i, 2000 + 7 * i) for i in range(30)]
    assert len(nir_fetch.split_groups(sparse, 8)) == 1
    unique, extra = nir_fetch.dedupe([(1, 2), (3, 4), (1, 2), (1, 2)])
    assert unique == [(1, 2), (3, 4)] and extra == [(1, 2), (1, 2)]
    assert nir_fetch.column_runs([(5, 1), (5, 2), (5, 4), (6, 1), (5, 3)]) == [(5, [1, 2, 3, 4]), (6, [1])]
    assert nir_fetch.column_runs([(5, 1), (5, 3)]) == [(5, [1]), (5, [3])]


def test_coalesce():
    assert nir_fetch.coalesce([(0, 10), (15, 20), (100, 110)], max_gap=5) == [(0, 20), (100, 110)]
    assert nir_fetch.coalesce([(5, 10), (0, 6)], max_gap=0) == [(0, 10)]
    assert nir_fetch.coalesce([(0, 10), (10, 20), (20, 30)], max_gap=0, max_range=20) == [(0, 20), (20, 30)]
    assert nir_fetch.coalesce([(0, 100)], max_gap=0, max_range=10) == [(0, 100)]  # one range is never cut


def test_id_map(tmp_path):
    path = tmp_path / "map.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"m_2408115_sw_17_060_20191128":
                                               "fl_m_2408115_sw_17_060_20191128_20200113"}).encode()))
    assert nir_fetch.load_id_map(str(path)) == {
        "m_2408115_sw_17_060_20191128": "fl_m_2408115_sw_17_060_20191128_20200113"}
    plain = tmp_path / "map.json"
    plain.write_text(json.dumps({"m_2408115_sw_17_060_20191128": "a b"}))
    with pytest.raises(ValueError):
        nir_fetch.load_id_map(str(plain))
    plain.write_text(json.dumps({"../etc": "x"}))
    with pytest.raises(ValueError):
        nir_fetch.load_id_map(str(plain))
    plain.write_text("[1, 2]")
    with pytest.raises(ValueError):
        nir_fetch.load_id_map(str(plain))


def test_reject_vocabulary():
    r = nir_fetch.nir_reject("m_2408115_sw_17_060_20191128/1_2", "resolve", "unresolved_naip_id", "x")
    assert set(r) == {"tile_id", "stage", "reason", "detail"}
    with pytest.raises(ValueError):
        nir_fetch.nir_reject("a", "resolve", "no_such_reason")


# ---------------------------------------------------------------------------------------------
# Signing


def test_no_signer():
    assert signing.make_signer("none").sign("https://x.blob.core.windows.net/c/a.tif") == \
        "https://x.blob.core.windows.net/c/a.tif"
    with pytest.raises(ValueError):
        signing.make_signer("aws")


def test_planetary_computer_package_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "planetary_computer", None)  # `import planetary_computer` fails
    with pytest.raises(ImportError, match="pip install"):
        signing.make_signer("planetary-computer")


class _SasHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    calls: list[str] = []

    def do_GET(self):
        type(self).calls.append(self.path)
        body = json.dumps({"msft:expiry": "2099-01-01T00:00:00Z", "token": "st=2026&se=2099&sp=rl&sig=FAKE"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_planetary_computer_signer_signs_once_per_container(monkeypatch):
    pc = pytest.importorskip("planetary_computer")
    server = _QuickServer((LOOPBACK, 0), _SasHandler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    _SasHandler.calls = []
    monkeypatch.setenv("PC_SDK_SAS_URL", f"http://{LOOPBACK}:{server.server_address[1]}/api/sas/v1/token")
    monkeypatch.delenv("PC_SDK_SUBSCRIPTION_KEY", raising=False)
    pc.settings.Settings.get.cache_clear()
    monkeypatch.setattr(pc.sas, "TOKEN_CACHE", {})
    try:
        signer = signing.make_signer("planetary-computer")
        href = ("https://naipeuwest.blob.core.windows.net/naip/v002/fl/2019/fl_060cm_2019/24081/"
                "m_2408115_sw_17_060_20191128.tif")
        signed = signer.sign(href)
        assert signed == href + "?st=2026&se=2099&sp=rl&sig=FAKE"
        signer.sign(href.replace("m_2408115_sw", "m_2408115_se"))
        assert _SasHandler.calls == ["/api/sas/v1/token/naipeuwest/naip"]  # the token is cached
        assert signer.sign("http://127.0.0.1:1/x.tif") == "http://127.0.0.1:1/x.tif"  # not blob storage
    finally:
        pc.settings.Settings.get.cache_clear()
        server.shutdown()
        server.server_close()
