"""A new user's mistakes, through the `s2naip` command line: each ends in one line on stderr and a
non-zero exit, with nothing published (no _SUCCESS, no shards, no beam-temp-* files, often no
output folder at all); --help shows every option; --debug shows the traceback."""
from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import cli
from pipelines.options import BuildOptions, parse_build_options
from transforms.build.stages import manifest_lines_to_ids
from transforms.devdata.sample import generate_sample
from transforms.tiles import manifest_line_id

REPO = Path(__file__).resolve().parent.parent
LAYOUT = "naip/<naip_id>/<x>_<y>/rgb.png"


def s2naip(*args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


def one_line_error(proc: subprocess.CompletedProcess, exit_code: int, command: str = "build") -> str:
    """The single stderr line of a failed command."""
    assert proc.returncode == exit_code, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"s2naip {command}: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Every file and folder under `folder` (the folder itself included) if it exists."""
    if not folder.exists():
        return []
    return [str(folder)] + sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def beam_temp_anywhere(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("beam-temp-*"))


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory) -> Path:
    """A two-tile S2-NAIP set folder."""
    root = tmp_path_factory.mktemp("set") / "train_set"
    generate_sample(str(root), 2, seed=1)
    return root


def first_tile(root: Path) -> tuple[str, Path]:
    naip_id = sorted(p.name for p in (root / "naip").iterdir())[0]
    xy = sorted(p.name for p in (root / "naip" / naip_id).iterdir())[0]
    return f"{naip_id}/{xy}", root / "naip" / naip_id / xy


# ---------------------------------------------------------------------------------------------
# Wrong input: checked before the pipeline starts


@pytest.mark.parametrize("case", ["missing", "text_file", "png_file", "naip_subfolder", "empty_folder"])
def test_wrong_input_is_one_line_before_anything_runs(case, sample_set, tmp_path):
    _, tile_dir = first_tile(sample_set)
    (tmp_path / "notes.txt").write_text("not a set\n")
    (tmp_path / "empty").mkdir()
    given = {
        "missing": tmp_path / "nowhere",
        "text_file": tmp_path / "notes.txt",
        "png_file": tile_dir / "rgb.png",
        "naip_subfolder": sample_set / "naip",
        "empty_folder": tmp_path / "empty",
    }[case]
    out = tmp_path / "out"
    line = one_line_error(s2naip("build", "--input", given, "--output", out, cwd=tmp_path), 1)
    assert f"--input {given}" in line and LAYOUT in line
    assert {"missing": "does not exist", "text_file": "is a file", "png_file": "is a file",
            "naip_subfolder": f"pass the set folder above it ({sample_set})",
            "empty_folder": "empty folder"}[case] in line
    assert leftovers(out) == []


@pytest.mark.parametrize("value", ["0", "-5"])
def test_sample_tiles_must_be_positive(value, tmp_path):
    out = tmp_path / "out"
    line = one_line_error(s2naip("build", "--output", out, "--sample-tiles", value, cwd=tmp_path), 2)
    assert f"--sample-tiles must be >= 1, got {value}" in line
    assert leftovers(out) == [] and leftovers(tmp_path / "out-sample-input") == []


def test_index_of_a_missing_folder_writes_no_manifest(tmp_path):
    manifest = tmp_path / "ids.txt"
    line = one_line_error(s2naip("index", "--input", tmp_path / "nowhere", "--manifest", manifest, cwd=tmp_path),
                          1, "index")
    assert "does not exist" in line and LAYOUT in line
    assert not manifest.exists()


# ---------------------------------------------------------------------------------------------
# Wrong input the checks cannot see: the pipeline itself fails on zero tiles, and publishes nothing


@pytest.fixture
def hollow_set(tmp_path) -> Path:
    """naip/ holds a capture folder without tiles: passes the one-level check, lists no tile."""
    root = tmp_path / "hollow"
    (root / "naip" / "m_2608301_nw_17_060_20200522").mkdir(parents=True)
    (root / "sentinel2").mkdir()
    return root


def test_a_build_that_reads_no_tile_fails_and_publishes_nothing(hollow_set, tmp_path):
    out = tmp_path / "out"
    line = one_line_error(s2naip("build", "--input", hollow_set, "--output", out, cwd=tmp_path), 1)
    assert "no tile id read" in line and LAYOUT in line and str(hollow_set) in line
    assert leftovers(out) == []  # no _SUCCESS, run.json, empty shards or beam-temp-*


def test_a_manifest_of_comments_only_fails_and_publishes_nothing(sample_set, tmp_path):
    manifest = tmp_path / "ids.txt"
    manifest.write_text("# tile ids to build\n\n   # none yet\n")
    out = tmp_path / "out"
    line = one_line_error(s2naip("build", "--input", sample_set, "--output", out, "--manifest", manifest,
                                 cwd=tmp_path), 1)
    assert f"no tile id read from the manifest {manifest}" in line
    assert leftovers(out) == []


def test_index_that_lists_no_tile_fails_and_writes_no_manifest(hollow_set, tmp_path):
    manifest = tmp_path / "ids.txt"
    line = one_line_error(s2naip("index", "--input", hollow_set, "--manifest", manifest, cwd=tmp_path), 1, "index")
    assert "no tile id read" in line
    assert not manifest.exists()


# ---------------------------------------------------------------------------------------------
# Options


def test_a_misspelt_option_stops_the_build_before_it_runs(sample_set, tmp_path):
    out = tmp_path / "out"
    line = one_line_error(s2naip("build", "--input", sample_set, "--output", out, "--selecton", "paper",
                                 cwd=tmp_path), 2)
    assert "unknown option --selecton (did you mean --selection?)" in line
    assert leftovers(out) == []
    line = one_line_error(s2naip("build", "--input", sample_set, "--output", out, "--runer=DataflowRunner",
                                 cwd=tmp_path), 2)
    assert "did you mean --runner?" in line
    line = one_line_error(s2naip("build", "--input", sample_set, "--output", out, "--alpha", "high", cwd=tmp_path), 2)
    assert "--alpha" in line and "'high'" in line
    assert leftovers(out) == []


def test_beam_options_stay_accepted():
    options = parse_build_options([
        "--output=o", "--selection=paper", "--runner=FnApiRunner", "--direct_num_workers=2",
        "--direct_running_mode=multi_threading", "--experiments=a", "--experiments=b", "--project=p",
        "--region=us-central1", "--temp_location=gs://b/tmp", "--sdk_container_image=img", "--num_workers=3",
        "--max_num_workers", "5", "--machine_type=n2-standard-4", "--save_main_session", "--job_name=j",
    ])
    assert options.view_as(BuildOptions).selection == "paper"
    assert options.get_all_options()["direct_num_workers"] == 2
    with pytest.raises(cli.CommandError, match="unexpected argument stray"):
        parse_build_options(["--output=o", "stray"])


def test_build_help_shows_every_option_grouped_with_defaults(tmp_path):
    proc = s2naip("build", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    parser = argparse.ArgumentParser()
    BuildOptions._add_argparse_args(parser)
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text, option
    positions = [text.index(f"\n{title}:\n") for title in ("input", "selection", "output", "cloud / runner")]
    assert positions == sorted(positions)
    for shown in ("(default: 16)", "(default: 0.7)", "(default: parquet)", "(default: 200)", "--runner",
                  "--direct_running_mode", "--project", "--region", "--temp_location", "--max_num_workers",
                  "--sdk_container_image", "--debug"):
        assert shown in text, shown
    assert "gap-free correlation" in text  # robust ranks its top-k by it, not by PSNR
    module = subprocess.run([sys.executable, "-m", "pipelines.build_pairs", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert module.returncode == 0 and module.stdout == text


def _parsers_of(command: str, monkeypatch, capsys) -> list[argparse.ArgumentParser]:
    """The parsers `s2naip <command> --help` formats (recorded in format_help)."""
    seen = []
    real = argparse.ArgumentParser.format_help

    def record(parser):
        seen.append(parser)
        return real(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "format_help", record)
    with pytest.raises(SystemExit) as exit_info:
        __import__(cli.SUBCOMMANDS[command][0], fromlist=["main"]).main(["--help"])
    assert exit_info.value.code in (0, None)
    assert capsys.readouterr().out.startswith("usage:")
    return seen


@pytest.mark.parametrize("command", list(cli.SUBCOMMANDS))
def test_every_command_help_is_complete(command, monkeypatch, capsys):
    (parser,) = _parsers_of(command, monkeypatch, capsys)
    description = " ".join((parser.description or "").split())
    assert description.endswith((".", ")")), (command, description)  # a sentence, not its first line only
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and action.help.strip(), (command, action.option_strings)
            assert not action.help.rstrip().endswith((",", " the", " a", " and", " or")), (command, action.help)


# ---------------------------------------------------------------------------------------------
# Failures at the command line's boundary


def test_unwritable_output_is_one_line_before_the_pipeline(sample_set, tmp_path):
    if os.geteuid() == 0:  # root writes through permissions: procfs refuses new files to anyone
        out = Path("/proc/s2naip-no-such-output")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = locked / "out"
    line = one_line_error(s2naip("build", "--input", sample_set, "--output", out, cwd=tmp_path), 1)
    assert f"--output {out} is not writable" in line
    assert not out.exists()


@pytest.mark.parametrize("option", ["--manifest", "--corrections"])
def test_missing_manifest_or_corrections_is_one_line_and_writes_nothing(option, sample_set, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / ("ids.txt" if option == "--manifest" else "corrections.json")
    line = one_line_error(s2naip("build", "--input", sample_set, "--output", out, option, missing, cwd=tmp_path), 1)
    assert line.endswith(f"{option} not found: {missing}")
    assert leftovers(out) == [] and beam_temp_anywhere(tmp_path) == []


def test_sample_into_a_file_is_one_line(tmp_path):
    target = tmp_path / "taken.png"
    target.write_bytes(b"x")
    line = one_line_error(s2naip("sample", "--output", target, "--tiles", "2", cwd=tmp_path), 2, "sample")
    assert f"--output {target} is a file" in line
    assert target.read_bytes() == b"x"


@pytest.mark.parametrize("command", ["report", "review"])
def test_report_and_review_of_a_missing_run_are_one_line(command, tmp_path):
    missing = tmp_path / "no-run"
    extra = ["--worst", "5"] if command == "review" else []
    line = one_line_error(s2naip(command, "--run", missing, "--output", tmp_path / "page", *extra, cwd=tmp_path),
                          1, command)
    assert f"--run {missing} does not exist" in line and "--input is needed" not in line
    (tmp_path / "not-a-run").mkdir()
    line = one_line_error(s2naip(command, "--run", tmp_path / "not-a-run", "--output", tmp_path / "page", *extra,
                                 cwd=tmp_path), 1, command)
    assert "holds no build" in line
    assert not (tmp_path / "page").exists()


def test_review_report_and_fetch_nir_errors_after_the_checks_carry_the_command(tmp_path):
    """The mistakes found after the common checks (a run.json without the build's input, a run
    with nothing to report, a fetch-nir option value): one line with the command's prefix, like the
    other commands, and no traceback."""
    from transforms import records

    run = tmp_path / "run"
    (run / "pairs").mkdir(parents=True)
    pq.write_table(records.PAIR_SCHEMA.empty_table(), run / "pairs" / "pairs-00000-of-00001.parquet")  # no tile
    (run / "_SUCCESS").write_text("{}")
    (run / "run.json").write_text(json.dumps({"counts": {"tiles": 0}, "options": {}}))
    line = one_line_error(s2naip("review", "--run", run, "--output", tmp_path / "page", "--worst", "3", cwd=tmp_path),
                          1, "review")
    assert line == "s2naip review: error: --input is needed (run.json does not name the build's input)"
    line = one_line_error(s2naip("report", "--run", run, "--output", tmp_path / "rep", cwd=tmp_path), 1, "report")
    assert line.startswith(f"s2naip report: error: {run} holds no pairs and no rejects")
    line = one_line_error(s2naip("fetch-nir", "--manifest", tmp_path / "ids.txt", "--output", tmp_path / "nir",
                                 "--stac-url", "ftp://x", cwd=tmp_path), 1, "fetch-nir")
    assert "STAC API URL" in line and "error: error:" not in line
    assert not (tmp_path / "page").exists() and not (tmp_path / "rep").exists()


def test_debug_shows_the_traceback(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "_SUCCESS").write_text("{}")
    (run / "run.json").write_text("{not json")  # an unexpected failure, not a checked mistake
    line = one_line_error(s2naip("report", "--run", run, "--output", tmp_path / "r", cwd=tmp_path), 1, "report")
    assert "--debug shows the traceback" in line
    for flag in ("--debug", "-v"):
        proc = s2naip("report", "--run", run, "--output", tmp_path / "r", flag, cwd=tmp_path)
        assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr
        assert "JSONDecodeError" in proc.stderr


def test_ctrl_c_exits_130_in_one_line_and_leaves_no_partial_files(sample_set, tmp_path):
    """The build blocks on a tile whose rgb.png is a FIFO nobody writes to: the interrupt lands
    mid-run, when the pipeline has opened that file (a non-blocking open of the writing end
    succeeds once a reader has it open: the readiness probe)."""
    root = tmp_path / "set"
    generate_sample(str(root), 3, seed=2)
    _, tile_dir = first_tile(root)
    fifo = tile_dir / "rgb.png"
    fifo.unlink()
    os.mkfifo(fifo)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "build", "--input", str(root), "--output",
                             str(out)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    writer = None
    try:
        deadline = time.monotonic() + 300
        while writer is None:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the build never opened the FIFO"
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                assert e.errno == errno.ENXIO  # no reader yet
                time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if writer is not None:
            os.close(writer)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines() == ["s2naip build: interrupted"]
    assert beam_temp_anywhere(tmp_path) == []
    assert not (out / "_SUCCESS").exists() and not (out / "run.json").exists()
    if (out / "pairs").exists():  # the README's reader works on whatever is left
        pq.read_table(out / "pairs")
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# Manifests: '#' starts a comment anywhere on a line


def test_manifest_comments_whole_line_or_trailing():
    assert manifest_line_id("m_2608301_nw_17_060_20200522/34962_55327  # cloudy, check") == \
        "m_2608301_nw_17_060_20200522/34962_55327"
    assert manifest_line_id("  m_2608301_nw_17_060_20200522/1_2\t#note\n") == "m_2608301_nw_17_060_20200522/1_2"
    assert manifest_line_id("# header") is None and manifest_line_id("   ") is None
    assert list(manifest_lines_to_ids("a/b # c")) == ["a/b"]


def test_a_manifest_with_trailing_notes_builds_every_tile(sample_set, tmp_path):
    ids = sorted((sample_set / "manifest.txt").read_text().split())
    manifest = tmp_path / "ids.txt"
    manifest.write_text("# reviewed tiles\n" + "".join(f"{tile_id}   # note {i}\n" for i, tile_id in enumerate(ids)))
    out = tmp_path / "out"
    proc = s2naip("build", "--input", sample_set, "--output", out, "--manifest", manifest, "--selection", "paper",
                  "--direct_num_workers=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads((out / "run.json").read_text())["counts"]
    assert counts["tiles"] == len(ids) == 2 and "invalid_tile_id" not in counts["rejects_by_reason"]
