"""gs:// end to end, against a GCS emulator on loopback (pipelines/dev/gcs_emulator.py, `gcs_emulator` fixture).

(a) transforms.io.storage on gs://: reads, a missing object as FileNotFoundError, one-level listing,
    atomic writes; (b) the build with --input and --output on gs:// (listing, and a gs:// manifest)
    gives the same pairs as a local run of the same input, byte for byte; (c) the same through a
    proxy injecting 503/429/500 answers and connection resets: same pairs, faults retried.
"""
from __future__ import annotations

import json
import os
import re
import urllib.parse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import apache_beam as beam
from pipelines import build_pairs
from pipelines.dev.gcs_emulator import FAKE_TOKEN, FaultPlan
from tests.tile_factory import NAIP_ID, black_edge, good_tile, scene, series_from, write_png, write_tile
from transforms.io import storage

RUNNER = "FnApiRunner"
IN_BUCKET, OUT_BUCKET = "s2naip-in", "s2naip-out"
SET = "set1"


def tid(i):
    return f"{NAIP_ID}/{36000 + i}_56000"


@pytest.fixture(autouse=True)
def fast_retries():
    """Short backoff so that the fault tests stay fast (this process's policy only)."""
    previous = storage.set_retry_policy(storage.RetryPolicy(initial_delay_s=0.02, max_delay_s=0.5,
                                                            attempts=10, deadline_s=30))
    yield
    storage.set_retry_policy(previous)


pytestmark = pytest.mark.usefixtures("loopback_only")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------
# (a) storage on gs://


@pytest.fixture
def small_tree(gcs_env, tmp_path):
    root = tmp_path / "tree"
    for rel, data in {"a/x.bin": b"x" * 10, "a/sub/y.bin": b"y", "a/sub/deeper/z.bin": b"z",
                      "a/sub2/w.bin": b"w", "b/v.bin": b"v"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    base = gcs_env.bucket("unit") + "/tree"
    gcs_env.upload_tree(root, base)
    return base


def test_storage_reads_lists_and_writes(gcs_env, small_tree):
    base = small_tree
    assert storage.read_bytes(f"{base}/a/x.bin", 100) == b"x" * 10
    with pytest.raises(ValueError, match="larger than"):
        storage.read_bytes(f"{base}/a/x.bin", 9)
    assert storage.read_bytes(f"{base}/a/x.bin", 10) == b"x" * 10
    for missing in (f"{base}/a/nope.bin", f"{base}/a/sub/", f"{base}/a/sub", "gs://no-such-bucket/k"):
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(missing, 100)

    assert storage.list_children(f"{base}/a") == ["sub", "sub2", "x.bin"]
    assert storage.list_children(f"{base}/a/") == ["sub", "sub2", "x.bin"]
    assert storage.list_children(f"{base}/a/sub") == ["deeper", "y.bin"]
    assert storage.list_children(f"{base}/nothing") == []
    with pytest.raises(FileNotFoundError):
        storage.list_children("gs://no-such-bucket/x")
    assert not storage.dir_has_files("gs://no-such-bucket/x")
    assert storage.dir_has_files(f"{base}/a/sub/deeper") and not storage.dir_has_files(f"{base}/a/zzz")
    assert not storage.dir_has_files(f"{base}/a/su")  # a prefix of a folder name is not the folder

    target = f"{base}/out/run.json"
    assert not storage.exists(target)
    storage.write_bytes_atomic(target, b'{"a": 1}')
    storage.write_bytes_atomic(target, b'{"a": 2}')
    assert storage.exists(target) and storage.read_bytes(target, 100) == b'{"a": 2}'
    assert gcs_env.list(f"{base}/out/") == [target]  # no temporary object left behind


def test_storage_missing_object_is_not_retried_and_listing_is_one_level(gcs_emulator, small_tree):
    with gcs_emulator.proxy() as proxy, gcs_emulator.environment(proxy.endpoint):
        before = storage.retry_count()
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(f"{small_tree}/a/nope.bin", 100)
        assert storage.list_children(f"{small_tree}/a") == ["sub", "sub2", "x.bin"]
        assert storage.retry_count() == before
        assert [m for m, _ in proxy.log] == ["GET", "GET"]  # one request each, no exists() first
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(proxy.log[1][1]).query)
        assert query["delimiter"] == ["/"] and query["prefix"] == ["tree/a/"]


def test_storage_retries_transient_errors(gcs_emulator, small_tree):
    plan = FaultPlan(fail_first=2, first_status=503, every_k=3, every_status=500, reset_every=4)
    with gcs_emulator.proxy(plan) as proxy, gcs_emulator.environment(proxy.endpoint):
        before = storage.retry_count()
        for _ in range(3):
            assert storage.read_bytes(f"{small_tree}/a/x.bin", 100) == b"x" * 10
            assert storage.list_children(f"{small_tree}/a/sub") == ["deeper", "y.bin"]
            assert storage.dir_has_files(f"{small_tree}/b")
            storage.write_bytes_atomic(f"{small_tree}/w/f.txt", b"data")
            assert storage.exists(f"{small_tree}/w/f.txt")
        assert proxy.counts["injected_status"] >= 2 and proxy.counts["resets"] >= 1, proxy.counts
        assert storage.retry_count() - before == proxy.faults
        with pytest.raises(FileNotFoundError):  # 404 behind a flaky link: still not found
            storage.read_bytes(f"{small_tree}/a/nope.bin", 100)

    with gcs_emulator.proxy(FaultPlan(every_k=1, every_status=503)) as proxy, \
            gcs_emulator.environment(proxy.endpoint):
        previous = storage.set_retry_policy(storage.RetryPolicy(attempts=3, initial_delay_s=0.01))
        try:
            with pytest.raises(storage.StorageUnavailableError, match="3 tries"):
                storage.read_bytes(f"{small_tree}/a/x.bin", 100)
        finally:
            storage.set_retry_policy(previous)
        assert proxy.counts["requests"] == 3


def test_retry_classification():
    from google.api_core import exceptions as api

    assert storage.is_transient(api.ServiceUnavailable("x")) and storage.is_transient(api.TooManyRequests("x"))
    assert storage.is_transient(api.InternalServerError("x")) and storage.is_transient(ConnectionResetError())
    assert not storage.is_transient(api.NotFound("x")) and not storage.is_transient(api.Forbidden("x"))
    assert not storage.is_transient(FileNotFoundError()) and not storage.is_transient(ValueError())


# ---------------------------------------------------------------------------------------------
# (b) the build on gs://


def _make_input(root: str) -> dict[str, str]:
    """4 good tiles and 4 bad ones; {tile_id: expected outcome}."""
    expected = {}
    for i in range(4):
        good_tile(root, tid(i), seed=i, t=6)
        expected[tid(i)] = "pair"
    write_png(os.path.join(root, "naip", NAIP_ID, "36010_56000", "rgb.png"), np.zeros((128, 128, 3), np.uint8))
    expected[tid(10)] = "naip_black_border"
    good_tile(root, tid(11), seed=11, t=4)
    os.remove(os.path.join(root, "sentinel2", "36011_56000", "b08.png"))
    expected[tid(11)] = "missing_band"
    rng = np.random.default_rng(12)
    hr = scene(rng)
    write_tile(root, tid(12), hr, np.stack([black_edge(f) for f in series_from(hr, rng, 3)]))
    expected[tid(12)] = "no_valid_timesteps"
    write_tile(root, tid(13), scene(rng), None)
    expected[tid(13)] = "missing_s2"
    return expected


@pytest.fixture(scope="module")
def local_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("gcs-local") / "in"
    expected = _make_input(str(root))
    return str(root), expected


@pytest.fixture(scope="module")
def local_run(local_input, tmp_path_factory):
    root, expected = local_input
    out = str(tmp_path_factory.mktemp("gcs-local-out") / "out")
    summary = build_pairs.run(["--input", root, "--output", out, "--runner", RUNNER, "--split", "s"])
    return _tables(pq.read_table(os.path.join(out, "pairs")), pq.read_table(os.path.join(out, "rejects"))), summary


@pytest.fixture(scope="module")
def gcs_input(gcs_emulator, local_input):
    """The local input uploaded to gs://s2naip-in/set1, and a text manifest beside it."""
    root, expected = local_input
    base = gcs_emulator.bucket(IN_BUCKET) + "/" + SET
    gcs_emulator.upload_tree(root, base)
    gcs_emulator.bucket(OUT_BUCKET)
    manifest = f"gs://{IN_BUCKET}/manifests/{SET}.txt"
    gcs_emulator.upload_bytes(manifest, ("# ids\n" + "\n".join(expected) + "\n").encode())
    return base, manifest


def _tables(pairs, rejects):
    pairs = sorted(pairs.to_pylist(), key=lambda r: r["tile_id"])
    rejects = sorted((r["tile_id"], r["stage"], r["reason"]) for r in rejects.to_pylist())
    return pairs, rejects


def _read_gcs_table(fs, folder: str):
    """Every Parquet file of `folder` read through gcsfs, as one table."""
    files = sorted(fs.glob(f"{folder}/*.parquet"))
    assert files, folder
    return pa.concat_tables(pq.read_table(pa.BufferReader(fs.cat_file(f))) for f in files)


def _read_gcs_outputs(gcs_emulator, out: str):
    fs = gcs_emulator.gcsfs()
    prefix = out[len("gs://"):]
    return _tables(_read_gcs_table(fs, f"{prefix}/pairs"), _read_gcs_table(fs, f"{prefix}/rejects"))


def _assert_same_outputs(got, want):
    got_pairs, got_rejects = got
    want_pairs, want_rejects = want
    assert [r["tile_id"] for r in got_pairs] == [r["tile_id"] for r in want_pairs]
    for g, w in zip(got_pairs, want_pairs):
        assert g["hr"] == w["hr"] and g["lr"] == w["lr"], g["tile_id"]  # bytes, exactly
        assert g == w  # and every other column
    assert got_rejects == want_rejects


def _run_capturing_result(monkeypatch, argv):
    """build_pairs.run(argv), also returning the PipelineResult (for its metrics)."""
    results = []
    original = beam.Pipeline.run

    def run_and_keep(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        results.append(result)
        return result

    with monkeypatch.context() as mp:
        mp.setattr(beam.Pipeline, "run", run_and_keep)
        summary = build_pairs.run(argv)
    return summary, results[-1]


def _storage_retries(result) -> int:
    from apache_beam.metrics.metric import MetricsFilter

    counters = result.metrics().query(MetricsFilter().with_namespace("storage").with_name("retries"))["counters"]
    return sum(c.committed or 0 for c in counters)


def _input_listings(proxy) -> list[dict]:
    """The query of every object listing of the input bucket that went through `proxy`."""
    out = []
    for method, path in proxy.log:
        url = urllib.parse.urlsplit(path)
        if method == "GET" and url.path == f"/storage/v1/b/{IN_BUCKET}/o":
            out.append(urllib.parse.parse_qs(url.query))
    return out


def _is_fingerprint_listing(q: dict) -> bool:
    """A listing for object metadata only, the fingerprints of the dataset manifest
    (transforms/build/fingerprints.py): a range listing (startOffset at a tile's folder, no
    delimiter) of the folders of a block of tiles; nothing downloaded."""
    if "crc32c" not in q.get("fields", [""])[0]:
        return False
    start = q.get("startOffset", [""])[0]
    return "delimiter" not in q and bool(
        re.fullmatch(rf"{SET}/naip/{NAIP_ID}/[0-9]+_[0-9]+/", start)
        or re.fullmatch(rf"{SET}/sentinel2/[0-9]+_[0-9]+/", start))


def test_build_gcs_to_gcs_equals_local_run(gcs_emulator, gcs_input, local_run):
    """Listing --input on gs:// goes one level at a time: naip/, then each naip/<capture>/."""
    (want, local_summary), (base, _) = local_run, gcs_input
    out = f"gs://{OUT_BUCKET}/listing"
    with gcs_emulator.proxy() as proxy, gcs_emulator.environment(proxy.endpoint):
        summary = build_pairs.run(["--input", base, "--output", out, "--runner", RUNNER, "--split", "s"])
    _assert_same_outputs(_read_gcs_outputs(gcs_emulator, out), want)
    listings = [q for q in _input_listings(proxy) if not _is_fingerprint_listing(q)]
    assert {q["prefix"][0] for q in listings if q.get("delimiter") == ["/"]} == {
        f"{SET}/naip/", f"{SET}/naip/{NAIP_ID}/"}
    assert all(q.get("delimiter") == ["/"] or q.get("maxResults") == ["1"] for q in listings), listings
    # fingerprints: the NAIP and Sentinel-2 folders of all the tiles (neighbours) in one range listing
    fingerprint_listings = [q for q in _input_listings(proxy) if _is_fingerprint_listing(q)]
    assert len(fingerprint_listings) == 1 and summary["counts"]["tiles"] == 8, fingerprint_listings
    assert fingerprint_listings[0]["startOffset"][0].startswith(f"{SET}/naip/{NAIP_ID}/")
    assert summary["counts"] == local_summary["counts"]
    assert summary["input"] == base and summary["output"] == out
    assert all(f.startswith(out + "/") for f in summary["files"])
    assert all(o.startswith((f"{out}/pairs/", f"{out}/rejects/", f"{out}/manifest/"))
               or o in (f"{out}/run.json", f"{out}/_SUCCESS")
               for o in gcs_emulator.list(out + "/"))  # no temporary files left
    success = json.loads(gcs_emulator.read_bytes(f"{out}/_SUCCESS"))
    assert sorted(success["files"]) == sorted(summary["files"])
    assert json.loads(gcs_emulator.read_bytes(f"{out}/run.json"))["counts"] == local_summary["counts"]


def test_build_with_gcs_manifest_lists_nothing(gcs_emulator, gcs_input, local_run):
    """With a manifest, the input is never listed: only the fingerprints' range listings of the
    tiles' own folders touch the input's listing API (the missing_s2 tile's Sentinel-2 folder is
    not probed again: the range listing saw nothing under it)."""
    (want, _), (base, manifest) = local_run, gcs_input
    out = f"gs://{OUT_BUCKET}/manifest"
    with gcs_emulator.proxy() as proxy, gcs_emulator.environment(proxy.endpoint):
        build_pairs.run(["--input", base, "--output", out, "--manifest", manifest, "--runner", RUNNER,
                         "--split", "s"])
    _assert_same_outputs(_read_gcs_outputs(gcs_emulator, out), want)
    assert any(reason == "missing_s2" for _, _, reason in want[1]), want[1]
    listings = [q for q in _input_listings(proxy) if not _is_fingerprint_listing(q)]
    for q in listings:
        assert q.get("prefix", [""])[0].startswith(f"manifests/{SET}.txt"), q


def test_build_gcs_multi_processing_workers(gcs_env, gcs_input, local_run):
    """Worker processes inherit the environment: they reach the emulator without real credentials."""
    (want, _), (base, manifest) = local_run, gcs_input
    out = f"gs://{OUT_BUCKET}/multi"
    build_pairs.run(["--input", base, "--output", out, "--manifest", manifest, "--runner", RUNNER, "--split", "s",
                     "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    _assert_same_outputs(_read_gcs_outputs(gcs_env, out), want)


# ---------------------------------------------------------------------------------------------
# (c) faults


def _only_storage_makes(method: str, path: str) -> bool:
    """Requests that only transforms.io.storage makes (with its own retries, the library's off): the
    input tiles' downloads and listings, and the output's small multipart uploads (run.json,
    _SUCCESS; Beam's sinks upload resumably)."""
    return (path.startswith(f"/download/storage/v1/b/{IN_BUCKET}/o/{SET}%2F")
            or (path.startswith(f"/storage/v1/b/{IN_BUCKET}/o?") and f"prefix={SET}%2F" in path)
            or "uploadType=multipart" in path)


def _faulty_upload(method: str, path: str) -> bool:
    return "uploadType=" in path


def test_build_through_faulty_proxy_gives_the_same_pairs(gcs_emulator, gcs_input, local_run, monkeypatch, caplog):
    """Faults on the input reads and listings and on every upload (Beam's sinks included): the same
    pairs, and exactly one counted retry per fault on a request of transforms.io.storage (the others
    are retried by Beam's gcsio itself)."""
    (want, local_summary), (base, manifest) = local_run, gcs_input
    out = f"gs://{OUT_BUCKET}/faults"
    plan = FaultPlan(fail_first=2, first_status=503, every_k=7, every_status=429, reset_every=11,
                     applies=lambda method, path: _only_storage_makes(method, path) or _faulty_upload(method, path))
    caplog.set_level("DEBUG")
    before = storage.retry_count()
    with gcs_emulator.proxy(plan) as proxy, gcs_emulator.environment(proxy.endpoint):
        summary, result = _run_capturing_result(
            monkeypatch, ["--input", base, "--output", out, "--manifest", manifest, "--runner", RUNNER,
                          "--split", "s"])
    _assert_same_outputs(_read_gcs_outputs(gcs_emulator, out), want)
    assert summary["counts"] == local_summary["counts"]
    assert proxy.counts["injected_status"] >= 2 and proxy.counts["resets"] >= 1, proxy.counts
    storage_faults = sum(1 for _, method, path, client in proxy.fault_log
                         if _only_storage_makes(method, path) and client == "storage")
    assert storage_faults >= 3, proxy.fault_log
    # every retry of the process reached the Beam counter (reader threads' ones included)...
    assert _storage_retries(result) == storage.retry_count() - before
    # ...and each fault on storage's requests cost exactly one retry, none was lost or doubled; but a
    # cut 404 (an optional band the tile does not have) is an answer: its status line got through
    cut_404 = sum(1 for method, path, status in proxy.cut_answers if status == 404 and _only_storage_makes(method, path))
    assert _storage_retries(result) == storage_faults - cut_404, (proxy.fault_log, proxy.cut_answers)
    assert FAKE_TOKEN not in caplog.text  # credentials are never logged


def test_build_all_formats_on_gcs(gcs_env, gcs_input, local_run):
    """TFRecord and the PNG layout on gs:// too: staged PNGs are moved into place, none left over."""
    (want, _), (base, manifest) = local_run, gcs_input
    out = f"gs://{OUT_BUCKET}/formats"
    build_pairs.run(["--input", base, "--output", out, "--manifest", manifest, "--runner", RUNNER, "--split", "s",
                     "--format", "parquet,tfrecord,png"])
    _assert_same_outputs(_read_gcs_outputs(gcs_env, out), want)
    from transforms.io.readers import read_tfrecord_pairs

    tf_rows = sorted(read_tfrecord_pairs(f"{out}/tfrecord"), key=lambda r: r["tile_id"])
    assert [r["hr"] for r in tf_rows] == [r["hr"] for r in want[0]]
    objects = gcs_env.list(out + "/")
    prefix = out + "/png/"
    pngs = [o[len(prefix):] for o in objects if o.startswith(prefix)]
    assert len([p for p in pngs if p.startswith("naip/")]) == len(want[0])
    assert "tracker.json" in pngs
    assert not [o for o in objects if "/png_staging/" in o]
    tracker = json.loads(gcs_env.read_bytes(prefix + "tracker.json"))
    assert tracker == {r["tile_id"]: r["lr_index"] for r in want[0]}
