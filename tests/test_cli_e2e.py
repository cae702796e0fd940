"""End to end through the `s2naip` command line on a generated sample, in temp folders."""
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

from transforms.devdata.sample import load_truth

TILES = 60


def s2naip(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_sample_then_build_then_index(tmp_path):
    sample, out = tmp_path / "sample", tmp_path / "out"
    s2naip("sample", "--output", str(sample), "--tiles", str(TILES), "--seed", "3", cwd=tmp_path)
    truth = load_truth(str(sample / "sample_truth.jsonl"))
    proc = s2naip("build", "--input", str(sample), "--output", str(out), "--manifest", str(sample / "manifest.txt"),
                  cwd=tmp_path)
    assert f"tiles {TILES}:" in proc.stdout and "run.json" in proc.stdout

    run = json.loads((out / "run.json").read_text())
    kinds = [t["kind"] for t in truth.values()]
    assert run["counts"]["pairs"] == kinds.count("ok")
    expected_rejects = {k: kinds.count(k) for k in set(kinds) - {"ok"}}
    assert run["counts"]["rejects_by_reason"] == expected_rejects
    assert (out / "_SUCCESS").exists()

    pairs = pq.read_table(out / "pairs", columns=["tile_id", "lr_index", "valid_indices"]).to_pylist()
    bad = {"black_border", "cloud"}
    for row in pairs:
        steps = {s["index"]: s["condition"] for s in truth[row["tile_id"]]["timesteps"]}
        assert steps[row["lr_index"]] not in bad, (row["tile_id"], steps[row["lr_index"]])
        assert all(steps[i] != "black_border" for i in row["valid_indices"])
    chosen = [{s["index"]: s["condition"] for s in truth[r["tile_id"]]["timesteps"]}[r["lr_index"]] for r in pairs]
    assert chosen.count("clear") >= 0.9 * len(chosen)

    # listing instead of a manifest finds the same tiles; `index` writes the manifest the build reads
    manifest = tmp_path / "listed.txt"
    s2naip("index", "--input", str(sample), "--manifest", str(manifest), cwd=tmp_path)
    assert sorted(manifest.read_text().split()) == sorted(truth)


def test_build_without_input_runs_the_embedded_sample(tmp_path):
    proc = s2naip("build", "--output", str(tmp_path / "run"), "--sample-tiles", "30", cwd=tmp_path)
    assert "tiles 30:" in proc.stdout
    assert os.path.isdir(tmp_path / "run-sample-input" / "naip")
    again = subprocess.run([sys.executable, "-m", "pipelines.cli", "build", "--output", str(tmp_path / "run"),
                            "--sample-tiles", "30"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "already holds a run" in again.stderr


def test_help_lists_the_commands(tmp_path):
    proc = s2naip("--help", cwd=tmp_path)
    for command in ("build", "sample", "index", "bench", "bench-selection", "review", "report"):
        assert command in proc.stdout
