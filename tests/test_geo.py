"""Tests for transforms.nir.geo: XYZ tile bounds, tile cover, and windowed reprojection onto tiles."""
from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio
import rasterio.transform
import rasterio.warp
from rasterio.enums import Resampling
from rasterio.io import MemoryFile

from transforms.nir import geo

HALF = math.pi * 6378137.0  # 20037508.342789244 m


def _lonlat_to_tile(lon: float, lat: float, zoom: int) -> tuple[int, int]:
    """The OSM slippy-map formula, independent of geo's EPSG:3857 arithmetic."""
    n = 2**zoom
    x = int((lon + 180.0) / 360.0 * n)
    lat_r = math.radians(lat)
    y = int((1.0 - math.asinh(math.tan(lat_r)) / math.pi) / 2.0 * n)
    return x, y


def _tile_nw_lonlat(x: int, y: int, zoom: int) -> tuple[float, float]:
    n = 2**zoom
    lon = x / n * 360.0 - 180.0
    lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * y / n))))
    return lon, lat


# ---------------------------------------------------------------- tile bounds


def test_zoom0_is_the_whole_projection():
    assert geo.tile_bounds_3857(0, 0, 0) == pytest.approx((-HALF, -HALF, HALF, HALF))


def test_zoom1_tile_0_0_is_the_north_west_quarter():
    # Left half, top half: x grows eastwards, y grows southwards from the north edge.
    assert geo.tile_bounds_3857(0, 0, 1) == pytest.approx((-HALF, 0.0, 0.0, HALF), abs=1e-6)
    assert geo.tile_bounds_3857(1, 1, 1) == pytest.approx((0.0, -HALF, HALF, 0.0), abs=1e-6)
    assert geo.tile_bounds_3857(1, 0, 1) == pytest.approx((0.0, 0.0, HALF, HALF), abs=1e-6)


def test_zoom17_tile_size_is_about_305_7_m():
    size = geo.tile_size_3857(17)
    assert size == pytest.approx(2 * HALF / 2**17)
    assert size == pytest.approx(305.748, abs=1e-3)
    left, bottom, right, top = geo.tile_bounds_3857(12345, 54321, 17)
    assert right - left == pytest.approx(size, rel=1e-12)
    assert top - bottom == pytest.approx(size, rel=1e-12)


def test_equator_tile_on_the_ground():
    # At the equator EPSG:3857 metres are ground metres: the tile just north-east of (0, 0).
    n = 2**17
    left, bottom, right, top = geo.tile_bounds_3857(n // 2, n // 2 - 1, 17)
    assert (left, bottom) == pytest.approx((0.0, 0.0), abs=1e-6)
    lon0, lat0 = rasterio.warp.transform("EPSG:3857", "EPSG:4326", [left], [bottom])
    lon1, lat1 = rasterio.warp.transform("EPSG:3857", "EPSG:4326", [right], [top])
    # 360 degrees / 2**17 of the equator, 40075016.686 m around.
    assert lon1[0] - lon0[0] == pytest.approx(360.0 / n)
    assert (lon1[0] - lon0[0]) / 360.0 * 40075016.686 == pytest.approx(305.7, abs=0.1)


@pytest.mark.parametrize(
    "x, y, zoom",
    [(0, 0, 1), (3, 5, 4), (30346, 46873, 17), (65536, 65535, 17), (131071, 131071, 17), (29000, 45000, 17)],
)
def test_bounds_match_the_slippy_map_formula(x, y, zoom):
    left, bottom, right, top = geo.tile_bounds_3857(x, y, zoom)
    xs, ys = rasterio.warp.transform("EPSG:3857", "EPSG:4326", [left, right], [top, bottom])
    nw = _tile_nw_lonlat(x, y, zoom)
    se = _tile_nw_lonlat(x + 1, y + 1, zoom)
    assert (xs[0], ys[0]) == pytest.approx(nw, abs=1e-7)
    assert (xs[1], ys[1]) == pytest.approx(se, abs=1e-7)
    # The tile centre falls in the same tile by the OSM lon/lat -> tile formula.
    clon, clat = rasterio.warp.transform(
        "EPSG:3857", "EPSG:4326", [(left + right) / 2], [(bottom + top) / 2]
    )
    assert _lonlat_to_tile(clon[0], clat[0], zoom) == (x, y)


def test_north_dakota_tile_is_where_the_formula_puts_it():
    # A point in the test quad m_4709963_se_14 (lon -99.15, lat 47.02).
    x, y = _lonlat_to_tile(-99.15, 47.02, 17)
    left, bottom, right, top = geo.tile_bounds_3857(x, y, 17)
    px, py = rasterio.warp.transform("EPSG:4326", "EPSG:3857", [-99.15], [47.02])
    assert left <= px[0] < right and bottom < py[0] <= top


@pytest.mark.parametrize(
    "bad", [(-1, 0, 17), (0, -1, 17), (2**17, 0, 17), (0, 2**17, 17), (0, 0, 31), (1.5, 0, 17)]
)
def test_bounds_reject_tiles_outside_the_zoom(bad):
    with pytest.raises(ValueError):
        geo.tile_bounds_3857(*bad)


# ---------------------------------------------------------------- tiles_covering


@pytest.mark.parametrize("x, y", [(0, 0), (30346, 46873), (131071, 131071), (77777, 12345)])
def test_tiles_covering_a_tile_is_that_tile(x, y):
    assert geo.tiles_covering(geo.tile_bounds_3857(x, y, 17), 17) == [(x, y)]


def test_tiles_covering_a_block_round_trip():
    x0, y0, x1, y1 = 30340, 46870, 30345, 46873  # inclusive
    left = geo.tile_bounds_3857(x0, y0)[0]
    top = geo.tile_bounds_3857(x0, y0)[3]
    right = geo.tile_bounds_3857(x1, y1)[2]
    bottom = geo.tile_bounds_3857(x1, y1)[1]
    tiles = geo.tiles_covering((left, bottom, right, top))
    assert tiles == [(x, y) for y in range(y0, y1 + 1) for x in range(x0, x1 + 1)]
    for x, y in tiles:
        l, b, r, t = geo.tile_bounds_3857(x, y)
        assert left - 1e-6 <= l and r <= right + 1e-6 and bottom - 1e-6 <= b and t <= top + 1e-6


def test_tiles_covering_only_counts_whole_tiles():
    size = geo.tile_size_3857(17)
    left, bottom, right, top = geo.tile_bounds_3857(30340, 46870)
    # Shrinking by a centimetre on any side leaves no whole tile; growing by most of a tile adds none.
    assert geo.tiles_covering((left + 0.01, bottom, right, top)) == []
    assert geo.tiles_covering((left, bottom, right, top - 0.01)) == []
    grown = (left - 0.9 * size, bottom - 0.9 * size, right + 0.9 * size, top + 0.9 * size)
    assert geo.tiles_covering(grown) == [(30340, 46870)]
    grown = (left - 1.0 * size, bottom, right, top + 1.0 * size)
    assert geo.tiles_covering(grown) == [(30339, 46869), (30340, 46869), (30339, 46870), (30340, 46870)]


def test_tiles_covering_whole_world_at_zoom_2():
    assert len(geo.tiles_covering((-HALF, -HALF, HALF, HALF), 2)) == 16
    # Bounds beyond the projection are clipped to it.
    assert len(geo.tiles_covering((-2 * HALF, -2 * HALF, 2 * HALF, 2 * HALF), 2)) == 16


def test_tiles_covering_rejects_inverted_bounds():
    with pytest.raises(ValueError):
        geo.tiles_covering((10.0, 0.0, 0.0, 10.0))


def test_tile_bounds_in_crs_contains_the_tile():
    x, y = _lonlat_to_tile(-99.15, 47.02, 17)
    l, b, r, t = geo.tile_bounds_in_crs(x, y, "EPSG:32614")
    # The tile's outline, densely sampled and transformed, lies inside the box.
    tl, tb, tr, tt = geo.tile_bounds_3857(x, y)
    s = np.linspace(0.0, 1.0, 50)
    ex = np.concatenate([tl + s * (tr - tl), np.full(50, tr), tl + s * (tr - tl), np.full(50, tl)])
    ey = np.concatenate([np.full(50, tb), tb + s * (tt - tb), np.full(50, tt), tb + s * (tt - tb)])
    ux, uy = rasterio.warp.transform("EPSG:3857", "EPSG:32614", ex, ey)
    assert min(ux) >= l - 1e-6 and max(ux) <= r + 1e-6 and min(uy) >= b - 1e-6 and max(uy) <= t + 1e-6
    # ~208 m on the ground at latitude 47.
    assert r - l == pytest.approx(305.748 * math.cos(math.radians(47.02)), rel=0.01)
    assert geo.tile_bounds_in_crs(x, y, "EPSG:3857") == geo.tile_bounds_3857(x, y)


@pytest.mark.parametrize("crs", ["EPSG:32614", "EPSG:26914", "EPSG:4326", "EPSG:5070"])
def test_tile_bounds_in_crs_agrees_with_transform_bounds(crs):
    x, y = _lonlat_to_tile(-99.15, 47.02, 17)
    want = rasterio.warp.transform_bounds("EPSG:3857", crs, *geo.tile_bounds_3857(x, y), densify_pts=21)
    tol = 1e-8 if crs == "EPSG:4326" else 1e-3
    assert geo.tile_bounds_in_crs(x, y, crs) == pytest.approx(want, abs=tol)


# ---------------------------------------------------------------- reproject_to_tile


def _synthetic(crs: str, transform, width: int, height: int, count: int = 4, nodata=0, seed: int = 0):
    """A uint8 raster with smooth structure plus texture, no zeros (so nodata=0 only marks holes)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    bands = []
    for b in range(count):
        smooth = 100 + 60 * np.sin(cols / (7.0 + 3 * b)) * np.cos(rows / (11.0 + b))
        bands.append(np.clip(smooth + rng.integers(-40, 40, size=(height, width)), 1, 255))
    data = np.stack(bands).astype(np.uint8)
    return _memfile(crs, transform, data, nodata), data


def _memfile(crs: str, transform, data: np.ndarray, nodata=0) -> MemoryFile:
    count, height, width = data.shape
    mem = MemoryFile()
    with mem.open(
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=data.dtype.name,
        crs=crs,
        transform=transform,
        nodata=nodata,
        tiled=True,
        blockxsize=256,
        blockysize=256,
        # Like the real NAIP files: gray + undefined bands. GDAL's default for a 4-band uint8 GTiff
        # is RGBA, which would make band 4 (NIR) the dataset's alpha mask.
        photometric="MINISBLACK",
    ) as ds:
        ds.write(data)
    return mem


@pytest.fixture(scope="module")
def utm_raster():
    """A 2 m, 4-band EPSG:32614 raster around the North Dakota test quad (~1.6 km x 1.2 km)."""
    x0, y0 = 486000.0, 5209000.0
    transform = rasterio.transform.from_origin(x0, y0, 2.0, 2.0)
    mem, data = _synthetic("EPSG:32614", transform, 800, 600)
    with mem, mem.open() as ds:
        yield ds, data


def _interior_tiles(ds, k: int):
    b = rasterio.warp.transform_bounds(ds.crs, "EPSG:3857", *ds.bounds, densify_pts=21)
    tiles = geo.tiles_covering(b)
    assert len(tiles) > k
    # Middle ones: well inside the raster even with the UTM/Mercator rotation.
    mid = len(tiles) // 2
    return tiles[mid - k // 2 : mid - k // 2 + k]


def _full_reproject(ds, data, x, y, bands, size, resampling):
    dst = np.zeros((len(bands), size, size), np.uint8)
    left, bottom, right, top = geo.tile_bounds_3857(x, y)
    rasterio.warp.reproject(
        source=data[[b - 1 for b in bands]],
        destination=dst,
        src_transform=ds.transform,
        src_crs=ds.crs,
        src_nodata=ds.nodata,
        dst_transform=rasterio.transform.from_bounds(left, bottom, right, top, size, size),
        dst_crs="EPSG:3857",
        dst_nodata=0,
        resampling=Resampling[resampling],
    )
    return dst.transpose(1, 2, 0)


@pytest.mark.parametrize("resampling", ["nearest", "bilinear", "cubic", "average", "lanczos"])
@pytest.mark.parametrize("size, bands", [(128, (1, 2, 3)), (32, (4,)), (128, (1, 2, 3, 4))])
def test_windowed_reprojection_matches_full_raster_reprojection(utm_raster, resampling, size, bands):
    ds, data = utm_raster
    for x, y in _interior_tiles(ds, 3):
        got, valid = geo.reproject_to_tile(
            ds, x, y, bands=bands, size=size, resampling=resampling, with_mask=True
        )
        want = _full_reproject(ds, data, x, y, bands, size, resampling)
        assert got.shape == (size, size, len(bands)) and got.dtype == np.uint8
        assert got.flags.c_contiguous
        diff = np.abs(got.astype(int) - want.astype(int))
        if resampling == "nearest":
            assert np.array_equal(got, want)
        else:
            # Same grid, same kernel: at most rounding differences from GDAL's approximate transformer.
            assert diff.max() <= 1, (resampling, diff.max())
            assert (diff > 0).mean() < 0.01
        assert valid.all(), "interior tile must be fully covered"
        if resampling in ("nearest", "bilinear", "average"):  # no overshoot below the data's 1..255
            assert (got > 0).all()


def test_band_selection_and_order(utm_raster):
    ds, _ = utm_raster
    (x, y), = _interior_tiles(ds, 1)
    rgbn = geo.reproject_to_tile(ds, x, y, bands=(1, 2, 3, 4))
    nir_r = geo.reproject_to_tile(ds, x, y, bands=[4, 1])
    assert np.array_equal(nir_r[..., 0], rgbn[..., 3])
    assert np.array_equal(nir_r[..., 1], rgbn[..., 0])


def test_mercator_raster_aligned_to_the_tile_grid_is_copied_exactly():
    # An EPSG:3857 raster whose pixels are exactly the zoom-17 128-px tile grid: tile (x, y) must be
    # the raster block at its offset, with no resampling at all.
    x0, y0 = 30340, 46870
    size = geo.tile_size_3857(17)
    left, _, _, top = geo.tile_bounds_3857(x0, y0)
    transform = rasterio.transform.from_origin(left, top, size / 128, size / 128)
    mem, data = _synthetic("EPSG:3857", transform, 4 * 128, 3 * 128, seed=3)
    with mem, mem.open() as ds:
        for dx, dy in [(0, 0), (1, 1), (3, 2), (2, 0)]:
            got = geo.reproject_to_tile(ds, x0 + dx, y0 + dy, bands=(1, 2, 3, 4), size=128)
            want = data[:, dy * 128 : (dy + 1) * 128, dx * 128 : (dx + 1) * 128].transpose(1, 2, 0)
            assert np.array_equal(got, want)
            # Downsampling 4x with `average` is the 4x4 block mean (GDAL rounds to nearest).
            got32 = geo.reproject_to_tile(ds, x0 + dx, y0 + dy, bands=(2,), size=32, resampling="average")
            blocks = want[..., 1].reshape(32, 4, 32, 4).astype(float).mean(axis=(1, 3))
            assert np.abs(got32[..., 0].astype(float) - blocks).max() <= 0.5 + 1e-9


def test_tile_partly_outside_is_zero_outside():
    x0, y0 = 30340, 46870
    size = geo.tile_size_3857(17)
    left, _, _, top = geo.tile_bounds_3857(x0, y0)
    # Raster covers the left half of tile (x0, y0) only.
    transform = rasterio.transform.from_origin(left, top, size / 128, size / 128)
    mem, data = _synthetic("EPSG:3857", transform, 64, 128, seed=5)
    with mem, mem.open() as ds:
        got = geo.reproject_to_tile(ds, x0, y0, bands=(1, 2, 3))
        assert np.array_equal(got[:, :64], data[:3].transpose(1, 2, 0))
        assert (got[:, 64:] == 0).all()
        # A tile entirely off the raster is all zeros (and reads nothing).
        far = geo.reproject_to_tile(ds, x0 + 10, y0 + 10, bands=(1, 2, 3))
        assert far.shape == (128, 128, 3) and not far.any()


def test_source_nodata_becomes_zero(utm_raster):
    ds, data = utm_raster
    # The tile holding the raster's centre; everything west of that centre becomes nodata, so the
    # tile straddles the hole's edge.
    cx, cy = ds.xy(300, 400)
    (mx,), (my,) = rasterio.warp.transform(ds.crs, "EPSG:3857", [cx], [cy])
    size = geo.tile_size_3857(17)
    x, y = int((mx + HALF) // size), int((HALF - my) // size)
    holed = data.copy()
    holed[:, :, :400] = 0
    with _memfile(ds.crs, ds.transform, holed) as mem, mem.open() as hds:
        for resampling in ("nearest", "bilinear", "average"):
            got = geo.reproject_to_tile(hds, x, y, bands=(1, 2, 3), resampling=resampling)
            want = _full_reproject(hds, holed, x, y, (1, 2, 3), 128, resampling)
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
            zero = (got == 0).all(axis=-1)
            assert 0.02 < zero.mean() < 0.98, zero.mean()  # straddles the edge
            # No value is invented in the hole, and no hole leaks into the valid side.
            assert np.array_equal(got == 0, want == 0)
            assert np.array_equal(zero, (got == 0).any(axis=-1))


def test_reads_only_the_padded_window(utm_raster, monkeypatch):
    ds, _ = utm_raster
    (x, y), = _interior_tiles(ds, 1)
    windows = []
    real_read = type(ds).read

    def spy(self, *args, **kwargs):
        windows.append(kwargs.get("window"))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(type(ds), "read", spy)
    geo.reproject_to_tile(ds, x, y, bands=(1,), size=128)
    (w,) = windows
    assert w is not None
    # The tile is ~208 m = ~104 px of 2 m; with 25% padding each side about 156 px, never the raster.
    assert 104 <= w.width <= 170 and 104 <= w.height <= 170


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bands": (0,)},
        {"bands": (5,)},
        {"bands": ()},
        {"bands": 1},
        {"bands": (1,), "resampling": "mode"},
        {"bands": (1,), "size": 0},
    ],
)
def test_reproject_rejects_bad_arguments(utm_raster, kwargs):
    ds, _ = utm_raster
    (x, y), = _interior_tiles(ds, 1)
    with pytest.raises((ValueError, TypeError)):
        geo.reproject_to_tile(ds, x, y, **kwargs)


def test_reproject_rejects_non_uint8():
    transform = rasterio.transform.from_origin(486000.0, 5209000.0, 2.0, 2.0)
    with _memfile("EPSG:32614", transform, np.ones((1, 8, 8), np.uint16), None) as mem, mem.open() as ds:
        with pytest.raises(ValueError, match="uint8"):
            geo.reproject_to_tile(ds, 0, 0, bands=(1,))


def test_zero_in_one_band_is_data_not_nodata():
    # NAIP files may declare nodata=0 while NIR over water is a real 0: a pixel is nodata only when
    # all bands are 0, and the NIR comes out the same whether fetched alone or with RGB.
    x0, y0 = 30340, 46870
    size = geo.tile_size_3857(17)
    left, _, _, top = geo.tile_bounds_3857(x0, y0)
    transform = rasterio.transform.from_origin(left, top, size / 64, size / 64)
    mem, data = _synthetic("EPSG:3857", transform, 64, 64, seed=7)
    mem.close()
    data[3, 10:40, 10:40] = 0  # "water": NIR zero, RGB valid
    data[:, 50:, 50:] = 0  # a real nodata corner: all bands zero
    with _memfile("EPSG:3857", transform, data) as mem:
        with mem.open() as ds:
            for resampling in ("nearest", "bilinear", "average", "cubic"):
                rgbn, valid = geo.reproject_to_tile(
                    ds, x0, y0, bands=(1, 2, 3, 4), size=32, resampling=resampling, with_mask=True
                )
                nir, valid_nir = geo.reproject_to_tile(
                    ds, x0, y0, bands=(4,), size=32, resampling=resampling, with_mask=True
                )
                assert np.array_equal(valid, valid_nir)
                assert np.array_equal(rgbn[..., 3], nir[..., 0]), resampling
                assert (rgbn[8:17, 8:17, 3] == 0).all()  # water stays 0 (inside the 2x2 blocks)
                assert valid[8:17, 8:17].all()
                assert not valid[26:, 26:].any() and not rgbn[26:, 26:].any()
                assert valid[:20, 28:].all()
            exact = geo.reproject_to_tile(ds, x0, y0, bands=(1, 2, 3, 4), size=64)
            assert np.array_equal(exact, data.transpose(1, 2, 0))
