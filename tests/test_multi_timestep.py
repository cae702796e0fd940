"""--lr-timesteps N: the N best timesteps per pair, in every sink, readable by the training code."""
import dataclasses
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import build_pairs
from pipelines.options import BuildOptions, pair_config, parse_build_options
from tests.tile_factory import NAIP_ID, cloud, good_tile, scene, series_from, write_tile
from transforms import corrections, records
from transforms.build import dataset_manifest
from transforms.pairs import PairConfig, build_tile
from transforms.io.readers import read_parquet_pairs, read_tfrecord_pairs
from transforms.selection import (SelectionConfig, acceptable, TooFewTimesteps, multi_timesteps,
                                  select_pair, with_timesteps)

RUNNER = "FnApiRunner"


def tid(i):
    return f"{NAIP_ID}/{35000 + i}_55000"


def planted_series(seed, clean=10, clouded=(2, 5, 9, 12)):
    """An HR and a series of clean views with cloud planted on the timesteps `clouded`."""
    rng = np.random.default_rng(seed)
    hr = scene(rng)
    series = series_from(hr, rng, clean + len(clouded))
    for t in clouded:
        series[t] = cloud(series[t])
    return hr, series


# ---------------------------------------------------------------------------------------------
# The choice


@pytest.mark.parametrize("mode", ["paper", "companion", "robust"])
def test_the_mode_ranking_best_first_and_the_first_is_the_single_choice(mode):
    hr, series = planted_series(1)
    single = select_pair(hr, series, SelectionConfig(mode=mode))
    config = SelectionConfig(mode=mode, lr_timesteps=6)
    multi = with_timesteps(select_pair(hr, series, config), series, config)
    assert multi.lr_indices[0] == single.lr_index == multi.lr_index
    assert multi.lr.shape == (6, 32, 32, 4)
    np.testing.assert_array_equal(multi.lr, series[multi.lr_indices])
    np.testing.assert_array_equal(multi.hr_matched, single.hr_matched)  # matched to the first, as today
    # the others follow the mode's score, lower first
    position = {int(t): i for i, t in enumerate(multi.candidate_indices)}
    scores = [multi.candidate_scores[position[int(t)]] for t in multi.lr_indices]
    assert scores[1:] == sorted(scores[1:]) and min(scores) == scores[0]
    assert len(set(multi.lr_indices.tolist())) == 6


def test_n_1_leaves_the_selection_as_it_is():
    hr, series = planted_series(2)
    selection = select_pair(hr, series, SelectionConfig())
    assert with_timesteps(selection, series, SelectionConfig()) is selection
    assert selection.lr.shape == (32, 32, 4) and selection.lr_indices is None


@pytest.mark.parametrize("mode", ["paper", "robust"])
def test_planted_cloudy_timesteps_are_not_written_where_enough_clean_ones_exist(mode):
    clouded = (2, 5, 9, 12)
    for seed in range(3):
        hr, series = planted_series(seed, clean=10, clouded=clouded)
        config = SelectionConfig(mode=mode, lr_timesteps=8)
        indices = multi_timesteps(select_pair(hr, series, config), config)
        assert len(indices) == 8 and not set(indices.tolist()) & set(clouded), (seed, indices)


def test_robust_acceptable_means_evidence_passes_so_too_few_clean_is_a_reject():
    clouded = (2, 5, 9, 12)
    hr, series = planted_series(3, clean=10, clouded=clouded)
    config = SelectionConfig(mode="robust", lr_timesteps=12)
    selection = select_pair(hr, series, config)
    passes = dict(zip(selection.candidate_indices.tolist(), acceptable(selection.evidence)))
    assert not any(passes[t] for t in clouded) and sum(passes.values()) == 10
    with pytest.raises(TooFewTimesteps, match="10 acceptable timesteps .robust ranking., 12 requested"):
        multi_timesteps(selection, config)
    fewer = multi_timesteps(selection, dataclasses.replace(config, allow_fewer=True))
    assert len(fewer) == 10 and not set(fewer.tolist()) & set(clouded)
    # paper accepts every top-k candidate: 12 of 14 can be written
    paper = SelectionConfig(mode="paper", lr_timesteps=12)
    assert len(multi_timesteps(select_pair(hr, series, paper), paper)) == 12


def test_lr_timesteps_is_validated():
    with pytest.raises(ValueError, match="lr_timesteps must be within"):
        SelectionConfig(lr_timesteps=0)
    with pytest.raises(ValueError, match="lr_timesteps must be within"):
        SelectionConfig(top_k=4, lr_timesteps=5)
    for bad in ("0", "17"):
        opts = parse_build_options(["--input", "/x", "--output", "/y", "--lr-timesteps", bad]).view_as(BuildOptions)
        with pytest.raises(ValueError, match="--lr-timesteps must be within \\[1, --top-k = 16\\]"):
            pair_config(opts)


# ---------------------------------------------------------------------------------------------
# One tile: rejects, fewer, corrections


def test_build_tile_rejects_too_few_or_writes_fewer(tmp_path):
    root = str(tmp_path)
    good_tile(root, tid(0), seed=0, t=5)
    config = PairConfig(root, selection=SelectionConfig(lr_timesteps=8))
    outcome = build_tile(tid(0), config)
    assert outcome.kind == "reject"
    assert (outcome.record["stage"], outcome.record["reason"]) == ("select", "too_few_timesteps")
    assert "5 acceptable timesteps (paper ranking), 8 requested" in outcome.record["detail"]
    fewer = build_tile(tid(0), dataclasses.replace(config, selection=SelectionConfig(lr_timesteps=8, allow_fewer=True)))
    assert fewer.kind == "pair"
    assert fewer.record["lr_shape"] == [5, 32, 32, 4] and len(fewer.record["lr_indices"]) == 5
    assert fewer.record["lr_indices"][0] == fewer.record["lr_index"]


def test_a_correction_is_the_first_timestep_and_the_others_follow(tmp_path):
    root = str(tmp_path)
    good_tile(root, tid(0), seed=4, t=10)
    config = PairConfig(root, selection=SelectionConfig(lr_timesteps=4))
    auto = build_tile(tid(0), config).record
    pick = next(t for t in auto["candidate_indices"] if t not in auto["lr_indices"])
    manual = build_tile(tid(0), config, corrections.Correction(pick, "c.json")).record
    assert manual["selection"] == "manual" and manual["lr_index"] == pick
    assert manual["lr_indices"][0] == pick and len(set(manual["lr_indices"])) == 4
    assert manual["lr_indices"][1:] == [t for t in auto["lr_indices"] if t != pick][:3]


# ---------------------------------------------------------------------------------------------
# Every sink, the readers and the training code's dataset class


def satlas_items(png_root, n_s2_images, s2_bands=("tci", "b08")):
    """The satlas-super-resolution S2NAIPDataset's reading of a PNG layout (ssr/data/s2-naip_dataset.py,
    restated in numpy): every PNG under naip/ is a sample; each band PNG [T*32, 32, C] becomes
    [T, C, 32, 32] and the bands are concatenated on C; a tile with fewer than n_s2_images timesteps
    or a black-pixel NAIP is skipped; the images used are n_s2_images among the timesteps without a
    black pixel. Returns {chip: (hr [C, 128, 128], the sample's timesteps [T, C, 32, 32], goods)}."""
    items = {}
    for dirpath, _, names in os.walk(os.path.join(png_root, "naip")):
        for name in names:
            if not name.endswith(".png"):
                continue
            chip = os.path.basename(dirpath)
            hr = np.moveaxis(np.asarray(Image.open(os.path.join(dirpath, name))), -1, 0)
            if (hr == 0).all(axis=0).any():  # has_black_pixels
                continue
            stack = []
            for band in s2_bands:
                image = np.asarray(Image.open(os.path.join(png_root, "sentinel2", chip, f"{band}.png")))
                chw = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)  # read_image: [C, H, W]
                stack.append(chw.reshape(chw.shape[0], -1, 32, 32).transpose(1, 0, 2, 3))
            s2 = np.concatenate(stack, axis=1)
            if s2.shape[0] < n_s2_images:
                continue
            goods = [i for i, ts in enumerate(s2[:, :3]) if not (ts == 0).all(axis=0).any()]
            if len(goods) < n_s2_images:
                continue
            items[chip] = (hr, s2, goods)
    return items


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi")
    root, out = str(tmp / "in"), str(tmp / "out")
    for i in range(4):
        good_tile(root, tid(i), seed=10 + i, t=12)
    good_tile(root, tid(4), seed=20, t=5)  # too few timesteps for 8
    summary = build_pairs.run(["--input", root, "--output", out, "--runner", RUNNER, "--lr-timesteps", "8",
                               "--format", "parquet,tfrecord,png"])
    return out, summary


def test_a_build_with_8_timesteps_in_every_sink(multi_run):
    out, summary = multi_run
    assert summary["counts"]["pairs"] == 4
    rejects = [r for r in pq.read_table(os.path.join(out, "rejects")).to_pylist()]
    assert [(r["tile_id"], r["reason"]) for r in rejects] == [(tid(4), "too_few_timesteps")]
    assert summary["options"]["lr_timesteps"] == 8 and summary["options"]["allow_fewer"] is False
    assert summary["counts"]["lr_timesteps"] == {"requested": 8, "pairs_with_all": 4, "pairs_by_count": {"8": 4},
                                                 "rejected_too_few": 1}
    assert "lr timesteps: 4 pairs with 8, 0 with fewer (--allow-fewer), 1 tiles rejected" in build_pairs.summary_text(summary)
    parquet = {r["tile_id"]: r for r in read_parquet_pairs(os.path.join(out, "pairs"))}
    tfrecord = {r["tile_id"]: r for r in read_tfrecord_pairs(os.path.join(out, "tfrecord"))}
    assert parquet == tfrecord and len(parquet) == 4
    for row in parquet.values():
        assert row["lr_shape"] == [8, 32, 32, 4] and len(row["lr_indices"]) == 8
        assert row["lr_indices"][0] == row["lr_index"] and set(row["lr_indices"]) <= set(row["candidate_indices"])
        assert records.lr_timesteps(row).shape == (8, 32, 32, 4)

    png = os.path.join(out, "png")
    tracker = json.load(open(os.path.join(png, "tracker.json")))
    assert tracker == {t: r["lr_indices"] for t, r in parquet.items()}
    items = satlas_items(png, n_s2_images=8)
    assert len(items) == 4  # every pair is a sample with 8 images
    for row in parquet.values():
        hr, s2, goods = items[f"{row['tile_x']}_{row['tile_y']}"]
        lr = records.lr_timesteps(row)  # [8, 32, 32, 4], best first
        np.testing.assert_array_equal(s2, lr.transpose(0, 3, 1, 2))
        assert goods == list(range(8))


def test_the_single_timestep_layout_reads_with_one_image(tmp_path):
    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    for i in range(2):
        good_tile(root, tid(i), seed=i, t=6)
    summary = build_pairs.run(["--input", root, "--output", out, "--runner", RUNNER, "--format", "parquet,png"])
    assert "lr_timesteps" not in summary["counts"]
    rows = {r["tile_id"]: r for r in read_parquet_pairs(os.path.join(out, "pairs"))}
    items = satlas_items(os.path.join(out, "png"), n_s2_images=1)
    assert len(items) == 2 and not satlas_items(os.path.join(out, "png"), n_s2_images=2)
    for row in rows.values():
        assert row["lr_shape"] == [32, 32, 4] and row["lr_indices"] == [row["lr_index"]]
        _, s2, _ = items[f"{row['tile_x']}_{row['tile_y']}"]
        np.testing.assert_array_equal(s2[0], records.decode_pair_arrays(row)[1].transpose(2, 0, 1))
    assert json.load(open(os.path.join(out, "png", "tracker.json"))) == {t: r["lr_index"] for t, r in rows.items()}


def test_files_older_than_lr_indices_read_as_one_timestep(tmp_path, multi_run):
    out, _ = multi_run
    table = pq.read_table(os.path.join(out, "pairs")).drop_columns(["lr_indices"])
    pq.write_table(table, str(tmp_path / "old.parquet"))
    rows = list(read_parquet_pairs(str(tmp_path / "old.parquet")))
    assert rows and all(r["lr_indices"] == [r["lr_index"]] for r in rows)


def test_the_options_hash_includes_lr_timesteps_and_allow_fewer():
    base = PairConfig("/in")
    hashes = {
        dataset_manifest.config_options_hash(dataclasses.replace(base, selection=s))
        for s in (SelectionConfig(), SelectionConfig(lr_timesteps=8), SelectionConfig(lr_timesteps=4),
                  SelectionConfig(lr_timesteps=8, allow_fewer=True))
    }
    assert len(hashes) == 4
    options = dataset_manifest.output_options(dataclasses.replace(base, selection=SelectionConfig(lr_timesteps=8)))
    assert options["lr_timesteps"] == 8 and options["allow_fewer"] is False


def test_acceptable_checks_each_evidence_term():
    hr, series = planted_series(5, clean=6, clouded=())
    evidence = select_pair(hr, series, SelectionConfig(mode="robust")).evidence
    evidence.cloud, evidence.shadow = np.zeros(6), np.zeros(6)
    evidence.veil, evidence.snow = np.zeros(6), np.zeros(6)
    evidence.cirrus = np.array([0.3, 0.1, 0.35, 0.1, 0.1, 0.1])  # relative to the lowest
    evidence.cloud_prob = np.array([np.nan, 0.0, np.nan, 0.5, np.nan, 0.05])  # NaN: not evaluated
    evidence.shadow[4] = 0.11
    assert acceptable(evidence).tolist() == [True, True, False, False, False, True]
    evidence.veil[0] = 0.36
    assert not acceptable(evidence)[0]


def test_allow_fewer_counts_pairs_by_timesteps(tmp_path):
    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    good_tile(root, tid(0), seed=0, t=12)
    good_tile(root, tid(1), seed=1, t=5)
    summary = build_pairs.run(["--input", root, "--output", out, "--runner", RUNNER, "--lr-timesteps", "8",
                               "--allow-fewer"])
    assert summary["counts"]["pairs"] == 2 and summary["options"]["allow_fewer"] is True
    assert summary["counts"]["lr_timesteps"] == {"requested": 8, "pairs_with_all": 1,
                                                 "pairs_by_count": {"5": 1, "8": 1}, "rejected_too_few": 0}
    shapes = {r["tile_id"]: r["lr_shape"] for r in read_parquet_pairs(os.path.join(out, "pairs"))}
    assert shapes == {tid(0): [8, 32, 32, 4], tid(1): [5, 32, 32, 4]}


def test_a_reviewer_drops_timesteps_and_the_next_acceptable_take_their_places(tmp_path):
    root = str(tmp_path)
    good_tile(root, tid(0), seed=6, t=10)
    config = PairConfig(root, selection=SelectionConfig(lr_timesteps=4))
    auto = build_tile(tid(0), config).record
    ranked = [auto["candidate_indices"][i] for i in np.argsort(auto["candidate_scores"], kind="stable")]
    assert auto["lr_indices"] == ranked[:4]
    # dropping a later one: the choice stays automatic, the fifth moves up
    later = build_tile(tid(0), config, corrections.Correction({"drop": [ranked[2]]}, "c.json")).record
    assert later["selection"] == "paper" and later["lr_index"] == auto["lr_index"]
    assert later["lr_indices"] == [ranked[0], ranked[1], ranked[3], ranked[4]]
    assert later["hr"] == auto["hr"]
    # dropping the first: the next one is the (manual) choice, the HR matched to it
    first = build_tile(tid(0), config, corrections.Correction({"drop": [ranked[0]]}, "c.json")).record
    assert first["selection"] == "manual" and first["lr_indices"] == ranked[1:5] and first["lr_index"] == ranked[1]
    assert first["hr"] != auto["hr"]
    # too many dropped: too few left
    many = build_tile(tid(0), config, corrections.Correction({"drop": ranked[:7]}, "c.json")).record
    assert many["reason"] == "too_few_timesteps"
    for bad in ({"drop": []}, {"drop": [99]}, {"drop": ["1"]}, {"keep": [1]}, {"drop": [True]}):
        rejected = build_tile(tid(0), config, corrections.Correction(bad, "c.json")).record
        assert rejected["reason"] == "bad_correction", bad
        assert "c.json" in rejected["detail"]


def test_the_review_page_of_a_multi_timestep_build(tmp_path):
    from pipelines import review
    from transforms.quality import review_page

    root, out, page = str(tmp_path / "in"), str(tmp_path / "out"), tmp_path / "page"
    good_tile(root, tid(0), seed=0, t=10)
    good_tile(root, tid(1), seed=1, t=3)
    build_pairs.run(["--input", root, "--output", out, "--runner", RUNNER, "--lr-timesteps", "4", "--allow-fewer"])
    summary = review.run(["--run", out, "--output", str(page), "--worst", "2"])
    assert summary["on_page"] == 2
    text = (page / "data.js").read_text()
    data = json.loads(text[len("window.S2NAIP_REVIEW = "):].rstrip().rstrip(";"))
    rows = {r["tile_id"]: r for r in read_parquet_pairs(os.path.join(out, "pairs"))}
    for tile in data["tiles"]:
        row = rows[tile["tile_id"]]
        assert tile["lr_indices"] == row["lr_indices"] and len(row["lr_indices"]) == (4 if tile["tile_id"] == tid(0) else 3)
        written = {s["t"]: s["written"] for s in tile["steps"] if "written" in s}
        assert written == {t: k for k, t in enumerate(row["lr_indices"])}
        hr, lr = records.decode_pair_arrays(row)
        value = review_page.pair_metrics(hr[None], lr[:1], "psnr_rgb")[0]  # the first timestep's
        assert tile["value"] == pytest.approx(value, abs=1e-3)


def test_real_naip_tiles_8_written_timesteps_hold_no_planted_bad_one(real_tile_set, tmp_path):
    """Real NAIP-derived tiles (transforms/devdata/real_tiles.py: 10 clean timesteps, a planted black-border, cloudy
    and dark one each), robust: none of the 8 written is a planted one; a tile whose clean timesteps
    do not all pass the evidence is a too_few_timesteps reject (1 of 20, measured)."""
    root, real = real_tile_set
    out = str(tmp_path / "out")
    summary = build_pairs.run(["--input", str(root), "--output", out, "--runner", RUNNER, "--selection", "robust",
                               "--lr-timesteps", "8", "--format", "parquet,png"])
    truth = {t.tile_id: t for t in real}
    rows = list(read_parquet_pairs(os.path.join(out, "pairs")))
    assert all(len(t.clean_indices) >= 8 for t in real)
    assert summary["counts"]["pairs"] == len(rows) >= len(real) - 2
    assert summary["counts"]["rejects_by_reason"] == ({"too_few_timesteps": len(real) - len(rows)}
                                                      if len(rows) < len(real) else {})
    for row in rows:
        planted = truth[row["tile_id"]].planted
        assert row["lr_shape"][0] == 8 and not set(row["lr_indices"]) & set(planted), (row["lr_indices"], planted)
    assert len(satlas_items(os.path.join(out, "png"), n_s2_images=8)) == len(
        {(r["tile_x"], r["tile_y"]) for r in rows})


def test_the_report_shows_how_many_pairs_had_n_timesteps(tmp_path):
    from pipelines import report

    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    good_tile(root, tid(0), seed=0, t=12)
    good_tile(root, tid(1), seed=1, t=5)
    good_tile(root, tid(2), seed=2, t=12)
    build_pairs.run(["--input", root, "--output", out, "--runner", RUNNER, "--lr-timesteps", "8", "--allow-fewer"])
    report.run(["--run", out, "--output", str(tmp_path / "report"), "--samples", "1"])
    html = (tmp_path / "report" / "index.html").read_text()
    assert "timesteps per pair (--lr-timesteps 8)" in html and "2 pairs with all 8, 1 with 5; 0 tiles rejected" in html
