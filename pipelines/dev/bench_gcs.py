"""`s2naip bench-gcs` / `python -m pipelines.dev.bench_gcs`: the build reading gs:// with an object store's
round-trip latency, with reads started ahead on N threads (`--read-threads`) or not at all (0).

Servers (pipelines/dev/gcs_emulator.py, so run it from a checkout with the [test] extra): gcp-storage-emulator
on 127.0.0.1, behind a proxy that delays every request by `--latency-ms` (each request on its own
thread, so concurrent requests overlap their delays as on GCS, where a small object's first byte
takes tens of milliseconds). The input is a generated sample with the extra bands (`--tiles`), the
build the default one (`paper` selection, every format's work but Parquet only), one worker process, in this
process (FnApiRunner). `--s2naip-chips` gives its chips S2-NAIP's s2cloudless bands, `--without-s2`
takes a share of its tiles' Sentinel-2 away. Each setting runs `--repeats` times, settings
interleaved; medians reported.
A run at 0 ms latency shows what the thread pool costs when reads are fast (local disk, page cache).

Measured per setting: tiles/s of the whole build (listing, fingerprints, reads, selection, Parquet,
run.json), requests through the proxy per tile, and whether the outputs equal the first setting's.

Then the storage operations per tile, counted at the proxy (the HTTP layer in front of the emulator,
not in our code) by kind as GCS bills them (`pipelines.dev.gcs_emulator.request_kinds`: media GETs, metadata
GETs, listings pages, inserts, composes, copies, deletes; a JSON batch's parts one by one), for a
full build and for an incremental `--since` rebuild of the unchanged input into a new folder (the
last `--read-threads` setting, no added latency), in all and on the input's objects alone (those grow
with the tiles; the rest is per run and per output shard). The proxy pages listings as GCS does (1,000
entries a page), which the emulator alone does not.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipelines.dev.bench import machine
from pipelines.cli import ArgumentParser, description

BUCKET = "s2naip-bench"


def _emulator():
    try:
        import gcp_storage_emulator  # noqa: F401

        from pipelines.dev import gcs_emulator
    except ImportError as e:
        raise SystemExit(f"s2naip bench-gcs needs the [test] extra (pip install 's2naip-pairs[test]'): {e}") from None
    return gcs_emulator


def _pairs_digest(server, out: str) -> list[tuple[str, int, bytes]]:
    import io

    import pyarrow.parquet as pq

    rows = []
    for url in server.list(out + "/pairs/"):
        if url.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(server.read_bytes(url)), columns=["tile_id", "lr_index", "hr"])
            rows += zip(table["tile_id"].to_pylist(), table["lr_index"].to_pylist(), table["hr"].to_pylist())
    return sorted(rows)


def run_build(server, proxy, base: str, out: str, read_threads: int, extra: tuple[str, ...] = ()) -> dict:
    from pipelines import build_pairs
    from transforms.io import storage

    proxy.reset()
    storage.reset_client()
    started = time.perf_counter()
    with server.environment(proxy.endpoint):
        summary = build_pairs.run(["--input", base, "--output", out, "--runner", "FnApiRunner",
                                   "--read-threads", str(read_threads), "--overwrite", *extra])
    seconds = time.perf_counter() - started
    storage.reset_client()
    tiles = summary["counts"]["tiles"]
    emu = _emulator()
    input_kinds: dict[str, int] = {}
    input_key = base.split("/", 3)[3] + "/"  # the input's object prefix in the bucket
    for kind, path in proxy.operations:
        if emu.operation_object(path).startswith(input_key):
            input_kinds[kind] = input_kinds.get(kind, 0) + 1
    return {"seconds": seconds, "tiles": tiles, "tiles_per_s": tiles / seconds,
            "requests_per_tile": proxy.counts["requests"] / max(tiles, 1),
            "kinds": dict(proxy.kinds), "input_kinds": input_kinds, "incremental": summary.get("incremental", {})}


def operations(kinds: dict[str, int], tiles: int, kind_class: dict[str, str]) -> dict:
    """Counted operations -> per tile, by kind and by GCS operation class."""
    per_tile = {k: n / max(tiles, 1) for k, n in sorted(kinds.items())}
    by_class: dict[str, float] = {}
    for kind, n in per_tile.items():
        by_class[kind_class.get(kind, "?")] = by_class.get(kind_class.get(kind, "?"), 0.0) + n
    return {"counts": dict(sorted(kinds.items())), "per_tile": per_tile, "per_tile_by_class": by_class}


def count_operations(server, base: str, read_threads: int, extra: tuple[str, ...], kind_class) -> dict:
    """A full build, then an incremental rebuild of the unchanged input (--since the full one),
    each through a fresh counting proxy; operations per tile of each."""
    out = {}
    with server.proxy() as proxy:
        full = run_build(server, proxy, base, f"gs://{BUCKET}/ops-full", read_threads, extra)
        since = run_build(server, proxy, base, f"gs://{BUCKET}/ops-since", read_threads,
                          (*extra, "--since", f"gs://{BUCKET}/ops-full"))
    for name, run in (("full", full), ("since_unchanged", since)):
        out[name] = {"tiles": run["tiles"], "incremental": run["incremental"],
                     **operations(run["kinds"], run["tiles"], kind_class),
                     "input": operations(run["input_kinds"], run["tiles"], kind_class)}
    return out


S2NAIP_S2_FILES = ("tci", "b01", "b05", "b06", "b07", "b08", "b09", "b10", "b11", "b12")
LAYOUT_CAPTURE = (11, 10)  # columns x rows of tiles per capture: ~110 tiles share a NAIP item in S2-NAIP


def layout_tile_ids(n_tiles: int) -> list[str]:
    """Tile ids laid out as S2-NAIP's: captures of 11 x 10 neighbouring zoom-17 tiles, side by side
    one quarter quad (~23 columns) apart, rows of 8 captures."""
    cols, rows = LAYOUT_CAPTURE
    ids = []
    for k in range((n_tiles + cols * rows - 1) // (cols * rows)):
        naip_id = f"m_{4000000 + k:07d}_nw_14_060_20190601"
        x0, y0 = 20000 + (k % 8) * 23, 50000 + (k // 8) * 18
        ids += [f"{naip_id}/{x0 + i % cols}_{y0 + i // cols}" for i in range(cols * rows)]
    return ids[:n_tiles]


def listing_operations(server, n_tiles: int) -> dict:
    """The fingerprints' listings per tile on an S2-NAIP-shaped input of `n_tiles` tiles (small
    placeholder objects: rgb and nir per tile, the 10 Sentinel-2 files per chip), grouped and
    chunked as the build does (`FingerprintTiles` on gs://), counted at the proxy."""
    import concurrent.futures

    from transforms.build import fingerprints as fpr
    from transforms.build import increments
    from transforms.io import storage

    ids = layout_tile_ids(n_tiles)
    bucket = server.emulator.client.bucket(BUCKET)
    names = []
    for tile_id in ids:
        naip_id, xy = tile_id.split("/")
        names += [f"layout/naip/{naip_id}/{xy}/{f}.png" for f in ("rgb", "nir")]
        names += [f"layout/sentinel2/{xy}/{b}.png" for b in S2NAIP_S2_FILES]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # the emulator is one Python process
        list(pool.map(lambda name: bucket.blob(name).upload_from_string(name.encode()), names))
    spec = fpr.FingerprintSpec(f"gs://{BUCKET}/layout", extra_bands=("b01", "b05", "b09", "b10", "b11", "b12"))
    groups: dict[str, list[str]] = {}
    for tile_id in ids:
        groups.setdefault(fpr.column_block(tile_id), []).append(tile_id)
    with server.proxy() as proxy, server.environment(proxy.endpoint):
        storage.reset_client()
        fingerprints = {}
        for group in groups.values():
            group = sorted(group, key=increments.tile_order)
            for i in range(0, len(group), increments.GROUP_CHUNK_TILES):
                chunk = group[i:i + increments.GROUP_CHUNK_TILES]
                fingerprints.update(zip(chunk, fpr.group_fingerprints(chunk, spec)))
        lists = proxy.kinds.get("list", 0)
        storage.reset_client()
    complete = all(fps[0] and fps[1] and fps[2] and fps[3] and fps[4].count("=") == 6
                   for fps in fingerprints.values())
    return {"tiles": len(ids), "objects": len(names), "captures": len({t.split("/")[0] for t in ids}),
            "column_blocks": len(groups), "list_requests": lists, "lists_per_tile": lists / len(ids),
            "every_file_found": complete and len(fingerprints) == len(ids)}


def with_s2naip_chips(sample: str, out: str, without_b09: float) -> dict[str, int]:
    """A copy of the generated `sample` (hard links) whose Sentinel-2 chips hold every band
    s2cloudless reads, as S2-NAIP's do (`b05` and `b09`, written as copies of the chip's `b01`:
    pixels that only have to have the right shape), but where a share `without_b09` of the chips
    (every chip whose rank in name order falls in that share, spread evenly) has no `b09`, as when
    a band file is missing: those chips' `b05` feeds nothing (`pairs.planned_extra_bands`).
    Returns the chips by kind."""
    import shutil

    if os.path.exists(out):
        shutil.rmtree(out)
    shutil.copytree(sample, out, copy_function=os.link)
    chips = sorted(Path(out, "sentinel2").iterdir())
    counts = {"chips": len(chips), "without_b09": 0}
    for i, chip in enumerate(chips):
        b01 = chip / "b01.png"
        if not b01.exists():
            continue
        for name in ("b05.png", "b09.png"):
            (chip / name).unlink(missing_ok=True)  # never write through a hard link into the sample
        shutil.copyfile(b01, chip / "b05.png")
        if int((i + 1) * without_b09) > int(i * without_b09):
            counts["without_b09"] += 1
        else:
            shutil.copyfile(b01, chip / "b09.png")
    return counts


def without_s2(sample: str, out: str, share: float) -> dict[str, int]:
    """A copy of the generated `sample` (hard links) where a further share `share` of the tiles has
    no Sentinel-2 at all: the chip folder `sentinel2/<x>_<y>/` of every tile whose rank in name
    order among those that have one falls in that share (spread evenly) is left out, as for the
    tiles of S2-NAIP without a Sentinel-2 chip (`missing_s2`). Returns the chips by kind."""
    import shutil

    if os.path.exists(out):
        shutil.rmtree(out)
    shutil.copytree(sample, out, copy_function=os.link)
    chips = sorted(p for p in Path(out, "sentinel2").iterdir() if p.is_dir())
    removed = 0
    for i, chip in enumerate(chips):
        if int((i + 1) * share) > int(i * share):
            shutil.rmtree(chip)  # unlinks the copy's links: the sample keeps its files
            removed += 1
    return {"chips": len(chips), "removed": removed}


def bench(tiles: int, latencies_ms: list[float], thread_settings: list[int], repeats: int, workdir: str,
          extra: tuple[str, ...] = (), layout_tiles: int = 0, s2naip_chips: float | None = None,
          no_s2: float | None = None) -> dict:
    from transforms.devdata.sample import generate_sample

    emu = _emulator()
    sample = os.path.join(workdir, f"sample-{tiles}")
    generate_sample(sample, tiles, seed=0, timesteps=(26, 34), extra_bands=True, workers=os.cpu_count() or 1)
    chips = removed = None
    if s2naip_chips is not None:
        chips = with_s2naip_chips(sample, os.path.join(workdir, f"sample-{tiles}-s2naip"), s2naip_chips)
        sample = os.path.join(workdir, f"sample-{tiles}-s2naip")
    if no_s2 is not None:
        removed = without_s2(sample, sample + "-no-s2", no_s2)
        sample += "-no-s2"
    server = emu.GcsTestServer(os.path.join(workdir, "gcs-env"))
    server.start()
    results = []
    try:
        server.bucket(BUCKET)
        base = f"gs://{BUCKET}/input"
        server.upload_tree(sample, base)
        for latency in latencies_ms:
            with server.proxy(latency_s=latency / 1000.0) as proxy:
                runs: dict[int, list[dict]] = {t: [] for t in thread_settings}
                digests = {}
                for r in range(repeats):
                    for threads in thread_settings:  # interleaved: the machine's noise hits all alike
                        out = f"gs://{BUCKET}/out-{latency:g}ms-{threads}t"
                        runs[threads].append(run_build(server, proxy, base, out, threads, extra))
                        if r == 0:
                            digests[threads] = _pairs_digest(server, out)
                first = digests[thread_settings[0]]
                for threads in thread_settings:
                    rates = [x["tiles_per_s"] for x in runs[threads]]
                    results.append({
                        "latency_ms": latency, "read_threads": threads, "tiles": runs[threads][0]["tiles"],
                        "tiles_per_s": statistics.median(rates), "tiles_per_s_runs": rates,
                        "requests_per_tile": runs[threads][0]["requests_per_tile"],
                        "same_pairs_as_first_setting": digests[threads] == first,
                    })
        operations_per_tile = count_operations(server, base, thread_settings[-1], extra, emu.KIND_CLASS)
        layout = listing_operations(server, layout_tiles) if layout_tiles else None
    finally:
        server.stop()
    for latency in latencies_ms:
        rows = [r for r in results if r["latency_ms"] == latency]
        base_rate = next(r["tiles_per_s"] for r in rows if r["read_threads"] == thread_settings[0])
        for r in rows:
            r["speedup_vs_first_setting"] = r["tiles_per_s"] / base_rate
    return {"tiles": tiles, "repeats": repeats, "results": results, "options": list(extra),
            "s2naip_chips": chips, "without_s2": removed, "operations": operations_per_tile, "layout_listings": layout,
            "machine": machine()}


def report_text(report: dict) -> str:
    lines = [f"s2naip bench-gcs: {report['tiles']} tiles from gs:// (emulator behind a latency proxy), "
             f"one worker process, medians of {report['repeats']}, {report['machine']['cores']} cores",
             f"  {'latency':>8} {'read threads':>12} {'tiles/s':>9} {'speed-up':>9} {'requests/tile':>14}  same pairs"]
    if report.get("s2naip_chips"):
        chips = report["s2naip_chips"]
        lines.insert(1, f"  chips with S2-NAIP's s2cloudless bands (b05, b09): {chips['chips']}, "
                        f"{chips['without_b09']} of them without b09")
    if report.get("without_s2"):
        gone = report["without_s2"]
        lines.insert(1, f"  Sentinel-2 chips left out (--without-s2): {gone['removed']} of {gone['chips']}, "
                        "besides the sample's own missing_s2 tiles")
    for r in report["results"]:
        lines.append(f"  {r['latency_ms']:>6g}ms {r['read_threads']:>12} {r['tiles_per_s']:>9.1f} "
                     f"{r['speedup_vs_first_setting']:>8.2f}x {r['requests_per_tile']:>14.1f}  "
                     f"{'yes' if r['same_pairs_as_first_setting'] else 'NO'}")
    lines.append("  storage operations per tile (counted at the HTTP layer; class A / B as GCS bills them):")
    for name, ops in report["operations"].items():
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in ops["per_tile"].items())
        classes = ", ".join(f"{c} {v:.3f}" for c, v in sorted(ops["per_tile_by_class"].items()))
        lines.append(f"    {name:>15} ({ops['tiles']} tiles): {kinds}")
        lines.append(f"    {'':>15} by class: {classes}")
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in ops["input"]["per_tile"].items())
        lines.append(f"    {'':>15} of which on the input (grows with the tiles): {kinds}")
    layout = report.get("layout_listings")
    if layout:
        lines.append(f"  fingerprint listings on an S2-NAIP-shaped input: {layout['tiles']} tiles, {layout['objects']} "
                     f"objects, {layout['captures']} captures, {layout['column_blocks']} column blocks: "
                     f"{layout['list_requests']} list requests, {layout['lists_per_tile']:.4f} per tile"
                     f"{'' if layout['every_file_found'] else ' (FILES MISSED)'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="s2naip bench-gcs", description=description(__doc__))
    p.add_argument("--tiles", type=int, default=200, help="tiles of the generated sample read from gs://")
    p.add_argument("--latency-ms", default="0,30", help="comma-separated per-request delays (default 0,30)")
    p.add_argument("--read-threads", default="0,16", help="comma-separated settings; the first is the baseline")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each setting (settings interleaved); the median is reported")
    p.add_argument("--selection", default=None,
                   help="the build's --selection (default: the build's default)")
    p.add_argument("--layout-tiles", type=int, default=0,
                   help="also count the fingerprints' listings on an S2-NAIP-shaped input of this many tiles "
                        "(placeholder objects: 110 tiles per capture, 10 Sentinel-2 files per chip)")
    p.add_argument("--s2naip-chips", type=float, default=None, metavar="SHARE_WITHOUT_B09",
                   help="give the sample's chips S2-NAIP's s2cloudless bands (b05, b09, copies of b01) and "
                        "take b09 away from this share of them (0 to 1): what a missing band saves")
    p.add_argument("--without-s2", type=float, default=None, metavar="SHARE",
                   help="leave out the Sentinel-2 chip folder of this share (0 to 1) of the sample's tiles "
                        "that have one (besides its own 3.3%% missing_s2 tiles): what tiles without "
                        "Sentinel-2 cost")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder, removed)")
    p.add_argument("--report", default=None, help="write the figures as JSON here")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    latencies = [float(x) for x in args.latency_ms.split(",") if x.strip()]
    threads = [int(x) for x in args.read_threads.split(",") if x.strip()]
    if not threads:
        p.error("--read-threads needs at least one setting")
    if args.s2naip_chips is not None and not 0.0 <= args.s2naip_chips <= 1.0:
        p.error(f"--s2naip-chips must be a share in [0, 1], got {args.s2naip_chips}")
    if args.without_s2 is not None and not 0.0 <= args.without_s2 <= 1.0:
        p.error(f"--without-s2 must be a share in [0, 1], got {args.without_s2}")
    extra = ("--selection", args.selection) if args.selection else ()
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        report = bench(args.tiles, latencies, threads, args.repeats, args.workdir, extra, args.layout_tiles,
                       args.s2naip_chips, args.without_s2)
    else:
        with tempfile.TemporaryDirectory(prefix="s2naip-bench-gcs-") as tmp:
            report = bench(args.tiles, latencies, threads, args.repeats, tmp, extra, args.layout_tiles,
                           args.s2naip_chips, args.without_s2)
    print(report_text(report))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2, sort_keys=True))
    unchanged = report["operations"]["since_unchanged"]["incremental"]
    carried_all = unchanged.get("processed", 0) == 0 and unchanged.get("unchanged", 0) == args.tiles
    layout_ok = not report["layout_listings"] or report["layout_listings"]["every_file_found"]
    return 0 if layout_ok and carried_all and all(r["same_pairs_as_first_setting"] for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
