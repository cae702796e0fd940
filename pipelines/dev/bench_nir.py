"""`python -m pipelines.dev.bench_nir`: requests per tile and tiles/s of fetch-nir's grouped fetch, next to
a one-tile-at-a-time baseline, on the same loopback servers in the same run.

Servers (pipelines/dev/stac_servers.py, so run it from a checkout): the real NAIP GeoTIFFs
(`--naip-dir`, default ../shared/data/naip_real) as COGs behind nginx, their items in
stac-fastapi-pgstac on PostgreSQL + PostGIS, all on 127.0.0.1. Needs nginx and PostgreSQL with
PostGIS (Debian packages) and the [test] extra.

Measured, on every zoom-17 tile inside each capture (3,570 for the ten real captures):

  baseline   the companion's access pattern, sequentially, one tile at a time: per tile one STAC
             search, one signature, one COG open (header request) and the tile's own block reads,
             then reproject and write. Same code as the grouped fetch with groups of one, so the
             difference is the grouping alone. Run on `--baseline-tiles` tiles (default 400, every
             9th tile of each capture).
  grouped    the grouped fetch in one process, no Beam: per folder one STAC search, per group
             (<= 64 tiles of one item) one signature, one COG open and coalesced range reads.
  pipeline-N `s2naip fetch-nir` as a command (a new process: Python, Beam and the pipeline's start
             included), N worker processes; and the same command on an empty manifest, whose time
             (the fixed cost of starting) gives the command's marginal rate:
             tiles / (time - empty time).

Both fetches run without the rate limit (`--max-requests-per-second 0`): this measures the work, not
the politeness. The outputs of the baseline and the grouped fetch are compared byte for byte.
Prints a table and the projection for 1.1 M tiles; `--report FILE` writes the figures as JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipelines.cli import ArgumentParser, description
from pipelines.dev.bench import machine

REPO = Path(__file__).resolve().parents[2]  # the checkout, when run from one
DEFAULT_NAIP_DIR = REPO.parent / "shared" / "data" / "naip_real"
DATASET_TILES = 1_100_000
COMPANION_S_PER_TILE = 1.1


def _servers():
    try:
        from pipelines.dev import stac_servers
    except ImportError as e:
        raise SystemExit(f"s2naip bench-nir needs the [test] extra (pip install 's2naip-pairs[test]'): {e}") from None

    return stac_servers


def all_tiles(cogs) -> dict[str, list[tuple[int, int]]]:
    import rasterio

    from transforms.devdata.real_tiles import usable_tiles

    out = {}
    for cog in cogs:
        with rasterio.open(cog.path) as ds:
            out[cog.naip_id] = usable_tiles([ds])
    return out


def run_baseline(tiles: dict, stac_url: str, out: str) -> dict:
    from transforms.io import storage
    from transforms.nir import nir_fetch, signing, stac
    from transforms.nir.pipeline import NirConfig, fetch_group, resolve_naip_id

    http = stac.PoliteHttp(stac.HttpPolicy(max_requests_per_s=0))
    config = NirConfig(output=out, stac_url=stac_url)
    signer = signing.NoSigner()
    stats = stac.RequestStats()
    n = 0
    t0 = time.perf_counter()
    for naip_id, xys in tiles.items():
        for x, y in xys:
            client = stac.StacClient(stac_url, http)  # nothing carried over from tile to tile
            ref, reason, detail = resolve_naip_id(naip_id, [(x, y)], client, stats=stats)
            if ref is None:
                raise RuntimeError(f"{naip_id}: {reason} {detail}")
            results, error = fetch_group(ref, [(x, y)], http=http, signer=signer, config=config, stats=stats)
            if error:
                raise RuntimeError(f"{naip_id}/{x}_{y}: {error}")
            storage.write_bytes_atomic(nir_fetch.nir_path(out, naip_id, x, y), results[(x, y)])
            n += 1
    return {"tiles": n, "seconds": time.perf_counter() - t0, **stats.as_dict()}


def run_grouped(tiles: dict, stac_url: str, out: str, group_side: int) -> dict:
    from transforms.io import storage
    from transforms.nir import nir_fetch, signing, stac
    from transforms.nir.pipeline import NirConfig, fetch_group, resolve_naip_id

    http = stac.PoliteHttp(stac.HttpPolicy(max_requests_per_s=0))
    config = NirConfig(output=out, stac_url=stac_url, group_side=group_side)
    client = stac.StacClient(stac_url, http)
    signer = signing.NoSigner()
    stats = stac.RequestStats()
    n = groups = 0
    t0 = time.perf_counter()
    for naip_id, xys in tiles.items():
        ref, reason, detail = resolve_naip_id(naip_id, xys, client, stats=stats)
        if ref is None:
            raise RuntimeError(f"{naip_id}: {reason} {detail}")
        for group in nir_fetch.split_groups(xys, group_side):
            results, error = fetch_group(ref, group, http=http, signer=signer, config=config, stats=stats)
            if error:
                raise RuntimeError(f"{naip_id}: {error}")
            for x, y in group:
                storage.write_bytes_atomic(nir_fetch.nir_path(out, naip_id, x, y), results[(x, y)])
            n += len(group)
            groups += 1
    return {"tiles": n, "groups": groups, "seconds": time.perf_counter() - t0, **stats.as_dict()}


def run_pipeline(manifest: str, stac_url: str, out: str, workers: int) -> dict:
    cmd = [sys.executable, "-m", "pipelines.cli", "fetch-nir", "--manifest", manifest, "--output", out,
           "--stac-url", stac_url, "--sign", "none", "--max-requests-per-second", "0"]
    if workers > 1:
        cmd += ["--direct_num_workers", str(workers), "--direct_running_mode", "multi_processing"]
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"fetch-nir failed ({proc.returncode}): {proc.stderr[-3000:]}")
    summary = json.loads(Path(out, "run.json").read_text())
    return {"tiles": summary["counts"]["written"], "seconds": seconds, "workers": workers, **summary["http"]}


def same_outputs(a: str, b: str, tiles: dict) -> int:
    """Tiles whose nir.png differs between two outputs (0 expected)."""
    differ = 0
    for naip_id, xys in tiles.items():
        for x, y in xys:
            rel = Path("naip", naip_id, f"{x}_{y}", "nir.png")
            if Path(a, rel).read_bytes() != Path(b, rel).read_bytes():
                differ += 1
    return differ


def _rates(r: dict) -> dict:
    return {**r, "tiles_per_s": r["tiles"] / r["seconds"], "requests_per_tile": r["requests"] / r["tiles"],
            "ms_per_tile": 1000 * r["seconds"] / r["tiles"]}


def projection(report: dict) -> dict:
    """1.1 M tiles at the measured rates (loopback: the network's latency is not in these)."""
    base, grouped = report["baseline"], report["grouped"]
    out = {
        "companion_hours": DATASET_TILES * COMPANION_S_PER_TILE / 3600,
        "baseline_hours_1_process": DATASET_TILES / base["tiles_per_s"] / 3600,
        "grouped_hours_1_process": DATASET_TILES / grouped["tiles_per_s"] / 3600,
        "grouped_requests": DATASET_TILES * grouped["requests_per_tile"],
        "baseline_requests": DATASET_TILES * base["requests_per_tile"],
    }
    for p in report.get("pipelines", []):
        out[f"pipeline_{p['workers']}_workers_hours"] = DATASET_TILES / p["tiles_per_s"] / 3600
    # With a real round trip of ~100 ms per request and --max-concurrency 8 in flight per process,
    # each request costs ~12.5 ms of a process's time unless hidden behind compute.
    for name in ("baseline", "grouped"):
        r = report[name]
        out[f"{name}_hours_1_process_100ms_rtt"] = DATASET_TILES * (
            r["ms_per_tile"] / 1000 + r["requests_per_tile"] * (0.1 if name == "baseline" else 0.1 / 8)) / 3600
    return out


def report_text(r: dict) -> str:
    b, g = r["baseline"], r["grouped"]
    lines = [
        f"fetch-nir benchmark: {r['tiles_total']} tiles of {r['captures']} real NAIP captures, loopback "
        f"(nginx + stac-fastapi-pgstac/PostgreSQL), {r['machine']['cores']} cores",
        f"{'':<22} {'tiles':>6} {'seconds':>8} {'tiles/s':>8} {'ms/tile':>8} {'req/tile':>9} {'MB/tile':>8}",
    ]

    def row(name, x):
        lines.append(f"{name:<22} {x['tiles']:>6} {x['seconds']:>8.2f} {x['tiles_per_s']:>8.1f} "
                     f"{x['ms_per_tile']:>8.2f} {x['requests_per_tile']:>9.4f} {x['bytes_read'] / x['tiles'] / 1e6:>8.3f}")

    row("baseline (per tile)", b)
    row("grouped (1 process)", g)
    lines.append(f"  (medians of {r['repeats']} alternated runs; tiles/s baseline {b['runs_tiles_per_s']}, "
                 f"grouped {g['runs_tiles_per_s']}; the server logged {b['nginx_requests']} and "
                 f"{g['nginx_requests']} COG requests)")
    for p in r.get("pipelines", []):
        row(f"fetch-nir, {p['workers']} worker{'s' if p['workers'] > 1 else ''}", p)
    lines += [
        f"grouped vs baseline: {b['requests_per_tile'] / g['requests_per_tile']:.0f}x fewer requests per tile, "
        f"{g['tiles_per_s'] / b['tiles_per_s']:.1f}x the tiles/s (1 process each)",
    ]
    for p in r.get("pipelines", []):
        lines.append(f"fetch-nir, {p['workers']} worker(s): whole command {p['tiles_per_s'] / b['tiles_per_s']:.1f}x "
                     f"the baseline's tiles/s; after its {p['empty_seconds']:.1f} s start "
                     f"(an empty run) {p['marginal_tiles_per_s']:.0f} tiles/s, "
                     f"{p['marginal_tiles_per_s'] / b['tiles_per_s']:.1f}x; outputs identical to the grouped "
                     f"fetch's: {p['differing'] == 0}")
    lines.append(f"outputs: baseline and grouped nir.png identical on {r['compared']} tiles "
                 f"({r['differing']} differ)")
    pr = r["projection"]
    lines += [
        f"1.1 M tiles: companion (1.1 s/tile) {pr['companion_hours']:.0f} h; at these loopback rates, baseline "
        f"{pr['baseline_hours_1_process']:.1f} h, grouped {pr['grouped_hours_1_process']:.2f} h per process "
        + "".join(f", fetch-nir {w} workers {pr['pipeline_%d_workers_hours' % w]:.2f} h"
                  for w in (p["workers"] for p in r.get("pipelines", []))),
        f"  requests: baseline {pr['baseline_requests'] / 1e6:.1f} M, grouped {pr['grouped_requests'] / 1e3:.0f} k; "
        f"with ~100 ms per request: baseline {pr['baseline_hours_1_process_100ms_rtt']:.0f} h, grouped "
        f"{pr['grouped_hours_1_process_100ms_rtt']:.2f} h per process (8 requests in flight)",
    ]
    return "\n".join(lines)


def _median_run(runs: list[dict]) -> dict:
    runs = sorted(runs, key=lambda r: r["tiles_per_s"])
    return {**runs[len(runs) // 2], "runs_tiles_per_s": [round(r["tiles_per_s"], 1) for r in runs]}


def bench(naip_dir: str, workdir: str, baseline_every: int, workers: list[int], group_side: int,
          repeats: int = 3) -> dict:
    servers_mod = _servers()
    missing = servers_mod.missing_requirements()
    if missing:
        raise SystemExit("error: the loopback servers need: " + "; ".join(missing))
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    with servers_mod.LoopbackNaip(naip_dir, workdir) as servers:
        tiles = all_tiles(servers.cogs)
        subset = {n: xys[::baseline_every] for n, xys in tiles.items()}
        report = {"machine": machine(), "captures": len(tiles), "tiles_total": sum(map(len, tiles.values())),
                  "server_start_s": servers.timings}
        base_out, grouped_out = os.path.join(workdir, "baseline-0"), os.path.join(workdir, "grouped-0")
        baseline_runs, grouped_runs = [], []
        for i in range(repeats):  # alternated, so that both see the same machine
            gets0 = len(servers.nginx.access_log())
            baseline_runs.append(_rates(run_baseline(subset, servers.stac_url, os.path.join(workdir, f"baseline-{i}"))))
            baseline_runs[-1]["nginx_requests"] = len(servers.nginx.access_log()) - gets0
            gets0 = len(servers.nginx.access_log())
            grouped_runs.append(_rates(run_grouped(tiles, servers.stac_url, os.path.join(workdir, f"grouped-{i}"),
                                                   group_side)))
            grouped_runs[-1]["nginx_requests"] = len(servers.nginx.access_log()) - gets0
        report["repeats"] = repeats
        report["baseline"] = _median_run(baseline_runs)
        report["grouped"] = _median_run(grouped_runs)
        report["compared"] = sum(map(len, subset.values()))
        report["differing"] = same_outputs(base_out, grouped_out, subset)
        manifest = os.path.join(workdir, "manifest.txt")
        Path(manifest).write_text("\n".join(f"{n}/{x}_{y}" for n, xys in tiles.items() for x, y in xys) + "\n")
        empty = os.path.join(workdir, "empty.txt")
        Path(empty).write_text("# no tiles\n")
        report["pipelines"] = []
        for w in workers:
            out = os.path.join(workdir, f"pipeline-{w}")
            r = _rates(run_pipeline(manifest, servers.stac_url, out, w))
            r["differing"] = same_outputs(grouped_out, out, tiles)
            empty_run = run_pipeline(empty, servers.stac_url, os.path.join(workdir, f"empty-{w}"), w)
            r["empty_seconds"] = empty_run["seconds"]
            r["marginal_tiles_per_s"] = r["tiles"] / max(1e-9, r["seconds"] - r["empty_seconds"])
            report["pipelines"].append(r)
    report["projection"] = projection(report)
    return report


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m pipelines.dev.bench_nir", description=description(__doc__))
    p.add_argument("--naip-dir", default=os.environ.get("S2NAIP_REAL_DATA", str(DEFAULT_NAIP_DIR)),
                   help="folder of real NAIP GeoTIFFs (m_*.tif)")
    p.add_argument("--baseline-every", type=int, default=9,
                   help="the baseline fetches every N-th tile of each capture (default 9: 400 of 3,570)")
    p.add_argument("--workers", default="1",
                   help="fetch-nir command runs, by worker processes, e.g. 1,2 ('' for none)")
    p.add_argument("--group-side", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="baseline and grouped runs, alternated; medians reported")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder, removed)")
    p.add_argument("--report", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        report = bench(args.naip_dir, args.workdir, args.baseline_every, workers, args.group_side, args.repeats)
    else:
        with tempfile.TemporaryDirectory(prefix="s2naip-bench-nir-") as tmp:
            report = bench(args.naip_dir, tmp, args.baseline_every, workers, args.group_side, args.repeats)
    print(report_text(report))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
