"""Outputs that travel: run.json records absolute paths (report and review work from any folder),
the build's summary names every folder it wrote and where the embedded sample went, and a review or
report that would show nothing is a one-line error instead of an empty page."""
from __future__ import annotations

import json
import os
import re

import pytest

from pipelines import build_pairs, report, review

RUNNER = "FnApiRunner"
TILES = 16


@pytest.fixture(scope="module")
def relative_build(tmp_path_factory):
    """The embedded sample built from a working folder with a relative --output, in two formats."""
    base = tmp_path_factory.mktemp("travel")
    cwd = os.getcwd()
    os.chdir(base)
    try:
        import io
        from contextlib import redirect_stdout

        stdout = io.StringIO()
        with redirect_stdout(stdout):
            summary = build_pairs.run(["--output", "out/run", "--runner", RUNNER, "--sample-tiles", str(TILES),
                                       "--format", "parquet,tfrecord"])
    finally:
        os.chdir(cwd)
    return base, summary, stdout.getvalue()


def test_run_json_records_absolute_paths(relative_build):
    base, summary, _ = relative_build
    info = json.loads((base / "out" / "run" / "run.json").read_text())
    assert info["output"] == str(base / "out" / "run")
    assert info["input"] == str(base / "out" / "run-sample-input")
    assert os.path.isabs(info["input"]) and os.path.isabs(info["output"])
    assert summary["input"] == info["input"]


def test_absolute_keeps_urls():
    from transforms.io.storage import absolute

    assert absolute("gs://bucket/set") == "gs://bucket/set"
    assert absolute(None) is None
    assert absolute("a/b") == os.path.join(os.getcwd(), "a", "b")


def test_summary_names_every_folder_written_and_the_sample(relative_build):
    base, summary, stdout = relative_build
    out = base / "out" / "run"
    assert f"generating the embedded sample ({TILES} tiles) in {base / 'out' / 'run-sample-input'}" in stdout
    for folder in ("pairs", "tfrecord", "rejects", "manifest"):
        assert (out / folder).is_dir()
        assert f"{folder}:" in stdout and f"{out / folder}/" in stdout, folder
    print(stdout)
    assert "\npng" not in stdout and re.search(rf"\nsummary: +{re.escape(str(out / 'run.json'))}\n", stdout)


def test_summary_text_lists_png_folders():
    summary = {"output": "gs://b/run", "formats": ["png"], "since": None,
               "counts": {"tiles": 3, "pairs": 2, "rejects": 1, "rejects_by_reason": {"missing_hr": 1},
                          "png": {"pairs": 2, "rejects_by_reason": {}, "black_pixel_tiles": 1}}}
    text = build_pairs.summary_text(summary)
    assert "png:" in text and "gs://b/run/png/" in text and "gs://b/run/png_rejects/" in text
    assert "gs://b/run/pairs/" not in text  # parquet was not written
    assert "rejected       1  missing_hr" in text and "1 of them with a pure-black HR pixel" in text
    increment = {"new": 1, "changed": 2, "unchanged": 5, "processed": 3, "carried": 5, "carry_missing": 0,
                 "superseded": 1, "removed": 4}
    text = build_pairs.summary_text({**summary, "since": "gs://b/v1", "incremental": increment})
    assert "incremental: new 1, changed 2, carried 5, superseded 1, removed 4 (since gs://b/v1)" in text


def test_report_and_review_from_another_folder(relative_build, tmp_path, monkeypatch, capsys):
    base, summary, _ = relative_build
    monkeypatch.chdir(tmp_path)  # not where the build ran: run.json's relative paths would not resolve
    run = str(base / "out" / "run")
    report.run(["--run", run, "--output", "report", "--samples", "3"])
    assert "unreadable" not in capsys.readouterr().out
    result = review.run(["--run", run, "--output", "review", "--worst", "3"])
    assert result["on_page"] == 3 and result["unreadable"] == 0


def test_review_with_no_readable_tile_is_an_error(relative_build, tmp_path):
    base, _, _ = relative_build
    run = str(base / "out" / "run")
    empty = tmp_path / "empty-input"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"none of the 5 selected tiles could be read from the input") as e:
        review.run(["--run", run, "--output", str(tmp_path / "page"), "--worst", "5", "--input", str(empty)])
    assert "\n" not in str(e.value.code) and e.value.code != 0
    assert not (tmp_path / "page" / "index.html").exists()


def test_review_that_selects_nothing_is_an_error(relative_build, tmp_path):
    base, _, _ = relative_build
    run = str(base / "out" / "run")
    with pytest.raises(SystemExit, match=r"nothing to review: no pair has psnr_rgb below 0 \(\d+ ranked\)"):
        review.run(["--run", run, "--output", str(tmp_path / "page"), "--threshold", "0"])
    assert not (tmp_path / "page").exists()


def test_report_and_review_of_an_empty_run_are_errors(tmp_path):
    """A run with empty tables (0 pairs, 0 rejects, no run.json): no page that shows nothing."""
    import pyarrow.parquet as pq

    from transforms.records import PAIR_SCHEMA, REJECT_SCHEMA

    for name, schema in (("pairs", PAIR_SCHEMA), ("rejects", REJECT_SCHEMA)):
        (tmp_path / "notarun" / name).mkdir(parents=True)
        pq.write_table(schema.empty_table(), tmp_path / "notarun" / name / f"{name}-00000-of-00001.parquet")
    with pytest.raises(SystemExit, match="nothing to report") as e:
        report.run(["--run", str(tmp_path / "notarun"), "--output", str(tmp_path / "r"), "--input", str(tmp_path)])
    assert e.value.code != 0 and not (tmp_path / "r" / "index.html").exists()
    with pytest.raises(SystemExit, match="holds no pairs to review"):
        review.run(["--run", str(tmp_path / "notarun"), "--output", str(tmp_path / "p"), "--worst", "5",
                    "--input", str(tmp_path)])
