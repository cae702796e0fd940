"""The build on Apache Flink through Beam's FlinkRunner gives the in-process FnApiRunner's outputs,
and the Kubernetes deployment manifests of deploy/flink/ say what the README says.

The Flink tests need Beam's Flink job-server jar (Java 17; `deploy/flink/fetch_job_server.sh` gets
Beam's own shaded jar where the registry serves it, or builds one from the runner artifacts with
`deploy/flink/build_job_server.sh`). Where no jar is found they skip, unless S2NAIP_REQUIRE_FLINK=1
(CI), where they fail. S2NAIP_FLINK_JOB_SERVER_JAR names the jar.

On each of
* `[local]`: the job server runs Flink's runtime (a MiniCluster) in its own JVM;
* standalone: a JobManager + TaskManager session cluster on loopback (deploy/flink/local_cluster.sh,
  Flink 1.19.0's jars from Maven Central), submitted to with --flink_master=127.0.0.1:PORT;
a full build of the embedded sample, then an incremental `--since` build of a release of it (new,
changed and removed tiles) run with --parallelism=2 and must equal the FnApiRunner's builds of the
same inputs byte for byte: pairs, rejects, run.json counts, the manifest and the incremental counters.

Both use --environment_type=LOOPBACK: the Python SDK workers run in the launching process.

Everything these tests start (cluster, builds, job servers) runs in a network namespace of its own
with only a loopback interface (`loopback_net`, as root: CI): Beam's Java gRPC servers listen on every
interface and no option of theirs changes that.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import apache_beam
from pipelines import build_pairs
from transforms.build import dataset_manifest
from transforms.devdata.sample import generate_sample

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "flink"

BEAM_VERSION = apache_beam.__version__  # the launcher's (requirements.txt's pin)
# The Flink line of the job server: Maven Central serves Beam's Flink runner up to 2.70.0, for Flink
# 1.19 (beam-runners-flink-1.19, built against Flink 1.19.0); the cluster runs that Flink release.
FLINK_MAJOR = "1.19"
FLINK_VERSION = "1.19.0"
JOB_SERVER_ARTIFACT = f"beam-runners-flink-{FLINK_MAJOR}-job-server"
JAR_ENV = "S2NAIP_FLINK_JOB_SERVER_JAR"
REQUIRE_ENV = "S2NAIP_REQUIRE_FLINK"
FLINK_TIMEOUT_S = 600  # bounds one Flink build (a hang), far above its expected time
SAMPLE_TILES = 24      # the embedded sample's first 24 tiles: 20 pairs and one reject of each kind
RELEASE_TILES = 28     # the release: 4 new tiles, one changed, one removed

# What Flink's own launch scripts give the JVM on Java 17 (Kryo and the runtime reflect into these).
# The jar built by build_job_server.sh carries them in its manifest (Add-Opens); Beam's own jar does not.
JAVA17_OPENS = [
    f"--add-opens=java.base/{pkg}=ALL-UNNAMED"
    for pkg in ("java.lang", "java.net", "java.io", "java.nio", "sun.nio.ch", "java.lang.reflect", "java.text",
                "java.time", "java.util", "java.util.concurrent", "java.util.concurrent.atomic",
                "java.util.concurrent.locks")
]

# The one ERROR line a build on Flink may log: Python's data channel reading the runner's end of the
# stream ("CANCELLED: Multiplexer hanging up") while the SDK worker shuts down after the job
# (deploy/flink/README.md, "Versions"). Any other ERROR fails the test.
KNOWN_SHUTDOWN_ERROR = "Failed to read inputs in the data plane"


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0", "false", "no")


def _missing(reason: str):
    if _required():
        pytest.fail(f"{REQUIRE_ENV} is set but {reason}")
    pytest.skip(reason)


def standard_jar_path() -> Path:
    """Where `mvn dependency:get` puts Beam's own job server (the local Maven repository's layout)."""
    repo = Path(os.environ.get("MAVEN_REPO_LOCAL", Path.home() / ".m2" / "repository"))
    return (repo / "org" / "apache" / "beam" / JOB_SERVER_ARTIFACT / BEAM_VERSION
            / f"{JOB_SERVER_ARTIFACT}-{BEAM_VERSION}.jar")


def built_jar_path() -> Path | None:
    """The jar build_job_server.sh built before, if any (`--cached` runs no Maven)."""
    got = subprocess.run([str(DEPLOY / "build_job_server.sh"), "--cached"], capture_output=True, text=True)
    return Path(got.stdout.strip()) if got.returncode == 0 else None


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
            jar = built_jar_path()
        if jar is None:
            _missing(f"no Flink job server at {standard_jar_path()} nor built: run deploy/flink/fetch_job_server.sh"
                     f" or set ${JAR_ENV}")
    if shutil.which("java") is None:
        _missing("no `java` on PATH (the Flink job server is a Java program)")
    return str(jar)


@pytest.fixture(scope="module")
def loopback_net() -> list[str]:
    """The command prefix (nsenter) that runs a process in a network namespace holding only `lo`.

    Beam's Java gRPC servers (the job server's job and artifact services, the Fn API servers of
    Flink's Beam operators) bind every interface (NettyServerBuilder.forPort); in this namespace
    there is no other interface to reach them on. Needs root and unshare/nsenter/ip (util-linux,
    iproute2). Without them the processes run in the machine's namespace, except where
    S2NAIP_REQUIRE_FLINK=1 (CI), where that fails."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "nsenter", "ip")):
        if _required():
            pytest.fail(f"{REQUIRE_ENV} is set but a loopback-only network namespace needs root and "
                        "unshare, nsenter, ip")
        yield []
        return
    holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"], stdin=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        ours, deadline = os.readlink("/proc/self/ns/net"), time.monotonic() + 30
        while True:  # probe: the holder has its own namespace once unshare(2) returned
            try:
                if os.readlink(f"/proc/{holder.pid}/ns/net") != ours:
                    break
            except OSError:
                pass
            if holder.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"unshare --net did not give a network namespace (exit {holder.returncode})")
            time.sleep(0.05)
        prefix = ["nsenter", f"--net=/proc/{holder.pid}/ns/net"]
        subprocess.run([*prefix, "ip", "link", "set", "lo", "up"], check=True)
        links = subprocess.run([*prefix, "ip", "-o", "link"], check=True, capture_output=True, text=True).stdout
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"], links
        yield prefix
    finally:
        holder.kill()
        holder.wait()


def _get_json(net: list[str], url: str):
    """GET `url` from inside the namespace `net` (the cluster is reachable only there)."""
    got = subprocess.run([*net, sys.executable, "-c",
                          "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], "
                          "timeout=10).read().decode())", url], capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr[-2000:]
    return json.loads(got.stdout)


# ---------------------------------------------------------------------------------------------
# Inputs (the embedded sample, then a release of it) and the reference builds (FnApiRunner)


@pytest.fixture(scope="module")
def sample_inputs(tmp_path_factory) -> tuple[str, str]:
    """(v1, v2): the embedded sample's first 24 tiles; v2 = 28 tiles of it, where tile 0's
    Sentinel-2 RGB series is replaced (by tile 1's: a changed tile, now a bad_shape reject) and tile 2
    is removed."""
    base = tmp_path_factory.mktemp("flink_in")
    v1, v2 = str(base / "v1"), str(base / "v2")
    generate_sample(v1, SAMPLE_TILES, seed=0, extra_bands=True)
    ids = generate_sample(v2, RELEASE_TILES, seed=0, extra_bands=True).tile_ids
    xy = [t.split("/")[1] for t in ids]
    shutil.copyfile(f"{v2}/sentinel2/{xy[1]}/tci.png", f"{v2}/sentinel2/{xy[0]}/tci.png")
    shutil.rmtree(f"{v2}/naip/{ids[2]}")
    shutil.rmtree(f"{v2}/sentinel2/{xy[2]}")
    return v1, v2


def _full_args(inputs, out: str) -> list[str]:
    return ["--input", inputs[0], "--output", out, "--split", "sample"]


def _since_args(inputs, out: str, since: str) -> list[str]:
    return ["--input", inputs[1], "--output", out, "--split", "sample", "--since", since]


@pytest.fixture(scope="module")
def reference(sample_inputs, tmp_path_factory):
    """The FnApiRunner's full build of v1 and its `--since` build of v2."""
    base = tmp_path_factory.mktemp("fnapi")
    full, inc = str(base / "full"), str(base / "inc")
    got_full = build_pairs.run([*_full_args(sample_inputs, full), "--runner", "FnApiRunner"])
    got_inc = build_pairs.run([*_since_args(sample_inputs, inc, full), "--runner", "FnApiRunner"])
    result = {"full": _outputs(full, got_full["incremental"]), "inc": _outputs(inc, got_inc["incremental"])}
    assert len(result["full"]["pairs"]) == 20 and len(result["full"]["rejects"]) == 4
    assert {k: v for k, v in result["full"]["incremental"].items() if v} == {"new": 24, "processed": 24}
    inc_counts = result["inc"]["incremental"]
    assert (inc_counts["new"], inc_counts["changed"], inc_counts["removed"]) == (4, 1, 1), inc_counts
    assert inc_counts["processed"] == 5 and inc_counts["carried"] == 22, inc_counts
    return result


def _outputs(out: str, incremental: dict) -> dict:
    """Everything a run produced, in a runner-independent order (shard layout and paths aside)."""
    pairs = pq.read_table(os.path.join(out, "pairs")).sort_by("tile_id").to_pylist()
    rejects = pq.read_table(os.path.join(out, "rejects")).sort_by("tile_id").to_pylist()
    run = json.loads(Path(out, "run.json").read_text())
    options = {k: v for k, v in run["options"].items() if k != "runner"}
    # carried rows point at the --since run: where they were computed, as a flag
    rows = dataset_manifest.read_manifest(out).to_pylist()
    manifest = sorted(({k: v for k, v in r.items() if k != "computed_in"} | {"computed_here": r["computed_in"] == out}
                       for r in rows), key=lambda r: (r["tile_id"], r["outcome"]))
    return {"pairs": pairs, "rejects": rejects, "counts": run["counts"], "options": options,
            "options_hash": run["options_hash"], "manifest": manifest, "incremental": incremental,
            "runner": run["options"]["runner"]}


def _assert_same_outputs(got: dict, want: dict) -> None:
    assert [r["tile_id"] for r in got["pairs"]] == [r["tile_id"] for r in want["pairs"]]
    for g, w in zip(got["pairs"], want["pairs"]):
        assert g["lr_index"] == w["lr_index"], g["tile_id"]
        assert g["hr"] == w["hr"] and g["lr"] == w["lr"], g["tile_id"]
        assert g == w, g["tile_id"]  # every column, scores included
    assert got["rejects"] == want["rejects"]
    assert got["counts"] == want["counts"]
    assert got["options"] == want["options"] and got["options_hash"] == want["options_hash"]
    assert got["manifest"] == want["manifest"]
    # the increment's counts (run.json), every tile counted once
    assert got["incremental"] == want["incremental"]


# ---------------------------------------------------------------------------------------------
# Running a build on Flink, in a child process


def _flink_build(args: list[str], log: Path, net: list[str]) -> tuple[float, dict]:
    """`python -m pipelines.build_pairs ARGS` in its own process group; returns its wall time and the
    increment's counts its run.json holds.

    A child process keeps the job server (a JVM that Beam starts and stops), its gRPC servers and the
    LOOPBACK worker pool out of the test process, and lets a hang be ended: on timeout the group
    that this call started is killed. `net`: the loopback_net prefix (nsenter execs the build)."""
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen([*net, sys.executable, "-m", "pipelines.build_pairs", *args], cwd=REPO,
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
    text = log.read_text(errors="replace")
    errors = [line for line in text.splitlines() if re.search(r"\bERROR\b", line)
              and KNOWN_SHUTDOWN_ERROR not in line]
    assert not errors, "\n".join(errors[:20])
    run_json = Path(args[args.index("--output") + 1], "run.json")
    assert run_json.exists(), f"the build wrote no run.json; log:\n{_tail(log)}"
    return time.monotonic() - started, json.loads(run_json.read_text())["incremental"]


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


def _full_then_since(jar: str, master: str, inputs, reference, tmp_path: Path, label: str, net: list[str]) -> None:
    """The full build of v1 and the `--since` build of v2 on Flink equal the FnApiRunner's."""
    full, inc = str(tmp_path / "full"), str(tmp_path / "inc")
    seconds, counters = _flink_build([*_full_args(inputs, full), *_flink_args(jar, master)], tmp_path / "full.log",
                                    net)
    print(f"Flink {label} full build ({SAMPLE_TILES} tiles): {seconds:.1f}s")
    got = _outputs(full, counters)
    assert got["runner"] == "FlinkRunner"
    _assert_same_outputs(got, reference["full"])
    seconds, counters = _flink_build([*_since_args(inputs, inc, full), *_flink_args(jar, master)],
                                     tmp_path / "inc.log", net)
    print(f"Flink {label} --since build ({RELEASE_TILES - 1} tiles): {seconds:.1f}s")
    _assert_same_outputs(_outputs(inc, counters), reference["inc"])


def test_flink_local_gives_the_fnapi_outputs(job_server_jar, sample_inputs, reference, loopback_net, tmp_path):
    """Flink's runtime inside the job server ([local]); each build starts its own job server."""
    _full_then_since(job_server_jar, "[local]", sample_inputs, reference, tmp_path, "[local]", loopback_net)


CLUSTER_ENV = "S2NAIP_FLINK_CLUSTER"  # =1: test local_cluster.sh even without the job server


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory, loopback_net):
    """A standalone session cluster (JobManager + TaskManager) on loopback, in `loopback_net`: yields
    (host:port of its REST API, its folder); stops it afterwards and checks that both processes are gone."""
    if shutil.which("mvn") is None or shutil.which("java") is None:
        _missing("no `mvn` or `java` on PATH (the standalone cluster is Flink's jars from Maven Central)")
    workdir = tmp_path_factory.mktemp("flink_cluster")
    script = str(DEPLOY / "local_cluster.sh")
    # Flink's jars from Maven first, here: the namespace has no way out
    resolved = subprocess.run([script, "classpath"], capture_output=True, text=True, timeout=900)
    if resolved.returncode != 0:
        pytest.fail(f"could not resolve Flink {FLINK_VERSION}'s jars:\n{resolved.stderr[-4000:]}")
    started = subprocess.run([*loopback_net, script, "start", str(workdir)], capture_output=True, text=True,
                             timeout=900)
    if started.returncode != 0:
        pytest.fail(f"the standalone Flink cluster did not start:\n{started.stderr[-4000:]}")
    pids = [int((workdir / f"{p}.pid").read_text()) for p in ("jobmanager", "taskmanager")]
    url = started.stdout.strip().splitlines()[-1]
    try:
        yield url.removeprefix("http://"), workdir
    finally:
        subprocess.run([*loopback_net, script, "stop", str(workdir)], timeout=120, check=False)
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"process {pid} still runs"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def _listening_addresses(pid: int) -> set:
    """Local addresses of the TCP sockets that process `pid` listens on (Linux /proc, in its own
    network namespace)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    addresses = set()
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
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
    overview = _get_json(request.getfixturevalue("loopback_net"), f"http://{address}/overview")
    assert overview["taskmanagers"] == 1 and overview["slots-total"] == 2
    assert overview["flink-version"] == FLINK_VERSION  # the job server's Flink release
    if Path("/proc/net/tcp").exists():
        for name in ("jobmanager", "taskmanager"):
            pid = int((workdir / f"{name}.pid").read_text())
            listening = _listening_addresses(pid)
            assert listening and all(ip.is_loopback for ip in listening), (name, listening)


@pytest.fixture(scope="module")
def flink_cluster(job_server_jar, standalone_cluster) -> str:
    return standalone_cluster[0]


def test_flink_standalone_cluster_gives_the_fnapi_outputs(job_server_jar, flink_cluster, sample_inputs, reference,
                                                           loopback_net, tmp_path):
    _full_then_since(job_server_jar, flink_cluster, sample_inputs, reference, tmp_path, "standalone-cluster",
                     loopback_net)
    jobs = _get_json(loopback_net, f"http://{flink_cluster}/jobs/overview")["jobs"]
    assert [j["state"] for j in jobs] == ["FINISHED", "FINISHED"]  # both builds ran on this cluster


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
    assert spec["image"].startswith(f"flink:{FLINK_MAJOR}.")  # the job server's Flink release
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


def test_fetch_script_tries_beams_jar_then_builds_one():
    script = (DEPLOY / "fetch_job_server.sh").read_text()
    assert f'FLINK_MAJOR="${{FLINK_MAJOR:-{FLINK_MAJOR}}}"' in script
    assert f'BEAM_VERSION="${{BEAM_VERSION:-{BEAM_VERSION}}}"' in script  # = requirements.txt's pin
    assert "dependency:get" in script and "-B" in script
    assert 'beam-runners-flink-${FLINK_MAJOR}-job-server' in script
    assert script.index("dependency:get") < script.index('exec "$HERE/build_job_server.sh"')


def test_job_server_pom_and_cluster_agree_on_flink():
    """The built job server's runner is for the cluster's Flink line; the cluster runs its release."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    pom = ET.parse(DEPLOY / "job-server" / "pom.xml").getroot()
    props = {e.tag.split("}")[1]: e.text for e in pom.find("m:properties", ns)}
    assert props["flink.major"] == FLINK_MAJOR
    deps = {d.find("m:artifactId", ns).text.replace("${flink.major}", props["flink.major"]):
            d.find("m:version", ns).text for d in pom.find("m:dependencies", ns)}
    assert deps[f"beam-runners-flink-{FLINK_MAJOR}"] == "${beam.version}"
    assert deps["beam-runners-java-job-service"] == "${beam.job-service.version}"
    assert deps["beam-sdks-java-expansion-service"] == "${beam.version}"
    assert "org.apache.beam.runners.flink.FlinkJobServerDriver" in (DEPLOY / "job-server" / "pom.xml").read_text()

    cluster = ET.parse(DEPLOY / "cluster" / "pom.xml").getroot()
    assert cluster.find("m:properties/m:flink.version", ns).text == FLINK_VERSION
    script = (DEPLOY / "local_cluster.sh").read_text()
    assert f'FLINK_VERSION="${{FLINK_VERSION:-{FLINK_VERSION}}}"' in script
    (deployment,) = [d for d in _docs("flink-deployment.yaml") if d["kind"] == "FlinkDeployment"]
    assert deployment["spec"]["image"] == f"flink:{FLINK_VERSION}-java17"
    # Beam's all-to-all batch shuffles need more network buffers than Flink's default share gives
    conf = deployment["spec"]["flinkConfiguration"]
    for key in ("taskmanager.memory.network.min", "taskmanager.memory.network.max"):
        assert conf[key] == "512m" and f"{key}: 512m" in script
    key = "taskmanager.network.sort-shuffle.min-buffers"
    assert conf[key] == "64" and f"{key}: 64" in script
