"""deploy/dataflow/ as a first real launch meets it, checked offline.

* `launch.sh` runs the real `gcloud` (where the Google Cloud CLI is installed) against a fake
  Google API server on loopback (`CLOUDSDK_API_ENDPOINT_OVERRIDES_*`, a throw-away gcloud config, a
  dummy access token): the Flex Template launch request, the template spec it uploads and the IAM
  bindings of `launch.sh grant` are captured as Google would receive them. The launch's parameters
  then go through the Flex entry point (main.py) to the job Beam would submit
  (tests/test_dataflow_graph.py's offline harness).
* The image names itself: the Dockerfile bakes its name in (S2NAIP_IMAGE), and a Dataflow launch
  without --sdk_container_image (Console, REST, `s2naip index` in a Cloud Run job) runs the workers
  on it, never on Beam's stock image.
* The image's Python environment is the lock: the Dockerfile installs requirements.txt on a slim
  Python of CI's version with Beam's boot copied from the SDK image of the pinned Beam, and the lock
  is closed and consistent (what `pip check` verifies in the build) for this Python.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from pipelines import index
from pipelines.options import IMAGE_ENV, use_own_image_on_dataflow_by_default
from tests.fake_google_apis import FakeGoogleApis, gcloud_env, run_script
from tests.test_dataflow_graph import (BUCKET, IMAGE, INPUT, NAIP_ID, OUTPUT, PROJECT, REGION, SERVICE_ACCOUNT,
                                       OfflineDataflow, load_flex_main)

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "dataflow"
DOCKERFILE = DEPLOY / "Dockerfile"
MANIFEST = f"gs://{BUCKET}/manifests/ids.txt"
CORRECTIONS = f"gs://{BUCKET}/review/round1.json,gs://{BUCKET}/review/round2.json"


@pytest.fixture
def google_apis():
    fake = FakeGoogleApis()
    yield fake
    fake.close()


def gcloud_launch(command: str, apis: FakeGoogleApis, tmp_path: Path, **env) -> str:
    """`launch.sh <command>` with the real gcloud against the loopback fake."""
    return run_script(DEPLOY / "launch.sh", command, apis, {
        **gcloud_env(apis, tmp_path), "PROJECT": PROJECT, "BUCKET": BUCKET, "REGION": REGION, "IMAGE": IMAGE,
        "SERVICE_ACCOUNT": SERVICE_ACCOUNT, "INPUT": INPUT, "OUTPUT": OUTPUT, "MANIFEST": MANIFEST,
        "JOB_NAME": "s2naip-pairs-offline-test", **env})


# ---------------------------------------------------------------------------------------------
# launch.sh -> gcloud -> the Google APIs


def test_launch_request_as_dataflow_receives_it(google_apis, tmp_path):
    gcloud_launch("run", google_apis, tmp_path, FORMAT="parquet,tfrecord", CORRECTIONS=CORRECTIONS,
                  SPLIT="train_urban_set")
    (launch,) = google_apis.requests
    assert launch["method"] == "POST"
    assert launch["path"] == f"/v1b3/projects/{PROJECT}/locations/{REGION}/flexTemplates:launch"
    request = json.loads(launch["body"])["launchParameter"]
    assert request["jobName"] == "s2naip-pairs-offline-test"
    assert re.fullmatch(rf"gs://{BUCKET}/dataflow/templates/s2naip-build-pairs-[^/]+\.json",
                        request["containerSpecGcsPath"])
    params = request["parameters"]
    assert params == {"input": INPUT, "output": OUTPUT, "manifest": MANIFEST, "split": "train_urban_set",
                      "format": "parquet,tfrecord", "corrections": CORRECTIONS,  # ^~^: commas kept
                      "sdk_container_image": IMAGE, "disk_size_gb": "50"}
    env = request["environment"]
    assert env["serviceAccountEmail"] == SERVICE_ACCOUNT
    assert (env["machineType"], env["numWorkers"], env["maxWorkers"]) == ("n2-standard-4", 10, 100)
    assert env["additionalExperiments"] == ["use_runner_v2"]
    assert env["stagingLocation"] == f"gs://{BUCKET}/dataflow/staging"
    assert env["tempLocation"] == f"gs://{BUCKET}/dataflow/tmp"
    assert env["additionalUserLabels"]["app"] == "s2naip-pairs"
    # `launch.sh names` (eval'd by the READMEs) names this template and image
    names = subprocess.run(["bash", str(DEPLOY / "launch.sh"), "names"], capture_output=True, text=True, timeout=60,
                           check=True, env={"PATH": os.environ["PATH"], "PROJECT": PROJECT, "BUCKET": BUCKET,
                                            "REGION": REGION}).stdout
    exported = dict(line.removeprefix("export ").split("=", 1) for line in names.splitlines())
    assert exported["TEMPLATE_PATH"] == request["containerSpecGcsPath"]
    assert exported["IMAGE"].startswith(f"{REGION}-docker.pkg.dev/{PROJECT}/s2naip/s2naip-pairs:")


def test_flexrs_goal_reaches_the_launch_request(google_apis, tmp_path):
    gcloud_launch("run", google_apis, tmp_path, FLEXRS_GOAL="COST_OPTIMIZED", MACHINE_TYPE="n2-highcpu-4")
    (launch,) = google_apis.requests
    env = json.loads(launch["body"])["launchParameter"]["environment"]
    assert env["flexrsGoal"] == "FLEXRS_COST_OPTIMIZED" and env["machineType"] == "n2-highcpu-4"


def test_template_spec_as_uploaded(google_apis, tmp_path):
    """The spec `gcloud dataflow flex-template build` writes: the image, the metadata as given, and
    no default environment (so the image, not the spec, must know the workers' container)."""
    gcloud_launch("template", google_apis, tmp_path)
    (path, data), = google_apis.objects.items()
    assert re.fullmatch(rf"gs://{BUCKET}/dataflow/templates/s2naip-build-pairs-[^/]+\.json", path)
    spec = json.loads(data)
    assert spec["image"] == IMAGE and spec["sdkInfo"] == {"language": "PYTHON"}
    metadata = json.loads((DEPLOY / "metadata.json").read_text())
    assert metadata.pop("streaming") is False and not spec["metadata"].get("streaming")  # gcloud drops false
    assert spec["metadata"] == metadata
    assert spec.get("defaultEnvironment", {}) == {}


def test_grant_gives_the_service_account_the_image_pull_role(google_apis, tmp_path):
    gcloud_launch("grant", google_apis, tmp_path)
    member = f"serviceAccount:{SERVICE_ACCOUNT}"
    granted = {}
    for r in google_apis.requests:
        if r["path"].endswith(":setIamPolicy"):
            policy = json.loads(r["body"])["policy"]
        elif r["method"] == "PUT" and r["path"].endswith("/iam"):
            policy = json.loads(r["body"])
        else:
            continue
        granted[r["path"]] = {b["role"] for b in policy["bindings"] if member in b["members"]}
    assert granted == {
        f"/v1/projects/{PROJECT}/locations/{REGION}/repositories/s2naip:setIamPolicy":
            {"roles/artifactregistry.reader"},
        f"/v1/projects/{PROJECT}:setIamPolicy": {"roles/dataflow.worker"},
        f"/storage/v1/b/{BUCKET}/iam": {"roles/storage.objectAdmin"},
    }


def test_grant_without_a_service_account_is_a_one_line_error():
    environ = {"PATH": os.environ["PATH"], "PROJECT": PROJECT, "BUCKET": BUCKET, "DRY_RUN": "1"}
    done = subprocess.run(["bash", str(DEPLOY / "launch.sh"), "grant"], env=environ, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: set SERVICE_ACCOUNT") and done.stderr.count("\n") == 1


def test_launch_parameters_build_the_job_on_the_image(google_apis, tmp_path, monkeypatch):
    """The captured launch, as the launcher VM runs it: main.py gets the parameters as --name=value."""
    gcloud_launch("run", google_apis, tmp_path)
    request = json.loads(google_apis.requests[0]["body"])["launchParameter"]
    env = request["environment"]
    argv = [f"--{k}={v}" for k, v in request["parameters"].items()] + [
        f"--project={PROJECT}", f"--region={REGION}", f"--job_name={request['jobName']}",
        f"--staging_location={env['stagingLocation']}", f"--temp_location={env['tempLocation']}",
        f"--experiments={env['additionalExperiments'][0]}"]
    job = offline_harness(monkeypatch, tmp_path).run_main(load_flex_main().main, argv)
    assert worker_images(job) == [IMAGE]


# ---------------------------------------------------------------------------------------------
# The image names itself


def offline_harness(monkeypatch, tmp_path) -> OfflineDataflow:
    root = tmp_path / "gcs"
    (root / BUCKET / "manifests").mkdir(parents=True)
    (root / BUCKET / "manifests" / "ids.txt").write_text(f"{NAIP_ID}/35000_55000\n")
    work = tmp_path / "jobs"
    work.mkdir()
    return OfflineDataflow(monkeypatch, root, work)


def worker_images(job) -> list[str]:
    (pool,) = job.job["environment"]["workerPools"]
    images = [c["containerImage"] for c in pool.get("sdkHarnessContainerImages", [])]
    assert pool["workerHarnessContainerImage"] in images
    return images


CONSOLE_LAUNCH = [  # what a launch from the Console or the REST API passes: no sdk_container_image
    f"--input={INPUT}", f"--output={OUTPUT}", f"--manifest={MANIFEST}", f"--project={PROJECT}",
    f"--region={REGION}", "--job_name=s2naip-pairs-console", f"--temp_location=gs://{BUCKET}/dataflow/tmp",
    f"--staging_location=gs://{BUCKET}/dataflow/staging", "--experiments=use_runner_v2"]


def test_flex_launch_without_sdk_container_image_uses_the_image_it_runs_in(monkeypatch, tmp_path):
    harness = offline_harness(monkeypatch, tmp_path)
    monkeypatch.delenv(IMAGE_ENV, raising=False)
    stock = worker_images(harness.run_main(load_flex_main().main, CONSOLE_LAUNCH))
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert stock == [f"gcr.io/cloud-dataflow/v1beta3/beam_python{py}_sdk:{lock()['apache-beam'][1]}"]  # Beam's

    monkeypatch.setenv(IMAGE_ENV, IMAGE)
    job = harness.run_main(load_flex_main().main, CONSOLE_LAUNCH)
    assert worker_images(job) == [IMAGE]
    assert job.job["environment"]["sdkPipelineOptions"]["options"]["sdk_container_image"] == IMAGE
    staged = {p["name"] for p in job.job["environment"]["workerPools"][0].get("packages", [])}
    assert staged <= {"pickled_main_session", "submission_environment_dependencies.txt"}, staged

    other = "us-docker.pkg.dev/elsewhere/s2naip/s2naip-pairs:other"
    job = harness.run_main(load_flex_main().main, [*CONSOLE_LAUNCH, f"--sdk_container_image={other}"])
    assert worker_images(job) == [other]  # an explicit image wins


def test_index_on_dataflow_without_sdk_container_image_uses_the_image(monkeypatch, tmp_path, capsys):
    harness = offline_harness(monkeypatch, tmp_path)
    monkeypatch.setenv(IMAGE_ENV, IMAGE)
    argv = [f"--input={INPUT}", f"--manifest=gs://{BUCKET}/manifests/new.txt", "--runner=DataflowRunner",
            *CONSOLE_LAUNCH[3:]]
    job = harness.run_main(index.main, argv)
    assert worker_images(job) == [IMAGE]
    assert any(name.startswith("ListTileIds") for name in job.transforms())


@pytest.mark.parametrize("runner, applies", [
    ("DataflowRunner", True), ("dataflow", True),
    ("apache_beam.runners.dataflow.dataflow_runner.DataflowRunner", True),
    ("FnApiRunner", False), ("PortableRunner", False), (None, False),
])
def test_image_default_only_on_dataflow(monkeypatch, runner, applies):
    from apache_beam.options.pipeline_options import PipelineOptions, WorkerOptions

    monkeypatch.setenv(IMAGE_ENV, IMAGE)
    options = PipelineOptions([f"--runner={runner}"] if runner else [])
    use_own_image_on_dataflow_by_default(options)
    assert options.view_as(WorkerOptions).sdk_container_image == (IMAGE if applies else None)

    monkeypatch.setenv(IMAGE_ENV, "")  # outside the image: nothing changes
    options = PipelineOptions(["--runner=DataflowRunner"])
    use_own_image_on_dataflow_by_default(options)
    assert options.view_as(WorkerOptions).sdk_container_image is None


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))


def test_image_is_built_with_its_own_name():
    dockerfile = DOCKERFILE.read_text()
    assert re.search(rf"^ARG {IMAGE_ENV}$", dockerfile, re.M)
    assert re.search(rf'^ENV {IMAGE_ENV}="\$\{{{IMAGE_ENV}\}}"$', dockerfile, re.M)
    # A build without the name fails instead of producing an image that cannot name itself.
    assert re.search(rf'^RUN test -n "\$\{{{IMAGE_ENV}\}}" \\$', dockerfile, re.M)
    # Both builders pass the name the image is pushed as.
    environ = {"PATH": os.environ["PATH"], "PROJECT": PROJECT, "BUCKET": BUCKET, "IMAGE": IMAGE, "DRY_RUN": "1"}
    out = subprocess.run(["bash", str(DEPLOY / "launch.sh"), "image"], env=environ, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split("\n")
    build = out[0].split()
    assert build[:2] == ["docker", "build"]
    assert build[build.index("--build-arg") + 1] == f"{IMAGE_ENV}={IMAGE}" and build[build.index("-t") + 1] == IMAGE
    import yaml

    (step,) = yaml.safe_load((DEPLOY / "cloudbuild.yaml").read_text())["steps"]
    args = step["args"]
    assert args[args.index("--build-arg") + 1] == f"{IMAGE_ENV}=${{_IMAGE}}"
    assert args[args.index("-t") + 1] == "${_IMAGE}"


# ---------------------------------------------------------------------------------------------
# The image's bases, its Python environment (the lock), its build context


def lock() -> dict[str, tuple[str, Version, set[str]]]:
    """requirements.txt: canonical name -> (name as written, pinned version, extras)."""
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", line
        key = canonicalize_name(req.name)
        assert key not in pins, f"{req.name} pinned twice"
        pins[key] = (req.name, Version(spec.version), set(req.extras))
    return pins


def test_dockerfile_bases_are_pinned_and_match_the_lock():
    dockerfile = DOCKERFILE.read_text()
    args = dockerfile_args()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    beam_pin = lock()["apache-beam"][1]
    # Python of CI, on a patch-level tag; Beam's boot from the SDK image of the pinned Beam and Python.
    assert re.fullmatch(rf"python:{re.escape(py)}\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{{64}})?", args["PYTHON_BASE"])
    assert args["BEAM_SDK_IMAGE"] == f"apache/beam_python{py}_sdk:{beam_pin}"
    # The launcher binary from a dated release of the launcher base image of the same Python.
    launcher = args["LAUNCHER_BASE"]
    assert launcher.startswith(f"gcr.io/dataflow-templates-base/python{py.replace('.', '')}-template-launcher-base")
    assert re.search(r":20\d{6}[-_]\w+$|@sha256:[0-9a-f]{64}$", launcher), launcher
    for arg in args.values():
        assert not arg.endswith(":latest"), arg
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", dockerfile, re.M)
    assert froms == [("${BEAM_SDK_IMAGE}", "beam"), ("${LAUNCHER_BASE}", "launcher"), ("${PYTHON_BASE}", "")]
    assert "COPY --from=beam /opt/apache/beam /opt/apache/beam" in dockerfile
    assert ("COPY --from=launcher /opt/google/dataflow/python_template_launcher "
            "/opt/google/dataflow/python_template_launcher") in dockerfile
    # The environment is the lock, then the project without dependencies, checked.
    assert re.search(r"^RUN pip install --no-cache-dir -r requirements\.txt$", dockerfile, re.M)
    assert re.search(r"^RUN pip install --no-cache-dir --no-deps \. \\\n\s+&& pip check", dockerfile, re.M)
    for path in ("requirements.txt", "setup.py", "pipelines", "transforms", "deploy/dataflow/main.py"):
        assert re.search(rf"^COPY {re.escape(path)} ", dockerfile, re.M), path
    assert re.search(r'^ENV FLEX_TEMPLATE_PYTHON_PY_FILE="\$\{WORKDIR\}/main\.py"', dockerfile, re.M)
    assert not re.search(r"^ENV FLEX_TEMPLATE_PYTHON_(SETUP|REQUIREMENTS)_FILE", dockerfile, re.M)
    assert dockerfile.rstrip().endswith('ENTRYPOINT ["/opt/apache/beam/boot"]')


def test_lock_is_closed_and_consistent():
    """What `pip install -r requirements.txt && pip check` needs on a bare Python of this version:
    every requirement of every pinned package (with the extras asked for, markers evaluated for this
    Python and Linux) is pinned, at a version that satisfies it. Requirements are read from the
    installed distributions, which must be the pinned versions (the tests run on the lock)."""
    pins = lock()
    installed = {}
    for key, (name, version, _) in pins.items():
        try:
            dist = importlib_metadata.distribution(name)
        except importlib_metadata.PackageNotFoundError:
            pytest.fail(f"{name}=={version} is pinned but not installed: install requirements.txt")
        assert Version(dist.version) == version, f"{name}: installed {dist.version}, pinned {version}"
        installed[key] = dist
    environment = default_environment()
    todo = [(key, frozenset(extras)) for key, (_, _, extras) in pins.items()]
    seen, problems = set(), []
    while todo:
        key, extras = todo.pop()
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        for text in installed[key].requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({**environment, "extra": e})
                                      for e in (extras or {""})):
                continue
            dep = canonicalize_name(req.name)
            if dep not in pins:
                problems.append(f"{key} needs {req}, which is not pinned")
            elif not req.specifier.contains(pins[dep][1], prereleases=True):
                problems.append(f"{key} needs {req}, the lock pins {pins[dep][1]}")
            else:
                todo.append((dep, frozenset(req.extras)))
    assert not problems, "\n".join(problems)


def docker_pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: `*` and `?` within one path element, `**` any depth."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] in "*?":
            out, i = out + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = docker_pattern(pattern.lstrip("!").rstrip("/"))
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_what_the_image_copies():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copied = [source for dockerfile in (DOCKERFILE, REPO / "deploy" / "flink" / "Dockerfile.worker")
              for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile.read_text(), re.M)
              for source in line.split()[:-1]]
    assert {"requirements.txt", "setup.py", "pipelines", "transforms", "deploy/dataflow/main.py"} <= set(copied)
    for path in copied:
        assert (REPO / path).exists(), path
        probe = path if (REPO / path).is_file() else f"{path}/__init__.py"
        assert not dockerignore_excludes(probe, patterns), path
    for path in ("transforms/quality/review_assets/page.html", "pipelines/cli.py"):
        assert not dockerignore_excludes(path, patterns), path
    for path in (".venv/bin/python", ".git/HEAD", "out/pairs/x.parquet", "sample/naip/a.png", "bench-out/r.json",
                 "tests/test_pipeline.py", "deploy/dataflow/launch.sh", "README.md",
                 "pipelines/__pycache__/cli.cpython-311.pyc", "s2naip_pairs.egg-info/PKG-INFO"):
        assert dockerignore_excludes(path, patterns), path
