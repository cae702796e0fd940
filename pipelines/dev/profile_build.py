"""`python -m pipelines.dev.profile_build`: where one tile's CPU time goes in `s2naip build`.

A development tool (nothing imports it; no test asserts its timings). It runs `build_tile` over the
tiles of a folder (default: the benchmark's generated sample, `pipelines.dev.bench.sample_dir`) with
timers wrapped around the stages, and prints the *exclusive* CPU time of each stage per tile (a
stage nested in another, e.g. the candidates' histogram matching inside the distance, is taken out
of its parent), so the stages add up to the per-tile total:

  read <band>        reading the file's bytes (page cache)
  probe absent       reads of optional bands the tile does not have (robust: b05, b09 ...)
  decode <band>      PNG header checks and decoding, per band file
  prefilter          the black-border rule (HR and every timestep)
  downsample         HR to 32x32 (bicubic)
  rank               PSNR of every valid timestep and the top-k (robust: gap-free correlation)
  distance           the mode's score of the top-k (SSIM or local correlation) without the parts below
  hm candidates      histogram matching of the HR to each candidate (inside the distance)
  evidence           the robust mode's evidence terms (transforms.evidence, s2cloudless)
  hm output          histogram matching of the full HR to the chosen timestep
  confidence         pair_confidence
  record             the pair record (records.pair_record)
  other              the rest of build_tile (checks, concatenation, indexing)

With --pipeline it also times the Beam pipeline itself (`python -m pipelines.build_pairs`, wall
clock): the same tiles with the in-process runner and with 2 worker processes, and an almost empty
job (one tile) for each, whose wall time is the fixed start-up cost; the per-tile Beam overhead is
what the pipeline spends per tile beyond that start-up and the loop's per-tile time.

With --stages it also runs one in-process build of the same tiles and prints how many fused stages
the runner executed and the slowest of them (`runner_stages`: a stage is one bundle per worker, so
its fixed cost is paid once per build and per worker).

Times are CPU seconds of the measuring thread (`time.thread_time`), so other processes on a shared
machine inflate them less than wall clock; set OMP_NUM_THREADS=1 (docs/performance.md).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from contextlib import ExitStack
from unittest import mock

from pipelines.dev import bench
from pipelines.cli import ArgumentParser, description
from transforms import cloud_prob, evidence, imagery, pairs, records, runtime, selection
from transforms.io import storage
from transforms.selection import DEFAULT_SELECTION, SELECTION_MODES, SelectionConfig

EVIDENCE_FUNCTIONS = ("cloud_shadow_fractions", "brightening", "darkening", "registration", "contrast_loss",
                      "haze_index", "aerosol_index", "cirrus_index", "snow_fraction", "veil_terms",
                      "veil_evidence", "veil_evidence_pair")


class StageTimer:
    """Exclusive thread-CPU seconds per stage name; nested stages are subtracted from their parent."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._stack: list[list] = []  # [name, start, time of nested stages]

    def enter(self, name: str) -> list:
        frame = [name, time.thread_time(), 0.0]
        self._stack.append(frame)
        return frame

    def exit(self, frame: list) -> None:
        self._stack.pop()
        inclusive = time.thread_time() - frame[1]
        self.add(frame[0], inclusive - frame[2])
        if self._stack:
            self._stack[-1][2] += inclusive

    def within(self, name: str) -> bool:
        return any(frame[0] == name for frame in self._stack)

    def wrap(self, name_of, fn):
        """`fn` timed under the stage `name_of(*args, **kwargs)` (a str or a function of the call)."""

        def timed(*args, **kwargs):
            frame = self.enter(name_of(*args, **kwargs) if callable(name_of) else name_of)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit(frame)

        return timed

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def _band_of(path: str) -> str:
    return os.path.basename(path).rsplit(".", 1)[0]


def profile_tiles(ids: list[str], config: pairs.PairConfig) -> dict[str, float]:
    """Exclusive CPU milliseconds per tile of each stage over `ids` (and 'total'), all tiles run."""
    timer = StageTimer()

    def read(path: str, limit: int) -> bytes:
        frame = timer.enter(f"read {_band_of(path)}")
        try:
            return storage.read_bytes(path, limit)
        except FileNotFoundError:
            frame[0] = "probe absent"
            raise
        finally:
            timer.exit(frame)

    sel = selection
    patches = {
        (pairs, "_decode"): lambda fn, data, what, channels: f"decode {what.rsplit('.', 1)[0]}",
        (imagery, "has_black_border"): "prefilter",
        (sel, "has_black_border"): "prefilter",
        (sel, "downsample"): "downsample",
        (sel, "psnr"): "rank",
        (sel, "top_k_by_psnr"): "rank",
        (sel, "_robust_ranking_correlation"): "rank",
        (sel, "paper_scores"): "distance",
        (sel, "companion_scores"): "distance",
        (sel, "robust_scores"): "distance",
        # the candidates' matching, or part of the output's (the full HR) when called inside it
        (sel, "_match_uint8"): lambda *a, **k: "hm output" if timer.within("hm output") else "hm candidates",
        (sel, "pair_confidence"): "confidence",
        (records, "pair_record"): "record",
        (cloud_prob, "cloud_probability"): "evidence",
        **{(evidence, name): "evidence" for name in EVIDENCE_FUNCTIONS},
    }
    original_match = sel.match_histograms
    original_gfc = sel.gap_free_correlation

    def match_histograms(source, templates):
        if templates.shape[0] == 1 and source.shape[0] > templates.shape[1]:  # the full-size HR
            return timer.wrap("hm output", original_match)(source, templates)
        return timer.wrap("hm candidates", original_match)(source, templates)

    def gap_free_correlation(images, reference):  # ranking (robust) or confidence
        name = "confidence" if timer.within("confidence") else "rank"
        return timer.wrap(name, original_gfc)(images, reference)

    with ExitStack() as stack:
        for (module, attr), name in patches.items():
            stack.enter_context(mock.patch.object(module, attr, timer.wrap(name, getattr(module, attr))))
        stack.enter_context(mock.patch.object(sel, "match_histograms", match_histograms))
        stack.enter_context(mock.patch.object(sel, "gap_free_correlation", gap_free_correlation))
        build = timer.wrap("other", pairs.build_tile)
        start = time.thread_time()
        for tile_id in ids:
            build(tile_id, config, None, read)
        total = time.thread_time() - start
    n = max(len(ids), 1)
    out = {name: 1e3 * s / n for name, s in sorted(timer.seconds.items(), key=lambda kv: -kv[1])}
    out["total"] = 1e3 * total / n
    return out


def pipeline_costs(sample: str, ids: list[str], workdir: str, mode: str, repeats: int) -> dict:
    """Wall seconds of the build on `ids` and on one tile, in-process and with 2 workers (medians)."""
    one = os.path.join(workdir, "one-tile.txt")
    with open(one, "w") as f:
        f.write(ids[0] + "\n")
    manifest = os.path.join(workdir, "tiles.txt")
    with open(manifest, "w") as f:
        f.write("\n".join(ids) + "\n")
    out = {}
    for name, extra in (("in_process", []), ("2_workers", bench.MULTI_PROCESSING)):
        for label, m in (("startup_s", one), ("wall_s", manifest)):
            walls = []
            for r in range(repeats):
                dest = os.path.join(workdir, f"profile-out-{name}-{label}-{r}")
                walls.append(bench.run_pipeline(sample, dest, [*extra, "--selection", mode], manifest=m)[0])
                shutil.rmtree(dest, ignore_errors=True)
            out.setdefault(name, {})[label] = statistics.median(walls)
    return out


def runner_stages(sample: str, manifest: str, out: str, mode: str) -> list[tuple[str, float, float]]:
    """(stage name, wall s, CPU s of this process) of each bundle the in-process runner executes in
    one build of `manifest`'s tiles, in the order it runs them: how many fused stages a build has
    and what each costs (each is a bundle per worker; a stage's fixed cost is paid per build). It
    wraps the FnApiRunner's per-bundle method, a private one of Beam's: a development probe only."""
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    from pipelines import build_pairs

    rows: list[tuple[str, float, float]] = []
    original = fn_runner.FnApiRunner._execute_bundle

    def timed(self, context, bundle_context_manager, bundle_input):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return original(self, context, bundle_context_manager, bundle_input)
        finally:
            rows.append((bundle_context_manager.stage.name, time.perf_counter() - wall, time.process_time() - cpu))

    shutil.rmtree(out, ignore_errors=True)
    with mock.patch.object(fn_runner.FnApiRunner, "_execute_bundle", timed):
        build_pairs.run(["--input", sample, "--output", out, "--manifest", manifest, "--runner", "FnApiRunner",
                         "--selection", mode])
    return rows


def short_stage_name(name: str, width: int = 90) -> str:
    """A fused stage's name without the runner's decorations: its transforms' names, '+'-joined."""
    parts = [p.strip("()") for p in name.split("+")]
    parts = [p.replace("ref_AppliedPTransform_", "").replace("BuildDataset-", "").replace("BuildDataset/", "")
             for p in parts if p]
    text = " + ".join(parts)
    return text if len(text) <= width else text[: width - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m pipelines.dev.profile_build", description=description(__doc__))
    parser.add_argument("--selection", default=DEFAULT_SELECTION, choices=SELECTION_MODES)
    parser.add_argument("--input", help="S2-NAIP-layout folder with manifest.txt (default: the generated "
                                        "benchmark sample of --tiles tiles in --workdir)")
    parser.add_argument("--tiles", type=int, default=2000, help="tiles profiled (and of the generated sample)")
    parser.add_argument("--workdir", default="bench-out")
    parser.add_argument("--pipeline", action="store_true",
                        help="also time the Beam pipeline (in-process and 2 workers) and its start-up")
    parser.add_argument("--stages", action="store_true",
                        help="also run one in-process build and print its fused stages (wall, CPU)")
    parser.add_argument("--repeats", type=int, default=1, help="pipeline runs per measure (median)")
    parser.add_argument("--json", help="write the figures to this file too")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.workdir, exist_ok=True)
    runtime.tune_selection_process()  # as BuildPairDoFn.setup does
    sample = args.input or bench.sample_dir(args.workdir, args.tiles, 0)
    ids = bench.tile_ids(sample)[: args.tiles]
    config = pairs.PairConfig(input_root=sample, selection=SelectionConfig(mode=args.selection))
    profile_tiles(ids[:50], config)  # warm caches and lazily built tables
    stages = profile_tiles(ids, config)
    result = {"selection": args.selection, "tiles": len(ids), "ms_per_tile": stages}
    print(f"profile: --selection {args.selection}, {len(ids)} tiles, exclusive CPU ms per tile")
    for name, ms in stages.items():
        share = 100.0 * ms / stages["total"] if name != "total" else 100.0
        print(f"  {name:<18} {ms:7.3f} ms  {share:5.1f}%")
    if args.pipeline:
        costs = pipeline_costs(sample, ids, args.workdir, args.selection, args.repeats)
        result["pipeline"] = costs
        loop_s = stages["total"] * len(ids) / 1e3
        for name, c in costs.items():
            per_tile = 1e3 * (c["wall_s"] - c["startup_s"]) / len(ids)
            print(f"  pipeline {name:<10} wall {c['wall_s']:6.2f} s, start-up (1 tile) {c['startup_s']:5.2f} s, "
                  f"{per_tile:6.3f} ms per tile beyond it (loop: {1e3 * loop_s / len(ids):.3f} CPU ms)")
    if args.stages:
        manifest = os.path.join(args.workdir, "tiles.txt")
        with open(manifest, "w") as f:
            f.write("\n".join(ids) + "\n")
        rows = runner_stages(sample, manifest, os.path.join(args.workdir, "profile-out-stages"), args.selection)
        result["stages"] = [{"stage": name, "wall_s": w, "cpu_s": c} for name, w, c in rows]
        print(f"  runner stages: {len(rows)}, wall {sum(r[1] for r in rows):.2f} s (the slowest five below)")
        for name, w, c in sorted(rows, key=lambda r: -r[1])[:5]:
            print(f"    {w:7.3f} s wall {c:7.3f} s CPU  {short_stage_name(name)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
