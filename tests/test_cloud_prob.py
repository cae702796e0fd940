"""s2cloudless cloud probability (transforms/cloud_prob.py): the numpy forest against LightGBM, the
provider's CLP on real Sentinel-2 scenes in S2-NAIP's 8-bit scaling, and its use in the robust
selection and the records."""
from pathlib import Path

import numpy as np
import pytest

from tests.tile_factory import NAIP_ID, area_down, scene
from transforms import cloud_prob as CP
from transforms import records
from transforms import selection as S
from transforms.io import example_proto
from transforms.io.readers import as_stored
from transforms.tiles import TileId

# REFERENCE_SCENES.npy holds no dates; its scenes are these dates of CLP.npy (real_s2/README.md)
SCENE_TO_CLP = (2, 1, 4, 3, 0)


@pytest.fixture(scope="module")
def eolearn(real_s2_dir) -> Path:
    """The real_s2/eolearn folder (the `real_s2_dir` fixture: mandatory with $S2NAIP_REAL_S2)."""
    path = real_s2_dir / "eolearn" if (real_s2_dir / "eolearn").is_dir() else real_s2_dir
    if not (path / "REFERENCE_SCENES.npy").is_file() or not (path / "CLP.npy").is_file():
        raise FileNotFoundError(f"{path} holds no REFERENCE_SCENES.npy / CLP.npy")
    return path


def to_s2naip(reflectance: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """13-band L1C reflectance [T, H, W, 13] -> S2-NAIP's uint8 tci [T, H, W, 3] (255 ~ 0.3558) and
    single bands (clip(raw // 32, 0, 255), raw = reflectance * 1e4)."""
    order = ("b01", "b02", "b03", "b04", "b05", "b06", "b07", "b08", "b8a", "b09", "b10", "b11", "b12")
    tci = np.clip(np.rint(reflectance[..., [3, 2, 1]] * 255 / 0.3558), 0, 255).astype(np.uint8)
    bands = {b: np.clip(np.floor(reflectance[..., i] * 1e4 / 32), 0, 255).astype(np.uint8)
             for i, b in enumerate(order) if b in CP.CLOUD_BANDS}
    return tci, bands


def plain_raw(forest: CP.Forest, x: np.ndarray) -> np.ndarray:
    """The reference for `Forest.raw`: every (row, tree) pair follows its left / right child level by
    level in the model's own node arrays (the form `raw` had before session 8)."""
    x = np.asarray(x, dtype=np.float64)
    n_trees = len(forest.roots)
    p = x.shape[0]
    flat = x.ravel()
    node = np.tile(forest.roots, p)  # [P * trees], pixel-major
    base = np.repeat(np.arange(p) * x.shape[1], n_trees)  # row offset into flat
    at = np.arange(p * n_trees)
    leaf = np.empty(p * n_trees, dtype=np.intp)
    while at.size:
        go_left = flat[base + forest.feature[node]] <= forest.threshold[node]
        node = np.where(go_left, forest.left[node], forest.right[node])
        done = node < 0
        if done.any():
            leaf[at[done]] = ~node[done]
            keep = ~done
            node, base, at = node[keep], base[keep], at[keep]
    return forest.leaf_value[leaf].reshape(p, n_trees).sum(axis=1)


def test_the_numpy_forest_equals_lightgbm():
    lightgbm = pytest.importorskip("lightgbm")
    import importlib.metadata

    path = importlib.metadata.distribution("s2cloudless").locate_file(CP.MODEL_FILE)
    booster = lightgbm.Booster(model_file=str(path))
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(0, 0.9, (300, 10)), rng.uniform(0, 0.1, (100, 10))])
    np.testing.assert_allclose(CP.model().predict(x), booster.predict(x), atol=1e-12)
    assert len(CP.model().roots) == 170



def test_the_paired_descent_reaches_the_plain_descents_leaves():
    """`Forest.raw` (children side by side, leaves absorbing) against `plain_raw` (left / right
    child per level): the same leaves, so bit-equal sums, also for values exactly on a threshold,
    beyond every threshold, NaN (goes right in both) and +-inf."""
    forest = CP.model()
    rng = np.random.default_rng(1)
    on_threshold = rng.choice(forest.threshold, (200, 10))  # x == threshold: `<=` sends it left
    nudged = np.nextafter(on_threshold, np.inf)  # just above: right
    odd = rng.uniform(0, 0.5, (40, 10))
    odd[::4, 3] = np.nan
    odd[1::4] = np.inf
    odd[2::4, :5] = -np.inf
    for x in (rng.uniform(0, 0.9, (300, 10)), on_threshold, nudged, odd, np.zeros((1, 10)), np.ones((1, 10))):
        np.testing.assert_array_equal(forest.raw(x), plain_raw(forest, x))
    # extra columns are ignored; too few is an error rather than another row's values
    x = rng.uniform(0, 0.5, (5, 10))
    np.testing.assert_array_equal(forest.raw(np.concatenate([x, np.full((5, 2), 7.0)], axis=1)), plain_raw(forest, x))
    with pytest.raises(ValueError, match="features"):
        forest.raw(x[:, :9])


def test_the_paired_layout_keeps_every_node_and_puts_siblings_side_by_side():
    forest = CP.model()
    word, threshold, leaf_of, roots, bits = forest._paired
    n_inner, n_leaves = len(forest.feature), len(forest.leaf_value)
    assert len(word) == n_inner + n_leaves and sorted(leaf_of[leaf_of >= 0]) == list(range(n_leaves))
    first, feature = word >> bits, word & ((1 << int(bits)) - 1)
    leaves = leaf_of >= 0
    assert (first[leaves] == np.flatnonzero(leaves)).all() and (feature[leaves] == forest.n_features).all()
    assert np.isinf(threshold[leaves]).all()
    # each inner node's children are two distinct nodes further down (breadth first), left then right
    inner = np.flatnonzero(~leaves)
    assert (first[inner] > inner).all() and len(set(first[inner])) == len(inner)
    assert len(set(first[inner]) | set(first[inner] + 1) | set(roots)) == len(word)

def test_features_scale_tci_and_bands_to_reflectance_and_b08_stands_in_for_b8a():
    k, h = 2, 32
    frames = np.zeros((k, 3, h, h), np.uint8)
    frames[:, 0] = 255  # red
    frames[:, 2] = 51  # blue
    bands = {b: np.full((k, h, h), 10 * (i + 1), np.uint8) for i, b in enumerate(CP.CLOUD_BANDS)}
    x = CP.features(frames, bands, block=16)
    assert x.shape == (k, 2, 2, 10)
    f = dict(zip(CP.MODEL_BANDS, x[0, 0, 0]))
    assert f["b04"] == pytest.approx(0.3558) and f["b02"] == pytest.approx(51 * 0.3558 / 255)
    assert f["b01"] == pytest.approx(10.5 * 0.0032) and f["b12"] == pytest.approx(70.5 * 0.0032)  # mid-DN
    assert f["b8a"] == f["b08"] == pytest.approx(30.5 * 0.0032)
    nir = np.full((k, 1, h, h), 99, np.uint8)  # rgbn: b08 from the series when the band is absent
    without = {b: v for b, v in bands.items() if b != "b08"}
    assert CP.available(without, has_nir=True) and not CP.available(without)
    assert CP.features(np.concatenate([frames, nir], axis=1), without, 16)[0, 0, 0, 4] == pytest.approx(99.5 * 0.0032)
    with pytest.raises(ValueError, match="b08"):
        CP.features(frames, without, 16)


def test_cloud_probability_matches_the_providers_clp_on_real_scenes(eolearn):
    """The five real L1C scenes (two overcast), converted to S2-NAIP's 8-bit scaling and cut into
    nine 32x32 tiles, against the provider's s2cloudless CLP of the same dates."""
    scenes = np.load(eolearn / "REFERENCE_SCENES.npy")
    clp = np.load(eolearn / "CLP.npy")[list(SCENE_TO_CLP), ..., 0]
    tci, bands = to_s2naip(scenes)
    ours, theirs = [], []
    for y in range(0, 96, 32):
        for x in range(0, 96, 32):
            frames = np.moveaxis(tci[:, y:y + 32, x:x + 32], -1, 1)
            tile_bands = {b: v[:, y:y + 32, x:x + 32] for b, v in bands.items()}
            ours.append(CP.cloud_probability(frames, tile_bands, block=16))
            theirs.append(clp[:, y:y + 32, x:x + 32].mean(axis=(-2, -1)))
    ours, theirs = np.array(ours), np.array(theirs)  # [tiles, scenes]
    # measured: 0.969 0.742 0.025 0.016 0.007 against the provider's 0.971 0.742 0.032 0.024 0.009
    np.testing.assert_allclose(ours.mean(axis=0), theirs.mean(axis=0), atol=0.02)
    assert ((ours > 0.5) == (theirs > 0.5)).all()
    assert np.abs(ours - theirs).mean() < 0.05
    clear = theirs.mean(axis=0) < 0.05
    assert clear.sum() == 3 and ours[:, clear].max() < 0.2 and ours[:, ~clear].min() > 0.4


def _series_with_bands(seed: int = 3):
    """HR and a series [clear, the same under thick cloud, 3 other grounds], with every band
    s2cloudless needs (a vegetated surface; the cloud bright and flat in every band)."""
    rng = np.random.default_rng(seed)
    hr = scene(rng)
    base = area_down(hr.astype(np.float64))
    clear = np.clip(base * 0.9 + 5 + rng.normal(0, 1, base.shape), 1, 255).astype(np.uint8)
    others = [np.clip(area_down(scene(np.random.default_rng(300 + k)).astype(np.float64)), 1, 255).astype(np.uint8)
              for k in range(3)]
    cloudy = clear.copy()
    cloudy[..., :3] = np.clip(clear[..., :3] * 0.3 + 200, 0, 255).astype(np.uint8)
    series = np.stack([clear, cloudy, *others])
    t = len(series)
    tex = (series[..., :3].mean(axis=-1) - 80.0) / 2000.0  # reflectance texture, +-0.05
    # typical top-of-atmosphere reflectance of vegetated ground
    bands = {"b01": 0.13 + 0.2 * tex, "b05": 0.10 + tex, "b08": 0.30 + tex, "b09": 0.10 + 0.2 * tex,
             "b10": np.full(tex.shape, 0.002), "b11": 0.15 + tex, "b12": 0.07 + tex}
    bands["b01"][1], bands["b05"][1], bands["b08"][1] = 0.55, 0.6, 0.62
    bands["b09"][1], bands["b10"][1], bands["b11"][1], bands["b12"][1] = 0.2, 0.05, 0.45, 0.3
    extra = {b: np.clip(v * 1e4 // 32, 0, 255).astype(np.uint8) for b, v in bands.items()}
    assert all(v.shape == (t, 32, 32) for v in extra.values())
    return hr[..., :3], series[..., :3], extra


def test_robust_selection_measures_and_stores_cloud_probability():
    hr, series, extra = _series_with_bands()
    sel = S.select_pair(hr, series, S.SelectionConfig(mode="robust"), extra)
    ev = sel.evidence
    assert set(CP.CLOUD_BANDS) <= set(ev.bands)
    seen = np.isfinite(ev.cloud_prob)
    assert seen.sum() == min(S.ROBUST_WEIGHTS.cloud_prob_candidates, len(sel.candidate_indices))
    at = {int(i): p for i, p in zip(sel.candidate_indices, ev.cloud_prob)}
    assert sel.lr_index == 0 and at[0] < 0.2
    if np.isfinite(at.get(1, np.nan)):
        assert at[1] > 0.8
    record = records.pair_record(TileId(NAIP_ID, 35000, 55000), sel, n_timesteps=len(series), split="test",
                                 mode="robust", alpha=0.7)
    assert len(record["candidate_cloud_prob"]) == len(sel.candidate_indices)
    assert record["lr_cloud_prob"] == pytest.approx(at[0], abs=1e-6)
    stored = as_stored(record)
    decoded = example_proto.decode_example(example_proto.encode_example(record))
    assert decoded["lr_cloud_prob"] == stored["lr_cloud_prob"]
    np.testing.assert_array_equal(decoded["candidate_cloud_prob"], stored["candidate_cloud_prob"])  # NaN-aware


def test_cloud_probability_penalises_above_the_tiles_lowest():
    """Evaluated on every candidate: the cloudy timestep is near 1, the others low, and the penalty
    is the excess over the lowest evaluated probability beyond the tolerance; unevaluated (NaN)
    candidates get none."""
    hr, series, extra = _series_with_bands(5)
    hr_down = S.downsample(hr, 32, "bicubic_aa")
    w_all = S.RobustWeights(cloud_prob_candidates=len(series))
    w_off = S.RobustWeights(cloud_prob=0.0, cloud_prob_candidates=len(series))
    scores0, _ = S.robust_scores(S.to_uint8(hr_down), hr_down, series, 0.7, extra, w_off)
    scores1, ev = S.robust_scores(S.to_uint8(hr_down), hr_down, series, 0.7, extra, w_all)
    assert ev.cloud_prob[1] > 0.9 and np.delete(ev.cloud_prob, 1).max() < 0.2
    expected = np.maximum(ev.cloud_prob - ev.cloud_prob.min() - w_all.cloud_prob_tolerance, 0.0)
    np.testing.assert_allclose(scores1 - scores0, w_all.cloud_prob * expected, atol=1e-9)
    ev.cloud_prob[1] = np.nan
    np.testing.assert_allclose(S.robust_penalty(ev, w_all)[1], S.robust_penalty(ev, w_off)[1])


def test_missing_model_is_a_clear_error(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    CP.model.cache_clear()
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    try:
        with pytest.raises(CP.CloudModelUnavailable, match="pip install s2cloudless"):
            CP.model()
    finally:
        CP.model.cache_clear()


def test_robust_selection_on_real_scenes_measures_the_overcast_dates(eolearn):
    """Nine real 32x32 tiles: HR the clear 2015-09-09 date (4x upsampled), series the other four
    (two overcast); every candidate's s2cloudless probability is measured and the clear dates win."""
    scenes = np.load(eolearn / "REFERENCE_SCENES.npy")
    tci, bands = to_s2naip(scenes)
    series_idx = [0, 1, 3, 4]  # 0, 1 overcast
    cfg = S.SelectionConfig(mode="robust")
    for y in range(0, 96, 32):
        for x in range(0, 96, 32):
            hr = np.repeat(np.repeat(tci[2, y:y + 32, x:x + 32], 4, axis=0), 4, axis=1)
            series = tci[series_idx, y:y + 32, x:x + 32]
            extra = {b: v[series_idx, y:y + 32, x:x + 32] for b, v in bands.items()}
            sel = S.select_pair(hr, series, cfg, extra)
            assert sel.lr_index in (2, 3)
            prob = dict(zip(sel.candidate_indices.tolist(), sel.evidence.cloud_prob))
            assert prob[sel.lr_index] < 0.1
            assert all(p > 0.5 for i, p in prob.items() if i in (0, 1) and np.isfinite(p))
