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
import dataclasses
import datetime as dt
import json
import logging
import re
import sys
import time
from collections import defaultdict

from pipelines.cli import ArgumentParser, configure_logging, description
from transforms.build import dataset_manifest as dm
from transforms.io import storage
from transforms.nir import nir_fetch, stac
from transforms.io.latest import resolve_since
from transforms.version import PIPELINE_VERSION

_LOG = logging.getLogger(__name__)
FILES = ("quarter_quads.jsonl", "newer_captures.jsonl", "fetch_nir_manifest.txt", "affected_tiles.txt")
PLAN_JSON = "plan.json"
_FOLDER_ID_IN_ITEM = re.compile(r"m_[0-9]{7}_(?:ne|nw|se|sw)_[0-9]{2}_[0-9a-z]{1,4}_[0-9]{8}")


@dataclasses.dataclass
class QuarterQuad:
    name: str  # m_<quad>_<quarter>
    captures: dict[str, list[tuple[int, int]]]  # naip_id -> its chips (x, y) in the dataset

    @property
    def latest_capture(self) -> nir_fetch.NaipFolderId:
        return max((nir_fetch.parse_folder_id(n) for n in self.captures), key=lambda f: (f.date, f.naip_id))

    @property
    def chips(self) -> list[tuple[int, int]]:
        return sorted({xy for xys in self.captures.values() for xy in xys})

    def tiles_on(self, chips: set[tuple[int, int]]) -> list[str]:
        return sorted(f"{n}/{x}_{y}" for n, xys in self.captures.items() for x, y in xys if (x, y) in chips)


# ---------------------------------------------------------------------------------------------
# Pure parts


def quarter_quads(rows) -> dict[str, QuarterQuad]:
    """Manifest rows (dicts with tile_id, naip_id, tile_xy, outcome) -> the current tiles per
    quarter quad. Retired rows and invalid ids are left out."""
    out: dict[str, QuarterQuad] = {}
    for row in rows:
        if row.get("outcome") in dm.RETIRED or not row.get("naip_id") or not row.get("tile_xy"):
            continue
        try:
            folder = nir_fetch.parse_folder_id(row["naip_id"])
        except ValueError:
            continue
        x, y = (int(v) for v in row["tile_xy"].split("_"))
        qq = out.setdefault(folder.quarter_quad, QuarterQuad(folder.quarter_quad, {}))
        qq.captures.setdefault(folder.naip_id, []).append((x, y))
    return out


def search_window(qq: QuarterQuad) -> tuple[tuple[float, float, float, float], str]:
    """(lon/lat bbox of the quad's chips, RFC 3339 open interval from the day after its latest capture)."""
    after = qq.latest_capture.date + dt.timedelta(days=1)
    return nir_fetch.tiles_bbox_lonlat(qq.chips), f"{after.isoformat()}T00:00:00Z/.."


def newer_captures(qq: QuarterQuad, features) -> list[dict]:
    """The features that are captures of the same quarter quad after its latest capture, one per
    folder id (the latest publication, as `nir_fetch.choose_item` picks), oldest first:
    [{naip_id, item_id, datetime, bbox}]."""
    latest = qq.latest_capture
    by_id: dict[str, list[dict]] = defaultdict(list)
    for feature in features:
        if not isinstance(feature, dict) or not isinstance(feature.get("id"), str):
            continue
        m = _FOLDER_ID_IN_ITEM.search(feature["id"])
        if not m:
            continue
        try:
            folder = nir_fetch.parse_folder_id(m.group(0))
        except ValueError:
            continue
        if folder.quarter_quad == qq.name and folder.date > latest.date:
            by_id[folder.naip_id].append(feature)
    out = []
    for naip_id, candidates in by_id.items():
        chosen, _ = nir_fetch.choose_item(nir_fetch.parse_folder_id(naip_id), candidates)
        props = chosen.get("properties") or {}
        out.append({"naip_id": naip_id, "item_id": chosen["id"], "datetime": props.get("datetime"),
                    "bbox": chosen.get("bbox")})
    return sorted(out, key=lambda c: (c["naip_id"].rsplit("_", 1)[-1], c["naip_id"]))


def chips_within(chips, bbox) -> list[tuple[int, int]]:
    """The chips whose lon/lat bounds intersect `bbox` (all of them when the item gives no bbox)."""
    if not bbox or len(bbox) < 4:
        return list(chips)
    west, south, east, north = bbox[0], bbox[1], bbox[-2], bbox[-1]
    out = []
    for x, y in chips:
        w, s, e, n = nir_fetch.tiles_bbox_lonlat([(x, y)])
        if w < east and e > west and s < north and n > south:
            out.append((x, y))
    return out


def plan_quad(qq: QuarterQuad, client: stac.StacClient) -> dict:
    """One quad's line of quarter_quads.jsonl (one STAC search, every page)."""
    bbox, window = search_window(qq)
    line = {
        "quarter_quad": qq.name,
        "captures": sorted(qq.captures),
        "latest_capture": qq.latest_capture.naip_id,
        "tiles": sum(len(v) for v in qq.captures.values()),
        "chips": len(qq.chips),
        "bbox": [round(v, 7) for v in bbox],
        "datetime": window,
    }
    try:
        features = client.search(bbox=bbox, datetime=window)
    except (stac.HttpError, stac.StacError, OSError) as e:
        return {**line, "newer": None, "error": f"{type(e).__name__}: {e}"[:500]}
    newer = newer_captures(qq, features)
    line.update(newer=bool(newer), newer_captures=newer)
    if newer:
        newest = newer[-1]
        affected = chips_within(qq.chips, newest.get("bbox"))
        line.update(newest=newest["naip_id"], affected_chips=len(affected),
                    fetch_nir=[f"{newest['naip_id']}/{x}_{y}" for x, y in sorted(affected)],
                    affected_tiles=qq.tiles_on(set(affected)))
    return line


# ---------------------------------------------------------------------------------------------
# The command


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
