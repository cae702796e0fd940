"""`s2naip bench-gcs` / `python -m pipelines.dev.bench_gcs`: the build reading gs:// with an object store's
round-trip latency, with reads started ahead on N threads (`--read-threads`) or not at all (0).

Servers (pipelines/dev/gcs_emulator.py, so run it from a checkout with the [test] extra): gcp-storage-emulator
on 127.0.0.1, behind a proxy that delays every request by `--latency-ms` (each request on its own
thread, so concurrent requests overlap their delays as on GCS, where a small object's first byte
takes tens of milliseconds). The input is a generated sample with the extra bands (`--tiles`), the
build the default one (`paper` selection, every format's work but Parquet only), one worker process, in this
process (FnApiRunner). Each setting runs `--repeats` times, settings interleaved; medians reported.
A run at 0 ms latency shows what the thread pool costs when reads are fast (local disk, page cache).

Measured per setting: tiles/s of the whole build (listing, fingerprints, reads, selection, Parquet,
run.json), requests through the proxy per tile, and whether the outputs equal the first setting's.
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


def run_build(server, proxy, base: str, out: str, read_threads: int) -> dict:
    from pipelines import build_pairs
    from transforms.io import storage

    proxy.reset()
    storage.reset_client()
    started = time.perf_counter()
    with server.environment(proxy.endpoint):
        summary = build_pairs.run(["--input", base, "--output", out, "--runner", "FnApiRunner",
                                   "--read-threads", str(read_threads), "--overwrite"])
    seconds = time.perf_counter() - started
    storage.reset_client()
    tiles = summary["counts"]["tiles"]
    return {"seconds": seconds, "tiles": tiles, "tiles_per_s": tiles / seconds,
            "requests_per_tile": proxy.counts["requests"] / max(tiles, 1)}


def bench(tiles: int, latencies_ms: list[float], thread_settings: list[int], repeats: int, workdir: str) -> dict:
    from transforms.devdata.sample import generate_sample

    emu = _emulator()
    sample = os.path.join(workdir, f"sample-{tiles}")
    generate_sample(sample, tiles, seed=0, timesteps=(26, 34), extra_bands=True, workers=os.cpu_count() or 1)
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
                        runs[threads].append(run_build(server, proxy, base, out, threads))
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
    finally:
        server.stop()
    for latency in latencies_ms:
        rows = [r for r in results if r["latency_ms"] == latency]
        base_rate = next(r["tiles_per_s"] for r in rows if r["read_threads"] == thread_settings[0])
        for r in rows:
            r["speedup_vs_first_setting"] = r["tiles_per_s"] / base_rate
    return {"tiles": tiles, "repeats": repeats, "results": results,
            "machine": machine()}


def report_text(report: dict) -> str:
    lines = [f"s2naip bench-gcs: {report['tiles']} tiles from gs:// (emulator behind a latency proxy), "
             f"one worker process, medians of {report['repeats']}, {report['machine']['cores']} cores",
             f"  {'latency':>8} {'read threads':>12} {'tiles/s':>9} {'speed-up':>9} {'requests/tile':>14}  same pairs"]
    for r in report["results"]:
        lines.append(f"  {r['latency_ms']:>6g}ms {r['read_threads']:>12} {r['tiles_per_s']:>9.1f} "
                     f"{r['speedup_vs_first_setting']:>8.2f}x {r['requests_per_tile']:>14.1f}  "
                     f"{'yes' if r['same_pairs_as_first_setting'] else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="s2naip bench-gcs", description=description(__doc__))
    p.add_argument("--tiles", type=int, default=200, help="tiles of the generated sample read from gs://")
    p.add_argument("--latency-ms", default="0,30", help="comma-separated per-request delays (default 0,30)")
    p.add_argument("--read-threads", default="0,16", help="comma-separated settings; the first is the baseline")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each setting (settings interleaved); the median is reported")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder, removed)")
    p.add_argument("--report", default=None, help="write the figures as JSON here")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    latencies = [float(x) for x in args.latency_ms.split(",") if x.strip()]
    threads = [int(x) for x in args.read_threads.split(",") if x.strip()]
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        report = bench(args.tiles, latencies, threads, args.repeats, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="s2naip-bench-gcs-") as tmp:
            report = bench(args.tiles, latencies, threads, args.repeats, tmp)
    print(report_text(report))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2, sort_keys=True))
    return 0 if all(r["same_pairs_as_first_setting"] for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
