"""`s2naip plan`: which NAIP quarter quads of a published dataset have a newer capture in a STAC API,
and the work list for `fetch-nir` and `build`.

    s2naip plan --naip-stac-url URL --since RUN_DIR|LATEST.json --output WORKLIST_DIR

For each quarter quad (`m_<quad>_<quarter>`) of the run's manifest (its current tiles: pairs and
rejects), one STAC search of the collection over the lon/lat bbox of the quad's tiles, for
datetimes after the latest capture date among the quad's `naip_id`s. An item counts as a newer
capture of the quad when its id holds a NAIP folder id of that same quarter quad (Planetary Computer
ids are `<state>_<folder id>_<published>`) dated after that capture; a capture published twice
counts once. The chips (`x_y`) affected are the quad's chips within the newest capture's bbox.

The work list (`--output`, local or gs://), each file written atomically, `plan.json` last:

* `quarter_quads.jsonl`: one line per quarter quad: its captures in the dataset, tiles, search bbox,
  `newer` (true/false), the newer captures found (`naip_id`, `item_id`, `datetime`), or `error`;
* `newer_captures.jsonl`: the lines of the quads with a newer capture;
* `fetch_nir_manifest.txt`: `<newest naip_id>/<x>_<y>` for each affected chip: the tile ids of
  the new capture, for `s2naip fetch-nir --manifest` (the new capture's NIR);
* `affected_tiles.txt`: the dataset's current tile ids on the affected chips: what the next
  `build --since` supersedes once the new capture's tiles are in the input;
* `plan.json`: the summary (`complete` is false when a search failed; the command then exits 1).

The build itself needs no work list: `s2naip build --since` fingerprints the whole input and
rebuilds exactly what changed. The work list says what a release will change, and what to fetch.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import sys
import time

from pipelines.cli import ArgumentParser, configure_logging, description
from transforms.build import dataset_manifest as dm
from transforms.io import storage
from transforms.io.latest import resolve_since
from transforms.nir import stac
from transforms.nir.plan import plan_quad, quarter_quads
from transforms.version import PIPELINE_VERSION

_LOG = logging.getLogger(__name__)
FILES = ("quarter_quads.jsonl", "newer_captures.jsonl", "fetch_nir_manifest.txt", "affected_tiles.txt")
PLAN_JSON = "plan.json"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="s2naip plan", description=description(__doc__), allow_abbrev=False)
    p.add_argument("--naip-stac-url", "--naip_stac_url", dest="stac_url", required=True,
                   help="STAC API root, e.g. https://planetarycomputer.microsoft.com/api/stac/v1")
    p.add_argument("--since", required=True,
                   help="a published run folder (with manifest/), or a latest pointer (*.json) naming one")
    p.add_argument("--output", required=True, help="folder of the work list (local or gs://)")
    p.add_argument("--collection", default="naip", help="STAC collection of the NAIP items (default naip)")
    p.add_argument("--max-requests-per-second", "--max_requests_per_second", dest="max_rps", type=float,
                   default=10.0, help="STAC requests per second, retries included (0: no limit)")
    p.add_argument("--max-concurrency", "--max_concurrency", dest="max_concurrency", type=int, default=4,
                   help="searches in flight")
    p.add_argument("--http-retries", "--http_retries", dest="http_retries", type=int, default=8,
                   help="tries per request on 429/5xx/timeouts/broken connections")
    p.add_argument("--http-backoff", "--http_backoff", dest="http_backoff", type=float, default=0.5,
                   help="first retry delay in seconds (doubling, with jitter, up to 30 s)")
    return p


def _jsonl(lines) -> bytes:
    return "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines).encode()


def _text(ids) -> bytes:
    return "".join(f"{i}\n" for i in ids).encode()


def run(argv: list[str] | None = None) -> dict:
    """Runs the plan; returns plan.json's content."""
    args = build_parser().parse_args(argv)
    if args.max_concurrency < 1 or args.max_rps < 0 or args.http_retries < 1 or args.http_backoff < 0:
        raise SystemExit("error: --max-concurrency >= 1, --max-requests-per-second >= 0, --http-retries >= 1 "
                         "and --http-backoff >= 0 are required")
    try:
        since = resolve_since(args.since)
        table = dm.read_manifest(since, columns=["tile_id", "naip_id", "tile_xy", "outcome"])
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    policy = stac.HttpPolicy(
        max_requests_per_s=args.max_rps, max_concurrency=args.max_concurrency,
        retry=storage.RetryPolicy(attempts=args.http_retries, initial_delay_s=args.http_backoff,
                                  max_delay_s=max(30.0, args.http_backoff), deadline_s=300.0))
    try:
        client = stac.StacClient(args.stac_url, stac.PoliteHttp(policy), args.collection)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    quads = quarter_quads(table.to_pylist())
    del table
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.max_concurrency, thread_name_prefix="plan") as pool:
        lines = list(pool.map(lambda name: plan_quad(quads[name], client), sorted(quads)))
    newer = [line for line in lines if line.get("newer")]
    errors = [line for line in lines if line.get("error")]
    fetch_ids = sorted(i for line in newer for i in line["fetch_nir"])
    affected = sorted(i for line in newer for i in line["affected_tiles"])
    contents = {
        "quarter_quads.jsonl": _jsonl(lines),
        "newer_captures.jsonl": _jsonl(newer),
        "fetch_nir_manifest.txt": _text(fetch_ids),
        "affected_tiles.txt": _text(affected),
    }
    for name in FILES:
        storage.write_bytes_atomic(storage.join(args.output, name), contents[name])
    summary = {
        "command": "plan",
        "pipeline_version": PIPELINE_VERSION,
        "since": since,
        "stac_url": stac.redact(args.stac_url),
        "collection": args.collection,
        "quarter_quads": len(lines),
        "with_newer_capture": len(newer),
        "errors": len(errors),
        "complete": not errors,
        "fetch_nir_tiles": len(fetch_ids),
        "affected_tiles": len(affected),
        "files": [storage.join(args.output, name) for name in FILES],
        "seconds": round(time.monotonic() - started, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_bytes_atomic(storage.join(args.output, PLAN_JSON), json.dumps(summary, indent=2).encode())
    print(f"quarter quads {len(lines)}: {len(newer)} with a newer capture, {len(errors)} errors; "
          f"{len(fetch_ids)} tiles to fetch NIR for, {len(affected)} tiles affected")
    for line in newer:
        print(f"  {line['quarter_quad']}: {line['latest_capture']} -> {line['newest']} "
              f"({line['affected_chips']} chips)")
    for line in errors:
        print(f"  {line['quarter_quad']}: error: {line['error']}", file=sys.stderr)
    print(f"work list: {storage.join(args.output, PLAN_JSON)}")
    return summary


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    summary = run(sys.argv[1:] if argv is None else argv)
    return 0 if summary["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
