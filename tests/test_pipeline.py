"""Pipeline tests: the transforms under TestPipeline, and the build's every-id-once invariant."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from pipelines import build_pairs
from transforms.build import pipeline as build_pipeline
from pipelines.options import BuildOptions, output_spec, pair_config
from tests.imagery_fixtures import forged_header_png, png_bytes_noise
from tests.tile_factory import NAIP_ID, black_edge, good_tile, scene, series_from, write_png, write_tile
from transforms.build.stages import BuildPairs, DeduplicateAndReshuffle, ReadTileIds
from transforms.pairs import PairConfig

RUNNER = "FnApiRunner"  # in-process; the DirectRunner would first try to download Prism


def tid(i):
    return f"{NAIP_ID}/{35000 + i}_55000"


def test_read_and_deduplicate_manifest(tmp_path):
    manifest = tmp_path / "ids.txt"
    manifest.write_text(f"# comment\n{tid(1)}\n\n{tid(2)}\n{tid(1)}\n  {tid(3)}  \n")
    with TestPipeline(runner=RUNNER) as p:
        ids = p | ReadTileIds(str(tmp_path), str(manifest))
        unique = ids | DeduplicateAndReshuffle()
        assert_that(unique.ids, equal_to([tid(1), tid(2), tid(3)]), label="ids")
        assert_that(unique.rejects | beam.Map(lambda r: (r["tile_id"], r["reason"])),
                    equal_to([(tid(1), "duplicate_tile_id")]), label="dups")


def test_listing_finds_every_tile_folder(tmp_path):
    for i in range(3):
        good_tile(str(tmp_path), tid(i), seed=i, t=4)
    os.makedirs(tmp_path / "naip" / NAIP_ID / "35009_55000")  # empty tile folder: still an id
    os.makedirs(tmp_path / "naip" / "not_a_naip_id")
    with TestPipeline(runner=RUNNER) as p:
        ids = p | ReadTileIds(str(tmp_path))
        assert_that(ids, equal_to([tid(0), tid(1), tid(2), f"{NAIP_ID}/35009_55000", "not_a_naip_id"]))


def test_build_pairs_transform_outputs(tmp_path):
    for i in range(3):
        good_tile(str(tmp_path), tid(i), seed=i)
    rng = np.random.default_rng(9)
    hr = scene(rng)
    write_tile(str(tmp_path), tid(3), hr, np.stack([black_edge(f) for f in series_from(hr, rng, 5)]))
    config = PairConfig(input_root=str(tmp_path), split="test")
    with TestPipeline(runner=RUNNER) as p:
        built = p | beam.Create([tid(0), tid(1), tid(2), tid(3), "../../etc/passwd"]) | BuildPairs(config)
        assert_that(built.pairs | beam.Map(lambda r: (r["tile_id"], r["hr_shape"], r["lr_shape"], r["split"])),
                    equal_to([(tid(i), [128, 128, 4], [32, 32, 4], "test") for i in range(3)]), label="pairs")
        assert_that(built.rejects | beam.Map(lambda r: (r["tile_id"], r["stage"], r["reason"])),
                    equal_to([(tid(3), "prefilter", "no_valid_timesteps"),
                              ("../../etc/passwd", "manifest", "invalid_tile_id")]), label="rejects")


def _bad_inputs(root: str) -> dict[str, str]:
    """Writes one tile per failure mode; returns {tile_id: expected reject reason (or 'pair')}."""
    expected = {}
    for i in range(3):
        good_tile(root, tid(i), seed=i)
        expected[tid(i)] = "pair"

    def replace(tile, rel, data):
        naip_id, xy = tile.split("/")
        path = os.path.join(root, rel.format(naip_id=naip_id, xy=xy))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    cases = {
        10: ("naip/{naip_id}/{xy}/rgb.png", b"not a png at all", "decode_error"),
        11: ("naip/{naip_id}/{xy}/rgb.png", png_bytes_noise((128, 128, 3))[:300], "decode_error"),
        12: ("sentinel2/{xy}/tci.png", png_bytes_noise((96, 32, 3))[:150], "decode_error"),
        13: ("naip/{naip_id}/{xy}/nir.png", png_bytes_noise((128, 128), np.uint16), "bad_dtype"),
        14: ("sentinel2/{xy}/tci.png", png_bytes_noise((100, 32, 3)), "bad_shape"),
        15: ("sentinel2/{xy}/b08.png", png_bytes_noise((64, 32)), "bad_shape"),  # T differs from tci
        16: ("sentinel2/{xy}/tci.png", forged_header_png(32, 2**30), "image_too_large"),
        17: ("naip/{naip_id}/{xy}/rgb.png", forged_header_png(100_000, 100_000), "image_too_large"),
        18: ("naip/{naip_id}/{xy}/rgb.png", png_bytes_noise((128, 128, 3), np.uint8, black_edge=True),
             "naip_black_border"),
    }
    for i, (rel, data, reason) in cases.items():
        good_tile(root, tid(i), seed=i, t=3)
        replace(tid(i), rel, data)
        expected[tid(i)] = reason
    # missing pieces
    good_tile(root, tid(20), seed=20, t=3)
    os.remove(os.path.join(root, "naip", NAIP_ID, "35020_55000", "nir.png"))
    expected[tid(20)] = "missing_nir"
    good_tile(root, tid(21), seed=21, t=3)
    os.remove(os.path.join(root, "sentinel2", "35021_55000", "b08.png"))
    expected[tid(21)] = "missing_band"
    rng = np.random.default_rng(22)
    write_tile(root, tid(22), scene(rng), None)
    expected[tid(22)] = "missing_s2"
    write_tile(root, tid(23), scene(rng), None)
    os.makedirs(os.path.join(root, "sentinel2", "35023_55000"))  # empty folder
    expected[tid(23)] = "missing_s2"
    os.makedirs(os.path.join(root, "naip", NAIP_ID, "35024_55000"))  # empty tile folder
    expected[tid(24)] = "missing_hr"
    hr = scene(rng)
    write_tile(root, tid(25), hr, np.stack([black_edge(f) for f in series_from(hr, rng, 4)]))
    expected[tid(25)] = "no_valid_timesteps"
    return expected


def _read_outputs(out):
    pairs = pq.read_table(os.path.join(out, "pairs")).to_pylist()
    rejects = pq.read_table(os.path.join(out, "rejects")).to_pylist()
    return pairs, rejects


@pytest.mark.parametrize("read_threads", ["0", "4"])  # reads direct, or started ahead (transforms.io.prefetch)
def test_every_input_id_ends_in_exactly_one_output(tmp_path, read_threads):
    root = str(tmp_path / "in")
    expected = _bad_inputs(root)
    manifest = tmp_path / "manifest.txt"
    extra = ["../../../etc/passwd", "/abs/path", f"{NAIP_ID}/1_2/../../x", tid(0)]  # tid(0): duplicate
    manifest.write_text("\n".join([*expected, *extra]) + "\n")
    out = str(tmp_path / "out")
    summary = build_pairs.run(["--input", root, "--output", out, "--manifest", str(manifest), "--runner", RUNNER,
                               "--read-threads", read_threads])
    pairs, rejects = _read_outputs(out)

    outcome = {}
    for r in pairs:
        assert r["tile_id"] not in outcome
        outcome[r["tile_id"]] = "pair"
    dup_rejects = [r for r in rejects if r["reason"] == "duplicate_tile_id"]
    assert [r["tile_id"] for r in dup_rejects] == [tid(0)]
    for r in rejects:
        if r["reason"] != "duplicate_tile_id":
            assert r["tile_id"] not in outcome, r
            outcome[r["tile_id"]] = r["reason"]
    for bad in extra[:3]:
        assert outcome.pop(bad) == "invalid_tile_id"
    assert outcome == expected
    assert summary["counts"]["tiles"] == len(expected) + len(extra)
    assert summary["counts"]["pairs"] == 3
    assert summary["counts"]["rejects_by_reason"]["duplicate_tile_id"] == 1
    assert not any(r["reason"] == "internal_error" for r in rejects)


def test_pairs_roundtrip_to_numpy_and_schema(tmp_path):
    root = str(tmp_path / "in")
    for i in range(4):
        good_tile(root, tid(i), seed=i, t=20)
    out = str(tmp_path / "out")
    build_pairs.run(["--input", root, "--output", out, "--runner", RUNNER, "--split", "val", "--top-k", "5"])
    files = sorted(os.listdir(os.path.join(out, "pairs")))
    assert files and all(f.startswith("pairs-") and f.endswith(".parquet") for f in files)
    table = pq.read_table(os.path.join(out, "pairs"))
    from transforms.records import PAIR_SCHEMA, decode_pair_arrays

    assert table.schema.equals(PAIR_SCHEMA, check_metadata=False)
    meta = pq.ParquetFile(os.path.join(out, "pairs", files[0])).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    for row in table.to_pylist():
        hr, lr = decode_pair_arrays(row)
        assert hr.shape == (128, 128, 4) and lr.shape == (32, 32, 4)
        assert row["split"] == "val" and len(row["candidate_indices"]) == 5
        assert row["lr_index"] == row["candidate_indices"][int(np.argmin(row["candidate_scores"]))]
        # the emitted LR is the original timestep lr_index of the input series
        from PIL import Image

        xy = row["tile_id"].split("/")[1]
        tci = np.asarray(Image.open(os.path.join(root, "sentinel2", xy, "tci.png")))
        np.testing.assert_array_equal(lr[..., :3], tci[row["lr_index"] * 32 : (row["lr_index"] + 1) * 32])
    run = json.loads(open(os.path.join(out, "run.json")).read())
    assert run["counts"]["pairs"] == 4 and run["options"]["top_k"] == 5
    assert len(run["files"]) >= 2


def test_rgb_bands_need_no_nir(tmp_path):
    root = str(tmp_path / "in")
    rng = np.random.default_rng(0)
    hr = scene(rng)
    write_tile(root, tid(0), hr, series_from(hr, rng, 6), nir=False, b08=False)
    out = str(tmp_path / "out")
    summary = build_pairs.run(["--input", root, "--output", out, "--runner", RUNNER, "--bands", "rgb"])
    assert summary["counts"]["pairs"] == 1
    (row,) = pq.read_table(os.path.join(out, "pairs")).to_pylist()
    assert row["hr_shape"] == [128, 128, 3] and row["lr_shape"] == [32, 32, 3]


def test_parquet_manifest_and_separate_nir_root(tmp_path):
    root, nir_root = str(tmp_path / "in"), str(tmp_path / "nir")
    for i in range(2):
        good_tile(root, tid(i), seed=i)
        naip_id, xy = tid(i).split("/")
        os.makedirs(os.path.join(nir_root, "naip", naip_id, xy))
        os.rename(os.path.join(root, "naip", naip_id, xy, "nir.png"), os.path.join(nir_root, "naip", naip_id, xy, "nir.png"))
    manifest = str(tmp_path / "ids.parquet")
    pq.write_table(pa.table({"tile_id": [tid(0), tid(1)]}), manifest)
    out = str(tmp_path / "out")
    summary = build_pairs.run(["--input", root, "--nir-input", nir_root, "--output", out, "--manifest", manifest,
                               "--runner", RUNNER])
    assert summary["counts"]["pairs"] == 2
    summary = build_pairs.run(["--input", root, "--output", out + "2", "--manifest", manifest, "--runner", RUNNER])
    assert summary["counts"]["rejects_by_reason"] == {"missing_nir": 2}


def test_invalid_options_fail_before_running(tmp_path):
    with pytest.raises(SystemExit, match="alpha"):
        build_pairs.run(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--alpha", "2"])
    with pytest.raises(SystemExit):
        build_pairs.run(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--selection", "magic"])


def test_multi_processing_runner_gives_the_same_pairs(tmp_path):
    """Catches pickling bugs: the DoFns and configs must survive being sent to worker processes."""
    root = str(tmp_path / "in")
    for i in range(6):
        good_tile(root, tid(i), seed=i, t=10)
    write_png(os.path.join(root, "naip", NAIP_ID, "35099_55000", "rgb.png"), np.zeros((128, 128, 3), np.uint8))
    outs = {}
    for mode, extra in [("in_memory", []), ("multi_processing", ["--direct_num_workers=2", "--read-threads=4"])]:
        out = str(tmp_path / mode)
        build_pairs.run(["--input", root, "--output", out, "--runner", RUNNER,
                         f"--direct_running_mode={mode}", *extra])
        pairs, rejects = _read_outputs(out)
        outs[mode] = (sorted((r["tile_id"], r["lr_index"], r["hr"]) for r in pairs),
                      sorted((r["tile_id"], r["reason"]) for r in rejects))
    assert outs["in_memory"] == outs["multi_processing"]
    assert len(outs["in_memory"][0]) == 6 and outs["in_memory"][1] == [(f"{NAIP_ID}/35099_55000", "naip_black_border")]


def test_missing_manifest_fails_the_job_instead_of_building_nothing(tmp_path):
    argv = ["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--manifest", str(tmp_path / "absent.txt"),
            "--runner", RUNNER]
    with pytest.raises(SystemExit, match="--manifest not found"):  # the command checks before it starts
        build_pairs.run(argv)
    # where the launcher does not check (a remote runner), the job fails on its workers
    options = PipelineOptions(argv)
    opts = options.view_as(BuildOptions)
    config, spec = pair_config(opts), output_spec(opts)
    with pytest.raises(Exception, match="manifest not found"):
        with beam.Pipeline(options=options) as p:
            build_pipeline.build(p, config, spec, build_pairs.run_info(config, spec, opts, options), opts.manifest)


FORKED_BUILD = """
import json, sys
from transforms.build import forked_workers as fw
runners = []
class Recording(fw.ForkedWorkersRunner):
    def __init__(self, command):
        super().__init__(command)
        runners.append(self)
fw.ForkedWorkersRunner = Recording
from pipelines import build_pairs
build_pairs.run(sys.argv[1:])
print(json.dumps([r.forked_environments for r in runners]))
"""


def test_forked_workers_build_what_cold_workers_build(tmp_path):
    """multi_processing workers forked from a warm process (transforms.build.forked_workers, the
    default on Linux) write the same tables as Beam's own cold workers (--cold-workers). Each build
    runs in a fresh process, as `s2naip build` does: only a process without other threads forks."""
    root = str(tmp_path / "in")
    for i in range(6):
        good_tile(root, tid(i), seed=i, t=10)
    write_png(os.path.join(root, "naip", NAIP_ID, "35099_55000", "rgb.png"), np.zeros((128, 128, 3), np.uint8))
    tables = {}
    for name, extra in [("forked", []), ("cold", ["--cold-workers"])]:
        out = str(tmp_path / name)
        proc = subprocess.run(
            [sys.executable, "-c", FORKED_BUILD, "--input", root, "--output", out, "--runner", RUNNER,
             "--direct_running_mode=multi_processing", "--direct_num_workers=2", *extra],
            capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        forked = json.loads(proc.stdout.strip().splitlines()[-1])
        assert forked == ([1] if name == "forked" else [])  # the workers' environment got the proxy
        tables[name] = {t: pq.read_table(os.path.join(out, t)).sort_by("tile_id") for t in ("pairs", "rejects")}
    for t in ("pairs", "rejects"):
        assert tables["forked"][t].equals(tables["cold"][t]), t
    assert tables["forked"]["pairs"].num_rows == 6 and tables["forked"]["rejects"].num_rows == 1


def test_forked_workers_apply_to_local_multi_processing_only():
    from transforms.build import forked_workers as fw

    def opts(*argv):
        return PipelineOptions(list(argv))

    assert fw.applies(opts("--runner", "FnApiRunner", "--direct_running_mode=multi_processing"))
    assert not fw.applies(opts("--runner", "FnApiRunner"))
    assert not fw.applies(opts("--runner", "FnApiRunner", "--direct_running_mode=multi_threading"))
    assert not fw.applies(opts("--runner", "DataflowRunner", "--direct_running_mode=multi_processing"))
    with fw.runner_for(opts("--runner", "FnApiRunner")) as runner:
        assert runner is None
    with fw.runner_for(opts("--runner", "FnApiRunner", "--direct_running_mode=multi_processing"), cold=True) as runner:
        assert runner is None
