"""The build on Apache Flink through Beam's FlinkRunner gives the in-process FnApiRunner's outputs,
and the Kubernetes deployment manifests of deploy/flink/ say what the README says.

The Flink tests need Beam's Flink job-server jar (Java; `deploy/flink/fetch_job_server.sh` puts it in
the local Maven repository) and `java` (17). Where the jar is absent they skip, unless
S2NAIP_REQUIRE_FLINK=1 (CI), where they fail. S2NAIP_FLINK_JOB_SERVER_JAR names another jar.

* `[local]`: the job server runs Flink's runtime (a MiniCluster) in its own JVM;
* standalone: a JobManager + TaskManager session cluster on loopback (deploy/flink/local_cluster.sh,
  Flink's jars from Maven Central), submitted to with --flink_master=127.0.0.1:PORT.

Both use --environment_type=LOOPBACK: the Python SDK workers run in the launching process.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

import apache_beam
from pipelines import build_pairs
from tests.tile_factory import NAIP_ID, black_edge, good_tile, scene, series_from, write_png, write_tile

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "flink"

BEAM_VERSION = apache_beam.__version__
# Newest Flink line Beam publishes a job server for (FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS[-1]
# in Beam 2.77: 1.19, 1.20, 2.0, 2.1, 2.2).
FLINK_MAJOR = "2.2"
JOB_SERVER_ARTIFACT = f"beam-runners-flink-{FLINK_MAJOR}-job-server"
JAR_ENV = "S2NAIP_FLINK_JOB_SERVER_JAR"
REQUIRE_ENV = "S2NAIP_REQUIRE_FLINK"
FLINK_TIMEOUT_S = 600  # bounds one Flink build (a hang), far above its expected time

# What Flink's own launch scripts give the JVM on Java 17 (Kryo and the runtime reflect into these).
JAVA17_OPENS = [
    f"--add-opens=java.base/{pkg}=ALL-UNNAMED"
    for pkg in ("java.lang", "java.net", "java.io", "java.nio", "sun.nio.ch", "java.lang.reflect", "java.text",
                "java.time", "java.util", "java.util.concurrent", "java.util.concurrent.atomic",
                "java.util.concurrent.locks")
]


def tid(i: int) -> str:
    return f"{NAIP_ID}/{36000 + i}_56000"


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0", "false", "no")


def _missing(reason: str):
    if _required():
        pytest.fail(f"{REQUIRE_ENV} is set but {reason}")
    pytest.skip(reason)


def standard_jar_path() -> Path:
    """Where `mvn dependency:get` puts the job server (the local Maven repository's layout)."""
    repo = Path(os.environ.get("MAVEN_REPO_LOCAL", Path.home() / ".m2" / "repository"))
    return (repo / "org" / "apache" / "beam" / JOB_SERVER_ARTIFACT / BEAM_VERSION
            / f"{JOB_SERVER_ARTIFACT}-{BEAM_VERSION}.jar")


@pytest.fixture(scope="module")
def job_server_jar() -> str:
    env = os.environ.get(JAR_ENV)
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"${JAR_ENV}={env!r} is not a file")
        jar = Path(env)
    else:
        jar = standard_jar_path()
        if not jar.is_file():
            _missing(f"no Flink job server at {jar}: run deploy/flink/fetch_job_server.sh or set ${JAR_ENV}")
    if shutil.which("java") is None:
        _missing("no `java` on PATH (the Flink job server is a Java program)")
    return str(jar)


# ---------------------------------------------------------------------------------------------
# Input and the reference build (FnApiRunner)


@pytest.fixture(scope="module")
def sample_input(tmp_path_factory) -> str:
    """8 tiles: 6 good ones, a NAIP tile with a black border, one whose every timestep has one."""
    root = str(tmp_path_factory.mktemp("flink_in"))
    for i in range(6):
        good_tile(root, tid(i), seed=100 + i, t=8 + i)
    good_tile(root, tid(6), seed=106, t=6)
    rgb = np.asarray(scene(np.random.default_rng(7))[..., :3])
    rgb[:, :4] = 0  # black left edge: naip_black_border
    write_png(os.path.join(root, "naip", NAIP_ID, "36006_56000", "rgb.png"), rgb)
    rng = np.random.default_rng(8)
    hr = scene(rng)
    write_tile(root, tid(7), hr, np.stack([black_edge(f) for f in series_from(hr, rng, 5)]))
    return root


def _common_args(root: str, out: str) -> list[str]:
    return ["--input", root, "--output", out, "--split", "flink", "--top-k", "4"]


@pytest.fixture(scope="module")
def reference(sample_input, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fnapi") / "out")
    build_pairs.run([*_common_args(sample_input, out), "--runner", "FnApiRunner"])
    result = _outputs(out)
    assert len(result["pairs"]) == 6
    assert [(r["tile_id"], r["reason"]) for r in result["rejects"]] == [
        (tid(6), "naip_black_border"), (tid(7), "no_valid_timesteps")]
    return result


def _outputs(out: str) -> dict:
    """Everything a run produced, in a runner-independent order (shard layout aside)."""
    pairs = pq.read_table(os.path.join(out, "pairs")).sort_by("tile_id").to_pylist()
    rejects = pq.read_table(os.path.join(out, "rejects")).sort_by("tile_id").to_pylist()
    run = json.loads(Path(out, "run.json").read_text())
    options = {k: v for k, v in run["options"].items() if k != "runner"}
    return {"pairs": pairs, "rejects": rejects, "counts": run["counts"], "options": options,
            "runner": run["options"]["runner"]}


def _assert_same_outputs(got: dict, want: dict) -> None:
    assert [r["tile_id"] for r in got["pairs"]] == [r["tile_id"] for r in want["pairs"]]
    for g, w in zip(got["pairs"], want["pairs"]):
        assert g["lr_index"] == w["lr_index"], g["tile_id"]
        assert g["hr"] == w["hr"] and g["lr"] == w["lr"], g["tile_id"]
        assert g == w, g["tile_id"]  # every column, scores included
    assert got["rejects"] == want["rejects"]
    assert got["counts"] == want["counts"]
    assert got["options"] == want["options"]


# ---------------------------------------------------------------------------------------------
# Running a build on Flink, in a child process


def _flink_build(args: list[str], log: Path) -> float:
    """`python -m pipelines.build_pairs ARGS` in its own process group; returns its wall time.

    A child process keeps the job server (a JVM that Beam starts and stops), its gRPC servers and the
    LOOPBACK worker pool out of the test process, and lets a hang be ended: on timeout the group
    that this call started is killed."""
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.build_pairs", *args], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=FLINK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"the Flink build did not finish in {FLINK_TIMEOUT_S}s; log:\n{_tail(log)}")
    if rc != 0:
        pytest.fail(f"the Flink build exited with {rc}; log:\n{_tail(log)}")
    return time.monotonic() - started


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _flink_args(jar: str, master: str) -> list[str]:
    return [
        "--runner", "FlinkRunner",
        f"--flink_master={master}",
        "--flink_job_server_jar", jar,
        "--environment_type=LOOPBACK",
        # An explicit parallelism: Beam would take the machine's core count for [local], and a
        # session cluster must have this many free slots (local_cluster.sh gives 2).
        "--parallelism=2",
        *[f"--job_server_jvm_property={p}" for p in JAVA17_OPENS],
    ]


@pytest.mark.parametrize("attempt", [1, 2])
def test_flink_local_gives_the_fnapi_pairs(attempt, job_server_jar, sample_input, reference, tmp_path):
    """Flink's runtime inside the job server ([local]); run twice: Beam picks fresh ports each time."""
    out = str(tmp_path / "out")
    seconds = _flink_build([*_common_args(sample_input, out), *_flink_args(job_server_jar, "[local]")],
                           tmp_path / "build.log")
    print(f"Flink [local] build #{attempt}: {seconds:.1f}s")
    got = _outputs(out)
    assert got["runner"] == "FlinkRunner"
    _assert_same_outputs(got, reference)


CLUSTER_ENV = "S2NAIP_FLINK_CLUSTER"  # =1: test local_cluster.sh even without the job server


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory):
    """A standalone session cluster (JobManager + TaskManager) on loopback: yields (host:port of its
    REST API, its folder); stops it afterwards and checks that both processes are gone."""
    if shutil.which("mvn") is None or shutil.which("java") is None:
        _missing("no `mvn` or `java` on PATH (the standalone cluster is Flink's jars from Maven Central)")
    workdir = tmp_path_factory.mktemp("flink_cluster")
    script = str(DEPLOY / "local_cluster.sh")
    started = subprocess.run([script, "start", str(workdir)], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.fail(f"the standalone Flink cluster did not start:\n{started.stderr[-4000:]}")
    pids = [int((workdir / f"{p}.pid").read_text()) for p in ("jobmanager", "taskmanager")]
    url = started.stdout.strip().splitlines()[-1]
    try:
        yield url.removeprefix("http://"), workdir
    finally:
        subprocess.run([script, "stop", str(workdir)], timeout=120, check=False)
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"process {pid} still runs"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def _listening_addresses(pid: int) -> set:
    """Local addresses of the TCP sockets that process `pid` listens on (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                hex_ip = fields[1].split(":")[0]
                raw = bytes.fromhex(hex_ip)
                # /proc stores each 32-bit word in host (little-endian) order
                words = [raw[i:i + 4][::-1] for i in range(0, len(raw), 4)]
                ip = ipaddress.ip_address(b"".join(words))
                addresses.add(getattr(ip, "ipv4_mapped", None) or ip)
    return addresses


def test_standalone_cluster_starts_on_loopback(request):
    """deploy/flink/local_cluster.sh: ready means a TaskManager with 2 free slots; nothing listens
    beyond loopback. Runs with the Flink tests, or alone with S2NAIP_FLINK_CLUSTER=1."""
    if not (_required() or os.environ.get(CLUSTER_ENV) == "1"):
        request.getfixturevalue("job_server_jar")  # skips without the jar, like the other Flink tests
    address, workdir = request.getfixturevalue("standalone_cluster")
    with urllib.request.urlopen(f"http://{address}/overview", timeout=10) as resp:
        overview = json.load(resp)
    assert overview["taskmanagers"] == 1 and overview["slots-total"] == 2
    assert overview["flink-version"].startswith(FLINK_MAJOR + ".")
    if Path("/proc/net/tcp").exists():
        for name in ("jobmanager", "taskmanager"):
            pid = int((workdir / f"{name}.pid").read_text())
            listening = _listening_addresses(pid)
            assert listening and all(ip.is_loopback for ip in listening), (name, listening)


@pytest.fixture(scope="module")
def flink_cluster(job_server_jar, standalone_cluster) -> str:
    return standalone_cluster[0]


def test_flink_standalone_cluster_gives_the_fnapi_pairs(job_server_jar, flink_cluster, sample_input, reference,
                                                         tmp_path):
    out = str(tmp_path / "out")
    seconds = _flink_build([*_common_args(sample_input, out), *_flink_args(job_server_jar, flink_cluster)],
                           tmp_path / "build.log")
    print(f"Flink standalone-cluster build: {seconds:.1f}s")
    _assert_same_outputs(_outputs(out), reference)
    with urllib.request.urlopen(f"http://{flink_cluster}/jobs/overview", timeout=10) as resp:
        jobs = json.load(resp)["jobs"]
    assert [j["state"] for j in jobs] == ["FINISHED"]  # the build ran on this cluster


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests (always run: no Flink needed)


def _docs(name: str) -> list[dict]:
    with open(DEPLOY / name) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def test_flink_deployment_manifest():
    (deployment,) = [d for d in _docs("flink-deployment.yaml") if d["kind"] == "FlinkDeployment"]
    assert deployment["apiVersion"] == "flink.apache.org/v1beta1"
    spec = deployment["spec"]
    assert spec["flinkVersion"] == "v" + FLINK_MAJOR.replace(".", "_")  # the job server's Flink line
    assert spec["image"].startswith(f"flink:{FLINK_MAJOR}.")
    assert "job" not in spec  # a session cluster: Beam's job server submits the jobs
    slots = int(spec["flinkConfiguration"]["taskmanager.numberOfTaskSlots"])
    assert slots >= 1

    containers = {c["name"]: c for c in spec["taskManager"]["podTemplate"]["spec"]["containers"]}
    assert "flink-main-container" in containers
    pool = containers["beam-worker-pool"]
    assert pool["image"] == f"apache/beam_python3.11_sdk:{BEAM_VERSION}"
    assert pool["args"] == ["--worker_pool"]
    assert [p["containerPort"] for p in pool["ports"]] == [50000]
    assert pool["livenessProbe"]["tcpSocket"]["port"] == 50000


def test_readme_launch_command_matches_the_manifest():
    readme = (DEPLOY / "README.md").read_text()
    for flag in ("--runner FlinkRunner", "--environment_type=EXTERNAL", "--environment_config=localhost:50000",
                 f"--flink_version={FLINK_MAJOR}", "--flink_submit_uber_jar"):
        assert flag in readme, flag
    (deployment,) = [d for d in _docs("flink-deployment.yaml") if d["kind"] == "FlinkDeployment"]
    spec = deployment["spec"]
    assert f"--flink_master={deployment['metadata']['name']}-rest" in readme
    assert f"apache/beam_python3.11_sdk:{BEAM_VERSION}" in readme
    # one Python worker per slot; the build's parallelism = every slot of the cluster
    slots = int(spec["flinkConfiguration"]["taskmanager.numberOfTaskSlots"])
    assert f"--sdk_worker_parallelism={slots}" in readme
    assert f"--parallelism={slots * spec['taskManager']['replicas']}" in readme
    dockerfile = (DEPLOY / "Dockerfile.worker").read_text()
    assert f"FROM apache/beam_python3.11_sdk:{BEAM_VERSION}\n" in dockerfile


def test_fetch_script_names_the_tested_job_server():
    script = (DEPLOY / "fetch_job_server.sh").read_text()
    assert f'FLINK_MAJOR="${{FLINK_MAJOR:-{FLINK_MAJOR}}}"' in script
    assert f'BEAM_VERSION="${{BEAM_VERSION:-{BEAM_VERSION}}}"' in script  # = requirements.txt's pin
    assert "dependency:get" in script and "-B" in script
    assert 'beam-runners-flink-${FLINK_MAJOR}-job-server' in script
