"""The build on tiles made from real NAIP GeoTIFFs: planted bad timesteps are never chosen."""
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import build_pairs
from transforms.devdata.real_tiles import BLACK_BORDER, CLOUDY, DARK, build_real_tiles
from transforms.records import decode_pair_arrays
from transforms.selection import SelectionConfig, select_pair


def _build(root, out, *extra):
    summary = build_pairs.run(["--input", str(root), "--output", str(out), "--runner", "FnApiRunner", *extra])
    rows = {r["tile_id"]: r for r in pq.read_table(os.path.join(out, "pairs")).to_pylist()}
    return summary, rows


@pytest.mark.parametrize("mode, extra", [("paper", []), ("companion", []),
                                         ("robust", ["--read-threads", "4"])])  # reads ahead
def test_planted_bad_timesteps_are_never_chosen(real_tile_set, tmp_path, mode, extra):
    root, tiles = real_tile_set
    summary, rows = _build(root, tmp_path / "out", "--selection", mode, *extra)
    assert summary["counts"]["pairs"] == len(tiles) == len(rows)
    hr_date_chosen = 0
    for t in tiles:
        row = rows[t.tile_id]
        assert t.planted.get(row["lr_index"]) is None, (t.tile_id, t.planted, row["lr_index"])
        black = [i for i, c in t.planted.items() if c == BLACK_BORDER]
        assert not set(black) & set(row["valid_indices"])
        hr_date_chosen += row["lr_index"] == t.hr_date_index
    # the capture of the HR's own date is the right answer on real imagery nearly always
    assert hr_date_chosen >= 0.8 * len(tiles)


def test_heavily_clouded_series_without_the_hr_date(real_naip_dir, tmp_path):
    root = tmp_path / "in"
    tiles = build_real_tiles(root, real_naip_dir, n_tiles=12, seed=3, include_hr_date=False,
                             plant={BLACK_BORDER: 3, CLOUDY: 3, DARK: 2})
    for mode in ("paper", "companion", "robust"):
        _, rows = _build(root, tmp_path / f"out-{mode}", "--selection", mode)
        for t in tiles:
            chosen = rows[t.tile_id]["lr_index"]
            assert chosen in t.clean_indices, (mode, t.tile_id, t.planted.get(chosen))


def test_pairs_hold_the_real_hr_matched_to_the_chosen_real_lr(real_tile_set, tmp_path):
    from PIL import Image

    root, tiles = real_tile_set
    _, rows = _build(root, tmp_path / "out")
    t = tiles[0]
    row = rows[t.tile_id]
    hr, lr = decode_pair_arrays(row)
    naip_id, xy = t.tile_id.split("/")
    rgb = np.asarray(Image.open(root / "naip" / naip_id / xy / "rgb.png"))
    nir = np.asarray(Image.open(root / "naip" / naip_id / xy / "nir.png"))
    tci = np.asarray(Image.open(root / "sentinel2" / xy / "tci.png")).reshape(-1, 32, 32, 3)
    b08 = np.asarray(Image.open(root / "sentinel2" / xy / "b08.png")).reshape(-1, 32, 32)
    series = np.concatenate([tci, b08[..., None]], axis=-1)
    expected = select_pair(np.dstack([rgb, nir]), series, SelectionConfig())
    np.testing.assert_array_equal(hr, expected.hr_matched)
    np.testing.assert_array_equal(lr, series[row["lr_index"]])
