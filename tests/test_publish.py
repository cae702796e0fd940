"""Every format in its own folder, run.json and _SUCCESS, and reruns that never mix two runs."""
import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines import build_pairs
from tests.tile_factory import NAIP_ID, good_tile, scene, series_from, write_tile
from transforms.io import publish
from transforms.io.readers import read_parquet_pairs, read_tfrecord_pairs

RUNNER = "FnApiRunner"
OTHER_NAIP_ID = "m_2608101_nw_17_060_20180705"


def tid(i, naip_id=NAIP_ID):
    return f"{naip_id}/{35000 + i}_55000"


def _input(root):
    for i in range(4):
        good_tile(root, tid(i), seed=i, t=8)
    # a second capture of chip 0: both are pairs, the png layout keeps the first id only
    good_tile(root, tid(0, OTHER_NAIP_ID), seed=40, t=8)
    # a pair whose matched HR has pure-black pixels inside (the training code would skip it): black
    # inside the HR and inside every timestep, so that matching maps the HR's zeros to zeros
    rng = np.random.default_rng(7)
    hr = scene(rng)
    hr[60:64, 60:64, :3] = 0
    series = series_from(hr, rng, 8)
    series[:, 14:16, 14:16, :3] = 0
    write_tile(root, tid(5), hr, series)


def _files_under(out, folder):
    found = []
    for dirpath, _, names in os.walk(os.path.join(out, folder)):
        found += [os.path.join(dirpath, n) for n in names]
    return sorted(found)


def test_all_formats_each_in_its_own_folder(tmp_path):
    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    _input(root)
    summary = build_pairs.run(["--input", root, "--output", out, "--runner", RUNNER,
                               "--format", "parquet,tfrecord,png", "--tfrecord-gzip"])
    assert summary["counts"]["pairs"] == 6
    # a reader pointed at a folder finds one format only
    assert all(f.endswith(".parquet") for f in _files_under(out, "pairs"))
    assert all(f.endswith(".tfrecord.gz") for f in _files_under(out, "tfrecord"))
    assert all(f.endswith((".png", "tracker.json")) for f in _files_under(out, "png"))
    assert not os.path.exists(os.path.join(out, "png_staging"))  # every staged PNG moved or dropped
    frame = pd.read_parquet(os.path.join(out, "pairs"))
    assert len(frame) == 6
    parquet_rows = {r["tile_id"]: r for r in read_parquet_pairs(os.path.join(out, "pairs"))}
    tfrecord_rows = {r["tile_id"]: r for r in read_tfrecord_pairs(os.path.join(out, "tfrecord"))}
    assert parquet_rows == tfrecord_rows

    # png layout: the satlas training layout, HR RGB only under naip/
    png = os.path.join(out, "png")
    naip_pngs = _files_under(out, "png/naip")
    assert all(f.endswith("rgb.png") for f in naip_pngs) and len(naip_pngs) == 5
    tracker = json.load(open(os.path.join(png, "tracker.json")))
    first, second = sorted([tid(0), tid(0, OTHER_NAIP_ID)])  # the id that sorts first keeps the chip
    assert set(tracker) == {first, tid(1), tid(2), tid(3), tid(5)}
    row = parquet_rows[tid(1)]
    xy = "35001_55000"
    rgb = np.asarray(Image.open(os.path.join(png, "naip", NAIP_ID, xy, "rgb.png")))
    nir = Image.open(os.path.join(png, "nir", "naip", NAIP_ID, xy, "nir.png"))
    tci = np.asarray(Image.open(os.path.join(png, "sentinel2", xy, "tci.png")))
    b08 = Image.open(os.path.join(png, "sentinel2", xy, "b08.png"))
    hr = np.frombuffer(row["hr"], np.uint8).reshape(row["hr_shape"])
    lr = np.frombuffer(row["lr"], np.uint8).reshape(row["lr_shape"])
    np.testing.assert_array_equal(rgb, hr[..., :3])
    np.testing.assert_array_equal(tci, lr[..., :3])
    assert nir.mode == "L" and b08.mode == "L"
    np.testing.assert_array_equal(np.asarray(nir), hr[..., 3])
    assert tracker[tid(1)] == row["lr_index"]

    run = json.load(open(os.path.join(out, "run.json")))
    assert run["counts"]["png"] == {"pairs": 5, "rejects_by_reason": {"png_xy_collision": 1}, "black_pixel_tiles": 1}
    assert run["formats"] == ["parquet", "tfrecord", "png"]
    success = publish.read_success(out)
    assert success is not None
    assert all(os.path.exists(f) for f in success["files"])
    assert set(_files_under(out, "pairs")) | set(_files_under(out, "tfrecord")) <= set(success["files"])


def test_rerun_refuses_or_replaces_without_mixing_runs(tmp_path):
    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    for i in range(6):
        good_tile(root, tid(i), seed=i, t=6)
    base = ["--input", root, "--output", out, "--runner", RUNNER]
    build_pairs.run([*base, "--num-shards", "3"])
    first = publish.read_success(out)["files"]
    assert sum("-of-00003" in f for f in first) == 9  # 3 shards of pairs, 3 of rejects, 3 of the manifest

    with pytest.raises(SystemExit, match="already holds a run"):
        build_pairs.run([*base, "--num-shards", "2"])
    assert publish.read_success(out)["files"] == first  # the refused rerun touched nothing

    build_pairs.run([*base, "--num-shards", "2", "--overwrite"])
    second = publish.read_success(out)["files"]
    visible = _files_under(out, "pairs") + _files_under(out, "rejects")
    assert sorted(visible) == sorted(f for f in second if "/pairs/" in f or "/rejects/" in f)
    assert all("-of-00002" in f for f in visible) and len(visible) == 4
    assert len(pd.read_parquet(os.path.join(out, "pairs"))) == 6


def test_unknown_format_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown --format"):
        build_pairs.run(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--format", "parquet,zarr"])
