"""Each evidence measure of the robust selection (transforms/evidence.py) on constructed frames."""
import numpy as np
import pytest
from scipy import ndimage

from tests.tile_factory import area_down, scene
from transforms import evidence as E

TCI_PER_REFLECTANCE = 1.0 / E.TCI_REFLECTANCE
BAND_PER_REFLECTANCE = 1.0 / E.BAND_REFLECTANCE


def _chw(image: np.ndarray) -> np.ndarray:
    return np.moveaxis(image, -1, 0)


def _lr(seed: int, gain: float = 1.0, offset: float = 0.0, noise: float = 1.0) -> np.ndarray:
    """A 32x32x4 Sentinel-2-like frame (float DN) of a textured scene: [C, H, W]."""
    rng = np.random.default_rng(seed)
    base = area_down(scene(rng).astype(np.float64))
    return _chw(np.clip(base * gain + offset + rng.normal(0.0, noise, base.shape), 1, 255))


def _haze(frame: np.ndarray, t: float, airlight=(150.0, 165.0, 190.0, 120.0)) -> np.ndarray:
    """Koschmieder's model I = J t + A (1 - t), per band."""
    return frame * t + np.asarray(airlight)[: frame.shape[0], None, None] * (1.0 - t)


# ---------------------------------------------------------------------------------------------
# Haze


def test_dark_channel_is_the_minimum_over_rgb_and_a_3x3_window():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 4, 9, 11)).astype(np.uint8)
    expected = ndimage.minimum_filter(frames[:, :3].min(axis=1), size=(1, 3, 3))[:, 1:-1, 1:-1]
    got = E.dark_channel(frames)
    assert got.dtype == np.uint8 and got.shape == (3, 7, 9)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("t", [0.9, 0.75, 0.5])
def test_a_hazed_frame_scores_hazier_than_its_source(t):
    clear = _lr(1)[None]
    hazy = _haze(clear, t)
    assert E.haze_index(hazy)[0] > E.haze_index(clear)[0] + 0.01 * (1 - t)
    # more haze, more index
    assert E.haze_index(_haze(clear, t - 0.2))[0] > E.haze_index(hazy)[0]


def test_contrast_loss_of_a_hazed_twin_is_about_one_minus_the_transmission():
    clear = _lr(2)
    rng = np.random.default_rng(3)
    hazy = _haze(clear, 0.8) + rng.normal(0.0, 1.0, clear.shape)
    other = _lr(4, gain=0.6)  # other ground, with less contrast: not a twin
    loss = E.contrast_loss(np.stack([clear, hazy, other]))
    assert loss[0] == 0.0 and loss[2] == 0.0
    assert loss[1] == pytest.approx(-np.log(0.8), abs=0.03)


def test_contrast_loss_needs_a_twin_at_least_as_close_to_the_hr():
    clear = _lr(5)
    hazy = _haze(clear, 0.8)
    frames = np.stack([clear, hazy])
    assert E.contrast_loss(frames, distance=np.array([0.10, 0.12]))[1] > 0.15
    # a "twin" much farther from the HR than the hazy frame is other ground that merely looks alike
    assert E.contrast_loss(frames, distance=np.array([0.40, 0.12]))[1] == 0.0


def test_contrast_loss_is_zero_between_different_grounds():
    frames = np.stack([_lr(6, gain=1.2), _lr(7, gain=0.5), _lr(8)])
    np.testing.assert_array_equal(E.contrast_loss(frames), 0.0)


def test_aerosol_index_rises_with_aerosol_path_radiance():
    clear = _lr(9)[None]
    blue_r = clear[:, E.B] / TCI_PER_REFLECTANCE
    b01 = (0.9 * blue_r + 0.035) * BAND_PER_REFLECTANCE  # B01 of clear air follows blue
    path_b, path_b01 = 0.02, 0.03  # haze adds more path radiance at 443 nm than at 490 nm
    hazy = clear.copy()
    hazy[:, E.B] += path_b * TCI_PER_REFLECTANCE
    b01_hazy = b01 + path_b01 * BAND_PER_REFLECTANCE
    assert E.aerosol_index(b01_hazy, hazy)[0] == pytest.approx(E.aerosol_index(b01, clear)[0] + 0.01, abs=1e-9)


def test_cirrus_index_is_b10_reflectance_over_its_full_scale_clipped():
    b10 = np.zeros((3, 32, 32), np.uint8)
    b10[1] = 5  # reflectance 0.016: thin cirrus
    b10[2, :16] = 200  # far above 0.04: probability 1 over half the tile
    got = E.cirrus_index(b10)
    assert got[0] == 0.0
    assert got[1] == pytest.approx(5 * E.BAND_REFLECTANCE / 0.04, rel=1e-6)
    assert got[2] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# Snow, clouds, shadows


def _pixels(values_tci_nir, swir):
    """One-row frames [1, 4, 1, N] from (R, G, B, NIR) tuples, and a SWIR row [1, 1, N]."""
    frames = np.asarray(values_tci_nir, dtype=np.float64).T[None, :, None, :]
    return frames, np.asarray(swir, dtype=np.float64)[None, None, :]


def test_snow_is_bright_in_green_and_dark_in_swir():
    frames, swir = _pixels(
        [(250, 252, 255, 200),  # snow: saturated TCI, NIR ~0.64, SWIR ~0.05
         (250, 252, 255, 200),  # cloud: the same visible look, bright in SWIR
         (60, 75, 50, 150),  # vegetation
         (30, 40, 45, 5)],  # water: low SWIR, but dark
        [15, 160, 90, 2],
    )
    np.testing.assert_array_equal(E.snow_mask(frames, swir)[0, 0], [True, False, False, False])
    assert E.ndsi(frames, swir)[0, 0, 0] > 0.4 > E.ndsi(frames, swir)[0, 0, 1]
    assert E.snow_fraction(frames, swir)[0] == pytest.approx(0.25)


def _cloud_shadow_case():
    reference = 30.0 + 0.6 * _lr(10)  # a clean prediction, all bands <= ~180
    frame = reference.copy()
    frame[:, 3:9, 4:9] = 250.0  # 30 px of bright white cloud, NIR included
    frame[:, 20:28, 20:24] *= 0.45  # 32 px of shadow, every band
    return frame[None], reference[None]


def test_cloud_and_shadow_fractions_against_a_clean_reference():
    frame, reference = _cloud_shadow_case()
    cloud, shadow = E.cloud_shadow_fractions(frame, reference)
    assert cloud[0] == pytest.approx(30 / 1024)
    assert shadow[0] == pytest.approx(32 / 1024)
    clean_cloud, clean_shadow = E.cloud_shadow_fractions(reference, reference)
    assert clean_cloud[0] == 0.0 and clean_shadow[0] == 0.0


def test_bright_snow_is_not_counted_as_cloud_when_swir_says_snow():
    frame, reference = _cloud_shadow_case()
    swir = np.full((1, 32, 32), 80.0)
    swir[:, 3:9, 4:9] = 15.0  # dark in SWIR: snow
    cloud, _ = E.cloud_shadow_fractions(frame, reference, swir)
    assert cloud[0] == 0.0
    cloud, _ = E.cloud_shadow_fractions(frame, reference, np.full((1, 32, 32), 160.0))  # bright: cloud
    assert cloud[0] == pytest.approx(30 / 1024)


def test_a_coloured_bright_change_is_not_cloud():
    reference = np.full((1, 4, 32, 32), 80.0)
    frame = reference.copy()
    frame[:, 0, :8] = 200.0  # only red rises (e.g. a harvested field): not whitish
    frame[:, 1, :8] = 125.0
    frame[:, 2, :8] = 90.0
    assert E.cloud_shadow_fractions(frame, reference)[0][0] == 0.0


def test_darkening_measures_global_underexposure():
    base = _lr(11)
    frames = np.stack([base, base * 1.05, base * 1.02, base * 0.98, base * 0.2])
    got = E.darkening(frames)
    assert got[0] < 0.03 and got[1] == got[2] == 0.0
    assert got[4] == pytest.approx(0.8, abs=0.01)
    # half the series overcast (bright): the clear frames are not "dark" against the grey ones
    half_overcast = np.stack([base, base * 1.02, np.minimum(base * 2.5, 255), np.minimum(base * 2.6, 255)])
    assert E.darkening(half_overcast)[:2].max() < 0.05


def test_brightening_measures_a_mostly_clouded_timestep():
    base = _lr(16)
    clouded = base.copy()
    clouded[:, :24] = 240.0  # 75 % under thick cloud: fools any reference matched to it
    got = E.brightening(np.stack([base, base * 0.95, clouded]))
    assert got[0] == 0.0 and got[1] == 0.0
    assert got[2] == pytest.approx(1.0 - base[:3].mean() / clouded[:3].mean(), rel=1e-6) and got[2] > 0.3


# ---------------------------------------------------------------------------------------------
# Shifts


def _window_lr(big: np.ndarray, dy_hr: int, dx_hr: int) -> np.ndarray:
    """[C, 32, 32]: the 128x128 window of `big` at (32 - dy_hr, 32 - dx_hr) area-averaged 4x: its
    content is the reference's moved by (dy_hr, dx_hr) / 4 LR pixels."""
    w = big[32 - dy_hr:160 - dy_hr, 32 - dx_hr:160 - dx_hr]
    return _chw(w.reshape(32, 4, 32, 4, -1).mean(axis=(1, 3)))


@pytest.fixture(scope="module")
def big_scene():
    return scene(np.random.default_rng(12), size=192).astype(np.float64)


def test_phase_correlation_of_identical_frames_peaks_at_zero_with_height_one(big_scene):
    frame = _window_lr(big_scene, 0, 0)
    shift, peak = E.estimate_shift(frame[None], frame)
    np.testing.assert_allclose(shift[0], 0.0, atol=1e-6)
    assert peak[0] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("dy, dx", [(1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (2, 0), (0, -2), (-1, 2)])
def test_a_frame_shifted_by_whole_pixels_is_estimated_within_a_quarter_pixel(big_scene, dy, dx):
    reference = _window_lr(big_scene, 0, 0)
    shifted = _window_lr(big_scene, 4 * dy, 4 * dx)
    shift, peak = E.estimate_shift(shifted[None], reference)
    assert np.abs(shift[0] - (dy, dx)).max() <= 0.25
    assert peak[0] > 0.5


@pytest.mark.parametrize("dy_hr, dx_hr", [(2, 0), (0, -2), (6, -3), (1, 1), (-5, 7)])
def test_sub_pixel_shifts_are_estimated_within_a_quarter_pixel(big_scene, dy_hr, dx_hr):
    reference = _window_lr(big_scene, 0, 0)
    rng = np.random.default_rng(13)
    shifted = _window_lr(big_scene, dy_hr, dx_hr) + rng.normal(0.0, 1.0, reference.shape)
    shift, _ = E.estimate_shift(shifted[None], reference)
    assert np.abs(shift[0] - (dy_hr / 4, dx_hr / 4)).max() <= 0.25


def test_registration_flags_the_misregistered_twin_not_the_registered_one(big_scene):
    reference = _window_lr(big_scene, 0, 0)  # the HR, downsampled
    rng = np.random.default_rng(14)
    registered = reference * 0.8 + 10 + rng.normal(0, 1, reference.shape)
    misregistered = _window_lr(big_scene, 6, -2) * 0.8 + 10 + rng.normal(0, 1, reference.shape)  # (1.5, -0.5) px
    others = [_lr(20 + k) for k in range(3)]
    frames = np.stack([registered, misregistered, *others])
    reg = E.registration(frames, reference)
    assert reg.partner[0] == 1 and reg.partner[1] == 0
    assert reg.misregistration[1] == pytest.approx(np.hypot(1.5, 0.5), abs=0.25)
    assert reg.misregistration[0] == 0.0 and (reg.misregistration[2:] == 0.0).all()
    assert np.abs(reg.hr_shift[1] - (1.5, -0.5)).max() <= 0.25 and np.abs(reg.hr_shift[0]).max() <= 0.1
    assert reg.hr_peak[0] > 0.5 and reg.hr_peak[2] < 0.3


def test_registration_of_a_single_timestep():
    frame = _lr(15)
    reg = E.registration(frame[None], frame)
    assert reg.misregistration.tolist() == [0.0] and reg.partner.tolist() == [-1]
    assert np.abs(reg.hr_shift).max() < 1e-6


# ---------------------------------------------------------------------------------------------
# 0.3: the dark gate, the veil against the HR, the veil against the clearest timesteps


def _blue_dn(reflectance: float) -> float:
    return reflectance * TCI_PER_REFLECTANCE


def test_underexposed_needs_both_far_darker_and_below_the_blue_floor():
    clear = [_lr(s, gain=0.9, offset=30.0) for s in range(4)]  # mean blue well above 0.06
    dark = clear[0] * 0.25
    got = E.underexposed(np.stack([*clear, dark]))
    assert list(got) == [False, False, False, False, True]
    assert dark[E.B].mean() < _blue_dn(E.BLUE_FLOOR) < clear[0][E.B].mean()
    # a dark-year capture: half as bright as the others, but its blue is that of a lit scene
    dim = np.clip(clear[0] * 0.5 + 20.0, 0, 255)
    assert dim[E.B].mean() > _blue_dn(E.BLUE_FLOOR)
    assert not E.underexposed(np.stack([*clear, dim]))[-1]
    # a clear dark-forest frame among bright overcast ones is far darker, but lit: not gated
    forest = np.full((4, 32, 32), 40.0)
    forest[E.B] = _blue_dn(0.075)
    overcast = [np.full((4, 32, 32), 210.0) for _ in range(3)]
    assert not E.underexposed(np.stack([forest, *overcast])).any()
    assert not E.underexposed(dark[None]).any()  # alone, nothing to compare with


def test_underexposed_spares_the_clear_frames_of_a_mostly_veiled_series():
    """L2A surface reflectance of dark forest is below the blue floor, and in real summer series most
    dates are veiled or cloudy (13 of 18 in one year of the real L2A series): the clear frames are
    far darker than the lower quartile of the others, but not than their low (0.1) quantile."""
    forest = [np.full((4, 32, 32), v) for v in (33.0, 33.0, 34.0, 41.0, 43.0)]
    for f in forest:
        f[E.B] = 20.0  # below the blue floor
    veiled = [np.full((4, 32, 32), v) for v in (65.0, 74.0, 81.0, 93.0, 110.0, 139.0, 171.0, 238.0, 254.0,
                                                255.0, 255.0, 255.0, 255.0)]
    got = E.underexposed(np.stack([*forest, *veiled]))
    assert not got.any()
    assert E.underexposed(np.stack([*forest, *veiled]), reference_quantile=0.25)[:3].all()  # 0.3.0's reference
    planted = forest[0] * 0.3  # an underexposed copy is still gated among them
    assert E.underexposed(np.stack([*forest, *veiled, planted]))[-1]


def test_hr_veil_sees_a_grey_patch_and_not_a_ground_change_or_a_uniform_veil():
    rng = np.random.default_rng(3)
    hr = area_down(scene(rng).astype(np.float64))
    clean = hr * 0.9 + 8 + rng.normal(0, 1.5, hr.shape)
    yy, xx = np.mgrid[:32, :32]
    blob = np.exp(-((yy - 12) ** 2 + (xx - 18) ** 2) / (2 * 7.0**2))[..., None]
    veiled = clean.copy()
    veiled[..., :3] = (1 - 0.3 * blob) * veiled[..., :3] + 0.3 * blob * 230
    changed = clean.copy()  # a harvested field: red up a lot, green a little, blue not
    changed[..., 0] += 60 * blob[..., 0]
    changed[..., 1] += 20 * blob[..., 0]
    uniform = (clean * 0.75 + 50)  # a uniform veil is a gain and an offset: the fit absorbs it
    frames = np.stack([_chw(x) for x in (clean, veiled, changed, uniform)])
    got = E.hr_veil(frames, _chw(hr))
    assert got.shape == (4,) and (got >= 0).all()
    assert got[1] > 4 * max(got[0], got[2], got[3])
    assert got[1] > 0.5
    # the HR's gain and offset and the frame's offset do not matter (the frame's gain scales the
    # residual against a fixed DN floor of the spread)
    np.testing.assert_allclose(E.hr_veil(frames + 10, _chw(hr) * 1.3 + 5), got, rtol=1e-3, atol=1e-5)


def test_veil_terms_against_the_clearest_timesteps_see_haze_the_median_hides():
    """Half the series overcast: against the median (a grey overcast frame) the hazy frame looks
    as clear as anything; against the lower quartile (the clear end) its haze shows."""
    clear = _lr(1, gain=0.9, offset=10.0)
    hazy = _haze(clear, 0.6)
    over = [np.clip(_haze(_lr(s), 0.1, (215.0, 215.0, 218.0, 200.0)), 0, 255) for s in (2, 3)]
    frames = np.stack([clear, hazy, *over])
    median = E.veil_terms(frames, clear_quantile=0.5)
    quartile = E.veil_terms(frames, clear_quantile=0.25)
    assert median.dark[1] == pytest.approx(0.0, abs=1e-9) and median.colour[1] == pytest.approx(0.0, abs=1e-9)
    assert quartile.dark[1] > 0.005 and quartile.colour[1] > 0.1 and quartile.detail[1] > 0.1
    # above the robust score's tolerance (0.15) against the clear end only
    assert E.veil_evidence(quartile)[1] > 0.15 > E.veil_evidence(median)[1]
    assert E.veil_evidence(quartile)[0] < 0.05  # the clear frame stays clear
    # `usable` leaves frames out of the reference (e.g. the dark gate's)
    dark = clear * 0.2
    with_dark = np.stack([clear, hazy, dark, *over])
    kept = E.veil_terms(with_dark, clear_quantile=0.25, usable=np.array([True, True, False, True, True]))
    assert E.veil_evidence(kept)[0] < 0.05


def test_hr_veil_low_pass_is_scipys_gaussian_with_nearest_edges():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 10, (3, 2, 32, 32))
    m = E._nearest_gaussian(32, 2.5).astype(np.float64)  # stored as float32
    np.testing.assert_allclose(np.matmul(m, x @ m.T), ndimage.gaussian_filter(x, (0, 0, 2.5, 2.5), mode="nearest"),
                               atol=1e-5)


@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_quantile_is_numpys(q):
    rng = np.random.default_rng(8)
    for n in (1, 2, 3, 4, 7, 16):
        x = rng.normal(0, 1, (5, n))
        np.testing.assert_array_equal(E.quantile(x[0], q), np.quantile(x[0], q))
        np.testing.assert_array_equal(E.quantile(x, q, axis=1), np.quantile(x, q, axis=1))


# The fast paths below replace numpy reductions by the same arithmetic in another form; each must
# give numpy's values bit for bit (the selection's outputs are compared bit for bit across versions).


def test_block_mean_is_numpys_block_mean_bit_for_bit():
    rng = np.random.default_rng(11)
    for block in (2, 4):
        for scale in (1.0, 255.0, 1e4):
            x = (rng.random((7, 2, 32, 32)) * scale).astype(np.float32)
            expected = x.reshape(7, 2, 32 // block, block, 32 // block, block).mean(axis=(3, 5))
            np.testing.assert_array_equal(E._block_mean(x, block), expected)


def test_phase_correlation_window_is_the_shifted_surfaces_centre():
    """The windowed inverse DFT (two matrix products) gives the full inverse FFT's centre to float32
    rounding."""
    rng = np.random.default_rng(12)
    frames = rng.integers(0, 256, (5, 2, 32, 32)).astype(np.float32)
    fa, fb = E.spectra(frames), E.spectra(frames[2:3])
    full = E.phase_correlation(fa, fb, (32, 32))
    for window in (1, 4):
        np.testing.assert_allclose(E.phase_correlation(fa, fb, (32, 32), window),
                                   full[:, 16 - window : 17 + window, 16 - window : 17 + window], rtol=0, atol=1e-6)


def _plain_surfaces(fa, fb, size):
    """The plain form of phase correlation (before 0.3.x's speed-ups): the product of the spectra
    normalised, averaged over bands, a full inverse FFT, shifted."""
    cross = fa * np.conj(fb)
    cross /= np.abs(cross) + np.float32(1e-9)
    return np.fft.fftshift(np.fft.irfft2(cross.mean(axis=-3), s=size), axes=(-2, -1))


def _plain_peak_shift(surfaces, radius=3):
    """peak_shift as numpy's plain indexing spells it (the reference of the gathered form)."""
    k, h, w = surfaces.shape
    cy, cx = h // 2, w // 2
    sub = surfaces[:, cy - radius - 1:cy + radius + 2, cx - radius - 1:cx + radius + 2]
    at = np.ascontiguousarray(sub[:, 1:-1, 1:-1]).reshape(k, -1).argmax(axis=1)
    py, px = np.unravel_index(at, (2 * radius + 1, 2 * radius + 1))
    py, px = py + 1, px + 1
    i = np.arange(k)
    c0 = sub[i, py, px]

    def offset(m, p):
        den = m - 2.0 * c0 + p
        safe = np.where(den < 0, den, -1.0)
        return np.where(den < 0, 0.5 * (m - p) / safe, 0.0).clip(-0.5, 0.5)

    dy = offset(sub[i, py - 1, px], sub[i, py + 1, px])
    dx = offset(sub[i, py, px - 1], sub[i, py, px + 1])
    shift = np.stack([py - 1 - radius + dy, px - 1 - radius + dx], axis=1).astype(np.float64)
    shift[c0 <= 1e-6] = 0.0
    return shift, c0.astype(np.float64), sub[:, radius + 1, radius + 1].astype(np.float64)


def test_registration_equals_the_plain_phase_correlation(big_scene):
    """registration's fast form (spectra normalised once, the windowed inverse DFT, the peak's
    neighbours gathered at once) measures the shifts and peaks of the plain form to float32
    rounding (shifts within 1e-3 px), on frames with real structure, shifts, noise and a flat one."""
    rng = np.random.default_rng(31)
    reference = _window_lr(big_scene, 0, 0)
    frames = [_window_lr(big_scene, dy, dx) * g + o + rng.normal(0, s, reference.shape)
              for dy, dx, g, o, s in ((0, 0, 1.0, 0, 0.5), (3, -2, 0.8, 10, 1.0), (6, -2, 0.8, 10, 1.0),
                                      (-5, 7, 1.2, -5, 2.0), (1, 1, 0.5, 40, 4.0))]
    frames += [_lr(40 + j) for j in range(3)] + [np.full_like(reference, 120.0)]
    frames = np.stack(frames)
    reg = E.registration(frames, reference)
    spec = E.spectra(E.registration_channels(frames))
    ref = E.spectra(E.registration_channels(reference[None]))
    shift, peak, _ = _plain_peak_shift(_plain_surfaces(spec, ref, (32, 32)))
    np.testing.assert_allclose(reg.hr_shift, shift, rtol=0, atol=1e-3)
    np.testing.assert_allclose(reg.hr_peak, peak, rtol=0, atol=1e-5)
    rel, rel_peak, _ = _plain_peak_shift(_plain_surfaces(spec, spec[reg.partner], (32, 32)))
    np.testing.assert_allclose(reg.partner_shift, rel, rtol=0, atol=1e-3)
    np.testing.assert_allclose(reg.partner_peak, rel_peak, rtol=0, atol=1e-5)
    est, est_peak = E.estimate_shift(frames, reference)
    np.testing.assert_allclose(est, shift, rtol=0, atol=1e-3)
    np.testing.assert_allclose(est_peak, peak, rtol=0, atol=1e-5)
    assert np.abs(reg.hr_shift[2] - (1.5, -0.5)).max() <= 0.25 and reg.hr_shift[-1].tolist() == [0.0, 0.0]


def test_spectra_are_numpys_rfft2_to_float32_rounding():
    """The DFT by matrix products (rows first inside `registration`) is numpy's rfft2."""
    rng = np.random.default_rng(35)
    for shape in ((17, 2, 32, 32), (3, 32, 32), (2, 2, 16, 32), (4, 1, 31, 33)):
        x = (rng.random(shape) * 255).astype(np.float32)
        expected = np.fft.rfft2(x)
        got = E._rfft2_rows_first(x.reshape(-1, *shape[-2:]))
        assert got.dtype == np.complex64 and got.shape == (shape[-2], int(np.prod(shape[:-2])), shape[-1] // 2 + 1)
        np.testing.assert_allclose(np.moveaxis(got, 0, 1).reshape(expected.shape), expected, rtol=0,
                                   atol=1e-6 * np.abs(expected).max())
        centred = x - x.mean(axis=(-2, -1), keepdims=True)
        plain = np.fft.rfft2(centred * E._window(*shape[-2:]))
        np.testing.assert_allclose(E.spectra(x), plain, rtol=0, atol=1e-6 * np.abs(plain).max())


def test_peak_shift_equals_its_plain_form_bit_for_bit():
    rng = np.random.default_rng(32)
    surfaces = rng.random((40, 9, 9)).astype(np.float32)
    surfaces[3] = 0.0  # featureless
    surfaces[5, 4, 4] = 2.0  # peak at zero shift
    surfaces[6, 1, 7] = 2.0  # peak at the search window's corner
    for got, expected in zip(E.peak_shift(surfaces), _plain_peak_shift(surfaces)):
        np.testing.assert_array_equal(got, expected)
    big = rng.random((7, 32, 32)).astype(np.float32)
    for got, expected in zip(E.peak_shift(big, 2), _plain_peak_shift(big, 2)):
        np.testing.assert_array_equal(got, expected)


def test_laplacian_and_float_channels_are_the_plain_forms_bit_for_bit():
    rng = np.random.default_rng(33)
    for shape in ((13, 3, 32, 32), (2, 5, 7), (1, 1, 3, 3), (4, 3, 32, 16)):
        x = (rng.random(shape) * 255).astype(np.float32)
        plain = (4.0 * x[..., 1:-1, 1:-1] - x[..., 2:, 1:-1] - x[..., :-2, 1:-1] - x[..., 1:-1, 2:] - x[..., 1:-1, :-2])
        np.testing.assert_array_equal(E.laplacian(x), plain)
    for dtype in (np.float64, np.float32):
        x = (rng.random((9, 4, 32, 32)) * 255).astype(dtype)
        np.testing.assert_array_equal(E.registration_channels(x)[:, 0], x[:, :3].mean(axis=1, dtype=np.float32))


def test_veil_measures_detail_is_detail_level():
    """veil_measures reads the Laplacian's variance from its band covariances (float32) instead of
    numpy's float64 std: the same detail to ~1e-6, and contrast_loss gives the same values with them."""
    rng = np.random.default_rng(34)
    frames = np.stack([_lr(50 + j) for j in range(6)] + [np.full((4, 32, 32), 77.0)]).astype(np.uint8)
    frames[2] = (frames[2] * 0.6 + 90).astype(np.uint8)
    m = E.veil_measures(frames)
    np.testing.assert_allclose(m.detail, E.detail_level(frames), rtol=0, atol=1e-6)
    distance = rng.random(len(frames)) * 0.2
    np.testing.assert_allclose(E.contrast_loss(frames, distance=distance, lap=m.lap, lap_cov=m.lap_cov),
                               E.contrast_loss(frames, distance=distance), rtol=0, atol=0)


def test_veil_measures_are_the_separate_measures_bit_for_bit():
    """veil_measures' shared passes (the Laplacian bands first, the minimum and maximum over R, G, B
    shared by the dark channel and chroma) give the separate functions' values bit for bit."""
    rng = np.random.default_rng(39)
    for frames in (rng.integers(0, 256, (11, 4, 32, 32), dtype=np.uint8), rng.integers(0, 256, (3, 3, 20, 24), dtype=np.uint8),
                   rng.random((5, 4, 32, 32)) * 255):
        m = E.veil_measures(frames)
        lap = E.laplacian(np.asarray(frames[:, :3], dtype=np.float32))
        np.testing.assert_array_equal(m.lap, lap)
        for got, expected in zip(m.lap_cov, E.band_covariances(lap)):
            np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(m.dark, E.haze_index(frames))
        np.testing.assert_array_equal(m.chroma, E.chroma(frames))
        np.testing.assert_array_equal(m.blue, E.blue_red(frames))


def test_integer_means_and_channels_are_numpys():
    rng = np.random.default_rng(13)
    frames = rng.integers(0, 256, (9, 4, 32, 32), dtype=np.uint8)
    np.testing.assert_array_equal(E._pixel_means(frames), frames.mean(axis=(-2, -1), dtype=np.float64))
    np.testing.assert_array_equal(E._rgb_level(frames), frames[:, :3].mean(axis=(1, 2, 3), dtype=np.float64))
    np.testing.assert_array_equal(E.registration_channels(frames)[:, 0], frames[:, :3].mean(axis=1, dtype=np.float32))
    vis = frames[:, :3].astype(np.float32)
    np.testing.assert_array_equal(E.chroma(frames), ((vis.max(axis=1) - vis.min(axis=1)) / (vis.max(axis=1) + 1.0))
                                  .mean(axis=(-2, -1), dtype=np.float64))


def _plain_hr_veil(frames, hr, sigma=2.5, spread_dn=2.0):
    """hr_veil as numpy's plain reductions spell it (np.median, band mean, max, min over axis 1)."""
    f = np.asarray(frames[:, :3], dtype=np.float32)
    k, c, h, w = f.shape
    ref = np.asarray(hr, dtype=np.float32)[:3].reshape(1, c, -1)
    x = f.reshape(k, c, -1)
    rc = ref - ref.mean(axis=-1, keepdims=True)
    xc = x - x.mean(axis=-1, keepdims=True)
    gain = (rc * xc).sum(axis=-1) / ((rc * rc).sum(axis=-1) + np.float32(1e-6))
    residual = (xc - gain[..., None] * rc).reshape(k, c, h, w)
    low = np.matmul(E._nearest_gaussian(h, sigma), residual @ E._nearest_gaussian(w, sigma).T)
    grey = low.mean(axis=1).reshape(k, -1)
    spread = (low.max(axis=1) - low.min(axis=1)).reshape(k, -1)
    lift = np.maximum(grey - np.median(grey, axis=1, keepdims=True), np.float32(0.0))
    return (lift / (spread + np.float32(spread_dn))).mean(axis=1, dtype=np.float64)


def test_hr_veil_equals_its_plain_form_bit_for_bit():
    """hr_veil's median from one partition (and its band reductions as elementwise ops) are numpy's
    np.median and reductions, bit for bit."""
    rng = np.random.default_rng(36)
    hr = _lr(70)
    frames = np.stack([_lr(70, gain=0.8 + 0.1 * j, offset=5 * j, noise=2.0) for j in range(7)])
    frames[3, :3, 8:20, 8:20] += 40.0  # a grey patch
    frames = np.clip(frames, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(E.hr_veil(frames, hr), _plain_hr_veil(frames, hr))
    odd = rng.integers(0, 256, (5, 3, 31, 31), dtype=np.uint8)  # an odd pixel count: np.median itself
    np.testing.assert_array_equal(E.hr_veil(odd, odd[0].astype(np.float64)), _plain_hr_veil(odd, odd[0]))


def test_quantile_of_others_is_each_rows_quantile_bit_for_bit():
    rng = np.random.default_rng(37)
    for k in (2, 3, 5, 16, 17):
        for values in (rng.random(k) * 100, np.round(rng.random(k) * 3)):  # ties too
            others = np.broadcast_to(values, (k, k))[~np.eye(k, dtype=bool)].reshape(k, k - 1)
            for q in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
                np.testing.assert_array_equal(E._quantile_of_others(values, q), np.quantile(others, q, axis=1))


def test_veil_evidence_pair_equals_the_plain_calls_bit_for_bit():
    """Both veil references of the robust score from one stack of terms: veil_evidence(veil_terms(...))
    against the median and against the clearest usable timesteps, bit for bit."""
    rng = np.random.default_rng(38)
    frames = np.stack([_lr(80 + j % 4, gain=0.7 + 0.1 * j, offset=3 * j, noise=2.0) for j in range(9)])
    frames[2] = frames[2] * 0.5 + 100  # a veil
    frames = np.clip(frames, 0, 255).astype(np.uint8)
    m = E.veil_measures(frames)
    for usable in (None, np.ones(9, bool), rng.random(9) > 0.4, np.zeros(9, bool), np.eye(1, 9, 4, dtype=bool)[0]):
        for q in (0.25, 0.1, 0.5):
            median, clear = E.veil_evidence_pair(m, q, usable=usable)
            np.testing.assert_array_equal(median, E.veil_evidence(E.veil_terms(frames, measures=m)))
            np.testing.assert_array_equal(clear, E.veil_evidence(E.veil_terms(frames, clear_quantile=q, usable=usable,
                                                                              measures=m)))
    with pytest.raises(ValueError, match="contrast"):
        E.veil_evidence_pair(m, 0.25, scales={**E.VEIL_SCALES, "contrast": 1.0})


# ---------------------------------------------------------------------------------------------
# Misregistration against the tile's consensus


def _dates_of_one_ground(shift_hr_px: int = 4, n: int = 6, noise: float = 6.0) -> np.ndarray:
    """[n, 4, 32, 32] frames of one smooth ground, each date with its own gain, offset and noise;
    frame 1 shows it displaced by `shift_hr_px` HR px in y and x (a quarter of that in LR px)."""
    hr = ndimage.gaussian_filter(scene(np.random.default_rng(11)).astype(np.float64), (6, 6, 0))
    hr = 20 + 215 * (hr - hr.min()) / np.ptp(hr)
    frames = []
    for k in range(n):
        rng = np.random.default_rng(40 + k)
        ground = np.roll(hr, (shift_hr_px, shift_hr_px), axis=(0, 1)) if k == 1 else hr
        lr = area_down(ground) * rng.uniform(0.85, 1.0) + rng.uniform(3, 12) + rng.normal(0, noise, (32, 32, 4))
        frames.append(_chw(np.clip(lr, 1, 255)))
    return np.stack(frames).astype(np.uint8)


def test_consensus_shift_finds_the_misregistered_date():
    frames = _dates_of_one_ground()
    shift, partners = E.consensus_shift(frames)
    px = np.hypot(shift[:, 0], shift[:, 1])
    assert abs(px[1] - np.hypot(1.0, 1.0)) < 0.3  # (1, 1) LR px
    assert np.all(np.abs(shift[1]) > 0.7)
    assert px[[0, 2, 3, 4, 5]].max() < 0.3
    assert np.all(partners >= 3)
    # the same frames in another order: the same measure per frame (each pair is registered once)
    order = np.array([3, 1, 5, 0, 4, 2])
    again, _ = E.consensus_shift(frames[order])
    np.testing.assert_allclose(again, shift[order], atol=1e-5)


def test_consensus_shift_of_the_needed_timesteps_equals_the_full_measure():
    frames = _dates_of_one_ground()
    full, partners = E.consensus_shift(frames)
    needed = np.array([False, True, False, False, True, False])
    some, some_partners = E.consensus_shift(frames, needed=needed)
    np.testing.assert_allclose(some[needed], full[needed], atol=1e-5)
    np.testing.assert_array_equal(some_partners[needed], partners[needed])
    assert np.isnan(some[~needed]).all() and (some_partners[~needed] == -1).all()
    # registration's spectra give the same measure as the frames' own
    reg = E.registration(frames, frames[0])
    np.testing.assert_allclose(E.consensus_shift(frames, unit_spectra=reg.unit_spectra)[0], full, atol=1e-5)
    none, none_partners = E.consensus_shift(frames, needed=np.zeros(6, bool))
    assert np.isnan(none).all() and (none_partners == -1).all()


def test_consensus_shift_needs_enough_dates_of_the_same_ground():
    frames = _dates_of_one_ground()
    # 3 dates: each has 2 partners at most, no consensus
    shift, partners = E.consensus_shift(frames[:3])
    assert np.all(partners <= 2) and not shift.any()
    assert E.consensus_shift(frames[:3], min_partners=2)[0][1].any()
    # other grounds (and overcast frames) are nobody's partners: the consensus of the rest stands
    others = np.stack([_lr(500 + k).astype(np.uint8) for k in range(3)])
    overcast = np.full((2, 4, 32, 32), 210, np.uint8) + np.random.default_rng(3).integers(0, 3, (2, 4, 32, 32)).astype(np.uint8)
    shift, partners = E.consensus_shift(np.concatenate([frames, others, overcast]))
    assert np.all(partners[6:] < 3) and not shift[6:].any()
    assert abs(np.hypot(*shift[1]) - np.hypot(1.0, 1.0)) < 0.3
    assert np.hypot(shift[[0, 2, 3, 4, 5], 0], shift[[0, 2, 3, 4, 5], 1]).max() < 0.3
    # one frame alone
    assert not E.consensus_shift(frames[:1])[0].any()


def _plain_consensus_shift(frames, sigma=0.15, min_peak=0.2, min_partners=3, radius=3):
    """consensus_shift as its docstring spells it: every pair's weighted, normalised cross-power by
    numpy's FFTs, the full surface's centre, the plain peak search, np.median over the partners."""
    k, h, w = len(frames), frames.shape[-2], frames.shape[-1]
    x = E.registration_channels(frames).astype(np.float64)
    x = (x - x.mean(axis=(-2, -1), keepdims=True)) * E._window(h, w)
    spec = np.fft.rfft2(x)
    unit = spec / (np.abs(spec) + 1e-9)
    weights = E._low_pass_surface(h, w, sigma, radius + 1)[0]
    shifts, peaks = np.zeros((k, k, 2)), np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            if i != j:
                cross = (unit[i] * np.conj(unit[j])).mean(axis=0) * weights
                surface = np.fft.fftshift(np.fft.irfft2(cross, s=(h, w)))[None].astype(np.float32)
                shift, peak, _ = _plain_peak_shift(surface, radius)
                shifts[i, j], peaks[i, j] = shift[0], peak[0]
    out = np.zeros((k, 2))
    agree = peaks >= min_peak
    for t in range(k):
        if agree[t].sum() >= min_partners:
            out[t] = np.median(shifts[t][agree[t]], axis=0)
    return out, agree.sum(axis=1)


def test_consensus_shift_equals_its_plain_form():
    """The fast form (pairs registered once, the weights on one factor, the window by DFT matrices,
    the subset medians vectorised) measures the plain form's shifts (1e-3 px) and partners."""
    frames = _dates_of_one_ground()
    others = np.stack([_lr(600 + j).astype(np.uint8) for j in range(2)])
    for stack in (frames, np.concatenate([frames, others])):
        shift, partners = E.consensus_shift(stack)
        plain, plain_partners = _plain_consensus_shift(stack)
        np.testing.assert_array_equal(partners, plain_partners)
        np.testing.assert_allclose(shift, plain, rtol=0, atol=1e-3)
    assert np.abs(shift).max() > 0.5  # a displaced date is measured, not only zeros


def test_consensus_surfaces_are_the_weighted_inverse_fft_and_medians_numpys():
    """The two shortcuts of `consensus_shift`: the surface centre from the DFT matrices equals the
    fftshifted irfft2 of the weighted cross-power, and the vectorised subset medians np.median's."""
    rng = np.random.default_rng(8)
    h, w, win = 32, 32, 4
    weights, rows, cols = E._low_pass_surface(h, w, 0.15, win)
    cross = (rng.normal(size=(5, h, w // 2 + 1)) + 1j * rng.normal(size=(5, h, w // 2 + 1))).astype(np.complex64)
    cross[:, 0, 0] = cross[:, 0, 0].real  # a real signal's DC
    cross *= weights
    full = np.fft.fftshift(np.fft.irfft2(cross, s=(h, w)), axes=(-2, -1))[:, h // 2 - win : h // 2 + win + 1,
                                                                       w // 2 - win : w // 2 + win + 1]
    np.testing.assert_allclose(np.matmul(np.matmul(rows, cross), cols).real, full, atol=1e-5 * np.abs(full).max())
    # two identical frames peak at 1
    same = weights.astype(np.complex64)[None]
    assert abs(np.matmul(np.matmul(rows, same), cols).real[0, win, win] - 1.0) < 1e-5
    values = rng.normal(size=(7, 7, 2))
    keep = rng.random((7, 7)) < 0.5
    keep[3] = False
    got = E._subset_median(values, keep)
    for t in range(7):
        if keep[t].any():
            np.testing.assert_allclose(got[t], np.median(values[t][keep[t]], axis=0))
        else:
            assert np.isnan(got[t]).all()


def test_one_snow_mask_serves_the_cloud_test_and_the_snow_fraction():
    """The robust score computes `snow_mask` once, on the uint8 frames, for `cloud_shadow_fractions`
    (which computed it on its int16 copy) and `snow_fraction`: the same mask, the same fractions,
    over every green and SWIR value and NIR on both sides of its limit, with 4 and 3 bands."""
    rng = np.random.default_rng(31)
    green, swir_values = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    for c in (4, 3):
        frames = rng.integers(0, 256, (4, c, 256, 256), dtype=np.uint8)
        frames[:, 1] = green
        swir = np.broadcast_to(swir_values, (4, 256, 256)).astype(np.uint8)
        mask = E.snow_mask(frames, swir)
        np.testing.assert_array_equal(mask, E.snow_mask(frames.astype(np.int16), swir))
        assert mask.any() and not mask.all()
        reference = np.clip(frames.astype(int) + rng.integers(-80, 20, frames.shape), 0, 255).astype(np.uint8)
        for got, want in zip(E.cloud_shadow_fractions(frames, reference, swir, snow=mask),
                             E.cloud_shadow_fractions(frames, reference, swir)):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(E.snow_fraction(frames, swir, mask=mask), E.snow_fraction(frames, swir))
