"""`s2naip review`: rank a build's pairs by fidelity and write a static page to re-pick or drop the worst.

    s2naip review --run OUT --output REVIEW_DIR [--input S2NAIP] [--metric psnr_rgb]
                  [--threshold 20] [--worst 200] [--predictions PRED_DIR]

Open REVIEW_DIR/index.html (from disk or a bucket), decide each tile with the keyboard (pick a
timestep, drop the tile, or, in a --lr-timesteps N build, drop some of the N written timesteps),
export corrections.json and rebuild with `s2naip build ... --corrections corrections.json`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import logging
import sys
import time

from pipelines.cli import ArgumentParser, CommandError, command_main, description
from pipelines.options import check_output_writable, check_run_folder
from transforms import pairs
from transforms.io import publish, storage
from transforms.pairs import PairConfig
from transforms.quality.review_page import (
    METRIC_LABELS,
    METRICS,
    Ranked,
    Ranking,
    rank_pairs,
    read_prediction,
    read_run_json,
    review_tile,
    run_selection_config,
    write_page,
)
from transforms.tiles import TileId

_LOG = logging.getLogger(__name__)
LARGE_REVIEW = 5000


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="s2naip review", description=description(__doc__))
    parser.add_argument("--run", required=True, help="A build's --output folder (local or gs://).")
    parser.add_argument("--output", required=True, help="Folder to write the review page into (local or gs://).")
    parser.add_argument("--input", default=None,
                        help="The S2-NAIP input the build read (default: run.json's input).")
    parser.add_argument("--nir-input", dest="nir_input", default=None,
                        help="Root of the NAIP NIR files (default: run.json's nir_input).")
    parser.add_argument("--metric", default="psnr_rgb", choices=METRICS,
                        help="Rank by this metric, lower is worse: the stored pair (histogram-matched HR, "
                             "downsampled as the build did, vs the chosen LR), or each prediction vs the HR; "
                             "confidence: the selection's stored certainty (margin to the best rival, worst "
                             "evidence), the least certain picks first.")
    parser.add_argument("--threshold", type=float, default=None,
                        help="Review the pairs whose metric is below this value (dB for PSNR).")
    parser.add_argument("--worst", type=int, default=None,
                        help="Review at most the N worst pairs (with --threshold: the N worst below it).")
    parser.add_argument("--predictions", default=None,
                        help="Folder of super-resolved tiles, <naip_id>/<x>_<y>.png or .npy (128x128): rank "
                             "by prediction vs HR instead of the pair's own fidelity.")
    parser.add_argument("--workers", type=int, default=8, help="Threads reading input tiles and writing images.")
    args = parser.parse_args(argv)
    if args.threshold is None and args.worst is None:
        parser.error("give --threshold and/or --worst")
    if args.worst is not None and args.worst < 1:
        parser.error("--worst must be >= 1")
    return args


def selection_rule(args: argparse.Namespace) -> str:
    parts = []
    if args.threshold is not None:
        parts.append(f"below {args.threshold:g}")
    if args.worst is not None:
        parts.append(f"worst {args.worst}")
    return (" and ".join(parts)) + (" (predictions)" if args.predictions else "")


def nothing_selected(args: argparse.Namespace, counts: dict) -> str:
    """Why a ranking selected no tile."""
    if not counts["pairs"]:
        return f"{args.run} holds no pairs to review (--run must be a build's --output folder)"
    if args.predictions and counts["missing_predictions"] == counts["pairs"]:
        return f"none of the {counts['pairs']:,} pairs has a prediction in {args.predictions}"
    return f"nothing to review: no pair has {args.metric} below {args.threshold:g} ({counts['pairs']:,} ranked)"


def run(argv: list[str]) -> dict:
    args = parse_args(argv)
    check_run_folder(args.run)
    check_output_writable(args.output)
    started = time.monotonic()
    if publish.read_success(args.run) is None:
        _LOG.warning("%s has no _SUCCESS: the build did not finish, or this is not a build's output", args.run)
    info = read_run_json(args.run)
    input_root = args.input or info.get("input")
    if not input_root:
        raise CommandError("--input is needed (run.json does not name the build's input)")
    nir_root = args.nir_input or info.get("nir_input") or input_root
    config = run_selection_config(info)
    bands = info.get("options", {}).get("bands", "rgbn")
    if args.metric.endswith("rgbn") and bands != "rgbn":
        raise CommandError(f"{args.metric} needs an RGBN build; this one has bands={bands}")
    ranking = Ranking(args.threshold, args.worst)
    try:
        counts = rank_pairs(args.run, args.metric, ranking, args.predictions, config.downsample_method)
    except ValueError as e:
        raise CommandError(str(e)) from None
    if counts.get("no_metric"):
        _LOG.warning("%d pairs have no %s (manual choices) and were not ranked", counts["no_metric"], args.metric)
    selected = ranking.result()
    if not selected:  # a page with nothing on it is not a review
        raise CommandError(f"{nothing_selected(args, counts)}; no page written")
    if counts["missing_predictions"]:
        _LOG.warning("%d pairs have no prediction in %s and were not ranked", counts["missing_predictions"],
                     args.predictions)
    if len(selected) > LARGE_REVIEW:
        _LOG.warning("%d tiles selected: the page will be slow to write and to review; use --worst", len(selected))
    # with the build's selection, so that a robust build's extra bands are read and scored as it did
    pair_config = PairConfig(input_root=input_root, nir_root=nir_root, bands=bands, selection=config)

    def one(item: tuple[int, Ranked]):
        rank, ranked = item
        try:
            inputs = pairs.load_tile(TileId.parse(ranked.tile_id), pair_config)
        except Exception as e:  # e.g. the input moved: keep reviewing the others
            detail = getattr(e, "detail", None) or f"{type(e).__name__}: {e}"
            return None, f"{ranked.tile_id}: {detail}"
        prediction = read_prediction(args.predictions, ranked.tile_id) if args.predictions else None
        return review_tile(rank, ranked, inputs.hr, inputs.series, config, prediction, inputs.extra), None

    review_tiles, failures = [], []
    with concurrent.futures.ThreadPoolExecutor(max(1, args.workers)) as pool:
        for tile, failure in pool.map(one, enumerate(selected, start=1)):
            if tile is not None:
                review_tiles.append(tile)
            else:
                failures.append(failure)
    for failure in failures[:20]:
        _LOG.warning("left out of the review (input unreadable): %s", failure)
    if not review_tiles:
        raise CommandError(f"none of the {len(selected):,} selected tiles could be read from the input "
                         f"{input_root} (e.g. {failures[0]}); no page written; pass the build's input with --input")
    meta = {
        "version": 1,
        "run": args.run,
        "input": input_root,
        "metric": args.metric,
        "metric_label": METRIC_LABELS[args.metric] + (" (prediction)" if args.predictions else ""),
        "selection_rule": selection_rule(args),
        "bands": 4 if bands == "rgbn" else 3,
        "lr_timesteps": int(info.get("options", {}).get("lr_timesteps") or 1),  # requested per pair
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    index = write_page(args.output, meta, review_tiles)
    summary = {"pairs": counts["pairs"], "selected": len(selected), "on_page": len(review_tiles),
               "unreadable": len(failures), "missing_predictions": counts["missing_predictions"],
               "page": index, "seconds": round(time.monotonic() - started, 1)}
    print(f"ranked {counts['pairs']} pairs by {args.metric}: {len(selected)} selected ({selection_rule(args)}), "
          f"{len(review_tiles)} on the page" + (f", {len(failures)} unreadable" if failures else ""))
    print(f"review page: {index}")
    if storage.is_local(index):
        print("open it in a browser; export corrections.json, then: s2naip build ... --corrections corrections.json")
    return summary


def main(argv: list[str] | None = None) -> int:
    return command_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
