"""A deterministic, procedural S2-NAIP-layout sample: NAIP/Sentinel-2 tiles with planted defects.

`generate_sample` writes, under a local `output_dir`, the folder layout S2-NAIP uses:

    naip/<naip_id>/<x>_<y>/rgb.png     128x128 RGB uint8 (NAIP red, green, blue)
    naip/<naip_id>/<x>_<y>/nir.png     128x128 L uint8 (NAIP near infrared)
    sentinel2/<x>_<y>/tci.png          [T*32, 32, 3] uint8, timestep t = rows t*32:(t+1)*32
    sentinel2/<x>_<y>/b08.png          [T*32, 32] L uint8 (clip(raw // 32, 0, 255))
    sentinel2/<x>_<y>/b01|b10|b11|b12.png   only with extra_bands=True, same layout as b08
    sample_truth.jsonl                 one JSON line per tile: what was planted
    manifest.txt                       one tile id per line

so the pipeline runs anywhere without downloads, and the benchmark can make thousands of tiles fast.

Every tile is drawn from its own `numpy.random.default_rng([seed, tile_index])` (plus a few helper
streams keyed by `(seed, capture)` / `(seed, window)` that also depend only on the tile index), so
tile i is the same whatever `n_tiles`, `workers` or `extra_bands` are, and two runs with the same
arguments write byte-identical files.

The scene is procedural and linear in its parts: a 128x128 tile is a stack of weight maps (one
vegetation and one soil layer per field, water, roads, roofs) times per-date spectra in 7 bands
(R, G, B, NIR, B01, B11, B12). NAIP is that mix at the capture date with NAIP radiometry; each
Sentinel-2 timestep is the mix at its own date, area-averaged 4x to 32x32 (downsampling is linear,
so the weight maps are downsampled once), then passed through an atmosphere, one condition (clear,
cloud, thin cloud, haze, shadow, dark, snow, black swath border) and Sentinel-2 radiometry.

Legitimate values are clipped to >= 1 everywhere: exact 0 in all channels only appears where a
black border (HR strip, in rgb.png and nir.png, or Sentinel-2 swath edge, in every band) was planted.

Planted tile defects (one of each in every window of 30 consecutive tiles): naip_black_border,
missing_s2 (no sentinel2/<x>_<y> folder), missing_nir, missing_band (tci.png without b08.png) and
no_valid_timesteps (every timestep has a black border). Each `sample_truth.jsonl` line is

    {"tile_id": "<naip_id>/<x>_<y>", "kind": "ok" | <defect>,
     "timesteps": [{"index": t, "condition": <one of CONDITIONS>, "day_offset": <days from NAIP>}, ...],
     "clear_indices": [...], "nearest_index": <timestep closest to the NAIP date> | null,
     "hr_date": "YYYY-MM-DD"}

(`timesteps` is empty for missing_s2). Every tile but no_valid_timesteps has >= 3 clear timesteps,
and its timestep closest to the NAIP date (within 5 days, unique) is clear.

PNGs are written by `encode_png`, a small standard-PNG writer (Up filter, Huffman-only deflate)
that is ~3x faster than Pillow's encoder at about the same size; Pillow reads them back as usual.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import struct
import time
import zlib
from functools import lru_cache

import numpy as np

from transforms import tiles

HR_SIZE = 128
LR_SIZE = 32
SCALE = HR_SIZE // LR_SIZE
PNG_COMPRESS_LEVEL = 1

TRUTH_FILE = "sample_truth.jsonl"
MANIFEST_FILE = "manifest.txt"

# Tiles of one NAIP capture form a CAPTURE_SIDE x CAPTURE_SIDE block of adjacent zoom-17 tiles.
CAPTURE_SIDE = 10
TILES_PER_CAPTURE = CAPTURE_SIDE * CAPTURE_SIDE
# Every DEFECT_WINDOW consecutive tiles hold exactly one tile of each defect (3.3% each).
DEFECT_WINDOW = 30

KINDS = ("ok", "naip_black_border", "missing_s2", "missing_nir", "missing_band", "no_valid_timesteps")
DEFECTS = KINDS[1:]
CONDITIONS = ("clear", "cloud", "thin_cloud", "shadow", "dark", "snow", "black_border", "haze")
EXTRA_BANDS = ("b01", "b10", "b11", "b12")
MIN_CLEAR = 3

# Per-timestep condition probabilities (snow only on winter dates, where it takes from "clear").
_P_COND = {"clear": 0.50, "cloud": 0.16, "thin_cloud": 0.08, "shadow": 0.05, "dark": 0.04,
           "snow": 0.0, "black_border": 0.09, "haze": 0.08}
_P_SNOW_WINTER = 0.15

# ---------------------------------------------------------------------------------------------
# Spectra, surface reflectance in bands R, G, B, NIR, B01 (aerosol), B11, B12 (SWIR).
_R, _G, _B, _N, _B01, _B11, _B12 = range(7)
N_BANDS = 7
_GREEN = np.array([0.035, 0.075, 0.030, 0.45, 0.035, 0.22, 0.10])
_DRY = np.array([0.17, 0.15, 0.095, 0.27, 0.085, 0.34, 0.25])
_FOREST = np.array([0.028, 0.050, 0.024, 0.33, 0.028, 0.16, 0.07])
_SOILS = np.array([
    [0.12, 0.10, 0.070, 0.18, 0.060, 0.26, 0.21],   # dark loam
    [0.28, 0.25, 0.200, 0.33, 0.160, 0.40, 0.34],   # light sand
    [0.23, 0.14, 0.090, 0.27, 0.080, 0.37, 0.31],   # red clay
])
_LITTER = np.array([0.09, 0.08, 0.06, 0.20, 0.05, 0.24, 0.17])
_WATER = np.array([0.030, 0.050, 0.060, 0.012, 0.070, 0.006, 0.004])
_TURBID = np.array([0.070, 0.085, 0.070, 0.030, 0.080, 0.010, 0.006])
_ROADS = np.array([
    [0.09, 0.09, 0.09, 0.11, 0.09, 0.13, 0.12],     # asphalt
    [0.27, 0.27, 0.25, 0.30, 0.24, 0.32, 0.30],     # concrete
    [0.25, 0.21, 0.16, 0.29, 0.14, 0.36, 0.30],     # dirt
])
_ROOFS = np.array([
    [0.46, 0.46, 0.45, 0.45, 0.40, 0.45, 0.40],     # white / light
    [0.25, 0.12, 0.09, 0.25, 0.08, 0.30, 0.28],     # red tiles
    [0.15, 0.15, 0.16, 0.17, 0.14, 0.19, 0.17],     # dark shingles
    [0.34, 0.36, 0.38, 0.35, 0.33, 0.29, 0.24],     # metal
])
_SNOW = np.array([0.86, 0.88, 0.90, 0.70, 0.90, 0.06, 0.04])
_CLOUD = np.array([0.74, 0.76, 0.79, 0.71, 0.80, 0.52, 0.38])
_THIN = np.array([0.55, 0.57, 0.60, 0.55, 0.62, 0.40, 0.30])
# Atmosphere: path radiance per unit aerosol depth and extinction factor per band.
_PATH = np.array([0.012, 0.020, 0.035, 0.006, 0.055, 0.001, 0.0005])
_EXT = np.array([0.5, 0.7, 1.0, 0.25, 1.3, 0.05, 0.03])

# Sentinel-2 TCI radiometry (R, G, B): dn = 255 * clip(toa * gain, 0, 1) ** gamma. Darker than NAIP.
_S2_GAIN = np.array([2.6, 2.5, 2.3])
_S2_GAMMA = np.array([0.90, 0.92, 0.88])
# Sentinel-2 single bands as S2-NAIP scales them: clip(raw // 32, 0, 255), raw = reflectance * 1e4.
_RAW_SCALE = 10000.0 / 32.0
_LUT_SIZE = 8192

_CLASS_CROP, _CLASS_PASTURE, _CLASS_FOREST, _CLASS_FALLOW = range(4)


@dataclasses.dataclass
class SampleSummary:
    """What `generate_sample` wrote; the per-defect counts are numbers of tiles."""
    output_dir: str
    seed: int
    tile_ids: list[str]
    truth_path: str
    manifest_path: str
    ok: int = 0
    naip_black_border: int = 0
    missing_s2: int = 0
    missing_nir: int = 0
    missing_band: int = 0
    no_valid_timesteps: int = 0
    conditions: dict[str, int] = dataclasses.field(default_factory=dict)
    timesteps_total: int = 0
    extra_bands: bool = False
    seconds: float = 0.0

    @property
    def n_tiles(self) -> int:
        return len(self.tile_ids)

    @property
    def defects(self) -> dict[str, int]:
        return {kind: getattr(self, kind) for kind in DEFECTS}

    def line(self) -> str:
        rate = self.n_tiles / self.seconds if self.seconds > 0 else float("inf")
        defects = " ".join(f"{k}={v}" for k, v in self.defects.items())
        return (f"wrote {self.n_tiles} tiles ({self.ok} ok, {defects}; {self.timesteps_total} timesteps) "
                f"to {self.output_dir} in {self.seconds:.1f}s ({rate:.0f} tiles/s); truth {self.truth_path}")


# ---------------------------------------------------------------------------------------------
# Geography: which NAIP capture and which zoom-17 tile a tile index is.

_CELL_DEG = 1.0 / 16.0      # a NAIP quarter quad is 3.75' x 3.75'
_GRID_COLS = 48             # 84W..81W: three degrees of quarter quads, all in UTM zone 17
_GRID_LAT0 = 27.0           # north edge of the first row; rows go south
_GRID_LON0 = -84.0


def _lon2x(lon: float) -> float:
    return (lon + 180.0) / 360.0 * 2**tiles.ZOOM


def _lat2y(lat: float) -> float:
    return (1.0 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2.0 * 2**tiles.ZOOM


@dataclasses.dataclass(frozen=True)
class _Capture:
    naip_id: str
    x0: int
    y0: int
    date: datetime.date
    gain: tuple[float, float, float, float]     # NAIP R, G, B, NIR
    gamma: tuple[float, float, float, float]


@lru_cache(maxsize=1024)
def _capture(seed: int, block: int) -> _Capture:
    """The NAIP quarter-quad capture of tile block `block`: id, tile origin, date, radiometry.

    Block b is the quarter-quad cell (row b // 48, column b % 48) of a grid starting at 27N 84W; the
    id's quad, quarter and UTM zone are those of the cell's centre, and its 10x10 tiles lie strictly
    inside the cell, so (x, y) is unique across blocks.
    """
    row, col = divmod(block, _GRID_COLS)
    lat_n = _GRID_LAT0 - row * _CELL_DEG
    lat_s = lat_n - _CELL_DEG
    lon_w = _GRID_LON0 + col * _CELL_DEG
    lon_e = lon_w + _CELL_DEG
    if lat_s < 1.0:
        raise ValueError(f"tile block {block} is beyond the sample's grid")
    lat_c, lon_c = lat_n - _CELL_DEG / 2, lon_w + _CELL_DEG / 2
    lat_deg, lon_deg = math.floor(lat_c), math.floor(-lon_c)       # SE corner of the 1-degree block
    r16 = math.floor((lat_deg + 1 - lat_c) * 16)                    # quarter-quad row from the north
    c16 = math.floor((lon_c + lon_deg + 1) * 16)                    # quarter-quad column from the west
    quad = (r16 // 2) * 8 + (c16 // 2) + 1
    quarter = ("n" if r16 % 2 == 0 else "s") + ("w" if c16 % 2 == 0 else "e")
    zone = int((lon_c + 180.0) // 6.0) + 1

    rng = np.random.default_rng([seed, block, 1, 0xB10C])
    year = int(rng.choice([2019, 2020, 2021]))
    date = datetime.date(year, 1, 1) + datetime.timedelta(days=int(rng.integers(100, 331)) - 1)
    naip_id = f"m_{lat_deg:02d}{lon_deg:03d}{quad:02d}_{quarter}_{zone:02d}_060_{date:%Y%m%d}"

    xw, xe = math.ceil(_lon2x(lon_w)), math.floor(_lon2x(lon_e))
    yn, ys = math.ceil(_lat2y(lat_n)), math.floor(_lat2y(lat_s))
    x0 = xw + int(rng.integers(0, xe - xw - CAPTURE_SIDE + 1))
    y0 = yn + int(rng.integers(0, ys - yn - CAPTURE_SIDE + 1))
    gain = tuple(float(g) for g in np.array([3.1, 3.0, 3.3, 1.7]) * rng.uniform(0.9, 1.1, 4))
    gamma = tuple(float(g) for g in np.array([0.70, 0.72, 0.68, 0.80]) + rng.uniform(-0.04, 0.04, 4))
    return _Capture(naip_id, x0, y0, date, gain, gamma)


def tile_id_for(seed: int, index: int) -> tiles.TileId:
    """The tile id of tile `index` of the sample with `seed`."""
    block, pos = divmod(index, TILES_PER_CAPTURE)
    cap = _capture(seed, block)
    dy, dx = divmod(pos, CAPTURE_SIDE)
    return tiles.TileId(cap.naip_id, cap.x0 + dx, cap.y0 + dy)


@lru_cache(maxsize=256)
def _window_defects(seed: int, window: int) -> tuple[int, ...]:
    rng = np.random.default_rng([seed, window, 2, 0xDEFEC7])
    return tuple(int(p) for p in rng.permutation(DEFECT_WINDOW)[:len(DEFECTS)])


def tile_kind(seed: int, index: int) -> str:
    """"ok" or the defect planted in tile `index`: each window of 30 tiles has one of each defect."""
    window, pos = divmod(index, DEFECT_WINDOW)
    positions = _window_defects(seed, window)
    if pos in positions:
        return DEFECTS[positions.index(pos)]
    return "ok"


# ---------------------------------------------------------------------------------------------
# Noise. Everything below is float32 and BLAS-free (gathers, bincount, einsum): a multithreaded
# BLAS is slow for these small shapes, and its results may depend on the thread count.

_F32 = np.float32


@lru_cache(maxsize=None)
def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HR pixel-centre coordinates xx, yy [128, 128] and each HR pixel's flat LR pixel index."""
    yy, xx = np.mgrid[0:HR_SIZE, 0:HR_SIZE].astype(_F32) + _F32(0.5)
    lr = np.arange(HR_SIZE) // SCALE
    lrpix = (lr[:, None] * LR_SIZE + lr[None, :]).ravel()
    for arr in (xx, yy, lrpix):
        arr.flags.writeable = False
    return xx, yy, lrpix


@lru_cache(maxsize=None)
def _interp_weights(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and smoothstep weights that interpolate n_in grid nodes onto n_out pixel centres."""
    pos = (np.arange(n_out) + 0.5) / n_out * (n_in - 1)
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, n_in - 2)
    f = pos - i0
    f = f * f * (3.0 - 2.0 * f)
    return i0, (1.0 - f).astype(_F32)[:, None], f.astype(_F32)[:, None]


def _fractal(rng: np.random.Generator, batch: int, size: int, cells: tuple[int, ...],
             persistence: float = 0.55) -> np.ndarray:
    """[batch, size, size] value noise summed over octaves of `cells` grid cells, mean ~0.5.

    Separable smoothstep interpolation by row gathers; the second pass runs on the transposed
    array (noise is isotropic, so the output's orientation does not matter).
    """
    out = np.zeros((batch, size, size), dtype=_F32)
    amp, total = 1.0, 0.0
    for c in cells:
        i0, w0, w1 = _interp_weights(size, c + 1)
        g = rng.random((batch, c + 1, c + 1), dtype=_F32)
        a = g[:, i0, :] * w0 + g[:, i0 + 1, :] * w1                  # [batch, size, c + 1]
        a = np.ascontiguousarray(a.transpose(0, 2, 1))               # [batch, c + 1, size]
        out += (a[:, i0, :] * (w0 * _F32(amp)) + a[:, i0 + 1, :] * (w1 * _F32(amp)))
        total += amp
        amp *= persistence
    out *= _F32(1.0 / total)
    return out


def _stretch(n: np.ndarray) -> np.ndarray:
    """Per-image rescale of [batch, h, w] noise to [0, 1]."""
    lo = n.min(axis=(1, 2), keepdims=True)
    hi = n.max(axis=(1, 2), keepdims=True)
    return (n - lo) / np.maximum(hi - lo, _F32(1e-6))


def _coverage_masks(n: np.ndarray, coverage: np.ndarray, softness: float) -> np.ndarray:
    """Soft masks of the `coverage[i]` fraction of highest values of each noise image n[i] ([k, h, w])."""
    k = n.shape[0]
    flat = np.sort(n.reshape(k, n.shape[1] * n.shape[2]), axis=1)
    npix = flat.shape[1]
    pos = np.minimum(npix - 1, ((1.0 - np.asarray(coverage, dtype=np.float64)) * npix).astype(np.intp))
    thr = flat[np.arange(k), pos]
    return np.clip((n - thr[:, None, None]) * _F32(1.0 / softness) + _F32(0.5), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Scene: the NAIP-date reflectance, and the scene's parts (weight maps downsampled to the LR grid,
# spectra per date) from which every Sentinel-2 timestep is mixed.

def _circ_days(doy: np.ndarray, ref: float) -> np.ndarray:
    return (doy - ref + 182.5) % 365.0 - 182.5


def _phenology(rng: np.random.Generator, cls: int, doys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vegetation fraction v and senescent share s per date for one field of class `cls`."""
    if cls == _CLASS_CROP:
        peak, width = rng.uniform(140, 260), rng.uniform(25, 45)
        v0, amp = rng.uniform(0.02, 0.10), rng.uniform(0.75, 0.97)
        dd = _circ_days(doys, peak)
        bump = np.exp(-0.5 * (dd / width) ** 2)
        v = v0 + (amp - v0) * bump
        sen = 1.0 / (1.0 + np.exp(-(dd - 0.5 * width) / (0.25 * width)))
        if rng.random() < 0.3:      # double cropping: a second, smaller season
            dd2 = _circ_days(doys, peak + rng.uniform(110, 150))
            v = np.maximum(v, v0 + (0.7 * amp - v0) * np.exp(-0.5 * (dd2 / width) ** 2))
        return v, sen * (1.0 - 0.5 * bump)
    season = np.cos(2 * np.pi * _circ_days(doys, rng.uniform(170, 220)) / 365.0)   # 1 in summer
    if cls == _CLASS_PASTURE:
        v = rng.uniform(0.5, 0.7) + rng.uniform(0.1, 0.25) * season
        return v, 0.35 * (1.0 - season) / 2.0
    if cls == _CLASS_FOREST:
        if rng.random() < 0.4:      # deciduous: leaves on from about April to October
            leaf_on = 1.0 / (1.0 + np.exp((np.abs(_circ_days(doys, 200)) - 100.0) / 12.0))
            return 0.35 + 0.55 * leaf_on, 0.4 * (1.0 - leaf_on)
        return rng.uniform(0.8, 0.93) + 0.04 * season, np.zeros_like(doys)
    v = rng.uniform(0.03, 0.15) + 0.08 * (season + 1.0) / 2.0        # fallow: sparse weeds
    return v, np.full_like(doys, 0.5)


def _field_labels(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, float, list]:
    """Field partition of the tile: rotated rectangular plots or Voronoi polygons.

    Returns labels [128, 128] (0..n-1, all present), the dominant orientation, and candidate road
    lines (x, y, angle) along field boundaries.
    """
    theta = rng.uniform(-0.25, 0.25) if rng.random() < 0.6 else rng.uniform(0, np.pi)
    c, s = _F32(math.cos(theta)), _F32(math.sin(theta))
    u = (xx - 64) * c + (yy - 64) * s
    v = (yy - 64) * c - (xx - 64) * s
    lines = []
    if rng.random() < 0.6:
        n_strips = int(rng.integers(1, 4))
        ucuts = np.sort(rng.uniform(-60, 60, n_strips)).astype(_F32)
        strip = np.searchsorted(ucuts, u)
        n_cuts = int(rng.integers(1, 3))
        vcuts = np.sort(rng.uniform(-70, 70, (n_strips + 1, n_cuts)), axis=1).astype(_F32)
        labels = strip * (n_cuts + 1)
        for j in range(n_cuts):
            labels += v > np.take(vcuts[:, j], strip)
        for uc in ucuts:            # roads run along strip boundaries
            lines.append((64 + float(uc) * math.cos(theta), 64 + float(uc) * math.sin(theta), theta + np.pi / 2))
    else:
        n = int(rng.integers(3, 10))
        pts = rng.uniform(-20, 148, (n, 2))
        stretch = rng.uniform(0.5, 2.0)
        pu = ((pts[:, 0] - 64) * math.cos(theta) + (pts[:, 1] - 64) * math.sin(theta)).astype(_F32)
        pv = ((pts[:, 1] - 64) * math.cos(theta) - (pts[:, 0] - 64) * math.sin(theta)).astype(_F32)
        d = (u[None] - pu[:, None, None]) ** 2 * _F32(stretch) + (v[None] - pv[:, None, None]) ** 2 * _F32(1 / stretch)
        labels = np.argmin(d, axis=0)
        lines.append((rng.uniform(20, 108), rng.uniform(20, 108), rng.uniform(0, np.pi)))
    present = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1) > 0
    labels = np.take(np.cumsum(present) - 1, labels)
    return labels, theta, lines


@dataclasses.dataclass
class _Scene:
    hr: np.ndarray              # [4, 128, 128] reflectance R, G, B, NIR at the NAIP date
    parts: np.ndarray           # [C, 1024] weight of each part in each LR pixel
    spectra: np.ndarray         # [T, C, 7] each part's reflectance at each Sentinel-2 date
    snow_ok: np.ndarray         # [32, 32] fraction of land that can hold snow (not road/water)
    forest: np.ndarray          # [32, 32] forest canopy fraction (hides snow)


def _lr_sums(maps: list[tuple[np.ndarray, np.ndarray | None, int]]) -> np.ndarray:
    """Area-average HR maps into the LR grid, each split by a group map: [sum of n_groups, 1024].

    `maps` holds (values [128, 128], groups [128, 128] in 0..n_groups-1 or None, n_groups); one
    bincount does them all.
    """
    _, _, lrpix = _grid()
    npix = LR_SIZE * LR_SIZE
    idx, weights, offset = [], [], 0
    for values, groups, n_groups in maps:
        idx.append(lrpix + offset if groups is None else groups.ravel() * npix + (lrpix + offset))
        weights.append(values.ravel())
        offset += n_groups * npix
    out = np.bincount(np.concatenate(idx), weights=np.concatenate(weights), minlength=offset)
    return (out * (1.0 / SCALE**2)).astype(_F32).reshape(-1, npix)


def _scene(rng: np.random.Generator, doys: np.ndarray) -> _Scene:
    """The tile's scene; `doys` are the day of year of each Sentinel-2 timestep, then of the NAIP."""
    xx, yy, _ = _grid()
    labels, theta, lines = _field_labels(rng, xx, yy)
    n_fields = int(labels.max()) + 1
    n_dates = len(doys)

    lf = _fractal(rng, 2, HR_SIZE, (3, 6, 12))
    hf = _stretch(_fractal(rng, 1, HR_SIZE, (16, 32, 64), 0.7))[0]
    lfc = (lf[0] - _F32(0.5)) * _F32(2.0)

    # Per-field land cover and texture parameters, looked up per pixel through `labels`.
    cls = rng.choice(4, n_fields, p=[0.45, 0.22, 0.18, 0.15])
    row_theta = theta + rng.choice([0.0, np.pi / 2], n_fields) + rng.normal(0, 0.03, n_fields)
    row_freq = 2 * np.pi / rng.uniform(3.0, 6.5, n_fields)
    row_phase = rng.uniform(0, 2 * np.pi, n_fields)
    row_amp = np.where(cls == _CLASS_CROP, rng.uniform(0.10, 0.35, n_fields),
                       np.where(cls == _CLASS_FALLOW, rng.uniform(0.0, 0.12, n_fields), 0.0))
    lf_amp = rng.uniform(0.05, 0.25, n_fields)
    hf_amp = np.where(cls == _CLASS_PASTURE, 0.25, 0.08)

    def per_pixel(a: np.ndarray) -> np.ndarray:
        return np.take(a.astype(_F32), labels)

    rows = np.sin(xx * per_pixel(np.cos(row_theta) * row_freq) + yy * per_pixel(np.sin(row_theta) * row_freq)
                  + per_pixel(row_phase))
    amp_rows = per_pixel(row_amp)
    tex_veg = 1.0 + amp_rows * rows + per_pixel(lf_amp) * lfc + per_pixel(hf_amp) * ((hf - 0.5) * 2.0)
    is_forest = np.take(cls == _CLASS_FOREST, labels)
    crowns = np.clip((hf - _F32(0.5)) * _F32(3.0) + _F32(0.55), 0.0, 1.0)
    tex_veg = np.where(is_forest, 0.35 + 0.9 * crowns + 0.1 * lfc, tex_veg).astype(_F32)
    tex_soil = (1.0 + 0.5 * (lf[1] - 0.5) + 0.5 * amp_rows * rows).astype(_F32)

    # Water: a pond with a noisy shore.
    water = np.zeros((HR_SIZE, HR_SIZE), dtype=_F32)
    if rng.random() < 0.18:
        cx, cy = rng.uniform(10, 118, 2)
        rx, ry = rng.uniform(12, 40, 2)
        r = np.sqrt(((xx - _F32(cx)) * _F32(1 / rx)) ** 2 + ((yy - _F32(cy)) * _F32(1 / ry)) ** 2) + 0.6 * (lf[1] - 0.5)
        water = np.clip((1.0 - r) * 8.0, 0.0, 1.0).astype(_F32)

    # Roads: antialiased lines, some gently curved.
    road = np.zeros((HR_SIZE, HR_SIZE), dtype=_F32)
    n_roads = int(rng.choice([0, 1, 1, 2]))
    road_lines = []
    for k in range(n_roads):
        if k < len(lines) and rng.random() < 0.8:
            px, py, ang = lines[k]
        else:
            px, py, ang = rng.uniform(16, 112), rng.uniform(16, 112), rng.uniform(0, np.pi)
        ca, sa = _F32(math.cos(ang)), _F32(math.sin(ang))
        dx, dy = xx - _F32(px), yy - _F32(py)
        dist = dy * ca - dx * sa
        if rng.random() < 0.3:
            amp, wavelength, phase = rng.uniform(3, 12), rng.uniform(25, 60), rng.uniform(0, 2 * np.pi)
            dist = dist + _F32(amp) * np.sin((dx * ca + dy * sa) * _F32(1 / wavelength) + _F32(phase))
        half = rng.uniform(1.5, 3.5)
        road = np.maximum(road, np.clip(_F32(half + 0.5) - np.abs(dist), 0.0, 1.0))
        road_lines.append((px, py, ang, half))

    # Buildings: rectangles (mostly along the roads) casting a shadow to the north-east.
    bld = np.zeros((HR_SIZE, HR_SIZE), dtype=_F32)
    shadow = np.zeros((HR_SIZE, HR_SIZE), dtype=_F32)
    roof_idx = np.zeros((HR_SIZE, HR_SIZE), dtype=np.intp)
    n_bld = int(rng.choice([0, 0, 1, 2, 3, 5]))
    if road_lines and rng.random() < 0.3:
        n_bld += int(rng.integers(4, 12))
    sdx, sdy = rng.uniform(0.8, 2.0), -rng.uniform(1.5, 3.0)
    for _ in range(n_bld):
        if road_lines:
            px, py, ang, half = road_lines[int(rng.integers(len(road_lines)))]
            along, side = rng.uniform(-70, 70), rng.choice([-1.0, 1.0])
            setback = half + rng.uniform(6, 16)
            bx = px + along * math.cos(ang) - side * setback * math.sin(ang)
            by = py + along * math.sin(ang) + side * setback * math.cos(ang)
        else:
            ang = theta + rng.choice([0.0, np.pi / 2])
            bx, by = rng.uniform(8, 120, 2)
        hu, hv = rng.uniform(2.5, 7.0), rng.uniform(2.0, 5.5)
        height = rng.uniform(0.8, 1.8)
        roof = int(rng.integers(len(_ROOFS)))
        reach = hu + hv + 2.0 * height * 3.0 + 2.0
        x0, x1 = max(0, int(bx - reach)), min(HR_SIZE, int(bx + reach) + 1)
        y0, y1 = max(0, int(by - reach)), min(HR_SIZE, int(by + reach) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        wx, wy = xx[y0:y1, x0:x1], yy[y0:y1, x0:x1]
        ca, sa = math.cos(ang), math.sin(ang)

        def rect(ox: float, oy: float) -> np.ndarray:
            dx, dy = wx - _F32(bx + ox), wy - _F32(by + oy)
            return (np.abs(dx * _F32(ca) + dy * _F32(sa)) < hu) & (np.abs(dy * _F32(ca) - dx * _F32(sa)) < hv)

        m = rect(0.0, 0.0)
        np.maximum(shadow[y0:y1, x0:x1], rect(sdx * height, sdy * height), out=shadow[y0:y1, x0:x1])
        bld[y0:y1, x0:x1][m] = 1.0
        roof_idx[y0:y1, x0:x1][m] = roof
    shadow *= 1.0 - bld

    # Each part's weight per HR pixel; parts: vegetation and soil of each field, water, road, roofs.
    shade = 1.0 - 0.65 * shadow
    water *= 1.0 - road
    ground = (1.0 - water) * (1.0 - road) * (1.0 - bld) * shade
    w_veg = ground * tex_veg
    w_soil = ground * tex_soil
    w_water = water * (1.0 - bld) * shade * (1.0 + 0.04 * lfc)
    w_road = road * (1.0 - bld) * shade * (1.0 + 0.1 * (hf - 0.5))
    w_roof = bld * (0.95 + 0.1 * hf)

    # Spectra per date [n_dates, C, 7].
    n_roofs = len(_ROOFS)
    c_water, c_road, c_roof = 2 * n_fields, 2 * n_fields + 1, 2 * n_fields + 2
    spectra = np.zeros((n_dates, c_roof + n_roofs, N_BANDS))
    # Soil darkening after rain and water turbidity: slow seasonal cycles plus a little jitter, so
    # acquisitions close in time look alike.
    cycle = 2 * np.pi * doys / 365.0
    moisture = 0.95 + 0.08 * np.sin(cycle + rng.uniform(0, 2 * np.pi)) + rng.uniform(-0.02, 0.02, n_dates)
    for f in range(n_fields):
        v, sen = _phenology(rng, int(cls[f]), doys)
        if cls[f] == _CLASS_FOREST:
            green, soil = _FOREST * rng.uniform(0.85, 1.15), _LITTER * rng.uniform(0.85, 1.15)
        else:
            green = _GREEN * rng.uniform(0.85, 1.15)
            soil = (rng.dirichlet([1.0, 1.0, 1.0])[:, None] * _SOILS).sum(axis=0) * rng.uniform(0.85, 1.15)
        veg = (1.0 - sen)[:, None] * green + sen[:, None] * _DRY
        spectra[:, f] = v[:, None] * veg
        spectra[:, n_fields + f] = (1.0 - v)[:, None] * soil * moisture[:, None]
    turb = ((0.5 + 0.5 * np.sin(cycle + rng.uniform(0, 2 * np.pi))) * rng.uniform(0, 0.8))[:, None]
    spectra[:, c_water] = (1.0 - turb) * _WATER + turb * _TURBID
    spectra[:, c_road] = _ROADS[int(rng.integers(len(_ROADS)))] * rng.uniform(0.9, 1.1)
    spectra[:, c_roof:] = _ROOFS * rng.uniform(0.85, 1.15, (n_roofs, 1))

    # NAIP-date reflectance, straight from the parts at full resolution.
    s = spectra[-1, :, :4].T.astype(_F32)                       # [4, C]
    hr = np.empty((4, HR_SIZE, HR_SIZE), dtype=_F32)
    for b in range(4):
        hr[b] = (w_veg * np.take(s[b, :n_fields], labels) + w_soil * np.take(s[b, n_fields:2 * n_fields], labels)
                 + w_water * s[b, c_water] + w_road * s[b, c_road] + w_roof * np.take(s[b, c_roof:], roof_idx))

    # The parts on the LR grid (downsampling is linear, so each LR timestep is parts @ spectra).
    lr = _lr_sums([(w_veg, labels, n_fields), (w_soil, labels, n_fields), (w_water, None, 1),
                   (w_road, None, 1), (w_roof, roof_idx, n_roofs),
                   ((1.0 - road) * (1.0 - water), None, 1), (is_forest * ground, None, 1)])
    parts, snow_ok, forest = lr[:-2], lr[-2], lr[-1]
    keep = parts.any(axis=1)
    return _Scene(hr=hr, parts=parts[keep], spectra=spectra[:-1, keep].astype(_F32),
                  snow_ok=snow_ok.reshape(LR_SIZE, LR_SIZE), forest=forest.reshape(LR_SIZE, LR_SIZE))


@lru_cache(maxsize=256)
def _gamma_lut(gamma: float) -> np.ndarray:
    """Lookup table of 255 * x ** gamma over x in [0, 1]."""
    return (255.0 * (np.arange(_LUT_SIZE) / (_LUT_SIZE - 1)) ** gamma).astype(_F32)


def _gamma_dn(x: np.ndarray, gain: float, gamma: float) -> np.ndarray:
    """255 * clip(x * gain, 0, 1) ** gamma, through a lookup table."""
    idx = np.clip(x * _F32(gain * (_LUT_SIZE - 1)), 0, _LUT_SIZE - 1).astype(np.intp)
    return _gamma_lut(float(gamma))[idx]


def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform uint8 noise (cheap: random bytes)."""
    return np.frombuffer(rng.bytes(math.prod(shape)), dtype=np.uint8).reshape(shape)


def _to_uint8(dn: np.ndarray, noise: np.ndarray, amp: float) -> np.ndarray:
    """Adds uniform noise `amp` DN wide (`noise` uint8), rounds, and clips to [1, 255]: legit pixels are never 0."""
    out = dn + noise * _F32(amp / 256.0) + _F32(0.5 - amp / 2.0)
    np.floor(out, out=out)
    np.clip(out, 1, 255, out=out)
    return out.astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Time series: dates, conditions, atmosphere.

def _timestep_dates(rng: np.random.Generator, n: int) -> tuple[np.ndarray, int]:
    """Day offsets from the NAIP date (sorted) and the index of the one closest to it (unique)."""
    near = int(rng.integers(-5, 6))
    others = rng.uniform(-182, 182, n - 1)
    if n > 1 and rng.random() < 0.5:            # a second acquisition near the NAIP date
        others[0] = rng.choice([-1, 1]) * rng.uniform(abs(near) + 3, 20)
    others = np.sign(others) * np.maximum(np.abs(others), abs(near) + 3)
    offsets = np.concatenate([[near], np.round(others)]).astype(np.int64)
    order = np.argsort(offsets, kind="stable")
    return offsets[order], int(np.flatnonzero(order == 0)[0])


def _conditions(rng: np.random.Generator, doys: np.ndarray, near: int, kind: str) -> list[str]:
    n = len(doys)
    winter = np.abs(_circ_days(doys, 15)) < 50
    p = np.tile(np.array([_P_COND[c] for c in CONDITIONS]), (n, 1))
    snow, clear = CONDITIONS.index("snow"), CONDITIONS.index("clear")
    p[winter, snow] = _P_SNOW_WINTER
    p[winter, clear] -= _P_SNOW_WINTER
    u = rng.random(n)
    idx = (u[:, None] > np.cumsum(p, axis=1)[:, :-1]).sum(axis=1)
    conds = [CONDITIONS[i] for i in idx]
    if kind == "no_valid_timesteps":
        return ["black_border"] * n
    conds[near] = "clear"
    missing = MIN_CLEAR - conds.count("clear")
    if missing > 0:
        for i in rng.permutation([i for i, c in enumerate(conds) if c != "clear"])[:missing]:
            conds[int(i)] = "clear"
    return conds


def _border_mask(rng: np.random.Generator, size: int, min_depth: int) -> np.ndarray:
    """A swath edge: the part of the tile beyond a slanted line along one side, or a corner wedge.

    Covers at least `min_depth` pixels inward along its whole side, or a corner triangle whose legs
    are at least 2.5 * `min_depth` long.
    """
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if rng.random() < 0.7:
        depth = rng.uniform(min_depth + 1, size * 0.45)
        slope = rng.uniform(-0.4, 0.4)
        mask = xx < np.maximum(min_depth, depth + slope * (yy - size / 2))
    else:
        mask = xx + yy < rng.uniform(2.5 * min_depth, size * 0.9)
    return np.rot90(mask, int(rng.integers(4))).copy()


def _coarsen(a: np.ndarray, k: int) -> np.ndarray:
    """Block-average [n, 32, 32] by k and repeat back: a coarser band resampled to the 10 m grid."""
    n = a.shape[0]
    m = a.reshape(n, LR_SIZE // k, k, LR_SIZE // k, k).mean(axis=(2, 4))
    return np.repeat(np.repeat(m, k, axis=1), k, axis=2)


def _time_series(rng: np.random.Generator, scene: _Scene, conds: list[str], doys: np.ndarray,
                 extra: bool, rng_extra: np.random.Generator) -> dict[str, np.ndarray]:
    """The Sentinel-2 bands of every timestep, each [T*32, 32] (tci [T*32, 32, 3]) uint8.

    Conditions are applied to all timesteps of a condition at once (clouds one by one).
    """
    n = len(conds)
    nb = N_BANDS if extra else 4        # R, G, B, NIR always; B01, B11, B12 only when written
    mix = np.ascontiguousarray(scene.spectra[:, :, :nb].transpose(0, 2, 1)).reshape(n * nb, -1)
    toa = np.einsum("kc,cp->kp", mix, scene.parts).reshape(n, nb, LR_SIZE, LR_SIZE)
    k_ext, k_cloud, k_thin, k_snow = (a[None, :nb, None, None].astype(_F32) for a in (_EXT, _CLOUD, _THIN, _SNOW))

    # Illumination (season, BRDF), aerosol: attenuation and path radiance; per-timestep parameters.
    sun = (0.86 + 0.14 * np.cos(2 * np.pi * _circ_days(doys, 172) / 365.0)) * rng.uniform(0.96, 1.04, n)
    tau = rng.uniform(0.6, 1.4, n)
    gain = ((1.0 - 0.08 * tau[:, None] * _EXT[None, :nb]) * sun[:, None]).astype(_F32)   # [n, nb]
    toa *= gain[:, :, None, None]
    path = (tau[:, None] * _PATH[None, :nb]).astype(_F32)[:, :, None, None]            # [n, nb, 1, 1]
    q = rng.random((n, 8)).astype(_F32)

    which = {c: np.array([t for t, x in enumerate(conds) if x == c], dtype=np.intp) for c in CONDITIONS}
    hazy = np.concatenate([which[c] for c in ("thin_cloud", "haze", "shadow", "snow")])
    smooth = np.zeros((n, LR_SIZE, LR_SIZE), dtype=_F32)   # smooth fields: haze, shadow, snow cover
    smooth[hazy] = _stretch(_fractal(rng, len(hazy), LR_SIZE, (1, 2, 4)))
    pad = 8
    clouds = _stretch(_fractal(rng, len(which["cloud"]), LR_SIZE + 2 * pad, (3, 6, 12, 24)))
    cirrus = np.broadcast_to(_F32(0.0005) + _F32(0.002) * q[:, 7, None, None], (n, LR_SIZE, LR_SIZE)).copy()

    t = np.concatenate([which["clear"], which["black_border"]])
    toa[t] += path[t]
    t = which["dark"]
    toa[t] = (toa[t] + path[t]) * (_F32(0.04) + _F32(0.08) * q[t, 0])[:, None, None, None]
    t = which["shadow"]
    mask = _coverage_masks(smooth[t], 0.4 + 0.5 * q[t, 0], 0.15)
    toa[t] = toa[t] * (1.0 - (_F32(0.55) + _F32(0.2) * q[t, 1])[:, None, None] * mask)[:, None] + path[t]
    t = which["thin_cloud"]
    alpha = ((_F32(0.15) + _F32(0.3) * q[t, 0])[:, None, None] * (_F32(0.6) + _F32(0.8) * smooth[t]))
    toa[t] = (1.0 - alpha[:, None]) * (toa[t] + path[t]) + alpha[:, None] * k_thin
    cirrus[t] += alpha * (_F32(0.12) + _F32(0.15) * q[t, 3])[:, None, None]
    t = which["haze"]
    h = ((_F32(2.5) + _F32(3.5) * q[t, 0]) * tau[t].astype(_F32))[:, None, None] * (_F32(0.7) + _F32(0.6) * smooth[t])
    k_path = _PATH[None, :nb, None, None].astype(_F32)
    toa[t] = toa[t] * np.exp(_F32(-0.12) * h[:, None] * k_ext) + k_path * h[:, None]
    cirrus[t] += _F32(0.002) * q[t, 3][:, None, None]
    t = which["snow"]
    cover = np.clip((_F32(0.55) + _F32(0.45) * q[t, 0])[:, None, None] * (_F32(0.5) + smooth[t]), 0.0, 1.0)
    f = (cover * (scene.snow_ok * (1.0 - 0.6 * scene.forest)))[:, None]
    snow = k_snow * (sun[t] * (0.9 + 0.1 * q[t, 1])).astype(_F32)[:, None, None, None]
    toa[t] = (1.0 - f) * toa[t] + f * snow + path[t]
    inner = (slice(pad, pad + LR_SIZE), slice(pad, pad + LR_SIZE))
    for j, t in enumerate(which["cloud"]):     # fractal cloud with its shadow cast beside it
        cover = 0.35 + 0.6 * q[t, 0]
        mask = _coverage_masks(clouds[j:j + 1], np.array([cover]), 0.08)[0]
        dy, dx = int(round(3 + 5 * q[t, 1])), int(round(-6 + 12 * q[t, 2]))
        shade = mask[pad - dy:pad - dy + LR_SIZE, pad + dx:pad + dx + LR_SIZE]
        alpha = mask[inner]
        body = k_cloud[0] * (_F32(0.75) + _F32(0.35) * clouds[j][inner])
        toa[t] = (1.0 - alpha) * (toa[t] * (1.0 - 0.7 * shade) + path[t]) + alpha * body
        cirrus[t] += alpha * _F32(0.005 + 0.05 * q[t, 3])
    border = np.zeros((n, LR_SIZE, LR_SIZE), dtype=bool)
    for t in which["black_border"]:
        border[t] = _border_mask(rng, LR_SIZE, 3)

    noise = _noise(rng, (n, 4, LR_SIZE, LR_SIZE))
    tci = np.empty((n, LR_SIZE, LR_SIZE, 3), dtype=np.uint8)
    for b in (_R, _G, _B):
        tci[..., b] = _to_uint8(_gamma_dn(toa[:, b], _S2_GAIN[b], _S2_GAMMA[b]), noise[:, b], 2.0)
    out = {"tci": tci, "b08": _to_uint8(toa[:, _N] * _F32(_RAW_SCALE), noise[:, 3], 2.0)}
    if extra:
        xnoise = _noise(rng_extra, (4, n, LR_SIZE, LR_SIZE))
        out["b01"] = _to_uint8(_coarsen(toa[:, _B01], 4) * _F32(_RAW_SCALE), xnoise[0], 2.0)
        out["b10"] = _to_uint8(_coarsen(cirrus, 4) * _F32(_RAW_SCALE), xnoise[1], 1.0)
        out["b11"] = _to_uint8(_coarsen(toa[:, _B11], 2) * _F32(_RAW_SCALE), xnoise[2], 2.0)
        out["b12"] = _to_uint8(_coarsen(toa[:, _B12], 2) * _F32(_RAW_SCALE), xnoise[3], 2.0)
    for name, arr in out.items():
        arr[border] = 0
        out[name] = arr.reshape(n * LR_SIZE, *arr.shape[2:])
    return out


# ---------------------------------------------------------------------------------------------
# One tile.

@dataclasses.dataclass
class RenderedTile:
    """One tile in memory: the arrays its files hold (absent files are absent keys) and its truth."""
    tile: tiles.TileId
    kind: str
    naip: dict[str, np.ndarray]          # "rgb" [128, 128, 3], "nir" [128, 128]
    sentinel2: dict[str, np.ndarray]     # "tci" [T*32, 32, 3], "b08" [T*32, 32], extras [T*32, 32]
    truth: dict


def render_tile(seed: int, index: int, timesteps: tuple[int, int] = (24, 40),
                extra_bands: bool = False) -> RenderedTile:
    """Tile `index` of the sample with `seed`, in memory. Depends only on (seed, index)."""
    tile = tile_id_for(seed, index)
    kind = tile_kind(seed, index)
    cap = _capture(seed, index // TILES_PER_CAPTURE)
    rng = np.random.default_rng([seed, index])

    n = int(rng.integers(timesteps[0], timesteps[1] + 1))
    offsets, near = _timestep_dates(rng, n)
    hr_doy = cap.date.timetuple().tm_yday
    doys = np.concatenate([(hr_doy + offsets) % 365.0, [float(hr_doy)]])
    conds = _conditions(rng, doys[:n], near, kind)
    scene = _scene(rng, doys)

    hr_noise = _noise(rng, (4, HR_SIZE, HR_SIZE))
    rgb = np.empty((HR_SIZE, HR_SIZE, 3), dtype=np.uint8)
    for b in range(3):
        rgb[..., b] = _to_uint8(_gamma_dn(scene.hr[b], cap.gain[b], cap.gamma[b]), hr_noise[b], 3.0)
    nir = _to_uint8(_gamma_dn(scene.hr[3], cap.gain[3], cap.gamma[3]), hr_noise[3], 3.0)
    if kind == "naip_black_border":
        strip = _border_mask(rng, HR_SIZE, 3)
        rgb[strip] = 0
        nir[strip] = 0
    naip = {"rgb": rgb} if kind == "missing_nir" else {"rgb": rgb, "nir": nir}

    if kind == "missing_s2":
        s2, steps, near_index = {}, [], None
    else:
        rng_extra = np.random.default_rng([seed, index, 3, 0xE7])
        s2 = _time_series(rng, scene, conds, doys[:n], extra_bands, rng_extra)
        if kind == "missing_band":
            del s2["b08"]
        steps = [{"index": t, "condition": c, "day_offset": int(offsets[t])} for t, c in enumerate(conds)]
        near_index = near
    truth = {
        "tile_id": str(tile),
        "kind": kind,
        "timesteps": steps,
        "clear_indices": [s["index"] for s in steps if s["condition"] == "clear"],
        "nearest_index": near_index,
        "hr_date": cap.date.isoformat(),
    }
    return RenderedTile(tile, kind, naip, s2, truth)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(arr: np.ndarray) -> bytes:
    """A standard 8-bit greyscale ([h, w]) or RGB ([h, w, 3]) PNG of a uint8 array.

    Every row uses the PNG "Up" filter and the deflate stream is Huffman-only: about the size of
    Pillow's compress_level=1 output at a third of its time (Pillow tries all five filters on every
    row, which dominates its cost for these small images). Decoders see an ordinary PNG.
    """
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"encode_png needs uint8 [h, w] or [h, w, 3], got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    raw = np.ascontiguousarray(arr).reshape(h, -1)
    rows = np.empty((h, raw.shape[1] + 1), dtype=np.uint8)
    rows[:, 0] = 2                                              # filter type Up
    rows[0, 1:] = raw[0]
    np.subtract(raw[1:], raw[:-1], out=rows[1:, 1:])            # modulo 256, as PNG wants
    deflate = zlib.compressobj(PNG_COMPRESS_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    idat = deflate.compress(rows.tobytes()) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if arr.ndim == 2 else 2, 0, 0, 0)
    return b"".join([_PNG_SIGNATURE, _png_chunk(b"IHDR", ihdr), _png_chunk(b"IDAT", idat),
                     _png_chunk(b"IEND", b"")])


def _save_png(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(encode_png(arr))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def make_tile(output_dir: str, seed: int, index: int, timesteps: tuple[int, int] = (24, 40),
              extra_bands: bool = False) -> dict:
    """Renders tile `index` and writes its files under `output_dir`; returns its truth record.

    Files a defect says are missing are removed if an earlier run left them there.
    """
    r = render_tile(seed, index, timesteps, extra_bands)
    hr_dir = os.path.join(output_dir, "naip", r.tile.naip_id, r.tile.xy)
    os.makedirs(hr_dir, exist_ok=True)
    for name in ("rgb", "nir"):
        path = os.path.join(hr_dir, f"{name}.png")
        if name in r.naip:
            _save_png(path, r.naip[name])
        else:
            _remove(path)
    s2_dir = os.path.join(output_dir, "sentinel2", r.tile.xy)
    if r.sentinel2:
        os.makedirs(s2_dir, exist_ok=True)
    if r.sentinel2 or os.path.isdir(s2_dir):
        for band in ("tci", "b08") + EXTRA_BANDS:
            path = os.path.join(s2_dir, f"{band}.png")
            if band in r.sentinel2:
                _save_png(path, r.sentinel2[band])
            else:
                _remove(path)
        if not r.sentinel2:
            try:
                os.rmdir(s2_dir)
            except OSError:
                pass
    return r.truth


def _tile_job(args: tuple) -> dict:
    return make_tile(*args)


# ---------------------------------------------------------------------------------------------
# The sample.

def generate_sample(output_dir: str, n_tiles: int, seed: int = 0, *, timesteps: tuple[int, int] = (24, 40),
                    extra_bands: bool = False, workers: int = 1) -> SampleSummary:
    """Writes an S2-NAIP-layout sample of `n_tiles` tiles under the local folder `output_dir`.

    `timesteps` is the inclusive (min, max) range of the number of Sentinel-2 timesteps per tile.
    Also writes `sample_truth.jsonl` (one record per tile, in tile order) and `manifest.txt`.
    Output is identical for any `workers` (> 1 uses a multiprocessing pool).
    """
    if isinstance(n_tiles, bool) or not isinstance(n_tiles, int) or n_tiles < 0:
        raise ValueError(f"n_tiles must be a non-negative integer, got {n_tiles!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    tmin, tmax = (int(v) for v in timesteps)
    if not MIN_CLEAR <= tmin <= tmax:
        raise ValueError(f"timesteps must be (min, max) with {MIN_CLEAR} <= min <= max, got {timesteps!r}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    if output_dir.startswith(("gs://", "s3://", "http://", "https://")):
        raise ValueError("generate_sample writes to a local folder only")
    if n_tiles:
        _capture(seed, (n_tiles - 1) // TILES_PER_CAPTURE)     # fails early if beyond the grid

    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    jobs = [(output_dir, seed, i, (tmin, tmax), bool(extra_bands)) for i in range(n_tiles)]
    truth_path = os.path.join(output_dir, TRUTH_FILE)
    manifest_path = os.path.join(output_dir, MANIFEST_FILE)
    summary = SampleSummary(output_dir=output_dir, seed=seed, tile_ids=[], truth_path=truth_path,
                            manifest_path=manifest_path, extra_bands=bool(extra_bands),
                            conditions={c: 0 for c in CONDITIONS})

    def consume(records) -> None:
        with open(truth_path + ".tmp", "w", encoding="utf-8", newline="\n") as truth:
            for rec in records:
                truth.write(json.dumps(rec, separators=(",", ":")) + "\n")
                summary.tile_ids.append(rec["tile_id"])
                setattr(summary, rec["kind"], getattr(summary, rec["kind"]) + 1)
                for step in rec["timesteps"]:
                    summary.conditions[step["condition"]] += 1
                summary.timesteps_total += len(rec["timesteps"])

    if int(workers) == 1 or n_tiles < 2:
        consume(_tile_job(job) for job in jobs)
    else:
        chunk = max(1, min(32, n_tiles // (int(workers) * 8)))
        with multiprocessing.get_context().Pool(int(workers)) as pool:
            consume(pool.imap(_tile_job, jobs, chunksize=chunk))
    os.replace(truth_path + ".tmp", truth_path)
    with open(manifest_path, "w", encoding="utf-8", newline="\n") as manifest:
        manifest.writelines(t + "\n" for t in summary.tile_ids)
    summary.seconds = time.perf_counter() - start
    return summary


def load_truth(path: str) -> dict[str, dict]:
    """Reads a `sample_truth.jsonl` into {tile_id: record}."""
    with open(path, encoding="utf-8") as f:
        return {rec["tile_id"]: rec for rec in (json.loads(line) for line in f if line.strip())}
