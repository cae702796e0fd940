"""Progress of a local build (`transforms.progress`): worker processes count into a folder, the
launcher prints done/total, %, rate and ETA from it, in multi_processing too."""
from __future__ import annotations

import multiprocessing
import os
import re
import time

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import build_pairs
from transforms import progress


def _count_in_a_process(folder: str, listed: int, done: int) -> None:
    for _ in range(listed):
        progress.add(folder, "listed")
    for _ in range(done):
        progress.add(folder, "done")
    progress.flush(folder)


def test_counts_of_several_processes_add_up(tmp_path):
    context = multiprocessing.get_context("spawn")  # fresh interpreters, as Beam's workers are
    procs = [context.Process(target=_count_in_a_process, args=(str(tmp_path), 100, n)) for n in (30, 45)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert progress.read(str(tmp_path)) == {"listed": 200, "done": 75}
    assert len(list(tmp_path.glob("*.json"))) == 2 and not list(tmp_path.glob("*.tmp"))


def test_a_worker_without_the_folder_counts_nothing(tmp_path):
    missing = str(tmp_path / "not-on-this-machine")
    progress.add(missing, "done")
    progress.flush(missing)
    assert not (tmp_path / "not-on-this-machine").exists()
    assert progress.read(missing) == {"listed": 0, "done": 0}


def test_progress_line():
    assert progress.progress_line(1500, 0, None, 4) == "progress: 1,500 tile ids listed (0:04 elapsed)"
    line = progress.progress_line(2000, 500, 25.0, 70)
    assert line == "progress: 500/2,000 tiles (25.0%), 25.0 tiles/s, ETA 1:00 (1:10 elapsed)"
    assert progress.progress_line(10, 5, None, 3600 * 2 + 5) == "progress: 5/10 tiles (50.0%) (2:00:05 elapsed)"
    assert progress.duration(3 * 3600 + 61) == "3:01:01"


def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_reporter_prints_total_percent_rate_and_eta(tmp_path, capsys):
    folder = str(tmp_path)
    reporter = progress.ProgressReporter(folder, every_s=0.1, poll_s=0.05)
    with reporter:
        progress.add(folder, "listed", 1000)
        progress.flush(folder)
        _wait_for(lambda: any("1,000 tile ids listed" in line for line in reporter.lines))
        for _ in range(40):  # records made while the reporter polls
            progress.add(folder, "done", 10)
            progress.flush(folder)
            time.sleep(0.02)
        _wait_for(lambda: any("ETA" in line for line in reporter.lines))
    lines = reporter.lines
    match = re.search(r"progress: ([\d,]+)/1,000 tiles \(([\d.]+)%\), ([\d.,]+) tiles/s, ETA (\d+:\d\d)",
                      "\n".join(lines))
    assert match and float(match.group(3).replace(",", "")) > 0
    done = int(match.group(1).replace(",", ""))
    assert float(match.group(2)) == pytest.approx(100 * done / 1000, abs=0.05)
    assert lines[-1].startswith("progress: 400/1,000 tiles in ")
    assert capsys.readouterr().err.splitlines()[-1] == lines[-1]  # printed on stderr


def test_only_local_runners_report():
    assert build_pairs.runs_on_this_machine(PipelineOptions(["--runner", "FnApiRunner"]))
    assert build_pairs.runs_on_this_machine(PipelineOptions(["--runner", "DirectRunner",
                                                             "--direct_running_mode=multi_processing"]))
    assert build_pairs.runs_on_this_machine(PipelineOptions(["--runner", "FlinkRunner", "--environment_type=LOOPBACK"]))
    assert not build_pairs.runs_on_this_machine(PipelineOptions(["--runner", "DataflowRunner"]))
    assert not build_pairs.runs_on_this_machine(PipelineOptions(["--runner", "FlinkRunner",
                                                                 "--environment_type=EXTERNAL"]))


def test_multi_processing_build_reports_progress(tmp_path, monkeypatch, capsys):
    """The workers are other processes: the launcher's lines still count every tile."""
    from transforms.devdata.sample import generate_sample

    monkeypatch.setattr(progress, "REPORT_EVERY_S", 0.5)
    folders = []

    class Reporter(progress.ProgressReporter):
        def __init__(self, folder, *args, **kwargs):
            folders.append(folder)
            super().__init__(folder, *args, **kwargs)

    monkeypatch.setattr(progress, "ProgressReporter", Reporter)
    generate_sample(str(tmp_path / "in"), 24, seed=0, extra_bands=True)
    summary = build_pairs.run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                               "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    err = capsys.readouterr().err
    assert summary["counts"]["tiles"] == 24
    assert re.search(r"^progress: 24/24 tiles in \d+:\d\d, [\d.]+ tiles/s overall$", err, re.M), err[-2000:]
    assert re.search(r"^progress: 24 tile ids listed", err, re.M) or re.search(r"^progress: \d+/24 tiles", err, re.M)
    assert len(folders) == 1 and not os.path.exists(folders[0])  # removed after the build
