"""--lr-timesteps N: the N best timesteps per pair, in every sink, readable by the training code."""
import collections
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import build_pairs
from pipelines.options import BuildOptions, pair_config, parse_build_options
from tests.tile_factory import NAIP_ID, cloud, good_tile, scene, series_from, write_tile
from transforms import corrections, records
from transforms.build import dataset_manifest
from transforms.io.readers import read_parquet_pairs, read_tfrecord_pairs
from transforms.pairs import PairConfig, build_tile, load_tile
from transforms.selection import (SelectionConfig, TooFewTimesteps, acceptable, clean_gates, downsample,
                                  multi_timesteps, select_pair, to_uint8, with_timesteps)
from transforms.tiles import TileId

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
    # paper and companion: their clean gates turn the planted clouds away too
    for mode in ("paper", "companion"):
        gated = SelectionConfig(mode=mode, lr_timesteps=12)
        with pytest.raises(TooFewTimesteps, match=f"10 acceptable timesteps .{mode} ranking., 12 requested"):
            multi_timesteps(select_pair(hr, series, gated), gated)


def test_a_first_choice_that_fails_a_gate_gives_way_to_the_best_that_passes(monkeypatch):
    """paper, N > 1: when its single choice fails a clean gate, the best-scoring candidate that
    passes is the first (the HR matched to it); N = 1 keeps the paper's choice, and computes no gate."""
    from transforms import selection as S

    hr, series = planted_series(7, clean=8, clouded=(3,))
    real_scores = S.paper_scores

    def cloud_scores_best(hr_down_u8, candidates, alpha):  # the paper's score, but the cloudy one wins
        scores = real_scores(hr_down_u8, candidates, alpha)
        cloudy = [i for i, c in enumerate(candidates) if (c == series[3]).all()]
        scores[cloudy] = -1.0
        return scores

    monkeypatch.setattr(S, "paper_scores", cloud_scores_best)
    single = select_pair(hr, series, SelectionConfig(mode="paper"))
    assert single.lr_index == 3 and single.clean is None
    config = SelectionConfig(mode="paper", lr_timesteps=4)
    multi = with_timesteps(select_pair(hr, series, config), series, config)
    assert 3 not in multi.lr_indices.tolist() and multi.lr_index == multi.lr_indices[0]
    position = {int(t): i for i, t in enumerate(multi.candidate_indices)}
    passing = [t for t in multi.candidate_indices.tolist() if multi.clean[position[t]]]
    assert multi.lr_index == min(passing, key=lambda t: multi.candidate_scores[position[t]])
    np.testing.assert_array_equal(multi.hr_matched, S.match_histograms(hr, series[multi.lr_index][None])[0])
    assert multi.clean.tolist() == [t != 3 for t in multi.candidate_indices.tolist()]


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
    config = PairConfig(root, selection=SelectionConfig(mode="paper", lr_timesteps=8))
    outcome = build_tile(tid(0), config)
    assert outcome.kind == "reject"
    assert (outcome.record["stage"], outcome.record["reason"]) == ("select", "too_few_timesteps")
    assert "5 acceptable timesteps (paper ranking), 8 requested" in outcome.record["detail"]
    fewer = build_tile(tid(0), dataclasses.replace(
        config, selection=SelectionConfig(mode="paper", lr_timesteps=8, allow_fewer=True)))
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


# The training code's dataset class, restated: allenai/satlas-super-resolution, file
# ssr/data/s2-naip_dataset.py (class S2NAIPDataset), commit 3da15256d2b88b50d9bc87d2fe944cb861154c42
# (2024-12-05). Its code is not in this project; `test_the_real_satlas_class_reads_...` below runs
# it from a checkout named by $S2NAIP_SATLAS_REPO and compares it with this restatement.
SATLAS_COMMIT = "3da15256d2b88b50d9bc87d2fe944cb861154c42"
SATLAS_REPO_ENV, SATLAS_PYTHON_ENV = "S2NAIP_SATLAS_REPO", "S2NAIP_SATLAS_PYTHON"


def satlas_items(png_root, n_s2_images, s2_bands=("tci", "b08")):
    """S2NAIPDataset's reading of a PNG layout, in numpy (the behaviours this project depends on):

    * every PNG under naip/ (glob `naip_path/**/*.png`) is a datapoint, its chip the name of the
      folder holding it, its Sentinel-2 files `sentinel2_path/<chip>/<band>.png`;
    * `__getitem__` skips (moves on to the next datapoint) a NAIP image with a black pixel
      (`has_black_pixels`: the sum over channels is 0 somewhere) and a tile with fewer than
      n_s2_images timesteps;
    * each band PNG [T*32, 32, C] is read as [C, T*32, 32], reshaped to [C, T, 32, 32] and permuted
      to [T, C, 32, 32] (the timesteps stacked vertically), tci first, the bands concatenated on C;
    * the n_s2_images images are `random.sample(goods, n)`, goods the timesteps whose TCI has no
      black pixel, or all goods plus `random.sample(bads, need)` when there are too few goods.

    Returns {chip: (hr [C, 128, 128], the tile's timesteps [T, C, 32, 32], goods, bads)}, the tiles
    the class yields samples of."""
    items = {}
    for dirpath, _, names in os.walk(os.path.join(png_root, "naip")):
        for name in names:
            if not name.endswith(".png"):
                continue
            chip = os.path.basename(dirpath)
            hr = np.asarray(Image.open(os.path.join(dirpath, name)))
            hr = hr[None] if hr.ndim == 2 else np.moveaxis(hr, -1, 0)
            if (hr.sum(axis=0, dtype=np.int64) == 0).any():  # has_black_pixels
                continue
            stack = []
            for band in s2_bands:
                image = np.asarray(Image.open(os.path.join(png_root, "sentinel2", chip, f"{band}.png")))
                chw = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)  # read_image: [C, H, W]
                stack.append(chw.reshape(chw.shape[0], -1, 32, 32).transpose(1, 0, 2, 3))
            s2 = np.concatenate(stack, axis=1)
            if s2.shape[0] < n_s2_images:
                continue
            black = (s2[:, :3].sum(axis=1, dtype=np.int64) == 0).any(axis=(1, 2))
            items[chip] = (hr, s2, np.flatnonzero(~black).tolist(), np.flatnonzero(black).tolist())
    return items


def satlas_pool(goods: list[int], bads: list[int], n_s2_images: int) -> tuple[list[int], list[int]]:
    """(the indices always used, the indices the rest is drawn from) by S2NAIPDataset's rule."""
    return ([], goods) if len(goods) >= n_s2_images else (goods, bads)


def crafted_png_root(root) -> dict:
    """A PNG layout exercising each behaviour above: `full` 10 timesteps, 2 with a black TCI pixel
    (one inside, one on the border); `short` 5 timesteps; `dark_hr` a black NAIP pixel; `mostly_bad`
    8 timesteps, 3 with a black pixel. Each timestep t of a tile is filled with values derived from
    t, so a read timestep tells its index. Returns {chip: timesteps} written."""
    rng = np.random.default_rng(0)
    written = {}
    for k, (chip, t, black_ts, black_hr) in enumerate([("100_200", 10, (3, 7), False), ("101_200", 5, (), False),
                                                         ("102_200", 9, (), True), ("103_200", 8, (0, 4, 5), False)]):
        hr = rng.integers(1, 256, (128, 128, 3), dtype=np.uint8)
        if black_hr:
            hr[60, 60] = 0
        series = rng.integers(1, 256, (t, 32, 32, 4), dtype=np.uint8)
        series[:, 0, 0, 0] = np.arange(t) + 1  # the timestep's index, in the first TCI pixel
        for j, b in enumerate(black_ts):
            series[b, 10 + 5 * j, 10 + 5 * j if j else 0, :3] = 0  # one black pixel (on the border, then inside)
        folder = os.path.join(root, "naip", f"m_00000{k}0_ne_10_060_20200101", chip)
        os.makedirs(folder)
        Image.fromarray(hr).save(os.path.join(folder, "rgb.png"))
        s2 = os.path.join(root, "sentinel2", chip)
        os.makedirs(s2)
        Image.fromarray(series[..., :3].reshape(t * 32, 32, 3)).save(os.path.join(s2, "tci.png"))
        Image.fromarray(series[..., 3].reshape(t * 32, 32)).save(os.path.join(s2, "b08.png"))
        written[chip] = series
    return written


def test_the_satlas_restatement_on_crafted_tiles(tmp_path):
    written = crafted_png_root(tmp_path)
    items = satlas_items(str(tmp_path), n_s2_images=8)
    assert sorted(items) == ["100_200", "103_200"]  # short: too few timesteps; dark_hr: a black NAIP pixel
    hr, s2, goods, bads = items["100_200"]
    np.testing.assert_array_equal(s2, written["100_200"].transpose(0, 3, 1, 2))  # the vertical stacking
    assert (goods, bads) == ([0, 1, 2, 4, 5, 6, 8, 9], [3, 7])
    assert satlas_pool(goods, bads, 8) == ([], goods)  # 8 drawn among the 8 goods
    _, _, goods, bads = items["103_200"]
    assert satlas_pool(goods, bads, 8) == ([1, 2, 3, 6, 7], [0, 4, 5])  # too few goods: bads fill in
    assert sorted(satlas_items(str(tmp_path), n_s2_images=5)) == ["100_200", "101_200", "103_200"]


SATLAS_DRIVER = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import ssr.data  # imports ssr/data/*_dataset.py: registers S2NAIPDataset in basicsr's DATASET_REGISTRY
from basicsr.data import build_dataset
opt = json.loads(sys.argv[2])
dataset = build_dataset(opt)
arrays, items = {}, []
for i in range(len(dataset)):
    item = dataset[i]
    arrays[f"lr{i}"], arrays[f"hr{i}"] = item["lr"].numpy(), item["hr"].numpy()
    items.append({"asked": i, "index": int(item["Index"]), "chip": item["Chip"]})
np.savez(sys.argv[3], **arrays)
print(json.dumps({"class": type(dataset).__module__ + "." + type(dataset).__name__, "len": len(dataset),
                  "items": items}))
"""


def run_real_satlas_class(png_root, n_s2_images, out_npz) -> tuple[dict, dict]:
    """S2NAIPDataset of the checkout $S2NAIP_SATLAS_REPO, built as its training script builds it
    (basicsr's build_dataset on the configs' dataset options, n_s2_images N, s2_bands [tci, b08]),
    run by $S2NAIP_SATLAS_PYTHON (an interpreter with its imports: torch, torchvision, basicsr);
    every index read once. Returns (summary, arrays)."""
    repo = os.environ.get(SATLAS_REPO_ENV)
    if not repo:
        pytest.skip(f"${SATLAS_REPO_ENV} names no checkout of allenai/satlas-super-resolution")
    if not os.path.isfile(os.path.join(repo, "ssr", "data", "s2-naip_dataset.py")):
        pytest.fail(f"${SATLAS_REPO_ENV}={repo} has no ssr/data/s2-naip_dataset.py")
    python = os.environ.get(SATLAS_PYTHON_ENV) or sys.executable
    opt = {"name": "train", "type": "S2NAIPDataset", "phase": "train", "scale": 4, "n_s2_images": n_s2_images,
           "s2_bands": ["tci", "b08"], "sentinel2_path": os.path.join(png_root, "sentinel2"),
           "naip_path": os.path.join(png_root, "naip"), "io_backend": {"type": "disk"}}
    proc = subprocess.run([python, "-c", SATLAS_DRIVER, repo, json.dumps(opt), str(out_npz)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(out_npz) as arrays:
        return summary, {k: arrays[k] for k in arrays.files}


def test_the_real_satlas_class_agrees_with_the_restatement_on_crafted_tiles(tmp_path):
    """Optional (the one allowed skip of this file: CI cannot reach the repository): the real class
    on the crafted tiles, each behaviour the restatement states."""
    written = crafted_png_root(tmp_path / "png")
    summary, arrays = run_real_satlas_class(str(tmp_path / "png"), 8, tmp_path / "items.npz")
    assert summary["class"].endswith("S2NAIPDataset") and summary["len"] == 4  # every NAIP PNG a datapoint
    items = satlas_items(str(tmp_path / "png"), n_s2_images=8)
    for i, item in enumerate(summary["items"]):
        assert item["chip"] in items  # short and dark_hr are skipped: the class moved on to another
        _, s2, goods, bads = items[item["chip"]]
        lr = arrays[f"lr{i}"].reshape(8, 4, 32, 32)  # [n * C, 32, 32] (use_3d false, the ESRGAN configs')
        drawn = [int(frame[0, 0, 0]) - 1 for frame in lr]  # each timestep's index, written in its pixel
        for frame, t in zip(lr, drawn):
            np.testing.assert_array_equal(frame, s2[t])  # the vertical stacking, tci then b08
        always, pool = satlas_pool(goods, bads, 8)
        assert len(set(drawn)) == 8 and set(always) <= set(drawn) <= set(always) | set(pool), (item, drawn)
        np.testing.assert_array_equal(arrays[f"hr{i}"], items[item["chip"]][0])
    skipped = [it for it in summary["items"] if it["index"] != it["asked"]]
    assert skipped and all(it["chip"] in ("100_200", "103_200") for it in skipped)
    assert {it["chip"] for it in summary["items"]} == {"100_200", "103_200"}
    assert set(written) == {"100_200", "101_200", "102_200", "103_200"}


def test_the_real_satlas_class_reads_every_pair_of_an_8_timestep_build(tmp_path):
    """Optional, as above: a --lr-timesteps 8 --allow-fewer build read by the real class with
    n_s2_images 8: every datapoint with 8 timesteps is a sample made of exactly its 8 written
    timesteps (in the class's random order) and its HR; the pair written with 5 is skipped."""
    if not os.environ.get(SATLAS_REPO_ENV):
        pytest.skip(f"${SATLAS_REPO_ENV} names no checkout of allenai/satlas-super-resolution")
    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    for i in range(4):
        good_tile(root, tid(i), seed=30 + i, t=12)
    good_tile(root, tid(4), seed=40, t=5)
    build_pairs.run(["--input", root, "--output", out, "--runner", RUNNER, "--lr-timesteps", "8", "--allow-fewer",
                     "--format", "parquet,png"])
    rows = {f"{r['tile_x']}_{r['tile_y']}": r for r in read_parquet_pairs(os.path.join(out, "pairs"))}
    assert sorted(len(r["lr_indices"]) for r in rows.values()) == [5, 8, 8, 8, 8]
    summary, arrays = run_real_satlas_class(os.path.join(out, "png"), 8, tmp_path / "items.npz")
    assert summary["len"] == 5
    for i, item in enumerate(summary["items"]):
        row = rows[item["chip"]]
        assert len(row["lr_indices"]) == 8, item  # the 5-timestep pair is never a sample
        written = records.lr_timesteps(row).transpose(0, 3, 1, 2)  # [8, 4, 32, 32], best first
        lr = arrays[f"lr{i}"].reshape(8, 4, 32, 32)
        order = [next(k for k in range(8) if (written[k] == frame).all()) for frame in lr]
        assert sorted(order) == list(range(8)), order  # the 8 written, each once
        hr, _ = records.decode_pair_arrays(row)
        np.testing.assert_array_equal(arrays[f"hr{i}"], hr[..., :3].transpose(2, 0, 1))
    assert {it["chip"] for it in summary["items"]} == {c for c, r in rows.items() if len(r["lr_indices"]) == 8}


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
        hr, s2, goods, bads = items[f"{row['tile_x']}_{row['tile_y']}"]
        lr = records.lr_timesteps(row)  # [8, 32, 32, 4], best first
        np.testing.assert_array_equal(s2, lr.transpose(0, 3, 1, 2))
        assert goods == list(range(8)) and bads == []


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
        _, s2, _, _ = items[f"{row['tile_x']}_{row['tile_y']}"]
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
    config = PairConfig(root, selection=SelectionConfig(mode="paper", lr_timesteps=4))
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


@pytest.mark.parametrize("mode", ["paper", "companion", "robust"])
def test_real_naip_tiles_8_written_timesteps_hold_no_planted_bad_one(mode, real_tile_set, tmp_path):
    """Real NAIP-derived tiles (transforms/devdata/real_tiles.py: 10 clean timesteps, a planted black-border, cloudy
    and dark one each; every tile has >= 8 clean): none of the 8 written is a planted one, in every
    mode. paper and companion write 8 for all 20 (their clean gates pass every clean timestep);
    robust rejects a tile whose clean timesteps do not all pass its evidence as too_few_timesteps
    (1 of 20, measured). Without the gates paper wrote the planted dark one in 7 of 20 tiles."""
    root, real = real_tile_set
    out = str(tmp_path / "out")
    summary = build_pairs.run(["--input", str(root), "--output", out, "--runner", RUNNER, "--selection", mode,
                               "--lr-timesteps", "8", "--format", "parquet,png"])
    truth = {t.tile_id: t for t in real}
    rows = list(read_parquet_pairs(os.path.join(out, "pairs")))
    assert all(len(t.clean_indices) >= 8 for t in real)
    if mode == "robust":
        assert summary["counts"]["pairs"] == len(rows) >= len(real) - 2
    else:
        assert summary["counts"]["pairs"] == len(rows) == len(real)
    assert summary["counts"]["rejects_by_reason"] == ({"too_few_timesteps": len(real) - len(rows)}
                                                      if len(rows) < len(real) else {})
    violations = [(row["tile_id"], row["lr_indices"]) for row in rows
                  if set(row["lr_indices"]) & set(truth[row["tile_id"]].planted)]
    assert all(row["lr_shape"][0] == 8 for row in rows) and violations == []
    assert len(satlas_items(os.path.join(out, "png"), n_s2_images=8)) == len(
        {(r["tile_x"], r["tile_y"]) for r in rows})
    if mode != "robust":  # the first is the mode's single choice on every tile here
        single = {r["tile_id"]: r["lr_index"] for r in (build_tile(t.tile_id, PairConfig(
            str(root), selection=SelectionConfig(mode=mode))).record for t in real)}
        assert {r["tile_id"]: r["lr_index"] for r in rows} == single


def test_real_naip_tiles_clean_gates_pass_every_clean_timestep_and_no_planted_one(real_tile_set):
    """`clean_gates` over each real-NAIP-derived tile's valid timesteps: every clean capture (years
    apart, 2009-2019) passes, every planted cloudy and dark one fails."""
    root, real = real_tile_set
    config = PairConfig(str(root), selection=SelectionConfig(lr_timesteps=8))
    passed = collections.Counter()
    for tile in real:
        inputs = load_tile(TileId.parse(tile.tile_id), config)
        selection = select_pair(inputs.hr, inputs.series, config.selection, inputs.extra)
        valid = selection.valid_indices
        hr_down = to_uint8(downsample(inputs.hr, 32, config.selection.downsample_method))
        ok = clean_gates(hr_down, inputs.series[valid], {b: v[valid] for b, v in inputs.extra.items()})
        for t, passes in zip(valid.tolist(), ok.tolist()):
            passed[(tile.planted.get(t, "clean"), passes)] += 1
    assert set(passed) == {("clean", True), ("cloudy", False), ("dark", False)}, passed
    assert passed[("clean", True)] == sum(len(t.clean_indices) for t in real)


def test_real_sentinel2_clean_dates_pass_the_clean_gates_and_overcast_ones_fail_with_s2cloudless(real_s2_dir):
    """Real Sentinel-2 L1C (the eo-learn patch: 9 chips, each clear date as the HR, the other 4 real
    dates as the series; labels by eye): every clear date passes the gates; with s2cloudless's bands
    every overcast one fails, with the TCI and B08 alone the thick bright overcast date does (the
    greyer one, cloud with shadowed texture, is left to s2cloudless)."""
    from transforms.devdata import real_s2

    data = real_s2.load_eolearn(real_s2_dir / "eolearn")
    outcomes = {False: collections.Counter(), True: collections.Counter()}
    for tile in real_s2.real_tiles(data):
        hr_down = to_uint8(downsample(tile.hr, 32, "bicubic_aa"))
        for with_bands in (False, True):
            ok = clean_gates(hr_down, tile.series, tile.extra if with_bands else None)
            for kind, date, passes in zip(tile.kinds, tile.capture_of_index, ok.tolist()):
                outcomes[with_bands][(kind, date if kind != "clean" else "", passes)] += 1
    assert outcomes[True] == {("clean", "", True): 54, ("overcast", "20150820", False): 27,
                              ("overcast", "20150731", False): 27}, outcomes[True]
    assert outcomes[False][("clean", "", True)] == 54 and outcomes[False][("overcast", "20150820", False)] == 27


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
