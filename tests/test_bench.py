"""The benchmark command runs end to end on a tiny sample (its figures are not asserted: timing
belongs to the benchmark, not to tests)."""
import json
import os
import sys

import pytest

from pipelines.dev import bench
from transforms.selection import DEFAULT_SELECTION


@pytest.mark.timeout(600)  # four pipeline runs and two samples: over 180 s on a busy 2-core machine
def test_bench_command_reports_every_figure(tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert bench.main(["--tiles", "24", "--rss-tiles", "24,36", "--repeats", "1",
                       "--workdir", str(tmp_path / "w"), "--report", str(report)]) == 0
    figures = json.loads(report.read_text())
    assert set(figures["tiles_per_s"]) == {"decode", "core", "loop", "pipeline_in_process", "pipeline_2_workers"}
    assert all(v > 0 for v in figures["tiles_per_s"].values())
    assert set(figures["peak_rss_mib"]) == {"24", "36"} and "rss_36_vs_24" in figures["ratios"]
    assert figures["bytes"]["input_per_tile"] > 10_000
    assert "pipeline, 2 workers" in capsys.readouterr().out
    # the default mode, measured in every step (the pipeline runs record it)
    assert figures["selection"] == DEFAULT_SELECTION == "robust"
    run = json.loads((tmp_path / "w" / "out-pipe_2-0" / "run.json").read_text())
    assert run["options"]["selection"] == "robust"


@pytest.mark.integration  # starts the GCS emulator (through bench-gcs)
def test_bench_gcs_command_compares_read_settings_on_the_emulator(tmp_path, capsys, loopback_only):
    """`s2naip bench-gcs` end to end on a tiny sample: every setting builds the same pairs."""
    if os.environ.get("CI"):
        import gcp_storage_emulator  # noqa: F401  (the [test] extra installs it)
    else:
        pytest.importorskip("gcp_storage_emulator")
    from pipelines.dev import bench_gcs

    report = tmp_path / "bench_gcs.json"
    assert bench_gcs.main(["--tiles", "12", "--latency-ms", "0,5", "--read-threads", "0,4", "--repeats", "1",
                           "--without-s2", "0.25", "--workdir", str(tmp_path / "w"), "--report", str(report)]) == 0
    figures = json.loads(report.read_text())
    rows = {(r["latency_ms"], r["read_threads"]): r for r in figures["results"]}
    assert set(rows) == {(0.0, 0), (0.0, 4), (5.0, 0), (5.0, 4)}
    for r in rows.values():
        assert r["same_pairs_as_first_setting"] and r["tiles"] == 12 and r["tiles_per_s"] > 0
        assert 4 <= r["requests_per_tile"] <= 20  # fingerprints, reads, writes: no request storm
    assert rows[(5.0, 0)]["speedup_vs_first_setting"] == 1.0
    # storage operations per tile, counted at the proxy: the fingerprints' range listings cost far
    # less than one listing per tile; an unchanged rebuild reads no input object
    ops = figures["operations"]
    assert ops["full"]["input"]["per_tile"]["list"] < 0.5, ops["full"]["input"]
    assert ops["full"]["input"]["per_tile"]["get_media"] >= 3  # rgb, tci (+ b08, nir) of most tiles
    assert ops["since_unchanged"]["incremental"]["unchanged"] == 12
    # the tiles left without Sentinel-2 cost no listing of their own: the full build lists the input
    # as much as the rebuild that reads none of it
    assert figures["without_s2"]["removed"] == 3
    assert ops["full"]["input"]["counts"]["list"] == ops["since_unchanged"]["input"]["counts"]["list"], ops
    assert "get_media" not in ops["since_unchanged"]["input"]["per_tile"], ops["since_unchanged"]["input"]
    assert "read threads" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# s2naip bench --companion-repo (pipelines.bench_companion)

COMPANION_REPO_ENV = "S2NAIP_COMPANION_REPO"  # a checkout of ozendelait/better_s2_naip
COMPANION_PYTHON_ENV = "S2NAIP_COMPANION_PYTHON"  # a python with torch, torchmetrics, ... (docs/performance.md)


def _companion_error(argv, capsys) -> tuple[int, str]:
    from pipelines.cli import guarded

    code = guarded("s2naip bench", bench.main, argv)
    return code, capsys.readouterr().err.strip()


def test_bench_companion_rejects_a_folder_that_is_not_the_companion_code(tmp_path, capsys):
    (tmp_path / "repo" / "pipeline_framework").mkdir(parents=True)
    (tmp_path / "repo" / "pipeline_framework" / "main.py").write_text("")
    code, err = _companion_error(["--companion-repo", str(tmp_path / "repo"), "--workdir", str(tmp_path / "w")], capsys)
    assert code == 1 and len(err.splitlines()) == 1
    assert "first_filtering/main.py" in err and "ozendelait/better_s2_naip" in err
    assert not (tmp_path / "w" / "sample-2000-0-xb").exists()  # checked before any tile is generated


def test_bench_companion_names_an_interpreter_without_torch(tmp_path, capsys):
    repo = tmp_path / "repo"
    for module in ("first_filtering", "pipeline_framework"):
        (repo / module).mkdir(parents=True)
        (repo / module / "main.py").write_text("")
    fake = tmp_path / "python-without-torch"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 1\n")
    fake.chmod(0o755)
    code, err = _companion_error(["--companion-repo", str(repo), "--companion-python", str(fake),
                                  "--workdir", str(tmp_path / "w")], capsys)
    assert code == 1 and len(err.splitlines()) == 1
    assert "No module named torch" in err and "docs/performance.md" in err
    code, err = _companion_error(["--companion-repo", str(repo), "--companion-python", str(tmp_path / "nope"),
                                  "--workdir", str(tmp_path / "w")], capsys)
    assert code == 1 and "not found" in err


def test_bench_real_data_needs_the_companion_repo(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--real-data", str(tmp_path), "--workdir", str(tmp_path / "w")])
    assert e.value.code == 2 and "--real-data needs --companion-repo" in capsys.readouterr().err


def test_companion_ratios_are_how_many_times_faster_the_build_is():
    from pipelines.dev.bench_companion import ratios

    assert ratios(120.0, {"build_1": 30.0, "build_2": 12.0}) == {"build_1": 4.0, "build_2": 10.0}


@pytest.mark.integration  # starts the companion's processes and Beam's
@pytest.mark.timeout(900)
def test_bench_against_the_companion_code(tmp_path, capsys):
    """The real comparison on a small sample, when S2NAIP_COMPANION_REPO names a checkout (and
    S2NAIP_COMPANION_PYTHON an interpreter with torch; default this one): both sides run to their
    end on the same tiles and keep the same tiles (the companion drops what the build rejects)."""
    repo = os.environ.get(COMPANION_REPO_ENV)
    if not repo:
        message = f"companion code: ${COMPANION_REPO_ENV} does not name a checkout of ozendelait/better_s2_naip"
        if os.environ.get("S2NAIP_REQUIRE_COMPANION", "") not in ("", "0"):
            pytest.fail(f"{message} ($S2NAIP_REQUIRE_COMPANION is set)", pytrace=False)
        pytest.skip(message)  # CI too (tests/conftest.py ALLOWED_SKIPS): torch is no project dependency
    python = os.environ.get(COMPANION_PYTHON_ENV, sys.executable)
    report = tmp_path / "c.json"
    assert bench.main(["--companion-repo", repo, "--companion-python", python, "--tiles", "40", "--repeats", "1",
                       "--workdir", str(tmp_path / "w"), "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["tiles"] <= 40 and r["outputs"]["companion_saved"] == r["outputs"]["build_pairs"] > 0
    assert r["outputs"]["build_pairs"] + r["outputs"]["build_rejects"] == r["tiles"]
    assert set(r["ratios"]) == {"build_1", "build_2"} and all(v > 0 for v in r["ratios"].values())
    assert "x the companion" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["paper", "robust"])
def test_profile_build_accounts_every_stage_once(tmp_path, mode):
    """`python -m pipelines.dev.profile_build`: the stages it reports are exclusive (nested ones taken out
    of their parent), so they add up to no more than the loop's total; no timing is asserted."""
    from pipelines.dev import profile_build
    from transforms.pairs import PairConfig
    from transforms.devdata.sample import generate_sample
    from transforms.selection import SelectionConfig

    generate_sample(str(tmp_path), 8, seed=3, timesteps=(20, 24), extra_bands=True)
    ids = bench.tile_ids(str(tmp_path))
    stages = profile_build.profile_tiles(ids, PairConfig(input_root=str(tmp_path), selection=SelectionConfig(mode=mode)))
    total = stages.pop("total")
    assert {"decode tci", "decode rgb", "read tci", "prefilter", "downsample", "rank", "distance", "hm candidates",
            "hm output", "confidence", "record", "other"} <= set(stages)
    assert ("evidence" in stages) == (mode == "robust")
    assert all(v >= 0 for v in stages.values()) and 0 < sum(stages.values()) <= total * 1.001 + 1e-6


def test_stage_timer_takes_nested_stages_out_of_their_parent(monkeypatch):
    from pipelines.dev import profile_build

    clock = iter([0.0, 1.0, 3.0, 10.0])  # outer starts, inner starts, inner ends, outer ends
    monkeypatch.setattr(profile_build.time, "thread_time", lambda: next(clock))
    timer = profile_build.StageTimer()
    timer.wrap("outer", lambda: timer.wrap("inner", lambda: None)())()
    assert timer.seconds == {"inner": 2.0, "outer": 8.0}


def test_profile_build_stage_probe_counts_the_builds_fused_stages(tmp_path):
    """`profile_build --stages`: one in-process build, every runner stage timed. The build has at most
    15 fused stages (session 7: 26 before the Parquet writer of transforms.io.parquet_files and the
    AsDict counts); each stage is a bundle per worker, so a stage more is a fixed cost more."""
    from pipelines.dev import profile_build
    from transforms.devdata.sample import generate_sample

    sample = tmp_path / "s"
    generate_sample(str(sample), 3, seed=4, timesteps=(8, 10))
    rows = profile_build.runner_stages(str(sample), str(sample / "manifest.txt"), str(tmp_path / "out"), "paper")
    assert 0 < len(rows) <= 15
    assert all(w >= 0 and c >= 0 for _, w, c in rows)
    assert any("BuildPair" in name for name, _, _ in rows)
    assert (tmp_path / "out" / "_SUCCESS").exists()
    assert "BuildPair" in profile_build.short_stage_name(next(n for n, _, _ in rows if "BuildPair" in n), 10_000)
