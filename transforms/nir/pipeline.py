"""The `s2naip fetch-nir` job: `FetchNir`, NAIP band 4 (near-infrared) for every S2-NAIP tile,
grouped per NAIP item, its DoFns, and `resolve_naip_id` / `fetch_group` (also used by bench-nir).

The data flow, the outcomes of an id (written, skipped, rejected) and how a rerun resumes are in the
command's docstring (pipelines/fetch_nir.py, its --help); the command parses, launches and prints.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms import records, runtime, tiles
from transforms.build.stages import ReadTileIds, WriteParquet
from transforms.io import publish, storage
from transforms.nir import geo, nir_fetch, signing, stac
from transforms.nir.nir_fetch import ItemRef, nir_reject

_LOG = logging.getLogger(__name__)
NS = stac.NAMESPACE


def _counter(name: str):
    return Metrics.counter(NS, name)


def count_requests(stats: stac.RequestStats) -> dict:
    """Adds a unit of work's requests to the Beam counters (in the DoFn's thread) and returns them
    for the 'stats' output."""
    d = stats.as_dict()
    for name, key in (("http_requests", "requests"), ("http_bytes_read", "bytes_read"), ("http_retries", "retries"),
                      ("stac_requests", "stac_requests"), ("cog_requests", "cog_requests")):
        if d[key]:
            _counter(name).inc(d[key])
    return d


@dataclasses.dataclass(frozen=True)
class NirConfig:
    output: str
    stac_url: str
    collection: str = "naip"
    asset: str = "image"
    id_map: str | None = None
    sign: str = "none"
    resampling: str = "nearest"
    group_side: int = nir_fetch.DEFAULT_GROUP_SIDE
    http: stac.HttpPolicy = stac.HttpPolicy()
    header_bytes: int = 64 * 1024
    max_gap_bytes: int = nir_fetch.DEFAULT_MAX_GAP
    max_range_bytes: int = nir_fetch.DEFAULT_MAX_RANGE
    refetch: bool = False

    def __post_init__(self):
        if self.resampling not in geo.RESAMPLING:
            raise ValueError(f"unknown --resampling {self.resampling!r}; choose from {', '.join(geo.RESAMPLING)}")
        if self.sign not in signing.SIGNERS:
            raise ValueError(f"unknown --sign {self.sign!r}; choose from {', '.join(signing.SIGNERS)}")
        if not 1 <= self.group_side <= 64:
            raise ValueError(f"--group-side must be within [1, 64], got {self.group_side}")
        if self.header_bytes < 1024:
            raise ValueError(f"--header-bytes must be >= 1024, got {self.header_bytes}")
        if self.max_gap_bytes < 0 or self.max_range_bytes < 1:
            raise ValueError("--max-gap-bytes must be >= 0 and --max-range-bytes >= 1")


# ---------------------------------------------------------------------------------------------
# Steps


def parse_tile_id(text: str) -> Iterable[Any]:
    """A raw id -> (naip_id, (x, y)), or a reject to 'rejects'."""
    try:
        tile = tiles.TileId.parse(text)
    except tiles.InvalidTileId as e:
        _counter("reject_invalid_tile_id").inc()
        yield beam.pvalue.TaggedOutput("rejects", nir_reject(str(text), "manifest", "invalid_tile_id", str(e)))
        return
    yield tile.naip_id, (tile.x, tile.y)


def existing_nir(output: str, naip_id: str, xys) -> set[tuple[int, int]]:
    """The tiles among `xys` whose nir.png exists under `output` (resume). Local: one stat per tile;
    elsewhere (gs://): one listing of `naip/<naip_id>/*/nir.png`, not one request per tile."""
    if storage.is_local(output):
        return {(x, y) for x, y in xys if os.path.isfile(nir_fetch.nir_path(output, naip_id, x, y))}
    folder = storage.join(output, "naip", naip_id)
    found = set()
    for meta in FileSystems.match([folder + "/*/nir.png"])[0].metadata_list:
        rest = meta.path[len(folder) + 1:]
        xy = rest.split("/", 1)[0]
        m = re.fullmatch(r"(\d+)_(\d+)", xy)
        if m and rest == f"{xy}/nir.png":
            found.add((int(m.group(1)), int(m.group(2))))
    return found & {(int(x), int(y)) for x, y in xys}


def resolve_naip_id(naip_id: str, xys, client: stac.StacClient, *, id_map: dict | None = None,
                    asset: str = "image", stats: stac.RequestStats | None = None) -> tuple[ItemRef | None, str, str]:
    """(the item, "", why) or (None, reject reason, detail): one STAC search with the bbox of the
    first tile and the capture date, or, with a mapping, one item request."""
    try:
        folder = nir_fetch.parse_folder_id(naip_id)
    except ValueError as e:
        return None, "unresolved_naip_id", str(e)
    try:
        if id_map is not None:
            item_id = id_map.get(naip_id)
            if item_id is None:
                return None, "unresolved_naip_id", "not in --naip-id-map"
            feature = client.get_item(item_id, stats)
            if feature is None:
                return None, "unresolved_naip_id", f"--naip-id-map names {item_id}, which the STAC API does not have"
            why = "--naip-id-map"
        else:
            features = client.search(bbox=nir_fetch.search_bbox(xys), datetime=nir_fetch.search_datetime(folder.date),
                                      stats=stats)
            feature, why = nir_fetch.choose_item(folder, features)
            if feature is None:
                return None, "unresolved_naip_id", why
    except (stac.HttpError, stac.StacError) as e:
        return None, "stac_error", str(e)[:1000]
    try:
        ref = nir_fetch.item_ref(feature, asset)
    except ValueError as e:
        return None, "unresolved_naip_id", str(e)
    return ref, "", why


def fetch_group(ref: ItemRef, xys, *, http: stac.PoliteHttp, signer: signing.Signer, config: NirConfig,
                stats: stac.RequestStats) -> tuple[dict, tuple[str, str] | None]:
    """One group: sign once, open the COG once, prefetch the blocks under all its tiles' windows in
    coalesced range requests, reproject and encode every tile.

    Returns ({(x, y): nir.png bytes, or None when the tile has no valid pixel}, None), or
    ({}, (reason, detail)) when the group failed. (Threads would not help here: a 128x128 warp is
    mostly fixed per-call work under the GIL. Parallelism comes from Beam's workers.)"""
    import rasterio.errors

    xys = list(xys)
    try:
        href = signer.sign(ref.href)
    except signing.SigningError as e:
        return {}, ("fetch_error", str(e))
    remote = stac.RemoteFile(href, http, stats, header_bytes=config.header_bytes)
    name = f"{ref.item_id}.tif"
    try:
        with stac.open_remote_dataset(remote, name) as ds:
            if ds.count < nir_fetch.NIR_BAND:
                return {}, ("fetch_error", f"{ref.item_id}: the image has {ds.count} bands, no band 4")
            windows = nir_fetch.tile_windows(ds, xys)
            plan = nir_fetch.plan_reads(ds, xys, max_gap=config.max_gap_bytes, max_range=config.max_range_bytes,
                                        windows=windows)
            remote.prefetch(plan.ranges, max_workers=http.policy.max_concurrency)
            aoi = geo.area_of_interest(ds)
            rendered = nir_fetch.render_tiles(ds, xys, resampling=config.resampling, area_of_interest=aoi,
                                              windows=windows)
    except (stac.HttpError, rasterio.errors.RasterioError, OSError, ValueError) as e:
        # A failed read inside GDAL surfaces as a RasterioIOError; the HTTP error behind it is kept
        # by the remote file.
        cause = remote.last_error or e
        return {}, ("fetch_error", f"{ref.item_id}: {type(cause).__name__}: {str(cause)[:800]}")
    if remote.on_demand_fetches:
        _counter("unplanned_reads").inc(remote.on_demand_fetches)
    return dict(rendered), None


class ResolveNaipIdDoFn(beam.DoFn):
    """(naip_id, [(x, y), ...]) -> ((item_id, naip_id, i), (item, naip_id, [(x, y), ...])) per group.

    Duplicates become rejects, tiles already written are skipped (no request is made for a folder
    whose tiles are all there), and the folder id is resolved once: one STAC search (or, with a
    mapping file, one item request)."""

    def __init__(self, config: NirConfig):
        self.config = config

    def setup(self):
        self.http = stac.PoliteHttp.shared(self.config.http)
        self.stac = stac.StacClient(self.config.stac_url, self.http, self.config.collection)
        self.id_map = nir_fetch.load_id_map(self.config.id_map) if self.config.id_map else None

    def process(self, element) -> Iterable[Any]:
        naip_id, xys = element
        unique, extra = nir_fetch.dedupe(xys)
        for x, y in extra:
            _counter("reject_duplicate_tile_id").inc()
            yield beam.pvalue.TaggedOutput("rejects", nir_reject(
                f"{naip_id}/{x}_{y}", "manifest", "duplicate_tile_id", "listed more than once"))
        done = set() if self.config.refetch else existing_nir(self.config.output, naip_id, unique)
        todo = [xy for xy in unique if xy not in done]
        if len(todo) < len(unique):
            _counter("tiles_skipped").inc(len(unique) - len(todo))
            yield beam.pvalue.TaggedOutput("outcomes", ("skipped", len(unique) - len(todo)))
        if not todo:
            return
        stats = stac.RequestStats()
        try:
            ref, reason, detail = resolve_naip_id(naip_id, todo, self.stac, id_map=self.id_map,
                                                  asset=self.config.asset, stats=stats)
        except Exception as e:  # a bug, not a data problem: keep it visible per tile
            _LOG.exception("resolving %s failed", naip_id)
            ref, reason, detail = None, "internal_error", f"{type(e).__name__}: {str(e)[:500]}"
        yield beam.pvalue.TaggedOutput("stats", count_requests(stats))
        if ref is None:
            for x, y in todo:
                _counter(f"reject_{reason}").inc()
                yield beam.pvalue.TaggedOutput("rejects", nir_reject(f"{naip_id}/{x}_{y}", "resolve", reason, detail))
            return
        _LOG.debug("resolved %s -> %s (%s)", naip_id, ref.item_id, detail)
        _counter("items_resolved").inc()
        for index, group in enumerate(nir_fetch.split_groups(todo, self.config.group_side)):
            yield (ref.item_id, naip_id, index), (ref.to_tuple(), naip_id, group)


class FetchGroupDoFn(beam.DoFn):
    """((item_id, naip_id, i), [(item, naip_id, [(x, y)]), ...]) -> nir.png files (`fetch_group`);
    outcomes, rejects and request stats to tagged outputs."""

    PROGRESS_EVERY_S = 10.0

    def __init__(self, config: NirConfig):
        self.config = config

    def setup(self):
        runtime.tune_allocator()
        self.http = stac.PoliteHttp.shared(self.config.http)
        self.signer = signing.make_signer(self.config.sign)
        self._tiles = 0
        self._started = self._last_log = time.monotonic()

    def process(self, element) -> Iterable[Any]:
        (item_id, _, _), values = element  # one value: keys are unique per folder and group
        values = list(values)
        ref = ItemRef.from_tuple(values[0][0])
        targets: dict[tuple[int, int], set[str]] = {}  # (x, y) -> naip_ids (folders naming this item)
        for _, naip_id, xys in values:
            for x, y in xys:
                targets.setdefault((int(x), int(y)), set()).add(naip_id)
        xys = sorted(targets, key=lambda t: (t[1], t[0]))
        stats = stac.RequestStats()
        try:
            results, error = fetch_group(ref, xys, http=self.http, signer=self.signer, config=self.config,
                                         stats=stats)
        except Exception as e:  # a bug: every tile of the group gets the reject, the job goes on
            _LOG.exception("group of %s failed", item_id)
            results, error = {}, ("internal_error", f"{type(e).__name__}: {str(e)[:500]}")
        _counter("groups_failed" if error else "groups_fetched").inc()
        yield beam.pvalue.TaggedOutput("stats", count_requests(stats))
        written = 0
        for xy in xys:
            for naip_id in sorted(targets[xy]):
                reject = self._emit(naip_id, xy, results, error)
                if reject is None:
                    written += 1
                else:
                    yield beam.pvalue.TaggedOutput("rejects", reject)
        if written:
            _counter("tiles_written").inc(written)
            yield beam.pvalue.TaggedOutput("outcomes", ("written", written))
        self._progress(len(xys))

    def _emit(self, naip_id, xy, results, error) -> dict | None:
        """Writes the tile's nir.png; returns its reject record instead when there is none."""
        x, y = xy
        tile_id = f"{naip_id}/{x}_{y}"
        if error is not None or xy not in results:
            reason, detail = error or ("internal_error", "no result for the tile")
            _counter(f"reject_{reason}").inc()
            return nir_reject(tile_id, "fetch", reason, detail)
        png = results[xy]
        if png is None:
            _counter("reject_no_nir_data").inc()
            return nir_reject(tile_id, "fetch", "no_nir_data", "no valid pixel of the item's image over the tile")
        try:
            storage.write_bytes_atomic(nir_fetch.nir_path(self.config.output, naip_id, x, y), png)
        except OSError as e:
            _counter("reject_write_error").inc()
            return nir_reject(tile_id, "write", "write_error", str(e)[:1000])
        return None

    def _progress(self, n: int):
        self._tiles += n
        now = time.monotonic()
        if now - self._last_log >= self.PROGRESS_EVERY_S:
            self._last_log = now
            _LOG.info("progress: %d tiles fetched by this worker, %.1f tiles/s", self._tiles,
                      self._tiles / (now - self._started))


class SumStats(beam.CombineFn):
    def create_accumulator(self):
        return {}

    def add_input(self, acc, stats):
        for k, v in stats.items():
            acc[k] = acc.get(k, 0) + int(v)
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for acc in accs:
            self.add_input(out, acc)
        return out

    def extract_output(self, acc):
        return dict(sorted(acc.items()))


def nir_summary(run_info: dict, counts: dict, http_stats: dict, files: list[str]) -> dict:
    rejects = {k[len("reject:"):]: v for k, v in sorted(counts.items()) if k.startswith("reject:")}
    written, skipped = counts.get("written", 0), counts.get("skipped", 0)
    return {
        **run_info,
        "counts": {
            "tiles": written + skipped + sum(rejects.values()),
            "written": written,
            "skipped": skipped,
            "rejects": sum(rejects.values()),
            "rejects_by_reason": rejects,
        },
        "http": {k: http_stats.get(k, 0) for k in stac.RequestStats.FIELDS},
        "files": sorted(str(f) for f in files),
        "end_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def publish_nir_run(_, output: str, run_info: dict, counts: dict, http_stats: dict, files: list) -> str:
    files = [str(f) for f in files]
    return publish.publish(output, nir_summary(run_info, counts, http_stats, files), files)


def reject_count(reject: dict) -> tuple[str, int]:
    return f"reject:{reject['reason']}", 1


class FetchNir(beam.PTransform):
    """From the pipeline's root: ids -> nir.png files, rejects/, run.json, _SUCCESS."""

    def __init__(self, config: NirConfig, run_info: dict, input_root: str | None, manifest: str | None,
                 num_shards: int = 0):
        super().__init__()
        self.config, self.run_info = config, run_info
        self.input_root, self.manifest, self.num_shards = input_root, manifest, num_shards

    def expand(self, pbegin):
        cfg = self.config
        ids = pbegin | "ReadTileIds" >> ReadTileIds(self.input_root, self.manifest)
        parsed = ids | "ParseTileIds" >> beam.FlatMap(parse_tile_id).with_outputs("rejects", main="tiles")
        resolved = (
            parsed.tiles
            | "GroupByNaipId" >> beam.GroupByKey()
            | "ResolveNaipIds" >> beam.ParDo(ResolveNaipIdDoFn(cfg)).with_outputs(
                "rejects", "outcomes", "stats", main="groups")
        )
        fetched = (
            resolved.groups
            | "GroupByItemGroup" >> beam.GroupByKey()
            | "FetchGroups" >> beam.ParDo(FetchGroupDoFn(cfg)).with_outputs("rejects", "outcomes", "stats")
        )
        rejects = (parsed.rejects, resolved.rejects, fetched.rejects) | "AllRejects" >> beam.Flatten()
        reject_files = rejects | "WriteRejects" >> WriteParquet(cfg.output, "rejects", records.REJECT_SCHEMA,
                                                                self.num_shards)
        # (outcome, count): written per group, skipped per folder, one per reject
        outcome_counts = (
            resolved.outcomes,
            fetched.outcomes,
            rejects | "RejectKey" >> beam.Map(reject_count),
        ) | "AllOutcomes" >> beam.Flatten()
        counts = (
            outcome_counts
            | "SumOutcomes" >> beam.CombinePerKey(sum)
            | "CountsToDict" >> beam.combiners.ToDict()
        )
        http_stats = (
            (resolved.stats, fetched.stats)
            | "AllStats" >> beam.Flatten()
            | "SumStats" >> beam.CombineGlobally(SumStats())
        )
        return (
            pbegin
            | "Once" >> beam.Create([None])
            | "WriteRunJson" >> beam.Map(
                publish_nir_run,
                output=cfg.output,
                run_info=self.run_info,
                counts=beam.pvalue.AsSingleton(counts),
                http_stats=beam.pvalue.AsSingleton(http_stats),
                files=beam.pvalue.AsList(reject_files),
            )
        )
