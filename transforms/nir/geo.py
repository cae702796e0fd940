"""Web-Mercator (XYZ / slippy-map) tile geometry and reprojection of rasters onto tiles.

S2-NAIP tiles are Web-Mercator zoom-17 tiles: column x grows eastwards, row y grows southwards from
the north edge of the projection, and a tile spans 2*pi*6378137 / 2**zoom metres of EPSG:3857 on each
side (about 305.7 m; on the ground that is 305.7 m * cos(latitude)).

Plain functions, no Beam. `reproject_to_tile` reads only the window of an open rasterio dataset that
covers the tile (plus padding, so resampling kernels have support at the tile edges) and warps it onto
the tile's EPSG:3857 grid.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import rasterio
import rasterio.transform
import rasterio.warp
import rasterio.windows
from rasterio.crs import CRS
from rasterio.enums import Resampling

WEB_MERCATOR = CRS.from_epsg(3857)
# Half the extent of EPSG:3857: pi * the WGS84 semi-major axis.
ORIGIN_SHIFT = math.pi * 6378137.0
DEFAULT_ZOOM = 17

RESAMPLING = {
    "nearest": Resampling.nearest,
    "bilinear": Resampling.bilinear,
    "cubic": Resampling.cubic,
    "average": Resampling.average,
    "lanczos": Resampling.lanczos,
}

# Tile indices computed from coordinates snap to the nearest integer within this many tile widths,
# so a tile's own bounds map back onto that tile despite floating-point rounding.
_SNAP = 1e-9


def tile_size_3857(zoom: int = DEFAULT_ZOOM) -> float:
    """Side of a tile at `zoom`, in EPSG:3857 metres."""
    _check_zoom(zoom)
    return 2.0 * ORIGIN_SHIFT / (1 << zoom)


def tile_bounds_3857(x: int, y: int, zoom: int = DEFAULT_ZOOM) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of XYZ tile (x, y) in EPSG:3857 metres."""
    _check_tile(x, y, zoom)
    size = tile_size_3857(zoom)
    left = -ORIGIN_SHIFT + x * size
    top = ORIGIN_SHIFT - y * size
    return (left, top - size, left + size, top)


def tiles_covering(
    bounds_3857: tuple[float, float, float, float], zoom: int = DEFAULT_ZOOM
) -> list[tuple[int, int]]:
    """The (x, y) tiles lying fully inside `bounds_3857` = (left, bottom, right, top), row by row
    from the north-west (sorted by y, then x). Empty when the bounds hold no whole tile.
    """
    left, bottom, right, top = (float(v) for v in bounds_3857)
    if not all(math.isfinite(v) for v in (left, bottom, right, top)):
        raise ValueError(f"bounds must be finite, got {bounds_3857}")
    if left > right or bottom > top:
        raise ValueError(f"bounds must be (left, bottom, right, top), got {bounds_3857}")
    size = tile_size_3857(zoom)
    n = 1 << zoom
    x0 = max(0, math.ceil((left + ORIGIN_SHIFT) / size - _SNAP))
    x1 = min(n, math.floor((right + ORIGIN_SHIFT) / size + _SNAP))  # exclusive
    y0 = max(0, math.ceil((ORIGIN_SHIFT - top) / size - _SNAP))
    y1 = min(n, math.floor((ORIGIN_SHIFT - bottom) / size + _SNAP))  # exclusive
    return [(x, y) for y in range(y0, y1) for x in range(x0, x1)]


def tile_bounds_in_crs(
    x: int, y: int, crs, zoom: int = DEFAULT_ZOOM, densify_pts: int = 21
) -> tuple[float, float, float, float]:
    """Bounding box (left, bottom, right, top), in `crs`, of the tile's outline.

    The outline is densified (`densify_pts` extra points per edge) before transforming, so the box
    contains the whole tile even where the projections are rotated or curved against each other
    (it is a bounding box, not the tile itself).
    """
    bounds = tile_bounds_3857(x, y, zoom)
    crs = CRS.from_user_input(crs)
    if crs == WEB_MERCATOR:
        return bounds
    left, bottom, right, top = bounds
    # rasterio.warp.transform of the outline rather than transform_bounds: the latter costs ~10 ms a
    # call for CRSs with a datum shift from WGS84 (e.g. NAD83 / UTM, EPSG:26914), this ~0.1 ms.
    t = np.linspace(0.0, 1.0, densify_pts + 2)
    along_x, along_y = left + t * (right - left), bottom + t * (top - bottom)
    xs = np.concatenate([along_x, np.full_like(t, right), along_x[::-1], np.full_like(t, left)])
    ys = np.concatenate([np.full_like(t, bottom), along_y, np.full_like(t, top), along_y[::-1]])
    tx, ty = rasterio.warp.transform(WEB_MERCATOR, crs, xs, ys)
    tx, ty = np.asarray(tx, dtype=float), np.asarray(ty, dtype=float)
    if not (np.isfinite(tx).all() and np.isfinite(ty).all()):
        raise ValueError(f"tile ({x}, {y}) at zoom {zoom} cannot be transformed to {crs}")
    return (float(tx.min()), float(ty.min()), float(tx.max()), float(ty.max()))


def tile_transform(x: int, y: int, size: int, zoom: int = DEFAULT_ZOOM) -> rasterio.Affine:
    """Affine transform of a size x size pixel grid over the tile, in EPSG:3857."""
    return rasterio.transform.from_bounds(*tile_bounds_3857(x, y, zoom), size, size)


def reproject_to_tile(
    dataset,
    x: int,
    y: int,
    *,
    bands: Sequence[int],
    zoom: int = DEFAULT_ZOOM,
    size: int = 128,
    resampling: str = "nearest",
    padding: float = 0.25,
    with_mask: bool = False,
    area_of_interest: str | None = None,
):
    """Warps bands of an open rasterio dataset onto tile (x, y): uint8 [size, size, len(bands)].

    `bands` are rasterio's 1-based band indexes, e.g. (1, 2, 3) for NAIP RGB and (4,) for NIR.
    Only the window covering the tile, grown by `padding` times the tile's extent on every side, is
    read. Output pixels with no valid source (outside the raster, or nodata) are 0.

    Validity is the dataset's own mask (GDAL's dataset mask: with a nodata value, a pixel is nodata
    only where *all* bands of the dataset equal it; an internal mask or alpha band is used as is),
    applied identically whichever bands are requested. So a real 0 in one band (NAIP NIR over
    water is often 0, and some NAIP files declare nodata=0) is kept as data and resampled as data,
    instead of being dropped band by band, which would make the NIR of a tile depend on whether it
    was fetched alone or with RGB. Real zeros therefore stay 0 in the output too; pass
    `with_mask=True` to also get the bool [size, size] mask of output pixels that had valid source.

    `area_of_interest` ("west,south,east,north" in degrees, see `area_of_interest`) is the area
    for which PROJ picks the coordinate operation. By default GDAL derives it from the source
    window, i.e. from each tile, and its coordinate-transformation cache then misses on every new
    tile (~2.5 ms a tile for NAD83 / UTM, a datum change); passing the dataset's area makes the
    choice once per dataset, the same whichever tiles are warped with it.
    """
    if isinstance(bands, int):
        raise TypeError("bands must be a sequence of 1-based band indexes, e.g. (1, 2, 3)")
    bands = [int(b) for b in bands]
    if not bands or any(b < 1 or b > dataset.count for b in bands):
        raise ValueError(f"bands {bands} must be 1-based indexes into the dataset's {dataset.count} bands")
    dtypes = {dataset.dtypes[b - 1] for b in bands}
    if dtypes != {"uint8"}:
        raise ValueError(f"reproject_to_tile needs uint8 bands, got {sorted(dtypes)}")
    if resampling not in RESAMPLING:
        raise ValueError(f"unknown resampling {resampling!r}; expected one of {sorted(RESAMPLING)}")
    if isinstance(size, bool) or int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    size = int(size)
    if not padding >= 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    if dataset.crs is None:
        raise ValueError("dataset has no CRS")

    n = len(bands)
    # Last band: the validity alpha (255 valid, 0 nodata), warped alongside the data.
    destination = np.zeros((n + 1, size, size), dtype=np.uint8)
    window = _source_window(dataset, x, y, zoom, padding)
    if window is not None:
        source = np.empty((n + 1, int(window.height), int(window.width)), dtype=np.uint8)
        source[:n] = dataset.read(bands, window=window)
        source[n] = dataset.dataset_mask(window=window)
        rasterio.warp.reproject(
            source=source,
            destination=destination,
            src_transform=dataset.window_transform(window),
            src_crs=dataset.crs,
            src_alpha=n + 1,
            dst_transform=tile_transform(x, y, size, zoom),
            dst_crs=WEB_MERCATOR,
            dst_alpha=n + 1,
            resampling=RESAMPLING[resampling],
            **({"AREA_OF_INTEREST": area_of_interest} if area_of_interest else {}),
        )
    valid = destination[n] > 0
    out = np.ascontiguousarray(destination[:n].transpose(1, 2, 0))
    out[~valid] = 0
    return (out, valid) if with_mask else out


def area_of_interest(dataset) -> str:
    """The dataset's extent in degrees as GDAL's AREA_OF_INTEREST option, "west,south,east,north"
    (for `reproject_to_tile(..., area_of_interest=...)`)."""
    if dataset.crs is None:
        raise ValueError("dataset has no CRS")
    west, south, east, north = rasterio.warp.transform_bounds(dataset.crs, "EPSG:4326", *dataset.bounds,
                                                              densify_pts=21)
    return ",".join(f"{v:.9f}" for v in (west, south, east, north))


def source_window(dataset, x: int, y: int, *, zoom: int = DEFAULT_ZOOM, padding: float = 0.25):
    """The window of `dataset` that `reproject_to_tile(dataset, x, y, zoom=zoom, padding=padding)`
    reads (a rasterio Window), or None when the padded tile misses the raster. Lets a caller plan
    which bytes a group of tiles needs before reading any."""
    _check_tile(x, y, zoom)
    if not padding >= 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return _source_window(dataset, x, y, zoom, padding)


def _source_window(dataset, x: int, y: int, zoom: int, padding: float):
    """The integer-aligned window of `dataset` under the padded tile, clipped to the raster, or None."""
    left, bottom, right, top = tile_bounds_in_crs(x, y, dataset.crs, zoom)
    pad_x, pad_y = (right - left) * padding, (top - bottom) * padding
    # Pixel coordinates of the padded box's corners; min/max also copes with flipped or rotated
    # (non north-up) geotransforms. Rounded outward to whole pixels.
    a, b, c, d, e, f = (~dataset.transform)[:6]
    xs = (left - pad_x, right + pad_x)
    ys = (bottom - pad_y, top + pad_y)
    cols = [a * cx + b * cy + c for cx in xs for cy in ys]
    rows = [d * cx + e * cy + f for cx in xs for cy in ys]
    col0, col1 = math.floor(min(cols)), math.ceil(max(cols))
    row0, row1 = math.floor(min(rows)), math.ceil(max(rows))
    col0, row0 = max(col0, 0), max(row0, 0)
    col1, row1 = min(col1, dataset.width), min(row1, dataset.height)
    if col1 <= col0 or row1 <= row0:
        return None
    return rasterio.windows.Window(col0, row0, col1 - col0, row1 - row0)


def _check_zoom(zoom: int) -> None:
    if isinstance(zoom, bool) or int(zoom) != zoom or not 0 <= zoom <= 30:
        raise ValueError(f"zoom must be an integer in [0, 30], got {zoom!r}")


def _check_tile(x: int, y: int, zoom: int) -> None:
    _check_zoom(zoom)
    n = 1 << zoom
    for name, v in (("x", x), ("y", y)):
        if isinstance(v, bool) or int(v) != v or not 0 <= v < n:
            raise ValueError(f"tile {name}={v!r} outside [0, {n - 1}] at zoom {zoom}")
