"""The benchmark command runs end to end on a tiny sample (its figures are not asserted: timing
belongs to the benchmark, not to tests)."""
import json
import os

import pytest

from pipelines.dev import bench
from transforms.selection import DEFAULT_SELECTION


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
                           "--workdir", str(tmp_path / "w"), "--report", str(report)]) == 0
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
    assert "get_media" not in ops["since_unchanged"]["input"]["per_tile"], ops["since_unchanged"]["input"]
    assert "read threads" in capsys.readouterr().out
