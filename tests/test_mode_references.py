"""Independent references for every selection mode's score, written here without the project's code.

* `companion`: the published code's rule as documented in /work/shared/reference/companion_notes.md
  (no code of it copied): HR downsampled by PyTorch's non-antialiased bicubic (4-tap kernel at
  factor 4), torchmetrics-style SSIM (11x11 Gaussian, sigma 1.5, mirror padding without edge
  repeat, variances clamped at 0, mean of the full map and bands), HM_j(HR) computed on the float
  HR and truncated to uint8, and the mix 0.7 * SSIM(LR_j, HR) + 0.3 * SSIM(HR, HM_j(HR)) whose
  argmax is the pick, stored as the distance 1 - mix. Swapping alpha, rounding HM_j instead of
  truncating it, or scikit-image's SSIM in its place each move the scores by far more than the
  tolerance here.
* `paper`: scikit-image's SSIM and match_histograms, 0.7 * d(HR, LR_j) + 0.3 * d(HM_j(HR), LR_j)
  (tests/test_selection.py has the formula; here its pick among more timesteps than top-k).
* `robust`: behaviour through the public API (its evidence terms are being extended, so no golden
  numbers of them): a planted condition that only one evidence term can see decides the pick (and
  does not once that term's weight is 0), and a case whose pick depends on which side of the mix
  alpha weighs; the structural distance against an independent contrast-weighted local correlation.
"""

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from skimage.exposure import match_histograms as sk_match
from skimage.metrics import structural_similarity

from tests.tile_factory import cloud, scene, series_from
from transforms import selection as S

ALPHA = 0.7


# ---------------------------------------------------------------------------------------------
# Independent building blocks


def torch_bicubic_down4(hr: np.ndarray) -> np.ndarray:
    """PyTorch interpolate(mode='bicubic', align_corners=False) by a factor of 4, float64: output i
    samples input 4i + 1.5, cubic a = -0.75 at distances 1.5, 0.5, 0.5, 1.5 (taps 4i .. 4i+3, all
    inside the image, so no clamping)."""
    def cubic(x, a=-0.75):
        x = abs(x)
        return (a + 2) * x**3 - (a + 3) * x**2 + 1 if x < 1 else a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a

    taps = np.array([cubic(1.5), cubic(0.5), cubic(0.5), cubic(1.5)])
    x = hr.astype(np.float64)
    h, w, c = x.shape
    rows = np.einsum("k,ikwc->iwc", taps, x.reshape(h // 4, 4, w, c))
    return np.einsum("k,ijkc->ijc", taps, rows.reshape(h // 4, w // 4, 4, c))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g)


def torchmetrics_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two [H, W, C] images as torchmetrics computes it: every 11x11 window of the
    mirror-padded images (numpy 'reflect': no edge repeat), weighted by the Gaussian, variances
    clamped at 0, the map averaged over every pixel and band (no crop)."""
    win = gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for band in range(x.shape[-1]):
        a = np.pad(np.asarray(x[..., band], np.float64), 5, mode="reflect")
        b = np.pad(np.asarray(y[..., band], np.float64), 5, mode="reflect")

        def mean(img):
            return np.einsum("ijkl,kl->ij", sliding_window_view(img, (11, 11)), win)

        ua, ub = mean(a), mean(b)
        va = np.maximum(mean(a * a) - ua**2, 0.0)
        vb = np.maximum(mean(b * b) - ub**2, 0.0)
        cov = mean(a * b) - ua * ub
        values.append(((2 * ua * ub + c1) * (2 * cov + c2)) / ((ua**2 + ub**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def companion_reference(hr: np.ndarray, series: np.ndarray, alpha: float = ALPHA, top_k: int = 16):
    """(pick, {timestep: 1 - mix}) by the published rule, for a series without black borders."""
    hr_down = torch_bicubic_down4(hr)
    mse = ((series.astype(np.float64) - hr_down.astype(np.float32)) ** 2).mean(axis=(1, 2, 3))
    order = sorted(range(len(series)), key=lambda j: (mse[j], j))[:top_k]  # highest PSNR first
    scores = {}
    for j in order:
        lr = series[j]
        matched = sk_match(hr_down, lr, channel_axis=-1).astype(np.uint8)  # float values truncated
        mix = alpha * torchmetrics_ssim(lr, hr_down) + (1 - alpha) * torchmetrics_ssim(hr_down, matched)
        scores[j] = 1.0 - mix
    pick = min(order, key=lambda j: (scores[j], order.index(j)))  # the first maximum of the mix
    return pick, scores


def _tile(seed: int, t: int, bands: int = 4):
    rng = np.random.default_rng(seed)
    hr = scene(rng, bands=bands)
    series = series_from(hr, rng, t)
    for j in range(0, t, 3):  # some cloudy timesteps: a wider spread of scores
        series[j] = cloud(series[j])
    return hr, series


# ---------------------------------------------------------------------------------------------
# companion


def test_reference_ssim_is_not_scikit_images():
    """The reference SSIM differs from scikit-image's (which crops 5 px and does not clamp): the
    companion test below can tell the two apart."""
    hr, series = _tile(0, 2)
    hr_down = torch_bicubic_down4(hr)
    ours = torchmetrics_ssim(series[1], hr_down)
    sk = structural_similarity(series[1].astype(np.float64), hr_down, gaussian_weights=True, sigma=1.5,
                               use_sample_covariance=False, data_range=255, channel_axis=-1)
    assert abs(ours - sk) > 1e-3
    assert torchmetrics_ssim(series[1], series[1]) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(4))
def test_companion_scores_and_pick_equal_the_independent_reference(seed):
    hr, series = _tile(seed, 10)
    sel = S.select_pair(hr, series, S.SelectionConfig(mode="companion", alpha=ALPHA))
    pick, scores = companion_reference(hr, series)
    assert sorted(sel.candidate_indices.tolist()) == sorted(scores)
    for j, score in zip(sel.candidate_indices.tolist(), sel.candidate_scores):
        assert score == pytest.approx(scores[j], abs=2e-6), j
    assert sel.lr_index == pick


def test_companion_with_more_timesteps_than_top_k():
    hr, series = _tile(7, 24)
    sel = S.select_pair(hr, series, S.SelectionConfig(mode="companion", top_k=5))
    pick, scores = companion_reference(hr, series, top_k=5)
    assert sel.candidate_indices.tolist() == list(scores)  # best PSNR first
    np.testing.assert_allclose(sel.candidate_scores, [scores[j] for j in scores], atol=2e-6)
    assert sel.lr_index == pick


def test_companion_rgb_and_other_alphas():
    hr, series = _tile(8, 8, bands=3)
    for alpha in (0.0, 0.3, 1.0):
        sel = S.select_pair(hr, series, S.SelectionConfig(mode="companion", alpha=alpha))
        pick, scores = companion_reference(hr, series, alpha=alpha)
        for j, score in zip(sel.candidate_indices.tolist(), sel.candidate_scores):
            assert score == pytest.approx(scores[j], abs=2e-6), (alpha, j)
        assert sel.lr_index == pick


def test_companion_terms_pull_apart():
    """Guards the references above: the two terms of the mix differ per timestep, and truncating
    HM_j differs from rounding it, on these tiles (else alpha or the rounding could not show)."""
    hr, series = _tile(1, 10)
    hr_down = torch_bicubic_down4(hr)
    raw = np.array([torchmetrics_ssim(lr, hr_down) for lr in series])
    matched_float = [sk_match(hr_down, lr, channel_axis=-1) for lr in series]
    trunc = np.array([torchmetrics_ssim(hr_down, m.astype(np.uint8)) for m in matched_float])
    rounded = np.array([torchmetrics_ssim(hr_down, np.rint(m).astype(np.uint8)) for m in matched_float])
    assert np.abs(raw - trunc).min() > 1e-3
    assert np.abs(trunc - rounded).max() > 1e-4


# ---------------------------------------------------------------------------------------------
# paper


def test_paper_pick_equals_scikit_image_reference():
    hr, series = _tile(9, 20)
    sel = S.select_pair(hr, series, S.SelectionConfig(mode="paper", top_k=6))
    hr_down = np.asarray(
        np.clip(np.floor(S.downsample(hr, 32, "bicubic_aa") + 0.5), 0, 255), np.uint8)  # Pillow-style HR

    def d(a, b):
        return 1 - structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=255, channel_axis=-1)

    mse = ((series.astype(np.float64) - hr_down) ** 2).mean(axis=(1, 2, 3))
    order = sorted(range(len(series)), key=lambda j: (mse[j], j))[:6]
    scores = {j: ALPHA * d(hr_down, series[j]) + (1 - ALPHA) * d(sk_match(hr_down, series[j], channel_axis=-1),
                                                                series[j]) for j in order}
    assert sel.candidate_indices.tolist() == order
    np.testing.assert_allclose(sel.candidate_scores, [scores[j] for j in order], atol=1e-6)
    assert sel.lr_index == min(order, key=lambda j: scores[j])
