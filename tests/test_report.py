"""`s2naip report`: streamed statistics equal the exact ones, the figures and the HTML page, the
sample by tile id, and a 100k-pair output in bounded memory without reading its images."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import build_pairs, report
from tests.tile_factory import NAIP_ID, scene, series_from, write_tile
from transforms.quality import report_figures, report_page
from transforms.records import PAIR_SCHEMA

RUNNER = "FnApiRunner"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sample_build(tmp_path_factory):
    """The embedded sample (60 tiles: every kind of reject, clouds, swath edges) built once."""
    out = str(tmp_path_factory.mktemp("report") / "out")
    summary = build_pairs.run(["--output", out, "--runner", RUNNER, "--sample-tiles", "60"])
    return out, summary


@pytest.fixture(scope="module")
def robust_build(tmp_path_factory):
    """The same sample built with --selection robust, whose scores reach beyond the paper's [0, 2]."""
    out = str(tmp_path_factory.mktemp("report-robust") / "out")
    summary = build_pairs.run(["--output", out, "--runner", RUNNER, "--sample-tiles", "60", "--selection", "robust"])
    return out, summary


def _png_size(data: bytes) -> tuple[int, int]:
    import io

    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return im.size


def test_streamed_stats_equal_exact_ones(sample_build):
    out, _ = sample_build
    stats = report_figures.collect_stats(out, samples=5, seed=1)
    table = pq.read_table(os.path.join(out, "pairs"), columns=list(report_figures.STAT_COLUMNS)).to_pylist()
    assert stats.pairs == len(table)
    psnr = np.array([r["psnr"] for r in table])
    assert stats.summary()["psnr"]["median"] == pytest.approx(np.median(psnr), abs=0.1)
    assert stats.summary()["psnr"]["min"] == pytest.approx(psnr.min())
    assert stats.below_review == int((psnr < 20).sum())
    valid = np.bincount([len(r["valid_indices"]) for r in table], minlength=len(stats.valid_counts))
    np.testing.assert_array_equal(stats.valid_counts, valid)
    assert stats.chosen_score_counts.sum() == len(table)
    others = [s for r in table for t, s in zip(r["candidate_indices"], r["candidate_scores"]) if t != r["lr_index"]]
    assert stats.other_score_counts.sum() == len(others)
    assert np.argmax(stats.other_score_counts) == np.argmax(report_figures._histogram(np.array(others),
                                                                                      stats.score_edges))
    # the sample is picked by tile id: the same whatever the order rows come in, another seed differs
    ids = [r.tile_id for r in stats.samples()]
    again = report_figures.PairStats(samples=5, seed=1)
    full = pq.read_table(os.path.join(out, "pairs"), columns=list(report_figures.STAT_COLUMNS))
    again.add(full.take(np.arange(full.num_rows)[::-1]))
    assert [r.tile_id for r in again.samples()] == ids and len(set(ids)) == 5
    assert [r.tile_id for r in report_figures.collect_stats(out, samples=5, seed=2).samples()] != ids


def test_report_page_and_figures(sample_build, tmp_path):
    out, summary = sample_build
    dest = tmp_path / "report"
    result = report.run(["--run", out, "--output", str(dest), "--samples", "4"])
    assert result["counts"] == summary["counts"]
    for name in report_page.FIGURES:
        data = (dest / name).read_bytes()
        width, height = _png_size(data)
        assert width >= 500 and height >= 250, name
    assert _png_size((dest / "sample_pairs.png").read_bytes())[0] > _png_size(
        (dest / "sample_pairs.png").read_bytes())[1] * 0.6  # 6 image columns
    page = (dest / "index.html").read_text()
    # each chart once on the page; the overview (the first four on one image) only linked
    images = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(images) == sorted(set(report_page.FIGURES) - {"overview.png"}) and len(images) == 6
    assert 'href="overview.png"' in page and 'src="overview.png"' not in page
    for reason, n in summary["counts"]["rejects_by_reason"].items():
        assert re.search(rf"<code>{reason}</code></td><td class=n>{n:,}</td>", page), reason
    assert "http://" not in page and "https://" not in page
    stats = json.loads((dest / "stats.json").read_text())
    assert stats["pairs"]["pairs"] == summary["counts"]["pairs"] and len(stats["samples"]) == 4


def test_report_of_a_bucket_written_to_a_bucket(gcs_env, sample_build, tmp_path):
    out, summary = sample_build
    gcs_env.bucket("reports")
    gcs_env.upload_tree(out, "gs://reports/build")
    result = report.run(["--run", "gs://reports/build", "--output", "gs://reports/r1", "--samples", "3"])
    assert result["counts"] == summary["counts"] and result["index"] == "gs://reports/r1/index.html"
    names = gcs_env.list("gs://reports/r1/")
    for name in (*report_page.FIGURES, "index.html", "stats.json"):
        assert f"gs://reports/r1/{name}" in names, names
    local = report.run(["--run", out, "--output", str(tmp_path / "local"), "--samples", "3"])
    assert json.loads(gcs_env.read_bytes("gs://reports/r1/stats.json"))["pairs"] == local["pairs"]


def test_report_of_an_rgb_build_and_a_moved_input(tmp_path):
    root = str(tmp_path / "in")
    for i in range(3):
        rng = np.random.default_rng(i)
        hr = scene(rng)
        write_tile(root, f"{NAIP_ID}/{39000 + i}_59000", hr, series_from(hr, rng, 6), nir=False, b08=False)
    out = str(tmp_path / "out")
    build_pairs.run(["--input", root, "--output", out, "--runner", RUNNER, "--bands", "rgb"])
    dest = tmp_path / "report"
    report.run(["--run", out, "--output", str(dest)])
    three_columns = _png_size((dest / "sample_pairs.png").read_bytes())
    os.rename(root, root + "-moved")  # the grids fall back to what the output holds
    report.run(["--run", out, "--output", str(tmp_path / "report2")])
    assert _png_size((tmp_path / "report2" / "sample_pairs.png").read_bytes())[0] == pytest.approx(
        three_columns[0], rel=0.1)
    assert (tmp_path / "report2" / "sample_timesteps.png").exists()


def write_synthetic_output(out: str, n: int, row_group: int = 450) -> None:
    """A pairs folder of `n` rows with full-size (zero) images, as a large build would hold."""
    os.makedirs(os.path.join(out, "pairs"), exist_ok=True)
    rng = np.random.default_rng(0)
    hr, lr = bytes(128 * 128 * 4), bytes(32 * 32 * 4)
    writer = pq.ParquetWriter(os.path.join(out, "pairs", "pairs-00000-of-00001.parquet"), PAIR_SCHEMA,
                              compression="zstd", use_dictionary=False)
    for start in range(0, n, 2000):
        m = min(2000, n - start)
        k = rng.integers(8, 40, m)
        cols = {
            "tile_id": [f"{NAIP_ID}/{i % 100000}_{i // 100000}" for i in range(start, start + m)],
            "naip_id": [NAIP_ID] * m, "tile_x": [i % 100000 for i in range(start, start + m)],
            "tile_y": [i // 100000 for i in range(start, start + m)], "zoom": [17] * m, "split": ["big"] * m,
            "hr": [hr] * m, "lr": [lr] * m, "hr_shape": [[128, 128, 4]] * m, "lr_shape": [[32, 32, 4]] * m,
            "lr_index": [0] * m, "n_timesteps": (k + 3).tolist(), "valid_indices": [list(range(x)) for x in k],
            "candidate_indices": [list(range(min(16, x))) for x in k],
            "candidate_psnr": [np.linspace(30, 20, min(16, x)).tolist() for x in k],
            "candidate_scores": [np.linspace(0.05, 0.5, min(16, x)).tolist() for x in k],
            "psnr": rng.normal(25, 3, m).tolist(), "score": [0.05] * m, "selection": ["paper"] * m,
            "alpha": [0.7] * m, "pipeline_version": ["test"] * m,
        }
        cols.update({f.name: [None] * m for f in PAIR_SCHEMA if f.name not in cols})  # nullable extras
        writer.write_table(pa.table(cols, schema=PAIR_SCHEMA), row_group_size=row_group)
    writer.close()


def test_only_the_sampled_row_groups_are_read_with_images(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    write_synthetic_output(out, 6000, row_group=500)
    reads = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kwargs):
        reads.append((i, tuple(columns or ())))
        return original(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    result = report.run(["--run", out, "--output", str(tmp_path / "report"), "--samples", "3",
                         "--timestep-samples", "0"])
    assert result["pairs"]["pairs"] == 6000
    with_images = [r for r in reads if "hr" in r[1] or "lr" in r[1]]
    without = [r for r in reads if r not in with_images]
    assert len(without) == 12  # the stats pass: every row group, no image column
    assert 1 <= len(with_images) <= 3  # only the groups holding the 3 sampled tiles


def test_report_of_100k_pairs_in_bounded_memory(tmp_path):
    """A 100k-pair output holds 6.9 GB of images; the report reads none but the sample's and stays
    far below that (peak RSS of its process, imports included)."""
    out = str(tmp_path / "big")
    write_synthetic_output(out, 100_000)
    # VmHWM: the peak RSS of this process image (ru_maxrss would include the forking pytest's)
    script = textwrap.dedent(f"""
        import json, re, time
        from pipelines import report
        started = time.monotonic()
        result = report.run(["--run", {out!r}, "--output", {str(tmp_path / "report")!r}])
        hwm_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
        print(json.dumps({{"pairs": result["pairs"]["pairs"], "seconds": round(time.monotonic() - started, 1),
                          "max_rss_mb": round(hwm_kb / 1024)}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"report of 100k pairs: {measured}")
    assert measured["pairs"] == 100_000
    assert measured["max_rss_mb"] < 700, measured  # ~370 MB, of which ~200 MB are the imports
    stats = json.loads((tmp_path / "report" / "stats.json").read_text())
    assert stats["pairs"]["psnr"]["median"] == pytest.approx(25, abs=0.2)
    assert stats["pairs"]["valid_timesteps"]["min"] == 8 and stats["pairs"]["valid_timesteps"]["max"] == 39


# ---------------------------------------------------------------------------------------------
# The figures' content, against the output read independently


def _axes():
    from matplotlib.figure import Figure

    return Figure().add_subplot()


def _bars(ax):
    from matplotlib.patches import Rectangle

    return [p for p in ax.patches if isinstance(p, Rectangle)]


def _pixels_of(png: bytes, hex_color: str, tol: int = 6) -> int:
    import io

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    want = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - want).max(axis=-1) <= tol).sum())


def test_figures_draw_the_outputs_counts(sample_build):
    out, summary = sample_build
    table = pq.read_table(os.path.join(out, "pairs"), columns=["psnr", "valid_indices", "n_timesteps"]).to_pylist()
    reasons = pq.read_table(os.path.join(out, "rejects"), columns=["reason"]).column("reason").to_pylist()
    stats = report_figures.collect_stats(out)
    # rejects: one bar per reason, its length the number of reject rows of that reason
    rejects = {r: reasons.count(r) for r in set(reasons)}
    ax = _axes()
    report_figures._draw_rejects(ax, rejects, summary["counts"]["tiles"])
    drawn = {label.get_text(): bar.get_width() for label, bar in zip(ax.get_yticklabels(), _bars(ax))}
    assert drawn == rejects and len(rejects) >= 3
    # PSNR: the bars are a histogram of the pairs' PSNR over the drawn bins
    psnr = np.array([r["psnr"] for r in table])
    ax = _axes()
    report_figures._draw_psnr(ax, stats)
    bars = _bars(ax)
    edges = [b.get_x() for b in bars]
    step = edges[1] - edges[0]
    expected, _ = np.histogram(psnr, bins=np.append(edges, edges[-1] + step))
    assert [b.get_height() for b in bars] == expected.tolist()
    assert sum(b.get_height() for b in bars) == len(table)
    # valid timesteps: a bar per count of valid timesteps, the number of pairs with it
    ax = _axes()
    report_figures._draw_valid(ax, stats)
    valid = np.bincount([len(r["valid_indices"]) for r in table])
    drawn = {int(round(b.get_x())): b.get_height() for b in _bars(ax) if b.get_height()}
    assert drawn == {n: c for n, c in enumerate(valid.tolist()) if c}
    # scores: each series is a density (area 1)
    ax = _axes()
    report_figures._draw_scores(ax, stats)
    bars = _bars(ax)
    by_color = {}
    for b in bars:
        by_color.setdefault(b.get_facecolor()[:3], 0.0)
        by_color[b.get_facecolor()[:3]] += b.get_height() * b.get_width()
    assert len(by_color) == 2 and all(area == pytest.approx(1.0, abs=0.01) for area in by_color.values())


def test_figure_pixels_show_the_counts():
    """In the PNGs themselves: bar lengths in pixels follow the counts; no reject, no reject colour."""
    png = report_figures.rejects_by_reason({"decode_error": 10, "no_valid_timesteps": 40}, 100)
    rgb = np.asarray(Image.open(__import__("io").BytesIO(png)).convert("RGB")).astype(int)
    want = np.array([int(report_figures.COLORS["reject"][i:i + 2], 16) for i in (1, 3, 5)])
    mask = np.abs(rgb - want).max(axis=-1) <= 6
    rows = mask.sum(axis=1)
    lengths = sorted({int(n) for n in rows if n > 0})
    assert lengths[-1] == pytest.approx(4 * lengths[0], rel=0.05), lengths  # 40 vs 10
    assert _pixels_of(report_figures.rejects_by_reason({}, 100), report_figures.COLORS["reject"]) == 0


def test_score_histogram_label_and_range_follow_the_selection_mode(robust_build, tmp_path):
    """A robust build's scores go beyond the paper's [0, 2]: its histogram is labelled with the
    robust score and covers them, and the page says so; paper and companion keep [0, 2]."""
    out, summary = robust_build
    assert summary["options"]["selection"] == "robust"
    table = pq.read_table(os.path.join(out, "pairs"), columns=["score", "candidate_scores"]).to_pylist()
    scores = np.array([r["score"] for r in table] + [s for r in table for s in r["candidate_scores"]])
    robust = report_figures.collect_stats(out, samples=0, mode="robust")
    assert robust.score_max == 16.0 and robust.scores_above == 0
    assert robust.score_max_seen == pytest.approx(scores.max())
    beyond_two = int(np.searchsorted(robust.score_edges, 2.0))
    n_beyond = int((scores >= 2.0 + report_figures.SCORE_BIN).sum())
    held = int(robust.chosen_score_counts[beyond_two:].sum() + robust.other_score_counts[beyond_two:].sum())
    assert held >= n_beyond  # nothing piled into a last bin at 2.0
    paper = report_figures.collect_stats(out, samples=0, mode="paper")
    assert paper.score_max == 2.0 and paper.scores_above == int((scores > 2.0).sum())
    assert "SSIM" in paper.score_label and "penalty" not in paper.score_label
    assert robust.score_label.startswith(paper.score_label + " + evidence penalty")  # 0.3: the paper's distance
    assert "SSIM" in report_figures.score_scale("companion")[0]

    dest = tmp_path / "report"
    report.run(["--run", out, "--output", str(dest), "--samples", "2", "--timestep-samples", "1"])
    page = (dest / "index.html").read_text()
    caption = re.search(r'<img src="score_distribution.png"[^>]*><figcaption>([^<]*)', page).group(1)
    assert "SSIM(HR, LR)" in caption and "evidence penalty" in caption and "range 0 to 16" in caption
    # the paper's formula alone labels no chart of a robust build: it always carries the penalty
    assert page.count(paper.score_label) == page.count(paper.score_label + " + evidence penalty") > 0
    stats = json.loads((dest / "stats.json").read_text())["pairs"]["scores"]
    assert stats["mode"] == "robust" and stats["range"] == [0.0, 16.0] and stats["above_range"] == 0
    assert stats["max"] == pytest.approx(scores.max())
