"""Smoke tests of transforms/devdata/real_tiles.py on the real NAIP captures (skipped without the data)."""
from __future__ import annotations

import contextlib
import hashlib
import time

import numpy as np
import pytest
import rasterio
from PIL import Image

from transforms import tiles
from transforms.devdata import real_tiles as R
from transforms.nir import geo


def _read(path, mode):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == mode, (path, im.mode)
        return np.asarray(im)


def _load(root, tile: R.RealTile):
    tid = tile.tile
    rgb = _read(tiles.hr_rgb_path(str(root), tid), "RGB")
    nir = _read(tiles.hr_nir_path(str(root), tid), "L")
    tci = _read(tiles.s2_band_path(str(root), tid, "tci"), "RGB")
    b08 = _read(tiles.s2_band_path(str(root), tid, "b08"), "L")
    t = tile.n_timesteps
    assert rgb.shape == (128, 128, 3) and nir.shape == (128, 128)
    assert tci.shape == (t * 32, 32, 3) and b08.shape == (t * 32, 32)
    return rgb, nir, tci.reshape(t, 32, 32, 3), b08.reshape(t, 32, 32)


def _border_black(img: np.ndarray, border: int = 2) -> int:
    """Black (RGB sum 0) pixels in the four 2-px border strips, counted per strip (the paper's rule)."""
    black = img[..., :3].astype(int).sum(-1) == 0
    return int(
        black[:border].sum() + black[-border:].sum() + black[:, :border].sum() + black[:, -border:].sum()
    )


def test_real_tile_set(real_tile_set, real_naip_dir):
    root, built = real_tile_set
    captures = R.list_captures(real_naip_dir)
    hr_date = "20190904"
    assert len(built) == 20
    assert len({t.tile_id for t in built}) == 20
    n_planted = sum(R.DEFAULT_PLANT.values())
    for tile in built:
        tid = tiles.TileId.parse(tile.tile_id)
        assert tid.naip_id == captures[hr_date].name[:-4] == "m_4709963_se_14_1_20190904"
        rgb, nir, tci, b08 = _load(root, tile)
        t = tile.n_timesteps
        assert t == len(captures) + n_planted

        # Bookkeeping: every index is either clean or planted; each capture is clean exactly once.
        assert set(tile.capture_of_index) == set(range(t))
        assert set(tile.planted) | set(tile.clean_indices) == set(range(t))
        assert not set(tile.planted) & set(tile.clean_indices)
        assert tile.clean_indices == tuple(sorted(tile.clean_indices))
        assert sorted(tile.capture_of_index[i] for i in tile.clean_indices) == sorted(captures)
        assert sorted(tile.planted.values()) == sorted(
            c for c, k in R.DEFAULT_PLANT.items() for _ in range(k)
        )
        assert tile.capture_of_index[tile.hr_date_index] == hr_date
        assert tile.hr_date_index in tile.clean_indices
        # Shuffled: the clean captures are not in date order (S2-NAIP series are not chronological)
        # somewhere in the set; checked over all tiles below.

        # The HR and the clean LR timesteps have no black pixel at all; the planted black borders
        # have more than one in their border strips, exact zeros in every channel including B08.
        assert _border_black(rgb) == 0 and not (rgb.sum(-1) == 0).any()
        assert nir.shape == (128, 128)
        clean_of = {tile.capture_of_index[i]: i for i in tile.clean_indices}
        for i in tile.clean_indices:
            assert _border_black(tci[i]) == 0
            assert tci[i].min() >= 1 and b08[i].min() >= 1  # S2 TCI: 0 is nodata
        for i, condition in tile.planted.items():
            source = tci[clean_of[tile.capture_of_index[i]]].astype(int)
            img = tci[i].astype(int)
            if condition == R.BLACK_BORDER:
                assert _border_black(tci[i]) > 1
                black = img.sum(-1) == 0
                assert (b08[i][black] == 0).all()
                # Outside the wedge it is the clean capture it was copied from.
                assert np.array_equal(img[~black], source[~black])
                assert 0.02 < black.mean() < 0.7
            elif condition == R.CLOUDY:
                assert _border_black(tci[i]) == 0 and img.min() >= 1
                assert (img.min(-1) >= 180).mean() >= 0.4  # thick bright clouds over >= 40 %
                assert (img.mean(-1) < 0.8 * source.mean(-1)).any()  # and shadows
            elif condition == R.DARK:
                assert _border_black(tci[i]) == 0 and img.min() >= 1
                assert img.mean() < 0.35 * source.mean()
            else:
                pytest.fail(f"unknown condition {condition}")

    orders = [[t.capture_of_index[i] for i in t.clean_indices] for t in built]
    assert any(o != sorted(o) for o in orders)
    assert len({tuple(sorted(t.planted)) for t in built}) > 1  # planted positions vary by tile


def test_lr_is_coregistered_with_hr(real_tile_set):
    # The LR timestep of the HR's own capture is that capture averaged to 32x32 plus a per-band
    # gain/offset and noise: against the HR block-averaged 4x4 it correlates best at zero shift.
    root, built = real_tile_set
    checked = 0
    for tile in built:
        rgb, nir, tci, b08 = _load(root, tile)
        hr = np.concatenate([rgb, nir[..., None]], -1).astype(float)
        hr_lr = hr.reshape(32, 4, 32, 4, 4).mean(axis=(1, 3))
        lr = np.concatenate([tci, b08[..., None]], -1)[tile.hr_date_index].astype(float)
        for band in range(4):
            a = hr_lr[4:28, 4:28, band].ravel()  # the centre, so that shifts stay inside the tile
            if a.std() < 4.0:  # featureless (a lake, a uniform field): noise only
                continue
            corr = {
                (dy, dx): np.corrcoef(a, np.roll(lr[..., band], (dy, dx), (0, 1))[4:28, 4:28].ravel())[0, 1]
                for dy in range(-2, 3)
                for dx in range(-2, 3)
            }
            assert max(corr, key=corr.get) == (0, 0), (tile.tile_id, band, corr)
            assert corr[(0, 0)] > 0.8, (tile.tile_id, band, corr[(0, 0)])
            checked += 1
    assert checked >= 20


def test_usable_tiles_are_inside_every_capture(real_naip_dir):
    captures = R.list_captures(real_naip_dir)
    with contextlib.ExitStack() as stack:
        datasets = [stack.enter_context(rasterio.open(p)) for p in captures.values()]
        usable = R.usable_tiles(datasets)
        assert len(usable) >= 20
        for ds in datasets:
            assert ds.crs is not None and ds.count == 4 and set(ds.dtypes) == {"uint8"}
        # Spot-check: full valid coverage at HR and LR for a few of them, in every capture.
        for x, y in usable[:: max(1, len(usable) // 6)]:
            for ds in datasets:
                _, valid = geo.reproject_to_tile(ds, x, y, bands=(1, 2, 3, 4), with_mask=True)
                assert valid.all()


def test_build_is_deterministic_and_options(real_naip_dir, tmp_path):
    kwargs = dict(n_tiles=2, seed=7, plant={R.BLACK_BORDER: 2, R.CLOUDY: 0, R.DARK: 1})
    t0 = time.perf_counter()
    a = R.build_real_tiles(tmp_path / "a", real_naip_dir, **kwargs)
    b = R.build_real_tiles(tmp_path / "b", real_naip_dir, **kwargs)
    assert time.perf_counter() - t0 < 10
    assert a == b

    def digest(root):
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return [(p.relative_to(root).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]

    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert len(digest(tmp_path / "a")) == 2 * 4
    for tile in a:
        assert sorted(tile.planted.values()) == [R.BLACK_BORDER, R.BLACK_BORDER, R.DARK]

    c = R.build_real_tiles(
        tmp_path / "c", real_naip_dir, n_tiles=2, seed=8, include_hr_date=False,
        hr_date="20150926", nir_root=tmp_path / "nir",
    )
    assert [t.tile_id for t in c] != [t.tile_id for t in a]
    for tile in c:
        assert tile.tile.naip_id == "m_4709963_se_14_1_20150926"
        assert tile.hr_date_index is None
        assert "20150926" not in {tile.capture_of_index[i] for i in tile.clean_indices}
        assert (tmp_path / "nir" / "naip" / tile.tile.naip_id / tile.tile.xy / "nir.png").is_file()
        assert not (tmp_path / "c" / "naip" / tile.tile.naip_id / tile.tile.xy / "nir.png").exists()


def test_build_rejects_bad_requests(real_naip_dir, tmp_path):
    with pytest.raises(ValueError, match="no capture dated"):
        R.build_real_tiles(tmp_path, real_naip_dir, hr_date="20110101", n_tiles=1)
    with pytest.raises(ValueError, match="unknown conditions"):
        R.build_real_tiles(tmp_path, real_naip_dir, n_tiles=1, plant={"hazy": 1})
    with pytest.raises(ValueError, match="usable tiles"):
        R.build_real_tiles(tmp_path, real_naip_dir, n_tiles=100_000)


def test_planting_primitives():
    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = R.swath_edge_mask(rng)
        img = np.where(mask[..., None], 0, 100).astype(np.uint8)
        assert _border_black(img) > 1
        alpha = R.cloud_alpha(rng)
        assert (alpha >= 0.5).mean() >= 0.4
