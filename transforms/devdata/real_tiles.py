"""Test helper: S2-NAIP-layout tiles built from real NAIP GeoTIFFs, with planted bad timesteps.

Not production code. The source is the set of real captures of one NAIP quarter quad (see the
`real_naip_dir` fixture in conftest.py); nothing built here may be committed to the project, so tests
build tiles into pytest tmp dirs at test time.

For each chosen Web-Mercator zoom-17 tile fully inside every capture's footprint:

* HR: the `hr_date` capture warped onto the tile at 128x128 -> naip/<naip_id>/<x>_<y>/rgb.png (RGB)
  and nir.png (L) next to it (or under `nir_root`).
* LR series: every other capture (and the HR's own date when `include_hr_date`), warped to 32x32
  with `average` resampling (~6.5 m ground pixels, Sentinel-2-like), with a mild per-capture,
  per-band gain/offset and a little noise as the Sentinel-2 domain gap, clipped to 1..255 like a
  Sentinel-2 TCI (where 0 means nodata) -> sentinel2/<x>_<y>/tci.png [T*32, 32, 3] and b08.png
  [T*32, 32].
* Planted bad timesteps, each derived from one clean capture: `black_border` (a swath-edge wedge of
  exact zeros in all channels along one side), `cloudy` (thick bright clouds over >= 40% of the
  area, plus their shadows) and `dark` (strongly underexposed, never 0).
* The series order is shuffled deterministically (S2-NAIP series are not chronological);
  `RealTile` records what each index of the written series is.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import rasterio
import rasterio.warp
from PIL import Image
from scipy import ndimage

from transforms import tiles
from transforms.nir import geo

BLACK_BORDER = "black_border"
CLOUDY = "cloudy"
DARK = "dark"
CONDITIONS = (BLACK_BORDER, CLOUDY, DARK)
DEFAULT_PLANT = {BLACK_BORDER: 1, CLOUDY: 1, DARK: 1}

HR_SIZE = 128
LR_SIZE = 32
HR_BANDS = (1, 2, 3, 4)  # NAIP R, G, B, NIR
LR_BANDS = (1, 2, 3, 4)

CAPTURE_FILE = re.compile(
    r"(?P<naip_id>(?P<quad>m_[0-9]{7}_(?:ne|nw|se|sw)_[0-9]{2}_[0-9a-z]{1,4})_(?P<date>[0-9]{8}))\.tif"
)


@dataclasses.dataclass(frozen=True)
class RealTile:
    """What was written for one tile. All indices are positions in the written (shuffled) series."""

    tile_id: str  # "<naip_id>/<x>_<y>", naip_id of the HR capture
    planted: dict[int, str]  # index -> condition (BLACK_BORDER, CLOUDY, DARK)
    capture_of_index: dict[int, str]  # index -> YYYYMMDD of the capture it shows (or was derived from)
    clean_indices: tuple[int, ...]  # sorted
    hr_date_index: int | None  # the clean timestep of the HR's own capture date, if included
    n_timesteps: int

    @property
    def tile(self) -> tiles.TileId:
        return tiles.TileId.parse(self.tile_id)


def list_captures(naip_dir) -> dict[str, Path]:
    """{YYYYMMDD: path} of the NAIP captures (m_<quad>_<q>_<zone>_<res>_<date>.tif) in `naip_dir`."""
    captures: dict[str, Path] = {}
    quads = set()
    for path in sorted(Path(naip_dir).iterdir()):
        m = CAPTURE_FILE.fullmatch(path.name)
        if not m:
            continue
        if not tiles.NAIP_ID_PATTERN.fullmatch(m["naip_id"]):
            raise ValueError(f"{path.name}: not a NAIP capture id")
        if m["date"] in captures:
            raise ValueError(f"two captures dated {m['date']} in {naip_dir}")
        captures[m["date"]] = path
        quads.add(m["quad"])
    if not captures:
        raise FileNotFoundError(f"no NAIP GeoTIFFs (m_*.tif) in {naip_dir}")
    if len(quads) != 1:
        raise ValueError(f"captures of several quads in {naip_dir}: {sorted(quads)}")
    return captures


def usable_tiles(datasets, zoom: int = geo.DEFAULT_ZOOM, margin_px: float = 2.0) -> list[tuple[int, int]]:
    """Zoom-17 tiles fully inside every dataset's raster, `margin_px` source pixels from its edges.

    Candidates are the tiles inside the intersection of the footprints' EPSG:3857 bounding boxes;
    since a UTM rectangle is slightly rotated against Web Mercator, each candidate is then checked
    against every raster in that raster's own CRS.
    """
    datasets = list(datasets)
    boxes = [
        rasterio.warp.transform_bounds(ds.crs, geo.WEB_MERCATOR, *ds.bounds, densify_pts=21)
        for ds in datasets
    ]
    inter = (
        max(b[0] for b in boxes),
        max(b[1] for b in boxes),
        min(b[2] for b in boxes),
        min(b[3] for b in boxes),
    )
    if inter[0] >= inter[2] or inter[1] >= inter[3]:
        return []
    out = []
    for x, y in geo.tiles_covering(inter, zoom):
        inside = True
        for ds in datasets:
            l, b, r, t = geo.tile_bounds_in_crs(x, y, ds.crs, zoom)
            mx, my = margin_px * abs(ds.res[0]), margin_px * abs(ds.res[1])
            db = ds.bounds
            if not (l >= db.left + mx and r <= db.right - mx and b >= db.bottom + my and t <= db.top - my):
                inside = False
                break
        if inside:
            out.append((x, y))
    return out


def build_real_tiles(
    out_dir,
    naip_dir,
    *,
    hr_date: str = "20190904",
    n_tiles: int = 20,
    seed: int = 0,
    include_hr_date: bool = True,
    plant: Mapping[str, int] = DEFAULT_PLANT,
    nir_root=None,
    hr_resampling: str = "bilinear",
) -> list[RealTile]:
    """Builds `n_tiles` S2-NAIP-layout tiles under `out_dir` (NIR under `nir_root`, default `out_dir`).

    Tiles are drawn at random (by `seed`) from `usable_tiles`; a tile whose HR or LR warps are not
    entirely valid data, or whose HR has a pure black pixel, is passed over for the next one.
    `plant` gives how many timesteps of each condition every tile gets. Deterministic in `seed`.
    """
    if unknown := set(plant) - set(CONDITIONS):
        raise ValueError(f"unknown conditions {sorted(unknown)}; expected {CONDITIONS}")
    if any(int(k) < 0 for k in plant.values()):
        raise ValueError("plant counts must be >= 0")
    captures = list_captures(naip_dir)
    if hr_date not in captures:
        raise ValueError(f"no capture dated {hr_date} in {naip_dir}; have {sorted(captures)}")
    lr_dates = [d for d in sorted(captures) if include_hr_date or d != hr_date]
    if not lr_dates:
        raise ValueError("no captures left for the Sentinel-2 series")
    hr_naip_id = captures[hr_date].name[: -len(".tif")]
    out_dir = os.fspath(out_dir)
    nir_root = out_dir if nir_root is None else os.fspath(nir_root)

    # Domain gap per capture (one Sentinel-2 scene per date), the same for every tile.
    gaps = {d: _domain_gap(np.random.default_rng([seed, int(d)])) for d in lr_dates}

    built: list[RealTile] = []
    with contextlib.ExitStack() as stack:
        datasets = {d: stack.enter_context(rasterio.open(p)) for d, p in captures.items()}
        candidates = usable_tiles(datasets.values())
        if n_tiles > len(candidates):
            raise ValueError(f"only {len(candidates)} usable tiles in {naip_dir}, {n_tiles} requested")
        order = np.random.default_rng(seed).permutation(len(candidates))
        for k in order:
            if len(built) == n_tiles:
                break
            x, y = candidates[k]
            tile = _build_tile(
                out_dir, nir_root, datasets, hr_naip_id, hr_date, lr_dates, gaps, x, y,
                plant, hr_resampling, np.random.default_rng([seed, x, y]),
            )
            if tile is not None:
                built.append(tile)
    if len(built) < n_tiles:
        raise ValueError(f"only {len(built)} usable tiles in {naip_dir}, {n_tiles} requested")
    return built


def _build_tile(
    out_dir, nir_root, datasets, hr_naip_id, hr_date, lr_dates, gaps, x, y, plant, hr_resampling, rng
):
    hr, valid = geo.reproject_to_tile(
        datasets[hr_date], x, y, bands=HR_BANDS, size=HR_SIZE, resampling=hr_resampling, with_mask=True
    )
    if not valid.all() or (hr[..., :3] == 0).all(axis=-1).any():
        return None
    clean = []  # (date, [32, 32, 4] uint8 RGBN)
    for date in lr_dates:
        lr, valid = geo.reproject_to_tile(
            datasets[date], x, y, bands=LR_BANDS, size=LR_SIZE, resampling="average", with_mask=True
        )
        if not valid.all():
            return None
        clean.append((date, _apply_gap(lr, gaps[date], rng)))

    # Items in "original" order: the clean captures by date, then the planted ones.
    items = [(None, date, img) for date, img in clean]
    # Planted timesteps are derived from captures other than the HR's own date where possible.
    sources = [i for i, (date, _) in enumerate(clean) if date != hr_date] or list(range(len(clean)))
    for condition in CONDITIONS:
        for _ in range(int(plant.get(condition, 0))):
            date, img = clean[int(rng.choice(sources))]
            items.append((condition, date, _PLANTERS[condition](img, rng)))

    perm = rng.permutation(len(items))
    series = np.stack([items[i][2] for i in perm])  # [T, 32, 32, 4]
    planted = {k: items[i][0] for k, i in enumerate(perm) if items[i][0] is not None}
    capture_of_index = {k: items[i][1] for k, i in enumerate(perm)}
    clean_indices = tuple(k for k, i in enumerate(perm) if items[i][0] is None)
    hr_date_index = next((k for k in clean_indices if capture_of_index[k] == hr_date), None)

    tid = tiles.TileId(hr_naip_id, x, y)
    tiles.TileId.parse(str(tid))  # the id must be one the pipeline accepts
    write_png(tiles.hr_rgb_path(out_dir, tid), hr[..., :3])
    write_png(tiles.hr_nir_path(nir_root, tid), hr[..., 3])
    t = len(series)
    write_png(tiles.s2_band_path(out_dir, tid, "tci"), series[..., :3].reshape(t * LR_SIZE, LR_SIZE, 3))
    write_png(tiles.s2_band_path(out_dir, tid, "b08"), series[..., 3].reshape(t * LR_SIZE, LR_SIZE))
    return RealTile(
        tile_id=str(tid),
        planted=planted,
        capture_of_index=capture_of_index,
        clean_indices=clean_indices,
        hr_date_index=hr_date_index,
        n_timesteps=t,
    )


def write_png(path, array: np.ndarray) -> None:
    """uint8 [H, W, 3] -> an RGB PNG, [H, W] -> an L PNG; no palette, alpha or metadata."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"PNG data must be uint8, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"PNG data must be [H, W] or [H, W, 3], got {array.shape}")
    image = Image.fromarray(array)
    assert image.mode == ("L" if array.ndim == 2 else "RGB"), image.mode
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    image.save(path, format="PNG", compress_level=6)


# ---------------------------------------------------------------- Sentinel-2 look and bad timesteps


def _domain_gap(rng) -> tuple[np.ndarray, np.ndarray]:
    """Per-band (gain, offset) for R, G, B, NIR: a slightly flatter, hazier, bluer look than NAIP."""
    gain = rng.uniform([0.85, 0.85, 0.9, 0.9], [1.0, 1.0, 1.05, 1.05])
    offset = rng.uniform([4.0, 4.0, 8.0, 0.0], [14.0, 14.0, 20.0, 8.0])
    return gain, offset


def _apply_gap(rgbn: np.ndarray, gap, rng) -> np.ndarray:
    gain, offset = gap
    out = rgbn.astype(np.float64) * gain + offset + rng.normal(0.0, 1.0, rgbn.shape)
    return _to_s2_uint8(out)


def _to_s2_uint8(values: np.ndarray) -> np.ndarray:
    # Sentinel-2 TCI reserves 0 for nodata: valid pixels are 1..255.
    return np.clip(np.rint(values), 1, 255).astype(np.uint8)


def swath_edge_mask(rng, size: int = LR_SIZE) -> np.ndarray:
    """A wedge along one side: depth varies linearly along the side, from ~0-4 px to 8-20 px."""
    near, far = rng.uniform(0.0, 4.0), rng.uniform(8.0, 20.0)
    if rng.random() < 0.5:
        near, far = far, near
    along = np.arange(size)
    depth = near + (far - near) * along / (size - 1)  # depth at each position along the side
    across = np.arange(size)
    wedge = across[None, :] < depth[:, None]  # [along, across], side at across=0
    side = int(rng.integers(4))
    if side == 0:  # left
        mask = wedge
    elif side == 1:  # right
        mask = wedge[:, ::-1]
    elif side == 2:  # top
        mask = wedge.T
    else:  # bottom
        mask = wedge.T[::-1, :]
    return np.ascontiguousarray(mask)


def _plant_black_border(img: np.ndarray, rng) -> np.ndarray:
    out = img.copy()
    out[swath_edge_mask(rng)] = 0  # exact zeros, all channels
    return out


def cloud_alpha(rng, size: int = LR_SIZE, cover: float | None = None) -> np.ndarray:
    """Cloud opacity in [0, 1]: smooth blobs, opaque in their cores, >= 0.5 over `cover` of the area."""
    cover = rng.uniform(0.45, 0.75) if cover is None else cover
    pad = size // 2
    field = ndimage.gaussian_filter(rng.standard_normal((size + 2 * pad,) * 2), sigma=3.0)
    field = field[pad:-pad, pad:-pad]
    threshold = np.quantile(field, 1.0 - cover)
    soft = 0.15 * field.std()
    return np.clip(0.5 + (field - threshold) / (2 * soft), 0.0, 1.0)


def _plant_cloudy(img: np.ndarray, rng) -> np.ndarray:
    alpha = cloud_alpha(rng)
    # Shadows: the cloud shape displaced away from the sun, darkening the ground it falls on.
    dy, dx = (int(rng.integers(3, 7)) * int(rng.choice([-1, 1])) for _ in range(2))
    shadow = ndimage.shift(alpha, (dy, dx), order=0, mode="constant", cval=0.0)
    ground = img.astype(np.float64) * (1.0 - 0.55 * shadow)[..., None]
    texture = ndimage.gaussian_filter(rng.standard_normal(alpha.shape), 1.5)
    texture = 6.0 * texture / (texture.std() + 1e-9)
    cloud = np.empty_like(ground)
    cloud[..., :3] = rng.uniform(225, 248) + texture[..., None] + rng.uniform(-3, 3, 3)
    cloud[..., 3] = rng.uniform(215, 240) + texture
    out = alpha[..., None] * cloud + (1.0 - alpha[..., None]) * ground
    return _to_s2_uint8(out)


def _plant_dark(img: np.ndarray, rng) -> np.ndarray:
    return _to_s2_uint8(img.astype(np.float64) * rng.uniform(0.12, 0.3))


_PLANTERS = {BLACK_BORDER: _plant_black_border, CLOUDY: _plant_cloudy, DARK: _plant_dark}
