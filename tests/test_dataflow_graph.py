"""The Dataflow job, offline: the graph the launcher submits is valid, small, and holds no tile data.

The build is constructed exactly as the CLI does (`transforms.build.pipeline.build` with the
`PairConfig` of `pipelines.options.pair_config`) on the DataflowRunner with gs:// paths, and the
runner's own job-creation code (apiclient.Job, DataflowApplicationClient.create_job and the
Environment / worker-pool construction) writes the job description. Submission is avoided the
way classic templates and the Flex Template launcher avoid it: `--template_location` (here a local
file) makes `create_job` write the job JSON instead of calling the Dataflow API.

Nothing leaves the machine. Only the network-facing calls are replaced (see `offline_dataflow`):
  * credentials: `auth._Credentials.get_service_credentials` returns None (anonymous clients, no
    metadata-server or ADC lookup);
  * the validator's bucket soft-delete lookup on temp/staging (`_warn_if_soft_delete_policy_enabled`);
  * uploads to the staging bucket (`DataflowApplicationClient.stage_file` for gs:// targets) go to
    an in-memory "bucket"; local targets (the job file) keep Beam's own code;
  * `submit_job_description` fails the test if reached;
  * Beam's GCS filesystem, and the gs:// side of the project's `transforms.io.storage`, are a fake
    backed by a local folder that records every call (`FakeGcs`); Beam's GCS client (`GcsIO`)
    cannot be created, and sockets refuse any non-loopback address (DNS included), so anything
    that would still reach Google Cloud fails the test instead.
With runner v2 (portable job submission) the graph is not in the job JSON's `steps`: it is the
Runner API pipeline proto staged as `pipeline.pb` (the job's `pipelineUrl`); both are checked.
"""
from __future__ import annotations

import base64
import bz2
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import apache_beam as beam
from apache_beam.internal.gcp import auth
from apache_beam.io.filesystem import FileMetadata, MatchResult
from apache_beam.io.gcp import gcsio
from apache_beam.io.gcp.gcsfilesystem import GCSFileSystem
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.dataflow.internal import apiclient
from pipelines.build_pairs import build, run_info
from pipelines.options import BuildOptions, output_spec, pair_config
from transforms.io import storage as project_storage
from transforms.pairs import BAND_SETS
from transforms.selection import DOWNSAMPLE_METHODS, SELECTION_MODES

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "dataflow"

PROJECT = "example-project"
REGION = "us-central1"
BUCKET = "example-bucket"
IMAGE = f"{REGION}-docker.pkg.dev/{PROJECT}/s2naip/s2naip-pairs:test"
SERVICE_ACCOUNT = f"s2naip-dataflow@{PROJECT}.iam.gserviceaccount.com"
INPUT = f"gs://{BUCKET}/s2naip/train_urban_set"
OUTPUT = f"gs://{BUCKET}/pairs/v1"
TEXT_MANIFEST = f"gs://{BUCKET}/manifests/ids-small.txt"   # 10 ids
LARGE_MANIFEST = f"gs://{BUCKET}/manifests/ids-large.txt"  # 1,000,000 ids, same path length
PARQUET_MANIFEST = f"gs://{BUCKET}/manifests/ids.parquet"
NAIP_ID = "m_2608101_nw_17_060_20191121"
SENTINEL_ID = f"{NAIP_ID}/99999_99999"  # only in the large manifest (its last line)
# Sanity ceilings, far above today's job (pipeline.pb ~200 KB for ~140 steps, job JSON ~15 KB) so
# that no clone path or Python/Beam patch release can cross them; what the job's size must not
# depend on (the ids) is tested exactly, by comparing a 10-id and a 1M-id manifest.
MAX_PIPELINE_BYTES = 1024 * 1024
MAX_JOB_JSON_BYTES = 256 * 1024
# One step's pickled function and arguments. The largest are the Parquet sinks' (~6 KB, their Arrow
# schema); a step that pickled data (ids, a client, a thread pool, a table) would be far above.
MAX_STEP_PAYLOAD_BYTES = 16 * 1024

# The Dataflow options a 1.1M-tile rebuild is launched with (deploy/dataflow/launch.sh).
DATAFLOW_ARGS = [
    "--runner=DataflowRunner",
    f"--project={PROJECT}",
    f"--region={REGION}",
    "--job_name=s2naip-pairs-offline-test",
    f"--temp_location=gs://{BUCKET}/dataflow/tmp",
    f"--staging_location=gs://{BUCKET}/dataflow/staging",
    f"--sdk_container_image={IMAGE}",
    "--sdk_location=container",
    "--experiments=use_runner_v2",
    "--machine_type=n2-standard-4",
    "--num_workers=10",
    "--max_num_workers=100",
    "--disk_size_gb=50",
    f"--service_account_email={SERVICE_ACCOUNT}",
]
# Every build option of metadata.json, with the values of a real run.
BUILD_ARGS = [
    f"--input={INPUT}",
    f"--output={OUTPUT}",
    f"--nir_input={INPUT}",
    "--selection=paper",
    "--alpha=0.7",
    "--top_k=16",
    "--bands=rgbn",
    "--split=train_urban_set",
    "--num_shards=0",
    "--downsample=bicubic_aa",
    "--read_threads=16",
]


# ---------------------------------------------------------------------------------------------
# Offline harness


class FakeGcs:
    """Beam's gs:// filesystem on a local folder (gs://B/P -> root/B/P), recording every call.

    Metadata calls (match, exists, size) answer from the folder; reading or writing an object
    fails the test: the launcher must never open data on GCS."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[tuple[str, str]] = []

    def local(self, path: str) -> Path:
        assert path.startswith("gs://"), path
        return self.root / path[len("gs://"):]

    def match(self, patterns, limits=None):
        results = []
        for pattern in patterns:
            self.calls.append(("match", pattern))
            files = sorted(glob.glob(str(self.local(pattern)), recursive=True))
            metadata = [FileMetadata("gs://" + os.path.relpath(f, self.root), os.path.getsize(f))
                        for f in files if os.path.isfile(f)]
            results.append(MatchResult(pattern, metadata))
        return results

    def exists(self, path):
        self.calls.append(("exists", path))
        return self.local(path).exists()

    def size(self, path):
        self.calls.append(("size", path))
        return self.local(path).stat().st_size

    def forbidden(self, name):
        def call(path, *args, **kwargs):
            self.calls.append((name, str(path)))
            raise AssertionError(f"the launcher called GCS {name}({path!r})")
        return call


@dataclass
class DataflowJob:
    """What the launcher produced: the job JSON and the staged pipeline proto."""

    job_json: bytes
    pipeline_bytes: bytes
    uploads: dict[str, bytes]
    gcs_calls: list[tuple[str, str]] = field(default_factory=list)

    @property
    def job(self) -> dict:
        return json.loads(self.job_json)

    @property
    def pipeline(self) -> beam_runner_api_pb2.Pipeline:
        return beam_runner_api_pb2.Pipeline.FromString(self.pipeline_bytes)

    def transforms(self) -> dict[str, beam_runner_api_pb2.PTransform]:
        return {t.unique_name: t for t in self.pipeline.components.transforms.values()}


class OfflineDataflow:
    def __init__(self, monkeypatch, root: Path, workdir: Path):
        self.gcs = FakeGcs(root)
        self.workdir = workdir
        self.uploads: dict[str, bytes] = {}
        self._patch(monkeypatch)

    def _patch(self, mp):
        def refuse_connect(sock, address):
            host = address[0] if isinstance(address, tuple) else address
            if sock.family == getattr(socket, "AF_UNIX", None) or str(host) in ("127.0.0.1", "::1", "localhost"):
                return real_connect(sock, address)
            raise AssertionError(f"network access attempted: {address!r}")

        def refuse_lookup(host, *args, **kwargs):
            if host in (None, "localhost", "127.0.0.1", "::1"):
                return real_getaddrinfo(host, *args, **kwargs)
            raise AssertionError(f"DNS lookup attempted: {host!r}")

        real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
        mp.setattr(socket.socket, "connect", refuse_connect)
        mp.setattr(socket, "getaddrinfo", refuse_lookup)

        def no_gcs_client(*args, **kwargs):
            raise AssertionError("a GCS client (GcsIO) was created on the launcher")

        mp.setattr(gcsio.GcsIO, "__init__", no_gcs_client)
        mp.setattr(auth._Credentials, "get_service_credentials", classmethod(lambda cls, options: None))
        mp.setattr(GoogleCloudOptions, "_warn_if_soft_delete_policy_enabled", lambda self, arg_name: None)

        gcs = self.gcs
        mp.setattr(GCSFileSystem, "match", lambda fs, patterns, limits=None: gcs.match(patterns, limits))
        mp.setattr(GCSFileSystem, "exists", lambda fs, path: gcs.exists(path))
        mp.setattr(GCSFileSystem, "size", lambda fs, path: gcs.size(path))
        for name in ("open", "create", "delete", "rename", "copy", "mkdirs", "checksum",
                     "last_updated", "metadata"):
            mp.setattr(GCSFileSystem, name, lambda fs, path, *a, _f=gcs.forbidden(name), **k: _f(path))

        # The project's own storage layer (transforms.io.storage) may reach gs:// without Beam's
        # filesystem: its public functions are routed to the same fake for gs:// paths.
        gcs_routes = {
            "exists": gcs.exists,
            "read_bytes": gcs.forbidden("open"),
            "write_bytes_atomic": gcs.forbidden("create"),
            "list_children": gcs.forbidden("list"),
            "dir_has_files": gcs.forbidden("list"),
        }
        for name, fake in gcs_routes.items():
            real = getattr(project_storage, name, None)
            if real is None:
                continue

            def routed(path, *args, _real=real, _fake=fake, **kwargs):
                if str(path).startswith("gs://"):
                    return _fake(path)
                return _real(path, *args, **kwargs)

            mp.setattr(project_storage, name, routed)

        real_stage_file = apiclient.DataflowApplicationClient.stage_file
        uploads = self.uploads

        def stage_file(client, gcs_or_local_path, file_name, stream, mime_type="application/octet-stream",
                       total_size=None):
            if gcs_or_local_path.startswith("gs://"):
                uploads[gcs_or_local_path.rstrip("/") + "/" + file_name] = stream.read()
                return None
            return real_stage_file(client, gcs_or_local_path, file_name, stream, mime_type, total_size)

        def no_submit(client, job):
            raise AssertionError("the job was submitted to the Dataflow API")

        mp.setattr(apiclient.DataflowApplicationClient, "stage_file", stage_file)
        mp.setattr(apiclient.DataflowApplicationClient, "submit_job_description", no_submit)

    def job_file(self) -> Path:
        return self.workdir / f"job-{len(list(self.workdir.glob('job-*.json')))}.json"

    def collect(self, job_file: Path, calls_before: int) -> DataflowJob:
        pipeline_url = json.loads(job_file.read_bytes())["environment"]["sdkPipelineOptions"]["options"]["pipelineUrl"]
        return DataflowJob(job_file.read_bytes(), self.uploads[pipeline_url], dict(self.uploads),
                           self.gcs.calls[calls_before:])

    def build_job(self, argv: list[str]) -> DataflowJob:
        """The CLI's construction (build_pairs.run minus the summary) with a job file as target."""
        job_file = self.job_file()
        before = len(self.gcs.calls)
        options = PipelineOptions([*argv, f"--template_location={job_file}"])
        opts = options.view_as(BuildOptions)
        config, spec = pair_config(opts), output_spec(opts)
        p = beam.Pipeline(options=options)
        build(p, config, spec, run_info(config, spec, opts, options), opts.manifest)
        result = p.run()
        assert not result.has_job  # nothing was submitted: the job description went to the file
        return self.collect(job_file, before)

    def run_main(self, main, argv: list[str]) -> DataflowJob:
        """A real entry point (`main(argv)`) with a job file as target, as the Flex launcher runs it."""
        job_file = self.job_file()
        before = len(self.gcs.calls)
        assert main([*argv, f"--template_location={job_file}"]) == 0
        return self.collect(job_file, before)


@pytest.fixture(scope="module")
def gcs_root(tmp_path_factory) -> Path:
    """The fake bucket's content: a 10-id and a 1M-id text manifest, and a Parquet manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("gcs")
    manifests = root / BUCKET / "manifests"
    manifests.mkdir(parents=True)
    small = [f"{NAIP_ID}/{35000 + i}_55000" for i in range(10)]
    (manifests / "ids-small.txt").write_text("# tile ids\n" + "\n".join(small) + "\n")
    large = [f"{NAIP_ID}/{35000 + i % 1000}_{55000 + i // 1000}" for i in range(999_999)] + [SENTINEL_ID]
    (manifests / "ids-large.txt").write_text("\n".join(large) + "\n")
    pq.write_table(pa.table({"tile_id": small}), manifests / "ids.parquet")
    return root


@pytest.fixture
def offline_dataflow(monkeypatch, gcs_root, tmp_path) -> OfflineDataflow:
    return OfflineDataflow(monkeypatch, gcs_root, tmp_path)


@pytest.fixture(scope="module")
def text_job(gcs_root, tmp_path_factory) -> DataflowJob:
    """The full-rebuild job with a text manifest, built once for several tests."""
    with pytest.MonkeyPatch.context() as mp:
        harness = OfflineDataflow(mp, gcs_root, tmp_path_factory.mktemp("text-job"))
        return harness.build_job([*DATAFLOW_ARGS, *BUILD_ARGS, f"--manifest={TEXT_MANIFEST}"])


# ---------------------------------------------------------------------------------------------
# The graph


def test_job_graph_has_the_build_steps(text_job):
    transforms = text_job.transforms()
    urn = common_urns.primitives
    expected = {
        "BuildDataset/ReadTileIds/ReadTextManifest": None,  # composite: Impulse + SDF read
        "BuildDataset/ReadTileIds/ParseLines": urn.PAR_DO.urn,
        "BuildDataset/Deduplicate/GroupById": urn.GROUP_BY_KEY.urn,
        "BuildDataset/Deduplicate/FirstCopy": None,
        "BuildDataset/BuildPairs/BuildPair": None,
        "BuildDataset/BuildPairs/BuildPair/ParDo(BuildPairDoFn)": urn.PAR_DO.urn,
        "BuildDataset/WritePairs": None,
        "BuildDataset/WriteRejects": None,
        "BuildDataset/PublishRun/WriteRunJson": urn.PAR_DO.urn,
    }
    for name, expected_urn in expected.items():
        assert name in transforms, f"missing step {name}"
        if expected_urn:
            assert transforms[name].spec.urn == expected_urn, name
    for table in ("WritePairs/Parquet", "WriteRejects", "WriteManifest/Parquet"):
        # one file per bundle, written where the records are made, then one finalising step whose
        # side input is every bundle's file (transforms.io.parquet_files)
        assert transforms[f"BuildDataset/{table}/WriteParquetFiles/WriteBundles"].spec.urn == urn.PAR_DO.urn
        finalize = transforms[f"BuildDataset/{table}/WriteParquetFiles/Finalize"]
        assert len(beam_runner_api_pb2.ParDoPayload.FromString(finalize.spec.payload).side_inputs) == 1
    # The manifest is read by a composite rooted in an Impulse (ReadFromText's SDF read, or a
    # Create of the path followed by ReadAllFromText): no source data is embedded in the graph.
    assert transforms["BuildDataset/ReadTileIds/ReadTextManifest"].subtransforms
    assert any(name.startswith("BuildDataset/ReadTileIds/") and t.spec.urn == urn.IMPULSE.urn
               for name, t in transforms.items())

    # run.json waits for the counts and the file list (side inputs).
    payload = beam_runner_api_pb2.ParDoPayload.FromString(
        transforms["BuildDataset/PublishRun/WriteRunJson"].spec.payload)
    assert len(payload.side_inputs) == 2

    # Dataflow needs a KV input for every GroupByKey.
    components = text_job.pipeline.components
    gbk_input = components.pcollections[next(iter(transforms["BuildDataset/Deduplicate/GroupById"].inputs.values()))]
    assert components.coders[gbk_input.coder_id].spec.urn == common_urns.coders.KV.urn

    # A batch job: no unbounded PCollection (which would switch Dataflow to streaming).
    assert all(pc.is_bounded == beam_runner_api_pb2.IsBounded.BOUNDED for pc in components.pcollections.values())


def test_job_runs_the_custom_container_on_runner_v2(text_job):
    job = text_job.job
    assert job["type"] == "JOB_TYPE_BATCH"
    assert "steps" not in job  # portable submission: the graph is the staged pipeline proto
    env = job["environment"]
    assert {"use_runner_v2", "use_portable_job_submission", "beam_fn_api"} <= set(env["experiments"])
    assert env["serviceAccountEmail"] == SERVICE_ACCOUNT
    assert env["tempStoragePrefix"].startswith(f"storage.googleapis.com/{BUCKET}/dataflow/tmp/")
    (pool,) = env["workerPools"]
    assert pool["machineType"] == "n2-standard-4"
    assert pool["diskSizeGb"] == 50
    assert pool["numWorkers"] == 10
    assert pool["autoscalingSettings"]["maxNumWorkers"] == 100
    assert pool["workerHarnessContainerImage"] == IMAGE
    assert [c["containerImage"] for c in pool["sdkHarnessContainerImages"]] == [IMAGE]
    # Workers install nothing: no SDK, sdist, requirements or extra packages are staged.
    staged = {p["name"] for p in pool.get("packages", [])}
    assert staged <= {"pickled_main_session", "submission_environment_dependencies.txt"}, staged

    # One Docker environment, the custom image, for every SDK-executed step.
    components = text_job.pipeline.components
    assert len(components.environments) == 1
    (env_id, environment), = components.environments.items()
    assert environment.urn == common_urns.environments.DOCKER.urn
    assert beam_runner_api_pb2.DockerPayload.FromString(environment.payload).container_image == IMAGE
    for t in components.transforms.values():
        if t.spec.urn == common_urns.primitives.PAR_DO.urn:
            assert t.environment_id == env_id, t.unique_name

    # The workers get the build's options; the graph is where the job says it is.
    options = env["sdkPipelineOptions"]["options"]
    assert (options["input"], options["output"], options["manifest"]) == (INPUT, OUTPUT, TEXT_MANIFEST)
    assert (options["selection"], options["alpha"], options["top_k"], options["bands"]) == ("paper", 0.7, 16, "rgbn")
    assert options["sdk_container_image"] == IMAGE
    assert re.fullmatch(rf"gs://{BUCKET}/dataflow/staging/s2naip-pairs-offline-test\.[0-9.]+/pipeline\.pb",
                        options["pipelineUrl"])
    assert options["pipelineUrl"] in text_job.uploads


@pytest.mark.parametrize("manifest, steps", [
    (PARQUET_MANIFEST, ["BuildDataset/ReadTileIds/ReadParquetManifest", "BuildDataset/ReadTileIds/TileIdColumn"]),
    (None, ["BuildDataset/ReadTileIds/Root", "BuildDataset/ReadTileIds/ListNaipIds",
            "BuildDataset/ReadTileIds/SpreadNaipIds", "BuildDataset/ReadTileIds/ListTiles"]),
])
def test_other_id_sources_build_valid_jobs(offline_dataflow, manifest, steps):
    argv = [*DATAFLOW_ARGS, *BUILD_ARGS] + ([f"--manifest={manifest}"] if manifest else [])
    job = offline_dataflow.build_job(argv)
    transforms = job.transforms()
    for name in [*steps, "BuildDataset/Deduplicate/GroupById", "BuildDataset/BuildPairs/BuildPair",
                 "BuildDataset/WritePairs", "BuildDataset/WriteRejects", "BuildDataset/PublishRun/WriteRunJson"]:
        assert name in transforms, f"missing step {name}"
    assert "use_runner_v2" in job.job["environment"]["experiments"]
    if manifest is None:  # the listing happens on the workers
        assert job.gcs_calls == []


# ---------------------------------------------------------------------------------------------
# Nothing per tile on the launcher


def pickled_payloads(job: DataflowJob) -> dict[str, bytes]:
    """Each ParDo step's function as its pickle bytes (Beam stores them base64-encoded and
    compressed), to look inside: ids or paths in a compressed payload would not show otherwise."""
    out = {}
    for t in job.pipeline.components.transforms.values():
        if t.spec.urn != common_urns.primitives.PAR_DO.urn:
            continue
        data = base64.b64decode(beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload).do_fn.payload)
        for decompress in (bz2.decompress, zlib.decompress):
            try:
                data = decompress(data)
                break
            except (OSError, ValueError, zlib.error):
                continue
        out[t.unique_name] = data
    return out


def test_job_size_does_not_depend_on_the_manifest(offline_dataflow, gcs_root):
    """Nothing per id reaches the job: a 1M-id manifest gives the job of a 10-id one (same paths but
    the manifest's name, of the same length), and no id is in anything staged."""
    assert (gcs_root / LARGE_MANIFEST[len("gs://"):]).stat().st_size > 40_000_000  # 1M ids
    small = offline_dataflow.build_job([*DATAFLOW_ARGS, *BUILD_ARGS, f"--manifest={TEXT_MANIFEST}"])
    large = offline_dataflow.build_job([*DATAFLOW_ARGS, *BUILD_ARGS, f"--manifest={LARGE_MANIFEST}"])
    sizes = {name: (len(job.pipeline_bytes), len(job.job_json)) for name, job in (("small", small), ("large", large))}
    print("pipeline.pb and job JSON bytes:", sizes)
    # The same graph: a few bytes apart at most (compression of per-run names and timestamps).
    # One id is ~40 bytes, the large manifest ~40 MB.
    assert len(large.transforms()) == len(small.transforms())
    assert abs(len(large.pipeline_bytes) - len(small.pipeline_bytes)) <= 256
    assert abs(len(large.job_json) - len(small.job_json)) <= 256
    for job in (small, large):
        assert len(job.pipeline_bytes) < MAX_PIPELINE_BYTES
        assert len(job.job_json) < MAX_JOB_JSON_BYTES
    staged = b"".join([large.job_json, *large.uploads.values(), *pickled_payloads(large).values()])
    assert SENTINEL_ID.encode() not in staged
    assert f"{NAIP_ID}/35001_55000".encode() not in staged
    # The manifest's bytes were never read on the launcher (the fake fails any open()).
    assert [c for c in large.gcs_calls if c[0] not in ("match", "exists", "size")] == []


def test_job_steps_are_lean(text_job):
    """Each step pickles a small function and its configuration, never data or a client (those are
    made in DoFn.setup), and the project's functions are pickled by name: a lambda or closure is
    pickled by value with its code and the clone's absolute path, so the job's size would depend
    on where the code was cloned."""
    transforms = text_job.transforms()
    too_big = {name: len(t.spec.payload) for name, t in transforms.items()
               if len(t.spec.payload) > MAX_STEP_PAYLOAD_BYTES}
    assert too_big == {}
    assert len(transforms["BuildDataset/BuildPairs/BuildPair/ParDo(BuildPairDoFn)"].spec.payload) < 2048
    project_dirs = [f"{REPO / package}/".encode() for package in ("transforms", "pipelines")]
    by_value = {name for name, data in pickled_payloads(text_job).items()
                if any(d in data for d in project_dirs)}
    assert by_value == set(), "project functions pickled by value (lambdas or closures)"


def test_graph_construction_makes_no_gcs_call(text_job):
    """The launcher may not be able to read the input bucket: building the graph must not touch it
    (not even a match of the manifest, which `ReadFromText`'s default validate=True would do: the
    manifest is checked and read on the workers)."""
    assert text_job.gcs_calls == []


# ---------------------------------------------------------------------------------------------
# Flex Template spec, launcher entry point, launch script, image


def load_metadata() -> dict:
    return json.loads((DEPLOY / "metadata.json").read_text())


def build_option_dests() -> set[str]:
    import argparse

    parser = argparse.ArgumentParser()
    BuildOptions._add_argparse_args(parser)
    return {a.dest for a in parser._actions if a.dest != "help"}


def test_flex_template_metadata_matches_the_build_options():
    from google.cloud.dataflow_v1beta3 import TemplateMetadata
    from google.protobuf import json_format

    metadata = load_metadata()
    json_format.ParseDict(metadata, TemplateMetadata.pb()())  # the API's schema, unknown fields rejected
    params = {p["name"]: p for p in metadata["parameters"]}
    # local-runner options: the embedded sample, multi_processing workers started cold
    assert set(params) == build_option_dests() - {"sample_tiles", "cold_workers"}
    assert len(params) == 20
    for p in params.values():
        assert p["label"] and p["helpText"] and p["regexes"], p["name"]
        assert p["isOptional"] == (p["name"] not in ("input", "output")), p["name"]
    for name, choices in (("selection", SELECTION_MODES), ("bands", BAND_SETS), ("downsample", DOWNSAMPLE_METHODS)):
        assert [o["value"] for o in params[name]["enumOptions"]] == list(choices)

    def accepts(name, value):
        return any(re.fullmatch(r, value) for r in params[name]["regexes"])

    good = {
        "input": [INPUT, "gs://b_1.x/a"], "output": [OUTPUT], "manifest": [TEXT_MANIFEST, PARQUET_MANIFEST],
        "nir_input": [INPUT], "selection": list(SELECTION_MODES), "alpha": ["0", "0.7", "1", "1.0", ".25"],
        "top_k": ["1", "16"], "lr_timesteps": ["1", "8"], "allow_fewer": ["true", "false"], "bands": list(BAND_SETS), "split": ["train_urban_set", "val-2"],
        "num_shards": ["0", "512"], "downsample": list(DOWNSAMPLE_METHODS), "read_threads": ["0", "16", "128"],
        "corrections": [f"gs://{BUCKET}/review/corrections.json",
                        f"gs://{BUCKET}/review/round1.json,gs://{BUCKET}/review/round2.json"],
        "since": [f"gs://{BUCKET}/pairs/v1", f"gs://{BUCKET}/pairs/latest.json"],
        "latest": [f"gs://{BUCKET}/pairs/latest.json"],
    }
    bad = {
        "input": ["/local/dir", "gs://", "s3://b/x"], "output": ["out/run"], "manifest": ["gs://bucket"],
        "selection": ["manual"], "alpha": ["1.5", "-0.1", "a"], "top_k": ["0", "-1", "1.5"],
        "lr_timesteps": ["0", "-2", "a"], "allow_fewer": ["yes"],
        "bands": ["rgbnir"], "split": ["a,b", ""], "num_shards": ["-1", "01"], "downsample": ["bilinear"],
        "read_threads": ["-1", "016", "1000", "a"],
        "corrections": ["corrections.json", "gs://bucket", f"gs://{BUCKET}/a.json,", f"gs://{BUCKET}/a.json,b.json"],
        "since": ["pairs/v1", "gs://bucket"], "latest": ["latest.json", f"gs://{BUCKET}/pairs/latest.txt"],
    }
    for name, values in good.items():
        for v in values:
            assert accepts(name, v), (name, v)
            PipelineOptions([f"--{name}={v}"]).view_as(BuildOptions)  # the launcher's --name=value parses
    for name, values in bad.items():
        for v in values:
            assert not accepts(name, v), (name, v)
    # Values the regexes accept are values pair_config accepts.
    opts = PipelineOptions([f"--{n}={v[-1]}" for n, v in good.items()]).view_as(BuildOptions)
    pair_config(opts)


def load_flex_main():
    spec = importlib.util.spec_from_file_location("s2naip_flex_main", DEPLOY / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flex_main_defaults_to_dataflow():
    flex_main = load_flex_main()
    assert flex_main.launcher_argv(["--input=x"]) == ["--runner=DataflowRunner", "--input=x"]
    assert flex_main.launcher_argv(["--runner=FnApiRunner"]) == ["--runner=FnApiRunner"]
    assert flex_main.launcher_argv(["--runner", "X"]) == ["--runner", "X"]


def dry_run_launch(command: str, **env) -> list[list[str]]:
    if not shutil.which("bash"):
        pytest.skip("bash is not available")
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
               "DRY_RUN": "1", "PROJECT": PROJECT, "BUCKET": BUCKET, "REGION": REGION, "IMAGE": IMAGE,
               "SERVICE_ACCOUNT": SERVICE_ACCOUNT, "INPUT": INPUT, "OUTPUT": OUTPUT,
               "MANIFEST": TEXT_MANIFEST, "JOB_NAME": "s2naip-pairs-offline-test", **env}
    out = subprocess.run(["bash", str(DEPLOY / "launch.sh"), command], env=environ, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def flags(args: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for a in args:
        if a.startswith("--"):
            name, _, value = a[2:].partition("=")
            found.setdefault(name, []).append(value)
    return found


def test_launch_script_builds_and_runs_the_flex_template(offline_dataflow):
    (image,) = [c for c in dry_run_launch("image", BUILDER="cloudbuild")]
    assert image[:3] == ["gcloud", "builds", "submit"] and f"--substitutions=_IMAGE={IMAGE}" in image
    (template,) = dry_run_launch("template")
    assert template[:4] == ["gcloud", "dataflow", "flex-template", "build"]
    t = flags(template)
    assert t["image"] == [IMAGE] and t["sdk-language"] == ["PYTHON"]
    assert t["metadata-file"] == [str(DEPLOY / "metadata.json")]

    (run,) = dry_run_launch("run", SPLIT="train_urban_set")
    assert run[:5] == ["gcloud", "dataflow", "flex-template", "run", "s2naip-pairs-offline-test"]
    r = flags(run)
    assert r["additional-experiments"] == ["use_runner_v2"]
    assert r["template-file-gcs-location"][0].startswith(f"gs://{BUCKET}/")
    assert r["service-account-email"] == [SERVICE_ACCOUNT]
    assert r["worker-machine-type"] == ["n2-standard-4"] and r["max-workers"] == ["100"]
    params = dict(p.split("=", 1) for p in r["parameters"])
    assert params["sdk_container_image"] == IMAGE and params["disk_size_gb"] == "50"
    assert params["input"] == INPUT and params["manifest"] == TEXT_MANIFEST and params["split"] == "train_urban_set"
    assert set(params) - {"sdk_container_image", "disk_size_gb"} <= {p["name"] for p in load_metadata()["parameters"]}

    # What the launcher VM then runs: main.py with the parameters as --name=value (plus the job's
    # project, region and locations, and a job file target). The job it produces is valid.
    launcher_args = [f"--{k}={v}" for k, v in params.items()] + [
        f"--project={PROJECT}", f"--region={REGION}", "--job_name=s2naip-pairs-offline-test",
        f"--staging_location={r['staging-location'][0]}", f"--temp_location={r['temp-location'][0]}",
        f"--experiments={r['additional-experiments'][0]}",
    ]
    job = offline_dataflow.run_main(load_flex_main().main, launcher_args)
    env = job.job["environment"]
    (pool,) = env["workerPools"]
    assert pool["workerHarnessContainerImage"] == IMAGE and pool["diskSizeGb"] == 50
    assert "use_runner_v2" in env["experiments"]
    assert env["sdkPipelineOptions"]["options"]["runner"] == "DataflowRunner"
    assert "BuildDataset/BuildPairs/BuildPair" in job.transforms()
    assert [c for c in job.gcs_calls if c[0] not in ("match", "exists")] == []


def test_flex_launcher_refuses_an_output_holding_a_previous_run(offline_dataflow, gcs_root, capsys):
    """A launch into an output that holds a previous run stops on the launcher with a clear error
    (the previous run.json is neither reported as this run's nor mixed with its files)."""
    old = gcs_root / BUCKET / "pairs" / "rerun" / "run.json"
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_text(json.dumps({"counts": {"tiles": 1}}))
    argv = [*DATAFLOW_ARGS, *BUILD_ARGS, f"--manifest={TEXT_MANIFEST}", f"--output=gs://{BUCKET}/pairs/rerun"]
    job_file = offline_dataflow.job_file()
    assert load_flex_main().main([*argv, f"--template_location={job_file}"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("s2naip build: error: ") and "already holds a run" in line
    assert not job_file.exists()


def test_flex_launcher_returns_without_reading_outputs(offline_dataflow):
    """On a Flex (template) launch `run()` returns before the job has run: no output is read."""
    argv = [*DATAFLOW_ARGS, *BUILD_ARGS, f"--manifest={TEXT_MANIFEST}", f"--output=gs://{BUCKET}/pairs/fresh"]
    job = offline_dataflow.run_main(load_flex_main().main, argv)
    assert not [c for c in job.gcs_calls if c[0] == "open"]


def test_launch_script_direct_submission_options(offline_dataflow):
    (direct,) = dry_run_launch("direct", NUM_SHARDS="64")
    assert direct[1:3] == ["-m", "pipelines.build_pairs"]
    from pipelines.build_pairs import main as build_main

    job = offline_dataflow.run_main(build_main, direct[3:])
    env = job.job["environment"]
    (pool,) = env["workerPools"]
    assert (pool["machineType"], pool["autoscalingSettings"]["maxNumWorkers"], pool["diskSizeGb"]) == (
        "n2-standard-4", 100, 50)
    assert pool["workerHarnessContainerImage"] == IMAGE and env["serviceAccountEmail"] == SERVICE_ACCOUNT
    assert env["sdkPipelineOptions"]["options"]["num_shards"] == 64
    assert "use_runner_v2" in env["experiments"]
