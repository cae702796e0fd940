"""Real Sentinel-2 evaluation data (transforms/devdata/real_s2.py): S2-NAIP scaling, the veils' physics, the
held-out split, the labels file, and on the real eo-learn scenes (skipped without them unless
S2NAIP_REAL_S2 is set) the loader's shapes and scaling and the semi-real set's twin-freeness."""
import collections
import json

import numpy as np
import pytest

from transforms.devdata import real_s2 as R


def test_s2naip_scaling_of_tci_and_single_bands():
    refl = np.zeros((2, 13))
    refl[0, [3, 2, 1]] = [0.3558, 0.3558 / 2, 0.5]  # R saturates at 255, G half, B clipped
    refl[1, [3, 2, 1]] = 0.0  # TCI keeps 0 for nodata: reflectance 0 is DN 1
    refl[0, R.BANDS_13.index("b08")] = 0.8160  # 16-bit 8160 -> 255
    refl[0, R.BANDS_13.index("b11")] = 0.0033  # 33 / 8160 * 255 = 1.03 -> 1
    refl[0, R.BANDS_13.index("b12")] = 0.9  # clipped to 255
    refl[0, R.BANDS_13.index("b10")] = 0.0031  # 0.97 -> 0
    out = R.to_s2naip(refl)
    assert set(out) == set(R.S2NAIP_BANDS)
    assert out["tci"].dtype == np.uint8 and out["tci"].shape == (2, 3)
    assert out["tci"][0].tolist() == [255, 128, 255] and out["tci"][1].tolist() == [1, 1, 1]
    assert out["b08"][0] == 255 and out["b11"][0] == 1 and out["b12"][0] == 255 and out["b10"][0] == 0
    # the single-band scaling is the hard cases' (and the robust evidence's) raw // 32
    v = np.linspace(0.0, 0.9, 500)
    x = np.zeros((500, 13))
    x[:, 7] = v
    np.testing.assert_array_equal(R.to_s2naip(x)["b08"], np.clip(np.rint(v * 1e4) // 32, 0, 255))


def _ground(rng):
    g = np.empty((32, 32, 13))
    g[:] = np.array([0.10, 0.08, 0.07, 0.04, 0.08, 0.22, 0.28, 0.27, 0.31, 0.09, 0.001, 0.14, 0.06])
    return g * rng.uniform(0.8, 1.2, (32, 32, 1))


def test_veils_have_their_physical_signatures():
    rng = np.random.default_rng(0)
    ground = _ground(rng)
    body = np.full((32, 32, 13), 0.3)
    body[..., 10] = 0.05
    clp = np.zeros((32, 32))
    clp[8:24, 8:24] = 0.8
    clm = (clp > 0.5).astype(np.uint8)
    b, r, nir, b10 = 1, 3, 7, 10
    haze = R.veil(ground, body, clp, clm, R.HAZE, np.random.default_rng(1))
    assert (haze[..., b] - ground[..., b]).mean() > (haze[..., r] - ground[..., r]).mean() > 0  # bluer
    assert np.allclose(haze[..., b10], ground[..., b10])  # B10 sees no aerosol
    assert haze[..., nir].mean() < ground[..., nir].mean()  # NIR: extinction beats path
    thin = R.veil(ground, body, clp, clm, R.THIN_CLOUD, np.random.default_rng(1))
    inside, outside = clp > 0.5, clp == 0
    assert np.allclose(thin[outside], ground[outside])
    assert (np.abs(thin[inside] - body[inside]) < np.abs(ground[inside] - body[inside])).all()
    cloud = R.veil(ground, body, clp, clm, R.CLOUD, np.random.default_rng(1))
    assert np.abs(cloud[12:20, 12:20] - body[12:20, 12:20]).max() < 0.05  # opaque inside the mask
    shadow = R.veil(ground, body, clp, clm, R.SHADOW, np.random.default_rng(1))
    dark = shadow[..., r] < 0.9 * ground[..., r]
    assert 0.1 < dark.mean() < 0.4  # the mask's area, moved
    assert np.allclose(shadow[..., b10], ground[..., b10]) and (shadow <= ground + 1e-12).all()
    with pytest.raises(ValueError, match="unknown veil"):
        R.veil(ground, body, clp, clm, "smoke", rng)


def test_held_out_part_is_fixed_per_chip():
    held = [c for c in R.CHIPS if R.is_held_out(f"eolearn/{c}")]
    assert held == ["r0c1", "r1c0", "r2c0"]  # fixed: the method must never be tuned on these
    for c in R.CHIPS:  # every tile of a chip is on the chip's side
        assert R.is_held_out(f"eolearn/{c}/20150711") == R.is_held_out(f"eolearn/{c}/20150909/x-haze-y-r0c0")


def test_labels_file_covers_every_chip_and_date_with_provenance():
    doc = json.loads(R.DEFAULT_LABELS.read_text())
    assert doc["source"]["repository"] == "sentinel-hub/eo-learn" and len(doc["source"]["commit"]) == 40
    labels = R.load_labels()
    assert set(labels) == set(R.CHIPS)
    for chip_labels in labels.values():
        assert set(chip_labels) == set(R.SCENE_DATES)
        assert set(chip_labels.values()) <= set(doc["vocabulary"])
        assert sum(v == R.CLEAN for v in chip_labels.values()) >= 2  # an HR date and a right answer


def test_hr_is_four_bands_at_4x_and_naip_like():
    rng = np.random.default_rng(2)
    hr = R.hr_from(_ground(rng)[..., :].astype(np.float32))
    assert hr.dtype == np.uint8 and hr.shape == (128, 128, 4)
    r, g, b, n = hr.reshape(-1, 4).mean(0)
    assert n > g > b and hr.min() >= 1  # vegetation: NIR bright, blue darkest after path removal


# --- on the real scenes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patch(real_s2_dir):
    return R.load_eolearn(real_s2_dir / "eolearn")


def test_loader_shapes_dates_and_masks(patch):
    assert patch.scenes.shape == (5, 101, 100, 13) and patch.scenes.dtype == np.float32
    assert patch.clp.shape == patch.clm.shape == (68, 101, 100)
    assert len(patch.mask_dates) == 68 and patch.mask_dates[0] == "20150711"
    # the README's matching of scenes to dates: the overcast scenes are the dates with CLP ~0.7-1
    for i, d in enumerate(patch.dates):
        clp = patch.clp[patch.mask_dates.index(d)].mean()
        assert (clp > 0.5) == (patch.labels["r1c1"][d] == "overcast"), (d, clp)
        assert (patch.scenes[i, ..., 1].mean() > 0.12) == (clp > 0.5)  # cloud is bright in blue


def test_real_tiles_leave_the_hr_date_out_and_scale_like_s2naip(patch):
    tiles = R.real_tiles(patch)
    assert len(tiles) == 9 * 3  # 9 chips x 3 clear HR dates
    assert len({t.tile_id for t in tiles}) == len(tiles)
    for t in tiles:
        assert t.hr.shape == (128, 128, 4) and t.hr.dtype == np.uint8
        assert t.series.shape == (4, 32, 32, 4) and t.series.dtype == np.uint8
        assert set(t.extra) == set(R.EXTRA_BANDS) and all(v.shape == (4, 32, 32) for v in t.extra.values())
        assert t.hr_date not in t.capture_of_index and len(set(t.capture_of_index)) == 4
        assert collections.Counter(t.kinds) == {"clean": 2, "overcast": 2}
        chip_id = t.tile_id.split("/")[1]
        r, c = R.CHIPS[chip_id]
        for i, d in enumerate(t.capture_of_index):
            refl = patch.scenes[patch.dates.index(d), r:r + 32, c:c + 32]
            tci = np.clip(np.rint(np.rint(refl[..., [3, 2, 1]] * 1e4) * 255 / 3558), 1, 255)
            np.testing.assert_array_equal(t.series[i, ..., :3], tci)
            np.testing.assert_array_equal(t.extra["b11"][i], np.clip(np.rint(refl[..., 11] * 1e4) // 32, 0, 255))


def test_semi_real_tiles_are_twin_free(patch):
    tiles = R.semi_real_tiles(patch, draws=1)
    assert len(tiles) == 9 * 3 * 2 * len(R.VEILS)
    kinds = collections.Counter(k for t in tiles for k in t.kinds)
    assert all(kinds[v] == 9 * 3 * 2 for v in R.VEILS)
    for t in tiles:
        assert len(set(t.capture_of_index)) == t.n_timesteps == 4  # one frame per date
        assert t.hr_date not in t.capture_of_index
        (vi,) = [i for i, k in enumerate(t.kinds) if k in R.VEILS]
        chip_id = t.tile_id.split("/")[1]
        r, c = R.CHIPS[chip_id]
        clean = R.to_s2naip(patch.scenes[patch.dates.index(t.capture_of_index[vi]), r:r + 32, c:c + 32])["tci"]
        diff = np.abs(t.series[..., :3].astype(int) - clean.astype(int)).mean(axis=(1, 2, 3))
        assert (diff > 1.0).all(), (t.tile_id, diff)  # no frame is the clean frame of the veiled date
        assert diff[vi] >= R.MIN_VEIL_DN  # and the veil shows
        assert t.kinds.count(R.CLEAN) == 1


def test_real_tiles_with_the_hr_date_know_the_same_date_answer(patch):
    tiles = R.real_tiles(patch, include_hr_date=True)
    assert len(tiles) == 27
    for t in tiles:
        assert t.n_timesteps == 5 and t.capture_of_index[t.hr_date_index] == t.hr_date
        assert t.kinds[t.hr_date_index] == R.CLEAN
        # the HR is its own date's chip, upsampled: downsampled again, it matches that date best
        down = t.hr.astype(float).reshape(32, 4, 32, 4, 4).mean(axis=(1, 3))
        corr = [np.corrcoef(down[..., 1].ravel(), t.series[i, ..., 1].astype(float).ravel())[0, 1]
                for i in range(t.n_timesteps)]
        assert int(np.argmax(corr)) == t.hr_date_index


def test_bench_selection_on_the_real_sets_prints_both_parts(real_s2_dir, tmp_path, capsys):
    from pipelines.dev import bench_selection as B

    report = tmp_path / "sel.json"
    assert B.main(["--real-s2", str(real_s2_dir), "--sets", "real S2,real S2+hr", "--modes", "paper,robust",
                   "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "real S2         rgb" in out and "real S2+hr" in out and "real S2 rgb:" in out
    r = json.loads(report.read_text())
    assert [(x["set"], x["bands"]) for x in r["rows"]] == [("real S2", "rgb"), ("real S2", "all"), ("real S2+hr", "rgb")]
    for row in r["rows"]:
        for mode in ("paper", "robust"):
            x = row["modes"][mode]
            assert (x["tune"]["tiles"], x["held-out"]["tiles"]) == (18, 9)  # 3 held-out chips x 3 HR dates
            assert (x["held-out"]["same_date"] is None) == (row["set"] == "real S2")
            assert len(x["lr_index"]) == 27
