"""Incremental builds: process only the tiles whose inputs, options or correction changed since a
published run, carry the others' records forward, and publish a complete, self-contained version.

    ids -> deduplicate -> FingerprintTiles -> PlanIncrement (joined with the previous manifest)
      'process' ids ---------------------------------------------> BuildPairs
      'carry' ids -> CarryForward (previous pairs/ and rejects/) -> carried records
                                       (ids whose record is missing -> BuildPairs)
      built + carried records -> every format, rejects/ ; manifest rows -> manifest/
      -> run.json, _SUCCESS -> the latest pointer (only after _SUCCESS)

Shuffles carry small keys: fingerprints and manifest rows (short strings) are joined by tile id;
retirements are decided per chip (`x_y`) from (x_y, naip_id) keys; carried records are located by
a join of tile ids with (file, row group) references read from the previous run's `tile_id`
columns, grouped per row group, and each row group is then read once and filtered: the pair records
themselves never go through a shuffle, they flow once, from the previous run's files to the writers.

Beam counters (namespace `incremental`): `new`, `changed`, `unchanged` (the plan), `processed`
(tiles built), `carried` (records copied), `row_groups_read` (previous row groups read whole to
copy them), `carry_missing` (planned carries whose record was not found: rebuilt), `superseded`,
`removed`, `fingerprint_errors`.

`transforms.build.pipeline.BuildDataset` composes these stages with those of `transforms.build.stages`
into the whole build; with no previous run it is a full build that also writes the manifest.
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import corrections, records, tiles
from transforms.build import dataset_manifest as dm
from transforms.build import fingerprints as fpr
from transforms.build.stages import (
    READ_BATCH,
    WriteParquet,
)
from transforms.io import storage
from transforms.io.prefetch import shared_read_ahead

_LOG = logging.getLogger(__name__)
NAMESPACE = "incremental"
MAX_ID_CHARS = 1000  # reject records truncate tile ids to this (records.reject_record)


def _counter(name: str):
    return Metrics.counter(NAMESPACE, name)


# ---------------------------------------------------------------------------------------------
# Fingerprints


class FingerprintDoFn(beam.DoFn):
    """The fingerprints of a batch of ids, taken on `threads` threads (listings are round trips)."""

    def __init__(self, spec: fpr.FingerprintSpec, threads: int):
        self.spec, self.threads = spec, threads

    def setup(self):
        self._read_ahead = shared_read_ahead(self.threads)

    def process(self, batch: list[str]) -> Iterator[tuple[str, tuple]]:
        for tile_id, fps in zip(batch, self._read_ahead.map(self._fingerprints, batch)):
            if any(fpr.is_error(v) for v in fps):
                _counter("fingerprint_errors").inc()
            yield tile_id, fps
        storage.report_retries()  # those of the reader threads

    def _fingerprints(self, tile_id: str) -> tuple:
        return fpr.tile_fingerprints(tile_id, self.spec)


GROUP_CHUNK_TILES = 1000  # a group's tiles are listed in chunks of this many, on the reader threads


def block_key(tile_id: str) -> tuple[str, str]:
    """(block of zoom-17 columns, tile_id): `fingerprints.column_block`."""
    return fpr.column_block(tile_id), tile_id


def tile_order(tile_id: str) -> tuple[str, str]:
    """Sorts a block's ids by chip name (`<x>_<y>`, as GCS orders the Sentinel-2 folders), so that
    a chunk's folders are neighbours in name order."""
    return tile_id.rsplit("/", 1)[-1], tile_id


class FingerprintGroupDoFn(FingerprintDoFn):
    """The fingerprints of the tiles of one block of zoom-17 columns (gs://): their folders listed
    together with range listings (`fingerprints.group_listings`), in chunks of
    GROUP_CHUNK_TILES tiles run on `threads` threads. Each tuple also carries, after the
    fingerprints, whether the tile's Sentinel-2 folder holds anything (`fingerprints.S2_HOLDS_ANY`;
    the plan neither compares nor stores it)."""

    def process(self, keyed) -> Iterator[tuple[str, tuple]]:
        _, ids = keyed
        ids = sorted(ids, key=tile_order)
        chunks = [ids[i:i + GROUP_CHUNK_TILES] for i in range(0, len(ids), GROUP_CHUNK_TILES)]
        for chunk, fingerprints in zip(chunks, self._read_ahead.map(self._chunk, chunks)):
            for tile_id, fps in zip(chunk, fingerprints):
                if any(fpr.is_error(v) for v in fps):
                    _counter("fingerprint_errors").inc()
                yield tile_id, fps
        storage.report_retries()  # those of the reader threads

    def _chunk(self, ids: list[str]) -> list[tuple]:
        return fpr.group_listings(ids, self.spec)


class FingerprintTiles(beam.PTransform):
    """Tile ids -> (tile_id, fingerprints tuple in `fingerprints.FIELDS` order). No image is decoded;
    on gs:// nothing is downloaded: the ids are grouped per block of 64 zoom-17 columns and each
    block's folders (NAIP, Sentinel-2, NIR) are listed together with range listings, about one
    request per 1,000 objects (`fingerprints.group_listings`), and each tuple ends with one more
    item, whether the tile's Sentinel-2 folder holds anything (`fingerprints.S2_HOLDS_ANY`). Local
    files are checksummed tile by tile."""

    def __init__(self, spec: fpr.FingerprintSpec, threads: int = 0):
        super().__init__()
        self.spec, self.threads = spec, threads

    def expand(self, ids):
        if fpr.lists_in_groups(self.spec):
            return (
                ids
                | "KeyByColumnBlock" >> beam.Map(block_key)
                | "GroupByColumnBlock" >> beam.GroupByKey()
                | "FingerprintGroups" >> beam.ParDo(FingerprintGroupDoFn(self.spec, self.threads))
            )
        return (
            ids
            | "BatchIds" >> beam.BatchElements(min_batch_size=READ_BATCH, max_batch_size=READ_BATCH)
            | "Fingerprint" >> beam.ParDo(FingerprintDoFn(self.spec, self.threads))
        )


# ---------------------------------------------------------------------------------------------
# The plan


def manifest_row_keyed(row: dict) -> tuple[str, tuple]:
    return row["tile_id"], dm.to_tuple(row)


class ReadPreviousManifest(beam.PTransform):
    """(tile_id, manifest row tuple) of a published run, read in shards on the workers (the run must
    have `_SUCCESS`, else the job fails with IncompleteRun)."""

    def __init__(self, run_dir: str):
        super().__init__()
        self.run_dir = run_dir

    def expand(self, pbegin):
        return (
            pbegin
            | "PreviousRun" >> beam.Create([self.run_dir])
            | "ManifestFiles" >> beam.FlatMap(dm.manifest_files)
            | "SpreadManifestFiles" >> beam.Reshuffle()
            | "ReadManifest" >> beam.io.ReadAllFromParquet(columns=list(dm.FIELDS))
            | "KeyManifestRows" >> beam.Map(manifest_row_keyed)
        )


class PlanTileDoFn(beam.DoFn):
    """(tile_id, {'fp': [...], 'prev': [...], 'corr': [...]}) -> the tile's plan.

    Outputs: 'process' ((tile_id, fingerprints, and what the listing adds after them)), 'carry' (tile id), 'plan' (the tile's plan as run.json counts it:
    'incremental:new', ':changed' or ':unchanged'), 'planned' ((tile_id, (fps, correction, computed_in of the
    previous record or None))), 'current_xy' ((x_y, naip_id) of each current
    tile), 'retiring' ((x_y, previous row tuple) of previous tiles gone from the input), 'retired'
    (rows of gone tiles without an x_y: invalid ids)."""

    def __init__(self, options_hash: str):
        self.options_hash = options_hash

    def process(self, keyed):
        tile_id, groups = keyed
        current = list(groups.get("fp", ()))
        previous = [dm.from_tuple(t) for t in groups.get("prev", ())]
        prev = previous[0] if previous else None
        if len(previous) > 1:
            _counter("previous_duplicate_rows").inc()
        correction = corrections.latest(groups.get("corr", ()))
        if not current:
            if correction is not None:
                _counter("corrections_unmatched").inc()
            if prev is not None and prev["outcome"] not in dm.RETIRED:
                if prev.get("tile_xy"):
                    yield beam.pvalue.TaggedOutput("retiring", (prev["tile_xy"], dm.to_tuple(prev)))
                else:  # an invalid id of the previous input: no chip, so nothing supersedes it
                    row = dm.retire(prev, ())
                    _counter(row["outcome"]).inc()
                    yield beam.pvalue.TaggedOutput("retired", row)
            return
        if len(current) > 1:  # the ids were deduplicated before: a bug upstream
            raise RuntimeError(f"tile {tile_id[:200]!r} fingerprinted {len(current)} times")
        listing = tuple(current[0])
        fps = fpr.compared(listing)  # what the listing adds after the fingerprints is never compared
        corr = dm.correction_text(correction)
        naip_id, xy = dm.tile_parts(tile_id)
        if naip_id is None:
            plan = "new" if prev is None else "changed"  # invalid ids: no input, rebuilt at no cost
        else:
            plan = dm.plan_increment(prev, fps, self.options_hash, corr)
            yield beam.pvalue.TaggedOutput("current_xy", (xy, naip_id))
        _counter(plan).inc()
        yield beam.pvalue.TaggedOutput("plan", f"incremental:{plan}")  # counted into run.json
        carry = plan == "unchanged"
        computed_in = prev["computed_in"] if carry else None
        # keyed as its record will be (reject records truncate ids), for AssembleManifest's join
        yield beam.pvalue.TaggedOutput("planned", (tile_id[:MAX_ID_CHARS], (fps, corr, computed_in)))
        # a tile to build takes its listing along: BuildPairs requests no file it shows absent, and
        # lists no Sentinel-2 folder it saw whole
        if carry:
            yield beam.pvalue.TaggedOutput("carry", tile_id)
        else:
            yield beam.pvalue.TaggedOutput("process", (tile_id, listing))


def retire_chip(keyed) -> Iterator[dict]:
    """(x_y, {'retiring': [previous rows], 'current': [naip ids]}) -> superseded / removed rows."""
    _, groups = keyed
    current = set(groups.get("current", ()))
    for values in groups.get("retiring", ()):
        row = dm.retire(dm.from_tuple(values), current)
        _counter(row["outcome"]).inc()
        yield row


def fingerprints_only(tile_id: str, fps) -> tuple[str, dict]:
    """A tile's fingerprints shaped as a join's result, when there is nothing to join them with."""
    return tile_id, {"fp": [fps]}


class PlanIncrement(beam.PTransform):
    """(tile_id, fingerprints) of the current input, joined by tile id (CoGroupByKey) with the
    previous run's manifest (read on the workers) and the corrections entries (read on the workers,
    a later file wins, as `corrections.JoinCorrections`).

    Returns a dict of PCollections: 'process' ((tile_id, fingerprints) of the tiles to build),
    'carry' (tile ids whose previous record is reused), 'retired' (superseded / removed manifest
    rows, dicts), 'plan' (each tile's plan as a run.json count key) and 'planned' (tile_id,
    (fingerprints, correction, computed_in)) for `AssembleManifest`. With `previous_run=None`
    every tile is 'new'."""

    def __init__(self, previous_run: str | None, options_hash: str, corrections_files: Iterable[str] = ()):
        super().__init__()
        self.previous_run = previous_run
        self.options_hash = options_hash
        self.corrections_files = tuple(corrections_files)

    def expand(self, fingerprints):
        p = fingerprints.pipeline
        groups = {"fp": fingerprints}
        if self.previous_run:
            groups["prev"] = p | "ReadPreviousManifest" >> ReadPreviousManifest(self.previous_run)
        if self.corrections_files:
            groups["corr"] = (
                p
                | "CorrectionFiles" >> beam.Create(list(enumerate(self.corrections_files)))
                | "SpreadCorrectionFiles" >> beam.Reshuffle()
                | "ReadCorrections" >> beam.FlatMap(corrections.read_corrections_file)
            )
        if len(groups) > 1:
            joined = groups | "JoinByTileId" >> beam.CoGroupByKey()
        else:  # a full build without corrections: nothing to join
            joined = fingerprints | "NothingToJoin" >> beam.MapTuple(fingerprints_only)
        plan = joined | "Plan" >> beam.ParDo(PlanTileDoFn(self.options_hash)).with_outputs(
            "process", "carry", "plan", "planned", "current_xy", "retiring", "retired")
        if self.previous_run:
            by_chip = (
                {"retiring": plan.retiring, "current": plan.current_xy}
                | "JoinByChip" >> beam.CoGroupByKey()
                | "Retire" >> beam.FlatMap(retire_chip)
            )
            retired = (plan.retired, by_chip) | "AllRetired" >> beam.Flatten()
        else:
            retired = plan.retired
        return {"process": plan.process, "carry": plan.carry, "retired": retired, "planned": plan.planned,
                "plan": plan.plan}


# ---------------------------------------------------------------------------------------------
# Carrying records forward


def _open_parquet(path: str):
    import pyarrow.parquet as pq

    f = storage.open_file(path)
    return f, pq.ParquetFile(f)


def row_groups(table_file: tuple[str, str]) -> Iterator[tuple[str, str, int]]:
    """(table, file) -> (table, file, row group index) per row group."""
    table, path = table_file
    f, pf = _open_parquet(path)
    with f:
        for i in range(pf.metadata.num_row_groups):
            yield table, path, i


def _is_duplicate_reject(table: str, reason) -> bool:
    # duplicate_tile_id rejects are remade from the current input by DeduplicateAndReshuffle
    return table == "rejects" and reason == "duplicate_tile_id"


def row_group_tile_ids(ref: tuple[str, str, int]) -> Iterator[tuple[str, tuple[str, str, int]]]:
    """(table, file, row group) -> (tile_id, the same reference) for each record in it (only the
    tile_id column, and reason for rejects, is read)."""
    table, path, index = ref
    columns = ["tile_id", "reason"] if table == "rejects" else ["tile_id"]
    f, pf = _open_parquet(path)
    with f:
        rows = pf.read_row_group(index, columns=columns).to_pylist()
    for row in rows:
        if not _is_duplicate_reject(table, row.get("reason")):
            yield row["tile_id"], (table, path, index)


def locate(keyed) -> Iterator:
    """(tile_id, {'carry': [...], 'at': [refs]}) -> ((table, file, row group), tile_id) for each carried
    id found; the id to 'missing' when its previous record is not in the previous run."""
    tile_id, groups = keyed
    if not list(groups.get("carry", ())):
        return
    refs = sorted(set(groups.get("at", ())))
    if not refs:
        _counter("carry_missing").inc()
        yield beam.pvalue.TaggedOutput("missing", tile_id)
        return
    if len(refs) > 1:
        _counter("carry_duplicate_records").inc()
    yield refs[0], tile_id


class ReadCarriedDoFn(beam.DoFn):
    """((table, file, row group), [tile ids]) -> those records, read from that row group once:
    pairs to the main output, rejects to 'rejects', as the previous run stored them."""

    def process(self, keyed):
        (table, path, index), ids = keyed
        wanted = set(ids)
        schema = records.PAIR_SCHEMA if table == "pairs" else records.REJECT_SCHEMA
        f, pf = _open_parquet(path)
        with f:
            rows = pf.read_row_group(index).to_pylist()
        found = 0
        for row in rows:
            if row["tile_id"] not in wanted or _is_duplicate_reject(table, row.get("reason")):
                continue
            wanted.discard(row["tile_id"])  # one record per id
            found += 1
            record = {name: row.get(name) for name in schema.names}
            yield record if table == "pairs" else beam.pvalue.TaggedOutput("rejects", record)
        _counter("carried").inc(found)
        _counter("row_groups_read").inc()
        if wanted:  # the row group changed under us: the previous run is not what its manifest says
            raise RuntimeError(f"{path} row group {index} no longer holds {len(wanted)} carried record(s), "
                               f"e.g. {sorted(wanted)[0][:200]!r}")


class CarryForward(beam.PTransform):
    """Carried tile ids -> their records from a published run (its `_SUCCESS`-listed pairs and
    rejects Parquet files, read on the workers), unchanged. Returns a dict: 'pairs', 'rejects', and
    'missing' (carried ids without a record there: to be rebuilt)."""

    def __init__(self, previous_run: str):
        super().__init__()
        self.previous_run = previous_run

    def expand(self, carry_ids):
        p = carry_ids.pipeline
        locations = (
            p
            | "PreviousRun" >> beam.Create([self.previous_run])
            | "RecordFiles" >> beam.FlatMap(dm.record_files)
            | "SpreadFiles" >> beam.Reshuffle()
            | "RowGroups" >> beam.FlatMap(row_groups)
            | "SpreadRowGroups" >> beam.Reshuffle()
            | "RowGroupTileIds" >> beam.FlatMap(row_group_tile_ids)
        )
        located = (
            {"carry": carry_ids | "KeyCarried" >> beam.Map(tiles.keyed_by_itself), "at": locations}
            | "JoinLocations" >> beam.CoGroupByKey()
            | "Locate" >> beam.FlatMap(locate).with_outputs("missing", main="located")
        )
        carried = (
            located.located
            | "GroupByRowGroup" >> beam.GroupByKey()
            | "ReadCarried" >> beam.ParDo(ReadCarriedDoFn()).with_outputs("rejects", main="pairs")
        )
        return {"pairs": carried.pairs, "rejects": carried.rejects, "missing": located.missing}


# ---------------------------------------------------------------------------------------------
# The manifest


def outcome_of(record: dict, source: str):
    """A pair or reject record -> (tile_id, (source, outcome, reason)): small, for the manifest join."""
    if "reason" in record:
        return record["tile_id"], (source, "reject", record["reason"])
    return record["tile_id"], (source, "pair", None)


def assemble_rows(keyed, output: str, options_hash: str) -> Iterator[dict]:
    """(tile_id, {'planned': [...], 'outcome': [...]}) -> the tile's manifest row. Every planned tile
    has exactly one outcome (built or carried); anything else fails the job: a manifest that does
    not match the data would mislead the next increment."""
    tile_id, groups = keyed
    planned = sorted(groups.get("planned", ()), key=repr)
    outcomes = sorted(groups.get("outcome", ()), key=repr)
    if len(planned) != len(outcomes):
        raise RuntimeError(f"tile {tile_id[:200]!r}: {len(planned)} planned, {len(outcomes)} outcomes")
    for (fps, corr, previous_computed_in), (source, outcome, reason) in zip(planned, outcomes):
        computed_in = previous_computed_in if source == "carried" and previous_computed_in else output
        yield dm.manifest_row(tile_id, fps, options_hash, corr, outcome, reason, computed_in)


class AssembleManifest(beam.PTransform):
    """(planned, outcomes) -> manifest rows of the current tiles (dicts), joined by tile id."""

    def __init__(self, output: str, options_hash: str):
        super().__init__()
        self.output, self.options_hash = output, options_hash

    def expand(self, inputs):
        planned, outcomes = inputs
        return (
            {"planned": planned, "outcome": outcomes}
            | "JoinOutcomes" >> beam.CoGroupByKey()
            | "ManifestRows" >> beam.FlatMap(assemble_rows, output=self.output, options_hash=self.options_hash)
        )


class WriteManifest(beam.PTransform):
    """Manifest rows -> `<output>/manifest/manifest-SSSSS-of-NNNNN.parquet`; yields the file names."""

    def __init__(self, output: str, num_shards: int = 0):
        super().__init__()
        self.output, self.num_shards = output, num_shards

    def expand(self, rows):
        return rows | "Parquet" >> WriteParquet(self.output, dm.MANIFEST_FOLDER, dm.MANIFEST_SCHEMA, self.num_shards)
