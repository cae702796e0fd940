"""Tests for transforms/devdata/sample.py: the procedural S2-NAIP-layout sample generator."""
from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from pipelines import sample as sample_command
from transforms import tiles
from transforms.devdata import sample

N_TILES = 40            # one full defect window plus some: every defect appears at least once
SEED = 3
TIMESTEPS = (8, 14)     # short series keep the tests fast; the default is (24, 40)


def _tree(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def _read(path) -> tuple[str, np.ndarray]:
    with Image.open(path) as im:
        im.load()
        return im.mode, np.asarray(im)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample") / "out"
    summary = sample.generate_sample(str(root), N_TILES, SEED, timesteps=TIMESTEPS, extra_bands=True)
    return root, summary, [json.loads(line) for line in open(summary.truth_path)]


def _tile(root, tile_id: str) -> tuple[tiles.TileId, str, str]:
    t = tiles.TileId.parse(tile_id)
    return t, os.path.join(root, "naip", t.naip_id, t.xy), os.path.join(root, "sentinel2", t.xy)


# --- determinism ------------------------------------------------------------------------------

def test_byte_identical_across_runs_and_workers(generated, tmp_path):
    root, summary, _ = generated
    first = _tree(root)
    again = tmp_path / "again"
    pooled = tmp_path / "pooled"
    sample.generate_sample(str(again), N_TILES, SEED, timesteps=TIMESTEPS, extra_bands=True, workers=1)
    sample.generate_sample(str(pooled), N_TILES, SEED, timesteps=TIMESTEPS, extra_bands=True, workers=2)
    assert len(first) > 4 * N_TILES
    assert _tree(again) == first
    assert _tree(pooled) == first


def test_other_seed_differs(generated, tmp_path):
    root, summary, _ = generated
    other = tmp_path / "other"
    other_summary = sample.generate_sample(str(other), 1, SEED + 1, timesteps=TIMESTEPS)
    first = tiles.TileId.parse(summary.tile_ids[0])
    other_first = tiles.TileId.parse(other_summary.tile_ids[0])
    assert (open(tiles.hr_rgb_path(str(root), first), "rb").read()
            != open(tiles.hr_rgb_path(str(other), other_first), "rb").read())


def test_tile_depends_only_on_seed_and_index(generated, tmp_path):
    """A shorter sample is a prefix of a longer one; extra bands do not change tci/b08 or NAIP."""
    root, _, _ = generated
    full = _tree(root)
    short = tmp_path / "short"
    sample.generate_sample(str(short), 7, SEED, timesteps=TIMESTEPS, extra_bands=False)
    part = _tree(short)
    pngs = [k for k in part if k.endswith(".png")]
    assert pngs and not any(os.path.basename(k)[:3] in sample.EXTRA_BANDS for k in pngs)
    for k in pngs:
        assert part[k] == full[k], k
    lines = open(os.path.join(root, sample.TRUTH_FILE)).read().splitlines()
    assert open(os.path.join(short, sample.TRUTH_FILE)).read().splitlines() == lines[:7]


def test_rerun_into_same_folder_removes_stale_files(generated, tmp_path):
    root, _, _ = generated
    out = tmp_path / "rerun"
    sample.generate_sample(str(out), 12, SEED, timesteps=TIMESTEPS, extra_bands=True)
    sample.generate_sample(str(out), 12, SEED, timesteps=TIMESTEPS, extra_bands=False)
    fresh = tmp_path / "fresh"
    sample.generate_sample(str(fresh), 12, SEED, timesteps=TIMESTEPS, extra_bands=False)
    assert _tree(out) == _tree(fresh)


# --- layout, shapes, modes --------------------------------------------------------------------

def test_files_shapes_dtypes_modes(generated):
    root, summary, truth = generated
    for rec in truth:
        _, hr_dir, s2_dir = _tile(root, rec["tile_id"])
        mode, rgb = _read(os.path.join(hr_dir, "rgb.png"))
        assert mode == "RGB" and rgb.shape == (128, 128, 3) and rgb.dtype == np.uint8
        if rec["kind"] != "missing_nir":
            mode, nir = _read(os.path.join(hr_dir, "nir.png"))
            assert mode == "L" and nir.shape == (128, 128) and nir.dtype == np.uint8
        if rec["kind"] == "missing_s2":
            continue
        n = len(rec["timesteps"])
        assert TIMESTEPS[0] <= n <= TIMESTEPS[1]
        mode, tci = _read(os.path.join(s2_dir, "tci.png"))
        assert mode == "RGB" and tci.shape == (n * 32, 32, 3) and tci.dtype == np.uint8
        bands = sample.EXTRA_BANDS + (() if rec["kind"] == "missing_band" else ("b08",))
        for band in bands:
            mode, arr = _read(os.path.join(s2_dir, f"{band}.png"))
            assert mode == "L" and arr.shape == (n * 32, 32) and arr.dtype == np.uint8, band
    names = {os.path.basename(p) for p in _tree(root)}
    assert names == {"rgb.png", "nir.png", "tci.png", "b08.png", "b01.png", "b10.png", "b11.png", "b12.png",
                     sample.TRUTH_FILE, sample.MANIFEST_FILE}


def test_default_timesteps_range(tmp_path):
    summary = sample.generate_sample(str(tmp_path / "d"), 3, 0)
    truth = [json.loads(line) for line in open(summary.truth_path)]
    for rec in truth:
        if rec["kind"] != "missing_s2":
            assert 24 <= len(rec["timesteps"]) <= 40
            _, tci = _read(tiles.s2_band_path(str(tmp_path / "d"), tiles.TileId.parse(rec["tile_id"]), "tci"))
            assert tci.shape == (len(rec["timesteps"]) * 32, 32, 3)


def test_paths_match_tiles_helpers(generated):
    root, summary, _ = generated
    t = tiles.TileId.parse(summary.tile_ids[0])
    assert os.path.isfile(tiles.hr_rgb_path(str(root), t))
    assert os.path.isfile(tiles.s2_band_path(str(root), t, "tci")) or sample.tile_kind(SEED, 0) == "missing_s2"


# --- ids --------------------------------------------------------------------------------------

def test_tile_ids_valid_unique_and_grouped(generated):
    root, summary, truth = generated
    assert [r["tile_id"] for r in truth] == summary.tile_ids
    assert open(summary.manifest_path).read().splitlines() == summary.tile_ids
    parsed = [tiles.TileId.parse(t) for t in summary.tile_ids]
    assert [str(p) for p in parsed] == summary.tile_ids
    assert len({p.xy for p in parsed}) == len(parsed)
    for p in parsed:
        assert 34000 <= p.x <= 37000 and 54000 <= p.y <= 57000


def test_ids_across_captures():
    ids = [sample.tile_id_for(0, i) for i in range(1200)]
    assert len({t.xy for t in ids}) == len(ids)
    by_capture = collections.defaultdict(list)
    for t in ids:
        tiles.TileId.parse(str(t))
        by_capture[t.naip_id].append(t)
    assert len(by_capture) == 12 and all(len(v) == 100 for v in by_capture.values())
    for group in by_capture.values():       # a 10x10 block of adjacent tiles
        xs, ys = {t.x for t in group}, {t.y for t in group}
        assert max(xs) - min(xs) == 9 and max(ys) - min(ys) == 9
    assert sample.tile_id_for(0, 5) == sample.tile_id_for(0, 5)
    assert str(sample.tile_id_for(0, 0)).startswith("m_26") or str(sample.tile_id_for(0, 0)).startswith("m_27")


# --- truth agrees with the files --------------------------------------------------------------

def _black(a: np.ndarray) -> np.ndarray:
    return (a == 0).all(axis=-1) if a.ndim == 3 else a == 0


def _border_strip(mask: np.ndarray, width: int = 2) -> np.ndarray:
    inner = mask.copy()
    inner[width:-width, width:-width] = False
    return inner


def test_defects_planted(generated):
    root, summary, truth = generated
    counts = collections.Counter(r["kind"] for r in truth)
    for kind in sample.DEFECTS:
        assert counts[kind] >= 1, kind
        assert getattr(summary, kind) == counts[kind]
    assert summary.ok == counts["ok"] and summary.ok >= N_TILES * 0.7
    for rec in truth:
        _, hr_dir, s2_dir = _tile(root, rec["tile_id"])
        kind = rec["kind"]
        assert os.path.isfile(os.path.join(hr_dir, "rgb.png"))
        assert os.path.isfile(os.path.join(hr_dir, "nir.png")) == (kind != "missing_nir")
        assert os.path.isdir(s2_dir) == (kind != "missing_s2")
        if kind == "missing_s2":
            assert rec["timesteps"] == [] and rec["clear_indices"] == []
            continue
        assert os.path.isfile(os.path.join(s2_dir, "tci.png"))
        assert os.path.isfile(os.path.join(s2_dir, "b08.png")) == (kind != "missing_band")
        _, rgb = _read(os.path.join(hr_dir, "rgb.png"))
        black = _black(rgb)
        if kind == "naip_black_border":
            assert _border_strip(black).sum() > 1
        else:
            assert not black.any()
        if kind == "no_valid_timesteps":
            assert {s["condition"] for s in rec["timesteps"]} == {"black_border"}
            assert rec["clear_indices"] == []


def test_timestep_conditions_match_pixels(generated):
    root, _, truth = generated
    seen = collections.Counter()
    for rec in truth:
        if rec["kind"] == "missing_s2":
            continue
        _, _, s2_dir = _tile(root, rec["tile_id"])
        _, tci = _read(os.path.join(s2_dir, "tci.png"))
        bands = {b: _read(os.path.join(s2_dir, f"{b}.png"))[1] for b in ("b08",) + sample.EXTRA_BANDS
                 if os.path.exists(os.path.join(s2_dir, f"{b}.png"))}
        steps = rec["timesteps"]
        assert [s["index"] for s in steps] == list(range(len(steps)))
        assert rec["clear_indices"] == [s["index"] for s in steps if s["condition"] == "clear"]
        for s in steps:
            t = s["index"]
            assert s["condition"] in sample.CONDITIONS
            seen[s["condition"]] += 1
            black = _black(tci[t * 32:(t + 1) * 32])
            if s["condition"] == "black_border":
                assert _border_strip(black).sum() > 1
                for arr in bands.values():      # nodata in every band, at the same pixels
                    assert np.array_equal(arr[t * 32:(t + 1) * 32] == 0, black)
            else:
                assert not black.any(), (rec["tile_id"], s)
                for arr in bands.values():
                    assert arr[t * 32:(t + 1) * 32].min() >= 1
        if rec["kind"] != "no_valid_timesteps":
            assert len(rec["clear_indices"]) >= sample.MIN_CLEAR
            near = rec["nearest_index"]
            offsets = [abs(s["day_offset"]) for s in steps]
            assert steps[near]["condition"] == "clear"
            assert offsets[near] == min(offsets) and offsets.count(min(offsets)) == 1
            assert offsets[near] <= 5
    assert set(seen) == set(sample.CONDITIONS), seen
    assert 0.35 < seen["clear"] / sum(seen.values()) < 0.65


def _gray(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64).mean(axis=-1)


def test_conditions_look_like_their_names():
    """Band statistics per condition, over rendered tiles (in memory): clouds bright, snow dark in
    SWIR, cirrus high for thin cloud, dark nearly black, and the clear timestep closest to the NAIP
    date matches the NAIP image."""
    stats = collections.defaultdict(lambda: collections.defaultdict(list))
    corr_near, corr_cloud = [], []
    for i in range(45):
        r = sample.render_tile(11, i, (10, 16), extra_bands=True)
        if not r.sentinel2:
            continue
        hr = _gray(r.naip["rgb"]).reshape(32, 4, 32, 4).mean(axis=(1, 3))
        for s in r.truth["timesteps"]:
            t, cond = s["index"], s["condition"]
            rows = slice(t * 32, (t + 1) * 32)
            stats[cond]["tci"].append(r.sentinel2["tci"][rows].mean())
            stats[cond]["blue_minus_red"].append(r.sentinel2["tci"][rows][..., 2].mean()
                                                 - r.sentinel2["tci"][rows][..., 0].mean())
            for b in sample.EXTRA_BANDS:
                stats[cond][b].append(r.sentinel2[b][rows].mean())
            c = np.corrcoef(hr.ravel(), _gray(r.sentinel2["tci"][rows]).ravel())[0, 1]
            if r.kind == "ok" and t == r.truth["nearest_index"]:
                corr_near.append(c)
            if r.kind == "ok" and cond == "cloud":
                corr_cloud.append(c)
    m = {c: {k: float(np.mean(v)) for k, v in d.items()} for c, d in stats.items()}
    clear = m["clear"]
    assert m["cloud"]["tci"] > clear["tci"] + 40
    assert m["snow"]["tci"] > clear["tci"] + 40
    assert m["snow"]["b11"] < m["cloud"]["b11"] - 50 and m["snow"]["b12"] < clear["b12"]
    assert m["thin_cloud"]["b10"] > clear["b10"] + 10 and m["thin_cloud"]["b10"] > m["haze"]["b10"] + 10
    assert m["haze"]["b01"] > clear["b01"] + 15
    assert m["haze"]["blue_minus_red"] > clear["blue_minus_red"]
    assert m["dark"]["tci"] < clear["tci"] / 3
    assert m["shadow"]["tci"] < clear["tci"]
    assert np.mean(corr_near) > 0.85 and np.mean(corr_near) > np.mean(corr_cloud) + 0.2


# --- PNG writer, CLI, arguments ---------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7, 5), (33, 32, 3), (1, 1), (128, 128, 3)])
def test_encode_png_roundtrip(tmp_path, shape):
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(sample.encode_png(arr))
    mode, back = _read(path)
    assert mode == ("RGB" if len(shape) == 3 else "L")
    assert np.array_equal(back, arr)


def test_encode_png_rejects_other_arrays():
    with pytest.raises(ValueError):
        sample.encode_png(np.zeros((4, 4), dtype=np.uint16))
    with pytest.raises(ValueError):
        sample.encode_png(np.zeros((4, 4, 4), dtype=np.uint8))


def test_main_prints_one_line(tmp_path, capsys):
    assert sample_command.main(["--output", str(tmp_path / "cli"), "--tiles", "3", "--seed", "2",
                                "--timesteps", "4", "6", "--extra-bands"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "wrote 3 tiles" in out[0]
    assert os.path.isfile(tmp_path / "cli" / sample.TRUTH_FILE)


@pytest.mark.parametrize("kwargs", [dict(n_tiles=-1), dict(timesteps=(2, 5)), dict(timesteps=(9, 8)),
                                    dict(workers=0), dict(output_dir="gs://bucket/x")])
def test_bad_arguments(tmp_path, kwargs):
    args = dict(output_dir=str(tmp_path / "bad"), n_tiles=2)
    args.update(kwargs)
    with pytest.raises(ValueError):
        sample.generate_sample(**args)
