"""Incremental builds (`transforms.build.increments`): fingerprints, the manifest and its pure rules, the
`latest` pointer, and the whole build against a simulated NAIP release.

* Pure: fingerprints of local files (and the GCS CRC32C conversion), options hash, plan_increment,
  supersession, the pointer refusing an unpublished run.
* gs:// (GCS emulator on loopback): the fingerprints of the same bytes are equal locally and on
  gs://, from listings (per tile, or per NAIP capture) and no download; an incremental build on gs://.
* The release: a full build, then new captures for some chips (old folders removed), a changed
  tci.png, new and removed tiles: the incremental build processes exactly those (Beam counters) and
  its dataset equals a full rebuild of the new input, pair by pair byte for byte, and every reject.
* A run killed in the middle leaves `latest` on the previous version and reruns to completion.
* Corrections: adding a tile to a corrections file rebuilds that tile only; options rebuild all.
"""
from __future__ import annotations

import json
import os
import shutil
import urllib.parse

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from tests.tile_factory import NAIP_ID, good_tile, scene, series_from, write_png, write_tile
from transforms import corrections
from pipelines import options as launcher
from transforms.build import dataset_manifest as dm, fingerprints as fpr, increments as incremental
from transforms.build import pipeline as build_pipeline
from transforms.io import latest, publish, storage
from transforms.build.object_meta import crc32c_hex, gcs_crc32c_to_hex, list_object_meta
from transforms.pairs import PairConfig
from transforms.io.publish import OutputSpec
from transforms.io.readers import read_parquet_pairs, read_tfrecord_pairs
from transforms.selection import SelectionConfig
from transforms.version import PIPELINE_VERSION

RUNNER = "FnApiRunner"
OLD = NAIP_ID  # m_2608101_nw_17_060_20191121
NEW = "m_2608101_nw_17_060_20220815"  # a later capture of the same quarter quad


def tid(i: int, naip_id: str = OLD) -> str:
    return f"{naip_id}/{35000 + i}_55000"


def xy(i: int) -> str:
    return f"{35000 + i}_55000"


pytestmark = pytest.mark.usefixtures("loopback_only")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------
# Helpers


def build(root: str, out: str, since: str | None = None, *, pointer: str | None = None,
          formats=("parquet",), corrections_files=(), manifest: str | None = None, alpha: float = 0.7,
          overwrite: bool = True) -> dict[str, int]:
    """The whole build through `build_pipeline.build` on the in-process runner; returns the
    `incremental` counters."""
    config = PairConfig(input_root=root, split="set", selection=SelectionConfig(alpha=alpha),
                        corrections=tuple(corrections_files))
    spec = OutputSpec(out, tuple(formats))
    launcher.prepare_output(out, overwrite)
    info = {"pipeline_version": PIPELINE_VERSION, "input": root, "output": out, "formats": list(formats)}
    with beam.Pipeline(options=PipelineOptions(["--runner", RUNNER])) as p:
        build_pipeline.build(p, config, spec, info, manifest, since=since, latest_pointer=pointer)
    return build_pipeline.counter_values(p.result)


def count(counters: dict, name: str) -> int:
    return counters.get(name, 0)


def files_of(out: str, folder: str) -> list[str]:
    return sorted(f for f in publish.read_success(out)["files"] if f"/{folder}/" in f)


def dataset(out: str, formats=("parquet",)):
    """(pairs {tile_id: row}, sorted reject rows, run.json counts) of a published run, read through
    its _SUCCESS list."""
    assert publish.read_success(out) is not None, out
    pairs = {}
    for f in files_of(out, "pairs"):
        for row in read_parquet_pairs(f):
            assert row["tile_id"] not in pairs, row["tile_id"]
            pairs[row["tile_id"]] = row
    if "tfrecord" in formats:
        tf_rows = {r["tile_id"]: r for f in files_of(out, "tfrecord") for r in read_tfrecord_pairs(f)}
        assert tf_rows == pairs
    rejects = sorted((r["tile_id"], r["stage"], r["reason"], r["detail"])
                     for f in files_of(out, "rejects") for r in pq.read_table(f).to_pylist())
    counts = json.load(open(os.path.join(out, "run.json")))["counts"]
    return pairs, rejects, counts


def assert_same_dataset(got, want):
    got_pairs, got_rejects, got_counts = got
    want_pairs, want_rejects, want_counts = want
    assert sorted(got_pairs) == sorted(want_pairs)
    for tile_id, row in want_pairs.items():
        assert got_pairs[tile_id]["hr"] == row["hr"] and got_pairs[tile_id]["lr"] == row["lr"], tile_id
        assert got_pairs[tile_id] == row, tile_id  # every column
    assert got_rejects == want_rejects
    assert got_counts == want_counts


def manifest_rows(out: str) -> dict[str, dict]:
    rows = dm.read_manifest(out).to_pylist()
    assert len({r["tile_id"] for r in rows}) == len(rows)
    return {r["tile_id"]: r for r in rows}


def new_capture_files(root: str, naip_id: str, chip: int, seed: int) -> None:
    """A capture's NAIP files only (rgb.png, nir.png): the chip's Sentinel-2 stays as it is."""
    hr = scene(np.random.default_rng(seed))
    write_png(f"{root}/naip/{naip_id}/{xy(chip)}/rgb.png", hr[..., :3])
    write_png(f"{root}/naip/{naip_id}/{xy(chip)}/nir.png", hr[..., 3])


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_fingerprints_of_bytes_and_gcs_crc32c():
    assert crc32c_hex(b"123456789") == "e3069283"  # the CRC-32C check value
    assert fpr.fingerprint_bytes(b"123456789") == "9:e3069283"
    assert gcs_crc32c_to_hex("4waSgw==") == "e3069283"  # GCS: base64 of the big-endian bytes
    assert gcs_crc32c_to_hex("AAAAAQ==") == "00000001"  # leading zeros kept
    for bad in (None, "", "not base64!", "AAAA"):
        assert gcs_crc32c_to_hex(bad) is None


def test_local_tile_fingerprints(tmp_path):
    root, nir_root = str(tmp_path / "in"), str(tmp_path / "nir")
    good_tile(root, tid(0), seed=0, t=4)
    spec = fpr.FingerprintSpec(root)
    fps = fpr.tile_fingerprints(tid(0), spec)
    want = [fpr.fingerprint_bytes(open(f"{root}/{rel}", "rb").read())
            for rel in (f"naip/{OLD}/{xy(0)}/rgb.png", f"naip/{OLD}/{xy(0)}/nir.png",
                        f"sentinel2/{xy(0)}/tci.png", f"sentinel2/{xy(0)}/b08.png")]
    assert list(fps) == want + [None]

    os.remove(f"{root}/sentinel2/{xy(0)}/b08.png")
    assert fpr.tile_fingerprints(tid(0), spec)[3] is None  # missing: None
    assert fpr.tile_fingerprints(tid(0), spec)[:3] == fps[:3]
    # NIR under another root
    os.makedirs(f"{nir_root}/naip/{OLD}/{xy(0)}")
    shutil.copy(f"{root}/naip/{OLD}/{xy(0)}/rgb.png", f"{nir_root}/naip/{OLD}/{xy(0)}/nir.png")
    assert fpr.tile_fingerprints(tid(0), fpr.FingerprintSpec(root, nir_root))[1] == want[0]
    # --bands rgb reads neither nir.png nor b08.png
    rgb_only = fpr.FingerprintSpec.for_config(PairConfig(input_root=root, bands="rgb"))
    assert fpr.tile_fingerprints(tid(0), rgb_only) == (want[0], None, want[2], None, None)
    # the robust mode's extra bands, those present
    robust = fpr.FingerprintSpec.for_config(PairConfig(input_root=root, selection=SelectionConfig(mode="robust")))
    assert robust.extra_bands
    # every build that reads them (--lr-timesteps N > 1 in any mode: s2cloudless's clean gate)
    multi = PairConfig(input_root=root, selection=SelectionConfig(mode="paper", lr_timesteps=2))
    assert fpr.FingerprintSpec.for_config(multi).extra_bands == robust.extra_bands
    paper = PairConfig(input_root=root, selection=SelectionConfig(mode="paper"))
    assert not fpr.FingerprintSpec.for_config(paper).extra_bands
    band = robust.extra_bands[0]
    write_png(f"{root}/sentinel2/{xy(0)}/{band}.png", np.full((128, 32), 7, np.uint8))
    extra = fpr.tile_fingerprints(tid(0), robust)[4]
    assert extra == f"{band}={fpr.fingerprint_bytes(open(f'{root}/sentinel2/{xy(0)}/{band}.png', 'rb').read())}"
    # an invalid id touches no path
    assert fpr.tile_fingerprints("../../etc/passwd", spec) == fpr.NONE
    assert fpr.tile_fingerprints(tid(5), spec) == fpr.NONE  # nothing there


def test_options_hash():
    base = PairConfig(input_root="/a", split="s")
    h = dm.config_options_hash(base)
    assert len(h) == 64 and h == dm.config_options_hash(PairConfig(input_root="/b", split="s"))
    # the mode's default downsampling named explicitly is the same options
    assert h == dm.config_options_hash(PairConfig(input_root="/a", split="s",
                                                  selection=SelectionConfig(downsample="bicubic_aa")))
    # corrections are per tile, not in the hash
    assert h == dm.config_options_hash(PairConfig(input_root="/a", split="s", corrections=("c.json",)))
    for other in (
        PairConfig(input_root="/a", split="s", selection=SelectionConfig(alpha=0.5)),
        PairConfig(input_root="/a", split="s", selection=SelectionConfig(top_k=8)),
        PairConfig(input_root="/a", split="s", selection=SelectionConfig(downsample="bicubic_torch")),
        PairConfig(input_root="/a", split="s", selection=SelectionConfig(mode="companion")),
        PairConfig(input_root="/a", split="s", selection=SelectionConfig(mode="paper")),
        PairConfig(input_root="/a", split="s", bands="rgb"),
        PairConfig(input_root="/a", split="t"),
    ):
        assert dm.config_options_hash(other) != h, other
    options = dm.output_options(base)
    assert options["pipeline_version"] == PIPELINE_VERSION and options["selection"] == "robust"
    assert options["record_schema"] == dm.record_schema_id() and len(options["record_schema"]) == 16
    assert not {"formats", "format", "num_shards", "tfrecord_gzip", "corrections"} & set(options)
    assert dm.options_hash({"b": 1, "a": 2}) == dm.options_hash({"a": 2, "b": 1})


def test_plan_increment():
    fps = ("1:aa", "2:bb", "3:cc", "4:dd", None)
    corr = dm.correction_text(corrections.Correction(3, "c.json"))
    prev = dm.manifest_row(tid(0), fps, "H", corr, "pair", None, "run1")
    assert dm.plan_increment(None, fps, "H", corr) == "new"
    assert dm.plan_increment(prev, fps, "H", corr) == "unchanged"
    assert dm.plan_increment({**prev, "outcome": "reject", "reason": "missing_band"}, fps, "H", corr) == "unchanged"
    assert dm.plan_increment(prev, ("1:aa", "2:bb", "3:cX", "4:dd", None), "H", corr) == "changed"
    assert dm.plan_increment(prev, ("1:aa", "2:bb", "3:cc", None, None), "H", corr) == "changed"
    assert dm.plan_increment(prev, fps, "H2", corr) == "changed"
    assert dm.plan_increment(prev, fps, "H", None) == "changed"
    assert dm.plan_increment(prev, fps, "H", dm.correction_text(corrections.Correction(None, "c.json"))) == "changed"
    assert dm.plan_increment(prev, fps, "H", dm.correction_text(corrections.Correction(3, "d.json"))) == "changed"
    err = ("1:aa", "error:OSError", "3:cc", "4:dd", None)
    assert dm.plan_increment(dm.manifest_row(tid(0), err, "H", corr, "pair", None, "r"), err, "H", corr) == "changed"
    for reason in dm.RETRY_REASONS:  # transient rejects are never carried
        assert dm.plan_increment({**prev, "outcome": "reject", "reason": reason}, fps, "H", corr) == "changed"
    for retired in dm.RETIRED:  # a tile that comes back after being retired is new
        assert dm.plan_increment({**prev, "outcome": retired}, fps, "H", corr) == "new"
    assert dm.correction_text(None) is None


def test_supersession():
    row = dm.manifest_row(tid(0), fpr.NONE, "H", None, "pair", None, "run1")
    newest = "m_2608101_nw_17_060_20230101"
    superseded = dm.retire(row, {NEW, newest})
    assert superseded["outcome"] == "superseded" and superseded["reason"] == f"superseded by {newest}/{xy(0)}"
    assert superseded["computed_in"] == "run1" and superseded["tile_id"] == tid(0)
    removed = dm.retire(row, set())
    assert removed["outcome"] == "removed" and removed["reason"] == "no longer in the input"
    assert dm.replacement(OLD, [OLD]) is None
    invalid = dm.manifest_row("not-a-tile", fpr.NONE, "H", None, "reject", "invalid_tile_id", "run1")
    assert invalid["naip_id"] is None and dm.retire(invalid, {NEW})["outcome"] == "removed"
    with pytest.raises(ValueError):
        dm.manifest_row(tid(0), fpr.NONE, "H", None, "gone", None, "r")


def test_latest_pointer_moves_only_to_a_published_run(tmp_path):
    pointer, run = str(tmp_path / "latest.json"), str(tmp_path / "run")
    os.makedirs(f"{run}/pairs")
    open(f"{run}/pairs/pairs-00000-of-00001.parquet", "wb").close()
    with pytest.raises(latest.RunNotPublished):
        latest.point_latest(pointer, run)
    assert latest.read_latest(pointer) is None and not os.path.exists(pointer)
    with pytest.raises(FileNotFoundError, match="latest pointer not found"):
        latest.resolve_since(pointer)
    assert latest.resolve_since(pointer, missing_pointer_ok=True) is None
    publish.publish(run, {"output": run}, [])
    written = latest.point_latest(pointer, run + "/")
    assert latest.read_latest(pointer) == written and written["run"] == run
    assert latest.resolve_since(pointer) == run and latest.resolve_since(run + "/") == run
    assert [p for p in os.listdir(tmp_path) if p.startswith("latest")] == ["latest.json"]  # no temp file left
    with pytest.raises(dm.IncompleteRun, match="no manifest|manifest/"):
        dm.manifest_files(run)  # published, but without a manifest


def test_since_is_never_the_output(tmp_path):
    assert launcher.check_since(None, "out") is None
    assert launcher.check_since(str(tmp_path / "v1") + "/", str(tmp_path / "v2")) == str(tmp_path / "v1")
    for since in (str(tmp_path / "v1"), str(tmp_path / "v1") + "/", str(tmp_path / "x" / ".." / "v1")):
        with pytest.raises(ValueError, match="output folder itself"):
            launcher.check_since(since, str(tmp_path / "v1"))
    with pytest.raises(ValueError, match="output folder itself"):
        launcher.check_since("gs://b/pairs/v1/", "gs://b/pairs/v1")


def test_prepare_output_knows_the_manifest_folder(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(f"{out}/manifest")
    open(f"{out}/manifest/manifest-00000-of-00001.parquet", "wb").close()
    with pytest.raises(publish.OutputNotEmpty):
        launcher.prepare_output(out, overwrite=False)
    assert launcher.prepare_output(out, overwrite=True) >= 1
    assert not os.listdir(f"{out}/manifest")


# ---------------------------------------------------------------------------------------------
# The release


def make_release_input(root: str) -> None:
    """v1: 10 good tiles of capture OLD, a tile without b08 and one without Sentinel-2."""
    for i in range(10):
        good_tile(root, tid(i), seed=i, t=6)
    good_tile(root, tid(10), seed=10, t=4)
    os.remove(f"{root}/sentinel2/{xy(10)}/b08.png")  # missing_band
    rng = np.random.default_rng(11)
    write_tile(root, tid(11), scene(rng), None)  # missing_s2


def release(root: str) -> dict[str, set]:
    """v2: chips 0 and 1 re-flown (capture NEW, the OLD folders removed); chip 4 gets a NEW capture
    beside its OLD one (same Sentinel-2); chip 2's tci.png changes; chips 12 and 13 are new; tile
    3 is removed. Returns the tile ids expected per plan."""
    for i in (0, 1):
        shutil.rmtree(f"{root}/naip/{OLD}/{xy(i)}")
        good_tile(root, tid(i, NEW), seed=100 + i, t=6)  # new Sentinel-2 series for the chip too
    new_capture_files(root, NEW, 4, seed=104)
    hr = scene(np.random.default_rng(2))
    tci = series_from(hr, np.random.default_rng(202), 6)[..., :3].reshape(-1, 32, 3)  # other noise
    write_png(f"{root}/sentinel2/{xy(2)}/tci.png", tci)
    for i in (12, 13):
        good_tile(root, tid(i), seed=i, t=5)
    shutil.rmtree(f"{root}/naip/{OLD}/{xy(3)}")
    shutil.rmtree(f"{root}/sentinel2/{xy(3)}")
    return {
        "new": {tid(0, NEW), tid(1, NEW), tid(4, NEW), tid(12), tid(13)},
        "changed": {tid(2)},
        "superseded": {tid(0), tid(1)},
        "removed": {tid(3)},
        "unchanged": {tid(i) for i in (4, 5, 6, 7, 8, 9, 10, 11)},
    }


@pytest.fixture(scope="module")
def release_runs(tmp_path_factory):
    """run1 (full) -> release -> run2 (--since run1) and full (a full rebuild of the new input)."""
    base = tmp_path_factory.mktemp("release")
    root, pointer = str(base / "in"), str(base / "latest.json")
    runs = {name: str(base / name) for name in ("run1", "run2", "full", "run3", "run4")}
    make_release_input(root)
    formats = ("parquet", "tfrecord")
    counters = {"run1": build(root, runs["run1"], pointer=pointer, formats=formats)}
    assert latest.read_latest(pointer)["run"] == runs["run1"]
    expected = release(root)
    counters["run2"] = build(root, runs["run2"], since=runs["run1"], pointer=pointer, formats=formats)
    assert latest.read_latest(pointer)["run"] == runs["run2"]
    counters["full"] = build(root, runs["full"], formats=formats)
    return root, pointer, runs, counters, expected


def test_full_build_writes_the_manifest(release_runs):
    _, _, runs, counters, _ = release_runs
    assert counters["run1"] == {"new": 12, "processed": 12}
    rows = manifest_rows(runs["run1"])
    assert set(rows) == {tid(i) for i in range(12)}
    assert all(r["computed_in"] == runs["run1"] and r["correction"] is None for r in rows.values())
    assert rows[tid(10)]["outcome"] == "reject" and rows[tid(10)]["reason"] == "missing_band"
    assert rows[tid(10)]["fp_b08"] is None and rows[tid(11)]["fp_tci"] is None
    assert rows[tid(0)]["outcome"] == "pair" and rows[tid(0)]["reason"] is None
    assert rows[tid(0)]["naip_id"] == OLD and rows[tid(0)]["tile_xy"] == xy(0)
    assert len({r["options_hash"] for r in rows.values()}) == 1
    success = publish.read_success(runs["run1"])["files"]
    assert any("/manifest/manifest-" in f for f in success)  # listed in _SUCCESS
    assert json.load(open(os.path.join(runs["run1"], "run.json")))["since"] is None


def test_incremental_run_processes_exactly_the_release(release_runs):
    _, pointer, runs, counters, expected = release_runs
    c = counters["run2"]
    assert count(c, "new") == len(expected["new"]) == 5
    assert count(c, "changed") == len(expected["changed"]) == 1
    assert count(c, "processed") == 6
    assert count(c, "unchanged") == count(c, "carried") == len(expected["unchanged"]) == 8
    assert count(c, "superseded") == 2 and count(c, "removed") == 1
    assert count(c, "carry_missing") == 0 and count(c, "fingerprint_errors") == 0

    rows = manifest_rows(runs["run2"])
    for outcome in ("superseded", "removed"):
        assert {t for t, r in rows.items() if r["outcome"] == outcome} == expected[outcome]
    assert rows[tid(0)]["reason"] == f"superseded by {NEW}/{xy(0)}"
    assert rows[tid(0)]["computed_in"] == runs["run1"]  # where the retired record lives
    computed_here = {t for t, r in rows.items() if r["computed_in"] == runs["run2"]}
    assert computed_here == expected["new"] | expected["changed"]
    carried = {t for t, r in rows.items() if r["computed_in"] == runs["run1"] and r["outcome"] in ("pair", "reject")}
    assert carried == expected["unchanged"]
    assert rows[tid(2)]["outcome"] == "pair" and rows[tid(2)]["fp_tci"] != manifest_rows(runs["run1"])[tid(2)]["fp_tci"]
    assert rows[tid(2)]["fp_b08"] == manifest_rows(runs["run1"])[tid(2)]["fp_b08"]
    run1_rows = manifest_rows(runs["run1"])
    for t in expected["unchanged"]:
        assert rows[t] == run1_rows[t]  # carried rows as they were
    info = json.load(open(os.path.join(runs["run2"], "run.json")))
    assert info["since"] == runs["run1"] and info["counts"]["tiles"] == 14


def test_run_json_holds_the_increments_counts(release_runs):
    """Where a scheduler reads them: run.json's `incremental`, equal to the Beam counters."""
    _, _, runs, counters, expected = release_runs
    names = ("new", "changed", "unchanged", "processed", "carried", "carry_missing", "superseded", "removed")
    for run in ("run1", "run2"):
        got = json.load(open(os.path.join(runs[run], "run.json")))["incremental"]
        assert got == {name: count(counters[run], name) for name in names}, run
    got = json.load(open(os.path.join(runs["run2"], "run.json")))["incremental"]
    assert (got["new"], got["changed"], got["carried"], got["superseded"], got["removed"]) == (
        len(expected["new"]), len(expected["changed"]), len(expected["unchanged"]), 2, 1)


def test_incremental_dataset_equals_a_full_rebuild(release_runs):
    _, _, runs, counters, expected = release_runs
    formats = ("parquet", "tfrecord")
    got, want = dataset(runs["run2"], formats), dataset(runs["full"], formats)
    assert_same_dataset(got, want)
    assert tid(0, NEW) in got[0] and tid(0) not in got[0] and tid(3) not in got[0]
    # the manifests agree too, but for where records were computed and the retired rows
    full_rows = manifest_rows(runs["full"])
    inc_rows = {t: r for t, r in manifest_rows(runs["run2"]).items() if r["outcome"] not in dm.RETIRED}
    strip = lambda r: {k: v for k, v in r.items() if k != "computed_in"}  # noqa: E731
    assert {t: strip(r) for t, r in inc_rows.items()} == {t: strip(r) for t, r in full_rows.items()}


def test_nothing_changed_carries_everything(release_runs):
    root, pointer, runs, _, _ = release_runs
    c = build(root, runs["run3"], since=runs["run2"], pointer=pointer)
    assert count(c, "processed") == 0 and count(c, "carried") == 14 and count(c, "unchanged") == 14
    assert count(c, "superseded") == count(c, "removed") == 0  # retired rows are not retired again
    assert latest.read_latest(pointer)["run"] == runs["run3"]
    assert_same_dataset(dataset(runs["run3"]), dataset(runs["run2"]))
    rows = manifest_rows(runs["run3"])
    assert len(rows) == 14 and not any(r["outcome"] in dm.RETIRED for r in rows.values())
    assert {r["computed_in"] for r in rows.values()} == {runs["run1"], runs["run2"]}


def test_killed_run_leaves_latest_and_reruns_to_completion(release_runs, monkeypatch):
    root, pointer, runs, _, _ = release_runs
    since = latest.resolve_since(pointer)
    assert since in (runs["run2"], runs["run3"])
    good_tile(root, tid(5), seed=55, t=6)  # chip 5 changes
    victim = tid(5)
    from transforms.build import stages as beam_transforms

    real_build_tile = beam_transforms.build_tile

    def dies_on_victim(tile_id, config, correction=None, *read):
        if tile_id == victim:
            raise RuntimeError("worker killed")
        return real_build_tile(tile_id, config, correction, *read)

    with monkeypatch.context() as mp:
        mp.setattr(beam_transforms, "build_tile", dies_on_victim)
        with pytest.raises(Exception, match="worker killed"):
            build(root, runs["run4"], since=since, pointer=pointer)
    assert publish.read_success(runs["run4"]) is None
    assert latest.read_latest(pointer)["run"] == since  # still the previous version
    with pytest.raises(dm.IncompleteRun):
        dm.manifest_files(runs["run4"])  # never a base for --since
    # a partial run in the folder: refused without --overwrite, replaced with it
    os.makedirs(f"{runs['run4']}/pairs", exist_ok=True)
    open(f"{runs['run4']}/pairs/pairs-00000-of-00009.parquet", "wb").close()  # a stray shard
    with pytest.raises(publish.OutputNotEmpty):
        launcher.prepare_output(runs["run4"], overwrite=False)
    c = build(root, runs["run4"], since=since, pointer=pointer, overwrite=True)
    assert count(c, "processed") == 1 and count(c, "changed") == 1 and count(c, "carried") == 13
    assert latest.read_latest(pointer)["run"] == runs["run4"]
    assert not os.path.exists(f"{runs['run4']}/pairs/pairs-00000-of-00009.parquet")
    pairs, _, counts = dataset(runs["run4"])
    assert counts["tiles"] == 14 and victim in pairs
    assert manifest_rows(runs["run4"])[victim]["computed_in"] == runs["run4"]


# ---------------------------------------------------------------------------------------------
# Corrections, duplicates, invalid ids and options


def test_corrections_rebuild_only_their_tiles(tmp_path):
    root, c_file = str(tmp_path / "in"), str(tmp_path / "corrections.json")
    for i in range(5):
        good_tile(root, tid(i), seed=i, t=6)
    manifest = tmp_path / "ids.txt"
    manifest.write_text("\n".join([tid(0), tid(1), tid(2), tid(3), tid(4), tid(1), "not/a/tile"]) + "\n")
    with open(c_file, "w") as f:
        json.dump({tid(0): 2}, f)
    r1, r2, r3, full = (str(tmp_path / n) for n in ("r1", "r2", "r3", "full"))
    c1 = build(root, r1, manifest=str(manifest), corrections_files=[c_file])
    assert count(c1, "processed") == 6  # 5 tiles and the invalid id (the duplicate is rejected first)
    with open(c_file, "w") as f:
        json.dump({tid(0): 2, tid(3): None}, f)  # a reviewer adds tile 3
    c2 = build(root, r2, since=r1, manifest=str(manifest), corrections_files=[c_file])
    # tile 3 and the invalid id (always rebuilt: it costs nothing)
    assert count(c2, "changed") == 2 and count(c2, "processed") == 2 and count(c2, "carried") == 4
    build(root, full, manifest=str(manifest), corrections_files=[c_file])
    assert_same_dataset(dataset(r2), dataset(full))
    pairs, rejects, _ = dataset(r2)
    assert pairs[tid(0)]["selection"] == "manual" and pairs[tid(0)]["lr_index"] == 2
    assert (tid(1), "manifest", "duplicate_tile_id", "listed more than once") in rejects
    assert any(r[0] == tid(3) and r[2] == "removed_by_correction" for r in rejects)
    rows = manifest_rows(r2)
    assert json.loads(rows[tid(3)]["correction"]) == {"value": None, "source": c_file}
    assert rows["not/a/tile"]["naip_id"] is None and rows["not/a/tile"]["reason"] == "invalid_tile_id"
    # other options: every tile is rebuilt
    c3 = build(root, r3, since=r2, manifest=str(manifest), corrections_files=[c_file], alpha=0.5)
    assert count(c3, "changed") == 6 and count(c3, "carried") == 0


# ---------------------------------------------------------------------------------------------
# gs://


def test_gcs_fingerprints_equal_local_ones_from_listings(gcs_emulator, tmp_path):
    root = str(tmp_path / "in")
    for i in range(3):
        good_tile(root, tid(i), seed=i, t=4)
    os.remove(f"{root}/sentinel2/{xy(2)}/b08.png")
    base = gcs_emulator.bucket("fp-in") + "/set"
    gcs_emulator.upload_tree(root, base)
    with gcs_emulator.proxy() as proxy, gcs_emulator.environment(proxy.endpoint):
        gcs_spec, local_spec = fpr.FingerprintSpec(base), fpr.FingerprintSpec(root)
        for i in range(3):
            proxy.log.clear()
            assert fpr.tile_fingerprints(tid(i), gcs_spec) == fpr.tile_fingerprints(tid(i), local_spec)
            assert [m for m, _ in proxy.log] == ["GET", "GET"]  # two one-level listings, nothing downloaded
            for _, url in proxy.log:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
                assert query["delimiter"] == ["/"] and "crc32c" in query["fields"][0], url
        meta = list_object_meta(f"{base}/naip/{OLD}/{xy(0)}")
        assert set(meta) == {"rgb.png", "nir.png"} and meta["rgb.png"].generation
        assert fpr.tile_fingerprints(tid(2), gcs_spec)[3] is None
        assert list_object_meta(f"{base}/naip/nothing-here") == {}
        # a missing bucket is an error fingerprint: the tile is rebuilt, never carried on a guess
        assert fpr.tile_fingerprints(tid(0), fpr.FingerprintSpec("gs://no-such-bucket/set"))[0].startswith("error:")

        # a group of tiles together: range listings of all their folders at once, the same
        # fingerprints; neighbouring folders share a page (here one request for everything)
        ids = [tid(0), tid(1), tid(2), tid(7), "../../etc/passwd"]  # 7: no such tile
        robust = fpr.FingerprintSpec(base, extra_bands=("b01", "b05", "b10"))
        for spec in (gcs_spec, fpr.FingerprintSpec(base, files=("rgb", "tci")), robust,
                     fpr.FingerprintSpec(base, nir_root=base + "/"), fpr.FingerprintSpec(base, nir_root=base + "-nir")):
            proxy.log.clear()
            got = fpr.group_fingerprints(ids, spec)
            assert len(proxy.log) == 1, proxy.log
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(proxy.log[0][1]).query)
            assert "delimiter" not in query and query["prefix"][0] in ("set/", "set"), query
            assert "crc32c" in query["fields"][0] and query["startOffset"][0].endswith("/"), query
            assert got == [fpr.tile_fingerprints(t, spec) for t in ids], spec
            if spec.nir_root != base + "-nir":
                local = fpr.FingerprintSpec(root, spec.nir_root and spec.nir_root.replace(base, root), spec.files,
                                            spec.extra_bands)
                assert got == [fpr.tile_fingerprints(t, local) for t in ids], spec
        failed = fpr.group_fingerprints([tid(0)], fpr.FingerprintSpec("gs://no-such-bucket/set"))
        assert all(v.startswith("error:FileNotFound") for v in failed[0][:4]), failed

        # the transform: grouped per block of zoom-17 columns on gs://, every id once, an invalid one
        # touching no path; after the fingerprints, whether the Sentinel-2 folder holds anything
        # (the plan neither compares nor stores it)
        ids = [tid(0), tid(1), tid(2), tid(7), "../../etc/passwd", "not/an id"]
        holds = {tid(0): True, tid(1): True, tid(2): True, tid(7): False}
        want = [(t, fpr.tile_fingerprints(t, local_spec) + (holds.get(t),)) for t in ids]
        with beam.Pipeline(runner="FnApiRunner") as p:
            got = p | beam.Create(ids) | incremental.FingerprintTiles(gcs_spec, threads=4)
            assert_that(got, equal_to(want))


def test_range_listings_page_and_skip_as_on_gcs(gcs_emulator, monkeypatch):
    """`list_folders_meta` with pages of 3 objects (the proxy pages as GCS does): it follows a page
    inside a wanted folder, starts again at the next wanted folder past a page, skips what lies
    between, and finds what one-level listings of each folder find; without paging (the emulator
    alone ignores the offsets) the answer is the same."""
    from transforms.build import object_meta

    base = gcs_emulator.bucket("ranges") + "/r"
    for i in range(40):
        for name in ("a.png", "b.png"):
            gcs_emulator.upload_bytes(f"{base}/f/{i:03d}/{name}", f"{i}{name}".encode())
    gcs_emulator.upload_bytes(f"{base}/f/005/deeper/c.png", b"not a direct file")
    gcs_emulator.upload_bytes(f"{base}/f/006/big.png", b"x" * 1000)
    wanted = [f"{base}/f/{i:03d}" for i in (*range(3, 9), 20, 33, 39)] + [f"{base}/f/999", f"{base}/g/000"]
    with gcs_emulator.environment():
        want = {f: list_object_meta(f) for f in wanted}
    assert want[f"{base}/f/006"]["big.png"].size == 1000 and want[f"{base}/f/999"] == {}
    monkeypatch.setattr(object_meta, "PAGE_SIZE", 3)
    with gcs_emulator.proxy() as proxy, gcs_emulator.environment(proxy.endpoint):
        got = object_meta.list_folders_meta(wanted)
        queries = [urllib.parse.parse_qs(urllib.parse.urlsplit(u).query) for _, u in proxy.log]
    assert got == want
    starts = [q["startOffset"][0] for q in queries if "pageToken" not in q]
    # 003-008 (13 objects): one start and its pages; then a start at each sparse folder; the last
    # listing ends at endOffset with no page to follow: 999 and g/000 are empty without a request
    assert starts == ["r/f/003/", "r/f/020/", "r/f/033/", "r/f/039/"], starts
    assert len(queries) <= 5 + len(starts), queries  # ceil(13 / 3) pages for the run, one each after
    assert all(q["maxResults"] == ["3"] and q["endOffset"] == ["r/g/0000"] for q in queries)
    with gcs_emulator.environment():  # no paging, offsets ignored: one answer, the same result
        assert object_meta.list_folders_meta(wanted) == want


def test_range_listings_see_whether_anything_lies_under_a_folder(gcs_emulator, monkeypatch):
    """`FolderMeta.holds_any` of a range listing (pages of 3 objects) is what a listing of the
    folder's own (`storage.dir_has_files`) says: its files, an object only deeper down (across a
    page end too), its placeholder object; not a neighbour whose name merely starts the same."""
    from transforms.build import object_meta

    base = gcs_emulator.bucket("ranges-any") + "/r"
    for i in range(6):
        gcs_emulator.upload_bytes(f"{base}/f/{i:03d}/a.png", b"a")
    for name in ("deeper/x/1.png", "deeper/x/2.png", "deeper/y/3.png", "deeper/z.png"):
        gcs_emulator.upload_bytes(f"{base}/f/010/{name}", b"d")  # only deeper objects, over two pages
    gcs_emulator.upload_bytes(f"{base}/f/011/", b"")  # only its placeholder
    gcs_emulator.upload_bytes(f"{base}/f/0120/a.png", b"a")  # f/012 itself holds nothing
    gcs_emulator.upload_bytes(f"{base}/f/013/deep/a.png", b"a")
    wanted = [f"{base}/f/{i:03d}" for i in (1, 3, 7, 10, 11, 12, 13)]
    monkeypatch.setattr(object_meta, "PAGE_SIZE", 3)
    with gcs_emulator.proxy() as proxy, gcs_emulator.environment(proxy.endpoint):
        got = object_meta.list_folders_meta(wanted)
    with gcs_emulator.environment():
        want = {f: storage.dir_has_files(f) for f in wanted}
        whole = object_meta.list_folders_meta(wanted)  # no paging, offsets ignored
    assert want == {f"{base}/f/{i:03d}": i not in (7, 12) for i in (1, 3, 7, 10, 11, 12, 13)}
    assert {f: m.holds_any for f, m in got.items()} == want
    assert {f: m.holds_any for f, m in whole.items()} == want
    assert got[f"{base}/f/010"] == {} and got[f"{base}/f/011"] == {"": got[f"{base}/f/011"][""]}


def test_gcs_fingerprint_follows_every_band_object(gcs_emulator, tmp_path):
    """Under range listings a tile's fingerprint changes when any object it reads is changed, added
    or removed (an extra band included), and only then."""
    root = str(tmp_path / "in")
    good_tile(root, tid(0), seed=0, t=4)
    good_tile(root, tid(1), seed=1, t=4)
    base = gcs_emulator.bucket("fp-bands") + "/set"
    gcs_emulator.upload_tree(root, base)
    spec = fpr.FingerprintSpec(base, extra_bands=("b01", "b05", "b10"))
    band = f"{base}/sentinel2/{xy(0)}"
    with gcs_emulator.environment():
        def fps():
            return fpr.group_fingerprints([tid(0), tid(1)], spec)

        first = fps()
        gcs_emulator.upload_bytes(f"{band}/tci.png", gcs_emulator.read_bytes(f"{band}/tci.png"))
        assert fps() == first  # the same bytes again: nothing changed
        seen = [first]
        gcs_emulator.upload_bytes(f"{band}/b01.png", b"b01 v1")  # added
        seen.append(fps())
        gcs_emulator.upload_bytes(f"{band}/b01.png", b"b01 v2")  # changed
        seen.append(fps())
        gcs_emulator.upload_bytes(f"{band}/b06.png", b"a band this build does not read")
        assert fps() == seen[-1]
        gcs_emulator.emulator.client.bucket("fp-bands").blob(f"set/sentinel2/{xy(0)}/b01.png").delete()  # removed
        seen.append(fps())
        gcs_emulator.upload_bytes(f"{band}/b08.png", b"changed b08")
        seen.append(fps())
        gcs_emulator.emulator.client.bucket("fp-bands").blob(f"set/naip/{OLD}/{xy(0)}/nir.png").delete()
        seen.append(fps())
    assert [s[0][4] for s in seen[:3]] == [None, f"b01=6:{crc32c_hex(b'b01 v1')}", f"b01=6:{crc32c_hex(b'b01 v2')}"]
    assert seen[3] == first and seen[4][0][3] == f"11:{crc32c_hex(b'changed b08')}" and seen[5][0][1] is None
    tile0 = [s[0] for s in seen[:3]] + [s[0] for s in seen[4:]]
    assert len(set(tile0)) == len(tile0)  # every change, a new fingerprint
    assert all(s[1] == first[1] for s in seen)  # the other tile's never moved


def test_build_requests_no_absent_band(gcs_emulator, tmp_path):
    """A robust build on gs:// asks only for objects that are there: the plan's listings tell which
    extra bands (and tci, b08, nir) a tile has, so no GET is answered 404; the pairs are those of
    the same build on local files."""
    from pipelines import build_pairs
    from pipelines.dev.gcs_emulator import request_kind
    from tests.tile_factory import write_tile

    root = str(tmp_path / "in")
    for i in range(3):
        rng = np.random.default_rng(i)
        hr = scene(rng)
        series = series_from(hr, rng, 5)
        extra = {"b01": series[..., 0]} if i == 0 else {}  # tile 0 has b01, the others no extra band
        write_tile(root, tid(i), hr, series, extra=extra)
    os.remove(f"{root}/naip/{OLD}/{xy(2)}/nir.png")  # missing_nir: not asked for either
    base = gcs_emulator.bucket("absent-in") + "/set"
    stored = {u[len("gs://absent-in/"):] for u in gcs_emulator.upload_tree(root, base)}
    out = gcs_emulator.bucket("absent-out") + "/run"
    args = ["--selection", "robust", "--runner", RUNNER, "--read-threads", "4"]
    with gcs_emulator.proxy() as proxy, gcs_emulator.environment(proxy.endpoint):
        summary = build_pairs.run(["--input", base, "--output", out, *args])
        log = list(proxy.log)
        gcs_emulator.download_tree(f"{out}/pairs", tmp_path / "got")  # objects written via the proxy link to it
    asked = [urllib.parse.unquote(urllib.parse.urlsplit(path).path.split("/o/", 1)[1])
             for method, path in log if request_kind(method, path) == "get_media" and "/b/absent-in/" in path]
    assert asked and set(asked) <= stored, sorted(set(asked) - stored)
    assert f"set/sentinel2/{xy(0)}/b01.png" in asked and f"set/naip/{OLD}/{xy(2)}/rgb.png" in asked
    local = build_pairs.run(["--input", root, "--output", str(tmp_path / "local"), *args])
    assert summary["counts"] == local["counts"] and summary["counts"]["rejects_by_reason"] == {"missing_nir": 1}
    got = sorted((r["tile_id"], r["lr_index"], r["hr"], r["evidence_note"])
                 for r in read_parquet_pairs(str(tmp_path / "got")))
    want = sorted((r["tile_id"], r["lr_index"], r["hr"], r["evidence_note"])
                  for r in read_parquet_pairs(str(tmp_path / "local" / "pairs")))
    assert got == want and len(got) == 2


def test_tile_reads_answer_absent_files_without_a_request(monkeypatch):
    from transforms.io import prefetch

    asked = []
    monkeypatch.setattr(prefetch.storage, "read_bytes", lambda path, limit: asked.append(path) or b"x")
    for threads in (0, 2):
        read_ahead = prefetch.ReadAhead(threads)
        reads = read_ahead.start(["a", "b", "c"], 10, absent=frozenset({"b"}))
        with pytest.raises(FileNotFoundError):
            reads("b", 10)
        assert reads("a", 10) == b"x" and reads("c", 10) == b"x"
        read_ahead.close()
    assert sorted(asked) == ["a", "a", "c", "c"]


def test_incremental_build_on_gcs(gcs_emulator, tmp_path):
    root = str(tmp_path / "in")
    for i in range(4):
        good_tile(root, tid(i), seed=i, t=5)
    in_base = gcs_emulator.bucket("inc-in") + "/set"
    out_base = gcs_emulator.bucket("inc-out")
    gcs_emulator.upload_tree(root, in_base)
    pointer = f"{out_base}/latest.json"
    with gcs_emulator.environment():
        c1 = build(in_base, f"{out_base}/v1", pointer=pointer)
        assert count(c1, "processed") == 4
        good_tile(root, tid(1), seed=41, t=5)  # a re-processed chip, uploaded again
        gcs_emulator.upload_tree(f"{root}/sentinel2/{xy(1)}", f"{in_base}/sentinel2/{xy(1)}")
        gcs_emulator.upload_tree(f"{root}/naip/{OLD}/{xy(1)}", f"{in_base}/naip/{OLD}/{xy(1)}")
        since = latest.resolve_since(pointer)
        assert since == f"{out_base}/v1"
        c2 = build(in_base, f"{out_base}/v2", since=since, pointer=pointer)
        assert count(c2, "processed") == 1 and count(c2, "carried") == 3 and count(c2, "changed") == 1
        assert latest.read_latest(pointer)["run"] == f"{out_base}/v2"
        got = {r["tile_id"]: r for f in files_of(f"{out_base}/v2", "pairs") for r in read_parquet_pairs(f)}
        local_rows = manifest_rows(f"{out_base}/v2")
    full = str(tmp_path / "full")
    build(root, full)
    want = {r["tile_id"]: r for r in read_parquet_pairs(os.path.join(full, "pairs"))}
    assert sorted(got) == sorted(want) and all(got[t] == want[t] for t in want)
    # the gs:// fingerprints are those of the local copy of the same bytes
    full_rows = manifest_rows(full)
    for t, row in local_rows.items():
        assert dm.row_fingerprints(row) == dm.row_fingerprints(full_rows[t]), t


# ---------------------------------------------------------------------------------------------
# The Dataflow job, offline (the harness of tests/test_dataflow_graph.py: nothing is submitted)


def test_incremental_dataflow_job_offline(tmp_path_factory, monkeypatch):
    """The incremental build as a Dataflow (runner v2) job: it builds offline, the launcher reads
    nothing on gs:// (previous manifest, records, corrections are all read by the workers), and
    the job holds the incremental steps."""
    from tests import test_dataflow_graph as graph
    root = tmp_path_factory.mktemp("df-gcs")
    (root / graph.BUCKET).mkdir()
    harness = graph.OfflineDataflow(monkeypatch, root, tmp_path_factory.mktemp("df-job"))
    job_file = harness.job_file()
    options = PipelineOptions([*graph.DATAFLOW_ARGS, f"--template_location={job_file}"])
    since, out = f"gs://{graph.BUCKET}/pairs/v1", f"gs://{graph.BUCKET}/pairs/v2"
    config = PairConfig(input_root=graph.INPUT, split="train", corrections=(f"gs://{graph.BUCKET}/c.json",))
    spec = OutputSpec(out, ("parquet", "tfrecord"))
    p = beam.Pipeline(options=options)
    build_pipeline.build(p, config, spec, {"output": out}, None, since=since,
                         latest_pointer=f"gs://{graph.BUCKET}/pairs/latest.json")
    assert not p.run().has_job
    job = harness.collect(job_file, 0)
    names = job.transforms()
    for step in ("BuildDataset/FingerprintTiles/GroupByColumnBlock", "BuildDataset/FingerprintTiles/FingerprintGroups",
                 "BuildDataset/PlanIncrement/JoinByTileId",
                 "BuildDataset/PlanIncrement/ReadPreviousManifest/ReadManifest", "BuildDataset/PlanIncrement/JoinByChip",
                 "BuildDataset/CarryForward/JoinLocations", "BuildDataset/CarryForward/GroupByRowGroup",
                 "BuildDataset/CarryForward/ReadCarried", "BuildDataset/BuildPairs/BuildPair", "BuildDataset/WritePairs",
                 "BuildDataset/WriteRejects", "BuildDataset/WriteManifest", "BuildDataset/PublishRun/WriteRunJson",
                 "BuildDataset/MoveLatest"):
        assert step in names, step
    assert "use_runner_v2" in job.job["environment"]["experiments"]
    assert job.gcs_calls == []  # nothing on gs:// is touched by the launcher


def test_carry_forward_reads_each_row_group_once(tmp_path):
    """Records are located per (file, row group) from the tile_id column, then each row group with
    carried records is read once; duplicate_tile_id rejects are never carried (they are remade);
    ids without a record come out as 'missing'."""
    import pyarrow as pa

    from transforms import records

    run = str(tmp_path / "v1")
    os.makedirs(f"{run}/pairs")
    os.makedirs(f"{run}/rejects")
    empty = dict.fromkeys(records.PAIR_SCHEMA.names)
    pairs = [{**empty, "tile_id": tid(i), "naip_id": OLD, "hr": bytes([i]) * 7, "lr_index": i, "psnr": 1.5 + i}
             for i in range(10)]
    pq.write_table(pa.Table.from_pylist(pairs[:7], schema=records.PAIR_SCHEMA),
                   f"{run}/pairs/pairs-00000-of-00002.parquet", row_group_size=3)  # 3 row groups
    pq.write_table(pa.Table.from_pylist(pairs[7:], schema=records.PAIR_SCHEMA),
                   f"{run}/pairs/pairs-00001-of-00002.parquet", row_group_size=2)
    rejects = [records.reject_record(tid(20), "read", "missing_hr", "x"),
               records.reject_record(tid(3), "manifest", "duplicate_tile_id", "listed more than once"),
               records.reject_record(tid(21), "manifest", "duplicate_tile_id", "listed more than once"),
               records.reject_record(tid(21), "read", "missing_band", "y")]
    pq.write_table(pa.Table.from_pylist(rejects, schema=records.REJECT_SCHEMA),
                   f"{run}/rejects/rejects-00000-of-00001.parquet")
    files = sorted(f"{run}/{d}/{f}" for d in ("pairs", "rejects") for f in os.listdir(f"{run}/{d}"))
    publish.publish(run, {"output": run}, files)

    carry = [tid(1), tid(3), tid(8), tid(20), tid(21), tid(99)]
    with beam.Pipeline(options=PipelineOptions(["--runner", RUNNER])) as p:
        out = p | beam.Create(carry) | incremental.CarryForward(run)
        assert_that(out["pairs"] | "PairIds" >> beam.Map(lambda r: (r["tile_id"], r["hr"], r["lr_index"])),
                    equal_to([(tid(i), bytes([i]) * 7, i) for i in (1, 3, 8)]), label="pairs")
        assert_that(out["rejects"], equal_to([rejects[0], rejects[3]]), label="rejects")
        assert_that(out["missing"], equal_to([tid(99)]), label="missing")
    counters = p.result.metrics().query(MetricsFilter().with_namespace(incremental.NAMESPACE))["counters"]
    got = {c.key.metric.name: c.committed for c in counters}
    assert got["carried"] == 5 and got["carry_missing"] == 1
    assert got["row_groups_read"] == 4  # of 6: those holding a carried record, once each


# ---------------------------------------------------------------------------------------------
# The command line (`s2naip build --since ... --latest ...`)


def test_cli_build_since_and_latest(tmp_path):
    from pipelines import build_pairs, cli
    from pipelines.options import BuildOptions

    assert PipelineOptions(["--since", "x"]).view_as(BuildOptions).since == "x"
    root, pointer = str(tmp_path / "in"), str(tmp_path / "latest.json")
    for i in range(3):
        good_tile(root, tid(i), seed=i, t=5)
    base = ["--input", root, "--runner", RUNNER, "--split", "set", "--latest", pointer]
    first = build_pairs.run([*base, "--output", str(tmp_path / "v1")])
    assert first["incremental"]["new"] == 3 and latest.read_latest(pointer)["run"] == str(tmp_path / "v1")
    good_tile(root, tid(3), seed=3, t=5)
    with pytest.raises(SystemExit, match="output folder itself"):
        build_pairs.run([*base, "--output", str(tmp_path / "v1"), "--since", pointer, "--overwrite"])
    with pytest.raises(SystemExit, match="no complete run"):
        build_pairs.run([*base, "--output", str(tmp_path / "v2"), "--since", str(tmp_path / "nothing")])
    second = build_pairs.run([*base, "--output", str(tmp_path / "v2"), "--since", pointer])
    assert second["incremental"]["processed"] == 1 and second["incremental"]["carried"] == 3
    assert second["since"] == str(tmp_path / "v1") and second["counts"]["pairs"] == 4
    assert latest.read_latest(pointer)["run"] == str(tmp_path / "v2")
    assert "plan" in cli.SUBCOMMANDS
