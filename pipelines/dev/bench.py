"""`s2naip bench` / `python -m pipelines.dev.bench`: throughput and memory of the build, measured in one run.

Measures, on a generated sample (default 2,000 tiles, ~30 timesteps each, with the bands b01, b05,
b08, b09, b10, b11, b12 that S2-NAIP ships and s2cloudless reads: `bench.sample_dir`), for one --selection mode (default: the build's), medians over
repeats of:
  decode   read + decode the PNGs the mode reads (rgb, nir, tci, b08; robust also the extra bands):
           the floor, nothing can be faster than its input
  core     the selection alone (select_pair on decoded arrays)
  loop     the whole per-tile function (build_tile: read, decode, select, record) in a plain loop
  pipe-1   the full Beam pipeline, in-process runner, one worker (wall time of the command)
  pipe-2   the same with 2 worker processes (multi_processing)
and the pipeline's peak RSS at two sample sizes (default 2,000 and 20,000 tiles).
Prints a table and writes the figures to --report (JSON).

With --companion-repo DIR it instead times the paper's published code beside the build, end to end
on the same tiles, and prints the ratios (`pipelines.dev.bench_companion`; --real-data for tiles derived
from real NAIP).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

from pipelines.dev import bench_companion as BC
from pipelines.cli import ArgumentParser, CommandError, description
from transforms import runtime, tiles
from transforms.devdata import cloud_bands
from transforms.devdata.sample import generate_sample
from transforms.pairs import PairConfig, TileRejected, build_tile, load_tile
from transforms.selection import DEFAULT_SELECTION, EXTRA_BANDS, SELECTION_MODES, SelectionConfig, select_pair
from transforms.tiles import TileId

MULTI_PROCESSING = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
TIMESTEPS = (26, 34)  # ~30 timesteps per tile, as S2-NAIP's shorter series


def sample_dir(workdir: str, tiles: int, seed: int) -> str:
    """A generated sample, made once per (tiles, seed) and reused by later runs, with every band
    s2cloudless reads, as S2-NAIP's chips have them (the generator's b01, b10, b11, b12 and
    `cloud_bands`' b05, b09): the default selection's whole cost is measured."""
    path = os.path.join(workdir, f"sample-{tiles}-{seed}-xb")
    done = os.path.join(path, ".complete")
    if not os.path.exists(done):
        generate_sample(path, tiles, seed=seed, timesteps=TIMESTEPS, extra_bands=True,
                        workers=os.cpu_count() or 1)
        open(done, "w").close()
    cloud_bands.add_to_folder(path, tile_ids(path))
    return path


def tile_ids(sample: str) -> list[str]:
    with open(os.path.join(sample, "manifest.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def time_decode_and_core(ids: list[str], config: PairConfig) -> tuple[float, float, int]:
    """Seconds spent decoding and selecting over the tiles that reach selection, and their count."""
    decode_s = core_s = 0.0
    n = 0
    for tile_id in ids:
        tile = TileId.parse(tile_id)
        t0 = time.perf_counter()
        try:
            inputs = load_tile(tile, config)
        except TileRejected:
            continue
        t1 = time.perf_counter()
        try:
            select_pair(inputs.hr, inputs.series, config.selection, inputs.extra)
        except Exception:
            continue
        t2 = time.perf_counter()
        decode_s += t1 - t0
        core_s += t2 - t1
        n += 1
    return decode_s, core_s, n


def time_loop(ids: list[str], config: PairConfig) -> float:
    t0 = time.perf_counter()
    for tile_id in ids:
        build_tile(tile_id, config)
    return time.perf_counter() - t0


@dataclasses.dataclass(frozen=True)
class Usage:
    wall_s: float  # wall clock of the process
    cpu_s: float  # user + system CPU of the process and the children it waited for (Beam's workers)
    rss_mib: float  # peak RSS of the process


def run_command(cmd: list[str], cwd: str | None = None, what: str = "command") -> Usage:
    """Runs `cmd` to its end (stdout discarded); raises RuntimeError with its stderr's tail if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read().decode(errors="replace")  # drained while it runs: no pipe stall
    proc.stderr.close()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{stderr[-4000:]}")
    return Usage(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0)


def pipeline_usage(sample: str, out: str, extra: list[str], manifest: str | None = None) -> Usage:
    """One `python -m pipelines.build_pairs` run (`extra`: more options, e.g. --selection) on the
    tiles of `manifest` (default: the sample's)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipelines.build_pairs", "--input", sample, "--output", out,
           "--manifest", manifest or os.path.join(sample, "manifest.txt"), "--runner", "FnApiRunner", *extra]
    return run_command(cmd, what="pipeline")


def run_pipeline(sample: str, out: str, extra: list[str], manifest: str | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one `pipeline_usage` run."""
    usage = pipeline_usage(sample, out, extra, manifest)
    return usage.wall_s, usage.rss_mib


def input_bytes_per_tile(sample: str, ids: list[str], mode: str) -> float:
    """Mean bytes of the files a tile reads (rgb, nir, tci, b08; robust: also the extra bands it
    has), over tiles that have the first four."""
    total, n = 0, 0
    for tile_id in ids:
        tile = TileId.parse(tile_id)
        paths = [tiles.hr_rgb_path(sample, tile), tiles.hr_nir_path(sample, tile),
                 tiles.s2_band_path(sample, tile, "tci"), tiles.s2_band_path(sample, tile, "b08")]
        if all(os.path.exists(p) for p in paths):
            if mode == "robust":
                paths += [p for p in (tiles.s2_band_path(sample, tile, b) for b in EXTRA_BANDS) if os.path.exists(p)]
            total += sum(os.path.getsize(p) for p in paths)
            n += 1
    return total / max(n, 1)


def output_bytes_per_pair(out: str) -> float:
    with open(os.path.join(out, "run.json")) as f:
        pairs = json.load(f)["counts"]["pairs"]
    folder = os.path.join(out, "pairs")
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) / max(pairs, 1)


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import numpy

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": numpy.__version__, "platform": platform.platform()}


def bench(tiles: int, rss_tiles: list[int], repeats: int, workdir: str, seed: int = 0,
          selection: str = DEFAULT_SELECTION) -> dict:
    runtime.tune_selection_process()  # as BuildPairDoFn.setup does in the pipeline's workers
    sample = sample_dir(workdir, tiles, seed)
    ids = tile_ids(sample)
    config = PairConfig(input_root=sample, selection=SelectionConfig(mode=selection))
    mode_args = ["--selection", selection]
    decode_rates, core_rates, loop_rates = [], [], []
    for _ in range(repeats):
        decode_s, core_s, n = time_decode_and_core(ids, config)
        decode_rates.append(n / decode_s)
        core_rates.append(n / core_s)
        loop_rates.append(len(ids) / time_loop(ids, config))
    pipe, cpu = {}, {}
    for name, extra in [("pipe_1", []), ("pipe_2", MULTI_PROCESSING)]:
        rates, cpus = [], []
        for r in range(repeats):
            usage = pipeline_usage(sample, os.path.join(workdir, f"out-{name}-{r}"), extra + mode_args)
            rates.append(len(ids) / usage.wall_s)
            cpus.append(usage.cpu_s)
        pipe[name] = statistics.median(rates)
        cpu[name] = statistics.median(cpus)
    rss = {}
    for n in rss_tiles:
        s = sample_dir(workdir, n, seed)
        rss[n] = run_pipeline(s, os.path.join(workdir, f"out-rss-{n}"), mode_args)[1]
    med = statistics.median
    result = {
        "tiles": tiles,
        "repeats": repeats,
        "selection": selection,
        "tiles_per_s": {"decode": med(decode_rates), "core": med(core_rates), "loop": med(loop_rates),
                        "pipeline_in_process": pipe["pipe_1"], "pipeline_2_workers": pipe["pipe_2"]},
        "ratios": {
            "core_cost_vs_decode": med(decode_rates) / med(core_rates),
            "pipeline_vs_loop": pipe["pipe_1"] / med(loop_rates),
            "pipeline_2_workers_vs_1": pipe["pipe_2"] / pipe["pipe_1"],
        },
        # CPU (user + system, the launcher and its workers) per tile of the whole build, start-up
        # included: what a machine, or Dataflow's vCPUs, pay for it
        "cpu_ms_per_tile": {"pipeline_in_process": 1e3 * cpu["pipe_1"] / len(ids),
                            "pipeline_2_workers": 1e3 * cpu["pipe_2"] / len(ids)},
        "peak_rss_mib": {str(n): v for n, v in rss.items()},
        "bytes": {"input_per_tile": input_bytes_per_tile(sample, ids, selection),
                  "parquet_per_pair": output_bytes_per_pair(os.path.join(workdir, "out-pipe_1-0"))},
        "machine": machine(),
    }
    if len(rss_tiles) >= 2:
        small, large = min(rss_tiles), max(rss_tiles)
        result["ratios"][f"rss_{large}_vs_{small}"] = rss[large] / rss[small]
    return result


def report_text(r: dict) -> str:
    t, q = r["tiles_per_s"], r["ratios"]
    lines = [
        f"s2naip bench: --selection {r.get('selection', '?')}, {r['tiles']} tiles, medians of {r['repeats']} runs, "
        f"{r['machine']['cpu']} ({r['machine']['cores']} cores)",
        f"  decode only (floor)         {t['decode']:8.1f} tiles/s",
        f"  core (selection) only       {t['core']:8.1f} tiles/s   cost {q['core_cost_vs_decode']:.2f}x decode",
        f"  per-tile loop (all steps)   {t['loop']:8.1f} tiles/s",
        f"  pipeline, in-process        {t['pipeline_in_process']:8.1f} tiles/s   "
        f"{100 * q['pipeline_vs_loop']:.0f}% of the loop",
        f"  pipeline, 2 workers         {t['pipeline_2_workers']:8.1f} tiles/s   "
        f"{q['pipeline_2_workers_vs_1']:.2f}x in-process",
    ]
    c = r.get("cpu_ms_per_tile")
    if c:
        lines.append(f"  CPU per tile, whole build    {c['pipeline_in_process']:8.2f} ms in-process   "
                     f"{c['pipeline_2_workers']:.2f} ms with 2 workers (start-up included)")
    lines.append(f"  bytes read per tile         {r['bytes']['input_per_tile'] / 1024:8.1f} KiB   "
                 f"Parquet per pair {r['bytes']['parquet_per_pair'] / 1024:.1f} KiB")
    for n, v in r["peak_rss_mib"].items():
        lines.append(f"  peak RSS at {int(n):>6} tiles   {v:8.0f} MiB")
    for k, v in q.items():
        if k.startswith("rss_"):
            lines.append(f"  RSS ratio {k[4:]:<18} {v:8.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="s2naip bench", description=description(__doc__))
    parser.add_argument("--tiles", type=int, default=2000,
                        help="tiles of the generated sample the speed figures are measured on")
    parser.add_argument("--rss-tiles", default="2000,20000", help="comma-separated sample sizes for peak RSS")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each measurement; the median is reported")
    parser.add_argument("--selection", default=DEFAULT_SELECTION, choices=SELECTION_MODES,
                        help=f"the selection mode to measure (default {DEFAULT_SELECTION}, the build's)")
    parser.add_argument("--workdir", default="bench-out", help="samples are generated here once and reused")
    parser.add_argument("--report", default=None, help="JSON file for the figures (default: WORKDIR/bench.json, "
                                                       "with --companion-repo WORKDIR/bench-companion.json)")
    comp = parser.add_argument_group("against the paper's published code")
    comp.add_argument("--companion-repo", metavar="DIR",
                      help="checkout of ozendelait/better_s2_naip: time it beside the build on the same tiles "
                           "(whole processes, medians of --repeats) and print the ratios, instead of the figures above")
    comp.add_argument("--companion-python", metavar="PATH", default=sys.executable,
                      help="python with torch, torchvision, torchmetrics, scikit-image, tqdm and matplotlib for "
                           "the companion code (default: this one; docs/performance.md sets up a separate venv)")
    comp.add_argument("--real-data", metavar="DIR",
                      help="with --companion-repo: tiles derived from the real NAIP GeoTIFFs in DIR instead of "
                           "the generated sample")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.tiles < 1 or args.repeats < 1:
        parser.error("--tiles and --repeats must be >= 1")
    if args.real_data and not args.companion_repo:
        parser.error("--real-data needs --companion-repo")
    os.makedirs(args.workdir, exist_ok=True)
    if args.companion_repo:
        return _main_companion(args)
    rss_tiles = [int(x) for x in args.rss_tiles.split(",") if x.strip()]
    result = bench(args.tiles, rss_tiles, args.repeats, args.workdir, selection=args.selection)
    report = args.report or os.path.join(args.workdir, "bench.json")
    with open(report, "w") as f:
        json.dump(result, f, indent=2)
    print(report_text(result))
    print(f"figures: {report}")
    return 0


def _main_companion(args) -> int:
    try:
        result = BC.bench_companion(os.path.abspath(args.companion_repo), args.companion_python, args.workdir,
                                    args.tiles, args.repeats, args.selection, real_data=args.real_data)
    except BC.BenchError as e:
        raise CommandError(str(e)) from None
    report = args.report or os.path.join(args.workdir, "bench-companion.json")
    with open(report, "w") as f:
        json.dump(result, f, indent=2)
    print(BC.report_text(result))
    print(f"figures: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
