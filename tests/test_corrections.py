"""Reviewer corrections: the files, the per-tile manual selection, and the build with --corrections
end to end (a pick, a removal, bad entries as rejects, local and gs:// files, the job graph)."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from pipelines import build_pairs
from transforms.build import pipeline as build_pipeline
from pipelines.options import BuildOptions, output_spec, pair_config
from tests.tile_factory import NAIP_ID, black_edge, cloud, scene, series_from, write_tile
from transforms import corrections, records
from transforms.corrections import BadCorrection, Correction, CorrectionsFileError
from transforms.pairs import PairConfig, build_tile, load_tile
from transforms.selection import SelectionConfig, match_histograms, select_pair
from transforms.tiles import TileId

RUNNER = "FnApiRunner"


def tid(i):
    return f"{NAIP_ID}/{37000 + i}_57000"


def _series_with_defects(seed: int, t: int = 10):
    """(hr, series): timestep 2 black-bordered, timestep 5 cloudy, the rest clear."""
    rng = np.random.default_rng(seed)
    hr = scene(rng)
    series = series_from(hr, rng, t)
    series[2] = black_edge(series[2])
    series[5] = cloud(series[5])
    return hr, series


# ---------------------------------------------------------------------------------------------
# Files


def test_parse_and_merge_files(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({tid(0): 3, tid(1): None, tid(2): 4}))
    b.write_text(json.dumps({tid(2): None, tid(3): 0}))
    merged = corrections.load_corrections([str(a), str(b)])
    assert {k: v.value for k, v in merged.items()} == {tid(0): 3, tid(1): None, tid(2): None, tid(3): 0}
    assert merged[tid(2)].source == str(b) and merged[tid(2)].removes
    entries = list(corrections.read_corrections_file((7, str(a))))
    assert entries[0] == (tid(0), (7, 3, str(a)))
    assert corrections.latest([(0, 1, "x"), (2, None, "z"), (1, 5, "y")]) == Correction(None, "z")
    assert corrections.latest([]) is None


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "not valid JSON"),
    ("\xff\xfe", "not valid JSON"),
])
def test_malformed_file_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "c.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(CorrectionsFileError, match=message) as e:
        corrections.load_corrections([str(path)])
    assert str(path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="corrections file not found"):
        corrections.load_corrections([str(tmp_path / "missing.json")])


# ---------------------------------------------------------------------------------------------
# Per tile


@pytest.mark.parametrize("value, message", [
    (10, "out of range: the series has 10 timesteps"),
    (-1, "out of range"),
    (2, "black border"),
    (True, "not a timestep index"),
    (1.0, "not a timestep index"),
    ("3", "not a timestep index"),
    ([3], "not a timestep index"),
])
def test_check_correction_rejects_bad_entries(value, message):
    _, series = _series_with_defects(0)
    with pytest.raises(BadCorrection, match=message):
        corrections.check_correction(Correction(value, "c.json"), series)
    assert corrections.check_correction(Correction(5), series) == 5  # a cloudy one is allowed


@pytest.mark.parametrize("mode", ["paper", "companion"])
def test_manual_selection_scores_like_the_automatic_mode(mode):
    hr, series = _series_with_defects(1, t=12)
    auto = select_pair(hr, series, SelectionConfig(mode=mode, top_k=3))
    every = select_pair(hr, series, SelectionConfig(mode=mode, top_k=12))  # scores all valid timesteps
    all_psnr = dict(zip(every.candidate_indices.tolist(), every.candidate_psnr.tolist()))
    all_score = dict(zip(every.candidate_indices.tolist(), every.candidate_scores.tolist()))
    outside = [t for t in every.candidate_indices.tolist() if t not in auto.candidate_indices.tolist()]
    assert 5 in outside  # the cloud is not among the top 3
    for index in [int(auto.candidate_indices[1]), 5]:
        manual = corrections.manual_selection(hr, series, auto, index, SelectionConfig(mode=mode, top_k=3))
        assert manual.lr_index == index
        np.testing.assert_array_equal(manual.lr, series[index])
        np.testing.assert_array_equal(manual.hr_matched, match_histograms(hr, series[index][None])[0])
        assert manual.psnr == pytest.approx(all_psnr[index], rel=1e-6)
        assert manual.score == pytest.approx(all_score[index], rel=1e-5, abs=1e-7)
        # the automatic selection's candidates are kept as they are
        np.testing.assert_array_equal(manual.candidate_indices, auto.candidate_indices)
        np.testing.assert_array_equal(manual.candidate_scores, auto.candidate_scores)
        np.testing.assert_array_equal(manual.valid_indices, auto.valid_indices)


def test_manual_selection_in_a_mode_scored_among_timesteps():
    """A mode other than paper/companion (the robust one) scores a pick outside its top-k with its own
    selection over every valid timestep."""
    hr, series = _series_with_defects(3, t=12)
    config = SelectionConfig(mode="robust", top_k=3)
    auto = select_pair(hr, series, config)
    every = select_pair(hr, series[auto.valid_indices], SelectionConfig(mode="robust", top_k=12))
    index = next(int(t) for t in auto.valid_indices if t not in auto.candidate_indices)
    manual = corrections.manual_selection(hr, series, auto, index, config)
    position = int(np.flatnonzero(auto.valid_indices == index)[0])
    at = int(np.flatnonzero(every.candidate_indices == position)[0])
    assert manual.lr_index == index and np.isfinite(manual.score)
    assert manual.psnr == pytest.approx(every.candidate_psnr[at]) and manual.score == pytest.approx(
        every.candidate_scores[at], rel=1e-5)
    # its own evidence, measured among every valid timestep, goes to the lr_* columns
    assert manual.lr_evidence.haze[0] == every.evidence.haze[at]
    record = records.pair_record(TileId.parse(tid(0)), manual, n_timesteps=12, split="s", mode="manual", alpha=0.7)
    assert record["lr_cloud"] == pytest.approx(every.evidence.cloud[at]) and record["lr_index"] == index
    assert record["candidate_cloud"] == pytest.approx(auto.evidence.cloud.tolist())  # the automatic candidates'


def test_manual_pick_outside_the_candidates_is_scored_with_the_tiles_extra_bands(tmp_path):
    """Robust mode: a pick outside the top-k is scored, and its evidence measured, among every valid
    timestep with the extra bands the tile has (here a B10 with cirrus over the pick)."""
    root = str(tmp_path)
    hr, series = _series_with_defects(4, t=12)
    b10 = np.zeros(series.shape[:3], np.uint8)
    write_tile(root, tid(0), hr, series, extra={"b10": b10})
    config = PairConfig(input_root=root, selection=SelectionConfig(mode="robust", top_k=3))
    auto = build_tile(tid(0), config).record
    index = next(t for t in auto["valid_indices"] if t not in auto["candidate_indices"] and t != 5)
    clear = build_tile(tid(0), config, Correction(index)).record
    b10[index] = 10  # thick cirrus over the pick, in the file the build reads
    write_tile(root, tid(0), hr, series, extra={"b10": b10})
    cirrus = build_tile(tid(0), config, Correction(index)).record
    assert clear["selection"] == cirrus["selection"] == "manual" and clear["lr_index"] == cirrus["lr_index"] == index
    assert clear["lr_cirrus"] == pytest.approx(0.0) and cirrus["lr_cirrus"] > 0.5
    assert cirrus["score"] > clear["score"] + 0.2 and cirrus["evidence_bands"] == ["b10"]


def test_build_tile_with_each_kind_of_correction(tmp_path):
    root = str(tmp_path)
    hr, series = _series_with_defects(2)
    write_tile(root, tid(0), hr, series)
    config = PairConfig(input_root=root, split="s", selection=SelectionConfig(mode="robust"))
    auto = build_tile(tid(0), config)
    assert auto.kind == "pair" and auto.record["selection"] == "robust" and auto.record["lr_index"] != 5

    manual = build_tile(tid(0), config, Correction(5, "review.json"))
    assert manual.kind == "pair"
    rec = manual.record
    assert rec["selection"] == "manual" and rec["lr_index"] == 5
    for column in ("candidate_indices", "candidate_psnr", "candidate_scores", "valid_indices", "n_timesteps",
                   "candidate_cloud"):
        assert rec[column] == auto.record[column], column
    at = auto.record["candidate_indices"].index(5)  # a candidate: its evidence is the candidate's
    assert rec["lr_cloud"] == auto.record["candidate_cloud"][at] > 0.01
    inputs = load_tile(TileId.parse(tid(0)), config)
    np.testing.assert_array_equal(np.frombuffer(rec["lr"], np.uint8).reshape(32, 32, 4), inputs.series[5])
    np.testing.assert_array_equal(np.frombuffer(rec["hr"], np.uint8).reshape(128, 128, 4),
                                  match_histograms(inputs.hr, inputs.series[5][None])[0])

    removed = build_tile(tid(0), config, Correction(None, "review.json"))
    assert (removed.kind, removed.record["reason"], removed.record["stage"]) == ("reject", "removed_by_correction",
                                                                                  "select")
    assert "review.json" in removed.record["detail"]
    for value, text in [(99, "out of range"), (2, "black border"), ("two", "not a timestep index")]:
        bad = build_tile(tid(0), config, Correction(value, "review.json"))
        assert (bad.kind, bad.record["reason"]) == ("reject", "bad_correction"), value
        assert text in bad.record["detail"] and "review.json" in bad.record["detail"]
    # a removal needs no input; a pick of a tile that cannot be read is rejected for that reason
    assert build_tile(tid(9), config, Correction(None)).record["reason"] == "removed_by_correction"
    assert build_tile(tid(9), config, Correction(1)).record["reason"] == "missing_hr"
    assert build_tile("../x", config, Correction(None)).record["reason"] == "invalid_tile_id"


# ---------------------------------------------------------------------------------------------
# The build


@pytest.fixture(scope="module")
def corrections_input(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corr") / "in")
    for i in range(6):
        hr, series = _series_with_defects(10 + i)
        write_tile(root, tid(i), hr, series)
    return root


@pytest.fixture(scope="module")
def automatic_run(corrections_input, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corr-auto") / "out")
    build_pairs.run(["--input", corrections_input, "--output", out, "--runner", RUNNER])
    return {r["tile_id"]: r for r in pq.read_table(os.path.join(out, "pairs")).to_pylist()}


def _outputs(out):
    pairs = {r["tile_id"]: r for r in pq.read_table(os.path.join(out, "pairs")).to_pylist()}
    rejects = {r["tile_id"]: r for r in pq.read_table(os.path.join(out, "rejects")).to_pylist()}
    assert not set(pairs) & set(rejects)
    return pairs, rejects


def _check_corrected_outputs(out, summary, automatic):
    pairs, rejects = _outputs(out)
    assert set(pairs) | set(rejects) == {tid(i) for i in range(6)}
    assert pairs[tid(0)]["selection"] == "manual" and pairs[tid(0)]["lr_index"] == 5  # the later file wins
    assert pairs[tid(4)]["selection"] == "manual" and pairs[tid(4)]["lr_index"] == 0
    assert rejects[tid(1)]["reason"] == "removed_by_correction"
    assert rejects[tid(2)]["reason"] == "bad_correction" and "out of range" in rejects[tid(2)]["detail"]
    assert rejects[tid(3)]["reason"] == "bad_correction" and "black border" in rejects[tid(3)]["detail"]
    assert pairs[tid(5)] == automatic[tid(5)]  # not listed: built as before
    for t in (tid(0), tid(4)):
        for column in ("candidate_indices", "candidate_psnr", "candidate_scores", "valid_indices"):
            assert pairs[t][column] == automatic[t][column]
    assert summary["counts"]["pairs"] == 3
    assert summary["counts"]["rejects_by_reason"] == {"removed_by_correction": 1, "bad_correction": 2}


def test_build_applies_corrections_end_to_end(corrections_input, automatic_run, tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps({tid(0): 1, tid(1): 3, tid(4): 0, f"{NAIP_ID}/1_1": 2, "garbage": None}))
    second.write_text(json.dumps({tid(0): 5, tid(1): None, tid(2): 40, tid(3): 2}))
    out = str(tmp_path / "out")
    summary = build_pairs.run(["--input", corrections_input, "--output", out, "--runner", RUNNER,
                               "--corrections", str(first), "--corrections", str(second)])
    _check_corrected_outputs(out, summary, automatic_run)


def test_build_reads_corrections_from_gcs(gcs_env, corrections_input, automatic_run, tmp_path):
    gcs_env.bucket("corrections")
    remote = "gs://corrections/review/round1.json"
    gcs_env.upload_bytes(remote, json.dumps({tid(0): 1, tid(1): 3, tid(4): 0}).encode())
    local = tmp_path / "round2.json"
    local.write_text(json.dumps({tid(0): 5, tid(1): None, tid(2): 40, tid(3): 2}))
    out = str(tmp_path / "out")
    summary = build_pairs.run(["--input", corrections_input, "--output", out, "--runner", RUNNER,
                               "--corrections", remote, "--corrections", str(local)])
    _check_corrected_outputs(out, summary, automatic_run)


def test_missing_corrections_file_fails_the_build(corrections_input, tmp_path):
    argv = ["--input", corrections_input, "--output", str(tmp_path / "out"), "--runner", RUNNER,
            "--corrections", str(tmp_path / "nope.json")]
    with pytest.raises(SystemExit, match="--corrections not found"):  # the command checks before it starts
        build_pairs.run(argv)
    # where the launcher does not check (a remote runner), the job fails on its workers
    options = PipelineOptions(argv)
    opts = options.view_as(BuildOptions)
    config, spec = pair_config(opts), output_spec(opts)
    with pytest.raises(Exception, match="corrections file not found"):
        with beam.Pipeline(options=options) as p:
            build_pipeline.build(p, config, spec, build_pairs.run_info(config, spec, opts, options))


def test_corrections_stay_out_of_the_job_graph(tmp_path):
    """The launcher never reads the files: a 200k-entry file and a 1-entry one give graphs of the
    same size (only the path is in it)."""
    small, large = tmp_path / "small.json", tmp_path / "large.json"
    small.write_text(json.dumps({tid(0): 1}))
    large.write_text(json.dumps({f"{NAIP_ID}/{i}_{i}": i % 7 for i in range(200_000)}))

    def graph_bytes(path):
        opts = BuildOptions(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                             "--corrections", str(path)])
        config = pair_config(opts)
        assert config.corrections == (str(path),)
        p = beam.Pipeline(runner=RUNNER)
        from transforms.build.stages import BuildPairs

        _ = p | beam.Create([tid(0)]) | BuildPairs(config)
        return p.to_runner_api().SerializeToString()

    a, b = graph_bytes(small), graph_bytes(large)
    opts = BuildOptions(["--input", "in", "--output", "o", "--corrections", "a.json,gs://b/c.json",
                         "--corrections", "d.json"])
    assert pair_config(opts).corrections == ("a.json", "gs://b/c.json", "d.json")
    # the pickled DoFns' bytes vary from one graph to the next: three graphs of the same file
    # measured 46,699-46,731 bytes (a 64-byte bound failed once in a full run, 76); the large
    # file's 200k entries (~6 MB of JSON) would add hundreds of KiB even compressed
    assert abs(len(a) - len(b)) < 2048 and len(a) < 100_000
    assert b"JoinCorrections" in a
