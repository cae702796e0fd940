"""The pair-selection algorithm, top to bottom, in plain numpy (no Beam).

For one tile: an HR NAIP image `hr` [128, 128, C] and its Sentinel-2 series `series` [T, 32, 32, C]
(C = 4 for R, G, B, NIR or 3 for RGB), all uint8:

1. drop timesteps with a black border (`imagery.has_black_border`);
2. downsample the HR to 32x32 (bicubic) and keep the `top_k` timesteps with the highest PSNR;
3. score them and choose the lowest score:
   - `paper`:     a * (1 - SSIM(HR_down, LR_j)) + (1 - a) * (1 - SSIM(HM_j(HR_down), LR_j)),
                  scikit-image SSIM (Gaussian sigma 1.5, 5-px crop), HR_down rounded to uint8;
   - `companion`: the published code's rule, argmax of a * SSIM(LR_j, HR_down) + (1 - a) *
                  SSIM(HR_down, HM_j(HR_down)), stored as the distance 1 - that mix so that lower is
                  better in both modes; torchmetrics SSIM (reflect padding, full map, clamped
                  variances), float HR_down from PyTorch's non-antialiased bicubic, HM_j stored into
                  uint8 by truncation;
   - `robust`:    (the default) the paper's distance plus a penalty from per-timestep evidence
                  that needs no clean twin: veils against the tile's clearest candidates and against
                  the HR, a dark gate, twin haze, snow, cirrus and s2cloudless when the tile has the
                  bands (`transforms.evidence`); its top-k are ranked by gap-free correlation
                  instead of PSNR (`robust_scores`);
   `HM_j` is histogram matching to timestep j (scikit-image `match_histograms` semantics);
4. histogram-match the full HR to the chosen timestep and return the pair.

Every array op runs over all timesteps (and bands) at once; indices are original time-series
indices from start to end (the companion code's position/index mix-up cannot happen here).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import cv2
import numpy as np

from transforms import cloud_prob as CP
from transforms import evidence as E
from transforms.imagery import has_black_border

SELECTION_MODES = ("paper", "companion", "robust")
# the default, decided on real Sentinel-2 (docs/selection-method.md): since 0.3 `robust` has the most
# clean picks on the real and semi-real sets and is not worse than `paper` on twin-free synthetic and
# easy tiles (held-out part)
DEFAULT_SELECTION = "robust"
DOWNSAMPLE_METHODS = ("bicubic_aa", "bicubic_torch")
DEFAULT_DOWNSAMPLE = {"paper": "bicubic_aa", "companion": "bicubic_torch", "robust": "bicubic_aa",
                      "manual": "bicubic_aa"}
EXTRA_BANDS = E.EXTRA_BANDS  # optional Sentinel-2 bands the robust mode uses when a tile has them
DATA_RANGE = 255.0
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # scikit-image's window: radius int(3.5 * sigma + 0.5) = 5, i.e. 11x11
SSIM_K1, SSIM_K2 = 0.01, 0.03


class NoValidTimesteps(Exception):
    """Every timestep of the series has a black border."""


class TooFewTimesteps(Exception):
    """--lr-timesteps N asks for more acceptable timesteps than the tile has (`multi_timesteps`)."""


@dataclasses.dataclass(frozen=True)
class Acceptance:
    """Robust mode, --lr-timesteps N > 1: the evidence a timestep after the first must pass to be
    written (`acceptable`). Per term, not the summed penalty: the haze term (contrast loss against a
    twin) also counts seasonal change, so clear timesteps months from the NAIP date carry penalties
    of 0.2-0.9 (embedded sample). The limits are set on two sets with known planted timesteps
    (docs/outputs.md): clean timesteps of real NAIP captures years apart reach veil 0.30 (90th
    percentile) and cloud or shadow fractions up to 0.2, planted cloudy and dark ones exceed 0.15
    cloud or 0.6 shadow; the sample's hazy and thin-cloud timesteps have veil 0.45 and more (median)."""

    fraction: float = 0.1  # cloud, shadow and snow fractions at most this
    veil: float = 0.35  # twin-free veil evidence at most this
    cirrus: float = 0.2  # B10 cirrus index above the tile's lowest candidate at most this
    cloud_prob: float = 0.1  # s2cloudless probability above the lowest evaluated candidate at most this


ACCEPTANCE = Acceptance()


@dataclasses.dataclass(frozen=True)
class CleanGates:
    """`paper` and `companion`, --lr-timesteps N > 1: the cheap clean gates a timestep must pass to
    be written besides the paper's own criteria (a black border drops it, the top-k by PSNR, the
    score ranks it), which alone write dark and cloudy timesteps (the paper has no evidence of them).
    Each gate is measured against the tile's other valid timesteps and the HR (`clean_gates`):

    * thick cloud (bright and white): the fraction of pixels whose R, G and B are all >= `cloud_dn`
      (TCI DN; 200 is ~0.28 top-of-atmosphere reflectance, thick cloud saturates the TCI at 255)
      and whitish (min >= 0.6 max), where the HR downsampled is not bright itself (R, G, B all >=
      `hr_bright_dn`: a roof, sand), at most `cloud`. Clean timesteps of the real-NAIP-derived
      tiles reach 0.008, planted thick cloud 0.46 and more. Snow counts too: it hides the ground
      the HR shows just as well.
    * dark: 1 - mean R, G, B brightness / the lower quartile of the means of the tile's timesteps
      that pass the cloud gate (all of them when none does), at most `dark`. Clean captures years
      apart reach 0.19 on the real-NAIP-derived tiles, planted dark ones (exposure x0.12-0.3)
      0.60 and more.
    * s2cloudless (`transforms.cloud_prob`), when the tile has its bands (b01, b05, b08, b09, b10,
      b11, b12): mean cloud probability above the tile's lowest, at most `cloud_prob`.

    The first written timestep stays the mode's single choice (N = 1 output unchanged) unless it
    fails a gate: then the best-scoring candidate that passes is the first, the HR matched to it
    (`select_pair`)."""

    dark: float = 0.5
    cloud: float = 0.1
    cloud_dn: int = 200
    hr_bright_dn: int = 150
    cloud_prob: float = 0.1


CLEAN_GATES = CleanGates()


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    mode: str = DEFAULT_SELECTION
    alpha: float = 0.7
    top_k: int = 16
    downsample: str | None = None  # None: the mode's default (DEFAULT_DOWNSAMPLE)
    border_px: int = 2
    max_border_black: int = 1
    lr_timesteps: int = 1  # timesteps written per pair, best first (`multi_timesteps`)
    allow_fewer: bool = False  # with fewer acceptable timesteps than lr_timesteps: write those (else reject)

    def __post_init__(self):
        if self.mode not in SELECTION_MODES:
            raise ValueError(f"selection must be one of {SELECTION_MODES}, got {self.mode!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be within [0, 1], got {self.alpha}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.downsample is not None and self.downsample not in DOWNSAMPLE_METHODS:
            raise ValueError(f"downsample must be one of {DOWNSAMPLE_METHODS}, got {self.downsample!r}")
        if not 1 <= self.lr_timesteps <= self.top_k:
            raise ValueError(f"lr_timesteps must be within [1, top_k = {self.top_k}], got {self.lr_timesteps}")

    @property
    def downsample_method(self) -> str:
        return self.downsample or DEFAULT_DOWNSAMPLE[self.mode]


@dataclasses.dataclass
class Selection:
    lr_index: int  # original index in the time series
    valid_indices: np.ndarray  # int32, timesteps without a black border
    candidate_indices: np.ndarray  # int32, top-k, best first: by PSNR (robust: by gap_free_correlation)
    candidate_psnr: np.ndarray  # float32, aligned with candidate_indices
    candidate_scores: np.ndarray  # float32, lower is better
    psnr: float
    score: float
    hr_matched: np.ndarray  # uint8 [H, W, C], the HR histogram-matched to the chosen timestep
    lr: np.ndarray  # uint8 [32, 32, C], the chosen timestep
    evidence: E.Evidence | None = None  # robust mode: per-candidate evidence; None otherwise
    confidence: float | None = None  # `pair_confidence` of the choice, in [0, 1]; None for manual choices
    # robust mode, a manual choice outside the candidates: its own evidence ([1]), measured among
    # every valid timestep (`corrections.manual_selection`); None otherwise
    lr_evidence: E.Evidence | None = None
    # the written timesteps, best first (lr_indices[0] == lr_index); lr is series[lr_indices]
    # [N, 32, 32, C] when the build asks for lr_timesteps > 1 (`with_timesteps`); None: [lr_index]
    lr_indices: np.ndarray | None = None
    # paper / companion with lr_timesteps > 1: bool [K], the candidates that pass `clean_gates`
    # (aligned with candidate_indices); None otherwise (robust's `acceptable` reads its evidence)
    clean: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------
# Resampling: separable weight matrices, applied to all bands with two matrix products.


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=16)
def bicubic_aa_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of Pillow's antialiased bicubic resize (a = -0.5, support scaled)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    w = np.zeros((out_size, in_size))
    for o in range(out_size):  # a 32-row table, built once and cached
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = _cubic((np.arange(lo, hi) - center + 0.5) / filterscale, -0.5)
        w[o, lo:hi] = taps / taps.sum()
    w.flags.writeable = False
    return w


@functools.lru_cache(maxsize=16)
def bicubic_torch_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of PyTorch `interpolate(mode='bicubic', align_corners=False)`: no antialias."""
    scale = in_size / out_size
    w = np.zeros((out_size, in_size))
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5
        x0 = math.floor(src)
        t = src - x0
        taps = _cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
        for k, tap in enumerate(taps):
            w[o, min(max(x0 - 1 + k, 0), in_size - 1)] += tap
    w.flags.writeable = False
    return w


def downsample(hr: np.ndarray, size: int, method: str) -> np.ndarray:
    """[H, W, C] -> float64 [size, size, C] bicubic (antialiased `bicubic_aa` or `bicubic_torch`)."""
    weights = {"bicubic_aa": bicubic_aa_weights, "bicubic_torch": bicubic_torch_weights}[method]
    wy = weights(hr.shape[0], size)
    wx = weights(hr.shape[1], size)
    chw = np.moveaxis(hr, -1, 0).astype(np.float64)
    return np.moveaxis(wy @ chw @ wx.T, 0, -1)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Round half up and clip to uint8."""
    return np.clip(np.floor(image + 0.5), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Metrics, batched over a leading axis.


def psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """PSNR (data range 255, over all pixels and bands) of each of `images` [N, ...] vs `reference`.

    uint8 against uint8 (the paper and robust modes) sums the squared differences in integers: the
    float64 sum of these integers is exact too, so both give the same mse, the integer one faster."""
    axes = tuple(range(1, images.ndim))
    pixels = int(np.prod(images.shape[1:]))
    if (images.dtype == np.uint8 and np.asarray(reference).dtype == np.uint8 and pixels * 255**2 < 2**31
            and np.shape(reference) == images.shape[1:]):
        # int16 differences, their squares summed in int32 along each image's contiguous row (one
        # einsum): exact below 2**31, the same integers as the int64 sum below, without its casting
        # reduction
        diff = np.subtract(images.reshape(len(images), pixels), np.reshape(reference, pixels), dtype=np.int16)
        mse = np.einsum("ij,ij->i", diff, diff, dtype=np.int32) / float(pixels)
        with np.errstate(divide="ignore"):
            return 10.0 * np.log10(DATA_RANGE**2 / mse)
    if images.dtype == np.uint8 and np.asarray(reference).dtype == np.uint8:
        diff = images.astype(np.int32) - reference.astype(np.int32)
        mse = np.sum(diff * diff, axis=axes, dtype=np.int64) / float(np.prod(images.shape[1:]))
        with np.errstate(divide="ignore"):
            return 10.0 * np.log10(DATA_RANGE**2 / mse)
    diff = images.astype(np.float64) - np.asarray(reference, dtype=np.float64)
    mse = np.mean(diff * diff, axis=axes)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(DATA_RANGE**2 / mse)


def top_k_by_psnr(psnr_values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest values, best first; ties keep time-series order."""
    return np.argsort(-psnr_values, kind="stable")[:k]


@functools.lru_cache(maxsize=4)
def gaussian_taps(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


@functools.lru_cache(maxsize=16)
def _filter_matrix(size: int, padding: str) -> np.ndarray:
    """[out, size] matrix of the 1-D Gaussian filter: 'valid' windows, or 'reflect' (mirror, no
    edge repeat) padding that keeps the size."""
    taps = gaussian_taps()
    radius = len(taps) // 2
    if padding == "valid":
        m = np.zeros((size - 2 * radius, size))
        for o in range(size - 2 * radius):
            m[o, o : o + 2 * radius + 1] = taps
    else:
        m = np.zeros((size, size))
        for o in range(size):
            for k, tap in enumerate(taps):
                i = o + k - radius
                i = -i if i < 0 else (2 * (size - 1) - i if i >= size else i)
                m[o, i] += tap
    m.flags.writeable = False
    return m


def _smooth(maps: np.ndarray, padding: str) -> np.ndarray:
    """The separable Gaussian filter over the last two axes of [..., H, W] float64 maps."""
    fy = _filter_matrix(maps.shape[-2], padding)
    fx = _filter_matrix(maps.shape[-1], padding)
    return np.matmul(fy, maps @ fx.T)


@functools.lru_cache(maxsize=16)
def _filter_matrix_f32(size: int, padding: str) -> np.ndarray:
    m = _filter_matrix(size, padding).astype(np.float32)
    m.flags.writeable = False
    return m


def _smooth_f32(maps: np.ndarray) -> np.ndarray:
    """`_smooth(maps, "valid")` in float32 (the robust mode's moments; the paper's stay float64)."""
    fy = _filter_matrix_f32(maps.shape[-2], "valid")
    fx = _filter_matrix_f32(maps.shape[-1], "valid")
    return np.matmul(fy, maps @ fx.T)


def _ssim_from_moments(ux, uy, uxx, uyy, uxy, clamp_variance: bool) -> np.ndarray:
    """The SSIM map from Gaussian-weighted moments (population covariance, data range 255)."""
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    if clamp_variance:
        vx = np.maximum(vx, 0.0)
        vy = np.maximum(vy, 0.0)
    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def _to_nchw(images: np.ndarray) -> np.ndarray:
    return np.moveaxis(np.asarray(images, dtype=np.float64), -1, -3)


def _ssim_batch(x: np.ndarray, y: np.ndarray, padding: str, clamp_variance: bool) -> np.ndarray:
    x, y = np.broadcast_arrays(_to_nchw(x), _to_nchw(y))
    moments = _smooth(np.stack([x, y, x * x, y * y, x * y]), padding)
    s = _ssim_from_moments(*moments, clamp_variance=clamp_variance)
    return s.mean(axis=(-3, -2, -1))


def ssim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """scikit-image's SSIM (gaussian_weights, sigma 1.5, population covariance, data range 255,
    mean over bands) for each pair of [N, H, W, C] images (broadcasting); returns [N]."""
    return _ssim_batch(x, y, "valid", clamp_variance=False)


def ssim_torchmetrics(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """torchmetrics' SSIM as the companion code runs it: 11x11 Gaussian, reflect padding, clamped
    variances, mean over the full map and bands. [N, H, W, C] pairs -> [N]."""
    return _ssim_batch(x, y, "reflect", clamp_variance=True)


def ssim_to_reference(reference: np.ndarray, images: np.ndarray, padding: str = "valid",
                      clamp_variance: bool = False) -> np.ndarray:
    """SSIM(reference, images_j) for a stack [N, H, W, C]: the reference is filtered once, not N times."""
    r = _to_nchw(reference)
    y = _to_nchw(images)
    ur, urr = _smooth(np.stack([r, r * r]), padding)
    uy, uyy, ury = _smooth(np.stack([y, y * y, r * y]), padding)
    return _ssim_from_moments(ur, uy, urr, uyy, ury, clamp_variance).mean(axis=(-3, -2, -1))


# ---------------------------------------------------------------------------------------------
# Histogram matching, batched over templates and bands.


def _matched_values(src_cum: np.ndarray, src_size: int, tmpl_counts: np.ndarray, tmpl_size: int) -> np.ndarray:
    """np.interp(src_quantiles, tmpl_quantiles, tmpl_values) row by row, without a Python loop.

    `tmpl_counts` [R, 256] are histograms of uint8 templates; `src_cum` [R, M] are the source's
    cumulative counts (quantile = src_cum / src_size). The template CDF over all 256 bins is flat
    where a bin is empty, so the first bin whose CDF exceeds q is the upper interpolation point and
    the last non-empty bin before it the lower one. Positions are found in exact integer arithmetic;
    the interpolation is numpy's own (slope * (q - x0) + y0), so results equal scikit-image's bit
    for bit.
    """
    rows = tmpl_counts.shape[0]
    r = np.arange(rows)[:, None]
    tmpl_cum = np.cumsum(tmpl_counts, axis=1)  # [R, 256] integers in [0, tmpl_size]
    # pos = #{bins b: tmpl_cum[b] / tmpl_size <= src_cum / src_size}, via a per-row table of
    # "how many bins have a cumulative count <= t" for every t in [0, tmpl_size]
    width = tmpl_size + 1
    count_le = np.bincount((tmpl_cum + width * r).ravel(), minlength=width * rows).reshape(rows, width)
    count_le = np.cumsum(count_le, axis=1)
    pos = count_le[r, (src_cum * tmpl_size) // src_size]
    bins = np.arange(256)
    last_nonempty = np.maximum.accumulate(np.where(tmpl_counts > 0, bins, -1), axis=1)
    cdf = tmpl_cum / tmpl_size
    q = src_cum / src_size
    hi = np.minimum(pos, 255)
    lo = np.where(pos > 0, last_nonempty[r, np.maximum(pos - 1, 0)], -1)
    x0 = cdf[r, np.maximum(lo, 0)]
    x1 = cdf[r, hi]
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (hi - lo) / (x1 - x0)
        inner = slope * (q - x0) + lo
    inner = np.where(q == x0, lo, inner)
    # below the first template value: clamp to it (the first non-empty bin is `hi` then)
    out = np.where(lo < 0, hi, inner)
    # at or beyond the last template quantile: clamp to the last value
    return np.where(pos >= 256, last_nonempty[:, -1:], out).astype(np.float64)


_CACHED_OFFSETS_MAX = 2**18  # pixels x bands of a stack whose offsets are cached (512 KiB; the candidates': 64 Ki)


@functools.lru_cache(maxsize=32)
def _row_offsets_u16(shape: tuple[int, ...], rows_ndim: int) -> np.ndarray:
    """uint16 array of `shape` ([N, ..., C] pixels of N*C <= 256 rows) holding 256 * row, row = n * C + c:
    added to the uint8 images it gives each value its row's histogram bin in one contiguous pass
    (a broadcast [N, 1, 1, C] offset makes numpy's inner loop C elements long: ~10x slower)."""
    n_rows = int(np.prod(shape[:rows_ndim - 1] + shape[-1:]))
    row_shape = shape[:rows_ndim - 1] + (1,) * (len(shape) - rows_ndim) + shape[-1:]
    offsets = np.empty(shape, dtype=np.uint16)
    offsets[...] = (np.arange(n_rows, dtype=np.uint16) * np.uint16(256)).reshape(row_shape)
    offsets.flags.writeable = False
    return offsets


def _histograms(images: np.ndarray, rows_shape: tuple[int, ...]) -> np.ndarray:
    """Counts of uint8 `images` [..., C] per leading index and band -> [prod(rows_shape), 256].

    `rows_shape` is images.shape without the pixel axes, e.g. (N, C); one bincount for all rows.
    """
    n_rows = int(np.prod(rows_shape))
    if images.dtype == np.uint8 and len(rows_shape) == 1 and images.ndim == 3 and images[..., 0].size < 2**24:
        # one image's bands (a full-size HR): OpenCV's histogram, exact float32 counts below 2**24
        c = rows_shape[0]
        image = np.ascontiguousarray(images)
        return np.stack([cv2.calcHist([image], [band], None, [256], [0, 256]).reshape(256) for band in range(c)]
                        ).astype(np.int64)
    row_shape = rows_shape[:-1] + (1,) * (images.ndim - len(rows_shape)) + rows_shape[-1:]
    if images.dtype == np.uint8 and n_rows <= 256 and images.size <= _CACHED_OFFSETS_MAX:
        # value + 256 * row fits in uint16: one narrow pass (cached full-size offsets) instead of
        # two over intp
        flat = np.add(images, _row_offsets_u16(images.shape, len(rows_shape)), dtype=np.uint16)
    elif images.dtype == np.uint8 and n_rows <= 256:  # larger stacks: no cached copy of their size
        flat = images.astype(np.uint16)
        flat += (np.arange(n_rows, dtype=np.uint16) * np.uint16(256)).reshape(row_shape)
    else:
        flat = images.astype(np.intp) + 256 * np.arange(n_rows).reshape(row_shape)
    return np.bincount(flat.ravel(), minlength=256 * n_rows).reshape(n_rows, 256)


_BINS = np.arange(256)
_BINS.flags.writeable = False


def _interp_luts(src_cum: np.ndarray, src_size: int, tmpl_counts: np.ndarray, tmpl_size: int) -> np.ndarray:
    """`_matched_values` for a uint8 source, as lookup tables: float64 [R, 256], row r = n * C + c the
    value np.interp(src_cum[c] / src_size, template quantiles, template values) gives each of the
    source's 256 possible values (scikit-image's uint8 path), bit for bit.

    `src_cum` [C, 256] are the source's cumulative counts per band (shared by the N templates),
    `tmpl_counts` [N * C, 256] the templates' histograms. The same positions and arithmetic as
    `_matched_values`, found with fewer and cheaper passes:

    * pos[r, v] = #{bins b: tmpl_cum[r, b] / T <= src_cum[c, v] / S}, i.e. tmpl_cum[r, b] <= t[c, v]
      with t = floor(src_cum * T / S), the same exact integer test. As t is sorted along v,
      tmpl_cum[r, b] <= t[c, v] <=> v >= m[r, b] with m[r, b] = #{v: t[c, v] < tmpl_cum[r, b]} (one
      lookup in a small [C, T + 1] table of the source), so pos[r, v] = #{b: m[r, b] <= v}: one
      bincount of m and a cumulative sum, with no [R, T + 1] table;
    * each possible position p gets its interpolation terms once (X = x0, Y = y0 and the slope, in
      [R, 257] tables) and every value reads them at its position with flat `take`s. p = 0 and
      p = first non-empty bin (the values below the template's first quantile: the first template
      value), p = 256 (from the last quantile on: the last value) hold a zero slope; the result is
      slope * (q - X) + Y as np.interp computes it (the slope (y1 - y0) / (x1 - x0), x = cum / T,
      y the bin). A position p in 1..255 is reached only when bin p is non-empty, so x1 > x0
      there: the other columns (empty bins, divisions by zero) are never read.
    """
    rows, c = tmpl_counts.shape[0], src_cum.shape[0]
    n = rows // c
    width = tmpl_size + 1
    tmpl_cum = np.cumsum(tmpl_counts, axis=1)  # [R, 256] integers in [0, T]
    t = src_cum if src_size == tmpl_size else (src_cum * tmpl_size) // src_size  # [C, 256] in [0, T], sorted
    band_offsets = np.arange(c) * width
    at = np.bincount((t + band_offsets[:, None]).ravel(), minlength=c * width)
    below = np.cumsum(at)
    below -= at  # below[c * width + x] = #{v: t[c, v] < x} + 256 * c (the flat sum runs over the bands)
    m = below.take((tmpl_cum.reshape(n, c, 256) + band_offsets[:, None]).ravel())
    # + 257 * r - 256 * c: row r's counts in a [R, 257] table (the bands' 256 * c taken out)
    m += np.repeat((np.arange(rows) * 257).reshape(n, c) - np.arange(c) * 256, 256)
    # flat cumulative counts: r * 256 + pos[r, v] at [r, v]; + r gives the flat index of [r, pos]
    at_or_below = np.cumsum(np.bincount(m, minlength=rows * 257)).reshape(rows, 257)
    index = at_or_below[:, :256] + np.arange(rows)[:, None]
    x = np.empty((rows, 257))
    x[:, 0] = 0.0
    np.divide(tmpl_cum, tmpl_size, out=x[:, 1:])  # column p: x0 = cum[p - 1] / T
    y = np.empty((rows, 257), dtype=np.intp)
    y[:, 0] = 0
    nonempty = tmpl_counts > 0
    np.maximum.accumulate(np.where(nonempty, _BINS, -1), axis=1, out=y[:, 1:])  # the last non-empty bin <= p - 1
    slope = np.empty((rows, 257))
    slope[:, 0] = 0.0
    slope[:, 256] = 0.0
    with np.errstate(divide="ignore"):  # unreachable columns (empty bins) only
        np.divide(np.subtract(_BINS[1:], y[:, 1:256]), np.subtract(x[:, 2:], x[:, 1:256]), out=slope[:, 1:256])
    first = np.argmax(nonempty, axis=1)  # below the first quantile: the first value, flat
    r = np.arange(rows)
    y[r, first] = first
    slope[r, first] = 0.0
    q = src_cum / src_size  # [C, 256]
    out = np.subtract(q, x.take(index).reshape(n, c, 256))
    out *= slope.take(index).reshape(n, c, 256)
    out += y.take(index).reshape(n, c, 256)
    return out.reshape(rows, 256)


def _match_luts(source: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """uint8 [N, C, 256]: the lookup table of each (template, band) for the uint8 source [H, W, C]
    (`_match_uint8`)."""
    n, c = templates.shape[0], templates.shape[-1]
    tmpl_counts = _histograms(templates, (n, c))  # [N*C, 256]
    src_cum = np.cumsum(_histograms(source, (c,)), axis=1)  # [C, 256]
    lut = _interp_luts(src_cum, source.size // c, tmpl_counts, templates[0, ..., 0].size)
    return lut.astype(np.uint8).reshape(n, c, 256)


def _match_uint8(source: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """uint8 source [H, W, C] matched to each uint8 template [N, h, w, C] -> uint8 [N, C, H*W].

    Each (template, band) gets a 256-entry lookup table, truncated to uint8 as scikit-image stores
    it; the source pixels then index the table (one `take` for every template and band: pixel p of
    band c reads entry 256 * c + source[p, c] of each template's [C * 256] tables)."""
    n, c = templates.shape[0], templates.shape[-1]
    lut = _match_luts(source, templates)
    index = source.reshape(-1, c).T + np.arange(0, 256 * c, 256)[:, None]  # [C, H*W]
    return np.take(lut.reshape(n, c * 256), index.ravel(), axis=1).reshape(n, c, -1)


def match_histograms(source: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """scikit-image `match_histograms(source, template_n, channel_axis=-1)` for every template.

    `source` [H, W, C] (uint8 or float); `templates` [N, h, w, C] uint8. Returns [N, H, W, C] in the
    dtype scikit-image returns: uint8 sources give uint8 (truncated, as scikit-image stores into an
    array of the source dtype), float sources give float64 (float32 for float32 sources).
    """
    if templates.dtype != np.uint8:
        raise TypeError("templates must be uint8")
    n, c = templates.shape[0], templates.shape[-1]
    if source.dtype == np.uint8 and n == 1 and source.ndim == 3 and 1 < c <= 4:
        # one template (the output's full-size HR): OpenCV applies the per-band tables in one pass
        lut = np.ascontiguousarray(_match_luts(source, templates)[0].T).reshape(1, 256, c)
        return cv2.LUT(np.ascontiguousarray(source), lut)[None]
    if source.dtype == np.uint8:
        matched = _match_uint8(source, templates)
        return np.moveaxis(matched.reshape(n, c, *source.shape[:-1]), 1, -1)
    tmpl_counts = _histograms(templates, (n, c))
    src_c = np.moveaxis(source, -1, 0).reshape(c, -1)  # [C, M]
    src_cum = np.empty(src_c.shape, dtype=np.intp)
    for band in range(c):  # a band loop; np.unique is the reference's own quantile rule
        _, inverse, counts = np.unique(src_c[band], return_inverse=True, return_counts=True)
        src_cum[band] = np.cumsum(counts)[inverse]
    matched = _matched_values(np.tile(src_cum, (n, 1)), src_c.shape[1], tmpl_counts, templates[0, ..., 0].size)
    out_dtype = np.float32 if source.dtype == np.float32 else np.float64
    return np.moveaxis(matched.reshape(n, c, *source.shape[:-1]), 1, -1).astype(out_dtype)


# ---------------------------------------------------------------------------------------------
# Scores and the selection itself.


def _moment_maps(frames: np.ndarray, r: np.ndarray, matched_u8: np.ndarray, dtype) -> np.ndarray:
    """[6, K, C, h, w] of `dtype`: y, y * y, r * y, m, m * m, m * y for the candidates y (`frames`
    [K, C, h, w]), the HR r [C, h, w] (already of `dtype`) and the matched HR m [K, C, h, w], written
    into one buffer (the values np.stack of the products gives, without the temporaries)."""
    maps = np.empty((6, *matched_u8.shape), dtype=dtype)
    y, m = maps[0], maps[3]
    y[...] = frames
    m[...] = matched_u8
    np.multiply(y, y, out=maps[1])
    np.multiply(r, y, out=maps[2])
    np.multiply(m, m, out=maps[4])
    np.multiply(m, y, out=maps[5])
    return maps


def paper_scores(hr_down_u8: np.ndarray, candidates: np.ndarray, alpha: float,
                 matched_u8: np.ndarray | None = None) -> np.ndarray:
    """a * d(HR, LR_j) + (1 - a) * d(HM_j(HR), LR_j) with d = 1 - SSIM; lower is better.

    The same as `alpha * (1 - ssim_to_reference(hr, lr)) + (1 - alpha) * (1 - ssim(hm, lr))`, with
    the candidates' moments computed once and shared by both terms. `matched_u8` [K, C, h, w]: the
    HR already histogram-matched to each candidate (`_match_uint8`), if the caller has it."""
    k, h, w, c = candidates.shape
    if matched_u8 is None:
        matched_u8 = _match_uint8(hr_down_u8, candidates).reshape(k, c, h, w)
    r = _to_nchw(hr_down_u8)
    ur, urr = _smooth(np.stack([r, r * r]), "valid")
    maps = _moment_maps(np.moveaxis(candidates, -1, 1), r, matched_u8, np.float64)
    uy, uyy, ury, um, umm, umy = _smooth(maps, "valid")
    s_raw = _ssim_from_moments(ur, uy, urr, uyy, ury, clamp_variance=False).mean(axis=(-3, -2, -1))
    s_matched = _ssim_from_moments(um, uy, umm, uyy, umy, clamp_variance=False).mean(axis=(-3, -2, -1))
    return alpha * (1.0 - s_raw) + (1.0 - alpha) * (1.0 - s_matched)


def _ssim_distance_f32(hr_down_u8: np.ndarray, frames: np.ndarray, matched_u8: np.ndarray, alpha: float) -> np.ndarray:
    """`paper_scores` in float32 moments (the robust mode's distance; equal to ~1e-5): frames and
    matched_u8 [K, C, h, w] uint8.

    The moment maps are laid out rows first, [h, K, C, w]: the Gaussian filter over columns is then
    one matrix product over every map, the filter over rows one per moment, instead of one small
    product per image and side (the same sums in another order: equal to `_smooth_f32`'s to float32
    rounding; the map means are taken per candidate in float64 as before)."""
    k, c, h, w = frames.shape
    fy = _filter_matrix_f32(h, "valid")
    fx = _filter_matrix_f32(w, "valid")
    oh, ow = fy.shape[0], fx.shape[0]
    r = np.ascontiguousarray(np.transpose(hr_down_u8, (0, 2, 1))).astype(np.float32)  # [h, C, w]
    maps = _moment_maps(frames.transpose(2, 0, 1, 3), r[:, None], matched_u8.transpose(2, 0, 1, 3), np.float32)
    moments = np.matmul(fy, (maps.reshape(-1, w) @ fx.T).reshape(6, h, -1)).reshape(6, oh, k, c, ow)
    ur, urr = np.matmul(fy, (np.stack([r, r * r]).reshape(-1, w) @ fx.T).reshape(2, h, -1)).reshape(2, oh, 1, c, ow)
    uy, uyy, ury, um, umm, umy = moments
    # `_ssim_from_moments` of both terms with the candidates' shared parts (uy^2, their variance)
    # computed once and the products written in place (the same formula, float32 rounding aside)
    c1 = np.float32((SSIM_K1 * DATA_RANGE) ** 2)
    c2 = np.float32((SSIM_K2 * DATA_RANGE) ** 2)
    uy2 = uy * uy
    vy_c2 = uyy - uy2
    vy_c2 += c2

    def mean_ssim(ux, uxx, uxy):  # [oh, K, C, ow] moments -> [K], each candidate's mean SSIM in float64
        ux2 = ux * ux
        cross = ux * uy
        num = uxy - cross  # covariance
        num *= np.float32(2.0)
        num += c2
        cross *= np.float32(2.0)
        cross += c1
        num *= cross
        den = ux2 + uy2
        den += c1
        den *= (uxx - ux2) + vy_c2
        num /= den
        return num.transpose(1, 0, 2, 3).reshape(k, -1).sum(axis=1, dtype=np.float64) / (oh * c * ow)

    s_raw = mean_ssim(ur, urr, ury)
    s_matched = mean_ssim(um, umm, umy)
    return alpha * (1.0 - s_raw) + (1.0 - alpha) * (1.0 - s_matched)


def companion_scores(hr_down: np.ndarray, candidates: np.ndarray, alpha: float) -> np.ndarray:
    """1 - (a * SSIM(LR_j, HR) + (1 - a) * SSIM(HR, HM_j(HR))) as the companion code computes it."""
    hr32 = hr_down.astype(np.float32)
    matched = match_histograms(hr32, candidates).astype(np.uint8)  # truncation, as torch stores it
    # SSIM is symmetric, so both terms compare the one HR with a stack: filter them in one pass
    both = ssim_to_reference(hr32, np.concatenate([candidates, matched]), "reflect", clamp_variance=True)
    s_raw, s_matched = both[: len(candidates)], both[len(candidates) :]
    return 1.0 - (alpha * s_raw + (1.0 - alpha) * s_matched)


@dataclasses.dataclass(frozen=True)
class RobustWeights:
    """Weights and tolerances of the robust score's evidence terms (chosen on the tune part of the
    evaluation sets; docs/selection-method.md). Fractions and indices are in [0, 1] unless said
    otherwise. A weight of 0 leaves a term measured (it is stored and the --lr-timesteps acceptance
    and the confidence read it) but out of the score."""

    # the structural distance: "ssim", the paper's (SSIM raw and against the histogram-matched HR);
    # "correlation", the contrast-weighted local correlation robust used before 0.3 (blind to gain
    # and offset, which on real series half overcast also blinds it to veils)
    distance: str = "ssim"
    haze: float = 2.0  # per unit of contrast loss against a twin beyond `haze_tolerance`
    haze_tolerance: float = 0.03  # revisits of clear ground differ by a few % in gain
    aerosol: float = 0.0  # per unit of B01-above-blue reflectance above the tile's lowest
    cirrus: float = 0.5  # per unit of mean cirrus probability above the tile's lowest
    # per unit of cloud / shadow fraction against the HR histogram-matched to the timestep (or global
    # brightening / darkening beyond `exposure_tolerance`): 0, measured only; they cost 18-25 points
    # on the semi-real series (a grey overcast frame fools both references)
    cloud: float = 0.0
    shadow: float = 0.0
    exposure_tolerance: float | None = 0.35  # None: global darkening / brightening not counted
    snow: float = 2.0  # per unit of snow fraction
    # per pixel of misregistration beyond `shift_tolerance`: 0, measured only (real dates are shifted
    # against an HR of another date by as much; it cost 15 points on the semi-real set)
    shift: float = 0.0
    # per pixel of misregistration against a structural twin only (`evidence.registration`), beyond
    # `shift_tolerance`: 0, measured only (+3 points on the twin set, -8 on the semi-real set, whose
    # real dates pair up as "twins" shifted against each other)
    twin_shift: float = 0.0
    shift_tolerance: float = 0.5
    hr_shift_peak: float = 0.3  # the HR phase-correlation shift counts when its peak reaches this
    veil: float = 0.0  # per unit of the veil evidence against the median candidate beyond `veil_tolerance`
    veil_tolerance: float = 0.1
    # per unit of the veil evidence against the clearest candidates (`evidence.veil_terms` with
    # `clear_quantile`) beyond `clear_veil_tolerance`
    clear_veil: float = 0.5
    clear_veil_tolerance: float = 0.15  # ground changes between dates move one or two veil terms
    clear_quantile: float = 0.25
    # `evidence.hr_veil` above the lowest candidate's, counted fully at `hr_veil_scale`
    hr_veil: float = 0.3
    hr_veil_scale: float = 0.5
    underexposed: float = 10.0  # the dark gate (`evidence.underexposed`): out of the running
    # per pixel of misregistration beyond `consensus_shift_tolerance` seen both against the tile's
    # consensus (`evidence.consensus_shift`: only where >= 3 other candidates recognisably show the
    # same ground) and against the HR: min(|consensus shift|, |HR shift|). Either alone fires on noise
    # or on real dates shifted against an HR of another date; a misregistered date is off both ways
    consensus_shift: float = 0.5
    consensus_shift_tolerance: float = 0.75
    cloud_prob: float = 1.0  # per unit of s2cloudless probability above the lowest evaluated candidate
    cloud_prob_tolerance: float = 0.05
    cloud_prob_candidates: int = 4  # s2cloudless runs on this many best-scoring candidates

    def __post_init__(self):
        if self.distance not in ("ssim", "correlation"):
            raise ValueError(f"distance must be 'ssim' or 'correlation', got {self.distance!r}")


ROBUST_WEIGHTS = RobustWeights()


def _local_correlation(vx: np.ndarray, vy: np.ndarray, vxy: np.ndarray) -> np.ndarray:
    """Contrast-weighted mean of the local correlation: sum(cov) / sum(sd_x * sd_y) over the windows
    of each band, averaged over bands; invariant to a gain and an offset of either image. [K]"""
    den = np.sqrt((np.maximum(vx, 0.0) + 1.0) * (np.maximum(vy, 0.0) + 1.0)).sum(axis=(-2, -1), dtype=np.float64)
    return (vxy.sum(axis=(-2, -1), dtype=np.float64) / den).mean(axis=-1)


def robust_scores(hr_down_u8: np.ndarray, hr_down: np.ndarray, candidates: np.ndarray, alpha: float,
                  extra: dict[str, np.ndarray] | None = None,
                  weights: RobustWeights = ROBUST_WEIGHTS) -> tuple[np.ndarray, E.Evidence]:
    """The robust score of each candidate [K, h, w, C] (lower is better) and its evidence.

    distance (weights.distance "ssim", since 0.3) = the paper's a * (1 - SSIM(HR, LR_j)) + (1 - a) *
    (1 - SSIM(HM_j(HR), LR_j)) in float32 moments; "correlation" (0.2) uses LC, the contrast-
    weighted local correlation over the same windows, blind to gain and offset. score = distance +
    `robust_penalty` of the evidence (`transforms.evidence`): veils against the tile's clearest
    candidates (`veil_terms` with `clear_quantile`) and against the HR (`hr_veil`), the dark gate
    (`underexposed`), loss of detail against structural twins, snow, B10 cirrus and s2cloudless;
    cloud / shadow fractions, exposure and misregistration are measured for the record and the
    acceptance, and count only with non-zero weights (docs/selection-method.md).
    `extra` holds the candidates' extra bands ([K, h, w] each, names from EXTRA_BANDS), if any."""
    extra = extra or {}
    w = weights
    k, h, wd, c = candidates.shape
    matched_u8 = _match_uint8(hr_down_u8, candidates).reshape(k, c, h, wd)
    frames = np.ascontiguousarray(np.moveaxis(candidates, -1, 1))  # uint8 [K, C, h, w]
    if w.distance == "ssim":
        distance = _ssim_distance_f32(hr_down_u8, frames, matched_u8, alpha)
        uy = None
        sd_ratio = None
    else:
        matched = matched_u8.astype(np.float32)
        y = frames.astype(np.float32)
        r = np.moveaxis(hr_down_u8, -1, 0).astype(np.float32)
        ur, urr = _smooth_f32(np.stack([r, r * r]))
        uy, uyy, ury, um, umm, umy = _smooth_f32(np.stack([y, y * y, r * y, matched, matched * matched, matched * y]))
        vy = uyy - uy * uy
        vr = urr - ur * ur
        # window contrast of each timestep relative to the HR's (R, G, B), ln units
        sd_ratio = np.log((np.sqrt(np.maximum(vy[:, :3], 0.0)).mean(axis=(-2, -1), dtype=np.float64) + 0.5)
                          / (np.sqrt(np.maximum(vr[:3], 0.0)).mean(axis=(-2, -1), dtype=np.float64) + 0.5)).mean(axis=-1)
        lc_raw = _local_correlation(vr, vy, ury - ur * uy)
        lc_matched = _local_correlation(umm - um * um, vy, umy - um * uy)
        distance = alpha * (1.0 - lc_raw) + (1.0 - alpha) * (1.0 - lc_matched)

    swir = extra.get("b11", extra.get("b12"))
    snow = E.snow_mask(frames, swir) if swir is not None else None  # one mask for the cloud test and the fraction
    cloud, shadow = E.cloud_shadow_fractions(frames, matched_u8, swir, snow=snow)
    # a timestep mostly under cloud (or shadow) fools the histogram-matched reference: its global
    # brightness against the other candidates' tells instead
    level = E._rgb_level(frames)  # mean R, G, B brightness, shared by the exposure measures and the dark gate
    if w.exposure_tolerance is not None:
        t = w.exposure_tolerance
        cloud = np.maximum(cloud, (E.brightening(frames, level) - t) / (1.0 - t))
        shadow = np.maximum(shadow, (E.darkening(frames, level) - t) / (1.0 - t))
    hr_bands = np.moveaxis(hr_down, -1, 0)
    reg = E.registration(frames, hr_bands, smoothed=uy)
    confident = reg.hr_peak >= w.hr_shift_peak
    hr_px = np.hypot(reg.hr_shift[:, 0], reg.hr_shift[:, 1])
    dark = E.underexposed(frames, level=level)
    measures = E.veil_measures(frames)
    if sd_ratio is None:  # both veil references from one stack of the terms (the same values)
        veil, clear_veil = E.veil_evidence_pair(measures, w.clear_quantile, usable=~dark)
    else:
        veil = E.veil_evidence(E.veil_terms(frames, sd_ratio, measures=measures))
        clear_veil = E.veil_evidence(E.veil_terms(frames, clear_quantile=w.clear_quantile, usable=~dark,
                                                  measures=measures))
    evidence = E.Evidence(
        bands=tuple(b for b in EXTRA_BANDS if b in extra),
        distance=distance,
        penalty=np.zeros(k),
        haze=E.contrast_loss(frames, distance=distance, lap=measures.lap, lap_cov=measures.lap_cov),
        dark_channel=measures.dark,
        cloud=cloud,
        shadow=shadow,
        misregistration_px=np.where(confident, np.maximum(reg.misregistration, hr_px), reg.misregistration),
        hr_shift=reg.hr_shift,
        shift_peak=reg.hr_peak,
        aerosol=E.aerosol_index(extra["b01"], frames) if "b01" in extra else None,
        cirrus=E.cirrus_index(extra["b10"]) if "b10" in extra else None,
        snow=E.snow_fraction(frames, swir, mask=snow) if swir is not None else None,
        veil=veil,
        twin_misregistration_px=reg.misregistration,
        clear_veil=clear_veil,
        hr_veil=E.hr_veil(frames, hr_bands),
        consensus_shift_px=_consensus_shift_px(frames, reg, w),
        underexposed=dark,
    )
    evidence.penalty = robust_penalty(evidence, w)
    if CP.available(extra, has_nir=c > 3) and w.cloud_prob_candidates > 0:
        # s2cloudless on the best few candidates only (its cost is per pixel), at 160 m like the
        # provider's CLP; it re-ranks them
        best = np.argsort(distance + evidence.penalty, kind="stable")[: w.cloud_prob_candidates]
        prob = np.full(k, np.nan)
        prob[best] = CP.cloud_probability(frames[best], {b: extra[b][best] for b in CP.CLOUD_BANDS if b in extra},
                                          block=max(h // 2, 1))
        evidence.cloud_prob = prob
        evidence.penalty = robust_penalty(evidence, w)
    return distance + evidence.penalty, evidence


def _consensus_shift_px(frames: np.ndarray, reg: E.Registration, w: RobustWeights) -> np.ndarray | None:
    """|`evidence.consensus_shift`| (px) of the candidates whose shift against the HR exceeds the
    term's tolerance, NaN for the others: the term counts min(consensus, HR shift), so a candidate
    within the tolerance against the HR cannot be penalised, whatever its consensus; only the pairs
    that involve a candidate beyond it are registered. None when the term is off (nothing computed)."""
    if not w.consensus_shift:
        return None
    needed = np.hypot(reg.hr_shift[:, 0], reg.hr_shift[:, 1]) > w.consensus_shift_tolerance
    shift, _ = E.consensus_shift(frames, unit_spectra=reg.unit_spectra, needed=needed)
    return np.hypot(shift[:, 0], shift[:, 1])


def robust_penalty(evidence: E.Evidence, weights: RobustWeights = ROBUST_WEIGHTS) -> np.ndarray:
    """The evidence term of the robust score, [K] >= 0 (see RobustWeights). Cirrus and aerosol count
    above the tile's lowest candidate: their clear-sky floor varies with the atmosphere's water
    vapour and aerosol load, the same for every timestep of a date."""
    w = weights
    e = evidence
    penalty = (w.haze * np.maximum(e.haze - w.haze_tolerance, 0.0) + w.cloud * e.cloud + w.shadow * e.shadow
               + w.shift * np.maximum(e.misregistration_px - w.shift_tolerance, 0.0))
    if e.aerosol is not None and w.aerosol:
        penalty = penalty + w.aerosol * (e.aerosol - e.aerosol.min())
    if e.cirrus is not None:
        penalty = penalty + w.cirrus * (e.cirrus - e.cirrus.min())
    if e.snow is not None:
        penalty = penalty + w.snow * e.snow
    if e.veil is not None and w.veil:
        penalty = penalty + w.veil * np.maximum(e.veil - w.veil_tolerance, 0.0)
    if e.twin_misregistration_px is not None and w.twin_shift:
        penalty = penalty + w.twin_shift * np.maximum(e.twin_misregistration_px - w.shift_tolerance, 0.0)
    if e.clear_veil is not None and w.clear_veil:
        penalty = penalty + w.clear_veil * np.maximum(e.clear_veil - w.clear_veil_tolerance, 0.0)
    usable = np.ones(len(penalty), dtype=bool) if e.underexposed is None else ~np.asarray(e.underexposed, dtype=bool)
    if e.hr_veil is not None and w.hr_veil:
        lowest = e.hr_veil[usable].min() if usable.any() else e.hr_veil.min()
        penalty = penalty + w.hr_veil * np.minimum(np.maximum(e.hr_veil - lowest, 0.0) / w.hr_veil_scale, 1.0)
    if e.underexposed is not None:
        penalty = penalty + w.underexposed * np.asarray(e.underexposed, dtype=np.float64)
    if e.consensus_shift_px is not None and w.consensus_shift:
        # NaN: not measured, its HR shift is within the tolerance (`_consensus_shift_px`)
        off = np.fmin(e.consensus_shift_px, e.shift_px)
        penalty = penalty + w.consensus_shift * np.maximum(off - w.consensus_shift_tolerance, 0.0)
    if e.cloud_prob is not None:
        seen = np.isfinite(e.cloud_prob)
        if seen.any():
            excess = np.maximum(e.cloud_prob - np.nanmin(e.cloud_prob) - w.cloud_prob_tolerance, 0.0)
            penalty = penalty + w.cloud_prob * np.where(seen, excess, 0.0)
    return penalty


MARGIN_SCALE = 0.05  # a score margin this large (or larger) to the best rival is full confidence
NEAR_COPY = 0.97  # candidates correlating this much with the chosen one are the same scene, not rivals


def pair_confidence(scores: np.ndarray, best: int, candidates: np.ndarray,
                    evidence: E.Evidence | None = None) -> float:
    """How sure the choice is, in [0, 1]: min(margin / MARGIN_SCALE, 1) * (1 - worst evidence).

    The margin is the score gap to the best rival, the best other candidate that is not a near copy
    of the chosen one (gap-free correlation < NEAR_COPY: a revisit of the same clear scene is an
    equally good pick, not a rival); with no rival it is full. The worst evidence (robust mode) is
    the largest of the chosen timestep's cloud, shadow, snow fractions, haze, veil and
    cloud probability, each in [0, 1]. Low values are the picks worth a reviewer's eye."""
    scores = np.asarray(scores, dtype=np.float64)
    # the chosen candidate as the reference; uint8 as it is, whose float32 mean per band is exact (an
    # integer sum below 2**24, divided once): the same centred values as from its float32 copy
    reference = candidates[best] if candidates.dtype == np.uint8 else candidates[best].astype(np.float32)
    margin = MARGIN_SCALE
    if np.isfinite(scores).all():
        # the best rival is the first candidate in score order that is not a near copy: the
        # correlations are computed one by one up to it, not for every candidate (a stack of all the
        # others costs more: most choices stop at the first or second)
        centred = None  # the reference's terms, computed once for every rival tried
        for j in np.argsort(scores, kind="stable"):
            if j == best:
                continue
            centred = centred or _centred_reference(reference, candidates.shape[-1])
            if _correlation_to_centred(candidates[j : j + 1], *centred)[0] < NEAR_COPY:
                margin = float(scores[j] - scores[best])
                break
    else:
        rival = np.ones(len(scores), dtype=bool)
        rival[best] = False
        rival &= gap_free_correlation(candidates, reference) < NEAR_COPY
        margin = float(scores[rival].min() - scores[best]) if rival.any() else MARGIN_SCALE
    confidence = min(max(margin, 0.0) / MARGIN_SCALE, 1.0)
    if evidence is not None:
        e = evidence
        worst = [e.cloud, e.shadow, e.haze, e.snow, e.veil, e.cloud_prob]
        values = [float(v[best]) for v in worst if v is not None and np.isfinite(v[best])]
        confidence *= 1.0 - min(max(values, default=0.0), 1.0)
    return float(confidence)


@functools.lru_cache(maxsize=8)
def _ones_f32(n: int) -> np.ndarray:
    ones = np.ones((1, n), dtype=np.float32)
    ones.flags.writeable = False
    return ones


def gap_free_correlation(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Pearson correlation of each of `images` [N, H, W, C] with `reference` [H, W, C] over pixels,
    per band, averaged over bands: [N]. Unlike PSNR it ignores each image's gain and offset, so a
    hazy (brighter, flatter) timestep gains nothing over its clear twin: the robust mode ranks its
    top-k with it."""
    return _correlation_to_centred(images, *_centred_reference(reference, images.shape[-1]))


def _centred_reference(reference: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """`gap_free_correlation`'s reference terms: the reference centred per band, float32 [P, C], and
    its sum of squares per band [C] (computed once when one reference meets several images in turn,
    as in `pair_confidence`)."""
    r = np.asarray(reference, dtype=np.float32).reshape(-1, c)
    if np.asarray(reference).dtype == np.uint8 and r.shape[0] * 255 < 2**24:  # exact, as for the images
        r = r - np.matmul(_ones_f32(r.shape[0]), r)[0] / np.float32(r.shape[0])
    else:
        r = r - r.mean(axis=0)
    return r, (r * r).sum(axis=0)


def _correlation_to_centred(images: np.ndarray, r: np.ndarray, rr: np.ndarray) -> np.ndarray:
    """`gap_free_correlation` of `images` with a reference given by `_centred_reference` (the same
    operations in the same order)."""
    n, c = images.shape[0], images.shape[-1]
    x = images.reshape(n, -1, c).astype(np.float32)
    if images.dtype == np.uint8 and x.shape[1] * 255 < 2**24:
        # the mean as a product with ones: the float32 sum of these integers is exact in any order,
        # so this equals x.mean(axis=1) bit for bit, ~20x faster than numpy's strided reduction
        x -= np.matmul(_ones_f32(x.shape[1]), x) / np.float32(x.shape[1])
    else:
        x -= x.mean(axis=1, keepdims=True)
    num = np.einsum("npc,pc->nc", x, r)
    den = np.sqrt(np.einsum("npc,npc->nc", x, x) * rr) + 1e-6
    return (num / den).mean(axis=1, dtype=np.float64)


def _gap_free_correlation_bands_first(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`gap_free_correlation` (equal to float32 rounding, within ~2e-6) computed bands first: the images
    converted to float32 as [N, C, P] in one pass, so every sum runs over a contiguous row of pixels
    (numpy's einsum over [N, P, C] runs its inner loop over the 3 or 4 bands). The robust mode's
    ranking of all valid timesteps (~2.5x faster for RGB); `pair_confidence`, which every mode
    uses, keeps `gap_free_correlation` itself."""
    n, c = images.shape[0], images.shape[-1]
    p = int(np.prod(images.shape[1:-1]))
    x = np.ascontiguousarray(images.reshape(n, p, c).transpose(0, 2, 1), dtype=np.float32)  # [N, C, P]
    if images.dtype == np.uint8 and p * 255 < 2**24:  # the exact float32 sum of integers, divided once
        x -= x.sum(axis=2, keepdims=True) / np.float32(p)
    else:
        x -= x.mean(axis=2, keepdims=True)
    r = np.ascontiguousarray(np.asarray(reference, dtype=np.float32).reshape(p, c).T)  # [C, P]
    r -= r.mean(axis=1, keepdims=True)
    num = np.einsum("ncp,cp->nc", x, r)
    den = np.sqrt(np.einsum("ncp,ncp->nc", x, x) * np.einsum("cp,cp->c", r, r)) + 1e-6
    return (num / den).mean(axis=1, dtype=np.float64)


RANKING_TIE = 1e-4  # correlations this close are re-measured by gap_free_correlation itself (> 20x the forms' gap)


def _robust_ranking_correlation(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The robust mode's ranking values: `_gap_free_correlation_bands_first`, with every image whose
    value lies within RANKING_TIE of another's re-measured by `gap_free_correlation` (an image's
    value does not depend on the stack it is computed in). The two forms differ by < ~2e-6, so
    values farther apart than RANKING_TIE keep their order, and the close ones (exact ties included)
    are ordered by the plain form's values: the same ranking, and so the same top-k in the same
    order, as `gap_free_correlation` of every image."""
    corr = _gap_free_correlation_bands_first(images, reference)
    ordered = np.sort(corr)
    close = np.flatnonzero(~(np.diff(ordered) >= RANKING_TIE))  # NaN counts as close
    if close.size:
        near = np.isin(corr, ordered[np.concatenate([close, close + 1])]) | np.isnan(corr)
        corr[near] = gap_free_correlation(images[near], reference)
    return corr


def _check_extra(extra: dict[str, np.ndarray] | None, series: np.ndarray) -> dict[str, np.ndarray]:
    if not extra:
        return {}
    out = {}
    for name, band in extra.items():
        if name not in EXTRA_BANDS:
            raise ValueError(f"unknown extra band {name!r}; expected some of {EXTRA_BANDS}")
        if band.dtype != np.uint8 or band.shape != series.shape[:3]:
            raise ValueError(f"extra band {name}: expected uint8 {series.shape[:3]}, got {band.dtype} {band.shape}")
        out[name] = band
    return out


def select_pair(hr: np.ndarray, series: np.ndarray, config: SelectionConfig = SelectionConfig(),
                extra: dict[str, np.ndarray] | None = None) -> Selection:
    """Chooses the timestep of `series` [T, 32, 32, C] closest to `hr` [H, W, C]; see module doc.

    `extra` optionally maps names of EXTRA_BANDS to that band's series [T, 32, 32] (uint8 as S2-NAIP
    stores it); only the robust mode uses them, and it works without them."""
    if hr.dtype != np.uint8 or series.dtype != np.uint8:
        raise TypeError("hr and series must be uint8")
    if hr.shape[-1] != series.shape[-1]:
        raise ValueError(f"band mismatch: hr has {hr.shape[-1]}, series has {series.shape[-1]}")
    extra = _check_extra(extra, series) if config.mode == "robust" or config.lr_timesteps > 1 else {}
    valid = np.flatnonzero(~has_black_border(series, config.max_border_black, config.border_px))
    if valid.size == 0:
        raise NoValidTimesteps(f"all {series.shape[0]} timesteps have a black border")
    size = series.shape[1]
    hr_down = downsample(hr, size, config.downsample_method)
    valid_series = series[valid]
    evidence = None
    if config.mode == "paper":
        hr_ref = to_uint8(hr_down)
        all_psnr = psnr(valid_series, hr_ref)
        top = top_k_by_psnr(all_psnr, config.top_k)
        scores = paper_scores(hr_ref, valid_series[top], config.alpha)
    elif config.mode == "robust":
        hr_ref = to_uint8(hr_down)
        top = top_k_by_psnr(_robust_ranking_correlation(valid_series, hr_down), config.top_k)
        all_psnr = np.full(len(valid), np.nan)  # only the candidates' PSNR is stored
        all_psnr[top] = psnr(valid_series[top], hr_ref)
        chosen = valid[top]
        candidates = valid_series[top]
        scores, evidence = robust_scores(hr_ref, hr_down, candidates, config.alpha,
                                         {name: band[chosen] for name, band in extra.items()})
    else:
        hr_ref = hr_down.astype(np.float32)
        all_psnr = psnr(valid_series, hr_ref)
        top = top_k_by_psnr(all_psnr, config.top_k)
        scores = companion_scores(hr_down, valid_series[top], config.alpha)
    best = int(np.argmin(scores))  # first minimum, like torch.argmax on the similarity
    lr_index = int(valid[top[best]])
    confidence = pair_confidence(scores, best, valid_series[top], evidence)
    clean = None
    if config.mode != "robust" and config.lr_timesteps > 1:
        passes = clean_gates(to_uint8(hr_down), valid_series, {name: band[valid] for name, band in extra.items()})
        clean = passes[top]
        if not clean[best] and clean.any():  # the mode's choice fails a gate: the best that passes
            best = int(np.flatnonzero(clean)[np.argmin(scores[clean])])
            lr_index = int(valid[top[best]])
            confidence = pair_confidence(scores, best, valid_series[top], evidence)
    lr = series[lr_index]
    hr_matched = match_histograms(hr, lr[None])[0]
    return Selection(
        lr_index=lr_index,
        valid_indices=valid.astype(np.int32),
        candidate_indices=valid[top].astype(np.int32),
        candidate_psnr=all_psnr[top].astype(np.float32),
        candidate_scores=scores.astype(np.float32),
        psnr=float(all_psnr[top[best]]),
        score=float(scores[best]),
        hr_matched=hr_matched,
        lr=lr,
        evidence=evidence,
        confidence=confidence,
        clean=clean,
    )


def clean_gates(hr_down_u8: np.ndarray, series: np.ndarray, extra: dict[str, np.ndarray] | None = None,
                gates: CleanGates = CLEAN_GATES) -> np.ndarray:
    """bool [V]: the timesteps of `series` [V, 32, 32, C] (a tile's valid ones) that pass the clean
    gates (`CleanGates`), against `hr_down_u8` [32, 32, C], the HR downsampled, and each other;
    `extra` their extra bands [V, 32, 32], s2cloudless's when the tile has them."""
    frames = np.ascontiguousarray(np.moveaxis(series, -1, 1))  # uint8 [V, C, h, w]
    vis = frames[:, :3].astype(np.int16)
    low, high = vis.min(axis=1), vis.max(axis=1)
    hr_bright = hr_down_u8[..., :3].min(axis=-1) >= gates.hr_bright_dn
    bright = ((low >= gates.cloud_dn) & (low * 5 >= high * 3) & ~hr_bright).mean(axis=(-2, -1))
    ok = bright <= gates.cloud
    # darkening against the timesteps without thick cloud (a cloudy majority would make every
    # clear one look dark), all of them when none is
    level = vis.mean(axis=(1, 2, 3))
    reference = float(np.quantile(level[ok] if ok.any() else level, 0.25))
    ok &= 1.0 - level / max(reference, 1e-6) <= gates.dark
    extra = extra or {}
    if CP.available(extra, has_nir=series.shape[-1] > 3):
        prob = CP.cloud_probability(frames, {b: extra[b] for b in CP.CLOUD_BANDS if b in extra},
                                    block=max(series.shape[1] // 2, 1))
        ok &= prob - prob.min() <= gates.cloud_prob
    return ok


def multi_timesteps(selection: Selection, config: SelectionConfig, exclude: frozenset[int] = frozenset()) -> np.ndarray:
    """The timesteps to write, best first: the selection's choice (`lr_index`, automatic or a
    reviewer's), then the other candidates in the mode's own ranking (score ascending, ties in
    top-k order), those acceptable only: in `robust`, those whose evidence passes (`acceptable`;
    the score already ranks clean ones first); in `paper` and `companion` those that pass the clean
    gates (`clean_gates`, `Selection.clean`). Returns int32 [n], n <= config.lr_timesteps; raises TooFewTimesteps
    when fewer than lr_timesteps are acceptable, unless config.allow_fewer. Timesteps in `exclude`
    (a reviewer's drops, `corrections.drop_timesteps`) are skipped too."""
    want = config.lr_timesteps
    candidates = np.asarray(selection.candidate_indices)
    order = np.argsort(np.asarray(selection.candidate_scores, dtype=np.float64), kind="stable")
    ok = (candidates[order] != selection.lr_index) & ~np.isin(candidates[order], list(exclude))
    if selection.evidence is not None:
        ok &= acceptable(selection.evidence)[order]
    if selection.clean is not None:
        ok &= np.asarray(selection.clean)[order]
    chosen = np.concatenate([[selection.lr_index], candidates[order][ok]])[:want].astype(np.int32)
    if chosen.size < want and not config.allow_fewer:
        raise TooFewTimesteps(f"{chosen.size} acceptable timesteps ({config.mode} ranking), {want} requested")
    return chosen


def acceptable(evidence: E.Evidence, limits: Acceptance = ACCEPTANCE) -> np.ndarray:
    """bool [K]: the candidates whose evidence passes `limits` (terms the tile lacks, e.g. cirrus
    without B10, do not count)."""
    ok = (np.asarray(evidence.cloud) <= limits.fraction) & (np.asarray(evidence.shadow) <= limits.fraction)
    if evidence.snow is not None:
        ok &= np.asarray(evidence.snow) <= limits.fraction
    if evidence.veil is not None:
        ok &= np.asarray(evidence.veil) <= limits.veil
    if evidence.cirrus is not None:
        cirrus = np.asarray(evidence.cirrus, dtype=np.float64)
        ok &= cirrus - cirrus.min() <= limits.cirrus
    if evidence.cloud_prob is not None:
        prob = np.asarray(evidence.cloud_prob, dtype=np.float64)
        if np.isfinite(prob).any():
            ok &= ~(prob - np.nanmin(prob) > limits.cloud_prob)  # NaN (not evaluated) passes
    return ok


def with_timesteps(selection: Selection, series: np.ndarray, config: SelectionConfig,
                   exclude: frozenset[int] = frozenset()) -> Selection:
    """`selection` with its written timesteps: unchanged for lr_timesteps 1 (lr [32, 32, C]), else
    lr_indices from `multi_timesteps` and lr = series[lr_indices] [n, 32, 32, C]. The HR stays
    histogram-matched to the first (best) timestep."""
    if config.lr_timesteps == 1:
        return selection
    indices = multi_timesteps(selection, config, exclude)
    return dataclasses.replace(selection, lr_indices=indices, lr=series[indices])
