"""`s2naip fetch-nir`: NAIP band 4 (near-infrared) for every S2-NAIP tile, grouped per NAIP item.

    s2naip fetch-nir --input DIR | --manifest FILE  --output DIR  --stac-url URL [options] [beam options]

tile ids (manifest shards or a listing) -> parse (invalid ids are rejects)
  -> GroupByKey on the folder naip_id: drop duplicate ids, skip tiles whose nir.png exists (resume),
     resolve the naip_id to its STAC item once (search, or --naip-id-map + one item request),
     split its tiles deterministically into groups of at most --group-side**2 tiles (block by block)
  -> GroupByKey on (item id, folder, group): per group, sign the COG href once, open the COG once,
     fetch the byte ranges of the blocks under all the group's tiles in a few coalesced range
     requests, and reproject each tile's band 4 onto its EPSG:3857 zoom-17 tile at 128x128
  -> naip/<naip_id>/<x>_<y>/nir.png (atomic writes), rejects/ (Parquet), run.json, then _SUCCESS.

Every input id ends in exactly one of: written, skipped (its nir.png was already there), rejected.
A rerun into the same --output resumes: it fetches only what is missing (a complete output costs no
request at all), and replaces the previous run's rejects/, run.json and _SUCCESS.
"""
from __future__ import annotations

import json
import logging
import sys
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines.cli import ArgumentParser, CommandError, command_main, description
from pipelines.options import parse_beam_options, use_in_process_runner_by_default, use_own_image_on_dataflow_by_default
from transforms.build.stages import counter_values
from transforms.io import publish, storage
from transforms.nir import geo, nir_fetch, signing, stac
from transforms.nir.pipeline import NS, FetchNir, NirConfig
from transforms.version import PIPELINE_VERSION

_LOG = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The command


def prepare_output(output: str) -> int:
    """Clears the previous run's _SUCCESS (first), run.json and rejects/ of `output`; keeps naip/
    (that is what a rerun resumes from). Returns the number of files deleted."""
    deleted = 0
    for name in (publish.SUCCESS, publish.RUN_JSON):
        path = storage.join(output, name)
        if storage.exists(path):
            FileSystems.delete([path])
            deleted += 1
    old = [m.path for m in FileSystems.match([storage.join(output, "rejects", "**")])[0].metadata_list]
    if old:
        FileSystems.delete(old)
    return deleted + len(old)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="s2naip fetch-nir", description=description(__doc__), allow_abbrev=False)
    p.add_argument("--input", default=None, help="S2-NAIP set folder to list tile ids from (local or gs://)")
    p.add_argument("--manifest", default=None,
                   help="tile ids: text (one a line) or .parquet (tile_id column); instead of listing --input")
    p.add_argument("--output", required=True,
                   help="root of naip/<naip_id>/<x>_<y>/nir.png, rejects/ and run.json (local or gs://)")
    p.add_argument("--stac-url", "--stac_url", dest="stac_url", required=True,
                   help="STAC API root, e.g. https://planetarycomputer.microsoft.com/api/stac/v1")
    p.add_argument("--collection", default="naip", help="STAC collection of the NAIP items (default naip)")
    p.add_argument("--asset", default="image", help="asset holding the 4-band COG (default image)")
    p.add_argument("--naip-id-map", "--naip_id_map", dest="naip_id_map", default=None,
                   help="gzip JSON {folder naip_id: STAC item id}: resolve by one item request instead of a search")
    p.add_argument("--sign", default="none", choices=signing.SIGNERS,
                   help="sign asset hrefs: planetary-computer (needs the planetary-computer package) or none")
    p.add_argument("--resampling", default="nearest", choices=sorted(geo.RESAMPLING),
                   help="resampling onto the 128x128 tile (default nearest, as the companion)")
    p.add_argument("--group-side", "--group_side", dest="group_side", type=int, default=nir_fetch.DEFAULT_GROUP_SIDE,
                   help="groups hold at most side^2 of an item's tiles, taken block by block in squares of "
                        f"side x side zoom-17 tiles (default {nir_fetch.DEFAULT_GROUP_SIDE})")
    p.add_argument("--max-requests-per-second", "--max_requests_per_second", dest="max_rps", type=float,
                   default=20.0, help="HTTP requests per second per worker process, retries included (0: no limit)")
    p.add_argument("--max-concurrency", "--max_concurrency", dest="max_concurrency", type=int, default=8,
                   help="HTTP requests in flight per worker process")
    p.add_argument("--http-timeout", "--http_timeout", dest="http_timeout", type=float, default=60.0,
                   help="seconds to wait for a response's bytes (connect: 10 s)")
    p.add_argument("--http-retries", "--http_retries", dest="http_retries", type=int, default=8,
                   help="tries per request on 429/5xx/timeouts/broken connections")
    p.add_argument("--http-backoff", "--http_backoff", dest="http_backoff", type=float, default=0.5,
                   help="first retry delay in seconds (doubling, with jitter, up to 30 s)")
    p.add_argument("--header-bytes", "--header_bytes", dest="header_bytes", type=int, default=64 * 1024,
                   help="bytes of a COG fetched with its first request (its header and tile index)")
    p.add_argument("--max-gap-bytes", "--max_gap_bytes", dest="max_gap_bytes", type=int,
                   default=nir_fetch.DEFAULT_MAX_GAP,
                   help="read through gaps up to this size between needed blocks rather than make another request")
    p.add_argument("--refetch", action="store_true", help="fetch tiles whose nir.png exists too (default: skip them)")
    p.add_argument("--num-shards", "--num_shards", dest="num_shards", type=int, default=0,
                   help="files of the rejects table (0: the runner decides)")
    return p


def config_from_args(args) -> NirConfig:
    if not args.input and not args.manifest:
        raise ValueError("give --input (listed) or --manifest")
    if args.max_rps < 0 or args.max_concurrency < 1 or args.http_retries < 1 or args.http_timeout <= 0 \
            or args.http_backoff < 0:
        raise ValueError("--max-requests-per-second >= 0, --max-concurrency >= 1, --http-retries >= 1, "
                         "--http-timeout > 0 and --http-backoff >= 0 are required")
    signing.check_signer(args.sign)
    policy = stac.HttpPolicy(
        max_requests_per_s=args.max_rps, max_concurrency=args.max_concurrency, read_timeout_s=args.http_timeout,
        retry=storage.RetryPolicy(attempts=args.http_retries, initial_delay_s=args.http_backoff,
                                  max_delay_s=max(30.0, args.http_backoff), deadline_s=600.0),
    )
    stac.StacClient(args.stac_url, None)  # validates the URL
    return NirConfig(
        output=args.output, stac_url=args.stac_url, collection=args.collection, asset=args.asset,
        id_map=args.naip_id_map, sign=args.sign, resampling=args.resampling, group_side=args.group_side,
        http=policy, header_bytes=args.header_bytes, max_gap_bytes=args.max_gap_bytes, refetch=args.refetch,
    )


def run_info(config: NirConfig, args, options: PipelineOptions) -> dict:
    return {
        "pipeline_version": PIPELINE_VERSION,
        "command": "fetch-nir",
        "input": args.input,
        "manifest": args.manifest,
        "output": config.output,
        "stac_url": stac.redact(config.stac_url),
        "collection": config.collection,
        "asset": config.asset,
        "naip_id_map": config.id_map,
        "options": {
            "sign": config.sign,
            "resampling": config.resampling,
            "group_side": config.group_side,
            "max_requests_per_s": config.http.max_requests_per_s,
            "max_concurrency": config.http.max_concurrency,
            "http_retries": config.http.retry.attempts,
            "header_bytes": config.header_bytes,
            "max_gap_bytes": config.max_gap_bytes,
            "refetch": config.refetch,
            "runner": str(options.get_all_options().get("runner")),
        },
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def summary_text(summary: dict) -> str:
    c, h = summary["counts"], summary["http"]
    lines = [
        f"tiles {c['tiles']}: {c['written']} written, {c['skipped']} skipped (already there), {c['rejects']} rejects",
        *(f"  rejected {n:>7}  {reason}" for reason, n in c["rejects_by_reason"].items()),
        f"http: {h['requests']} requests ({h['stac_requests']} STAC, {h['cog_requests']} COG), "
        f"{h['bytes_read'] / 1e6:.1f} MB, {h['retries']} retries",
        f"nir:     {storage.join(summary['output'], 'naip')}/<naip_id>/<x>_<y>/nir.png",
        f"rejects: {storage.join(summary['output'], 'rejects')}/",
        f"summary: {storage.join(summary['output'], 'run.json')}",
    ]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> dict | None:
    """Runs fetch-nir; returns run.json's content when the runner waited for the job."""
    args, beam_args = build_parser().parse_known_args(argv)
    try:
        config = config_from_args(args)
        if args.naip_id_map and not storage.exists(args.naip_id_map):
            raise ValueError(f"--naip-id-map {args.naip_id_map} not found")
        if args.manifest and not storage.exists(args.manifest):
            raise ValueError(f"--manifest {args.manifest} not found")
    except (ValueError, ImportError) as e:
        raise CommandError(str(e)) from None
    options = parse_beam_options(beam_args)
    use_in_process_runner_by_default(options)
    use_own_image_on_dataflow_by_default(options)
    removed = prepare_output(config.output)
    if removed:
        _LOG.info("resuming in %s: removed the previous run's _SUCCESS, run.json and rejects (%d files)",
                  config.output, removed)
    info = run_info(config, args, options)
    with beam.Pipeline(options=options) as p:
        p | "FetchNir" >> FetchNir(config, info, args.input, args.manifest, args.num_shards)
    if not getattr(p.result, "has_job", True) or options.view_as(StandardOptions).no_wait_until_finish:
        return None
    run_json = storage.join(config.output, publish.RUN_JSON)
    if storage.exists(run_json):
        summary = json.loads(storage.read_bytes(run_json, 64 * 1024 * 1024))
        print(summary_text(summary))
        counters = counter_values(p.result, NS)
        if counters:
            print("counters: " + ", ".join(f"{k}={v}" for k, v in counters.items()))
        return {**summary, "counters": counters}
    return None


def main(argv: list[str] | None = None) -> int:
    return command_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
