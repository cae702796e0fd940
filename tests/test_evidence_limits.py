"""The snow tests' formula and thresholds (mutation testing found them unpinned: docs/testing.md).
Physical definitions, computed here from the radiometry in transforms/evidence.py's docstring."""
import numpy as np
import pytest

from transforms import evidence as E

TCI = 0.3558 / 255  # TCI DN -> top-of-atmosphere reflectance
BAND = 32 / 1e4  # S2-NAIP's B08 / B11 / B12 DN -> reflectance


def _frames(rgbn, swir):
    frames = np.asarray(rgbn, dtype=np.float64).T[None, :, None, :]  # [1, C, 1, N]
    return frames, np.asarray(swir, dtype=np.float64)[None, None, :]


def test_ndsi_is_the_normalised_difference_of_green_and_swir_reflectance():
    frames, swir = _frames([(200, 210, 220, 120), (90, 80, 70, 60), (10, 5, 3, 2)], [10, 60, 200])
    green = np.array([210, 80, 5]) * TCI
    s = np.array([10, 60, 200]) * BAND
    np.testing.assert_allclose(E.ndsi(frames, swir)[0, 0], (green - s) / (green + s), rtol=1e-5)


def test_snow_needs_nir_above_011_reflectance():
    nir_at = int(np.ceil(0.11 / BAND))  # 35 DN: reflectance 0.112
    frames, swir = _frames([(250, 252, 255, nir_at), (250, 252, 255, nir_at - 1)], [15, 15])
    assert E.snow_mask(frames, swir)[0, 0].tolist() == [True, False]


def test_snow_without_nir_uses_the_visible_and_swir_tests_only():
    frames, swir = _frames([(250, 252, 255, 0), (250, 75, 255, 0), (250, 252, 255, 0)], [15, 15, 200])
    rgb = frames[:, :3]
    assert E.snow_mask(rgb, swir)[0, 0].tolist() == [True, False, False]
    assert E.snow_mask(frames, swir)[0, 0].tolist() == [False, False, False]  # NIR 0: not snow with B08


def _smooth_field(seed, shape=(4, 32, 32)):
    from scipy import ndimage

    noise = np.random.default_rng(seed).normal(size=shape)
    return 100 + 40 * ndimage.gaussian_filter(noise, sigma=(0, 1.5, 1.5), mode="wrap") / 0.15


def _translated(field, dy, dx):
    """`field` [C, H, W] moved by (dy, dx) px (content at (y, x) goes to (y + dy, x + dx)), exactly:
    a phase ramp on the periodic field."""
    from scipy import ndimage

    return np.stack([np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(band), (dy, dx))).real for band in field])


@pytest.mark.parametrize("dy, dx", [(3.0, -3.0), (0.5, 0.0), (-1.3, 0.6)])
def test_estimate_shift_finds_whole_and_sub_pixel_shifts(dy, dx):
    ref = _smooth_field(1)
    moved = _translated(ref, dy, dx)
    shift, peak = E.estimate_shift(moved[None], ref)
    np.testing.assert_allclose(shift[0], [dy, dx], atol=0.2)
    assert peak[0] > 0.3


def test_band_covariances_are_pearson_over_pixels():
    frames = np.stack([_smooth_field(2), _smooth_field(3), 0.5 * _smooth_field(2) + 20])
    cov, corr = E.band_covariances(frames)
    for band in range(4):
        ref = np.corrcoef(frames[:, band].reshape(3, -1))
        np.testing.assert_allclose(corr[band], ref, atol=1e-4)
        np.testing.assert_allclose(cov[band], np.cov(frames[:, band].reshape(3, -1), bias=True), rtol=1e-3)


def test_peak_shift_is_the_vertex_of_the_parabola_through_the_peak():
    """On a surface that is exactly a paraboloid near its peak, the sub-pixel estimate is its vertex."""
    yy, xx = np.mgrid[:32, :32].astype(np.float64)
    for vy, vx in ((0.3, -0.2), (-2.4, 1.45)):
        surface = 1.0 - 0.05 * ((yy - 16 - vy) ** 2 + (xx - 16 - vx) ** 2)
        shift, peak, _ = E.peak_shift(surface[None])
        np.testing.assert_allclose(shift[0], [vy, vx], atol=1e-9)
