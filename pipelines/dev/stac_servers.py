"""Real servers on loopback for the fetch-nir tests and benchmark: the real NAIP GeoTIFFs as COGs
behind nginx (HTTP range requests), and a STAC API (stac-fastapi-pgstac on PostgreSQL + PostGIS,
the stack Planetary Computer runs) whose items mirror Planetary Computer's NAIP items.

* `make_cogs`: the GeoTIFFs of `real_naip_dir` -> COGs (rasterio's COG driver, DEFLATE, 64-px blocks:
  at ~5 m a block spans about as many zoom-17 tiles as a 512-px block of a 0.6 m NAIP COG), laid out
  as Planetary Computer lays out NAIP (`naip/v002/<state>/<year>/<state>_<res>cm_<year>/<quad5>/`).
* `NginxServer`: Debian's nginx, one process in the foreground on a free port, serving a folder
  (Range support is nginx's own); its access log records each request, status, bytes and Range.
* `PostgresCluster`: a throwaway cluster made with initdb in a temp folder and run in the
  foreground on a free port. PostgreSQL refuses to run as root, so as root it runs as the `postgres`
  system user (the Debian package creates it), started directly with `Popen(user=...)`.
* `PgStacApi`: `pypgstac migrate` on that cluster, items loaded with pypgstac's Loader, and
  `stac-fastapi-pgstac` served by uvicorn on a free port.
* `naip_item`: a STAC item shaped like Planetary Computer's NAIP items: id
  `<state>_<folder id>_<publication date>`, `image` asset (4-band COG), `proj:epsg`, lon/lat bbox
  and footprint, `naip:state`, `naip:year`, `gsd`.
* `LoopbackNaip`: all of the above for one session (`start()`/`stop()`), used by the
  `naip_servers` fixture (tests/conftest.py) and by `pipelines/dev/bench_nir.py`.

Every server is started on 127.0.0.1 and waited for with a readiness probe (no fixed sleeps).
Nothing here connects anywhere but loopback. The COGs are made in temp folders at test time and
never written into the project.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import importlib.util
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipelines.dev.gcs_emulator import LOOPBACK, FaultPlan, FaultyProxy, free_port, wait_http_ok  # noqa: F401

REQUIRE_ENV = "S2NAIP_REQUIRE_SERVERS"
STATE = "nd"  # the real data's quarter quad m_4709963_se_14 lies in North Dakota
COLLECTION = "naip"
PYTHON_MODULES = ("stac_fastapi.pgstac", "pypgstac", "uvicorn", "psycopg")
_CAPTURE = re.compile(r"(?P<naip_id>m_(?P<quad>[0-9]{7})_(?P<q>ne|nw|se|sw)_(?P<zone>[0-9]{2})_(?P<res>[0-9a-z]{1,4})"
                      r"_(?P<date>[0-9]{8}))\.tif")


# ---------------------------------------------------------------------------------------------
# What the servers need from the system


def find_nginx() -> str | None:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclasses.dataclass(frozen=True)
class PgInstall:
    version: str
    bindir: str

    def bin(self, name: str) -> str:
        return os.path.join(self.bindir, name)


def find_postgres() -> PgInstall | None:
    """The newest Debian PostgreSQL (/usr/lib/postgresql/<v>/bin) whose share dir has PostGIS."""
    found = []
    for bindir in glob.glob("/usr/lib/postgresql/*/bin"):
        version = Path(bindir).parent.name
        if not all(os.access(os.path.join(bindir, b), os.X_OK) for b in ("initdb", "postgres")):
            continue
        if glob.glob(f"/usr/share/postgresql/{version}/extension/postgis.control"):
            found.append(PgInstall(version, bindir))
    found.sort(key=lambda p: [int(v) if v.isdigit() else 0 for v in p.version.split(".")])
    return found[-1] if found else None


def missing_requirements() -> list[str]:
    """What this machine lacks to run the servers (empty: all there)."""
    missing = []
    if find_nginx() is None:
        missing.append("nginx (apt-get install nginx-light)")
    if find_postgres() is None:
        missing.append("PostgreSQL with PostGIS (apt-get install postgresql postgresql-<v>-postgis-3)")
    elif os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing.append("the postgres system user (PostgreSQL does not run as root)")
    for module in PYTHON_MODULES:
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(f"python module {module} (the [test] extra)")
        except ModuleNotFoundError:
            missing.append(f"python module {module} (the [test] extra)")
    return missing


def servers_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


# ---------------------------------------------------------------------------------------------
# COGs and items


@dataclasses.dataclass(frozen=True)
class NaipCog:
    naip_id: str  # the S2-NAIP folder id, e.g. m_4709963_se_14_1_20190904
    quad: str
    quarter: str
    resolution: str
    capture: dt.date
    source: str  # the original GeoTIFF
    path: str  # the COG
    rel_url: str  # its path under the server root
    epsg: int
    width: int
    height: int
    transform: tuple[float, ...]
    bounds: tuple[float, float, float, float]  # native CRS
    footprint: list[list[float]]  # lon/lat ring
    bbox: tuple[float, float, float, float]  # lon/lat

    @property
    def published(self) -> dt.date:
        """A plausible publication date (Planetary Computer ids end with one): 75 days later."""
        return self.capture + dt.timedelta(days=75)

    @property
    def item_id(self) -> str:
        return f"{STATE}_{self.naip_id}_{self.published:%Y%m%d}"

    @property
    def year(self) -> int:
        return self.capture.year


def _pc_rel_url(naip_id: str, quad: str, resolution: str, year: int) -> str:
    cm = "060" if resolution in ("060", "06") else ("100" if resolution == "1" else resolution)
    return f"naip/v002/{STATE}/{year}/{STATE}_{cm}cm_{year}/{quad[:5]}/{naip_id}.tif"


def make_cogs(src_dir, root, blocksize: int = 64) -> list[NaipCog]:
    """Every m_*.tif of `src_dir` as a COG under `root` (Planetary Computer's path layout)."""
    import rasterio
    import rasterio.shutil
    import rasterio.warp

    cogs = []
    for src in sorted(Path(src_dir).glob("m_*.tif")):
        m = _CAPTURE.fullmatch(src.name)
        if not m:
            continue
        capture = dt.datetime.strptime(m["date"], "%Y%m%d").date()
        rel = _pc_rel_url(m["naip_id"], m["quad"], m["res"], capture.year)
        dest = Path(root) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(src) as ds:
            rasterio.shutil.copy(ds, str(dest), driver="COG", BLOCKSIZE=blocksize, COMPRESS="DEFLATE",
                                 OVERVIEWS="AUTO", BIGTIFF="NO")
        with rasterio.open(dest) as ds:
            l, b, r, t = ds.bounds
            n = 16
            steps = [i / n for i in range(n)]
            ring_x = [l + (r - l) * s for s in steps] + [r] * n + [r - (r - l) * s for s in steps] + [l] * n
            ring_y = [b] * n + [b + (t - b) * s for s in steps] + [t] * n + [t - (t - b) * s for s in steps]
            lon, lat = rasterio.warp.transform(ds.crs, "EPSG:4326", ring_x, ring_y)
            ring = [[round(x, 7), round(y, 7)] for x, y in zip(lon, lat)]
            ring.append(ring[0])
            cogs.append(NaipCog(
                naip_id=m["naip_id"], quad=m["quad"], quarter=m["q"], resolution=m["res"], capture=capture,
                source=str(src), path=str(dest), rel_url=rel, epsg=int(ds.crs.to_epsg()), width=ds.width,
                height=ds.height, transform=tuple(ds.transform)[:6], bounds=tuple(ds.bounds), footprint=ring,
                bbox=(min(lon), min(lat), max(lon), max(lat)),
            ))
    if not cogs:
        raise FileNotFoundError(f"no m_*.tif NAIP GeoTIFFs in {src_dir}")
    return cogs


def naip_item(cog: NaipCog, base_url: str, collection: str = COLLECTION, *, item_id: str | None = None,
              href: str | None = None) -> dict:
    """A STAC item like Planetary Computer's NAIP items (the fields fetch-nir and users rely on)."""
    gsd = 0.6 if cog.resolution in ("060", "06") else 1.0
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/eo/v1.0.0/schema.json",
            "https://stac-extensions.github.io/projection/v1.0.0/schema.json",
        ],
        "id": item_id or cog.item_id,
        "collection": collection,
        "bbox": list(cog.bbox),
        "geometry": {"type": "Polygon", "coordinates": [cog.footprint]},
        "properties": {
            "datetime": f"{cog.capture.isoformat()}T00:00:00Z",
            "gsd": gsd,
            "naip:state": STATE,
            "naip:year": str(cog.year),
            "proj:epsg": cog.epsg,
            "proj:shape": [cog.height, cog.width],
            "proj:bbox": list(cog.bounds),
            "proj:transform": list(cog.transform) + [0.0, 0.0, 1.0],
        },
        "assets": {
            "image": {
                "href": href or f"{base_url.rstrip('/')}/{cog.rel_url}",
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
                "title": "RGBIR COG tile",
                "eo:bands": [
                    {"name": "Red", "common_name": "red"},
                    {"name": "Green", "common_name": "green"},
                    {"name": "Blue", "common_name": "blue"},
                    {"name": "NIR", "common_name": "nir", "description": "near-infrared"},
                ],
            },
            "metadata": {
                "href": f"{base_url.rstrip('/')}/{cog.rel_url[:-4]}.txt",
                "type": "text/plain",
                "roles": ["metadata"],
                "title": "FGDC Metdata",
            },
        },
        "links": [],
    }


def decoy_items(cogs: list[NaipCog], base_url: str, collection: str = COLLECTION) -> list[dict]:
    """Items a wrong resolution would pick, each over the same ground as a real capture: the
    neighbouring quarter of the same quad on the same date (its href is a 404), and a second
    publication of one capture from another state's program (same imagery, older publication:
    the latest publication must win)."""
    out = []
    for cog in cogs[:3]:
        other_q = "sw" if cog.quarter != "sw" else "se"
        fake = f"m_{cog.quad}_{other_q}_14_{cog.resolution}_{cog.capture:%Y%m%d}"
        out.append(naip_item(cog, base_url, collection, item_id=f"{STATE}_{fake}_{cog.published:%Y%m%d}",
                             href=f"{base_url.rstrip('/')}/naip/missing/{fake}.tif"))
    cog = cogs[-1]
    older = cog.published - dt.timedelta(days=30)
    out.append(naip_item(cog, base_url, collection, item_id=f"mt_{cog.naip_id}_{older:%Y%m%d}",
                         href=f"{base_url.rstrip('/')}/naip/missing/older-{cog.naip_id}.tif"))
    return out


def naip_collection(collection_id: str, items: list[dict]) -> dict:
    bboxes = [i["bbox"] for i in items]
    dates = sorted(i["properties"]["datetime"] for i in items)
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": collection_id,
        "title": "NAIP: National Agriculture Imagery Program (loopback test copy)",
        "description": "Real NAIP captures of one quarter quad, served on loopback for tests.",
        "license": "proprietary",
        "keywords": ["NAIP", "USDA"],
        "extent": {
            "spatial": {"bbox": [[min(b[0] for b in bboxes), min(b[1] for b in bboxes),
                                  max(b[2] for b in bboxes), max(b[3] for b in bboxes)]]},
            "temporal": {"interval": [[dates[0], dates[-1]]]},
        },
        "links": [],
        "item_assets": {"image": {"type": "image/tiff; application=geotiff; profile=cloud-optimized",
                                  "roles": ["data"]}},
    }


# ---------------------------------------------------------------------------------------------
# Processes


class _Process:
    """A server subprocess with its output in a temp file."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self._log = None

    def _popen(self, argv, **kwargs):
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     **kwargs)
        return self.proc

    def output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def _terminate(self, sig=signal.SIGTERM, timeout: float = 15.0):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


class NginxServer(_Process):
    """nginx (one foreground process) serving `root` on 127.0.0.1:<free port>."""

    CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 512; }}
http {{
  log_format ranges '$request_method $uri $status $body_bytes_sent "$http_range"';
  access_log {prefix}/access.log ranges;
  client_body_temp_path {prefix}/tmp/body;
  proxy_temp_path {prefix}/tmp/proxy;
  fastcgi_temp_path {prefix}/tmp/fastcgi;
  uwsgi_temp_path {prefix}/tmp/uwsgi;
  scgi_temp_path {prefix}/tmp/scgi;
  types {{ image/tiff tif; text/plain txt; }}
  default_type application/octet-stream;
  keepalive_requests 100000;
  server {{
    listen {host}:{port};
    root {root};
    location = /_ready {{ return 200 "ok"; }}
    location / {{ }}
  }}
}}
"""

    def __init__(self, root, binary: str | None = None):
        super().__init__()
        self.root = os.fspath(root)
        self.binary = binary or find_nginx()
        if self.binary is None:
            raise FileNotFoundError("nginx not found")
        self.port: int | None = None
        self.prefix = tempfile.mkdtemp(prefix="s2naip-nginx-")

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def url(self, rel: str) -> str:
        return f"{self.endpoint}/{rel.lstrip('/')}"

    def start(self, attempts: int = 3) -> "NginxServer":
        os.makedirs(os.path.join(self.prefix, "tmp"), exist_ok=True)
        conf = os.path.join(self.prefix, "nginx.conf")
        last = None
        for _ in range(attempts):  # a port found free can be taken before nginx binds it
            self.port = free_port()
            with open(conf, "w") as f:
                f.write(self.CONF.format(prefix=self.prefix, host=LOOPBACK, port=self.port, root=self.root))
            proc = self._popen([self.binary, "-p", self.prefix, "-c", conf,
                                "-e", os.path.join(self.prefix, "error.log")])
            try:
                wait_http_ok(self.endpoint + "/_ready", timeout_s=20, proc=proc)
                return self
            except (RuntimeError, TimeoutError) as e:
                last = e
                self._terminate()
        raise RuntimeError(f"nginx did not start: {last}; {self.output()} {self._error_log()}")

    def _error_log(self) -> str:
        try:
            return Path(self.prefix, "error.log").read_text()[-2000:]
        except OSError:
            return ""

    def access_log(self) -> list[dict]:
        """[{method, path, status, bytes, range}] of every request so far (readiness probes excluded)."""
        out = []
        try:
            lines = Path(self.prefix, "access.log").read_text().splitlines()
        except FileNotFoundError:
            return out
        for line in lines:
            m = re.match(r'(\S+) (\S+) (\d{3}) (\d+) "(.*)"', line)
            if m and m.group(2) != "/_ready":
                out.append({"method": m.group(1), "path": m.group(2), "status": int(m.group(3)),
                            "bytes": int(m.group(4)), "range": m.group(5)})
        return out

    def stop(self) -> None:
        self._terminate(signal.SIGQUIT)  # graceful: finish the requests in flight
        shutil.rmtree(self.prefix, ignore_errors=True)


class PostgresCluster(_Process):
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port> (trust auth, superuser `postgres`,
    durability off: a test database)."""

    def __init__(self, install: PgInstall | None = None):
        super().__init__()
        self.install = install or find_postgres()
        if self.install is None:
            raise FileNotFoundError("PostgreSQL with PostGIS not found")
        self.port: int | None = None
        self.dir = tempfile.mkdtemp(prefix="s2naip-pg-")
        self.data = os.path.join(self.dir, "data")
        self._as = {}
        if os.geteuid() == 0:  # PostgreSQL refuses root: run it as the postgres system user
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"

    def _env(self) -> dict:
        return {"PATH": f"{self.install.bindir}:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8",
                "HOME": self.dir, "TZ": "UTC"}

    def start(self, attempts: int = 3) -> "PostgresCluster":
        r = subprocess.run([self.install.bin("initdb"), "-D", self.data, "-U", "postgres", "--auth=trust",
                            "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
                           capture_output=True, text=True, cwd=self.dir, env=self._env(), **self._as)
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stdout[-1000:]} {r.stderr[-2000:]}")
        last = None
        for _ in range(attempts):
            self.port = free_port()
            proc = self._popen(
                [self.install.bin("postgres"), "-D", self.data, "-h", LOOPBACK, "-p", str(self.port), "-k", self.dir,
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=60", "-c", "log_min_messages=warning"],
                cwd=self.dir, env=self._env(), **self._as)
            try:
                self._wait_ready(proc)
                return self
            except (RuntimeError, TimeoutError) as e:
                last = e
                self._terminate(signal.SIGINT)
        raise RuntimeError(f"postgres did not start: {last}; {self.output()}")

    def _wait_ready(self, proc, timeout_s: float = 30.0):
        import psycopg

        deadline = time.monotonic() + timeout_s
        delay, last = 0.02, None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {proc.returncode}")
            try:
                with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as e:
                last = e
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
        raise TimeoutError(f"postgres not ready after {timeout_s}s: {last}")

    def stop(self) -> None:
        self._terminate(signal.SIGINT)  # "fast" shutdown
        shutil.rmtree(self.dir, ignore_errors=True)


class PgStacApi(_Process):
    """pgstac in `cluster`, served by stac-fastapi-pgstac (uvicorn) on 127.0.0.1:<free port>."""

    def __init__(self, cluster: PostgresCluster):
        super().__init__()
        self.cluster = cluster
        self.port: int | None = None
        self.dir = tempfile.mkdtemp(prefix="s2naip-stac-api-")  # its cwd: no stray .env is read

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def migrate(self) -> None:
        r = subprocess.run([sys.executable, "-m", "pypgstac.pypgstac", "migrate", "--dsn", self.cluster.dsn],
                           capture_output=True, text=True, cwd=self.dir)
        if r.returncode != 0:
            raise RuntimeError(f"pypgstac migrate failed: {r.stdout[-1000:]} {r.stderr[-2000:]}")

    def load(self, collection: dict, items: list[dict]) -> None:
        """Upserts a collection and its items with pypgstac's Loader."""
        from pypgstac.db import PgstacDB
        from pypgstac.load import Loader, Methods

        with PgstacDB(dsn=self.cluster.dsn) as db:
            Loader(db=db).load_collections(iter([collection]), insert_mode=Methods.upsert)
        with PgstacDB(dsn=self.cluster.dsn) as db:
            Loader(db=db).load_items(iter(items), insert_mode=Methods.upsert)

    def start(self, attempts: int = 3) -> "PgStacApi":
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "POSTGRES_"))}
        env.update({"PGUSER": "postgres", "PGPASSWORD": "", "PGHOST": LOOPBACK, "PGPORT": str(self.cluster.port),
                    "PGDATABASE": "postgres", "DB_MIN_CONN_SIZE": "1", "DB_MAX_CONN_SIZE": "8",
                    "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
        last = None
        for _ in range(attempts):
            self.port = free_port()
            proc = self._popen([sys.executable, "-m", "uvicorn", "stac_fastapi.pgstac.app:create_app", "--factory",
                                "--host", LOOPBACK, "--port", str(self.port), "--log-level", "warning",
                                "--no-access-log"], cwd=self.dir, env=env)
            try:
                wait_http_ok(f"{self.url}/collections", timeout_s=60, proc=proc)
                return self
            except (RuntimeError, TimeoutError) as e:
                last = e
                self._terminate()
        raise RuntimeError(f"stac-fastapi-pgstac did not start: {last}; {self.output()}")

    def stop(self) -> None:
        self._terminate()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Everything for a session


class LoopbackNaip:
    """COGs of the real captures behind nginx, and their items in stac-fastapi-pgstac.

    `collection` ("naip") holds one item per capture (hrefs to nginx) plus decoys;
    `add_collection(name, base_url)` loads the same items into another collection with hrefs to
    another server (e.g. a fault-injecting proxy in front of nginx)."""

    def __init__(self, naip_dir, workdir):
        self.naip_dir = os.fspath(naip_dir)
        self.workdir = os.fspath(workdir)
        self.cogs: list[NaipCog] = []
        self.nginx: NginxServer | None = None
        self.pg: PostgresCluster | None = None
        self.api: PgStacApi | None = None
        self.collection = COLLECTION
        self.timings: dict[str, float] = {}

    @property
    def stac_url(self) -> str:
        return self.api.url

    @property
    def data_endpoint(self) -> str:
        return self.nginx.endpoint

    def cog(self, naip_id: str) -> NaipCog:
        return next(c for c in self.cogs if c.naip_id == naip_id)

    def start(self) -> "LoopbackNaip":
        try:
            t = time.monotonic()
            root = os.path.join(self.workdir, "www")
            self.cogs = make_cogs(self.naip_dir, root)
            self.timings["cogs_s"] = time.monotonic() - t
            t = time.monotonic()
            self.nginx = NginxServer(root).start()
            self.timings["nginx_s"] = time.monotonic() - t
            t = time.monotonic()
            self.pg = PostgresCluster().start()
            self.timings["postgres_s"] = time.monotonic() - t
            t = time.monotonic()
            self.api = PgStacApi(self.pg)
            self.api.migrate()
            self.add_collection(self.collection, self.data_endpoint, decoys=True)
            self.api.start()
            self.timings["stac_api_s"] = time.monotonic() - t
            return self
        except BaseException:
            self.stop()
            raise

    def items(self, base_url: str, collection: str, decoys: bool = False) -> list[dict]:
        items = [naip_item(c, base_url, collection) for c in self.cogs]
        if decoys:
            items += decoy_items(self.cogs, base_url, collection)
        return items

    def add_collection(self, name: str, base_url: str, decoys: bool = False) -> None:
        items = self.items(base_url, name, decoys)
        self.api.load(naip_collection(name, items), items)

    def stop(self) -> None:
        for server in (self.api, self.pg, self.nginx):
            if server is not None:
                try:
                    server.stop()
                except Exception:  # noqa: BLE001 - stop the others regardless
                    pass
        self.api = self.pg = self.nginx = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
