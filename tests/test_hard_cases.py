"""The selection evaluation harness: twin-free hard tiles really hold no clean twin of a planted
timestep (transforms/devdata/hard_cases.py, on the real NAIP captures: skipped without them), and the
bench's scoring (pipelines/dev/bench_selection.py) counts what it says, per part."""
import json

import numpy as np
import pytest

from pipelines.dev import bench_selection as B
from transforms.devdata import hard_cases as H


def test_twin_free_slots_give_each_planted_kind_a_date_of_its_own():
    sources = [f"2019010{i}" for i in range(1, 10)]
    for seed in range(20):
        rng = np.random.default_rng(seed)
        slots, dates = H._twin_free_slots(H.HARD_PLANT, sources, 2, rng)
        planted = [(k, d) for k, d in zip(slots, dates) if k != H.BLACK_BORDER]
        assert len(planted) == len(sources) - 2  # two dates stay clean
        assert len({d for _, d in planted}) == len(planted)  # one planted frame per date
        assert all(k in H.HARD_KINDS for k, _ in planted)  # 8 hard slots fill the 7 places first
        assert slots.count(H.BLACK_BORDER) == H.HARD_PLANT[H.BLACK_BORDER]
        assert all(d is None for k, d in zip(slots, dates) if k == H.BLACK_BORDER)
    slots, dates = H._twin_free_slots(H.EASY_PLANT, sources[:3], 2, np.random.default_rng(0))
    assert [k for k in slots if k != H.BLACK_BORDER] == [H.CLOUDY] or [k for k in slots if k != H.BLACK_BORDER] == [H.DARK]


# --- the scoring, on tiles made here --------------------------------------------------------------


def _tile(tile_id, kinds, dates, hr_date="20200101"):
    t = len(kinds)
    rng = np.random.default_rng(abs(hash(tile_id)) % 2**32)
    return H.DevTile(tile_id=tile_id, hr_date=hr_date, hr=rng.integers(1, 255, (128, 128, 4), dtype=np.uint8),
                     series=rng.integers(1, 255, (t, 32, 32, 4), dtype=np.uint8),
                     extra={"b10": rng.integers(0, 255, (t, 32, 32), dtype=np.uint8),
                            "b05": rng.integers(0, 255, (t, 32, 32), dtype=np.uint8)},
                     kinds=tuple(kinds), capture_of_index=tuple(dates), shifts=np.zeros((t, 2)), hr_date_index=None)


def test_evaluate_counts_clean_same_date_and_bad_picks_per_part():
    tiles = [
        _tile("a", ["haze", "clean", "clean"], ["1", "20200101", "3"]),
        _tile("b", ["clean", "thin_cloud"], ["2", "4"]),
        _tile("c", ["cloud", "clean", "clean"], ["5", "6", "20200101"]),
        _tile("d", ["clean", "haze"], ["7", "8"]),
    ]
    s = B.EvalSet("x", "synthetic", tiles, frozenset({"c", "d"}), same_date=True)
    first = B.evaluate(s, lambda hr, series, extra: 0)
    assert first["lr_index"] == [0, 0, 0, 0]
    assert first["tune"] == {"tiles": 2, "clean": 0.5, "same_date": 0.0, "chosen": {"haze": 1}}
    assert first["held-out"] == {"tiles": 2, "clean": 0.5, "same_date": 0.0, "chosen": {"cloud": 1}}
    oracle = B.evaluate(s, lambda hr, series, extra: 1, choices=[1, 0, 2, 0])
    assert oracle["tune"]["clean"] == oracle["held-out"]["clean"] == 1.0
    assert oracle["tune"]["same_date"] == 0.5 and oracle["held-out"]["same_date"] == 0.5
    no_same = B.EvalSet("x", "real", tiles, frozenset(), same_date=False)
    assert B.evaluate(no_same, None, choices=[1, 0, 2, 0])["tune"]["same_date"] is None


def test_evaluate_rows_scores_a_selector_on_every_row_of_its_sets():
    tiles = [_tile("a", ["haze", "clean"], ["1", "2"]), _tile("b", ["clean", "haze"], ["1", "2"])]
    sets = [B.EvalSet("semi-real S2", "semi-real", tiles, frozenset({"b"}), same_date=False)]
    out = B.evaluate_rows(sets, lambda hr, series, extra: 1 if series.shape[-1] == 3 else 0)
    assert set(out) == {("semi-real S2", "rgb"), ("semi-real S2", "all")}
    assert out[("semi-real S2", "rgb")]["tune"]["clean"] == 1.0 and out[("semi-real S2", "rgb")]["held-out"]["clean"] == 0.0
    assert out[("semi-real S2", "all")]["tune"]["clean"] == 0.0 and out[("semi-real S2", "all")]["held-out"]["clean"] == 1.0


def test_bench_selection_refuses_sets_without_their_source(tmp_path, capsys):
    with pytest.raises(SystemExit):
        B.main(["--real-s2", str(tmp_path), "--sets", "twin-free hard", "--report", str(tmp_path / "r.json")])
    assert "need --real-data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        B.main(["--report", str(tmp_path / "r.json")])
    assert "give --real-data and/or --real-s2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no evaluation set to run"):
        B.bench(real_s2=str(tmp_path), sets=["twin-free hard"])


def test_views_give_each_row_its_bands():
    t = _tile("a", ["clean", "haze"], ["1", "2"])
    s = B.EvalSet("x", "real", [t], frozenset(), same_date=False)
    hr, series, extra = s.view(t, "rgb")
    assert hr.shape == (128, 128, 3) and series.shape == (2, 32, 32, 3) and extra is None
    hr, series, extra = s.view(t, "tci+b08")
    assert hr.shape[-1] == series.shape[-1] == 4 and extra is None
    _, _, extra = s.view(t, "all")
    assert set(extra) == {"b05", "b10"}  # only bands the selection accepts
    with pytest.raises(ValueError, match="bands must be one of"):
        s.view(t, "nir")


def test_run_row_reports_every_mode_per_part():
    tiles = [_tile(str(i), ["clean", "haze", "clean"], ["1", "2", "3"]) for i in range(4)]
    s = B.EvalSet("x", "synthetic", tiles, frozenset({"0"}), same_date=False)
    out = B.run_row(s, "rgb", ["paper", "robust"])
    for mode in ("paper", "robust"):
        assert out[mode]["tune"]["tiles"] == 3 and out[mode]["held-out"]["tiles"] == 1
        assert 0.0 <= out[mode]["tune"]["clean"] <= 1.0 and out[mode]["ms_per_tile"] > 0
        assert out[mode]["lr_index"] == [B.mode_selector(mode)(*s.view(t, "rgb")) for t in tiles]


# --- twin-free tiles on the real NAIP captures ----------------------------------------------------


def _detail(frames):
    """High-passed luminance per frame, normalised: its dot product is a structural correlation."""
    from scipy import ndimage

    lum = frames[..., :3].astype(np.float64).mean(-1)
    hp = lum - ndimage.uniform_filter(lum, size=(1, 7, 7), mode="nearest")
    hp = hp - hp.mean(axis=(1, 2), keepdims=True)
    return hp / (np.linalg.norm(hp, axis=(1, 2), keepdims=True) + 1e-9)


def _twins_of_planted(m, tile, seed):
    """(planted index, other index, correlation) of frames that structurally match the clean,
    unshifted frame of a planted timestep's date (a clean twin)."""
    out = []
    x, y = (int(v) for v in tile.tile_id.rsplit("/", 1)[1].split("_"))
    for i, kind in enumerate(tile.kinds):
        if kind in (H.CLEAN, H.BLACK_BORDER):
            continue
        d = tile.capture_of_index[i]
        gap = H._gap(np.random.default_rng([seed, int(d)]))
        clean, _ = H.to_bands(H.surface_stack(m.lr(d, x, y), gap, np.random.default_rng(0)), np.random.default_rng(0))
        ref = _detail(clean[None])[0]
        corr = (_detail(tile.series) * ref).sum(axis=(1, 2))
        out += [(i, j, float(c)) for j, c in enumerate(corr) if j != i and c > 0.9]
    return out


@pytest.fixture(scope="module")
def mosaic(real_naip_dir):
    m = H.CaptureMosaic(real_naip_dir)
    tune, held = H.split_tiles(m.usable_tiles())
    return m, tune


def test_twin_free_tiles_hold_no_frame_of_a_perturbed_date(mosaic):
    m, tune = mosaic
    xys = tune[:12]
    tiles = H.build_dev_tiles(m, xys, seed=7, twin_free=True)
    twins = H.build_dev_tiles(m, xys, seed=7)
    found_in_twin_variant = 0
    for t, tw in zip(tiles, twins):
        assert t.hr_date not in t.capture_of_index and t.hr_date_index is None
        planted = [i for i, k in enumerate(t.kinds) if k not in (H.CLEAN, H.BLACK_BORDER)]
        assert len(planted) == len(m.dates) - 1 - H.MIN_CLEAN_DATES
        dates = [t.capture_of_index[i] for i in planted]
        assert len(set(dates)) == len(dates)
        for i in planted:  # no other frame, clean, revisit or planted, shows a perturbed date
            assert [j for j, d in enumerate(t.capture_of_index) if d == t.capture_of_index[i]] == [i]
        clean_dates = {t.capture_of_index[i] for i in t.clean_indices}
        assert len(clean_dates) == H.MIN_CLEAN_DATES
        # pixels: no frame structurally matches the clean frame of a planted timestep's date
        assert _twins_of_planted(m, t, 7) == [], t.tile_id
        found_in_twin_variant += len(_twins_of_planted(m, tw, 7)) > 0
    assert found_in_twin_variant == len(twins)  # the detector does find the twins where they are


def test_twin_variant_draws_exactly_as_before_the_twin_free_option(mosaic):
    """The default (twin) tiles are drawn as before `twin_free` existed (commit e4f3a74), so the
    README's figures stay reproducible: a fingerprint of what was planted where, seed 100."""
    import hashlib

    m, tune = mosaic
    tiles = H.build_dev_tiles(m, tune[:4], seed=100)
    key = repr([(t.hr_date, t.kinds, t.capture_of_index) for t in tiles]).encode()
    assert hashlib.sha256(key).hexdigest()[:16] == "3a37888ab6bce02c"
    assert tiles[0].hr_date == "20150926" and tiles[0].kinds[:4] == ("cloudy", "dark", "snow", "misregistered")


def test_bench_selection_command_prints_tune_and_held_out_rows(real_naip_dir, tmp_path, capsys):
    report = tmp_path / "sel.json"
    assert B.main(["--real-data", str(real_naip_dir), "--sets", "twin-free hard,easy+hr", "--max-tiles", "6",
                   "--modes", "paper,robust", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "tune | held-out" in out and "twin-free hard  tci+b08" in out and "easy+hr" in out
    r = json.loads(report.read_text())
    rows = {(x["set"], x["bands"]) for x in r["rows"]}
    assert rows == {("twin-free hard", "tci+b08"), ("twin-free hard", "rgb"), ("twin-free hard", "all"),
                    ("easy+hr", "tci+b08"), ("easy+hr", "rgb")}
    for row in r["rows"]:
        for mode in ("paper", "robust"):
            x = row["modes"][mode]
            assert x["tune"]["tiles"] + x["held-out"]["tiles"] == 6 and x["held-out"]["tiles"] >= 1
            assert (x["held-out"]["same_date"] is None) == (row["set"] != "easy+hr")
