"""Development data for the `robust` selection: real NAIP captures -> Sentinel-2-like series with
planted hard cases and synthetic extra bands.

Used by `pipelines.dev.bench_selection` and the tests; nothing is read at import. The caller passes a
folder of NAIP GeoTIFFs of one quarter quad (several capture dates, R, G, B, NIR uint8), e.g. the
project's `../shared/data/naip_real`. Nothing built here may be committed to the project.

Per tile (a Web-Mercator zoom-17 tile inside every capture):

* HR: the capture of `hr_date` (default: drawn per tile), warped (bilinear) onto the tile at
  128x128 R, G, B, NIR.
* Clean timesteps: every other capture (and the HR's own when `include_hr_date`), block-averaged to
  32x32 (~6.5 m), as top-of-atmosphere reflectance with a per-capture, per-band gain/offset (the
  Sentinel-2 domain gap; the same for every tile of a capture), each capture once or twice (a
  revisit: slightly different gain/offset and noise).
* Planted timesteps, each derived from one clean capture (a uniformly drawn one, never the HR's
  date). By default ("twin" tiles) that capture's clean frame stays in the series, so each planted
  timestep has a clean twin, as a Sentinel-2 series has revisits days apart; `twin_free=True`
  removes it (and its revisit): every planted timestep replaces its date, as a real hazy or veiled
  acquisition has no clean copy (the evaluation's main synthetic set, `pipelines.dev.bench_selection`).
  Hard kinds (HARD_PLANT per tile), subtle on purpose:
    haze           aerosol optical depth 0.35-1.0 (+-25 % across the tile): transmission
                   exp(-0.25 * ext_b * depth) and path radiance (blue +12-34 DN, red +5-14 DN)
    thin_cloud     a cirrus veil of opacity 0.02-0.2 (smoothly varying), B10 up by ~2-18 DN
    cumulus        small opaque clouds over 3-12 % of the tile, their shadows 2-5 px away
    shadow         a large cloud shadow over 25-60 % of the tile, darkening 30-55 %
    snow           partial snow over 15-45 % of the tile
    misregistered  the capture shifted by 1-2 px (quarter-pixel steps) in any direction
  Obvious kinds (also in EASY_PLANT): cloudy (thick cloud over 45-75 % and shadows), dark
  (exposure x0.12-0.3), black_border (a swath-edge wedge of zeros in every band).
* Bands: TCI (R, G, B; DN = reflectance * 255 / 0.3558, the L1C TCI saturation), B08 and the extra
  bands B01, B10, B11, B12 as S2-NAIP scales them (DN = clip(reflectance * 1e4 // 32, 0, 255)). The
  surface's B01 follows the blue band (slope and offset per capture: its clear-sky aerosol),
  B11/B12 (SWIR) follow red and NIR (vegetation ~0.22/0.10, soil ~0.3/0.2, water ~0), B10 (cirrus,
  1375 nm) sees almost nothing of the ground. Conditions act
  on all eight bands with their physical spectral signatures: aerosol haze adds path radiance that
  falls from B01 to NIR and leaves SWIR and B10 alone; cirrus (thin cloud) raises B10 and whitens
  everything; cumulus is bright in every band and in SWIR, with a weak B10; shadows darken every
  band but B10; snow is bright in the visible and NIR and dark in SWIR (NDSI > 0.4).
* Timesteps are shuffled; `DevTile.kinds[i]` says what timestep i is.

`split_tiles` divides the usable tiles into a tuning set and a held-out set by 3x3-tile blocks, so
neighbouring (correlated) tiles never straddle the split.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from transforms import tiles

HR_SIZE = 128
LR_SIZE = 32
SCALE = HR_SIZE // LR_SIZE
MARGIN = 3 * SCALE  # HR pixels around each tile, room for shifts of up to 3 LR pixels

CLEAN = "clean"
# The hard conditions of the robust selection's issue, and the obvious ones the paper already handles.
HAZE, THIN_CLOUD, CUMULUS, SHADOW, SNOW, MISREGISTERED = (
    "haze", "thin_cloud", "cumulus", "shadow", "snow", "misregistered")
CLOUDY, DARK, BLACK_BORDER = "cloudy", "dark", "black_border"
HARD_KINDS = (HAZE, THIN_CLOUD, CUMULUS, SHADOW, SNOW, MISREGISTERED)
EASY_KINDS = (CLOUDY, DARK, BLACK_BORDER)
KINDS = HARD_KINDS + EASY_KINDS

HARD_PLANT = {HAZE: 1, THIN_CLOUD: 2, CUMULUS: 1, SHADOW: 1, SNOW: 1, MISREGISTERED: 2,
              CLOUDY: 1, DARK: 1, BLACK_BORDER: 1}
EASY_PLANT = {CLOUDY: 2, DARK: 1, BLACK_BORDER: 2}

MIN_CLEAN_DATES = 4  # twin-free tiles: dates left clean (of 9 besides the HR's own): ~half the frames clean, as in real series

EXTRA_BANDS = ("b01", "b10", "b11", "b12")
# Band planes of the reflectance stacks: R, G, B, NIR (B08), B01, B10, B11, B12.
_R, _G, _B, _N, _B01, _B10, _B11, _B12 = range(8)
N_PLANES = 8
TCI_SCALE = 255.0 / 0.3558  # L1C TCI: 255 is reflectance 0.3558
RAW_SCALE = 1e4 / 32.0  # S2-NAIP single bands: clip(raw // 32, 0, 255), raw = reflectance * 1e4

# Spectra (reflectance) of the planted bodies, per plane.
_CLOUD = np.array([0.74, 0.76, 0.79, 0.71, 0.80, 0.03, 0.52, 0.38])
_CIRRUS = np.array([0.50, 0.52, 0.55, 0.50, 0.57, 0.30, 0.38, 0.28])
_SNOW = np.array([0.80, 0.83, 0.86, 0.68, 0.88, 0.004, 0.05, 0.03])
# Aerosol: path radiance per unit optical depth, and extinction factor, per plane.
_PATH = np.array([0.020, 0.030, 0.048, 0.008, 0.070, 0.0, 0.0012, 0.0006])
_EXT = np.array([0.55, 0.7, 1.0, 0.3, 1.3, 0.0, 0.05, 0.03])

CAPTURE_FILE = re.compile(r"(?P<naip_id>m_[0-9]{7}_(?:ne|nw|se|sw)_[0-9]{2}_[0-9a-z]{1,4}_(?P<date>[0-9]{8}))\.tif")


@dataclasses.dataclass
class DevTile:
    """One development tile in memory; indices are positions in the (shuffled) series."""

    tile_id: str
    hr_date: str
    hr: np.ndarray  # uint8 [128, 128, 4] R, G, B, NIR
    series: np.ndarray  # uint8 [T, 32, 32, 4] TCI R, G, B, B08
    extra: dict[str, np.ndarray]  # uint8 [T, 32, 32] per name in EXTRA_BANDS
    kinds: tuple[str, ...]  # CLEAN or a planted kind, per timestep
    capture_of_index: tuple[str, ...]  # YYYYMMDD of the capture each timestep shows or derives from
    shifts: np.ndarray  # float [T, 2] (dy, dx) planted misregistration in LR pixels (0 elsewhere)
    hr_date_index: int | None  # a clean timestep of the HR's own capture, if included

    @property
    def n_timesteps(self) -> int:
        return len(self.kinds)

    @property
    def clean_indices(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.kinds) if k == CLEAN)


def list_captures(naip_dir) -> dict[str, Path]:
    """{YYYYMMDD: path} of the NAIP captures in `naip_dir` (m_<quad>_<q>_<zone>_<res>_<date>.tif)."""
    found = {}
    for path in sorted(Path(naip_dir).iterdir()):
        m = CAPTURE_FILE.fullmatch(path.name)
        if m:
            found[m["date"]] = path
    if not found:
        raise FileNotFoundError(f"no NAIP GeoTIFFs (m_*.tif) in {naip_dir}")
    return found


class CaptureMosaic:
    """Every capture warped once onto one Web-Mercator grid of 128 px per zoom-17 tile (bilinear),
    so that a tile, or a shifted copy of it, is an array slice."""

    def __init__(self, naip_dir, zoom: int = tiles.ZOOM):
        import rasterio  # here, not at import: the module is also used without rasterio data
        import rasterio.transform
        import rasterio.warp

        from transforms.nir import geo

        self.captures = list_captures(naip_dir)
        self.zoom = zoom
        datasets = {d: rasterio.open(p) for d, p in self.captures.items()}
        try:
            boxes = [rasterio.warp.transform_bounds(ds.crs, geo.WEB_MERCATOR, *ds.bounds, densify_pts=21)
                     for ds in datasets.values()]
            inter = (max(b[0] for b in boxes), max(b[1] for b in boxes),
                     min(b[2] for b in boxes), min(b[3] for b in boxes))
            inside = geo.tiles_covering(inter, zoom)
            if not inside:
                raise ValueError(f"the captures in {naip_dir} have no common zoom-{zoom} tile")
            self.x0 = min(x for x, _ in inside) - 1
            self.y0 = min(y for _, y in inside) - 1
            nx = max(x for x, _ in inside) - self.x0 + 2
            ny = max(y for _, y in inside) - self.y0 + 2
            size = geo.tile_size_3857(zoom)
            left, _, _, top = geo.tile_bounds_3857(self.x0, self.y0, zoom)
            transform = rasterio.transform.from_origin(left, top, size / HR_SIZE, size / HR_SIZE)
            self.images = {}
            self.valid = None
            for date, ds in datasets.items():
                src = ds.read()
                alpha = ds.dataset_mask()
                dst = np.zeros((ds.count + 1, ny * HR_SIZE, nx * HR_SIZE), np.uint8)
                rasterio.warp.reproject(
                    source=np.concatenate([src, alpha[None]]), destination=dst,
                    src_transform=ds.transform, src_crs=ds.crs, src_alpha=ds.count + 1,
                    dst_transform=transform, dst_crs=geo.WEB_MERCATOR, dst_alpha=ds.count + 1,
                    resampling=rasterio.enums.Resampling.bilinear)
                self.images[date] = np.ascontiguousarray(dst[:4].transpose(1, 2, 0))
                ok = dst[ds.count] > 0
                self.valid = ok if self.valid is None else self.valid & ok
        finally:
            for ds in datasets.values():
                ds.close()
        self.naip_ids = {d: p.name[: -len(".tif")] for d, p in self.captures.items()}

    @property
    def dates(self) -> list[str]:
        return sorted(self.images)

    def _origin(self, x: int, y: int) -> tuple[int, int]:
        return (y - self.y0) * HR_SIZE, (x - self.x0) * HR_SIZE

    def usable_tiles(self) -> list[tuple[int, int]]:
        """Tiles whose area plus MARGIN is valid in every capture and whose HR has no black pixel in
        any capture; row by row."""
        out = []
        ny, nx = self.valid.shape[0] // HR_SIZE, self.valid.shape[1] // HR_SIZE
        for ty in range(1, ny - 1):
            for tx in range(1, nx - 1):
                r, c = ty * HR_SIZE, tx * HR_SIZE
                if not self.valid[r - MARGIN:r + HR_SIZE + MARGIN, c - MARGIN:c + HR_SIZE + MARGIN].all():
                    continue
                if any((img[r:r + HR_SIZE, c:c + HR_SIZE, :3] == 0).all(-1).any() for img in self.images.values()):
                    continue
                out.append((self.x0 + tx, self.y0 + ty))
        return out

    def hr(self, date: str, x: int, y: int) -> np.ndarray:
        r, c = self._origin(x, y)
        return self.images[date][r:r + HR_SIZE, c:c + HR_SIZE].copy()

    def lr(self, date: str, x: int, y: int, shift_hr_px: tuple[int, int] = (0, 0)) -> np.ndarray:
        """float [32, 32, 4]: the 4x4 block mean of the tile, its window moved by `shift_hr_px`
        (content then appears moved by minus that, in quarter LR pixels)."""
        r, c = self._origin(x, y)
        r, c = r + int(shift_hr_px[0]), c + int(shift_hr_px[1])
        block = self.images[date][r:r + HR_SIZE, c:c + HR_SIZE].astype(np.float64)
        return block.reshape(LR_SIZE, SCALE, LR_SIZE, SCALE, 4).mean(axis=(1, 3))


def split_tiles(xys: Sequence[tuple[int, int]], held_out_fraction: float = 0.4, block: int = 3,
                seed: int = 7) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(tune, held_out): whole `block` x `block` groups of tiles go to one side, drawn by `seed`."""
    groups = sorted({(x // block, y // block) for x, y in xys})
    order = np.random.default_rng(seed).permutation(len(groups))
    n_held = int(round(held_out_fraction * len(groups)))
    held_groups = {groups[i] for i in order[:n_held]}
    tune = [xy for xy in xys if (xy[0] // block, xy[1] // block) not in held_groups]
    held = [xy for xy in xys if (xy[0] // block, xy[1] // block) in held_groups]
    return tune, held


# ---------------------------------------------------------------------------------------------
# Reflectance, bands and the planted conditions. Stacks are float [8, 32, 32] per timestep.


def _gap(rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-capture (gain, offset) of R, G, B, NIR in NAIP DN (S2 flatter, hazier, bluer than NAIP),
    and (slope, offset) of B01 against blue reflectance (that scene's clear-sky aerosol)."""
    gain = rng.uniform([0.85, 0.85, 0.9, 0.9], [1.0, 1.0, 1.05, 1.05])
    offset = rng.uniform([4.0, 4.0, 8.0, 0.0], [14.0, 14.0, 20.0, 8.0])
    b01 = rng.uniform([0.8, 0.025], [1.0, 0.045])
    return gain, offset, b01


def _coarsen(plane: np.ndarray, k: int) -> np.ndarray:
    m = plane.reshape(LR_SIZE // k, k, LR_SIZE // k, k).mean(axis=(1, 3))
    return np.repeat(np.repeat(m, k, axis=0), k, axis=1)


def surface_stack(lr_dn: np.ndarray, gap, rng) -> np.ndarray:
    """float [32, 32, 4] NAIP DN (block mean) -> [8, 32, 32] clear-sky TOA reflectance, all planes."""
    gain, offset, b01 = gap
    dn = lr_dn * gain + offset
    out = np.empty((N_PLANES, LR_SIZE, LR_SIZE))
    out[:3] = np.moveaxis(dn[..., :3], -1, 0) / TCI_SCALE
    out[_N] = dn[..., 3] / (RAW_SCALE * 1.15)  # NAIP NIR is brighter than B08
    red, nir = out[_R], out[_N]
    out[_B01] = _coarsen(b01[0] * out[_B] + b01[1], 4)  # 60 m, plus its stronger clear-sky path
    out[_B11] = _coarsen(0.40 * nir + 1.05 * red + 0.01, 2)  # 20 m
    out[_B12] = _coarsen(0.14 * nir + 0.95 * red, 2)
    out[_B10] = _coarsen(0.0015 + 0.004 * out[_B11] + rng.uniform(0.0, 0.002), 4)  # 60 m, ~no ground
    return out


def _smooth_field(rng, sigma: float, size: int = LR_SIZE) -> np.ndarray:
    """A smooth random field scaled to [0, 1]."""
    pad = int(2 * sigma) + 1
    f = ndimage.gaussian_filter(rng.standard_normal((size + 2 * pad,) * 2), sigma)[pad:-pad, pad:-pad]
    return (f - f.min()) / (np.ptp(f) + 1e-12)


def _cover(rng, fraction: float, sigma: float, softness: float = 0.08) -> np.ndarray:
    """Soft mask in [0, 1], >= 0.5 over about `fraction` of the tile."""
    f = _smooth_field(rng, sigma)
    t = np.quantile(f, 1.0 - fraction)
    return np.clip(0.5 + (f - t) / (2 * softness), 0.0, 1.0)


def _shade(stack: np.ndarray, mask: np.ndarray, strength: float) -> np.ndarray:
    out = stack.copy()
    ground = np.ones(N_PLANES, bool)
    ground[_B10] = False  # the cirrus band sees no ground, hence no shadow
    out[ground] *= 1.0 - strength * mask
    return out


def plant_haze(stack, rng):
    depth = rng.uniform(0.35, 1.0) * (0.75 + 0.5 * _smooth_field(rng, 8.0))
    t = np.exp(-0.25 * _EXT[:, None, None] * depth)
    return stack * t + _PATH[:, None, None] * depth


def plant_thin_cloud(stack, rng):
    alpha = rng.uniform(0.04, 0.13) * (0.5 + _smooth_field(rng, 5.0))
    return (1.0 - alpha) * stack + alpha * _CIRRUS[:, None, None]


def plant_cumulus(stack, rng):
    fraction = rng.uniform(0.03, 0.12)
    mask = _cover(rng, fraction, 1.3, 0.1)
    dy, dx = (int(rng.integers(2, 6)) * int(rng.choice([-1, 1])) for _ in range(2))
    shadow = ndimage.shift(mask, (dy, dx), order=1, mode="constant", cval=0.0)
    ground = _shade(stack, shadow, rng.uniform(0.45, 0.65))
    body = _CLOUD[:, None, None] * (0.85 + 0.15 * _smooth_field(rng, 1.5))
    return (1.0 - mask) * ground + mask * body


def plant_shadow(stack, rng):
    return _shade(stack, _cover(rng, rng.uniform(0.25, 0.6), 5.0, 0.1), rng.uniform(0.3, 0.55))


def plant_snow(stack, rng):
    f = _cover(rng, rng.uniform(0.15, 0.45), 3.0, 0.15) * rng.uniform(0.7, 1.0)
    return (1.0 - f) * stack + f * _SNOW[:, None, None] * rng.uniform(0.75, 1.0)


def plant_cloudy(stack, rng):
    mask = _cover(rng, rng.uniform(0.45, 0.75), 3.0, 0.1)
    dy, dx = (int(rng.integers(3, 7)) * int(rng.choice([-1, 1])) for _ in range(2))
    shadow = ndimage.shift(mask, (dy, dx), order=0, mode="constant", cval=0.0)
    ground = _shade(stack, shadow, 0.55)
    body = _CLOUD[:, None, None] * (0.9 + 0.1 * _smooth_field(rng, 1.5))
    return (1.0 - mask) * ground + mask * body


def plant_dark(stack, rng):
    return stack * rng.uniform(0.12, 0.3)


_PLANTERS = {HAZE: plant_haze, THIN_CLOUD: plant_thin_cloud, CUMULUS: plant_cumulus, SHADOW: plant_shadow,
             SNOW: plant_snow, CLOUDY: plant_cloudy, DARK: plant_dark}


def swath_edge_mask(rng, size: int = LR_SIZE) -> np.ndarray:
    """A wedge of nodata along one side (depth ~0-4 px at one end, 8-20 px at the other)."""
    near, far = rng.uniform(0.0, 4.0), rng.uniform(8.0, 20.0)
    if rng.random() < 0.5:
        near, far = far, near
    depth = near + (far - near) * np.arange(size) / (size - 1)
    wedge = np.arange(size)[None, :] < depth[:, None]
    return np.ascontiguousarray(np.rot90(wedge, int(rng.integers(4))))


def to_bands(stack: np.ndarray, rng) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """[8, 32, 32] reflectance -> (uint8 [32, 32, 4] TCI R, G, B + B08, {extra band: uint8 [32, 32]})
    with sensor noise; TCI and B08 are >= 1 (0 is nodata), the extras clip(raw // 32, 0, 255)."""
    noise = rng.normal(0.0, 1.0, stack.shape)
    tci = np.clip(np.rint(stack[:3] * TCI_SCALE + noise[:3]), 1, 255)
    b08 = np.clip(np.floor(stack[_N] * RAW_SCALE + noise[_N]), 1, 255)
    lr = np.concatenate([tci, b08[None]]).transpose(1, 2, 0).astype(np.uint8)
    extra = {}
    for name, plane, sd in (("b01", _B01, 1.0), ("b10", _B10, 0.5), ("b11", _B11, 1.0), ("b12", _B12, 1.0)):
        extra[name] = np.clip(np.floor(stack[plane] * RAW_SCALE + sd * noise[plane]), 0, 255).astype(np.uint8)
    return lr, extra


def _twin_free_slots(plant: Mapping[str, int], sources: Sequence[str], min_clean_dates: int,
                     rng) -> tuple[list[str], list[str | None]]:
    """(slots, source date per slot) of a twin-free tile: every slot but black_border gets a date of
    its own among `sources`, leaving `min_clean_dates` of them clean; slots beyond that are left out,
    hard kinds kept before obvious ones (each group in a random order). black_border slots get None
    (the caller draws a clean date)."""
    slots = [kind for kind in KINDS for _ in range(int(plant.get(kind, 0)))]
    order = rng.permutation(len(slots))
    hard = [slots[i] for i in order if slots[i] in HARD_KINDS]
    obvious = [slots[i] for i in order if slots[i] not in HARD_KINDS and slots[i] != BLACK_BORDER]
    room = max(len(sources) - min_clean_dates, 0)
    kept = (hard + obvious)[:room]
    dates = [sources[i] for i in rng.permutation(len(sources))[:len(kept)]]
    borders = [BLACK_BORDER] * sum(s == BLACK_BORDER for s in slots)
    return kept + borders, dates + [None] * len(borders)


def build_dev_tiles(
    mosaic: CaptureMosaic,
    xys: Sequence[tuple[int, int]],
    *,
    seed: int = 0,
    plant: Mapping[str, int] = HARD_PLANT,
    include_hr_date: bool = False,
    hr_date: str | None = None,
    revisit_probability: float = 0.5,
    twin_free: bool = False,
    min_clean_dates: int = MIN_CLEAN_DATES,
) -> list[DevTile]:
    """One DevTile per (x, y). The HR date is `hr_date`, or drawn per tile among the captures (a
    different HR date gives a different pair even on the same ground). Deterministic in `seed`.

    `twin_free`: each planted timestep (but black_border, which every mode filters out before
    scoring) *replaces* its date: it is drawn from a date of its own, and no other timestep of that
    date (neither its clean frame nor a revisit) stays in the series, as in a real series where a
    hazy or veiled acquisition has no clean copy. At least `min_clean_dates` dates stay clean, so a
    tile holds at most len(dates) - 1 - min_clean_dates such plants: the slots of `plant` are
    taken in a per-tile random order, hard kinds before obvious ones, and the rest are left out
    (`DevTile.kinds` says what was planted)."""
    if unknown := set(plant) - set(KINDS):
        raise ValueError(f"unknown kinds {sorted(unknown)}; expected {KINDS}")
    if twin_free and include_hr_date:
        raise ValueError("twin_free leaves the HR's own date out of its series; include_hr_date must be False")
    dates = mosaic.dates
    gaps = {d: _gap(np.random.default_rng([seed, int(d)])) for d in dates}
    out = []
    for x, y in xys:
        rng = np.random.default_rng([seed, x, y])
        hd = hr_date or dates[int(rng.integers(len(dates)))]
        lr_dates = [d for d in dates if include_hr_date or d != hd]
        hr = mosaic.hr(hd, x, y)
        items = []  # (kind, date, stack, shift)
        surfaces = {}
        for d in lr_dates:
            g, o, b = gaps[d]
            base = mosaic.lr(d, x, y)
            surfaces[d] = surface_stack(base, gaps[d], rng)
            items.append((CLEAN, d, surfaces[d], (0.0, 0.0)))
            if d != hd and rng.random() < revisit_probability:  # a revisit of the same scene
                g2 = g * rng.uniform(0.97, 1.03, 4)
                o2 = o + rng.uniform(-3.0, 3.0, 4)
                items.append((CLEAN, d, surface_stack(base, (g2, o2, b), rng), (0.0, 0.0)))
        sources = [d for d in lr_dates if d != hd] or lr_dates
        if twin_free:
            slots, sources_of = _twin_free_slots(plant, sources, min_clean_dates, rng)
            replaced = {d for d in sources_of if d is not None}
            items = [it for it in items if it[1] not in replaced]  # no frame of a perturbed date stays
        else:
            slots = [kind for kind in KINDS for _ in range(int(plant.get(kind, 0)))]
            sources_of = None
        clean_dates = sorted({it[1] for it in items})
        for n, kind in enumerate(slots):
            if twin_free and kind == BLACK_BORDER:  # filtered before scoring: any clean date
                d = clean_dates[int(rng.integers(len(clean_dates)))]
            elif twin_free:
                d = sources_of[n]
            else:
                d = sources[int(rng.integers(len(sources)))]
            if kind == MISREGISTERED:
                mag = rng.uniform(1.0, 2.0)
                theta = rng.uniform(0.0, 2 * np.pi)
                q = np.rint(SCALE * mag * np.array([np.sin(theta), np.cos(theta)])).astype(int)
                stack = surface_stack(mosaic.lr(d, x, y, (-q[0], -q[1])), gaps[d], rng)
                items.append((kind, d, stack, tuple(q / SCALE)))
            elif kind == BLACK_BORDER:
                items.append((kind, d, surfaces[d], (0.0, 0.0)))
            else:
                items.append((kind, d, _PLANTERS[kind](surfaces[d], rng), (0.0, 0.0)))
        perm = rng.permutation(len(items))
        lrs, extras = [], {b: [] for b in EXTRA_BANDS}
        for i in perm:
            lr, extra = to_bands(items[i][2], rng)
            if items[i][0] == BLACK_BORDER:
                mask = swath_edge_mask(rng)
                lr[mask] = 0
                for b in extra:
                    extra[b][mask] = 0
            lrs.append(lr)
            for b in EXTRA_BANDS:
                extras[b].append(extra[b])
        kinds = tuple(items[i][0] for i in perm)
        captured = tuple(items[i][1] for i in perm)
        hr_index = next((k for k, i in enumerate(perm) if items[i][0] == CLEAN and items[i][1] == hd), None)
        out.append(DevTile(
            tile_id=str(tiles.TileId(mosaic.naip_ids[hd], x, y)),
            hr_date=hd,
            hr=hr,
            series=np.stack(lrs),
            extra={b: np.stack(v) for b, v in extras.items()},
            kinds=kinds,
            capture_of_index=captured,
            shifts=np.array([items[i][3] for i in perm], dtype=float),
            hr_date_index=hr_index if include_hr_date else None,
        ))
    return out


def write_dev_tile(root, tile: DevTile, extra_bands: Sequence[str] = EXTRA_BANDS) -> None:
    """Writes `tile` in the S2-NAIP layout under `root` (rgb.png, nir.png, tci.png, b08.png and the
    `extra_bands`), for pipeline-level tests."""
    from transforms.imagery import encode_png

    root = os.fspath(root)
    tid = tiles.TileId.parse(tile.tile_id)
    t = tile.n_timesteps

    def put(path, array):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(encode_png(np.ascontiguousarray(array)))

    put(tiles.hr_rgb_path(root, tid), tile.hr[..., :3])
    put(tiles.hr_nir_path(root, tid), tile.hr[..., 3])
    put(tiles.s2_band_path(root, tid, "tci"), tile.series[..., :3].reshape(t * LR_SIZE, LR_SIZE, 3))
    put(tiles.s2_band_path(root, tid, "b08"), tile.series[..., 3].reshape(t * LR_SIZE, LR_SIZE))
    for b in extra_bands:
        put(tiles.s2_band_path(root, tid, b), tile.extra[b].reshape(t * LR_SIZE, LR_SIZE))
