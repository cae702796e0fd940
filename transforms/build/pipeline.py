"""The `s2naip build` job: one PTransform, `BuildDataset`, from tile ids to a published dataset version.

    ids -> Deduplicate -> FingerprintTiles -> PlanIncrement (against the previous run's manifest/)
      'process' ids -> BuildPairs (transforms.build.stages: read, pre-filter, select per tile)
      'carry' ids -> CarryForward (previous pairs/ and rejects/; missing records are rebuilt)
      built + carried records -> WritePairs (every format), WriteRejects; rows -> WriteManifest
      -> PublishRun (run.json, then _SUCCESS) -> MoveLatest (the latest pointer, when given)

The stages live in `transforms.build.stages` (the per-tile build and the writers) and
`transforms.build.increments` (fingerprints, plan, carry-forward, manifest rows). `build(p, ...)`
applies it to a pipeline as the step "BuildDataset"; the launcher (pipelines/build_pairs.py) checks
the options and the output folder first (pipelines/options.py).
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import progress, records
from transforms.build import dataset_manifest as dm
from transforms.build import fingerprints as fpr
from transforms.build.increments import (
    NAMESPACE,
    AssembleManifest,
    CarryForward,
    FingerprintTiles,
    PlanIncrement,
    WriteManifest,
    outcome_of,
)
from transforms.build.stages import (
    BuildPairs,
    DeduplicateAndReshuffle,
    PublishRun,
    ReadTileIds,
    WritePairs,
    WriteParquet,
    outcome_key,
)
from transforms.build.stages import counter_values as stage_counter_values
from transforms.io import storage
from transforms.io.latest import point_latest
from transforms.io.publish import OutputSpec
from transforms.pairs import PairConfig


def move_latest(success_path: str, pointer: str, run_dir: str) -> str:
    """After `_SUCCESS` (its path is the input): points `pointer` at `run_dir`."""
    point_latest(pointer, run_dir)
    return pointer


def count_processed(tile_id: str) -> str:
    Metrics.counter(NAMESPACE, "processed").inc()
    return tile_id


def processed_key(_) -> str:
    return "incremental:processed"


def increment_key(element) -> str:
    """What an element of the increment counts as in run.json's `incremental`
    (transforms.build.stages.run_summary): a retired manifest row (superseded, removed), a carried record
    (a pair or reject dict), a carried id without a record (str, rebuilt)."""
    if isinstance(element, str):
        return "incremental:carry_missing"
    if "outcome" in element:
        return f"incremental:{element['outcome']}"
    return "incremental:carried"


class BuildDataset(beam.PTransform):
    """The whole build: the transforms of `transforms.build.stages` (ids -> pairs in every format and
    rejects -> run.json, _SUCCESS), made incremental against `previous_run` (None: everything is
    built), plus `manifest/`, and the `latest` pointer moved after `_SUCCESS` when given.

    run.json's `incremental` counts the plan (new, changed, unchanged), the tiles built
    (processed), the records carried, carried ids rebuilt (carry_missing) and the previous
    version's tiles retired (superseded, removed). With `progress` (a folder on the launcher's
    machine, local runners only), listed ids and records made are counted into it
    (`transforms.progress`)."""

    def __init__(self, config: PairConfig, spec: OutputSpec, run_info: dict, previous_run: str | None = None,
                 manifest: str | None = None, latest: str | None = None, progress: str | None = None):
        super().__init__()
        self.config, self.spec, self.manifest = config, spec, manifest
        self.previous_run = previous_run.rstrip("/") if previous_run else None  # pipelines.options.check_since
        self.latest = latest
        self.progress = progress
        self.run_info = {**run_info, "since": storage.absolute(self.previous_run), "latest": storage.absolute(latest)}
        self.options_hash = dm.config_options_hash(config)
        self.run_info.setdefault("options_hash", self.options_hash)

    def expand(self, pbegin):
        config, spec = self.config, self.spec
        ids = pbegin | "ReadTileIds" >> ReadTileIds(config.input_root, self.manifest)
        if self.progress:
            ids = ids | "CountListed" >> progress.count(self.progress, "listed")
        unique = ids | "Deduplicate" >> DeduplicateAndReshuffle()
        fps = unique.ids | "FingerprintTiles" >> FingerprintTiles(fpr.FingerprintSpec.for_config(config),
                                                                   config.read_threads)
        plan = fps | "PlanIncrement" >> PlanIncrement(self.previous_run, self.options_hash, config.corrections)

        to_build = [plan["process"]]
        carried_pairs, carried_rejects = [], []
        counted = [plan["retired"]]  # the increment's elements run.json counts (increment_key)
        if self.previous_run:
            carried = plan["carry"] | "CarryForward" >> CarryForward(self.previous_run)
            to_build.append(carried["missing"])
            carried_pairs.append(carried["pairs"])
            carried_rejects.append(carried["rejects"])
            counted += [carried["missing"], carried["pairs"], carried["rejects"]]
        process = (
            to_build
            | "AllToBuild" >> beam.Flatten()
            | "CountProcessed" >> beam.Map(count_processed)
        )
        increment_keys = [plan["plan"], process | "ProcessedKey" >> beam.Map(processed_key),
                          counted | "AllCounted" >> beam.Flatten() | "IncrementKey" >> beam.Map(increment_key)]
        built = process | "BuildPairs" >> BuildPairs(config)

        pairs = [built.pairs, *carried_pairs] | "AllPairs" >> beam.Flatten()
        rejects = [unique.rejects, built.rejects, *carried_rejects] | "AllRejects" >> beam.Flatten()
        pair_files, format_keys = pairs | "WritePairs" >> WritePairs(spec)
        reject_files = rejects | "WriteRejects" >> WriteParquet(spec.path, "rejects", records.REJECT_SCHEMA,
                                                               spec.num_shards)

        outcomes = [built.pairs | "BuiltPairOutcome" >> beam.Map(outcome_of, source="built"),
                    built.rejects | "BuiltRejectOutcome" >> beam.Map(outcome_of, source="built")]
        outcomes += [pc | f"CarriedOutcome{i}" >> beam.Map(outcome_of, source="carried")
                     for i, pc in enumerate([*carried_pairs, *carried_rejects])]
        rows = ((plan["planned"], outcomes | "AllOutcomes" >> beam.Flatten())
                | "AssembleManifest" >> AssembleManifest(spec.path, self.options_hash))
        manifest_files = ((rows, plan["retired"]) | "AllManifestRows" >> beam.Flatten()
                          | "WriteManifest" >> WriteManifest(spec.path, spec.num_shards))

        outcome_keys = [
            pairs | "PairKey" >> progress.count(self.progress, "done", outcome_key),
            rejects | "RejectKey" >> progress.count(self.progress, "done", outcome_key),
            *format_keys,
            *increment_keys,
        ] | "AllOutcomeKeys" >> beam.Flatten()
        files = [*pair_files, reject_files, manifest_files] | "AllFiles" >> beam.Flatten()
        success = (outcome_keys, files) | "PublishRun" >> PublishRun(spec.path, self.run_info)
        if self.latest:
            success = success | "MoveLatest" >> beam.Map(move_latest, pointer=self.latest, run_dir=spec.path)
        return success


def counter_values(result) -> dict[str, int]:
    """The job's `incremental` counters (committed values, summed over steps)."""
    return stage_counter_values(result, NAMESPACE)


def build(p: beam.Pipeline, config: PairConfig, spec: OutputSpec, info: dict, manifest: str | None = None,
          since: str | None = None, latest_pointer: str | None = None, progress_dir: str | None = None):
    """The whole build on pipeline `p`: incremental against `since` (a published run folder with a
    manifest), or full when it is None; writes `manifest/` and, with `latest_pointer`, moves that
    pointer after `_SUCCESS`; with `progress_dir`, counts into that folder (`transforms.progress`)."""
    return p | "BuildDataset" >> BuildDataset(config, spec, info, since, manifest, latest_pointer, progress_dir)
