"""Per-timestep evidence of bad acquisition conditions, for the `robust` selection.

Pure numpy, every function vectorised over a leading axis of K timesteps (no per-pixel Python
loops). Frames are [K, C, H, W] digital numbers, uint8 or float (C = R, G, B[, NIR]: Sentinel-2 TCI
and B08) unless a function says otherwise; the extra bands are [K, H, W] as S2-NAIP stores them.

Radiometry, to turn digital numbers into top-of-atmosphere reflectance:
  TCI (R, G, B):          reflectance = DN * 0.3558 / 255  (the L1C TCI: 255 is reflectance 0.3558)
  B01, B08, B10, B11, B12: reflectance = DN * 32 / 1e4     (S2-NAIP: clip(raw // 32, 0, 255))

Measures (each documented at its function):
  dark_channel / haze_index         the dark-channel prior: haze lifts the darkest value of every patch
  contrast_loss                     loss of contrast against structurally identical timesteps
  aerosol_index                     B01 (coastal aerosol) above blue: aerosol path radiance
  cirrus_index                      B10 (1375 nm) cirrus reflectance as a probability
  snow_fraction                     NDSI from green and SWIR (B11, else B12)
  cloud_shadow_fractions            bright-white / dark outliers against a clean reference
  darkening, brightening            global under- / overexposure against the other timesteps
  underexposed                      the dark gate: far darker than the clearer timesteps and below
                                    the blue level of a lit scene
  hr_veil                           a smooth, colourless brightening that the HR does not explain
  veil_terms(clear_quantile=...)    haze evidence against the tile's clearest timesteps
  estimate_shift                    sub-pixel shift against a reference by phase correlation
  registration                      shifts against the HR and misregistration against a structural
                                    twin, arbitrated by agreement with the HR
  consensus_shift                   displacement against the tile's other timesteps (low-passed
                                    phase correlation of every pair, median over the partners)

"Twins" are timesteps of the same ground in the same state (revisits days apart): a veil or a shift
shows best against them. Measures relative to the other timesteps of a tile are only meaningful
within that tile.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

TCI_REFLECTANCE = 0.3558 / 255.0
BAND_REFLECTANCE = 32.0 / 1e4
R, G, B, N = range(4)

# optional bands the robust mode reads when a tile has them: the cirrus/aerosol/snow measures' b01,
# b10, b11, b12 and s2cloudless's b05, b08 (rgb builds; rgbn has it), b09 (`transforms.cloud_prob`)
EXTRA_BANDS = ("b01", "b05", "b08", "b09", "b10", "b11", "b12")


def _pixel_means(bands: np.ndarray) -> np.ndarray:
    """Mean over the last two (pixel) axes in float64, [..., H, W] -> [...]: for uint8 the sum is taken
    in integers (exact, as numpy's float64 sum of these integers is), then divided once: equal bit for
    bit to bands.mean(axis=(-2, -1), dtype=np.float64), without its strided float reduction."""
    if bands.dtype != np.uint8:
        return bands.mean(axis=(-2, -1), dtype=np.float64)
    h, w = bands.shape[-2:]
    return bands.reshape(*bands.shape[:-2], h * w).sum(axis=-1, dtype=np.int64) / float(h * w)


def _rgb_level(frames: np.ndarray) -> np.ndarray:
    """frames[:, :3].mean(axis=(1, 2, 3), dtype=np.float64), [K]: one integer sum for uint8 frames."""
    if frames.dtype != np.uint8:
        return frames[:, :3].mean(axis=(1, 2, 3), dtype=np.float64)
    k, _, h, w = frames.shape
    return frames[:, :3].reshape(k, 3 * h * w).sum(axis=-1, dtype=np.int64) / float(3 * h * w)


@dataclasses.dataclass
class Evidence:
    """What the robust selection measured for its candidates, each [K] aligned with them.

    A measure that needs an extra band the tile lacks is None (`bands` lists the ones used)."""

    bands: tuple[str, ...]  # extra bands used, in EXTRA_BANDS order
    distance: np.ndarray  # structural distance to the HR after removing the radiometric gap
    penalty: np.ndarray  # the evidence term of the score (score = distance + penalty)
    haze: np.ndarray  # contrast_loss against structural twins (~1 - transmission)
    dark_channel: np.ndarray  # haze_index: absolute haze level (TCI reflectance)
    cloud: np.ndarray  # fraction of cloud pixels
    shadow: np.ndarray  # fraction of shadow pixels, or the global darkening if larger
    misregistration_px: np.ndarray  # misregistration evidence (px; `registration`)
    hr_shift: np.ndarray  # [K, 2] (dy, dx) against the downsampled HR by phase correlation (px)
    shift_peak: np.ndarray  # its phase-correlation peak height (confidence, 0..1)
    aerosol: np.ndarray | None = None  # aerosol_index (needs b01)
    cirrus: np.ndarray | None = None  # cirrus_index (needs b10)
    snow: np.ndarray | None = None  # snow_fraction (needs b11 or b12)
    # twin-free veil evidence against the tile's other candidates (`veil_evidence`); zeros when
    # computed without it (manual choices measured alone)
    veil: np.ndarray | None = None
    # s2cloudless cloud probability (`transforms.cloud_prob`; needs b01, b05, b08, b09, b10, b11,
    # b12): measured on the best few candidates only, NaN for the others
    cloud_prob: np.ndarray | None = None
    # veil_evidence of veil_terms against the tile's clearest candidates (clear_quantile 0.25), the
    # score's veil term (`veil` above stays against the median: the --lr-timesteps acceptance limit)
    clear_veil: np.ndarray | None = None
    twin_misregistration_px: np.ndarray | None = None  # `registration`'s against a twin alone (px)
    hr_veil: np.ndarray | None = None  # `hr_veil`: colourless smooth brightening the HR does not explain
    underexposed: np.ndarray | None = None  # bool, the dark gate (`underexposed`): not a candidate
    # |displacement| against the tile's other candidates (`consensus_shift`, px; 0 where too few agree;
    # NaN where not measured: robust measures only candidates displaced against the HR beyond the
    # term's tolerance, `selection._consensus_shift_px`)
    consensus_shift_px: np.ndarray | None = None

    @property
    def shift_px(self) -> np.ndarray:
        """|shift| against the HR (px), [K]."""
        return np.hypot(self.hr_shift[:, 0], self.hr_shift[:, 1])

    def take(self, positions) -> "Evidence":
        """The evidence of the candidates at `positions` (in that order)."""
        positions = np.atleast_1d(np.asarray(positions, dtype=np.intp))
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name)[positions] for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), np.ndarray)})


# ---------------------------------------------------------------------------------------------
# Haze


def dark_channel(frames: np.ndarray, lowest: np.ndarray | None = None) -> np.ndarray:
    """He et al.'s dark channel: the minimum over R, G, B and a 3x3 window, [K, C>=3, H, W] ->
    [K, H-2, W-2] (interior pixels, the input's dtype). `lowest`: that minimum over R, G, B
    ([K, H, W]), if computed."""
    m = np.minimum(np.minimum(frames[:, 0], frames[:, 1]), frames[:, 2]) if lowest is None else lowest
    rows = np.minimum(np.minimum(m[:, :-2], m[:, 1:-1]), m[:, 2:])
    return np.minimum(np.minimum(rows[..., :-2], rows[..., 1:-1]), rows[..., 2:])


def haze_index(frames: np.ndarray) -> np.ndarray:
    """Mean dark channel as TCI reflectance, [K]: an absolute haze level (haze adds path radiance
    to the darkest objects). Clear farmland is ~0.02-0.06, but it depends on the ground too: compare
    it between timesteps of one tile rather than across tiles."""
    return _pixel_means(np.ascontiguousarray(dark_channel(frames))) * TCI_REFLECTANCE


def _block_mean(frames: np.ndarray, block: int) -> np.ndarray:
    """float32 frames [K, C, H, W] -> [K, C, H // block, W // block] block means, for block 2 or 4:
    the sums in the order numpy's mean over the two block axes takes (each block row in sequence,
    then the rows in sequence; the division by block**2 is exact), so it equals
    `reshape(...).mean(axis=(3, 5))` bit for bit, a few times faster (no strided reduction)."""
    k, c, h, w = frames.shape
    y = frames.reshape(k, c, h // block, block, w // block, block)
    cols = y[..., 0] + y[..., 1]  # [K, C, H/b, b, W/b]: each block row's sum
    for j in range(2, block):
        cols += y[..., j]
    acc = cols[:, :, :, 0] + cols[:, :, :, 1]
    for i in range(2, block):
        acc += cols[:, :, :, i]
    acc /= np.float32(block * block)
    return acc


def band_covariances(frames: np.ndarray, block: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per band covariances between timesteps over pixels, and their correlations: ([C, K, K] each).

    `block` > 1 block-averages the frames first, which makes the correlation tolerant of small
    shifts (used to find a misregistered timestep's twin)."""
    k, c, h, w = frames.shape
    frames = np.asarray(frames, dtype=np.float32)
    if block in (2, 4):
        frames = _block_mean(frames, block)
    elif block > 1:
        frames = frames.reshape(k, c, h // block, block, w // block, block).mean(axis=(3, 5))
    x = frames.reshape(k, c, -1)
    return _row_covariances(np.ascontiguousarray((x - x.mean(axis=-1, keepdims=True)).transpose(1, 0, 2)))


def _row_covariances(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`band_covariances` of centred float32 values laid out bands first, [C, K, P] contiguous."""
    cov = np.matmul(x, x.transpose(0, 2, 1)) / np.float32(x.shape[-1])
    sd = np.sqrt(np.maximum(np.diagonal(cov, axis1=1, axis2=2), 1e-12))  # [C, K]
    return cov, cov / (sd[:, :, None] * sd[:, None, :])


def laplacian(frames: np.ndarray) -> np.ndarray:
    """The 5-point Laplacian over the last two axes (interior pixels): [..., H, W] -> [..., H-2, W-2].

    Computed on each image's rows 1..H-2 as one run of pixels, the neighbours at offsets +-1 and +-W
    (the same arithmetic per pixel as on the 2-D interior slices, in long contiguous passes), then
    the interior columns kept (a contiguous copy)."""
    if frames.ndim < 2 or frames.shape[-2] < 3 or frames.shape[-1] < 3 or frames.dtype != np.float32:
        return (4.0 * frames[..., 1:-1, 1:-1] - frames[..., 2:, 1:-1] - frames[..., :-2, 1:-1]
                - frames[..., 1:-1, 2:] - frames[..., 1:-1, :-2])
    h, w = frames.shape[-2:]
    flat = np.ascontiguousarray(frames).reshape(-1, h * w)
    inner = slice(w, (h - 1) * w)  # rows 1..H-2, every column
    out = flat[:, inner] * np.float32(4.0)
    out -= flat[:, 2 * w:]
    out -= flat[:, : (h - 2) * w]
    out -= flat[:, w + 1 : (h - 1) * w + 1]
    out -= flat[:, w - 1 : (h - 1) * w - 1]
    return np.ascontiguousarray(out.reshape(*frames.shape[:-2], h - 2, w)[..., 1:-1])


def contrast_loss(frames: np.ndarray, twin_corr: float = 0.65, full_corr: float = 0.8,
                  cap: float = 0.5, distance: np.ndarray | None = None, margin: float = 0.1,
                  lap: np.ndarray | None = None, lap_cov: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Loss of fine-scale contrast of each timestep against its structural twins, [K] >= 0.

    On the Laplacian (fine detail, which field-scale radiometry and smooth cloud veils leave
    alone) of R, G, B: two timesteps whose detail correlates at >= `full_corr` (weight ramping up
    from `twin_corr`; different dates of the same ground stay below ~0.7, the same scene twice is
    ~0.85-0.99) show the same ground, and haze or thin cloud over one multiplies its detail by
    the transmission t < 1. The measure is max over twins i of weight * mean_b ln(sd_i,b / sd_j,b),
    capped at `cap`: ~0 for a clear timestep, ~1 - t for a veiled one, 0 without twins (then only
    the other evidence speaks). Cumulus, snow and shadows add or remove detail locally and
    decorrelate, so they are not twins of anything.

    With `distance` [K] (each timestep's distance to the HR, lower is closer), a twin i of j only
    counts while d_i <= d_j (weight fading to 0 at d_i = d_j + `margin`): a veil changes little of
    a timestep's structural distance, so a much farther "twin" is other ground whose detail merely
    looks alike. `lap`: `laplacian(frames[:, :3] as float32)`, if computed (`veil_measures` has it);
    `lap_cov`: `band_covariances(lap)`, if computed (`veil_measures` has it too)."""
    lap = laplacian(np.asarray(frames[:, :3], dtype=np.float32)) if lap is None else lap
    cov, corr = band_covariances(lap) if lap_cov is None else lap_cov
    sd = np.sqrt(np.diagonal(cov, axis1=1, axis2=2).astype(np.float64))  # [3, K]
    weight = np.clip((corr.mean(axis=0, dtype=np.float64) - twin_corr) / (full_corr - twin_corr), 0.0, 1.0)
    if distance is not None:  # weight[i, j]: i the twin, j the timestep
        weight *= np.clip(1.0 - (distance[:, None] - distance[None, :]) / margin, 0.0, 1.0)
    np.fill_diagonal(weight, 0.0)
    log_sd = np.log(sd + 0.5).mean(axis=0)  # +0.5 DN: flat frames do not blow up
    loss = np.minimum(log_sd[:, None] - log_sd[None, :], cap)  # [i, j]: > 0 when j has less detail
    return np.maximum((weight * loss).max(axis=0), 0.0)


def detail_level(frames: np.ndarray, lap: np.ndarray | None = None) -> np.ndarray:
    """Mean over R, G, B of ln(sd of the Laplacian + 0.5 DN), [K]: a timestep's fine detail. `lap`:
    `laplacian(frames[:, :3] as float32)`, if computed."""
    lap = laplacian(np.asarray(frames[:, :3], dtype=np.float32)) if lap is None else lap
    return np.log(lap.std(axis=(-2, -1), dtype=np.float64) + 0.5).mean(axis=-1)


def chroma(frames: np.ndarray) -> np.ndarray:
    """Mean of (max - min) / (max + 1) over R, G, B per pixel, [K]: haze and veils wash colour out."""
    if frames.dtype == np.uint8:  # max and min in uint8, the same values as in float32
        top = np.maximum(np.maximum(frames[:, R], frames[:, G]), frames[:, B])
        low = np.minimum(np.minimum(frames[:, R], frames[:, G]), frames[:, B])
        return _chroma_of(top, low)
    vis = np.asarray(frames[:, :3], dtype=np.float32)
    return ((vis.max(axis=1) - vis.min(axis=1)) / (vis.max(axis=1) + 1.0)).mean(axis=(-2, -1), dtype=np.float64)


def _chroma_of(top: np.ndarray, low: np.ndarray) -> np.ndarray:
    """`chroma` from the uint8 maximum and minimum over R, G, B, [K, H, W] each."""
    top = top.astype(np.float32)
    return ((top - low.astype(np.float32)) / (top + 1.0)).mean(axis=(-2, -1), dtype=np.float64)


def blue_red(frames: np.ndarray) -> np.ndarray:
    """ln(mean blue + 1) - ln(mean red + 1), [K]: aerosol path radiance lifts blue most."""
    m = _pixel_means(frames[:, :3]) if frames.dtype == np.uint8 else np.asarray(frames[:, :3], dtype=np.float64).mean(axis=(-2, -1))
    return np.log(m[:, B] + 1.0) - np.log(m[:, R] + 1.0)


@dataclasses.dataclass(frozen=True)
class VeilTerms:
    """Per-timestep departures from the tile's median timestep, each >= 0 where it means haze."""

    detail: np.ndarray  # loss of fine detail: median detail_level - detail_level (ln units)
    contrast: np.ndarray  # loss of contrast relative to the HR's: median - own ln(sd LR / sd HR)
    dark: np.ndarray  # dark channel above the median (TCI reflectance)
    colour: np.ndarray  # chroma below the median, over the median
    blue: np.ndarray  # blue/red ratio above the median (ln units)


def quantile(x: np.ndarray, q: float, axis: int = -1) -> np.ndarray:
    """np.quantile(x, q, axis) with its default (linear) interpolation, without its per-call
    overhead (~0.1-0.5 ms, which a tile's dozen quantiles of a few values would pay)."""
    s = np.sort(np.asarray(x, dtype=np.float64), axis=axis)
    n = s.shape[axis]
    pos = q * (n - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, n - 1)
    a = np.take(s, lo, axis=axis)
    b = np.take(s, hi, axis=axis)
    t = pos - lo
    return a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t)  # numpy's _lerp


@dataclasses.dataclass(frozen=True)
class VeilMeasures:
    """Each timestep's own haze-sensitive measures, [K] each (`veil_measures`), before any reference."""

    detail: np.ndarray  # detail_level
    dark: np.ndarray  # haze_index
    chroma: np.ndarray  # chroma
    blue: np.ndarray  # blue_red
    # laplacian(frames[:, :3] as float32), [K, 3, H-2, W-2], which contrast_loss can reuse
    lap: np.ndarray | None = None
    lap_cov: tuple[np.ndarray, np.ndarray] | None = None  # band_covariances(lap), which contrast_loss can reuse


def veil_measures(frames: np.ndarray) -> VeilMeasures:
    """The measures `veil_terms` compares, computed once (several references can share them).

    `detail` is `detail_level` with the Laplacian's variances read from its band covariances
    (float32 sums of the centred values instead of numpy's float64 std: equal to ~1e-6), which
    `contrast_loss` needs anyway. The Laplacian is taken on R, G, B laid out bands first ([3, K, H,
    W], converted and transposed in one pass), the layout the covariances multiply (no transposed
    copy of it); uint8 frames' minimum and maximum over R, G, B are shared by the dark channel and
    chroma. The same values as the separate functions, bit for bit."""
    k = frames.shape[0]
    vis = np.ascontiguousarray(frames[:, :3].transpose(1, 0, 2, 3), dtype=np.float32)  # [3, K, H, W]
    lap = laplacian(vis)  # [3, K, H-2, W-2]
    x = lap.reshape(3, k, -1)
    cov = _row_covariances(x - x.mean(axis=-1, keepdims=True))
    variance = np.maximum(np.diagonal(cov[0], axis1=1, axis2=2).astype(np.float64), 0.0)  # [3, K]
    detail = np.log(np.sqrt(variance) + 0.5).mean(axis=0)
    if frames.dtype == np.uint8:
        lowest = np.minimum(np.minimum(frames[:, R], frames[:, G]), frames[:, B])
        top = np.maximum(np.maximum(frames[:, R], frames[:, G]), frames[:, B])
        dark = _pixel_means(np.ascontiguousarray(dark_channel(frames, lowest))) * TCI_REFLECTANCE
        colour = _chroma_of(top, lowest)
    else:
        dark, colour = haze_index(frames), chroma(frames)
    return VeilMeasures(detail, dark, colour, blue_red(frames), np.moveaxis(lap, 0, 1), cov)


def veil_terms(frames: np.ndarray, contrast_to_hr: np.ndarray | None = None, clear_quantile: float = 0.5,
               usable: np.ndarray | None = None, measures: VeilMeasures | None = None) -> VeilTerms:
    """The twin-free haze measures of each timestep [K, C, H, W] against a reference taken among the
    tile's timesteps: no timestep needs a structurally identical twin. Haze and veils (thin cloud,
    smoke) multiply detail and contrast by the transmission, add path radiance to dark objects (most
    to blue) and wash colour out; ground changes between dates move these too, which is why each is
    measured against the other dates and why `veil_evidence` needs several of them to agree.

    The reference of each term is a quantile of the timesteps (`usable` ones only, e.g. not
    underexposed): `clear_quantile` q = 0.5 is the median date; q < 0.5 takes the reference at the
    *clear* end of each term, as physics orders it: the q-quantile of the dark channel and of the
    blue/red ratio (haze raises them), the (1 - q)-quantile of detail and chroma (haze lowers
    them). In series where half the dates are overcast or veiled, the median is a veiled date and
    a clear one then looks no better than it; the lower quartile (q = 0.25) is still a clear date.
    `contrast_to_hr` [K]: ln(sd LR / sd HR) per timestep (window contrast relative to the matched
    HR), if computed; `measures`: `veil_measures(frames)`, if computed."""
    pick = slice(None) if usable is None or not np.any(usable) else np.asarray(usable, dtype=bool)
    m = measures or veil_measures(frames)

    def above_low(x):  # rises with haze: reference at the low (clear) end
        return np.maximum(x - quantile(x[pick], clear_quantile), 0.0)

    c = m.chroma
    return VeilTerms(
        detail=above_low(-m.detail),
        contrast=np.zeros(len(c)) if contrast_to_hr is None else above_low(-contrast_to_hr),
        dark=above_low(m.dark),
        colour=np.maximum(1.0 - c / max(float(quantile(c[pick], 1.0 - clear_quantile)), 1e-6), 0.0),
        blue=above_low(m.blue),
    )


# scales at which each VeilTerms term counts fully, 0 = left out (tuned on the tune part of the
# twin-free synthetic set; `contrast` lowered the clean picks there, docs/selection-method.md)
VEIL_SCALES = {"detail": 1.0, "contrast": 0.0, "dark": 0.08, "colour": 1.0, "blue": 0.3}


def veil_evidence(terms: VeilTerms, scales: dict[str, float] = VEIL_SCALES) -> np.ndarray:
    """One veil score per timestep in [0, 1], [K]: the mean of the terms each over its scale,
    clipped to [0, 1] (a single term moved by a ground change counts for a fraction only)."""
    parts = [np.minimum(getattr(terms, name) / scale, 1.0) for name, scale in scales.items() if scale > 0]
    return np.mean(parts, axis=0) if parts else np.zeros(len(terms.detail))


def veil_evidence_pair(measures: VeilMeasures, clear_quantile: float, usable: np.ndarray | None = None,
                       scales: dict[str, float] = VEIL_SCALES) -> tuple[np.ndarray, np.ndarray]:
    """(`veil_evidence(veil_terms(...))` against the median timestep, the same against the clearest
    ones (`clear_quantile`, among the `usable`)) from one set of `measures`, without `contrast_to_hr`:
    the robust score's two veil references in a few array operations over both at once (the terms
    stacked, every reference quantile from one sort, the timesteps that are not usable sorted last)
    instead of a few dozen small ones. The same values and arithmetic as the plain calls, bit for
    bit (tests)."""
    m = measures
    names = [name for name, scale in scales.items() if scale > 0]
    rows = {"detail": m.detail, "dark": m.dark, "colour": m.chroma, "blue": m.blue}
    if "contrast" in names or set(names) - set(rows):
        raise ValueError("veil_evidence_pair has no contrast (to the HR) term: scales over detail, dark, colour, blue only")
    k = len(m.chroma)
    if not names:
        return np.zeros(k), np.zeros(k)
    t = len(names)
    x = np.empty((2, t, k))  # [reference, term, timestep], each term with the sign that rises with haze
    for i, name in enumerate(names):
        if name == "detail":
            np.negative(rows[name], out=x[0, i])
        else:
            x[0, i] = rows[name]
    pick = None if usable is None or not np.any(usable) else np.asarray(usable, dtype=bool)
    if pick is None:
        x[1] = x[0]
        counts = (k, k)
    else:
        np.copyto(x[1], np.where(pick, x[0], np.inf))
        counts = (k, int(np.count_nonzero(pick)))
    s = np.sort(x, axis=2)
    # `quantile`'s positions and weights of every (reference, term): q for the terms that rise with
    # haze, 1 - q for chroma (its clear end is the high one)
    lo_at, hi_at, frac = [], [], []
    for ref, (q, n) in enumerate(((0.5, counts[0]), (clear_quantile, counts[1]))):
        for i, name in enumerate(names):
            pos = (1.0 - q if name == "colour" else q) * (n - 1)
            lo = int(np.floor(pos))
            base = (ref * t + i) * k
            lo_at.append(base + lo)
            hi_at.append(base + min(lo + 1, n - 1))
            frac.append(pos - lo)
    a = s.reshape(-1)[lo_at].reshape(2, t)
    b = s.reshape(-1)[hi_at].reshape(2, t)
    frac = np.array(frac).reshape(2, t)
    d = b - a
    level = np.where(frac < 0.5, a + d * frac, b - d * (1.0 - frac))  # numpy's _lerp, as `quantile`
    terms = x[0] - level[..., None]
    np.maximum(terms, 0.0, out=terms)
    if "colour" in names:
        i = names.index("colour")
        colour = 1.0 - x[0, i] / np.maximum(level[:, i], 1e-6)[:, None]
        terms[:, i] = np.maximum(colour, 0.0)
    terms /= np.array([scales[name] for name in names])[:, None]
    np.minimum(terms, 1.0, out=terms)
    evidence = np.add.reduce(terms, axis=1) / t  # np.mean over the terms: their sum in order, divided
    return evidence[0], evidence[1]


def aerosol_index(b01: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Mean B01 (443 nm, 60 m) reflectance minus mean blue TCI reflectance, [K]: aerosol path
    radiance grows steeply towards short wavelengths, so haze raises B01 more than blue. Its
    level depends on the ground; compare it between timesteps of one tile."""
    return (_pixel_means(np.asarray(b01)) * BAND_REFLECTANCE - _pixel_means(frames[:, B]) * TCI_REFLECTANCE)


def cirrus_index(b10: np.ndarray, full: float = 0.04) -> np.ndarray:
    """Mean cirrus probability from B10 (1375 nm, where water vapour hides the ground): reflectance
    / `full`, clipped to [0, 1] per pixel (Fmask's cirrus test uses ~0.01-0.04), [K]."""
    p = np.minimum(np.asarray(b10) * np.float32(BAND_REFLECTANCE / full), np.float32(1.0))
    return p.mean(axis=(-2, -1), dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Clouds, shadows, snow


def ndsi(frames: np.ndarray, swir: np.ndarray) -> np.ndarray:
    """Normalised difference snow index (green - SWIR) / (green + SWIR) in reflectance, [K, H, W]."""
    g = frames[:, G] * np.float32(TCI_REFLECTANCE)
    s = np.asarray(swir) * np.float32(BAND_REFLECTANCE)
    return (g - s) / np.maximum(g + s, np.float32(1e-6))


def snow_mask(frames: np.ndarray, swir: np.ndarray) -> np.ndarray:
    """Snow pixels: NDSI > 0.4, green reflectance > 0.1 and (with B08) NIR reflectance > 0.11 (the
    MODIS/Sentinel-2 snow tests), [K, H, W] bool."""
    mask = (ndsi(frames, swir) > 0.4) & (frames[:, G] > 0.1 / TCI_REFLECTANCE)
    if frames.shape[1] > N:
        mask &= frames[:, N] > 0.11 / BAND_REFLECTANCE
    return mask


def snow_fraction(frames: np.ndarray, swir: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Fraction of snow pixels (`snow_mask`), [K]. `mask`: `snow_mask(frames, swir)`, if computed."""
    return (snow_mask(frames, swir) if mask is None else mask).mean(axis=(-2, -1))


def cloud_shadow_fractions(frames: np.ndarray, reference: np.ndarray, swir: np.ndarray | None = None,
                           bright: float = 40.0, shadow_ratio: float = 0.7,
                           snow: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cloud, shadow) pixel fractions, [K] each, of frames against `reference` [K, C, H, W], a
    clean prediction of every timestep (the HR histogram-matched to it, which carries the
    timestep's radiometry but not its clouds); both in DN (uint8 is fine).

    Cloud: brighter than the reference by more than `bright` DN in every visible band, whitish
    (min/max of R, G, B >= 0.6) and not darker in NIR; with a SWIR band, snow (`snow_mask`) is not
    cloud. Shadow: at most `shadow_ratio` of the reference in every band (NIR included: shadows
    darken all bands, most land-cover changes do not). `snow`: `snow_mask(frames, swir)`, if computed
    (the robust score shares it with `snow_fraction`; uint8 and int16 frames give the same mask)."""
    f = np.asarray(frames, dtype=np.int16)
    ref = np.asarray(reference, dtype=np.int16)
    vis = f[:, :3]
    if f.shape[1] >= 3:  # minima and maxima over R, G, B as elementwise ops (the same values)
        d = vis - ref[:, :3]
        cloud = np.minimum(np.minimum(d[:, 0], d[:, 1]), d[:, 2]) > bright
        low = np.minimum(np.minimum(vis[:, 0], vis[:, 1]), vis[:, 2])
        high = np.maximum(np.maximum(vis[:, 0], vis[:, 1]), vis[:, 2])
        cloud &= low * 5 >= high * 3
    else:
        cloud = (vis - ref[:, :3]).min(axis=1) > bright
        cloud &= vis.min(axis=1) * 5 >= vis.max(axis=1) * 3
    if f.shape[1] > N:
        cloud &= f[:, N] >= ref[:, N]
    if swir is not None:
        cloud &= ~(snow_mask(f, swir) if snow is None else snow)
    dim = (f + 1).astype(np.float32) <= np.float32(shadow_ratio) * (ref + 1)  # [K, C, H, W]
    shadow = dim[:, 0].copy()  # dim.all(axis=1), band by band
    for band in range(1, dim.shape[1]):
        shadow &= dim[:, band]
    return cloud.mean(axis=(-2, -1)), shadow.mean(axis=(-2, -1))


def _exposure(frames: np.ndarray, q: float = 0.5, level: np.ndarray | None = None) -> np.ndarray:
    """Mean R, G, B of each timestep over the `q`-quantile of those means (the median), [K]. `level`:
    `_rgb_level(frames)`, if computed."""
    level = _rgb_level(frames) if level is None else level
    return level / max(float(quantile(level, q)), 1e-6)


def darkening(frames: np.ndarray, level: np.ndarray | None = None) -> np.ndarray:
    """1 - mean brightness / the lower quartile of the timesteps' mean brightness, >= 0, [K]: an
    underexposed (or fully shadowed) timestep scores near 1 - its exposure factor. The lower
    quartile, not the median: in real series half overcast, the median is a grey overcast frame
    and every clear frame would look dark against it. `level`: the mean R, G, B brightness of each
    timestep (`_rgb_level`), if computed."""
    return np.maximum(1.0 - _exposure(frames, 0.25, level), 0.0)


def brightening(frames: np.ndarray, level: np.ndarray | None = None) -> np.ndarray:
    """1 - the median of the timesteps' mean brightness / mean brightness, >= 0, [K]: a timestep
    mostly under cloud (or snow) scores high, whatever reference its clouds fool. `level`: as in
    `darkening`."""
    return np.maximum(1.0 - 1.0 / np.maximum(_exposure(frames, level=level), 1e-6), 0.0)


@functools.lru_cache(maxsize=8)
def _nearest_gaussian(size: int, sigma: float) -> np.ndarray:
    """[size, size] matrix of scipy.ndimage.gaussian_filter1d (truncate 4, mode "nearest"): rows
    of taps with the edge pixel repeated beyond the border."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    taps /= taps.sum()
    m = np.zeros((size, size))
    for o in range(size):
        for k, tap in enumerate(taps):
            m[o, min(max(o + k - radius, 0), size - 1)] += tap
    m = m.astype(np.float32)
    m.flags.writeable = False
    return m


BLUE_FLOOR = 0.06  # TOA reflectance: clear-sky path radiance alone lifts a lit scene's mean blue to ~0.04-0.06


def underexposed(frames: np.ndarray, ratio: float = 0.6, blue_floor: float = BLUE_FLOOR,
                 reference_quantile: float = 0.1, level: np.ndarray | None = None) -> np.ndarray:
    """The dark gate, bool [K]: timesteps both far darker than the clearer others (mean R, G, B below
    `ratio` x the `reference_quantile` of the *other* timesteps' means) and darker in blue than a lit
    scene can be (mean blue TOA reflectance below `blue_floor`: Rayleigh and aerosol path radiance
    keep a sunlit scene's mean blue above ~0.04-0.06 even over dark forest). Either alone is not
    enough: NAIP-like captures differ 2x in brightness from year to year, and a clear frame in a
    series half overcast or veiled is far darker than most of the others, but only an underexposed
    (or fully shadowed) frame is both. These are not candidates at all.
    The reference is a low quantile (0.1, since 0.3.1; the lower quartile before): real summer
    series are often more than three quarters cloudy or veiled (13 of 18 dates in one year of the
    real L2A series), and their lower quartile is then a veiled date; against it the clear frames
    of dark forest fell below 0.6 and were gated, every one of them in some tiles (L2A surface
    reflectance is also below the blue floor), which left only cloudy candidates. Planted
    underexposure (x0.12-0.3) stays below 0.6 of the 0.1 quantile (docs/selection-method.md).
    `level`: as in `darkening`."""
    level = _rgb_level(frames) if level is None else level
    k = len(level)
    if k < 2:
        return np.zeros(k, dtype=bool)
    relative = level < ratio * _quantile_of_others(level, reference_quantile)
    blue = _pixel_means(frames[:, B]) * TCI_REFLECTANCE
    return relative & (blue < blue_floor)


def _quantile_of_others(values: np.ndarray, q: float) -> np.ndarray:
    """[K]: for each value, `quantile` (numpy's linear rule) of the K - 1 *other* values, from one sort:
    the others of value i, sorted, are the sorted values without i's place (equal values are
    interchangeable), so their n-th is sorted[n] before that place and sorted[n + 1] from it on (the
    same values and arithmetic as `quantile` of each row of others, bit for bit)."""
    values = np.asarray(values, dtype=np.float64)
    k = len(values)
    order = np.argsort(values, kind="stable")
    ranked = values[order]
    place = np.empty(k, dtype=np.intp)
    place[order] = np.arange(k)
    pos = q * (k - 2)
    lo = int(np.floor(pos))
    hi = min(lo + 1, k - 2)
    a = np.where(lo < place, ranked[lo], ranked[lo + 1])
    b = np.where(hi < place, ranked[hi], ranked[min(hi + 1, k - 1)])
    t = pos - lo
    return a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t)  # numpy's _lerp, as `quantile`


def hr_veil(frames: np.ndarray, hr: np.ndarray, sigma: float = 2.5, spread_dn: float = 2.0) -> np.ndarray:
    """A smooth, colourless brightening of each timestep that the HR does not explain, [K] >= 0.

    Each band of the timestep [K, C, H, W] is fitted to the downsampled HR [C', H, W] (same size,
    C' >= 3) by a gain and an offset (least squares), which absorbs the radiometric gap and any
    uniform veil; the residual is low-passed (Gaussian, `sigma` px). A veil (thin cloud, haze,
    smoke, cumulus) leaves residual patches that brighten R, G and B *together*; a change of the
    ground between the HR's date and the timestep's moves the bands apart (a harvested field
    brightens red far more than blue, greening darkens red and lifts green). The measure is the
    mean over pixels of the residual's grey part above its median, over the residual's spread
    across R, G, B (+ `spread_dn`): ~0 for a clear timestep of changed ground, large for veils.
    Compare it between timesteps of one tile (the clearest ones are the reference)."""
    f = np.asarray(frames[:, :3], dtype=np.float32)
    k, c, h, w = f.shape
    ref = np.asarray(hr, dtype=np.float32)[:3].reshape(1, c, -1)
    x = f.reshape(k, c, -1)
    rc = ref - ref.mean(axis=-1, keepdims=True)
    xc = x - x.mean(axis=-1, keepdims=True)
    gain = (rc * xc).sum(axis=-1) / ((rc * rc).sum(axis=-1) + np.float32(1e-6))
    residual = (xc - gain[..., None] * rc).reshape(k, c, h, w)
    low = np.matmul(_nearest_gaussian(h, sigma), residual @ _nearest_gaussian(w, sigma).T)
    if c == 3:  # the band mean, max and min as numpy's reductions over 3 bands give them, without them
        grey = ((low[:, 0] + low[:, 1]) + low[:, 2]) / np.float32(3.0)
        spread = np.maximum(np.maximum(low[:, 0], low[:, 1]), low[:, 2]) - np.minimum(np.minimum(low[:, 0], low[:, 1]), low[:, 2])
        grey, spread = grey.reshape(k, -1), spread.reshape(k, -1)
    else:
        grey = low.mean(axis=1).reshape(k, -1)
        spread = (low.max(axis=1) - low.min(axis=1)).reshape(k, -1)
    n = grey.shape[1]
    if n % 2 == 0 and np.isfinite(grey).all():  # np.median's value: the mean of the two middle values
        # one selection: the upper middle value, and the lower one as the largest value below it (a
        # partition with both as kth costs ~4x more for these rows)
        part = np.partition(grey, n // 2, axis=1)
        median = (part[:, : n // 2].max(axis=1, keepdims=True) + part[:, n // 2 : n // 2 + 1]) / np.float32(2.0)
    else:
        median = np.median(grey, axis=1, keepdims=True)
    lift = np.maximum(grey - median, np.float32(0.0))
    return (lift / (spread + np.float32(spread_dn))).mean(axis=1, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Shifts


@functools.lru_cache(maxsize=8)
def _window(h: int, w: int) -> np.ndarray:
    win = np.outer(np.hanning(h + 2)[1:-1], np.hanning(w + 2)[1:-1]).astype(np.float32)
    win.flags.writeable = False
    return win


@functools.lru_cache(maxsize=8)
def _dft_factors(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 factors of the forward real 2-D DFT (numpy's rfft2) of [H, W] images: (rows [W,
    2 (W//2+1)]: cos | -sin of each column bin, the real DFT over each row; columns [2H, 2H]:
    [[cos, sin], [-sin, cos]] of each row bin, the complex DFT over each column of re stacked over im)."""
    v = np.arange(w // 2 + 1)
    angle = 2 * np.pi * np.outer(np.arange(w), v) / w
    rows = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1).astype(np.float32)
    angle = 2 * np.pi * np.outer(np.arange(h), np.arange(h)) / h
    cos, sin = np.cos(angle), np.sin(angle)
    cols = np.block([[cos, sin], [-sin, cos]]).astype(np.float32)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


def _rfft2_rows_first(images: np.ndarray) -> np.ndarray:
    """numpy's rfft2 of float32 images [N, H, W], laid out rows first: complex64 [H, N, W//2+1], by two
    matrix products (`_dft_factors`). For a few dozen 32x32 images this is cheaper than the FFT's
    per-row calls, and equal to it to float32 rounding (~1e-7 of the largest bin)."""
    n, h, w = images.shape
    rows, cols = _dft_factors(h, w)
    half = rows.shape[1] // 2
    z = (images.reshape(n * h, w) @ rows).reshape(n, h, 2, half)  # each row's DFT: re, im
    z = np.ascontiguousarray(z.transpose(2, 1, 0, 3)).reshape(2 * h, n * half)  # re over im, rows first
    m = (cols @ z).reshape(2, h, n, half)  # each column's DFT: re = cos re + sin im, im = cos im - sin re
    out = np.empty((h, n, half), dtype=np.complex64)
    out.real = m[0]
    out.imag = m[1]
    return out


def _windowed(frames: np.ndarray, inplace: bool = False) -> np.ndarray:
    """float32 frames [..., H, W], each mean-removed and Hann-windowed (what `spectra` transforms);
    `inplace`: into `frames` themselves (float32), no new array."""
    frames = np.asarray(frames, dtype=np.float32)
    h, w = frames.shape[-2:]
    if inplace:
        frames -= frames.mean(axis=(-2, -1), keepdims=True)
        centred = frames
    else:
        centred = frames - frames.mean(axis=(-2, -1), keepdims=True)
    centred *= _window(h, w)
    return centred


def spectra(frames: np.ndarray) -> np.ndarray:
    """Spectra of Hann-windowed, mean-removed frames [..., H, W] -> complex64 [..., H, W//2+1]
    (numpy's rfft2 of them to float32 rounding, `_rfft2_rows_first`)."""
    x = _windowed(frames)
    h, w = x.shape[-2:]
    spec = _rfft2_rows_first(x.reshape(-1, h, w))
    return np.ascontiguousarray(spec.transpose(1, 0, 2)).reshape(*x.shape[:-1], spec.shape[-1])


def _whiten(spec: np.ndarray, copy: bool = True) -> np.ndarray:
    """Spectra scaled to unit magnitude, complex64 (a new array unless `copy` is False): the phase
    alone, which phase correlation compares. Zero bins stay zero."""
    out = np.array(spec, dtype=np.complex64, copy=copy or None)
    out *= np.float32(1.0) / (np.abs(out) + np.float32(1e-9))  # a real factor on re and im
    return out


@functools.lru_cache(maxsize=8)
def _inverse_dft_window(h: int, w: int, window: int, bands: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [2w+1, H], columns [W//2+1, 2w+1]) complex64 factors of the inverse real 2-D DFT
    (numpy's irfft2 with s = (H, W), normalised by 1 / (H W)) evaluated at the displacements -w..w on
    each axis only, for a spectrum summed over `bands` bands (the mean's 1 / bands folded in):
    surface = Re(rows @ half-spectrum @ columns). The columns weigh each half-spectrum bin twice
    (its conjugate mirror), DC and the Nyquist bin once, as irfft does."""
    d = np.arange(-window, window + 1)
    rows = np.exp(2j * np.pi * np.outer(d, np.arange(h)) / h) / h
    v = np.arange(w // 2 + 1)
    weight = np.where((v == 0) | (2 * v == w), 1.0, 2.0)
    cols = weight[:, None] * np.exp(2j * np.pi * np.outer(v, d) / w) / (w * bands)
    rows, cols = rows.astype(np.complex64), cols.astype(np.complex64)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


def _surface_window(cross_sum: np.ndarray, size: tuple[int, int], window: int, bands: int) -> np.ndarray:
    """float32 [N, 2w+1, 2w+1]: the phase-correlation surfaces of cross-power spectra summed over
    `bands` bands, [N, H, W//2+1], at displacements -w..w only (zero shift at [w, w]), by two matrix
    products with `_inverse_dft_window`'s factors instead of full inverse FFTs (equal to the full
    surface's centre to float32 rounding, ~1e-7)."""
    h, w = size
    rows, cols = _inverse_dft_window(h, w, window, bands)
    n = cross_sum.shape[0]
    half = np.matmul(cross_sum.reshape(n * h, -1), cols).reshape(n, h, 2 * window + 1)  # over columns
    return np.matmul(rows, half).real  # over rows, per surface


def phase_correlation(fa: np.ndarray, fb: np.ndarray, size: tuple[int, int], window: int | None = None) -> np.ndarray:
    """Phase-correlation surfaces of spectra `fa` [K, C, H, W'] against `fb` (broadcasting), bands
    combined by averaging their normalised cross-power: [K, H, W] with zero shift at [H//2, W//2].
    The peak is at the displacement of a's content relative to b's; its height is in [0, 1]
    (1 for identical frames). With `window` w, only the [K, 2w+1, 2w+1] values around zero shift
    (the same values to float32 rounding, centred at [w, w]; what `peak_shift` reads), by a windowed
    inverse DFT instead of the whole surface's FFT. Each spectrum is normalised to unit magnitude
    before the product (`_whiten`), which equals normalising the product to float32 rounding
    (bins of magnitude > ~1e-4; empty bins stay 0 either way)."""
    cross = _whiten(fa) * np.conj(_whiten(fb))
    if window is None:
        return np.fft.fftshift(np.fft.irfft2(cross.mean(axis=-3), s=size), axes=(-2, -1))
    bands = cross.shape[-3]
    return _surface_window(cross.sum(axis=-3), size, window, bands)


def _cross_sum(ua: np.ndarray, ub_conj: np.ndarray, out: np.ndarray, axis: int = 1) -> np.ndarray:
    """out = the sum over the bands (axis `axis`) of ua * ub_conj (broadcasting), band by band (no
    temporary of all bands, no reduction over a short axis)."""
    def band(x, i):  # a view of band i
        return x[(slice(None),) * axis + (i,)]

    np.multiply(band(ua, 0), band(ub_conj, 0), out=out)
    for i in range(1, ua.shape[axis]):
        out += band(ua, i) * band(ub_conj, i)
    return out


def _surface_window_rows_first(cross_sum: np.ndarray, size: tuple[int, int], window: int, bands: int) -> np.ndarray:
    """`_surface_window` of cross-power spectra laid out rows first, [H, N, W//2+1] -> float32 [N, 2w+1,
    2w+1]: two plain matrix products, no product per surface."""
    h, w = size
    rows, cols = _inverse_dft_window(h, w, window, bands)
    n, j = cross_sum.shape[1], cols.shape[1]
    half = (cross_sum.reshape(h * n, -1) @ cols).reshape(h, n * j)  # over columns
    return (rows @ half).real.reshape(rows.shape[0], n, j).transpose(1, 0, 2)  # over rows


@functools.lru_cache(maxsize=8)
def _peak_tables(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """For each flat position `at` of the (2 radius + 1)^2 search window: (the flat positions of that
    pixel and its four neighbours, centre, up, left, down, right, in the window with one px of margin
    [(2r+1)^2, 5], intp; its integer shift (dy, dx) [(2r+1)^2, 2], float64)."""
    side, size = 2 * radius + 1, 2 * radius + 3
    py, px = np.divmod(np.arange(side * side), side)
    centre = (py + 1) * size + px + 1
    near = centre[:, None] + np.array([0, -size, -1, size, 1])
    shift = np.stack([py - radius, px - radius], axis=1).astype(np.float64)
    near.flags.writeable = shift.flags.writeable = False
    return near, shift


@functools.lru_cache(maxsize=256)
def _surface_starts(k: int, area: int) -> np.ndarray:
    """[k, 1] flat offsets of k consecutive windows of `area` values (read-only, cached per k)."""
    starts = np.arange(0, k * area, area)[:, None]
    starts.flags.writeable = False
    return starts


def peak_shift(surfaces: np.ndarray, radius: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shift [K, 2] as (dy, dx) in pixels, peak height [K], height at zero shift [K]) of phase-
    correlation surfaces [K, H, W], searching |dy|, |dx| <= `radius`; sub-pixel by a parabola
    through the peak and its neighbours on each axis.

    A tile calls this on a few dozen 9x9 windows at a time, where each numpy call's overhead is most
    of the cost: the peak's neighbours and its integer shift come from tables indexed by its
    position (`_peak_tables`), the neighbours of all surfaces by one flat `take`, and the parabola's
    offset is clipped by a minimum and a maximum (numpy's clip on these finite values); the values
    are those of plain indexing bit for bit (tests)."""
    k, h, w = surfaces.shape
    cy, cx = h // 2, w // 2
    size = 2 * radius + 3  # the search window and one px of margin
    sub = np.ascontiguousarray(surfaces[:, cy - radius - 1:cy + radius + 2, cx - radius - 1:cx + radius + 2])
    at = sub[:, 1:-1, 1:-1].reshape(k, -1).argmax(axis=1)
    near_at, shift_at = _peak_tables(radius)
    # the peak and its four neighbours (up, left, down, right) of every surface, gathered in one pass
    index = near_at.take(at, axis=0)
    index += _surface_starts(k, size * size)
    near = np.take(sub, index)
    c0 = near[:, 0]
    m, p = near[:, 1:3], near[:, 3:5]  # (up, left) and (down, right): dy then dx
    den = m - 2.0 * c0[:, None]
    den += p
    curved = den < 0
    safe = np.where(curved, den, -1.0)
    vertex = m - p
    vertex *= 0.5
    vertex /= safe
    offset = np.maximum(np.minimum(np.where(curved, vertex, 0.0), 0.5), -0.5)
    shift = shift_at.take(at, axis=0)
    shift += offset
    shift[c0 <= 1e-6] = 0.0  # nothing correlates (a featureless frame): no shift to speak of
    return shift, c0.astype(np.float64), sub[:, radius + 1, radius + 1].astype(np.float64)


def registration_channels(frames: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The images registration compares, [K, C, H, W] -> float32 [K, 1|2, H, W]: the mean of R, G,
    B, and NIR when there is one (structure that survives changes of the visible look). `out`: a
    float32 buffer of that shape to write them into (no stacked copy)."""
    k, c, h, w = frames.shape
    if out is None:
        out = np.empty((k, 2 if c > 3 else 1, h, w), dtype=np.float32)
    if frames.dtype == np.uint8:
        # the integer sum (exact), divided as numpy's float32 mean divides it: in float64, then rounded
        total = frames[:, 0].astype(np.int16) + frames[:, 1]
        total += frames[:, 2]
        np.divide(total, 3.0, out=out[:, 0], dtype=np.float64)
    else:  # numpy's float32 mean over 3 bands: their float32 sum in order, divided in float64, rounded
        total = np.asarray(frames[:, 0], dtype=np.float32) + np.asarray(frames[:, 1], dtype=np.float32)
        total += np.asarray(frames[:, 2], dtype=np.float32)
        np.divide(total, np.float64(3.0), out=out[:, 0], dtype=np.float64)
    if c > 3:
        out[:, 1] = frames[:, 3]
    return out


def estimate_shift(frames: np.ndarray, reference: np.ndarray, radius: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel shift (dy, dx) of each frame [K, C, H, W] against `reference` [C, H, W] by phase
    correlation, and the peak height (confidence, 0..1): ([K, 2], [K])."""
    spec = spectra(registration_channels(frames))
    ref = spectra(registration_channels(np.asarray(reference)[None]))
    shift, peak, _ = peak_shift(phase_correlation(spec, ref, frames.shape[-2:], radius + 1), radius)
    return shift, peak


@dataclasses.dataclass
class Registration:
    hr_shift: np.ndarray  # [K, 2] (dy, dx) against the HR
    hr_peak: np.ndarray  # [K] phase-correlation peak height against the HR
    misregistration: np.ndarray  # [K] px, 0 unless misregistered against a twin (see `registration`)
    partner: np.ndarray  # [K] index of each timestep's twin (-1 without one)
    partner_shift: np.ndarray  # [K, 2] shift against it
    partner_peak: np.ndarray  # [K] its phase-correlation peak
    # the frames' whitened spectra, rows first [H, K, C, W//2+1] (`consensus_shift` reuses them)
    unit_spectra: np.ndarray | None = None


def registration(frames: np.ndarray, reference: np.ndarray, smoothed: np.ndarray | None = None,
                 twin_peak: float = 0.3, min_shift: float = 0.5, undecided: float = 0.1,
                 radius: int = 3) -> Registration:
    """Shifts of the timesteps [K, C, H, W] against the HR `reference` [C, H, W] and against each
    other, by phase correlation (one batch of FFTs).

    Against the HR: sub-pixel (dy, dx) and peak height; reliable when the timestep shows the HR's
    ground as it was (peak ~0.3-0.9), noise when the ground has changed since (peak ~0.1).

    Misregistration: each timestep's twin is the one most correlated with it on `smoothed` (the
    frames low-passed, [K, C', h', w'], e.g. the SSIM window means; default: 4x4 block means),
    which tolerates shifts of 1-2 px. Phase correlation of the two gives their relative shift and
    a peak (same ground: ~0.3-0.9; different ground: ~0.1). When twins agree on the ground (peak >=
    `twin_peak`) but are displaced by >= `min_shift` px, one of them is misregistered: the one that
    agrees less with the HR at zero shift gets the shift as evidence, the other 0; when their
    agreements differ by less than `undecided` (the HR is no judge: its ground has changed), both
    get it."""
    k = frames.shape[0]
    size = frames.shape[-2:]
    bands = 2 if frames.shape[1] > 3 else 1
    both = np.empty((k + 1, bands, *size), dtype=np.float32)  # the frames' channels, then the HR's
    chans = registration_channels(frames, out=both[:k])
    registration_channels(np.asarray(reference)[None], out=both[k:])
    # the twins by the channels' block means, before the spectra's windowing (in place) changes them
    c = None if k < 2 else (band_covariances(chans, block=4) if smoothed is None else band_covariances(smoothed))
    _windowed(both, inplace=True)
    h, w = size
    # the spectra of the frames and the reference by one DFT, rows first [H, K+1, C, W'], each
    # normalised once (`_whiten`), not every product of two
    unit = _whiten(_rfft2_rows_first(both.reshape(-1, h, w)), copy=False).reshape(h, k + 1, bands, -1)
    spec, window = unit[:, :k], radius + 1
    conj = np.conj(unit)
    if k < 2:
        cross = _cross_sum(spec, conj[:, k:], np.empty((h, k, unit.shape[-1]), dtype=np.complex64), axis=2)
        shift, peak, _ = peak_shift(_surface_window_rows_first(cross, size, window, bands), radius)
        return Registration(shift, peak, np.zeros(k), np.full(k, -1), np.zeros((k, 2)), np.zeros(k), spec)
    c = c[1].mean(axis=0)
    np.fill_diagonal(c, -np.inf)
    partner = c.argmax(axis=1)
    cross = np.empty((h, 2 * k, unit.shape[-1]), dtype=np.complex64)  # against the HR, then the twin
    _cross_sum(spec, conj[:, k:], cross[:, :k], axis=2)
    _cross_sum(spec, conj[:, partner], cross[:, k:], axis=2)
    shift, peak, zero = peak_shift(_surface_window_rows_first(cross, size, window, bands), radius)
    hr_shift, hr_peak, hr_zero = shift[:k], peak[:k], zero[:k]
    rel, rel_peak = shift[k:], peak[k:]
    rel_px = np.hypot(rel[:, 0], rel[:, 1])
    off = (rel_peak >= twin_peak) & (rel_px >= min_shift) & (hr_zero < hr_zero[partner] + undecided)
    return Registration(hr_shift, hr_peak, np.where(off, rel_px, 0.0), partner, rel, rel_peak, spec)


# ---------------------------------------------------------------------------------------------
# Misregistration against the tile's consensus


@functools.lru_cache(maxsize=8)
def _low_pass_surface(h: int, w: int, sigma: float, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What `consensus_shift` needs to turn a cross-power spectrum [..., h, w//2+1] into the centre
    [..., 2 window + 1, 2 window + 1] of its phase-correlation surface: the Gaussian weights of
    `sigma` cycles/px over the rfft2 frequencies (float32), divided by the weighted surface's value
    for two identical frames (so that its peak is 1); and `_inverse_dft_window`'s rows and columns
    for one band, so the window costs two small matrix products instead of full inverse FFTs."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    weights = np.exp(-0.5 * (fy * fy + fx * fx) / sigma**2)
    weights /= np.fft.irfft2(weights, s=(h, w))[0, 0]
    weights = weights.astype(np.float32)
    weights.flags.writeable = False
    rows, cols = _inverse_dft_window(h, w, window, 1)
    return weights, rows, cols


@functools.lru_cache(maxsize=64)
def _pairs(k: int) -> tuple[np.ndarray, np.ndarray]:
    """np.triu_indices(k, 1), read-only and cached: numpy builds them through broadcasting and
    masks, ~0.1 ms a call, a fifth of `consensus_shift`'s own cost."""
    i, j = np.triu_indices(k, 1)
    i.flags.writeable = j.flags.writeable = False
    return i, j


def _subset_median(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """np.median(values[t][keep[t]], axis=0) for every t at once: values [K, K, 2], keep bool [K, K]
    (rows with nothing kept give NaN)."""
    s = np.sort(np.where(keep[..., None], values, np.inf), axis=1)
    n = keep.sum(axis=1)
    lo = np.maximum((n - 1) // 2, 0)
    hi = np.maximum(n // 2, 0)
    t = np.arange(len(n))
    with np.errstate(invalid="ignore"):
        med = 0.5 * (s[t, lo] + s[t, hi])
    return np.where((n > 0)[:, None], med, np.nan)


def consensus_shift(frames: np.ndarray, sigma: float = 0.15, min_peak: float = 0.2, min_partners: int = 3,
                    radius: int = 3, unit_spectra: np.ndarray | None = None,
                    needed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each timestep's displacement against the tile's other timesteps, ([K, 2] (dy, dx) px, [K]
    partners): no HR, no twin.

    Every pair of timesteps [K, C, H, W] is registered by phase correlation (`registration_channels`)
    with the cross-power spectrum weighted by a Gaussian of `sigma` cycles/px: Sentinel-2 frames of
    different dates share the ground's coarse layout, while their fine detail (noise, ground change)
    decorrelates and would flatten the whitened peak; the weighting raises the peak of different
    dates of the same ground from ~0.12 to ~0.2-0.4 on 32x32 frames (identical frames: 1). A
    timestep's partners are the others whose peak reaches `min_peak` (same ground, recognisably);
    with at least `min_partners` of them, its displacement is the component-wise median of its
    shifts against them, else 0 (too few dates agree to form a consensus: a 4-date series half
    overcast has none). Correctly registered dates scatter around each other by their geolocation
    error; a date misregistered by 1-2 px sits that far from all of them, and the median is robust
    to a minority of misregistered partners. Pairs are registered once (the surface of (j, i) is
    that of (i, j) mirrored). `unit_spectra`: the frames' whitened spectra rows first, [H, K, C,
    W//2+1], as `registration` computes them (`Registration.unit_spectra`); computed here if absent.
    `needed` (bool [K]): measure only these timesteps (only the pairs that involve one are
    registered; each needed timestep's value equals the full computation's); the others get NaN
    and -1 partners."""
    k = frames.shape[0]
    shift = np.zeros((k, 2))
    if needed is not None:
        needed = np.asarray(needed, dtype=bool)
        shift[~needed] = np.nan
    if k < 2 or (needed is not None and not needed.any()):
        partners = np.zeros(k, dtype=np.int64)
        if needed is not None:
            partners[~needed] = -1
        return shift, partners
    h, w = frames.shape[-2:]
    if unit_spectra is None:
        chans = _windowed(registration_channels(frames))
        c = chans.shape[1]
        unit_spectra = _whiten(_rfft2_rows_first(chans.reshape(-1, h, w)), copy=False).reshape(h, k, c, -1)
    c = unit_spectra.shape[2]
    weights, rows, cols = _low_pass_surface(h, w, sigma, radius + 1)
    # the normalised cross-power of a pair is the product of the two unit spectra; summed over the
    # bands and weighted, for every pair (i < j) at once, each spectrum a contiguous row [P, H W']
    i, j = _pairs(k)
    if needed is not None:
        involved = needed[i] | needed[j]
        i, j = i[involved], j[involved]
    half_w = unit_spectra.shape[-1]
    rows_of = np.ascontiguousarray(unit_spectra.transpose(2, 1, 0, 3)).reshape(c, k, h * half_w)
    # the low-pass weights (and the bands' mean) folded into the K conjugate spectra instead of the
    # P > K products (the same products to float32 rounding)
    conj_of = np.conj(rows_of)
    conj_of *= (weights / np.float32(c)).reshape(-1)
    cross = np.multiply(rows_of[0].take(i, axis=0), conj_of[0].take(j, axis=0))
    for band in range(1, c):
        cross += rows_of[band].take(i, axis=0) * conj_of[band].take(j, axis=0)
    # the surfaces' centres by two plain matrix products: over columns, then over rows
    n, m = len(i), cols.shape[1]
    over_cols = (cross.reshape(n * h, half_w) @ cols).reshape(n, h, m)
    over_cols = np.ascontiguousarray(over_cols.transpose(1, 0, 2)).reshape(h, n * m)
    surfaces = (rows @ over_cols).real.reshape(rows.shape[0], n, m).transpose(1, 0, 2)
    pair_shift, pair_peak, _ = peak_shift(surfaces, radius)
    shifts = np.zeros((k, k, 2))
    peaks = np.zeros((k, k))
    shifts[i, j], shifts[j, i] = pair_shift, -pair_shift
    peaks[i, j] = peaks[j, i] = pair_peak
    agree = peaks >= min_peak  # the diagonal is 0: a timestep is not its own partner
    partners = agree.sum(axis=1)
    enough = partners >= min_partners
    if needed is not None:
        partners[~needed] = -1
        enough &= needed
    if enough.any():
        shift[enough] = _subset_median(shifts[enough], agree[enough])  # row by row: only the rows used
    return shift, partners
