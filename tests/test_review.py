"""`s2naip review`: metrics and ranking, the page's data and images, and the page itself in a real
browser (headless Chromium driven by Playwright): decide tiles by keyboard and click, export
corrections.json, and build with it.

The browser test needs Debian's `chromium` and the `playwright` package (its own browser download
is not used); it skips without them unless S2NAIP_REQUIRE_BROWSER=1 (CI sets it). Its screenshot is
written to $S2NAIP_TEST_ARTIFACTS (default: the test's tmp folder) as review_page.png.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import urllib.parse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from pipelines import build_pairs, review
from tests.tile_factory import NAIP_ID, cloud, scene, series_from, write_tile
from transforms import imagery
from transforms.quality import review_page
from transforms.quality.review_page import Ranking
from transforms.corrections import timestep_metrics
from transforms.evidence import Evidence
from transforms.selection import SelectionConfig, downsample, psnr, to_uint8

RUNNER = "FnApiRunner"
N_TILES = 5
REQUIRE_BROWSER = os.environ.get("S2NAIP_REQUIRE_BROWSER") == "1"


def tid(i):
    return f"{NAIP_ID}/{38000 + i}_58000"


def review_input(i: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Tile i: 10 timesteps, more of them cloudy the higher i; a B10 band with cirrus over timestep 9."""
    rng = np.random.default_rng(100 + i)
    hr = scene(rng)
    series = series_from(hr, rng, 10)
    for t in range(1, 1 + 2 * i):
        series[t] = cloud(series[t])
    b10 = np.zeros(series.shape[:3], np.uint8)
    b10[9] = 10  # ~0.03 reflectance at 1375 nm: thick cirrus
    return hr, series, {"b10": b10}


@pytest.fixture(scope="module")
def review_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("review") / "in")
    for i in range(N_TILES):
        hr, series, extra = review_input(i)
        write_tile(root, tid(i), hr, series, extra=extra)
    return root


def _build(root, out, *args):
    summary = build_pairs.run(["--input", root, "--output", out, "--runner", RUNNER, "--top-k", "4", *args])
    assert summary["counts"]["pairs"] == N_TILES
    return root, out


@pytest.fixture(scope="module")
def built(review_root, tmp_path_factory):
    """The review input built with the robust selection (evidence flags on the page)."""
    return _build(review_root, str(tmp_path_factory.mktemp("review-out") / "out"), "--selection", "robust")


@pytest.fixture(scope="module")
def built_paper(review_root, tmp_path_factory):
    return _build(review_root, str(tmp_path_factory.mktemp("review-paper") / "out"), "--selection", "paper")


def read_data_js(page_dir) -> dict:
    return read_data_js_text(Path(page_dir, "data.js").read_text())


def read_data_js_text(text: str) -> dict:
    prefix = "window.S2NAIP_REVIEW = "
    assert text.startswith(prefix) and text.rstrip().endswith(";")
    return json.loads(text[len(prefix):].rstrip().rstrip(";"))


# ---------------------------------------------------------------------------------------------
# Metrics and ranking


def test_ranking_by_threshold_worst_and_both():
    values = {f"t{i}": v for i, v in enumerate([25.0, 12.0, 30.0, 18.0, float("inf"), 19.5, 12.0])}

    def ranked(**kw):
        r = Ranking(**kw)
        for tile_id, v in values.items():
            r.add(v, tile_id, {})
        return [(x.tile_id, x.value) for x in r.result()]

    assert ranked(threshold=20) == [("t1", 12.0), ("t6", 12.0), ("t3", 18.0), ("t5", 19.5)]
    assert ranked(worst=3) == [("t1", 12.0), ("t6", 12.0), ("t3", 18.0)]
    assert ranked(worst=2, threshold=20) == [("t1", 12.0), ("t6", 12.0)]
    assert ranked(worst=10)[-1] == ("t4", float("inf"))  # identical images rank last
    with pytest.raises(ValueError, match="--threshold and/or --worst"):
        Ranking()


def test_metrics_match_the_selection_numerics():
    rng = np.random.default_rng(0)
    hr = np.stack([scene(rng) for _ in range(3)])
    lr = np.stack([series_from(h, rng, 1)[0] for h in hr])
    got = review_page.pair_metrics(hr, lr, "psnr_rgb")
    for i in range(3):
        ref = to_uint8(downsample(hr[i], 32, "bicubic_aa"))
        assert got[i] == pytest.approx(psnr(lr[i][None, ..., :3], ref[..., :3])[0])
    rgbn = review_page.pair_metrics(hr, lr, "psnr_rgbn")
    assert not np.allclose(rgbn, got)
    s = review_page.pair_metrics(hr, lr, "ssim_rgb")
    s4 = review_page.pair_metrics(hr, lr, "ssim_rgbn")
    for i in range(3):  # scikit-image's SSIM (Gaussian, sigma 1.5, population covariance) of the stored pair
        ref = to_uint8(downsample(hr[i], 32, "bicubic_aa"))
        for got_ssim, bands in ((s, 3), (s4, 4)):
            expected = structural_similarity(ref[..., :bands], lr[i][..., :bands], gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False, data_range=255, channel_axis=-1)
            assert got_ssim[i] == pytest.approx(expected, abs=1e-6), (i, bands)
    assert not np.allclose(s, s4)
    same = review_page.metric_values(hr, hr, "ssim_rgbn")
    np.testing.assert_allclose(same, 1.0)
    assert np.all(np.isinf(review_page.metric_values(hr, hr, "psnr_rgb")))
    with pytest.raises(ValueError, match="needs 4 bands"):
        review_page.metric_values(hr[..., :3], hr[..., :3], "psnr_rgbn")


def test_evidence_flags_name_what_is_beyond_the_scores_tolerances():
    k = 4
    ev = Evidence(bands=("b10",), distance=np.zeros(k), penalty=np.zeros(k),
                  haze=np.array([0.0, 0.15, 0.04, 0.0]), dark_channel=np.zeros(k),
                  cloud=np.array([0.0, 0.0, 0.08, 0.01]), shadow=np.zeros(k),
                  misregistration_px=np.array([0.2, 0.0, 0.0, 1.34]), hr_shift=np.zeros((k, 2)),
                  shift_peak=np.zeros(k), cirrus=np.array([0.1, 0.1, 0.1, 0.6]))
    assert review_page.evidence_flags(ev) == [[], ["haze 15%"], ["cloud 8%"], ["cirrus 50%", "shift 1.3 px"]]


def test_prediction_decoding():
    hr = scene(np.random.default_rng(1))
    buf = io.BytesIO()
    np.save(buf, np.moveaxis(hr, -1, 0).astype(np.float32) / 255.0)  # CHW floats in [0, 1]
    np.testing.assert_array_equal(review_page.decode_prediction(buf.getvalue(), "p.npy"), hr)
    png = imagery.encode_png(hr[..., :3])
    np.testing.assert_array_equal(review_page.decode_prediction(png, "p.png"), hr[..., :3])
    with pytest.raises(ValueError, match="128x128"):
        review_page.decode_prediction(imagery.encode_png(hr[:64, :64, :3]), "small.png")


# ---------------------------------------------------------------------------------------------
# The page's data and images


def test_review_page_data_and_images(built, tmp_path):
    """A robust build: every valid timestep scored as the robust mode scores a manual
    pick, among every valid timestep and with the tile's extra bands, and flagged by its evidence."""
    root, out = built
    page = tmp_path / "page"
    summary = review.run(["--run", out, "--output", str(page), "--worst", "3"])
    assert summary["pairs"] == N_TILES and summary["selected"] == summary["on_page"] == 3
    data = read_data_js(page)
    pairs = {r["tile_id"]: r for r in pq.read_table(os.path.join(out, "pairs")).to_pylist()}
    every = {}
    for row in pairs.values():
        hr = np.frombuffer(row["hr"], np.uint8).reshape(row["hr_shape"])
        lr = np.frombuffer(row["lr"], np.uint8).reshape(row["lr_shape"])
        every[row["tile_id"]] = review_page.pair_metrics(hr[None], lr[None], "psnr_rgb")[0]
    worst3 = sorted(every, key=every.get)[:3]
    assert [t["tile_id"] for t in data["tiles"]] == worst3
    assert data["metric"] == "psnr_rgb" and data["bands"] == 4 and data["id"]
    for tile in data["tiles"]:
        row = pairs[tile["tile_id"]]
        assert tile["value"] == pytest.approx(every[tile["tile_id"]], abs=1e-3)
        assert tile["lr_index"] == row["lr_index"] and tile["n_valid"] == len(row["valid_indices"])
        steps = tile["steps"]
        assert sorted(s["t"] for s in steps) == sorted(row["valid_indices"])
        assert [s["psnr"] for s in steps] == sorted((s["psnr"] for s in steps), reverse=True)
        assert {s["t"] for s in steps if s["candidate"]} == set(row["candidate_indices"])
        assert row["selection"] == "robust"
        for t, p in zip(row["candidate_indices"], row["candidate_psnr"]):
            step = next(s for s in steps if s["t"] == t)
            assert step["psnr"] == pytest.approx(p, abs=1e-3)
        hr, series, extra = review_input(int(xy_index(tile["tile_id"])))
        valid = np.asarray(row["valid_indices"])
        config = SelectionConfig(mode="robust", top_k=4)
        with_b10 = timestep_metrics(hr, series[valid], config, {"b10": extra["b10"][valid]}).score
        without = timestep_metrics(hr, series[valid], config).score
        score = {s["t"]: s["score"] for s in steps}
        np.testing.assert_allclose([score[t] for t in valid], with_b10, atol=1e-4)
        assert abs(score[9] - without[list(valid).index(9)]) > 0.1  # the cirrus band was read and counts
        flags = {s["t"]: s.get("flags", []) for s in steps}
        assert any(f.startswith("cirrus") for f in flags[9]) and not any(
            f.startswith("cirrus") for t in valid if t != 9 for f in flags[t])
        folder = page / tile["dir"]
        assert Image.open(folder / "hr_rgb.png").size == (128, 128)
        assert Image.open(folder / "hr_nir.png").mode == "L"
        sprite = np.asarray(Image.open(folder / "series_rgb.png"))
        assert sprite.shape == (32 * len(steps), 32, 3)
        xy = tile["tile_id"].split("/")[1]
        tci = np.asarray(Image.open(os.path.join(root, "sentinel2", xy, "tci.png")))
        t0 = steps[0]["t"]
        np.testing.assert_array_equal(sprite[:32], tci[32 * t0: 32 * (t0 + 1)])
    for name in ("index.html", "review.js", "review.css"):
        assert (page / name).read_bytes() == review_page.asset(name)
    html = (page / "index.html").read_text() + (page / "review.js").read_text() + (page / "review.css").read_text()
    assert "http://" not in html and "https://" not in html  # nothing outside the folder


def xy_index(tile_id: str) -> int:
    return int(tile_id.split("/")[1].split("_")[0]) - 38000


def test_review_of_a_paper_build_shows_the_scores_it_stored(built_paper, tmp_path):
    root, out = built_paper
    page = tmp_path / "page"
    review.run(["--run", out, "--output", str(page), "--worst", str(N_TILES)])
    pairs = {r["tile_id"]: r for r in pq.read_table(os.path.join(out, "pairs")).to_pylist()}
    for tile in read_data_js(page)["tiles"]:
        row = pairs[tile["tile_id"]]
        assert row["selection"] == "paper"
        for t, p, sc in zip(row["candidate_indices"], row["candidate_psnr"], row["candidate_scores"]):
            step = next(s for s in tile["steps"] if s["t"] == t)  # the same numbers the build stored
            assert step["psnr"] == pytest.approx(p, abs=1e-3) and step["score"] == pytest.approx(sc, abs=1e-4)
        assert not any("flags" in s for s in tile["steps"])  # evidence flags are the robust mode's


def test_review_by_predictions(built, tmp_path):
    root, out = built
    preds = tmp_path / "preds"
    pairs = {r["tile_id"]: r for r in pq.read_table(os.path.join(out, "pairs")).to_pylist()}
    rng = np.random.default_rng(3)
    noise = {tid(0): 40.0, tid(1): 5.0, tid(2): 20.0}  # tid(3) perfect, tid(4) missing
    for tile_id, row in pairs.items():
        if tile_id == tid(4):
            continue
        hr = np.frombuffer(row["hr"], np.uint8).reshape(row["hr_shape"]).astype(np.float64)
        pred = np.clip(hr + rng.normal(scale=noise.get(tile_id, 0.0), size=hr.shape), 0, 255).astype(np.uint8)
        naip_id, xy = tile_id.split("/")
        (preds / naip_id).mkdir(parents=True, exist_ok=True)
        if tile_id == tid(2):
            np.save(preds / naip_id / f"{xy}.npy", pred)
        else:
            Image.fromarray(pred, "RGBA").save(preds / naip_id / f"{xy}.png")
    page = tmp_path / "page"
    summary = review.run(["--run", out, "--output", str(page), "--predictions", str(preds),
                          "--metric", "psnr_rgbn", "--threshold", "100"])
    assert summary["missing_predictions"] == 1 and summary["selected"] == 3  # perfect: inf, not below
    data = read_data_js(page)
    assert [t["tile_id"] for t in data["tiles"]] == [tid(0), tid(2), tid(1)]
    assert all(t["prediction"] for t in data["tiles"]) and "prediction" in data["metric_label"]
    assert Image.open(page / data["tiles"][0]["dir"] / "prediction.png").size == (128, 128)


def test_review_by_confidence_ranks_the_least_certain_picks_first(built, tmp_path):
    _, out = built
    pairs = {r["tile_id"]: r for r in pq.read_table(os.path.join(out, "pairs")).to_pylist()}
    assert all(0.0 <= r["confidence"] <= 1.0 for r in pairs.values())
    expected = sorted(pairs, key=lambda t: (pairs[t]["confidence"], t))[:3]
    page = tmp_path / "page"
    summary = review.run(["--run", out, "--output", str(page), "--metric", "confidence", "--worst", "3"])
    assert summary["selected"] == 3
    data = read_data_js(page)
    assert [t["tile_id"] for t in data["tiles"]] == expected
    assert data["metric_label"] == "selection confidence"
    with pytest.raises(SystemExit, match="prediction"):
        review.run(["--run", out, "--output", str(tmp_path / "p"), "--metric", "confidence", "--worst", "3",
                    "--predictions", str(tmp_path)])


def test_review_arguments(built, tmp_path):
    _, out = built
    with pytest.raises(SystemExit):
        review.run(["--run", out, "--output", str(tmp_path / "p")])  # neither --threshold nor --worst
    with pytest.raises(SystemExit):
        review.run(["--run", out, "--output", str(tmp_path / "p"), "--worst", "0"])


def test_review_of_a_bucket_written_to_a_bucket(gcs_env, built, tmp_path):
    """The build's output and its input read from gs://, the page written to gs://: the same page
    as from local folders."""
    root, out = built
    gcs_env.bucket("reviews")
    gcs_env.upload_tree(out, "gs://reviews/build")
    gcs_env.upload_tree(root, "gs://reviews/input")
    summary = review.run(["--run", "gs://reviews/build", "--input", "gs://reviews/input", "--output",
                          "gs://reviews/round1", "--worst", "2"])
    assert summary["page"] == "gs://reviews/round1/index.html" and summary["on_page"] == 2
    names = gcs_env.list("gs://reviews/round1/")
    for name in ("index.html", "review.js", "review.css", "data.js", "tiles/00001/series_rgb.png",
                 "tiles/00002/hr_nir.png"):
        assert f"gs://reviews/round1/{name}" in names, names
    review.run(["--run", out, "--output", str(tmp_path / "local"), "--worst", "2"])
    remote = read_data_js_text(gcs_env.read_bytes("gs://reviews/round1/data.js").decode())
    local = read_data_js(tmp_path / "local")
    assert [t["steps"] for t in remote["tiles"]] == [t["steps"] for t in local["tiles"]]
    assert gcs_env.read_bytes("gs://reviews/round1/tiles/00001/series_rgb.png") == (
        tmp_path / "local" / "tiles" / "00001" / "series_rgb.png").read_bytes()


# ---------------------------------------------------------------------------------------------
# The page in a browser


def chromium_path() -> str | None:
    env = os.environ.get("S2NAIP_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    """Headless system Chromium under Playwright (skips without them unless S2NAIP_REQUIRE_BROWSER=1)."""
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or executable is None:
        missing = "the playwright package" if sync_playwright is None else "a chromium executable"
        if REQUIRE_BROWSER:
            pytest.fail(f"S2NAIP_REQUIRE_BROWSER=1 but {missing} is not installed")
        pytest.skip(f"browser test needs {missing} (apt-get install chromium; pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True,
                              args=["--no-sandbox", "--disable-dev-shm-usage", "--no-first-run",
                                    "--disable-background-networking", "--disable-component-update",
                                    "--disable-sync", "--disable-default-apps"])
        try:
            yield b
        finally:
            b.close()


def artifacts_dir(tmp_path) -> Path:
    folder = Path(os.environ.get("S2NAIP_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_review_in_a_browser_then_build_with_its_corrections(browser, built, tmp_path):
    root, out = built
    page_dir = tmp_path / "page"
    review.run(["--run", out, "--output", str(page_dir), "--worst", "4"])
    data = read_data_js(page_dir)
    tiles = data["tiles"]
    assert len(tiles) == 4
    url = (page_dir / "index.html").as_uri()

    # tile 1: a digit key picks the first timestep that is not the built choice
    key_pos = next(i for i, s in enumerate(tiles[0]["steps"][:9]) if s["t"] != tiles[0]["lr_index"])
    # tile 3: a click on the last cell of the grid
    click_t = tiles[2]["steps"][-1]["t"]
    expected = {tiles[0]["tile_id"]: tiles[0]["steps"][key_pos]["t"],  # keyboard pick
                tiles[1]["tile_id"]: None,  # `x`
                tiles[2]["tile_id"]: click_t,  # click on a cell
                tiles[3]["tile_id"]: None}  # click on the drop button

    context = browser.new_context(accept_downloads=True, viewport={"width": 1440, "height": 1000})
    outside = []

    def only_local(route):
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_local)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    progress = page.locator("#progress-text")
    assert progress.inner_text().startswith("0 / 4 reviewed")
    assert page.locator("#tile-list .item").count() == 4
    assert page.locator("#grid .cell").count() == tiles[0]["n_valid"]
    # every image on the page is loaded (relative files from file://)
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")

    page.keyboard.press(str(key_pos + 1))  # pick on tile 1, advance to tile 2
    assert "tile 2 of 4" in progress.inner_text()
    page.keyboard.press("x")  # drop tile 2, advance to tile 3
    page.locator(f'#grid .cell[data-t="{click_t}"]').click()  # pick on tile 3, advance to tile 4
    assert "tile 4 of 4" in progress.inner_text()
    page.locator("#drop").click()  # drop tile 4 (the last: stays)
    assert progress.inner_text().startswith("4 / 4 reviewed")
    assert page.locator("#decision").inner_text() == "dropped"
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")  # back on tile 2
    assert page.locator("#decision").inner_text() == "dropped"
    page.keyboard.press("k")  # previous: tile 1
    assert page.locator("#decision").inner_text() == f"picked t={expected[tiles[0]['tile_id']]}"
    assert page.locator(f'#grid .cell.picked[data-t="{expected[tiles[0]["tile_id"]]}"]').count() == 1

    page.reload()  # decisions survive a reload (localStorage)
    assert progress.inner_text().startswith("4 / 4 reviewed")
    with page.expect_download() as download:
        page.locator("#export").click()
    assert download.value.suggested_filename == "corrections.json"
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported == expected
    assert list(exported) == [t["tile_id"] for t in tiles]  # in review order
    with page.expect_download() as by_key:
        page.keyboard.press("e")
    assert json.loads(Path(by_key.value.path()).read_text()) == expected

    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")  # tile 3 (a pick), for the screenshot
    shot = artifacts_dir(tmp_path) / "review_page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"review page screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    context.close()
    assert not errors, errors
    assert not outside, outside

    # the exported file, applied by the build
    corrections = tmp_path / "corrections.json"
    corrections.write_text(json.dumps(exported))
    rebuilt = str(tmp_path / "rebuilt")
    summary = build_pairs.run(["--input", root, "--output", rebuilt, "--runner", RUNNER, "--top-k", "4",
                               "--corrections", str(corrections)])
    assert summary["counts"]["rejects_by_reason"] == {"removed_by_correction": 2}
    pairs = {r["tile_id"]: r for r in pq.read_table(os.path.join(rebuilt, "pairs")).to_pylist()}
    for tile_id, value in expected.items():
        if value is None:
            assert tile_id not in pairs
        else:
            assert pairs[tile_id]["selection"] == "manual" and pairs[tile_id]["lr_index"] == value
    assert len(pairs) == N_TILES - 2
    assert urllib.parse.urlsplit(url).scheme == "file"


# ---------------------------------------------------------------------------------------------
# A --lr-timesteps N > 1 build: drop single timesteps of the N written, in the browser, and rebuild


N_WRITTEN = 4


@pytest.fixture(scope="module")
def built_multi(review_root, tmp_path_factory):
    """The review input built with --lr-timesteps 4 --allow-fewer (paper): the cloudier tiles have
    fewer than 4 acceptable timesteps and are written with those."""
    out = str(tmp_path_factory.mktemp("review-multi") / "out")
    summary = build_pairs.run(["--input", review_root, "--output", out, "--runner", RUNNER, "--top-k", "8",
                               "--selection", "paper", "--lr-timesteps", str(N_WRITTEN), "--allow-fewer"])
    assert summary["counts"]["pairs"] == N_TILES
    return review_root, out


def ranked_acceptable(root, tile_ids, n) -> dict[str, list[int]]:
    """Each tile's first n acceptable timesteps in the paper ranking: an automatic build's
    lr_indices with --lr-timesteps n --allow-fewer."""
    out = os.path.join(root + "-ranked", str(n))
    build_pairs.run(["--input", root, "--output", out, "--runner", RUNNER, "--top-k", "8",
                     "--selection", "paper", "--lr-timesteps", str(n), "--allow-fewer"])
    rows = {r["tile_id"]: r for r in pq.read_table(os.path.join(out, "pairs")).to_pylist()}
    return {t: rows[t]["lr_indices"] for t in tile_ids}


def test_review_of_a_multi_timestep_build_drops_timesteps_in_a_browser_then_rebuilds(browser, built_multi, tmp_path):
    root, out = built_multi
    page_dir = tmp_path / "page"
    review.run(["--run", out, "--output", str(page_dir), "--worst", str(N_TILES)])
    data = read_data_js(page_dir)
    assert data["lr_timesteps"] == N_WRITTEN
    tiles = data["tiles"]
    full = [t for t in tiles if len(t["lr_indices"]) == N_WRITTEN]
    short = [t for t in tiles if 1 < len(t["lr_indices"]) < N_WRITTEN]
    assert len(full) >= 2 and short, [len(t["lr_indices"]) for t in tiles]
    a, b, c = full[0], full[1], short[0]  # a: drop #2 and #3 by keyboard; b: drop #1 by click; c: drop #2
    position = {t["tile_id"]: i for i, t in enumerate(tiles)}

    context = browser.new_context(accept_downloads=True, viewport={"width": 1440, "height": 1100})
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://")
                  else route.abort())
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto((page_dir / "index.html").as_uri())

    def go_to(tile):
        page.evaluate(f"window.s2naipReview.go({position[tile['tile_id']]})")
        assert page.locator("h1").inner_text().endswith(tile["tile_id"])

    go_to(a)
    strip = page.locator("#written .wcell")
    assert strip.count() == N_WRITTEN
    assert [int(x) for x in strip.evaluate_all("cells => cells.map(c => c.dataset.t)")] == a["lr_indices"]
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    page.keyboard.press("Shift+Digit2")
    page.keyboard.press("Shift+Digit3")
    assert page.locator("h1").inner_text().endswith(a["tile_id"])  # a drop does not advance
    assert page.locator("#decision").inner_text() == (
        f"dropped t={min(a['lr_indices'][1:3])}, t={max(a['lr_indices'][1:3])} of {N_WRITTEN} written")
    assert page.locator("#written .wcell.dropped").count() == 2
    page.keyboard.press("Shift+Digit3")  # keep #3 again
    page.keyboard.press("Shift+Digit3")  # and drop it once more
    go_to(b)
    page.locator(f'#written .wcell[data-t="{b["lr_indices"][0]}"] button.step-drop').click()
    assert page.locator(f'#written .wcell.dropped[data-t="{b["lr_indices"][0]}"]').count() == 1
    assert page.locator(f'#grid .cell.step-dropped[data-t="{b["lr_indices"][0]}"]').count() == 1
    go_to(c)
    page.keyboard.press("Shift+Digit2")
    others = [t for t in tiles if t["tile_id"] not in (a["tile_id"], b["tile_id"], c["tile_id"])]
    go_to(others[0])
    page.keyboard.press("x")  # a tile drop still works
    assert "4 / 5 reviewed" in page.locator("#progress-text").inner_text()
    page.reload()  # drops survive a reload
    go_to(a)
    assert page.locator("#written .wcell.dropped").count() == 2
    assert page.locator(f'#tile-list .item.step-drops').count() == 3
    with page.expect_download() as download:
        page.keyboard.press("e")
    exported = json.loads(Path(download.value.path()).read_text())
    shot = artifacts_dir(tmp_path) / "review_page_multi.png"
    page.screenshot(path=str(shot), full_page=True)
    context.close()
    assert not errors, errors
    expected = {a["tile_id"]: {"drop": sorted(a["lr_indices"][1:3])}, b["tile_id"]: {"drop": [b["lr_indices"][0]]},
                c["tile_id"]: {"drop": [c["lr_indices"][1]]}, others[0]["tile_id"]: None}
    assert exported == expected

    # the exported file, applied by the build: each dropped timestep gone, the next acceptable ones in
    ranked = ranked_acceptable(root, list(expected), N_WRITTEN + 2)
    corrections_file = tmp_path / "corrections.json"
    corrections_file.write_text(json.dumps(exported))
    rebuilt = str(tmp_path / "rebuilt")
    summary = build_pairs.run(["--input", root, "--output", rebuilt, "--runner", RUNNER, "--top-k", "8",
                               "--selection", "paper", "--lr-timesteps", str(N_WRITTEN), "--allow-fewer", "--corrections", str(corrections_file)])
    assert summary["counts"]["rejects_by_reason"] == {"removed_by_correction": 1}
    pairs = {r["tile_id"]: r for r in pq.read_table(os.path.join(rebuilt, "pairs")).to_pylist()}
    before = {r["tile_id"]: r for r in pq.read_table(os.path.join(out, "pairs")).to_pylist()}
    assert others[0]["tile_id"] not in pairs
    for tile_id, value in expected.items():
        if value is None:
            continue
        row, drop = pairs[tile_id], value["drop"]
        assert not set(row["lr_indices"]) & set(drop)
        assert row["lr_indices"] == [t for t in ranked[tile_id] if t not in drop][:N_WRITTEN]
        first_dropped = before[tile_id]["lr_index"] in drop
        assert row["selection"] == ("manual" if first_dropped else "paper")
        assert row["lr_index"] == row["lr_indices"][0]
        assert (row["hr"] == before[tile_id]["hr"]) == (not first_dropped)  # the HR follows the first
    assert len(pairs[a["tile_id"]]["lr_indices"]) == N_WRITTEN  # replaced by the next acceptable ones
    assert len(pairs[c["tile_id"]]["lr_indices"]) == len(c["lr_indices"]) - 1  # none left: --allow-fewer
    # without --allow-fewer the short tile is a too_few_timesteps reject, the others as above
    strict = build_pairs.run(["--input", root, "--output", str(tmp_path / "strict"), "--runner", RUNNER,
                              "--top-k", "8", "--selection", "paper", "--lr-timesteps", str(N_WRITTEN), "--corrections", str(corrections_file)])
    rejects = {r["tile_id"]: r["reason"] for r in pq.read_table(str(tmp_path / "strict" / "rejects")).to_pylist()}
    assert rejects[c["tile_id"]] == "too_few_timesteps" and rejects[others[0]["tile_id"]] == "removed_by_correction"
    assert strict["counts"]["pairs"] == sum(len(ranked[t]) >= N_WRITTEN + len(v["drop"]) for t, v in expected.items()
                                            if v) + sum(len(t["lr_indices"]) == N_WRITTEN for t in others[1:])
