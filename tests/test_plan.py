"""`s2naip plan` against the loopback STAC API of the NIR fetch (`naip_servers`: stac-fastapi-pgstac
with Planetary-Computer-like items of ten real captures of quarter quad m_4709963_se, 2009-2020,
plus decoys), and the release workflow it starts: plan -> fetch-nir (the work list) -> build --since.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import rasterio

from pipelines import fetch_nir, plan
from tests.test_incremental import build
from tests.tile_factory import NAIP_ID as FLORIDA_ID
from tests.tile_factory import good_tile
from transforms.build import dataset_manifest as dm
from transforms.devdata.real_tiles import usable_tiles
from transforms.io import latest
from transforms.nir import plan as nir_plan
from transforms.tiles import TileId

CAPTURE_2012 = "m_4709963_se_14_1_20120731"
CAPTURE_2020 = "m_4709963_se_14_1_20200831"
NEWER = ["m_4709963_se_14_1_20140720", "m_4709963_se_14_1_20150926", "m_4709963_se_14_1_20160816",
         "m_4709963_se_14_1_20170827", "m_4709963_se_14_1_20180716", "m_4709963_se_14_1_20190904",
         CAPTURE_2020]
FAST_HTTP = ["--http-backoff", "0.01", "--max-requests-per-second", "200"]


pytestmark = pytest.mark.usefixtures("loopback_only")  # tests/conftest.py


def feature(item_id: str, date: str, bbox=(-1.0, -1.0, 1.0, 1.0)) -> dict:
    return {"type": "Feature", "id": item_id, "bbox": list(bbox), "properties": {"datetime": f"{date}T00:00:00Z"}}


def read_lines(path) -> list[str]:
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def test_newer_captures_rules():
    rows = [{"tile_id": f"{CAPTURE_2012}/10_20", "naip_id": CAPTURE_2012, "tile_xy": "10_20", "outcome": "pair"},
            {"tile_id": f"{CAPTURE_2012}/11_20", "naip_id": CAPTURE_2012, "tile_xy": "11_20", "outcome": "reject"},
            {"tile_id": "m_4709963_se_14_1_20100629/12_20", "naip_id": "m_4709963_se_14_1_20100629",
             "tile_xy": "12_20", "outcome": "pair"},
            {"tile_id": f"{FLORIDA_ID}/1_2", "naip_id": FLORIDA_ID, "tile_xy": "1_2", "outcome": "superseded"},
            {"tile_id": "bad", "naip_id": None, "tile_xy": None, "outcome": "reject"}]
    quads = nir_plan.quarter_quads(rows)
    assert set(quads) == {"m_4709963_se"}  # retired rows and invalid ids are no part of the dataset
    qq = quads["m_4709963_se"]
    assert qq.latest_capture.naip_id == CAPTURE_2012 and qq.chips == [(10, 20), (11, 20), (12, 20)]
    bbox, window = nir_plan.search_window(qq)
    assert window == "2012-08-01T00:00:00Z/.." and bbox[0] < bbox[2] and bbox[1] < bbox[3]
    features = [
        feature("nd_m_4709963_se_14_1_20160816_20161012", "2016-08-16"),
        feature("mt_m_4709963_se_14_1_20160816_20160901", "2016-08-16"),  # an older publication
        feature("nd_m_4709963_sw_14_1_20160816_20161012", "2016-08-16"),  # another quarter
        feature("nd_m_4709963_se_14_1_20120731_20121012", "2012-07-31"),  # the dataset's own capture
        feature("nd_m_4709963_se_14_060_20140720_20141001", "2014-07-20"),
        feature("something-else", "2019-01-01"),
    ]
    newer = nir_plan.newer_captures(qq, features)
    assert [c["naip_id"] for c in newer] == ["m_4709963_se_14_060_20140720", "m_4709963_se_14_1_20160816"]
    assert newer[-1]["item_id"] == "nd_m_4709963_se_14_1_20160816_20161012"
    assert nir_plan.chips_within(qq.chips, None) == qq.chips
    assert nir_plan.chips_within(qq.chips, [0.0, 0.0, 1.0, 1.0]) == []


@pytest.fixture(scope="module")
def dataset_2012(naip_servers, tmp_path_factory):
    """A published run of 3 tiles of the 2012 capture (chips inside both the 2012 and the 2020
    raster) and one of another quarter quad the API does not have; latest.json points at it."""
    base = tmp_path_factory.mktemp("plan")
    root, pointer = str(base / "in"), str(base / "latest.json")
    with rasterio.open(naip_servers.cog(CAPTURE_2012).path) as a, \
            rasterio.open(naip_servers.cog(CAPTURE_2020).path) as b:
        chips = usable_tiles([a, b])[::7][:3]
    assert len(chips) == 3
    ids = [f"{CAPTURE_2012}/{x}_{y}" for x, y in chips]
    for i, tile_id in enumerate(ids + [f"{FLORIDA_ID}/35000_55000"]):
        good_tile(root, tile_id, seed=i, t=5)
    counters = build(root, str(base / "v1"), pointer=pointer)
    assert counters["processed"] == 4
    return base, root, pointer, chips, ids


def test_plan_finds_the_newer_captures(naip_servers, dataset_2012):
    base, _, pointer, chips, ids = dataset_2012
    worklist = str(base / "worklist")
    summary = plan.run(["--naip-stac-url", naip_servers.stac_url, "--since", pointer, "--output", worklist,
                        *FAST_HTTP])
    assert summary["since"] == latest.resolve_since(pointer)
    assert summary["quarter_quads"] == 2 and summary["with_newer_capture"] == 1 and summary["complete"]
    assert summary["fetch_nir_tiles"] == 3 and summary["affected_tiles"] == 3
    assert json.load(open(os.path.join(worklist, "plan.json"))) == summary

    lines = {json.loads(line)["quarter_quad"]: json.loads(line)
             for line in read_lines(os.path.join(worklist, "quarter_quads.jsonl"))}
    assert lines["m_2608101_nw"]["newer"] is False and lines["m_2608101_nw"]["tiles"] == 1
    nd = lines["m_4709963_se"]
    assert nd["latest_capture"] == CAPTURE_2012 and nd["datetime"] == "2012-08-01T00:00:00Z/.."
    # every later capture of this quarter quad once; no decoy of the neighbouring quarter, and the
    # capture published twice resolves to its latest publication
    assert [c["naip_id"] for c in nd["newer_captures"]] == NEWER
    assert nd["newest"] == CAPTURE_2020
    assert nd["newer_captures"][-1]["item_id"] == naip_servers.cog(CAPTURE_2020).item_id
    assert [json.loads(l)["quarter_quad"] for l in read_lines(os.path.join(worklist, "newer_captures.jsonl"))] \
        == ["m_4709963_se"]
    assert read_lines(os.path.join(worklist, "fetch_nir_manifest.txt")) == sorted(
        f"{CAPTURE_2020}/{x}_{y}" for x, y in chips)
    assert read_lines(os.path.join(worklist, "affected_tiles.txt")) == sorted(ids)


def test_release_workflow_plan_fetch_build(naip_servers, dataset_2012, capsys):
    """The release workflow of docs/incremental.md on loopback: plan, fetch the new capture's NIR from
    the work list, land the new capture's tiles, build --since latest: the old tiles are superseded."""
    base, root, pointer, chips, ids = dataset_2012
    worklist, nir_out = str(base / "worklist2"), str(base / "nir")
    assert plan.main(["--naip-stac-url", naip_servers.stac_url, "--since", pointer, "--output", worklist,
                      *FAST_HTTP]) == 0
    fetched = fetch_nir.run(["--manifest", os.path.join(worklist, "fetch_nir_manifest.txt"), "--output", nir_out,
                             "--stac-url", naip_servers.stac_url, *FAST_HTTP])
    assert fetched["counts"]["written"] == 3 and fetched["counts"]["rejects"] == 0
    # the new capture lands in the input: its RGB tiles (made here) and the fetched NIR, old folders gone
    for i, line in enumerate(read_lines(os.path.join(worklist, "fetch_nir_manifest.txt"))):
        tile = TileId.parse(line)
        good_tile(root, line, seed=50 + i, t=5)
        shutil.copy(os.path.join(nir_out, "naip", tile.naip_id, tile.xy, "nir.png"),
                    os.path.join(root, "naip", tile.naip_id, tile.xy, "nir.png"))
    for old in read_lines(os.path.join(worklist, "affected_tiles.txt")):
        shutil.rmtree(os.path.join(root, "naip", old))
    since = latest.resolve_since(pointer)
    counters = build(root, str(base / "v2"), since=since, pointer=pointer)
    assert counters["superseded"] == 3 and counters["new"] == 3 and counters["processed"] == 3
    assert counters["carried"] == 1  # the other quarter quad's tile
    rows = dm.read_manifest(str(base / "v2")).to_pylist()
    superseded = {r["tile_id"]: r["reason"] for r in rows if r["outcome"] == "superseded"}
    assert superseded == {t: f"superseded by {CAPTURE_2020}/{t.split('/')[1]}" for t in ids}
    assert latest.read_latest(pointer)["run"] == str(base / "v2")
    # the next plan finds nothing newer
    summary = plan.run(["--naip-stac-url", naip_servers.stac_url, "--since", pointer,
                        "--output", str(base / "worklist3"), *FAST_HTTP])
    assert summary["with_newer_capture"] == 0 and summary["complete"] and summary["fetch_nir_tiles"] == 0


def test_plan_reports_stac_failures(tmp_path):
    from pipelines.dev.gcs_emulator import free_port

    root, pointer = str(tmp_path / "in"), str(tmp_path / "latest.json")
    good_tile(root, f"{CAPTURE_2012}/30000_40000", seed=1, t=4)
    good_tile(root, f"{FLORIDA_ID}/35000_55000", seed=2, t=4)
    build(root, str(tmp_path / "v1"), pointer=pointer)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    summary = plan.run(["--naip-stac-url", url, "--since", pointer, "--output", str(tmp_path / "w"),
                        "--http-retries", "2", *FAST_HTTP])
    assert not summary["complete"] and summary["errors"] == summary["quarter_quads"] == 2
    assert plan.main(["--naip-stac-url", url, "--since", pointer, "--output", str(tmp_path / "w2"),
                      "--http-retries", "1"]) == 1
    with pytest.raises(SystemExit, match="latest pointer not found"):
        plan.run(["--naip-stac-url", url, "--since", str(tmp_path / "nope.json"), "--output", str(tmp_path / "w3")])
    with pytest.raises(SystemExit, match="no complete run"):
        plan.run(["--naip-stac-url", url, "--since", str(tmp_path / "in"), "--output", str(tmp_path / "w4")])
