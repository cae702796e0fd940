"""Evaluation data from real Sentinel-2: real L1C dates, and real cloud shapes on real clear frames.

Used by `pipelines.dev.bench_selection` and the tests; nothing is read at import. The caller passes the
folder of the eo-learn example patch (`../shared/data/real_s2/eolearn`, its README: 5 real 13-band
L1C scenes of one 1 km box in Slovenia, 2 of them overcast, and the provider's s2cloudless
probabilities and masks of 68 dates). Nothing built here (arrays, images) may be committed.

* S2-NAIP scaling (`to_s2naip`): `tci` is ESA's L1C true colour, DN = value * 255 / 3558 rounded
  and clipped to 1..255 (value = reflectance * 1e4, the product's 16-bit integer) (0 is nodata; ESA: "the saturation level of 255 digital counts correspond to a
  level of 3558 for L1C products"); every other band is the 16-bit value (reflectance * 1e4)
  divided by 8160, clipped to [0, 1] and stored as 8-bit, i.e. floor(value / 32) clipped to 0..255.
  Bands: the ones S2-NAIP ships, `tci`, `b01`, `b05`, `b06`, `b07`, `b08`, `b09`, `b10`, `b11`, `b12`.
* Chips (`CHIPS`): the 3 x 3 non-overlapping 32x32 windows of the 101x100 box (10 m pixels, as
  S2-NAIP's ~9.6 m), rows and columns from 2.
* HR (`hr_from`): the chip of a clear date, R, G, B, B08 upsampled 4x (bicubic) to 128x128 with a
  NAIP-like radiometry (a fixed dark-object subtraction of the atmosphere's path reflectance, then
  a brighter, more contrasted stretch than TCI); it carries no detail beyond 10 m. Its own
  date is always left out of the series.
* `real_tiles`: per chip and clear HR date, the other four real dates as the series, each
  timestep's kind its label by eye (transforms/devdata/data/eolearn_labels.json); with
  `include_hr_date` the HR's own date too (the "same-date" answer).
* `semi_real_tiles` (semi-real): real clear frames veiled with the real s2cloudless cloud shapes
  (CLP/CLM windows of the 68 dates) as physical veils, twin-free (a veiled frame replaces its date):
    haze        aerosol: transmission exp(-0.3 tau_b) (Angstrom exponent 1.3) and path
                reflectance 0.08 (lambda / 490 nm)^-2 per unit depth (bluer than the extinction;
                none in B10), optical depth 0.25-0.7 at 490 nm modulated by a smoothed real CLP
                window
    thin_cloud  a semi-transparent veil: (1 - a) * ground + a * cloud, a = CLP * 0.2-0.45 and the
                cloud body the real overcast scene of 2015-08-20 at the same pixels (its 13 bands)
    cloud       the real CLM window (its coarse-grid block edges softened, Gaussian sigma 1.5 px) as
                an opaque body, semi-transparent by CLP at its edges, plus its shadow: the mask
                shifted 3-7 px towards north-north-west (the morning sun over Slovenia), ground
                darkened by 35-60 % in every band but B10
    shadow      a shadow alone (the clouds outside the chip): a shifted CLM window, darkening 35-60 %
  A veil must change the TCI by >= MIN_VEIL_DN (2) DN on average (else another mask window is
  drawn: a shadow over dark forest can be invisible). Series: the two real overcast dates, the
  veiled date, and the remaining clear date (clean).
* `is_held_out`: the fixed held-out part, by a hash of the chip id (never tune on it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from transforms.devdata import hard_cases as H

BANDS_13 = ("b01", "b02", "b03", "b04", "b05", "b06", "b07", "b08", "b8a", "b09", "b10", "b11", "b12")
WAVELENGTH_NM = (443, 490, 560, 665, 705, 740, 783, 842, 865, 945, 1375, 1610, 2190)
S2NAIP_BANDS = ("tci", "b01", "b05", "b06", "b07", "b08", "b09", "b10", "b11", "b12")
EXTRA_BANDS = tuple(b for b in S2NAIP_BANDS if b not in ("tci", "b08"))
TCI_SATURATION = 3558.0  # ESA L1C TCI: 255 is the 16-bit value 3558 (reflectance 0.3558)
BAND_DIVISOR = 8160.0  # S2-NAIP: 16-bit value / 8160 clipped to [0, 1], stored as 8-bit

# REFERENCE_SCENES.npy index -> acquisition date (the eolearn README matched them to the NDVI series)
SCENE_DATES = ("20150820", "20150731", "20150909", "20150830", "20150711")
CLOUD_BODY_SCENE = 0  # 2015-08-20, thick bright cloud over the whole box: the veils' cloud spectrum
CHIP = H.LR_SIZE
CHIP_ORIGIN = 2
CHIPS = {f"r{r}c{c}": (CHIP_ORIGIN + CHIP * r, CHIP_ORIGIN + CHIP * c) for r in range(3) for c in range(3)}
HELD_OUT_FRACTION = 0.34
HAZE, THIN_CLOUD, CLOUD, SHADOW = "haze", "thin_cloud", "cloud", "shadow"
VEILS = (HAZE, THIN_CLOUD, CLOUD, SHADOW)
CLEAN = H.CLEAN

DEFAULT_LABELS = Path(__file__).resolve().parent / "data" / "eolearn_labels.json"


@dataclasses.dataclass
class EoLearnPatch:
    scenes: np.ndarray  # float32 [5, 101, 100, 13] TOA reflectance
    dates: tuple[str, ...]  # YYYYMMDD per scene
    clp: np.ndarray  # float32 [68, 101, 100] s2cloudless probability
    clm: np.ndarray  # uint8 [68, 101, 100] cloud mask
    mask_dates: tuple[str, ...]  # YYYYMMDD per mask
    labels: dict[str, dict[str, str]]  # chip -> date -> label (CLEAN or a condition), by eye


def load_labels(path=DEFAULT_LABELS) -> dict[str, dict[str, str]]:
    """chip -> date -> label of the eo-learn scenes (transforms/devdata/data/eolearn_labels.json)."""
    with open(path) as f:
        doc = json.load(f)
    labels = doc["labels"]
    if set(labels) != set(CHIPS) or any(set(v) != set(SCENE_DATES) for v in labels.values()):
        raise ValueError(f"{path}: expected labels of chips {sorted(CHIPS)} x dates {SCENE_DATES}")
    return labels


def load_eolearn(folder, labels=DEFAULT_LABELS) -> EoLearnPatch:
    """The eo-learn example patch of `folder` (REFERENCE_SCENES.npy, CLP.npy, CLM.npy, timestamps.json)."""
    folder = os.fspath(folder)
    need = ("REFERENCE_SCENES.npy", "CLP.npy", "CLM.npy", "timestamps.json")
    if missing := [n for n in need if not os.path.isfile(os.path.join(folder, n))]:
        raise FileNotFoundError(f"{folder}: not the eo-learn real Sentinel-2 folder (missing {', '.join(missing)})")
    scenes = np.load(os.path.join(folder, "REFERENCE_SCENES.npy"))
    clp = np.load(os.path.join(folder, "CLP.npy"))
    clm = np.load(os.path.join(folder, "CLM.npy"))
    with open(os.path.join(folder, "timestamps.json")) as f:
        stamps = json.load(f)
    if scenes.shape != (len(SCENE_DATES), 101, 100, 13):
        raise ValueError(f"REFERENCE_SCENES.npy: expected (5, 101, 100, 13), got {scenes.shape}")
    if clp.shape != (len(stamps), 101, 100, 1) or clm.shape != clp.shape:
        raise ValueError(f"CLP/CLM: expected ({len(stamps)}, 101, 100, 1), got {clp.shape} / {clm.shape}")
    return EoLearnPatch(
        scenes=scenes.astype(np.float32), dates=SCENE_DATES, clp=clp[..., 0].astype(np.float32),
        clm=clm[..., 0].astype(np.uint8), mask_dates=tuple(s[:10].replace("-", "") for s in stamps),
        labels=load_labels(labels))


def to_s2naip(refl: np.ndarray) -> dict[str, np.ndarray]:
    """float [..., 13] TOA reflectance -> {band: uint8} as S2-NAIP stores them: `tci` [..., 3]
    (R, G, B), the other S2NAIP_BANDS [...]."""
    refl = np.asarray(refl, dtype=np.float64)
    value = np.rint(refl[..., [3, 2, 1]] * 1e4)  # the product's 16-bit integers
    tci = np.clip(np.rint(value * 255.0 / TCI_SATURATION), 1, 255).astype(np.uint8)
    out = {"tci": tci}
    for name in S2NAIP_BANDS[1:]:
        value = np.rint(refl[..., BANDS_13.index(name)] * 1e4)  # the product's 16-bit integer
        out[name] = np.floor(np.clip(value * 255.0 / BAND_DIVISOR, 0.0, 255.0)).astype(np.uint8)
    return out


def chip(a: np.ndarray, chip_id: str) -> np.ndarray:
    """The 32x32 window of `chip_id` of an array [..., 101, 100, ...] whose rows/cols are axes -3, -2
    (band stacks) or -2, -1 (masks: pass a [..., 101, 100] array)."""
    r, c = CHIPS[chip_id]
    if a.ndim >= 3 and a.shape[-1] == 13:
        return a[..., r:r + CHIP, c:c + CHIP, :]
    return a[..., r:r + CHIP, c:c + CHIP]


def hr_from(refl_chip: np.ndarray) -> np.ndarray:
    """float [32, 32, 13] reflectance -> uint8 [128, 128, 4] R, G, B, NIR: a NAIP-like HR (4x
    bicubic, NAIP's brighter, more contrasted radiometry)."""
    rgbn = refl_chip[..., [3, 2, 1, 7]].astype(np.float64)
    up = np.stack([ndimage.zoom(rgbn[..., b], H.SCALE, order=3, mode="nearest") for b in range(4)], axis=-1)
    path = np.array([0.018, 0.03, 0.05, 0.0])  # dark-object subtraction: roughly surface reflectance, as NAIP
    gain = np.array([255 / 0.16, 255 / 0.16, 255 / 0.16, 255 / 0.5])
    return np.clip(np.rint((up - path) * gain), 1, 255).astype(np.uint8)


def _tile(chip_id: str, hr_date: str, suffix: str, hr: np.ndarray, frames: list[np.ndarray],
          kinds: list[str], dates: list[str]) -> H.DevTile:
    """DevTile from reflectance frames [32, 32, 13] (series tci+b08, extras every other S2-NAIP band)."""
    bands = to_s2naip(np.stack(frames))
    series = np.concatenate([bands["tci"], bands["b08"][..., None]], axis=-1)
    return H.DevTile(
        tile_id=f"eolearn/{chip_id}/{hr_date}{suffix}", hr_date=hr_date, hr=hr, series=series,
        extra={b: bands[b] for b in EXTRA_BANDS}, kinds=tuple(kinds), capture_of_index=tuple(dates),
        shifts=np.zeros((len(frames), 2)), hr_date_index=None)


def clear_dates(data: EoLearnPatch, chip_id: str) -> list[str]:
    return [d for d in data.dates if data.labels[chip_id][d] == CLEAN]


def real_tiles(data: EoLearnPatch, include_hr_date: bool = False) -> list[H.DevTile]:
    """Per chip and clear HR date: the HR, and the other real dates as the series (labels by eye);
    `include_hr_date`: every date, the HR's own too (`DevTile.hr_date_index`: the same-date answer)."""
    out = []
    for chip_id in CHIPS:
        scenes = chip(data.scenes, chip_id)
        for hd in clear_dates(data, chip_id):
            idx = [i for i, d in enumerate(data.dates) if include_hr_date or d != hd]
            tile = _tile(chip_id, hd, "", hr_from(scenes[data.dates.index(hd)]),
                         [scenes[i] for i in idx], [data.labels[chip_id][data.dates[i]] for i in idx],
                         [data.dates[i] for i in idx])
            if include_hr_date:
                tile.hr_date_index = tile.capture_of_index.index(hd)
            out.append(tile)
    return out


def is_held_out(tile_id: str) -> bool:
    """The fixed held-out part of the real sets: by a hash of the chip id (second path element)."""
    parts = tile_id.split("/")
    key = "/".join(parts[:2])
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0 ** 64
    return h < HELD_OUT_FRACTION


# ---------------------------------------------------------------------------------------------
# Semi-real: real cloud shapes as physical veils on real clear frames.

_LAMBDA = np.array(WAVELENGTH_NM, dtype=np.float64)
_AEROSOL_TAU = (_LAMBDA / 490.0) ** -1.3  # Angstrom law, per unit optical depth at 490 nm
_AEROSOL_PATH = 0.08 * (_LAMBDA / 490.0) ** -2.0  # path reflectance per unit depth (steeper: phase function)
_AEROSOL_TAU[10] = _AEROSOL_PATH[10] = 0.0  # B10 (1375 nm) sits in a water-vapour absorption band
_SHADOW_BANDS = np.ones(13, bool)
_SHADOW_BANDS[10] = False  # B10 sees no ground, hence no shadow

# per veil: the chip-mean CLP (or CLM cover) a mask window must have to be used
_COVER = {HAZE: (0.15, 0.7), THIN_CLOUD: (0.15, 0.7), CLOUD: (0.05, 0.4), SHADOW: (0.15, 0.6)}


def _windows(data: EoLearnPatch, veil: str) -> list[tuple[int, str]]:
    """(mask index, window chip id) pairs whose cover suits `veil`."""
    lo, hi = _COVER[veil]
    out = []
    for m in range(len(data.mask_dates)):
        for w in CHIPS:
            cover = float(chip(data.clm[m], w).mean() if veil in (CLOUD, SHADOW) else chip(data.clp[m], w).mean())
            if lo <= cover <= hi:
                out.append((m, w))
    return out


def _shift(mask: np.ndarray, rng) -> np.ndarray:
    d = rng.uniform(3.0, 7.0)
    theta = np.deg2rad(rng.uniform(-35.0, -10.0))  # towards north-north-west: up the rows, left
    return ndimage.shift(mask.astype(np.float64), (-d * np.cos(theta), d * np.sin(theta)), order=1,
                         mode="constant", cval=0.0)


def veil(ground: np.ndarray, body: np.ndarray, clp: np.ndarray, clm: np.ndarray, kind: str, rng) -> np.ndarray:
    """float [32, 32, 13] reflectance `ground` under a veil of `kind` shaped by the real `clp`/`clm`
    window [32, 32]; `body` [32, 32, 13] is the real cloud reflectance at those pixels."""
    g = ground.astype(np.float64)
    if kind == HAZE:
        shape = ndimage.gaussian_filter(clp.astype(np.float64), 3.0)
        shape = (shape - shape.min()) / (np.ptp(shape) + 1e-9)
        depth = rng.uniform(0.25, 0.7) * (0.6 + 0.8 * shape)[..., None]
        return g * np.exp(-0.3 * _AEROSOL_TAU * depth) + _AEROSOL_PATH * depth
    if kind == THIN_CLOUD:
        a = (np.clip(clp, 0.0, 1.0) * rng.uniform(0.2, 0.45))[..., None]
        return (1.0 - a) * g + a * body
    if kind in (CLOUD, SHADOW):
        # the provider's masks are computed on a coarse grid (blocky edges): soften them like real cloud edges
        m = np.clip(ndimage.gaussian_filter(clm.astype(np.float64), 1.5, mode="nearest"), 0.0, 1.0)
        s = np.clip(_shift(m, rng), 0.0, 1.0) * rng.uniform(0.35, 0.6)
        shaded = g.copy()
        shaded[..., _SHADOW_BANDS] *= (1.0 - s)[..., None]
        if kind == SHADOW:
            return shaded
        a = np.clip(m * (0.6 + 0.4 * clp) + (1.0 - m) * 0.5 * clp, 0.0, 1.0)[..., None]  # body, soft edges
        return (1.0 - a) * shaded + a * body
    raise ValueError(f"unknown veil {kind!r}; expected one of {VEILS}")


MIN_VEIL_DN = 2.0  # a veiled frame's TCI differs from its clean frame by at least this mean |DN|
_VEIL_TRIES = 20


def _visible_veil(ground, body, data: EoLearnPatch, windows, kind: str, rng):
    """(veiled frame, mask index, window) whose veil changes the TCI by >= MIN_VEIL_DN on average
    (a shadow over dark forest can be invisible); the last draw if none of _VEIL_TRIES is."""
    clean = to_s2naip(ground)["tci"].astype(np.float64)
    for _ in range(_VEIL_TRIES):
        m, w = windows[int(rng.integers(len(windows)))]
        out = veil(ground, body, chip(data.clp[m], w), chip(data.clm[m], w), kind, rng)
        if np.abs(to_s2naip(out)["tci"] - clean).mean() >= MIN_VEIL_DN:
            break
    return out, m, w


def semi_real_tiles(data: EoLearnPatch, *, seed: int = 100, draws: int = 2) -> list[H.DevTile]:
    """Per chip, clear HR date, veiled clear date and veil kind, `draws` mask windows: the series is
    the real overcast dates, the veiled date (twin-free) and the other clear dates, clean."""
    out = []
    body_all = data.scenes[CLOUD_BODY_SCENE]
    windows = {k: _windows(data, k) for k in VEILS}
    for chip_id in CHIPS:
        scenes = chip(data.scenes, chip_id)
        body = chip(body_all, chip_id)
        clear = clear_dates(data, chip_id)
        for hd in clear:
            hr = hr_from(scenes[data.dates.index(hd)])
            for vd in clear:
                if vd == hd:
                    continue
                for kind in VEILS:
                    for n in range(draws):
                        rng = np.random.default_rng([seed, list(CHIPS).index(chip_id), data.dates.index(hd),
                                                     data.dates.index(vd), VEILS.index(kind), n])
                        veiled, m, w = _visible_veil(scenes[data.dates.index(vd)], body, data, windows[kind], kind, rng)
                        frames, kinds, dates = [], [], []
                        for i, d in enumerate(data.dates):
                            if d == hd:
                                continue
                            if d == vd:
                                frames.append(veiled)
                                kinds.append(kind)
                            else:
                                frames.append(scenes[i])
                                kinds.append(data.labels[chip_id][d])
                            dates.append(d)
                        perm = rng.permutation(len(frames))
                        out.append(_tile(chip_id, hd, f"/{vd}-{kind}-{data.mask_dates[m]}-{w}",
                                         hr, [frames[i] for i in perm], [kinds[i] for i in perm],
                                         [dates[i] for i in perm]))
    return out
