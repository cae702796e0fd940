"""`s2naip report`: an HTML report with figures (also written as PNG files) of a build's output.

    s2naip report --run OUT --output REPORT_DIR [--input S2NAIP] [--samples 6] [--seed 0]

Statistics stream over the pairs' scalar columns one row group at a time (no image is read for
them), so a report of a million-pair output runs in bounded memory; the sample grids read only the
sampled tiles (from the output, and their original NAIP and time series from the input).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from pipelines.cli import ArgumentParser, CommandError, command_main, description
from pipelines.options import check_output_writable, check_run_folder
from transforms.io import publish, storage
from transforms.quality import report_figures
from transforms.quality.report_page import load_samples, report_html
from transforms.quality.review_page import read_run_json

_LOG = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="s2naip report", description=description(__doc__))
    parser.add_argument("--run", required=True, help="A build's --output folder (local or gs://).")
    parser.add_argument("--output", required=True, help="Folder to write the report into (local or gs://).")
    parser.add_argument("--input", default=None,
                        help="The S2-NAIP input of the build, for the original NAIP and the time series of "
                             "the sampled tiles (default: run.json's input).")
    parser.add_argument("--nir-input", dest="nir_input", default=None, help="NAIP NIR root (default: run.json's).")
    parser.add_argument("--samples", type=int, default=6, help="Tiles in the Figure 1 style grid.")
    parser.add_argument("--timestep-samples", dest="timestep_samples", type=int, default=3,
                        help="Tiles in the Figure 3 style grid (the first of the sample).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sample (tiles are picked by a hash of their id).")
    args = parser.parse_args(argv)
    if args.samples < 0 or args.timestep_samples < 0:
        parser.error("--samples and --timestep-samples must be >= 0")
    return args


def run(argv: list[str]) -> dict:
    args = parse_args(argv)
    check_run_folder(args.run)
    check_output_writable(args.output)
    started = time.monotonic()
    if publish.read_success(args.run) is None:
        _LOG.warning("%s has no _SUCCESS: the build did not finish, or this is not a build's output", args.run)
    info = read_run_json(args.run)
    mode = info.get("options", {}).get("selection")
    stats = report_figures.collect_stats(args.run, samples=max(args.samples, args.timestep_samples), seed=args.seed,
                                         mode=mode)
    counts = dict(info.get("counts") or {})
    if "rejects_by_reason" not in counts:  # no run.json: count the rejects' reason column
        rejects = dict(report_figures.count_rejects(args.run))
        counts = {"pairs": stats.pairs, "rejects": sum(rejects.values()), "rejects_by_reason": rejects,
                  "tiles": stats.pairs + sum(rejects.values())}
    if not counts.get("tiles"):  # a page of empty charts would look like a report of an empty dataset
        raise CommandError(f"{args.run} holds no pairs and no rejects (and run.json counts no tiles): "
                         "nothing to report; --run must be a build's --output folder")
    summary = stats.summary()
    refs = stats.samples()
    rows = report_figures.read_sample_rows(refs)
    input_root = args.input or info.get("input")
    nir_root = args.nir_input or info.get("nir_input") or input_root
    bands = info.get("options", {}).get("bands", "rgbn")
    samples = load_samples([rows[r.tile_id] for r in refs], input_root, nir_root, bands)

    figures = {
        "overview.png": report_figures.overview(stats, counts.get("rejects_by_reason", {}), counts.get("tiles", 0)),
        "rejects_by_reason.png": report_figures.rejects_by_reason(counts.get("rejects_by_reason", {}),
                                                                  counts.get("tiles", 0)),
        "psnr_histogram.png": report_figures.psnr_histogram(stats),
        "valid_timesteps.png": report_figures.valid_timesteps_histogram(stats),
        "score_distribution.png": report_figures.score_distribution(stats),
    }
    if args.samples:
        figures["sample_pairs.png"] = report_figures.sample_grid(samples[: args.samples])
    if args.timestep_samples:
        figures["sample_timesteps.png"] = report_figures.timestep_grid(samples[: args.timestep_samples],
                                                                       int(info.get("options", {}).get("top_k", 16)))
    for name, data in figures.items():
        storage.write_bytes_atomic(storage.join(args.output, name), data)
    stats_json = {"counts": counts, "pairs": summary, "samples": [r.tile_id for r in refs],
                  "run": args.run, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_bytes_atomic(storage.join(args.output, "stats.json"), json.dumps(stats_json, indent=2).encode())
    page = report_html(info, counts, summary, [r.tile_id for r in refs], list(figures))
    index = storage.join(args.output, "index.html")
    storage.write_bytes_atomic(index, page.encode())
    print(f"report of {stats.pairs:,} pairs ({counts.get('rejects', 0):,} rejects): {index}")
    return {**stats_json, "index": index, "figures": sorted(figures), "seconds": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    return command_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
