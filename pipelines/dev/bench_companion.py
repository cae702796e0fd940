"""`s2naip bench --companion-repo DIR`: the paper's published code and `s2naip build`, end to end, on
the same tiles.

Times whole processes (wall clock, start-up included), interleaved repeat by repeat, medians:
  companion   the published code (ozendelait/better_s2_naip) as its README runs it: its prefilter
              (`python -m first_filtering.main`) then its selection and saving (`python -m
              pipeline_framework.main`, device cpu, 16 step-1 candidates), each with its own
              3-thread pool; both processes' wall times added. It needs torch, torchvision,
              torchmetrics, scikit-image, tqdm and matplotlib: --companion-python names an
              interpreter that has them (a separate venv, docs/performance.md; this project does
              not depend on them)
  build-1     `python -m pipelines.build_pairs`, in-process runner, one worker
  build-2     the same with 2 worker processes (--direct_num_workers=2
              --direct_running_mode=multi_processing)
and prints the ratios companion / build. The tiles are the benchmark's generated sample (with the
extra bands S2-NAIP ships; without its tiles that lack nir.png or b08.png, on which the companion
code stops with an error), or with --real-data tiles derived from real NAIP captures
(`transforms.devdata.hard_cases`: the captures' usable zoom-17 tiles, each a real HR with a Sentinel-2-like
series made from the other captures, ~27 timesteps; repeated with other seeds under shifted tile
coordinates when more tiles are asked for than the captures have).

Both sides read the same files from the page cache (one untimed warm-up run of each first) and
get the same environment, so set OMP_NUM_THREADS=1 etc. for both as docs/performance.md says.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess

from pipelines.dev import bench
from transforms import tiles as T
from transforms.devdata import cloud_bands
from transforms.devdata import hard_cases as H

PREFILTER_MODULE = "first_filtering.main"
SELECTION_MODULE = "pipeline_framework.main"
COMPANION_IMPORTS = "import torch, torchvision, torchmetrics, skimage, tqdm, matplotlib"
NUM_IMGS_M1 = 16  # the published config's num_imgs_m1
REAL_EXTRA_BANDS = ("b01", "b10", "b11", "b12")  # as the generated sample; b05 and b09 are derived after (cloud_bands)
SHIFT = 1000  # tile-x offset between repetitions of the real tiles


class BenchError(Exception):
    """A wrong argument or a failed run: one line for the user."""


def check_companion(repo: str, python: str) -> str:
    """The companion checkout and interpreter, checked; returns the interpreter's torch version."""
    for module in (PREFILTER_MODULE, SELECTION_MODULE):
        path = os.path.join(repo, *module.split(".")) + ".py"
        if not os.path.isfile(path):
            raise BenchError(f"--companion-repo {repo}: no {os.path.relpath(path, repo)}; expected a checkout of "
                             "ozendelait/better_s2_naip")
    if not (shutil.which(python) or os.path.isfile(python)):
        raise BenchError(f"--companion-python {python}: not found")
    probe = subprocess.run([python, "-c", f"{COMPANION_IMPORTS}; print(torch.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise BenchError(f"--companion-python {python} cannot run the companion code ({last}); install torch "
                         "torchvision torchmetrics scikit-image tqdm matplotlib into a separate venv "
                         "(docs/performance.md) and name its python")
    return probe.stdout.strip()


def real_sample_dir(workdir: str, real_data: str, n_tiles: int, seed: int = 0) -> str:
    """An S2-NAIP-layout folder of `n_tiles` tiles derived from the real NAIP captures in
    `real_data`, made once and reused: rgb, nir, tci, b08, REAL_EXTRA_BANDS and `cloud_bands`' b05
    and b09 per tile (every band s2cloudless reads, as S2-NAIP's chips), and manifest.txt."""
    path = os.path.join(workdir, f"real-{n_tiles}-{seed}")
    done = os.path.join(path, ".complete")
    if os.path.exists(done):
        cloud_bands.add_to_folder(path, bench.tile_ids(path))
        return path
    shutil.rmtree(path, ignore_errors=True)
    mosaic = H.CaptureMosaic(real_data)
    usable = mosaic.usable_tiles()
    if not usable:
        raise BenchError(f"--real-data {real_data}: the captures have no usable common tile")
    ids = []
    for rep in range(-(-n_tiles // len(usable))):
        xys = usable[: n_tiles - rep * len(usable)]
        for tile in H.build_dev_tiles(mosaic, xys, seed=seed + rep):
            if rep:  # another seed (HR date, planted timesteps) under its own coordinates
                tid = T.TileId.parse(tile.tile_id)
                tile.tile_id = str(T.TileId(tid.naip_id, tid.x + SHIFT * rep, tid.y))
            H.write_dev_tile(path, tile, REAL_EXTRA_BANDS)
            ids.append(tile.tile_id)
    with open(os.path.join(path, "manifest.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    cloud_bands.add_to_folder(path, ids)
    open(done, "w").close()
    return path


def companion_runnable(sample: str) -> str:
    """A copy of `sample` (hard links, made once) without the tiles the companion code crashes on:
    those lacking nir.png, or having tci.png but no b08.png (it opens them unchecked; a tile
    without tci.png it drops itself). Both sides are timed on this copy."""
    path = sample.rstrip("/") + "-companion"
    done = os.path.join(path, ".complete")
    if os.path.exists(done):
        cloud_bands.add_to_folder(path, bench.tile_ids(path))  # a copy made before the sample had them
        return path
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(sample, path, copy_function=os.link)
    kept = []
    for tile_id in bench.tile_ids(sample):
        tile = T.TileId.parse(tile_id)
        has = {b: os.path.exists(T.s2_band_path(path, tile, b)) for b in ("tci", "b08")}
        if os.path.exists(T.hr_nir_path(path, tile)) and (has["b08"] or not has["tci"]):
            kept.append(tile_id)
        else:
            shutil.rmtree(os.path.dirname(T.hr_rgb_path(path, tile)))
    with open(os.path.join(path, "manifest.txt"), "w") as f:
        f.write("\n".join(kept) + "\n")
    open(done, "w").close()
    return path


def _run(cmd: list[str], cwd: str | None = None) -> bench.Usage:
    try:
        return bench.run_command(cmd, cwd=cwd, what=" ".join(cmd[1:3]))
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise BenchError(" | ".join([lines[0], *lines[-3:]])) from None


def run_companion(repo: str, python: str, sample: str, out: str) -> dict:
    """Wall and CPU seconds of the companion's prefilter and selection + saving on `sample`, and
    how many tiles it kept and saved."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    valid = os.path.join(out, "valid.json")
    cfg1 = os.path.join(out, "prefilter.json")
    cfg2 = os.path.join(out, "pipeline.json")
    save = os.path.join(out, "saved")
    with open(cfg1, "w") as f:
        json.dump({"naip_dir": os.path.join(sample, "naip"), "s2_dir": os.path.join(sample, "sentinel2"),
                   "results_path": valid}, f)
    with open(cfg2, "w") as f:
        json.dump({"rgb_dir": sample, "nir_dir": sample, "save_dir": save, "data_path": valid,
                   "num_imgs_m1": NUM_IMGS_M1, "device": "cpu"}, f)
    os.makedirs(save)
    prefilter = _run([python, "-m", PREFILTER_MODULE, "-opt", os.path.abspath(cfg1)], cwd=repo)
    selection = _run([python, "-m", SELECTION_MODULE, "-opt", os.path.abspath(cfg2)], cwd=repo)
    with open(valid) as f:
        kept = len(json.load(f))
    with open(os.path.join(save, "tracker.json")) as f:
        saved = len(json.load(f))
    return {"prefilter_s": prefilter.wall_s, "selection_s": selection.wall_s,
            "wall_s": prefilter.wall_s + selection.wall_s, "cpu_s": prefilter.cpu_s + selection.cpu_s,
            "kept": kept, "saved": saved}


def ratios(companion_s: float, builds: dict[str, float]) -> dict[str, float]:
    """companion wall / build wall for each build (how many times faster the build is)."""
    return {name: companion_s / wall for name, wall in builds.items()}


def bench_companion(repo: str, python: str, workdir: str, tiles: int, repeats: int, selection: str,
                    real_data: str | None = None, seed: int = 0) -> dict:
    torch_version = check_companion(repo, python)
    workdir = os.path.abspath(workdir)  # the companion's processes run in its checkout: its config paths must be absolute
    sample = real_sample_dir(workdir, real_data, tiles, seed) if real_data else bench.sample_dir(workdir, tiles, seed)
    sample = companion_runnable(sample)
    ids = bench.tile_ids(sample)
    builds = {"build_1": [], "build_2": []}
    cpu = {"build_1": [], "build_2": []}
    companion = []
    mode = ["--selection", selection]
    runs = {"build_1": mode, "build_2": [*bench.MULTI_PROCESSING, *mode]}
    # one untimed run of each first: page cache, compiled bytecode
    run_companion(repo, python, sample, os.path.join(workdir, "companion-out"))
    bench.pipeline_usage(sample, os.path.join(workdir, "out-build"), runs["build_2"])
    for _ in range(repeats):
        companion.append(run_companion(repo, python, sample, os.path.join(workdir, "companion-out")))
        for name, extra in runs.items():
            usage = bench.pipeline_usage(sample, os.path.join(workdir, "out-build"), extra)
            builds[name].append(usage.wall_s)
            cpu[name].append(usage.cpu_s)
    with open(os.path.join(workdir, "out-build", "run.json")) as f:
        counts = json.load(f)["counts"]
    med = statistics.median
    companion_s = med(c["wall_s"] for c in companion)
    build_s = {name: med(walls) for name, walls in builds.items()}
    return {
        "tiles": len(ids),
        "input": "real-NAIP-derived" if real_data else "generated sample",
        "selection": selection,
        "repeats": repeats,
        "wall_s": {"companion": companion_s,
                   "companion_prefilter": med(c["prefilter_s"] for c in companion),
                   "companion_selection_save": med(c["selection_s"] for c in companion),
                   **build_s},
        "runs_s": {"companion": [c["wall_s"] for c in companion], **builds},
        # CPU seconds (user + system, all processes): what a busy shared machine inflates least
        "cpu_s": {"companion": med(c["cpu_s"] for c in companion), **{k: med(v) for k, v in cpu.items()}},
        "cpu_ratios": ratios(med(c["cpu_s"] for c in companion), {k: med(v) for k, v in cpu.items()}),
        "tiles_per_s": {"companion": len(ids) / companion_s, **{k: len(ids) / v for k, v in build_s.items()}},
        "ratios": ratios(companion_s, build_s),
        "outputs": {"companion_kept": companion[-1]["kept"], "companion_saved": companion[-1]["saved"],
                    "build_pairs": counts["pairs"], "build_rejects": counts["rejects"]},
        "torch": torch_version,
        "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
        "machine": bench.machine(),
    }


def report_text(r: dict) -> str:
    w, q, o = r["wall_s"], r["ratios"], r["outputs"]
    rate, cpu, cq = r["tiles_per_s"], r["cpu_s"], r["cpu_ratios"]
    return "\n".join([
        f"s2naip bench --companion-repo: {r['tiles']} tiles ({r['input']}), --selection {r['selection']}, "
        f"medians of {r['repeats']} runs, {r['machine']['cpu']} ({r['machine']['cores']} cores), torch {r['torch']}",
        f"  companion (prefilter {w['companion_prefilter']:.1f} s + selection/save {w['companion_selection_save']:.1f} s)"
        f"  {w['companion']:7.1f} s  {rate['companion']:7.1f} tiles/s  (kept {o['companion_kept']}, saved "
        f"{o['companion_saved']})",
        f"  s2naip build, in-process, 1 worker                  {w['build_1']:7.1f} s  {rate['build_1']:7.1f} tiles/s"
        f"  {q['build_1']:5.1f}x the companion",
        f"  s2naip build, 2 worker processes                    {w['build_2']:7.1f} s  {rate['build_2']:7.1f} tiles/s"
        f"  {q['build_2']:5.1f}x the companion  (pairs {o['build_pairs']}, rejects {o['build_rejects']})",
        f"  CPU seconds (user + system): companion {cpu['companion']:.1f}, build 1 worker {cpu['build_1']:.1f} "
        f"({cq['build_1']:.1f}x less), 2 workers {cpu['build_2']:.1f} ({cq['build_2']:.1f}x less)",
    ])
