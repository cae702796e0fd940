"""Shared pytest fixtures, and the CI guard against skipped tests.

REQUIRE variables turn a missing prerequisite into a failure instead of a skip:
  S2NAIP_REQUIRE_ALL=1      (set by .ci/run) every skip fails the run, except the ones listed in
                            ALLOWED_SKIPS with their reason; implies every variable below
  S2NAIP_REQUIRE_REAL_DATA=1  the real NAIP GeoTIFFs (S2NAIP_REAL_DATA or ../shared/data/naip_real)
  S2NAIP_REQUIRE_SERVERS=1  the loopback NAIP servers, and so the real data they serve
  S2NAIP_REQUIRE_BROWSER=1, S2NAIP_REQUIRE_FLINK=1, S2NAIP_REQUIRE_TENSORFLOW=1  (their tests)
docs/testing.md lists them all.

The `integration` marker (pytest.ini) is set here on every test that starts servers, a browser,
Flink, the GCS emulator, the fake Google APIs or Airflow: `pytest -m "not integration"` is the fast
local loop, CI runs everything. Those tests get INTEGRATION_TIMEOUT_S instead of pytest.ini's
per-test timeout (their fixtures start processes); a test marked `timeout` keeps its own. A test
that starts such a server itself (not through a fixture) carries `@pytest.mark.integration` directly.
"""
import os
import re
from pathlib import Path

import pytest

REQUIRE_ALL_ENV = "S2NAIP_REQUIRE_ALL"


def required(*names: str) -> str | None:
    """The first of the REQUIRE variables `names` (or S2NAIP_REQUIRE_ALL) that is set, else None."""
    for name in (*names, REQUIRE_ALL_ENV):
        if os.environ.get(name, "") not in ("", "0", "false", "no"):
            return name
    return None


def skip_unless_required(message: str, *names: str) -> None:
    """pytest.skip(message), or pytest.fail when one of the REQUIRE variables `names` is set."""
    name = required(*names)
    if name:
        pytest.fail(f"{message} (${name} is set: this prerequisite is mandatory)", pytrace=False)
    pytest.skip(message)


# Skips that stay skips even under S2NAIP_REQUIRE_ALL: (test id regex, reason regex, why).
# Keep it short; every entry is documented in docs/testing.md.
ALLOWED_SKIPS: list[tuple[str, str, str]] = [
    (r"tests/test_scheduler\.py::test_airflow_dag_task_graph", r"airflow",
     "Apache Airflow and its Google provider pin their own google-cloud-* versions that conflict with the "
     "lock; the DAG is checked statically (ast) by the other scheduler tests"),
    (r"tests/test_bench\.py::test_bench_against_the_companion_code", r"companion code",
     "the paper's published code needs torch (several GB, no project dependency) and a checkout of it; "
     "the argument checks and ratios of `bench --companion-repo` are tested without it"),
    (r"tests/test_real_s2_series\.py::test_mtsr_", r"S2NAIP_MTSR_REPO names no checkout",
     "the second real Sentinel-2 source (real L1C chips of Lithuania, sentinel-hub/multi-temporal-super-resolution "
     "test data) is on GitHub only, which CI cannot reach; its import, scaling and tiles are tested on fake "
     "chips everywhere, the real chips where a checkout is named (docs/selection-evaluation.md)"),
    (r"tests/test_multi_timestep\.py::test_the_real_satlas_class_", r"S2NAIP_SATLAS_REPO names no checkout",
     "the training code's S2NAIPDataset (allenai/satlas-super-resolution) is on GitHub only, which CI cannot "
     "reach, and no PyPI package ships it; its numpy restatement runs everywhere, and these tests check it "
     "against the real class where a checkout is named (docs/outputs.md, multi-timestep pairs)"),
]


def _allowed(nodeid: str, reason: str) -> bool:
    return any(re.search(i, nodeid) and re.search(r, reason) for i, r, _ in ALLOWED_SKIPS)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


# Whole modules, and the fixtures whose tests, that are integration tests (see the docstring).
INTEGRATION_MODULES = frozenset({"test_flink.py", "test_gcs.py", "test_dataflow_deploy.py", "test_dataflow_graph.py",
                                 "test_scheduler.py"})
INTEGRATION_FIXTURES = frozenset({"gcs_emulator", "gcs_env", "naip_servers", "browser", "google_apis"})
INTEGRATION_TIMEOUT_S = 900


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in INTEGRATION_MODULES or INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(INTEGRATION_TIMEOUT_S))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under S2NAIP_REQUIRE_ALL=1 a skipped (or xfailed) test is reported as failed, with the skip's
    reason, unless ALLOWED_SKIPS lists it."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or not required():
        return
    if hasattr(report, "wasxfail"):
        reason = f"xfail: {report.wasxfail}"
    else:
        reason = _skip_reason(report)
    if _allowed(item.nodeid, reason):
        return
    report.outcome = "failed"
    report.longrepr = f"skipped under ${REQUIRE_ALL_ENV}=1 (CI allows no skip): {reason}"


def pytest_sessionfinish(session, exitstatus):
    """The backstop: any skip left (a whole module skipped at collection) fails the run under
    S2NAIP_REQUIRE_ALL=1, with its reason."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not required() or reporter is None:
        return
    left = [r for r in reporter.stats.get("skipped", []) if not _allowed(r.nodeid, _skip_reason(r))]
    if left:
        reporter.write_line(f"{len(left)} skip(s) under ${REQUIRE_ALL_ENV}=1 (CI allows no skip):", red=True)
        for r in left:
            reporter.write_line(f"  {r.nodeid}: {_skip_reason(r)}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- real NAIP data (transforms/devdata/real_tiles.py) -------------------------------------------------------

REAL_DATA_ENV = "S2NAIP_REAL_DATA"
DEFAULT_REAL_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "naip_real"


@pytest.fixture(scope="session")
def real_naip_dir() -> Path:
    """The folder of real NAIP GeoTIFFs (m_*.tif) that transforms/devdata/real_tiles.py builds tiles from.

    $S2NAIP_REAL_DATA if set (then it must exist and hold GeoTIFFs, or the session errors);
    else <repo>/../shared/data/naip_real if it exists; else every test using it is skipped, unless
    S2NAIP_REQUIRE_REAL_DATA, S2NAIP_REQUIRE_SERVERS (the servers serve this data) or
    S2NAIP_REQUIRE_ALL is set: then it fails. Never copy these files, or tiles built from them, into
    the project.
    """
    env = os.environ.get(REAL_DATA_ENV)
    if env:
        path = Path(env)
        if not path.is_dir():
            raise FileNotFoundError(f"${REAL_DATA_ENV}={env!r} is not a directory")
    else:
        path = DEFAULT_REAL_DATA_DIR
        if not path.is_dir():
            skip_unless_required(f"no real NAIP data: set ${REAL_DATA_ENV} or provide {path}",
                                 "S2NAIP_REQUIRE_REAL_DATA", "S2NAIP_REQUIRE_SERVERS")
    if not any(path.glob("m_*.tif")):
        raise FileNotFoundError(f"real NAIP data folder {path} holds no m_*.tif GeoTIFFs")
    return path


@pytest.fixture(scope="session")
def real_tile_set(real_naip_dir, tmp_path_factory):
    """(root, [RealTile]): 20 tiles built once per session from the real data, default settings."""
    from transforms.devdata.real_tiles import build_real_tiles

    root = tmp_path_factory.mktemp("real_s2naip")
    return root, build_real_tiles(root, real_naip_dir, n_tiles=20, seed=0)


# --- real Sentinel-2 (transforms/devdata/real_s2.py) ---------------------------------------------------

REAL_S2_ENV = "S2NAIP_REAL_S2"
DEFAULT_REAL_S2_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "real_s2"


@pytest.fixture(scope="session")
def real_s2_dir() -> Path:
    """The folder of real Sentinel-2 data holding eolearn/ (transforms/devdata/real_s2.py).

    $S2NAIP_REAL_S2 if set (then it must exist and hold eolearn/REFERENCE_SCENES.npy, or the session
    errors); else <repo>/../shared/data/real_s2 if it exists; else every test using it is skipped.
    Never copy these files, or anything built from them, into the project.
    """
    env = os.environ.get(REAL_S2_ENV)
    if env:
        path = Path(env)
        if not path.is_dir():
            raise FileNotFoundError(f"${REAL_S2_ENV}={env!r} is not a directory")
    else:
        path = DEFAULT_REAL_S2_DIR
        if not path.is_dir():
            skip_unless_required(f"no real Sentinel-2 data: set ${REAL_S2_ENV} or provide {path}",
                                 "S2NAIP_REQUIRE_REAL_DATA")
    if not (path / "eolearn" / "REFERENCE_SCENES.npy").is_file():
        raise FileNotFoundError(f"real Sentinel-2 folder {path} holds no eolearn/REFERENCE_SCENES.npy")
    return path


# --- real Sentinel-2 L2A series, fetched from PyPI (transforms/devdata/real_s2_series.py) ----------------

REAL_S2_SERIES_ENV = "S2NAIP_REAL_S2_SERIES"


@pytest.fixture(scope="session")
def real_s2_series_file() -> Path:
    """The real Sentinel-2 L2A cube the PyPI package nrt 0.2.1 ships (transforms/devdata/real_s2_series.py).

    $S2NAIP_REAL_S2_SERIES if set (its folder or the file; then it must hold the file, or the session
    errors: .ci/run fetches it there first); else the default cache of `python -m
    transforms.devdata.real_s2_series fetch` if it holds it; else every test using it is skipped,
    unless S2NAIP_REQUIRE_REAL_DATA or S2NAIP_REQUIRE_ALL is set: then it fails. Tests never download.
    """
    from transforms.devdata.real_s2_series import FILE_NAME, default_cache, locate

    env = os.environ.get(REAL_S2_SERIES_ENV)
    if env:
        path = locate(env)
        if not path.is_file():
            raise FileNotFoundError(f"${REAL_S2_SERIES_ENV}={env!r} holds no {FILE_NAME}")
        return path
    path = locate(default_cache())
    if not path.is_file():
        skip_unless_required(f"no real Sentinel-2 series: run `python -m transforms.devdata.real_s2_series fetch` "
                             f"(downloads nrt 0.2.1 from PyPI) or set ${REAL_S2_SERIES_ENV}", "S2NAIP_REQUIRE_REAL_DATA")
    return path


# --- GCS emulator on loopback (pipelines/dev/gcs_emulator.py) -------------------------------------------


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A `gcp-storage-emulator` on 127.0.0.1 plus a fake GCE metadata server, for the session.

    Yields a `pipelines.dev.gcs_emulator.GcsTestServer`: `.endpoint`, `.bucket(name)`,
    `.upload_tree(dir, gs_prefix)`, `.download_tree(gs_prefix, dir)`, `.list(gs_prefix)`, and
    `.environment(endpoint=None)`, a context manager that points Beam's gs:// filesystem, gcsfs and
    `transforms.io.storage` at the emulator (or at a proxy in front of it). Skips when the emulator
    package is not installed, except on CI (CI or S2NAIP_REQUIRE_ALL set), where that is an error.
    """
    if os.environ.get("CI") or required():
        import gcp_storage_emulator  # noqa: F401  (the [test] extra installs it)
    else:
        pytest.importorskip("gcp_storage_emulator")
    from pipelines.dev.gcs_emulator import GcsTestServer

    server = GcsTestServer(str(tmp_path_factory.mktemp("gcs-env")))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def gcs_env(gcs_emulator):
    """The environment of `gcs_emulator` applied for one test (restored after it)."""
    with gcs_emulator.environment():
        yield gcs_emulator


# --- NAIP COGs + STAC API on loopback (pipelines/dev/stac_servers.py) -----------------------------------


@pytest.fixture(scope="session")
def naip_servers(real_naip_dir, tmp_path_factory):
    """The real NAIP GeoTIFFs as COGs behind nginx and their Planetary-Computer-like items in
    stac-fastapi-pgstac (PostgreSQL + PostGIS), all on 127.0.0.1, for the session.

    Yields a `pipelines.dev.stac_servers.LoopbackNaip`: `.stac_url`, `.data_endpoint`, `.cogs`,
    `.cog(naip_id)`, `.nginx.access_log()`, `.add_collection(name, base_url)`. Skips when the
    servers' system packages (nginx, PostgreSQL + PostGIS) or Python packages are missing, except
    with S2NAIP_REQUIRE_SERVERS=1 (CI), where that is an error.
    """
    from pipelines.dev.stac_servers import REQUIRE_ENV, LoopbackNaip, missing_requirements, servers_required

    missing = missing_requirements()
    if missing:
        message = "NAIP loopback servers unavailable, missing: " + "; ".join(missing)
        if servers_required():
            pytest.fail(f"{message} (${REQUIRE_ENV} is set)")
        skip_unless_required(message, REQUIRE_ENV)
    saved = {k: os.environ.get(k) for k in ("NO_PROXY", "no_proxy")}
    for k in saved:  # an HTTP(S)_PROXY of the machine must never see this loopback traffic
        os.environ[k] = ",".join(filter(None, [saved[k], "127.0.0.1", "localhost"]))
    servers = LoopbackNaip(real_naip_dir, tmp_path_factory.mktemp("naip-servers"))
    servers.start()
    try:
        yield servers
    finally:
        servers.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def loopback_only(monkeypatch):
    """Fails any connection or name lookup of this process that is not loopback (tests of the
    servers and clients use it: nothing they do may leave the machine)."""
    import socket

    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
    allowed = {"127.0.0.1", "localhost", "::1", None}

    def connect(sock, address):
        if isinstance(address, tuple) and address[0] not in allowed:
            raise AssertionError(f"connection to {address!r} attempted")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in allowed and not str(host).startswith("127."):
            raise AssertionError(f"name lookup of {host!r} attempted")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
