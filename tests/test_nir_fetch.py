"""`s2naip fetch-nir` end to end on loopback, on the real NAIP imagery (`naip_servers` fixture:
COGs of the real GeoTIFFs behind nginx, Planetary-Computer-like items in stac-fastapi-pgstac).

* The CLI fetches 400 tiles of the ten captures (plus invalid, duplicate and unresolvable ids);
  every nir.png equals an independent rasterio reprojection of band 4 of the original GeoTIFF;
  counts, rejects, run.json and the server's own access log agree.
* A tile fetched in a group equals the same tile fetched alone, and `geo.reproject_to_tile` on the
  local COG (nearest, bilinear, cubic).
* Resume: a rerun makes no request; deleted tiles are fetched again, identical.
* Faults: proxies in front of nginx and the STAC API answer 429/503 and cut connections mid-body;
  every tile is still written correctly and the retries are counted.
* Co-registration: the NIR tile and the RGB tile of the same GeoTIFF align (gradient
  cross-correlation peaks at zero offset; a 2-px shift is detected).
* --naip-id-map, and the pipeline on two worker processes.
"""
from __future__ import annotations

import gzip
import json
import os
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import rasterio.warp
from PIL import Image

from pipelines import cli, fetch_nir
from pipelines.dev.stac_servers import FaultPlan, FaultyProxy, naip_collection
from transforms.devdata.real_tiles import usable_tiles
from transforms.io import storage
from transforms.nir import geo, nir_fetch, signing, stac
from transforms.nir import pipeline as nir_pipeline

FAST_HTTP = ["--http-backoff", "0.01", "--max-requests-per-second", "200"]
UNCAPTURED = "m_4709963_se_14_1_20110101"  # the quad, a date without a capture
OTHER_QUAD = "m_2408115_sw_17_060_20191128"  # a quad the API does not have


pytestmark = pytest.mark.usefixtures("loopback_only")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------
# Helpers


def tiles_of(cog, every: int = 9, offset: int = 0) -> list[tuple[int, int]]:
    with rasterio.open(cog.path) as ds:
        return usable_tiles([ds])[offset::every]


def write_manifest(path, ids) -> str:
    path.write_text("# fetch-nir test manifest\n" + "\n".join(ids) + "\n")
    return str(path)


def read_png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == (128, 128), (im.mode, im.size)
        return np.asarray(im)


def independent_nir(src_tif: str, x: int, y: int, resampling="nearest") -> np.ndarray:
    """Band 4 of the whole original GeoTIFF warped onto the tile, validity = GDAL's dataset mask
    (no window, no code of the project but the tile's bounds)."""
    with rasterio.open(src_tif) as ds:
        source = np.stack([ds.read(4), ds.dataset_mask()])
        transform, crs = ds.transform, ds.crs
    west, south, east, north = geo.tile_bounds_3857(x, y)
    dst = np.zeros((2, 128, 128), np.uint8)
    rasterio.warp.reproject(source=source, destination=dst, src_transform=transform, src_crs=crs, src_alpha=2,
                            dst_transform=rasterio.transform.from_bounds(west, south, east, north, 128, 128),
                            dst_crs="EPSG:3857", dst_alpha=2,
                            resampling=getattr(rasterio.enums.Resampling, resampling))
    out = dst[0]
    out[dst[1] == 0] = 0
    return out


def run_cli(*args) -> dict:
    assert cli.main(["fetch-nir", *args]) == 0
    out = args[list(args).index("--output") + 1]
    return json.loads(open(os.path.join(out, "run.json")).read())


def rejects_of(output) -> list[dict]:
    table = pq.read_table(os.path.join(output, "rejects"))
    return sorted(table.to_pylist(), key=lambda r: r["tile_id"])


def cog_gets(servers) -> int:
    return sum(1 for r in servers.nginx.access_log() if r["path"].endswith(".tif"))


# ---------------------------------------------------------------------------------------------
# The clean run


@pytest.fixture(scope="module")
def clean_run(naip_servers, tmp_path_factory):
    work = tmp_path_factory.mktemp("fetch-nir-clean")
    tiles = {cog.naip_id: tiles_of(cog) for cog in naip_servers.cogs}
    ids = [f"{n}/{x}_{y}" for n, xys in tiles.items() for x, y in xys]
    some = ids[:3]
    extra = ["not/a/tile", some[0], f"{UNCAPTURED}/{some[1].split('/')[1]}", f"{OTHER_QUAD}/1_2"]
    manifest = write_manifest(work / "manifest.txt", ids + extra)
    out = str(work / "out")
    gets_before = cog_gets(naip_servers)
    summary = run_cli("--manifest", manifest, "--output", out, "--stac-url", naip_servers.stac_url,
                      "--sign", "none", *FAST_HTTP)
    return {"out": out, "tiles": tiles, "ids": ids, "summary": summary,
            "server_gets": cog_gets(naip_servers) - gets_before}


def test_cli_writes_every_tile_equal_to_an_independent_reprojection(naip_servers, clean_run):
    out, summary = clean_run["out"], clean_run["summary"]
    n = len(clean_run["ids"])
    assert n == 400
    assert summary["counts"] == {"tiles": n + 4, "written": n, "skipped": 0, "rejects": 4, "rejects_by_reason": {
        "duplicate_tile_id": 1, "invalid_tile_id": 1, "unresolved_naip_id": 2}}
    mismatched = 0
    for naip_id, xys in clean_run["tiles"].items():
        src = naip_servers.cog(naip_id).source  # the original GeoTIFF, not the served COG
        for x, y in xys:
            got = read_png(os.path.join(out, "naip", naip_id, f"{x}_{y}", "nir.png"))
            want = independent_nir(src, x, y)
            assert got.any()
            mismatched += int((got != want).sum())
    assert mismatched == 0
    assert not any(name.endswith((".tmp", ".png")) or ".tmp-" in name
                   for _, _, files in os.walk(os.path.join(out, "naip")) for name in files if name != "nir.png")
    assert storage.exists(os.path.join(out, "_SUCCESS"))


def test_clean_run_requests_rejects_and_run_json(naip_servers, clean_run):
    out, summary = clean_run["out"], clean_run["summary"]
    h = summary["http"]
    # one STAC search per folder id (10 captures + the 2 unresolvable folders), no retries
    assert h["stac_requests"] == 12 and h["retries"] == 0
    assert h["requests"] == h["stac_requests"] + h["cog_requests"]
    assert h["cog_requests"] == clean_run["server_gets"]  # what nginx saw
    assert h["requests"] / summary["counts"]["written"] < 0.1  # the companion: >= 3 a tile
    rejects = rejects_of(out)
    assert Counter((r["stage"], r["reason"]) for r in rejects) == Counter({
        ("manifest", "invalid_tile_id"): 1, ("manifest", "duplicate_tile_id"): 1, ("resolve", "unresolved_naip_id"): 2})
    by_id = {r["tile_id"]: r for r in rejects}
    assert by_id["not/a/tile"]["reason"] == "invalid_tile_id"
    assert by_id[f"{OTHER_QUAD}/1_2"]["reason"] == "unresolved_naip_id"
    assert "none of 0 items" in by_id[f"{OTHER_QUAD}/1_2"]["detail"]
    # the uncaptured date finds the real captures around it, none of that date
    assert by_id[[k for k in by_id if k.startswith(UNCAPTURED)][0]]["stage"] == "resolve"
    success = json.loads(open(os.path.join(out, "_SUCCESS")).read())
    assert success["files"] and all("rejects/" in f for f in success["files"])
    assert summary["options"]["sign"] == "none" and summary["options"]["resampling"] == "nearest"
    assert summary["command"] == "fetch-nir"


# ---------------------------------------------------------------------------------------------
# A tile in a group equals the tile alone


@pytest.mark.parametrize("resampling", ["nearest", "bilinear", "cubic"])
def test_grouped_tile_equals_the_tile_fetched_alone(naip_servers, tmp_path, resampling):
    cog = naip_servers.cog("m_4709963_se_14_1_20150926")
    xys = tiles_of(cog, every=1)
    group = nir_fetch.split_groups(xys, 8)[4]
    assert len(group) == 64
    http = stac.PoliteHttp(stac.HttpPolicy(max_requests_per_s=0))
    config = nir_pipeline.NirConfig(output=str(tmp_path), stac_url=naip_servers.stac_url, resampling=resampling)
    ref = nir_fetch.ItemRef(cog.item_id, f"{naip_servers.data_endpoint}/{cog.rel_url}", cog.epsg)
    stats = stac.RequestStats()
    grouped, error = nir_pipeline.fetch_group(ref, group, http=http, signer=signing.NoSigner(), config=config, stats=stats)
    assert error is None and stats.cog_requests <= 3  # the header, then the group's blocks in one or two ranges
    with rasterio.open(cog.path) as local:
        for x, y in group:
            alone, error = nir_pipeline.fetch_group(ref, [(x, y)], http=http, signer=signing.NoSigner(), config=config,
                                                 stats=stac.RequestStats())
            assert error is None
            assert alone[(x, y)] == grouped[(x, y)]  # the same PNG bytes
            direct = geo.reproject_to_tile(local, x, y, bands=(4,), resampling=resampling)[:, :, 0]
            assert (read_png_bytes(grouped[(x, y)]) == direct).all()


def read_png_bytes(data: bytes) -> np.ndarray:
    import io

    return read_png(io.BytesIO(data))


# ---------------------------------------------------------------------------------------------
# Resume


def test_rerun_resumes(naip_servers, tmp_path):
    cogs = naip_servers.cogs[:2]
    ids = [f"{c.naip_id}/{x}_{y}" for c in cogs for x, y in tiles_of(c, every=12)]
    manifest = write_manifest(tmp_path / "m.txt", ids + ["bad"])
    out = str(tmp_path / "out")
    args = ["--manifest", manifest, "--output", out, "--stac-url", naip_servers.stac_url, *FAST_HTTP]
    first = fetch_nir.run([*args, "--num-shards", "3"])  # as the CLI, returning the Beam counters too
    assert first["counts"]["written"] == len(ids)
    counters, h = first["counters"], first["http"]
    assert counters["tiles_written"] == len(ids) and counters.get("tiles_skipped", 0) == 0
    assert (counters["http_requests"], counters["http_bytes_read"], counters.get("http_retries", 0)) == \
        (h["requests"], h["bytes_read"], h["retries"])
    paths = {i: os.path.join(out, "naip", i, "nir.png") for i in ids}
    before = {i: open(p, "rb").read() for i, p in paths.items()}
    assert len(os.listdir(os.path.join(out, "rejects"))) == 3

    gets = cog_gets(naip_servers)
    second = run_cli(*args, "--num-shards", "1")
    assert second["counts"] == {**first["counts"], "written": 0, "skipped": len(ids)}
    assert second["http"]["requests"] == 0 and cog_gets(naip_servers) == gets  # nothing fetched, not even STAC
    assert len(os.listdir(os.path.join(out, "rejects"))) == 1  # the previous run's shards are gone

    assert fetch_nir.run(args)["counters"]["tiles_skipped"] == len(ids)

    gone = ids[::7]
    for i in gone:
        os.remove(paths[i])
    third = run_cli(*args)
    assert third["counts"]["written"] == len(gone) and third["counts"]["skipped"] == len(ids) - len(gone)
    assert 0 < third["http"]["cog_requests"] <= 3 * len(gone)
    assert {i: open(p, "rb").read() for i, p in paths.items()} == before


# ---------------------------------------------------------------------------------------------
# Faults


def test_faults_are_retried_and_every_tile_is_right(naip_servers, clean_run, tmp_path):
    data_proxy = FaultyProxy(naip_servers.nginx.port, FaultPlan(
        fail_first=1, first_status=503, every_k=5, every_status=429, reset_every=7,
        applies=lambda method, path: method == "GET")).start()
    stac_proxy = FaultyProxy(naip_servers.api.port, FaultPlan(
        fail_first=1, first_status=503, every_k=2, every_status=429)).start()
    try:
        naip_servers.add_collection("naip-faults", data_proxy.endpoint)
        cogs = naip_servers.cogs[4:7]
        ids = [f"{c.naip_id}/{x}_{y}" for c in cogs for x, y in clean_run["tiles"][c.naip_id]]
        manifest = write_manifest(tmp_path / "m.txt", ids)
        out = str(tmp_path / "out")
        summary = run_cli("--manifest", manifest, "--output", out, "--stac-url", stac_proxy.endpoint,
                          "--collection", "naip-faults", "--group-side", "4", *FAST_HTTP)
    finally:
        data_proxy.stop()
        stac_proxy.stop()
    assert summary["counts"]["written"] == len(ids) and summary["counts"]["rejects"] == 0
    for i in ids:
        got = open(os.path.join(out, "naip", i, "nir.png"), "rb").read()
        assert got == open(os.path.join(clean_run["out"], "naip", i, "nir.png"), "rb").read()
    assert data_proxy.counts["resets"] >= 2 and data_proxy.by_status.get(429, 0) >= 2
    assert data_proxy.by_status.get(503) == 1 and stac_proxy.by_status.get(429, 0) >= 1
    faults = data_proxy.faults + stac_proxy.faults
    assert summary["http"]["retries"] == faults  # each injected fault cost exactly one retry
    assert summary["http"]["requests"] == data_proxy.counts["requests"] + stac_proxy.counts["requests"]


# ---------------------------------------------------------------------------------------------
# Co-registration of NIR and RGB


def _gradient(img: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    img = img.astype(np.float64)
    return np.hypot(ndimage.sobel(img, 0), ndimage.sobel(img, 1))


def correlation_surface(a: np.ndarray, b: np.ndarray, max_shift: int = 4) -> np.ndarray:
    """[2m+1, 2m+1] normalised cross-correlation of `a` shifted by (dy, dx) against `b`."""
    m = max_shift
    core = b[m:-m, m:-m]
    core = (core - core.mean()) / (core.std() + 1e-9)
    out = np.zeros((2 * m + 1, 2 * m + 1))
    for dy in range(-m, m + 1):
        for dx in range(-m, m + 1):
            win = a[m + dy:a.shape[0] - m + dy, m + dx:a.shape[1] - m + dx]
            out[dy + m, dx + m] = float((((win - win.mean()) / (win.std() + 1e-9)) * core).mean())
    return out


def peak(surface: np.ndarray) -> tuple[int, int]:
    m = surface.shape[0] // 2
    dy, dx = np.unravel_index(int(surface.argmax()), surface.shape)
    return int(dy) - m, int(dx) - m


def test_nir_and_rgb_are_coregistered(naip_servers, clean_run):
    """Per capture, the gradient cross-correlation of the fetched NIR tiles against the RGB tiles of
    the same GeoTIFF, summed over its 40 tiles, peaks at zero offset (NIR and visible edges differ
    tile by tile, so single tiles are noisy: most, not all, peak at zero on their own); NIR moved by
    2 px is found 2 px off, so the check can see a misregistration."""
    for naip_id in ("m_4709963_se_14_1_20190904", "m_4709963_se_14_1_20100629", "m_4709963_se_14_1_20090818"):
        total = np.zeros((9, 9))
        shifted = np.zeros((9, 9))
        single = []
        with rasterio.open(naip_servers.cog(naip_id).source) as ds:
            for x, y in clean_run["tiles"][naip_id]:
                nir = read_png(os.path.join(clean_run["out"], "naip", naip_id, f"{x}_{y}", "nir.png"))
                g_nir = _gradient(nir)
                g_rgb = _gradient(geo.reproject_to_tile(ds, x, y, bands=(1, 2, 3)).mean(axis=2))
                surface = correlation_surface(g_nir, g_rgb)
                total += surface
                single.append(peak(surface) == (0, 0))
                shifted += correlation_surface(np.roll(g_nir, 2, axis=1), g_rgb)
        assert len(single) == 40
        assert peak(total) == (0, 0), naip_id
        assert total.max() > 0.3
        assert sum(single) >= 0.7 * len(single), (naip_id, sum(single))
        assert peak(shifted) == (0, 2), naip_id


# ---------------------------------------------------------------------------------------------
# --naip-id-map, two worker processes, errors


def test_naip_id_map_on_two_worker_processes(naip_servers, clean_run, tmp_path):
    a, b, c = naip_servers.cogs[7:10]
    mapping = {a.naip_id: a.item_id, b.naip_id: b.item_id, UNCAPTURED: "nd_m_4709963_se_14_1_20110101_20110301"}
    path = tmp_path / "map.json.gz"
    path.write_bytes(gzip.compress(json.dumps(mapping).encode()))
    ids = [f"{cog.naip_id}/{x}_{y}" for cog in (a, b, c) for x, y in clean_run["tiles"][cog.naip_id][:10]]
    ids.append(f"{UNCAPTURED}/{ids[0].split('/')[1]}")
    manifest = write_manifest(tmp_path / "m.txt", ids)
    out = str(tmp_path / "out")
    summary = run_cli("--manifest", manifest, "--output", out, "--stac-url", naip_servers.stac_url,
                      "--naip-id-map", str(path), *FAST_HTTP,
                      "--direct_num_workers", "2", "--direct_running_mode", "multi_processing")
    assert summary["counts"]["written"] == 20
    assert summary["counts"]["rejects_by_reason"] == {"unresolved_naip_id": 11}
    assert summary["http"]["stac_requests"] == 3  # one item request per mapped folder, no search
    details = {r["tile_id"].split("/")[0]: r["detail"] for r in rejects_of(out)}
    assert details[c.naip_id] == "not in --naip-id-map"
    assert "does not have" in details[UNCAPTURED]
    for i in ids[:20]:
        assert open(os.path.join(out, "naip", i, "nir.png"), "rb").read() == \
            open(os.path.join(clean_run["out"], "naip", i, "nir.png"), "rb").read()


def test_an_unreachable_cog_is_a_fetch_error(naip_servers, tmp_path):
    cog = naip_servers.cogs[0]
    broken = dict(naip_servers.items(naip_servers.data_endpoint, "naip-broken")[0])
    missing_href = f"{naip_servers.data_endpoint}/nope/{cog.naip_id}.tif"
    broken["assets"] = {"image": {**broken["assets"]["image"], "href": missing_href}}
    naip_servers.api.load(naip_collection("naip-broken", [broken]), [broken])
    ids = [f"{cog.naip_id}/{x}_{y}" for x, y in tiles_of(cog, every=40)]
    manifest = write_manifest(tmp_path / "m.txt", ids)
    summary = run_cli("--manifest", manifest, "--output", str(tmp_path / "out"), "--stac-url", naip_servers.stac_url,
                      "--collection", "naip-broken", *FAST_HTTP)
    assert summary["counts"]["rejects_by_reason"] == {"fetch_error": len(ids)}
    assert summary["http"]["retries"] == 0  # a 404 is not retried
    assert all("HTTP 404" in r["detail"] for r in rejects_of(str(tmp_path / "out")))


def test_cli_refuses_bad_options(tmp_path, capsys):
    base = ["fetch-nir", "--manifest", str(tmp_path / "none.txt"), "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        cli.main(base)  # no --stac-url: argparse's usage error

    def refused(*args) -> str:  # one line, the command's prefix, exit 1
        capsys.readouterr()
        assert cli.main([*base, *args]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("s2naip fetch-nir: error: "), lines
        return lines[0]

    assert "not found" in refused("--stac-url", "http://127.0.0.1:9")
    assert "STAC API URL" in refused("--stac-url", "ftp://x")
    (tmp_path / "none.txt").write_text("")
    assert "--group-side" in refused("--stac-url", "http://127.0.0.1:9", "--group-side", "0")


def test_listing_an_s2naip_folder_and_writing_beside_rgb(naip_servers, clean_run, tmp_path):
    """--input lists naip/<naip_id>/<x>_<y>/ of an S2-NAIP folder; --output may be that folder:
    nir.png lands beside rgb.png (which is left alone) and a rerun skips every tile."""
    root = tmp_path / "s2naip"
    ids = []
    for cog in naip_servers.cogs[2:4]:
        for x, y in clean_run["tiles"][cog.naip_id][:10]:
            (root / "naip" / cog.naip_id / f"{x}_{y}").mkdir(parents=True)
            (root / "naip" / cog.naip_id / f"{x}_{y}" / "rgb.png").write_bytes(b"rgb placeholder")
            ids.append(f"{cog.naip_id}/{x}_{y}")
    args = ["--input", str(root), "--output", str(root), "--stac-url", naip_servers.stac_url, *FAST_HTTP]
    summary = run_cli(*args)
    assert summary["counts"]["written"] == 20 and summary["counts"]["rejects"] == 0
    for i in ids:
        assert (root / "naip" / i / "rgb.png").read_bytes() == b"rgb placeholder"
        assert (root / "naip" / i / "nir.png").read_bytes() == \
            open(os.path.join(clean_run["out"], "naip", i, "nir.png"), "rb").read()
    again = run_cli(*args)
    assert again["counts"]["skipped"] == 20 and again["http"]["requests"] == 0


def test_output_on_gcs(naip_servers, clean_run, gcs_env, tmp_path):
    """--output gs://: nir.png objects, rejects, run.json and _SUCCESS on the GCS emulator; a rerun
    finds what is there with one listing per folder and fetches nothing."""
    gcs_env.bucket("nir-out")
    cog = naip_servers.cogs[1]
    ids = [f"{cog.naip_id}/{x}_{y}" for x, y in clean_run["tiles"][cog.naip_id][:15]]
    manifest = write_manifest(tmp_path / "m.txt", ids + ["nope"])
    out = "gs://nir-out/run1"
    args = ["--manifest", manifest, "--output", out, "--stac-url", naip_servers.stac_url, *FAST_HTTP]
    first = fetch_nir.run(args)
    assert first["counts"]["written"] == 15 and first["counts"]["rejects_by_reason"] == {"invalid_tile_id": 1}
    for i in ids:
        assert gcs_env.read_bytes(f"{out}/naip/{i}/nir.png") == \
            open(os.path.join(clean_run["out"], "naip", i, "nir.png"), "rb").read()
    names = gcs_env.list(out + "/")
    assert f"{out}/run.json" in names and f"{out}/_SUCCESS" in names
    assert any(n.startswith(f"{out}/rejects/") for n in names)
    assert not any(".tmp" in n for n in names)
    again = fetch_nir.run(args)
    assert again["counts"]["skipped"] == 15 and again["http"]["requests"] == 0


def test_column_warps_equal_single_tile_warps_on_every_real_tile(real_naip_dir):
    """The grouped nearest path (one warp per column run of tiles, the item's area of interest)
    against `geo.reproject_to_tile` of each tile alone (its own window and area of interest), on
    every tile inside three of the real captures (1,071 tiles; all ten pass too, in ~25 s): identical."""
    checked = 0
    for path in sorted(real_naip_dir.glob("m_*.tif"))[::4]:
        with rasterio.open(path) as ds:
            xys = usable_tiles([ds])
            aoi = geo.area_of_interest(ds)
            for group in nir_fetch.split_groups(xys, 8):
                for (x, y), nir, valid in nir_fetch.reproject_group(ds, group, area_of_interest=aoi):
                    want, want_valid = geo.reproject_to_tile(ds, x, y, bands=(4,), with_mask=True)
                    assert (nir == want[:, :, 0]).all() and (valid == want_valid).all(), (path.name, x, y)
                    checked += 1
    assert checked >= 1050
