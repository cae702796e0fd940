"""The numeric core against scikit-image / Pillow references and the algorithm's invariants."""
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.exposure import match_histograms as sk_match
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tests.tile_factory import black_edge, cloud, scene, series_from
from transforms import selection as S
from transforms.imagery import black_border_count, has_black_border


def _u8(rng, shape, hi=256):
    return rng.integers(0, hi, shape).astype(np.uint8)


@pytest.mark.parametrize("seed", range(12))
def test_match_histograms_uint8_equals_skimage(seed):
    rng = np.random.default_rng(seed)
    # vary value ranges: sparse histograms, narrow templates, full range
    source = (_u8(rng, (128, 128, 4), 40) * rng.integers(1, 7)).astype(np.uint8)
    templates = _u8(rng, (5, 32, 32, 4), int(rng.integers(2, 257)))
    ours = S.match_histograms(source, templates)
    assert ours.dtype == np.uint8
    for j in range(len(templates)):
        np.testing.assert_array_equal(ours[j], sk_match(source, templates[j], channel_axis=-1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_match_histograms_float_source_equals_skimage_bitwise(dtype):
    rng = np.random.default_rng(3)
    source = rng.normal(100, 50, (32, 32, 4)).astype(dtype)
    source[:8] = np.round(source[:8] / 9) * 9  # repeated values exercise the unique() counts
    templates = _u8(rng, (6, 32, 32, 4))
    ours = S.match_histograms(source, templates)
    for j in range(len(templates)):
        ref = sk_match(source, templates[j], channel_axis=-1)
        assert ours[j].dtype == ref.dtype
        np.testing.assert_array_equal(ours[j], ref)


def test_match_histograms_degenerate_inputs():
    constant = np.full((32, 32, 3), 7, np.uint8)
    template = np.full((1, 32, 32, 3), 200, np.uint8)
    np.testing.assert_array_equal(S.match_histograms(constant, template)[0], sk_match(constant, template[0], channel_axis=-1))
    rng = np.random.default_rng(0)
    src = _u8(rng, (32, 32, 3))
    np.testing.assert_array_equal(S.match_histograms(src, template)[0], sk_match(src, template[0], channel_axis=-1))


@pytest.mark.parametrize("seed", range(6))
def test_ssim_matches_skimage_within_1e6(seed):
    rng = np.random.default_rng(seed)
    a = _u8(rng, (4, 32, 32, 4))
    b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    ours = S.ssim(a, b)
    for j in range(len(a)):
        ref = structural_similarity(a[j], b[j], gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=255, channel_axis=-1)
        assert abs(ours[j] - ref) < 1e-6


def test_ssim_torchmetrics_against_direct_formula():
    """Independent reference: scipy's 'mirror' mode is torch's 'reflect' padding."""
    rng = np.random.default_rng(5)
    a = rng.uniform(0, 255, (3, 32, 32, 4))
    b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255)
    x = np.arange(-5, 6)
    g = np.exp(-(x / 1.5) ** 2 / 2)
    g /= g.sum()
    k2 = np.outer(g, g)

    def f(img):
        return np.stack([ndimage.correlate(img[..., c], k2, mode="mirror") for c in range(img.shape[-1])], -1)

    for j in range(3):
        ux, uy = f(a[j]), f(b[j])
        vx = np.maximum(f(a[j] ** 2) - ux**2, 0)
        vy = np.maximum(f(b[j] ** 2) - uy**2, 0)
        vxy = f(a[j] * b[j]) - ux * uy
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        ref = (((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))).mean()
        assert abs(S.ssim_torchmetrics(a[j : j + 1], b[j : j + 1])[0] - ref) < 1e-9


def test_ssim_of_identical_images_is_one():
    a = scene(np.random.default_rng(1), 32)
    assert S.ssim(a[None], a[None])[0] == pytest.approx(1.0)
    assert S.ssim_torchmetrics(a[None], a[None])[0] == pytest.approx(1.0)


def test_bicubic_aa_matches_pillow():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (128, 128)).astype(np.float32)
    ref = np.asarray(Image.fromarray(img, "F").resize((32, 32), Image.BICUBIC))
    ours = S.downsample(img[:, :, None], 32, "bicubic_aa")[:, :, 0]
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_bicubic_torch_weights_are_pytorchs_for_factor_4():
    # align_corners=False, a=-0.75: output i samples 4i+1.5 -> taps at 4i..4i+3 with t=0.5
    w = S.bicubic_torch_weights(128, 32)
    expected = np.array([-0.09375, 0.59375, 0.59375, -0.09375])
    for i in (0, 7, 31):
        np.testing.assert_allclose(w[i, 4 * i : 4 * i + 4], expected)
        assert np.count_nonzero(w[i]) == 4
    # and a non-integer factor keeps rows summing to one with clamped borders
    np.testing.assert_allclose(S.bicubic_torch_weights(100, 32).sum(axis=1), 1.0)


def test_psnr_matches_skimage():
    rng = np.random.default_rng(2)
    ref = rng.uniform(0, 255, (32, 32, 4))
    imgs = _u8(rng, (5, 32, 32, 4))
    ours = S.psnr(imgs, ref)
    for j in range(5):
        assert ours[j] == pytest.approx(peak_signal_noise_ratio(ref, imgs[j].astype(np.float64), data_range=255))
    assert S.psnr(imgs[:1], imgs[0])[0] == np.inf


def test_top_k_is_stable_and_descending():
    values = np.array([1.0, 5.0, 3.0, 5.0, 2.0])
    assert S.top_k_by_psnr(values, 3).tolist() == [1, 3, 2]
    assert S.top_k_by_psnr(values, 16).tolist() == [1, 3, 2, 4, 0]


def test_black_border_rule_counts_strips_separately():
    img = np.full((1, 32, 32, 3), 50, np.uint8)
    img[0, 0, 0] = 0  # a corner: in the top strip and the left strip
    assert black_border_count(img)[0] == 2
    assert has_black_border(img)[0]
    one = np.full((32, 32, 3), 50, np.uint8)
    one[0, 10] = 0
    assert black_border_count(one) == 1 and not has_black_border(one)
    inner = np.full((32, 32, 3), 50, np.uint8)
    inner[10:20, 10:20] = 0
    assert black_border_count(inner) == 0
    partly = np.full((32, 32, 3), 50, np.uint8)
    partly[0, 5:9, 0] = 0  # not black: only one channel is zero
    assert black_border_count(partly) == 0


def _tile(seed=0, t=20):
    rng = np.random.default_rng(seed)
    hr = scene(rng)
    return hr, series_from(hr, rng, t)


@pytest.mark.parametrize("mode", ["paper", "companion"])
def test_black_bordered_copy_of_best_is_never_chosen(mode):
    hr, series = _tile()
    clean = S.select_pair(hr, series, S.SelectionConfig(mode=mode))
    # plant a black-bordered exact copy of the ideal LR at index 0, before every other
    ideal = S.to_uint8(S.downsample(hr, 32, "bicubic_aa"))
    planted = np.concatenate([black_edge(ideal)[None], series])
    sel = S.select_pair(hr, planted, S.SelectionConfig(mode=mode))
    assert 0 not in sel.valid_indices and 0 not in sel.candidate_indices
    assert sel.lr_index == clean.lr_index + 1  # original indices kept through the filtering


@pytest.mark.parametrize("mode", ["paper", "companion"])
def test_emitted_lr_is_the_scored_one_after_filtered_timesteps(mode):
    hr, series = _tile(1, 24)
    series[[0, 2, 3]] = black_edge(series[[0, 2, 3]].reshape(-1, 32, 4)).reshape(3, 32, 32, 4)
    sel = S.select_pair(hr, series, S.SelectionConfig(mode=mode, top_k=8))
    np.testing.assert_array_equal(sel.lr, series[sel.lr_index])
    assert sel.lr_index == sel.candidate_indices[int(np.argmin(sel.candidate_scores))]
    assert sel.psnr == pytest.approx(sel.candidate_psnr[int(np.argmin(sel.candidate_scores))])
    assert len(sel.candidate_indices) == 8 and set(sel.candidate_indices) <= set(sel.valid_indices)
    assert list(sel.valid_indices) == [i for i in range(24) if i not in (0, 2, 3)]
    # candidate PSNRs are best first, and the HR is matched to exactly the emitted LR
    assert np.all(np.diff(sel.candidate_psnr) <= 0)
    np.testing.assert_array_equal(sel.hr_matched, sk_match(hr, sel.lr, channel_axis=-1))


def test_clouded_timesteps_are_not_chosen():
    hr, series = _tile(2, 16)
    series[::2] = np.stack([cloud(f) for f in series[::2]])
    for mode in ("paper", "companion"):
        sel = S.select_pair(hr, series, S.SelectionConfig(mode=mode))
        assert sel.lr_index % 2 == 1


def test_paper_score_formula_against_skimage():
    hr, series = _tile(3, 6)
    sel = S.select_pair(hr, series, S.SelectionConfig(mode="paper", alpha=0.7))
    hr_down = S.to_uint8(S.downsample(hr, 32, "bicubic_aa"))
    for idx, score in zip(sel.candidate_indices, sel.candidate_scores):
        lr = series[idx]

        def d(a, b):
            return 1 - structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                             data_range=255, channel_axis=-1)

        expected = 0.7 * d(hr_down, lr) + 0.3 * d(sk_match(hr_down, lr, channel_axis=-1), lr)
        assert score == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("mode", S.SELECTION_MODES)
def test_alpha_changes_the_mix(mode):
    hr, series = _tile(4, 10)
    a1 = S.select_pair(hr, series, S.SelectionConfig(mode=mode, alpha=1.0))
    a0 = S.select_pair(hr, series, S.SelectionConfig(mode=mode, alpha=0.0))
    assert not np.allclose(a1.candidate_scores, a0.candidate_scores)


@pytest.mark.parametrize("mode", S.SELECTION_MODES)
def test_no_valid_timesteps_raises(mode):
    hr, series = _tile(5, 4)
    with pytest.raises(S.NoValidTimesteps):
        S.select_pair(hr, np.stack([black_edge(f) for f in series]), S.SelectionConfig(mode=mode))


@pytest.mark.parametrize("mode", S.SELECTION_MODES)
def test_rgb_only_selection(mode):
    hr, series = _tile(6, 8)
    sel = S.select_pair(hr[..., :3].copy(), series[..., :3].copy(), S.SelectionConfig(mode=mode))
    assert sel.hr_matched.shape == (128, 128, 3) and sel.lr.shape == (32, 32, 3)


def test_config_validation():
    with pytest.raises(ValueError):
        S.SelectionConfig(mode="best")
    with pytest.raises(ValueError):
        S.SelectionConfig(alpha=1.5)
    with pytest.raises(ValueError):
        S.SelectionConfig(top_k=0)


def test_to_uint8_rounds_half_up_and_clips():
    values = np.array([-3.0, 0.2, 0.5, 1.49, 254.5, 254.4, 300.0])
    assert S.to_uint8(values).tolist() == [0, 0, 1, 1, 255, 254, 255]


@pytest.mark.parametrize("seed", range(5))
def test_psnr_of_uint8_pairs_equals_the_float_formula_exactly(seed):
    rng = np.random.default_rng(seed)
    images = _u8(rng, (7, 32, 32, 4))
    images[0] = images[1]  # identical pair: infinite PSNR
    reference = images[1].copy() if seed == 0 else _u8(rng, (32, 32, 4))
    diff = images.astype(np.float64) - reference.astype(np.float64)
    with np.errstate(divide="ignore"):
        expected = 10.0 * np.log10(255.0**2 / np.mean(diff * diff, axis=(1, 2, 3)))
    np.testing.assert_array_equal(S.psnr(images, reference), expected)
    np.testing.assert_array_equal(S.psnr(images, reference.astype(np.float32)), expected)


def test_psnr_int32_sums_at_their_limits_equal_the_float_formula():
    """The int16 / int32 path at its extreme differences (0 against 255 everywhere), 3 bands, and
    images past its int32 bound (the int64 path) give the float64 formula's values."""
    for shape in ((3, 32, 32, 4), (2, 32, 32, 3), (2, 128, 128, 3), (2, 91, 91, 4)):
        images = np.zeros(shape, np.uint8)
        images[1] = 255
        reference = np.full(shape[1:], 255, np.uint8)
        reference[0, 0] = 0
        diff = images.astype(np.float64) - reference.astype(np.float64)
        with np.errstate(divide="ignore"):
            expected = 10.0 * np.log10(255.0**2 / np.mean(diff * diff, axis=tuple(range(1, len(shape)))))
        np.testing.assert_array_equal(S.psnr(images, reference), expected)


def _confidence_over_all_candidates(scores, best, candidates):
    """pair_confidence's margin as first written: correlations of every candidate at once."""
    corr = S.gap_free_correlation(candidates, candidates[best].astype(np.float32))
    rival = np.ones(len(scores), dtype=bool)
    rival[best] = False
    rival &= corr < S.NEAR_COPY
    margin = float(scores[rival].min() - scores[best]) if rival.any() else S.MARGIN_SCALE
    return min(max(margin, 0.0) / S.MARGIN_SCALE, 1.0)


def test_a_uint8_reference_is_centred_as_its_float32_copy_bit_for_bit():
    """pair_confidence centres the chosen uint8 candidate directly (its exact integer mean divided
    once) instead of its float32 copy (numpy's float32 mean): the same reference terms, for power of
    two and other pixel counts, constant and extreme images."""
    rng = np.random.default_rng(25)
    for shape in ((32, 32, 4), (32, 32, 3), (29, 31, 4), (17, 24, 3), (128, 128, 4)):
        for image in (_u8(rng, shape), np.full(shape, 255, np.uint8), _u8(rng, shape, 2) * np.uint8(255), _u8(rng, shape, 7)):
            got = S._centred_reference(image, shape[-1])
            want = S._centred_reference(image.astype(np.float32), shape[-1])
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("seed", range(8))
def test_pair_confidence_stops_at_the_best_rival_with_the_same_result(seed):
    rng = np.random.default_rng(seed)
    base = _u8(rng, (32, 32, 4))
    # near copies of the chosen timestep (not rivals) and unrelated ones, scores in random order
    copies = [np.clip(base.astype(int) + rng.integers(-2, 3, base.shape), 0, 255).astype(np.uint8) for _ in range(3)]
    others = [_u8(rng, (32, 32, 4)) for _ in range(4)]
    candidates = np.stack([base, *copies, *others])[rng.permutation(8)]
    scores = rng.uniform(0.1, 0.4, 8)
    if seed % 2:
        scores[rng.integers(8)] = scores[rng.integers(8)]  # a tie
    best = int(np.argmin(scores))
    assert S.pair_confidence(scores, best, candidates) == _confidence_over_all_candidates(scores, best, candidates)
    only_copies = np.stack([base, *copies])
    best = int(np.argmin(scores[:4]))  # no rival at all: full confidence
    assert S.pair_confidence(scores[:4], best, only_copies) == _confidence_over_all_candidates(
        scores[:4], best, only_copies) == 1.0


def test_robust_ranking_correlation_is_gap_free_correlation_to_float32_rounding():
    """The robust ranking's bands-first form is gap_free_correlation to float32 rounding, on
    uint8 images against float and uint8 references, RGB and RGB + NIR (float32 sums over 1,024 pixels
    in another order: within 5e-6)."""
    rng = np.random.default_rng(23)
    for shape in ((27, 32, 32, 3), (30, 32, 32, 4), (5, 16, 24, 4)):
        base = rng.integers(0, 256, shape[1:], dtype=np.uint8)
        images = np.clip(base.astype(np.float64) * rng.uniform(0.4, 1.2, (shape[0], 1, 1, 1))
                         + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)
        for reference in (base.astype(np.float64) * 0.9 + 3.3, base, images[1]):
            fast = S._gap_free_correlation_bands_first(images, reference)
            np.testing.assert_allclose(fast, S.gap_free_correlation(images, reference), rtol=0, atol=5e-6)
        assert fast[1] > 0.999999 and fast.std() > 0.01  # images[1] against itself; a spread of values


def test_robust_ranking_values_order_as_gap_free_correlation():
    """The robust ranking's values (the bands-first form, close ones re-measured by the plain form)
    rank every image as gap_free_correlation does, exact ties and near ties included; an image's
    plain value is the same computed alone or in a stack."""
    rng = np.random.default_rng(24)
    base = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    images = np.clip(base.astype(np.float64) * rng.uniform(0.5, 1.1, (20, 1, 1, 1)) + rng.normal(0, 25, (20, 32, 32, 3)),
                     0, 255).astype(np.uint8)
    images[7] = images[3]  # an exact tie
    images[12] = images[4]
    images[12, 0, 0, 0] ^= 1  # a near tie (one DN of one pixel)
    reference = base.astype(np.float64) + 0.25
    plain = S.gap_free_correlation(images, reference)
    got = S._robust_ranking_correlation(images, reference)
    assert np.argsort(-got, kind="stable").tolist() == np.argsort(-plain, kind="stable").tolist()
    close = np.abs(plain[:, None] - plain[None, :]) < S.RANKING_TIE
    np.fill_diagonal(close, False)
    assert close.any() and (got[close.any(axis=1)] == plain[close.any(axis=1)]).all()
    np.testing.assert_array_equal(plain, [S.gap_free_correlation(images[j : j + 1], reference)[0] for j in range(20)])


def test_fast_paths_equal_the_plain_numpy_forms():
    """gap_free_correlation's means of uint8 data, the histograms (uint16 and OpenCV paths) and the
    black-border count of uint8 RGB are numpy's plain forms, bit for bit."""
    rng = np.random.default_rng(21)
    images = rng.integers(0, 256, (11, 32, 32, 4), dtype=np.uint8)
    reference = rng.random((32, 32, 4)) * 255
    x = images.reshape(11, -1, 4).astype(np.float32)
    x -= x.mean(axis=1, keepdims=True)
    for ref in (reference, images[3]):
        r = np.asarray(ref, dtype=np.float32).reshape(-1, 4)
        r = r - r.mean(axis=0)
        num = np.einsum("npc,pc->nc", x, r)
        den = np.sqrt(np.einsum("npc,npc->nc", x, x) * (r * r).sum(axis=0)) + 1e-6
        np.testing.assert_array_equal(S.gap_free_correlation(images, ref), (num / den).mean(axis=1, dtype=np.float64))
    hr = rng.integers(0, 256, (128, 128, 4), dtype=np.uint8)
    for image, rows in ((images, (11, 4)), (hr, (4,))):
        flat = image.astype(np.intp) + 256 * np.arange(int(np.prod(rows))).reshape(
            rows[:-1] + (1,) * (image.ndim - len(rows)) + rows[-1:])
        expected = np.bincount(flat.ravel(), minlength=256 * int(np.prod(rows))).reshape(-1, 256)
        np.testing.assert_array_equal(S._histograms(image, rows), expected)
    edged = rng.integers(0, 3, (20, 32, 32, 4), dtype=np.uint8)
    rgb = edged[..., :3]
    strips = (rgb[:, :2], rgb[:, -2:], rgb[:, :, :2], rgb[:, :, -2:])
    np.testing.assert_array_equal(black_border_count(edged), sum((s == 0).all(axis=-1).sum(axis=(-2, -1)) for s in strips))


def test_robust_ssim_distance_is_the_plain_float32_form():
    """The robust distance's float32 moments filtered in the rows-first layout (two matrix products
    over every map) equal the per-image form (`_smooth_f32`) to float32 rounding, and the paper's
    float64 score to ~1e-5."""
    rng = np.random.default_rng(22)
    for c in (4, 3):
        hr = rng.integers(0, 256, (128, 128, c), dtype=np.uint8)
        hr_ref = S.to_uint8(S.downsample(hr, 32, "bicubic_aa"))
        candidates = np.clip(hr_ref[None] * rng.uniform(0.5, 1.3, (9, 1, 1, 1)) + rng.normal(0, 20, (9, 32, 32, c)),
                             0, 255).astype(np.uint8)
        candidates[4] = 200  # flat
        k = len(candidates)
        matched = S._match_uint8(hr_ref, candidates).reshape(k, c, 32, 32)
        frames = np.ascontiguousarray(np.moveaxis(candidates, -1, 1))
        r = np.moveaxis(hr_ref, -1, 0).astype(np.float32)
        ur, urr = S._smooth_f32(np.stack([r, r * r]))
        uy, uyy, ury, um, umm, umy = S._smooth_f32(S._moment_maps(frames, r, matched, np.float32))
        s_raw = S._ssim_from_moments(ur, uy, urr, uyy, ury, False).mean(axis=(-3, -2, -1), dtype=np.float64)
        s_matched = S._ssim_from_moments(um, uy, umm, uyy, umy, False).mean(axis=(-3, -2, -1), dtype=np.float64)
        plain = 0.7 * (1.0 - s_raw) + 0.3 * (1.0 - s_matched)
        got = S._ssim_distance_f32(hr_ref, frames, matched, 0.7)
        np.testing.assert_allclose(got, plain, rtol=0, atol=5e-6)
        np.testing.assert_allclose(got, S.paper_scores(hr_ref, candidates, 0.7), rtol=0, atol=2e-5)


def _plain_luts(source, templates):
    """scikit-image's uint8 rule written out per (template, band): np.interp of the source's quantiles
    at all 256 values on the template's non-empty bins, truncated to uint8."""
    n, c = templates.shape[0], templates.shape[-1]
    out = np.empty((n, c, 256), np.uint8)
    for j in range(n):
        for band in range(c):
            src_q = np.cumsum(np.bincount(source[..., band].ravel(), minlength=256)) / source[..., band].size
            counts = np.bincount(templates[j, ..., band].ravel(), minlength=256)
            values = np.nonzero(counts)[0]
            tmpl_q = np.cumsum(counts[values]) / templates[j, ..., band].size
            out[j, band] = np.interp(src_q, tmpl_q, values).astype(np.uint8)
    return out


def _adversarial_histogram_cases():
    rng = np.random.default_rng(23)
    yield _u8(rng, (32, 32, 4)), _u8(rng, (16, 32, 32, 4))  # the build's shapes
    yield _u8(rng, (128, 128, 3)), _u8(rng, (1, 32, 32, 3))  # the output's full-size HR
    yield np.full((32, 32, 3), 7, np.uint8), _u8(rng, (5, 32, 32, 3))  # constant source
    yield _u8(rng, (32, 32, 4)), np.full((4, 32, 32, 4), 200, np.uint8)  # single-value templates
    yield np.full((8, 8, 2), 255, np.uint8), np.full((3, 32, 32, 2), 0, np.uint8)  # the extremes
    every = np.resize(np.arange(256, dtype=np.uint8), (32, 32, 4))  # all 256 values in both
    yield every, np.stack([np.resize(rng.permutation(256).astype(np.uint8), (32, 32, 4)) for _ in range(6)])
    yield (_u8(rng, (32, 32, 4), 8) * 32).astype(np.uint8), (_u8(rng, (7, 32, 32, 4), 4) * 60 + 3).astype(np.uint8)  # empty bins
    yield rng.choice(np.array([0, 255], np.uint8), (3, 3, 4)), _u8(rng, (9, 32, 32, 4), 3)  # source smaller than the templates
    yield _u8(rng, (32, 32, 1), 2), _u8(rng, (11, 1, 1, 1))  # one-pixel templates, one band
    yield _u8(rng, (32, 32, 4)), _u8(rng, (70, 32, 32, 4), 9)  # > 256 rows: the intp histograms


def test_match_luts_are_scikit_images_lookup_tables_bit_for_bit():
    """`_interp_luts`' positions from the source's small table and its per-position terms give every
    one of the 256 table entries np.interp gives (scikit-image's rule), and the matched images are
    scikit-image's, on empty bins, constant sources and templates, all 256 values, sources smaller
    and larger than the templates, one-pixel templates and more than 256 rows."""
    for source, templates in _adversarial_histogram_cases():
        np.testing.assert_array_equal(S._match_luts(source, templates), _plain_luts(source, templates))
        n, c = templates.shape[0], templates.shape[-1]
        matched = S._match_uint8(source, templates).reshape(n, c, *source.shape[:-1])
        for j in (0, n - 1):
            np.testing.assert_array_equal(np.moveaxis(matched[j], 0, -1), sk_match(source, templates[j], channel_axis=-1))
        full = S.match_histograms(source, templates[:1])[0]  # OpenCV's LUT path for 2-4 bands
        np.testing.assert_array_equal(full, sk_match(source, templates[0], channel_axis=-1))


def test_histograms_with_cached_offsets_are_the_plain_counts():
    rng = np.random.default_rng(24)
    for shape in ((16, 32, 32, 4), (16, 32, 32, 3), (1, 32, 32, 4), (5, 8, 8, 2), (64, 2, 2, 4), (3, 32, 32, 1),
                  (3, 200, 200, 3)):  # the last beyond the cached size
        images = _u8(rng, shape)
        n, c = shape[0], shape[-1]
        expected = np.stack([np.bincount(images[j, ..., b].ravel(), minlength=256) for j in range(n) for b in range(c)])
        for _ in range(2):  # the second call reads the cached offsets
            np.testing.assert_array_equal(S._histograms(images, (n, c)), expected)
