"""The PTransforms: a few lines each, wiring the plain functions of the other modules.

tile ids (manifest shards or a parallel listing) -> deduplicate (a keyed shuffle) -> build pairs
(read, pre-filter, select) -> pairs in each format + rejects -> run.json, then _SUCCESS.
`transforms.build.pipeline.BuildDataset` composes them into the whole build.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import corrections, imagery, records, runtime, tiles
from transforms.build import fingerprints as fpr
from transforms.io import publish, sinks, storage
from transforms.io.parquet_files import WriteParquetFiles
from transforms.io.prefetch import ReadAhead, TileReads, shared_read_ahead
from transforms.io.publish import OutputSpec
from transforms.pairs import PairConfig, build_tile, read_plan, tile_paths
from transforms.tiles import InvalidTileId, TileId

_LOG = logging.getLogger(__name__)
PARQUET_ROW_GROUP_BYTES = 32 * 1024 * 1024  # ~450 pairs per row group: bounded reader memory
PARQUET_RECORD_BATCH = 64
READ_BATCH = 32  # tiles whose reads are started together (transforms.io.prefetch)


def _counter(transform: type, name: str):
    return Metrics.counter(transform.__name__, name)


def counter_values(result, namespace: str) -> dict[str, int]:
    """A finished job's Beam counters of `namespace` (committed values, summed over steps), by
    name; {} when the runner reports none."""
    try:
        found = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(namespace))["counters"]
    except Exception:  # noqa: BLE001 - metrics are informative; a runner without them is fine
        return {}
    out: dict[str, int] = {}
    for c in found:
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(c.committed or 0)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# Tile ids


def manifest_lines_to_ids(line: str) -> Iterable[str]:
    """A manifest line -> its tile id; blank lines and '#' comments (whole-line or trailing) carry none."""
    tile_id = tiles.manifest_line_id(line)
    if tile_id is not None:
        yield tile_id


def tile_id_of_row(row: dict) -> str:
    return str(row["tile_id"])


def require_manifest(path: str) -> str:
    if not storage.exists(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    return path


def list_naip_ids(input_root: str) -> list[str]:
    return storage.list_children(storage.join(input_root, "naip"))


def list_tile_ids(input_root: str, naip_id: str) -> list[str]:
    """Tile ids under naip/<naip_id>/. A folder name that is not a NAIP id is not joined to any path:
    it is returned as it is, so that it becomes an `invalid_tile_id` reject instead of vanishing."""
    if not tiles.NAIP_ID_PATTERN.fullmatch(naip_id):
        return [naip_id]
    return [f"{naip_id}/{xy}" for xy in storage.list_children(storage.join(input_root, "naip", naip_id))]


def list_capture_tile_ids(naip_id: str, input_root: str) -> list[str]:
    """list_tile_ids with the element first, for FlatMap."""
    return list_tile_ids(input_root, naip_id)


class ReadTileIds(beam.PTransform):
    """Raw tile-id strings from a manifest (text: one id a line; Parquet: a `tile_id` column), read
    in shards by the workers, or, without a manifest, from a listing of `input_root` parallelised
    per NAIP capture. Nothing proportional to the tile count is held on the launcher."""

    def __init__(self, input_root: str, manifest: str | None = None):
        super().__init__()
        self.input_root = input_root
        self.manifest = manifest

    def expand(self, pbegin):
        if self.manifest:
            # The path is checked and read on the workers: the launcher may not be able to read it,
            # and a wrong path must fail the job instead of building zero tiles.
            path = (
                pbegin
                | "ManifestPath" >> beam.Create([self.manifest])
                | "RequireManifest" >> beam.Map(require_manifest)
            )
            if self.manifest.endswith(".parquet"):
                return (
                    path
                    | "ReadParquetManifest" >> beam.io.ReadAllFromParquet(columns=["tile_id"])
                    | "TileIdColumn" >> beam.Map(tile_id_of_row)
                )
            return (
                path
                | "ReadTextManifest" >> beam.io.ReadAllFromText()
                | "ParseLines" >> beam.FlatMap(manifest_lines_to_ids)
            )
        return (
            pbegin
            | "Root" >> beam.Create([self.input_root])
            | "ListNaipIds" >> beam.FlatMap(list_naip_ids)
            | "SpreadNaipIds" >> beam.Reshuffle()
            | "ListTiles" >> beam.FlatMap(list_capture_tile_ids, input_root=self.input_root)
        )


def first_of_duplicates(keyed: tuple[str, Iterable[None]]):
    """(id, [None]*n) -> the id once, and a `duplicate_tile_id` reject for each extra copy."""
    tile_id, copies = keyed
    yield tile_id
    for _ in list(copies)[1:]:
        yield beam.pvalue.TaggedOutput(
            "rejects",
            records.reject_record(tile_id, "manifest", "duplicate_tile_id", "listed more than once"),
        )


class DeduplicateAndReshuffle(beam.PTransform):
    """Keys each id by itself and groups: duplicates collapse (each extra copy becomes a reject) and
    the ids are redistributed across workers (the shuffle is the Reshuffle after the fan-out)."""

    def expand(self, ids):
        return (
            ids
            | "KeyById" >> beam.Map(tiles.keyed_by_itself)
            | "GroupById" >> beam.GroupByKey()
            | "FirstCopy" >> beam.FlatMap(first_of_duplicates).with_outputs("rejects", main="ids")
        )


# ---------------------------------------------------------------------------------------------
# Pairs


def start_reads(read_ahead: ReadAhead, tile_id: str, correction, config: PairConfig, fingerprints=None,
                spec: fpr.FingerprintSpec | None = None) -> TileReads | None:
    """The reads of one tile started ahead; None when it reads nothing (an invalid id, a removal).
    With the tile's `fingerprints` (from the listings of the incremental plan), the files they show
    absent are never requested (`fingerprints.absent_paths`), nor those the tile would not use
    (`pairs.read_plan`: nothing after a missing tci, b08 or nir; no optional band that feeds no
    term, e.g. s2cloudless's without the whole set); when they carry whether the Sentinel-2 folder
    holds anything (a gs:// group listing, `fingerprints.S2_HOLDS_ANY`), a tile without tci.png is
    told missing_s2 or missing_band from it, without listing that folder again
    (`fingerprints.listed_folders`)."""
    if correction is not None and correction.removes:
        return None
    try:
        tile = TileId.parse(tile_id)
    except InvalidTileId:
        return None
    folders = {}
    if fingerprints is None:
        absent, paths = frozenset(), tile_paths(tile, config)
    else:
        spec = spec or fpr.FingerprintSpec.for_config(config)
        absent = fpr.absent_paths(tile, spec, fingerprints)
        paths = read_plan(tile, config, absent)
        folders = fpr.listed_folders(tile, spec, fingerprints)
    gate = hr_reads_on if paths and paths[0] == tiles.hr_rgb_path(config.input_root, tile) else None
    return read_ahead.start(paths, imagery.MAX_PNG_BYTES, absent, first_decides=gate,
                            listed=fingerprints is not None, folders=folders)


def hr_reads_on(rgb_png: bytes) -> tuple[bool, object]:
    """(whether a tile whose NAIP rgb.png holds these bytes goes on to read its other files, the
    decoded image or None): False when `pairs.load_tile` rejects it from that image alone
    (undecodable, or a black border), so that a read-ahead asks for none of its Sentinel-2 and NIR
    objects (9 GETs for a robust tile of S2-NAIP: tci, b08, nir and six extra bands). The image,
    decoded here on the reader thread, is kept with the tile's reads (`TileReads.kept`):
    `load_tile` takes it instead of decoding the same bytes again."""
    try:
        rgb = imagery.decode_hr(rgb_png, 3)
    except imagery.ImageRejected:
        return False, None
    return not bool(imagery.has_black_border(rgb)), rgb


def build_task(element) -> tuple:
    """A BuildPairs element -> (tile_id, Correction or None, fingerprints or None). Elements: a tile
    id; (tile_id, fingerprints tuple) from the incremental plan; (tile_id, Correction or None) from
    `corrections.JoinCorrections`, or (tile_id, Correction or None, fingerprints) when its ids
    carried fingerprints."""
    if isinstance(element, str):
        return element, None, None
    if len(element) == 3:
        return tuple(element)
    tile_id, value = element
    return (tile_id, None, tuple(value)) if isinstance(value, (tuple, list)) else (tile_id, value, None)


class BuildPairDoFn(beam.DoFn):
    """build_tile for each id of a batch (from BatchElements): the pair to the main output, a reject
    to 'rejects'. The batch's reads are started ahead on `config.read_threads` threads while the
    tiles are built in order (`transforms.io.prefetch`). Progress: the `BuildPairs` counters, and on a
    local runner the launcher's progress lines (`transforms.progress`)."""

    def __init__(self, config: PairConfig):
        self.config = config

    def setup(self):
        runtime.tune_selection_process()
        self._read_ahead = shared_read_ahead(self.config.read_threads)
        self._spec = fpr.FingerprintSpec.for_config(self.config)

    def process(self, batch):
        tasks = [build_task(element) for element in batch]
        reads = [start_reads(self._read_ahead, tile_id, correction, self.config, fps, self._spec)
                 for tile_id, correction, fps in tasks]
        for (tile_id, correction, _), tile_reads in zip(tasks, reads):
            yield from self._build(tile_id, correction, tile_reads)
        storage.report_retries()  # those of the reader threads

    def _build(self, tile_id: str, correction, tile_reads: TileReads | None):
        if tile_reads is None:
            outcome = build_tile(tile_id, self.config, correction)
        else:
            try:
                outcome = build_tile(tile_id, self.config, correction, tile_reads)
            finally:
                tile_reads.cancel()
        _counter(BuildPairs, "tiles").inc()
        if outcome.kind == "pair":
            _counter(BuildPairs, "pairs").inc()
            yield outcome.record
        else:
            _counter(BuildPairs, f"reject_{outcome.record['reason']}").inc()
            yield beam.pvalue.TaggedOutput("rejects", outcome.record)


class BuildPairs(beam.PTransform):
    """Tile ids, or (tile_id, fingerprints) pairs (the incremental plan's: files they show absent
    are not requested) -> pair records (main output) and reject records ('rejects'). With
    `config.corrections`, the files are read on the workers and joined to the ids first."""

    def __init__(self, config: PairConfig):
        super().__init__()
        self.config = config

    def expand(self, ids):
        if self.config.corrections:
            ids = ids | "JoinCorrections" >> corrections.JoinCorrections(self.config.corrections)
        return (
            ids
            | "BatchIds" >> beam.BatchElements(min_batch_size=READ_BATCH, max_batch_size=READ_BATCH)
            | "BuildPair" >> beam.ParDo(BuildPairDoFn(self.config)).with_outputs("rejects", main="pairs")
        )


# ---------------------------------------------------------------------------------------------
# Sinks


class WriteParquet(beam.PTransform):
    """Records -> `<output>/<name>/<name>-SSSSS-of-NNNNN.parquet` (zstd); yields the file names.
    One file per bundle (`parquet_files.WriteParquetFiles`: a write fused with the producer and one
    finalising step), or with `num_shards` N > 0 exactly N files (Beam's `WriteToParquet`, which
    shuffles the records into N groups)."""

    def __init__(self, output: str, name: str, schema, num_shards: int = 0):
        super().__init__()
        self.output, self.name, self.schema, self.num_shards = output, name, schema, num_shards

    def expand(self, rows):
        if not self.num_shards:
            return rows | "WriteParquetFiles" >> WriteParquetFiles(
                storage.join(self.output, self.name), self.name, self.schema, codec="zstd",
                row_group_bytes=PARQUET_ROW_GROUP_BYTES, record_batch=PARQUET_RECORD_BATCH)
        return rows | beam.io.WriteToParquet(
            storage.join(self.output, self.name, self.name),
            schema=self.schema,
            codec="zstd",
            file_name_suffix=".parquet",
            shard_name_template="-SSSSS-of-NNNNN",
            num_shards=self.num_shards,
            row_group_buffer_size=PARQUET_ROW_GROUP_BYTES,
            record_batch_size=PARQUET_RECORD_BATCH,
        )


def outcome_key(record: dict) -> str:
    return f"reject:{record['reason']}" if "reason" in record else "pair"


def png_reject_key(record: dict) -> str:
    return f"png_reject:{record['reason']}"


def png_black_pixel_key(_) -> str:
    return "png_black_pixel_tile"


def lr_timesteps_key(record: dict) -> str:
    """How many timesteps a pair holds (--lr-timesteps; fewer only with --allow-fewer)."""
    return f"lr_timesteps:{len(records.lr_indices(record))}"


INCREMENTAL_COUNTS = ("new", "changed", "unchanged", "processed", "carried", "carry_missing", "superseded", "removed")


def run_summary(run_info: dict, counts: dict[str, int], files: list[str]) -> dict:
    """run.json's content: the launcher's `run_info` plus counts per outcome and reason.

    Keys counted: 'pair', 'reject:<reason>' (every input id has exactly one of these), with the
    png format 'png_reject:<reason>' and 'png_black_pixel_tile' (about pairs, not extra tiles),
    'lr_timesteps:<n>' per pair (in run.json when the build asked for --lr-timesteps N > 1), and
    'incremental:<name>' (`transforms.build.increments`: INCREMENTAL_COUNTS, all of them in run.json's
    `incremental` when any is counted)."""

    def by_prefix(prefix):
        return {k[len(prefix):]: v for k, v in sorted(counts.items()) if k.startswith(prefix)}

    rejects = by_prefix("reject:")
    pairs = counts.get("pair", 0)
    summary_counts = {
        "tiles": pairs + sum(rejects.values()),
        "pairs": pairs,
        "rejects": sum(rejects.values()),
        "rejects_by_reason": rejects,
    }
    if "png" in run_info.get("formats", ()):
        png_rejects = by_prefix("png_reject:")
        summary_counts["png"] = {
            "pairs": pairs - sum(png_rejects.values()),
            "rejects_by_reason": png_rejects,
            "black_pixel_tiles": counts.get("png_black_pixel_tile", 0),
        }
    requested = int(run_info.get("options", {}).get("lr_timesteps", 1))
    if requested > 1:
        by_count = {int(n): v for n, v in by_prefix("lr_timesteps:").items()}
        summary_counts["lr_timesteps"] = {
            "requested": requested,
            "pairs_with_all": by_count.get(requested, 0),
            "pairs_by_count": {str(n): by_count[n] for n in sorted(by_count)},
            "rejected_too_few": rejects.get("too_few_timesteps", 0),
        }
    increment = by_prefix("incremental:")
    if increment:
        increment = {**dict.fromkeys(INCREMENTAL_COUNTS, 0), **increment}
    return {
        **run_info,
        "counts": summary_counts,
        **({"incremental": increment} if increment else {}),
        "files": sorted(files),
        "end_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


class NoTiles(ValueError):
    """The build read no tile id at all: a wrong --input or --manifest, never a successful empty run."""


def no_tiles_message(run_info: dict) -> str:
    root = run_info.get("input") or "the input"
    source = f"the manifest {run_info['manifest']}" if run_info.get("manifest") else f"{storage.join(root, 'naip')}/"
    return (f"no tile id read from {source}: expected naip/<naip_id>/<x>_<y>/rgb.png under {root}; "
            "nothing was published")


def publish_run(_, output: str, run_info: dict, counts: dict, files: list[str]) -> str:
    """run.json then _SUCCESS; fails the job instead when it read no tile (nothing is published)."""
    summary = run_summary(run_info, counts, [str(f) for f in files])
    if summary["counts"]["tiles"] == 0:
        raise NoTiles(no_tiles_message(run_info))
    return publish.publish(output, summary, [str(f) for f in files])


class PublishRun(beam.PTransform):
    """Counts outcome keys and, after every data file is finalised, writes `run.json` and then
    `_SUCCESS` (the manifest of files)."""

    def __init__(self, output: str, run_info: dict):
        super().__init__()
        self.output, self.run_info = output, run_info

    def expand(self, inputs):
        outcome_keys, written_files = inputs
        # (key, count) pairs, read as a dict by the side input: no global combine, whose default
        # for an empty input and second grouping would cost two more stages of their own
        counts = outcome_keys | "CountOutcomes" >> beam.combiners.Count.PerElement()
        return (
            outcome_keys.pipeline
            | "Once" >> beam.Create([None])
            | "WriteRunJson" >> beam.Map(
                publish_run,
                output=self.output,
                run_info=self.run_info,
                counts=beam.pvalue.AsDict(counts),
                files=beam.pvalue.AsList(written_files),
            )
        )


class WritePairs(beam.PTransform):
    """Pair records to every requested format; yields (written file names, extra outcome keys)."""

    def __init__(self, spec: OutputSpec):
        super().__init__()
        self.spec = spec

    def expand(self, pairs):
        spec = self.spec
        files, keys = [], [pairs | "LrTimestepsKey" >> beam.Map(lr_timesteps_key)]
        if "parquet" in spec.formats:
            files.append(pairs | "Parquet" >> WriteParquet(spec.path, "pairs", records.PAIR_SCHEMA, spec.num_shards))
        if "tfrecord" in spec.formats:
            files.append(pairs | "TFRecord" >> sinks.WriteTFRecords(spec.path, spec.num_shards, spec.tfrecord_gzip))
        if "png" in spec.formats:
            png = pairs | "PngLayout" >> sinks.WritePngLayout(spec.path)
            files.append(png.files)
            files.append(png.rejects | "PngRejects" >> WriteParquet(
                spec.path, "png_rejects", records.REJECT_SCHEMA, spec.num_shards))
            keys.append(png.rejects | "PngRejectKey" >> beam.Map(png_reject_key))
            keys.append(png.black_pixel_tiles | "BlackPixelKey" >> beam.Map(png_black_pixel_key))
        return files, keys
