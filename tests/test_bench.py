"""The benchmark command runs end to end on a tiny sample (its figures are not asserted: timing
belongs to the benchmark, not to tests)."""
import json

from pipelines import bench


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
    assert figures["selection"] == "robust"
    run = json.loads((tmp_path / "w" / "out-pipe_2-0" / "run.json").read_text())
    assert run["options"]["selection"] == "robust"
