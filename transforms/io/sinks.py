"""Sinks of pair records besides Parquet: TFRecord of tf.train.Example, and the PNG folder layout that
the satlas-super-resolution S2-NAIP training code reads as it is.

PNG layout under `<output>/png/` (the chosen timestep per tile, so train with `n_s2_images: 1`; a
build with --lr-timesteps N stacks the N timesteps vertically, best first, as S2-NAIP stores its
series, for `n_s2_images: N`):

    naip/<naip_id>/<x>_<y>/rgb.png         HR RGB, histogram-matched (the only PNGs under naip/:
                                           the dataset class makes a sample of every PNG there)
    nir/naip/<naip_id>/<x>_<y>/nir.png     HR NIR, mode L                      (rgbn only)
    sentinel2/<x>_<y>/tci.png              the chosen 32x32 timestep, RGB (N timesteps: 32 x 32N, best on top)
    sentinel2/<x>_<y>/b08.png              its B08, mode L                      (rgbn only)
    tracker.json                           {tile_id: lr_index} (N timesteps: {tile_id: lr_indices}),
                                           written after every PNG

sentinel2/ is keyed by <x>_<y> alone, so of the pairs sharing an <x>_<y> (different NAIP captures)
only the one whose tile id sorts first is written; each other one becomes a `png_xy_collision`
reject. That reject is about the PNG layout only: the pair stays in Parquet and TFRecord. PNGs are
first written to `<output>/png_staging/<naip_id>/<x>_<y>/` and moved into place once the owner of
their chip is known.
"""
from __future__ import annotations

import json
from typing import Iterable, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics

from transforms import records
from transforms.imagery import encode_png
from transforms.io import example_proto, storage

# ---------------------------------------------------------------------------------------------
# TFRecord


class EncodeExampleDoFn(beam.DoFn):
    """Pair record -> serialized tensorflow.Example (message classes made per worker, in setup)."""

    def setup(self):
        self._classes = example_proto.message_classes()

    def process(self, record: dict):
        yield example_proto.encode_example(record, self._classes)


class WriteTFRecords(beam.PTransform):
    """Pair records -> `<output>/tfrecord/pairs-SSSSS-of-NNNNN.tfrecord[.gz]`, one tf.train.Example
    per pair with every column (example_proto.feature_spec()); yields the written file names."""

    def __init__(self, output: str, num_shards: int = 0, compress: bool = False):
        super().__init__()
        self.output, self.num_shards, self.compress = output, num_shards, compress

    def expand(self, pairs):
        return (
            pairs
            | "ToExample" >> beam.ParDo(EncodeExampleDoFn())
            | "WriteTFRecord" >> beam.io.WriteToTFRecord(
                storage.join(self.output, "tfrecord", "pairs"),
                file_name_suffix=".tfrecord.gz" if self.compress else ".tfrecord",
                num_shards=self.num_shards,
                shard_name_template="-SSSSS-of-NNNNN",
                compression_type=CompressionTypes.GZIP if self.compress else CompressionTypes.UNCOMPRESSED,
            )
        )


# ---------------------------------------------------------------------------------------------
# PNG layout: pure functions

STAGING_FOLDER = "png_staging"  # beside png/, so that nothing half-decided is ever under png/


def tile_xy(record: dict) -> str:
    return f"{record['tile_x']}_{record['tile_y']}"


def has_black_pixel(hr: np.ndarray) -> bool:
    """Whether any pixel's R, G and B are all 0: the training code's `has_black_pixels`, which makes
    its dataset skip the tile."""
    return bool((hr[..., :3] == 0).all(axis=-1).any())


def png_files(record: dict) -> dict[str, bytes]:
    """One pair's PNGs by name: rgb, tci, and with 4 bands nir, b08. An LR of N timesteps
    [N, 32, 32, C] is stacked vertically ([32N, 32, C], best first), as S2-NAIP stores a series."""
    hr, lr = records.decode_pair_arrays(record)
    if lr.ndim == 4:
        lr = lr.reshape(-1, *lr.shape[2:])
    files = {"rgb.png": encode_png(hr[..., :3]), "tci.png": encode_png(lr[..., :3])}
    if hr.shape[-1] == 4:
        files.update({"nir.png": encode_png(hr[..., 3]), "b08.png": encode_png(lr[..., 3])})
    return files


def tracker_value(record: dict):
    """A pair's tracker.json entry: lr_index, or the list lr_indices when lr holds N timesteps."""
    return records.lr_indices(record) if len(record["lr_shape"]) == 4 else record["lr_index"]


def staged_path(output: str, tile_id: str, name: str) -> str:
    naip_id, xy = tile_id.split("/")
    return storage.join(output, STAGING_FOLDER, naip_id, xy, name)


def final_path(png_root: str, tile_id: str, name: str) -> str:
    """Where a staged PNG of `tile_id` goes in the layout (module doc)."""
    naip_id, xy = tile_id.split("/")
    return {
        "rgb.png": storage.join(png_root, "naip", naip_id, xy, "rgb.png"),
        "nir.png": storage.join(png_root, "nir", "naip", naip_id, xy, "nir.png"),
        "tci.png": storage.join(png_root, "sentinel2", xy, "tci.png"),
        "b08.png": storage.join(png_root, "sentinel2", xy, "b08.png"),
    }[name]


def chip_owner(tile_ids: Iterable[str]) -> tuple[str, list[str]]:
    """Of the pairs on one <x>_<y>, the id that sorts first owns the chip; the others collide."""
    winner, *others = sorted(tile_ids)
    return winner, others


class MergeDicts(beam.CombineFn):
    """(key, value) pairs -> one dict."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, kv):
        acc[kv[0]] = kv[1]
        return acc

    def merge_accumulators(self, accs):
        accs = iter(accs)
        merged = next(accs)
        for acc in accs:
            merged.update(acc)
        return merged

    def extract_output(self, acc):
        return acc


def write_tracker(tracker: dict, png_root: str) -> str:
    path = storage.join(png_root, "tracker.json")
    storage.write_bytes_atomic(path, json.dumps(tracker, sort_keys=True, separators=(",", ":")).encode())
    return path


# ---------------------------------------------------------------------------------------------
# PNG layout: transforms


class StagePngsDoFn(beam.DoFn):
    """Writes a pair's PNGs to its own staging folder (no two pairs share one, so nothing waits for
    the collision check) and yields the small (x_y, facts) that decide where they go."""

    def __init__(self, output: str):
        self.output = output

    def process(self, record: dict):
        names = []
        for name, data in png_files(record).items():
            storage.write_bytes_atomic(staged_path(self.output, record["tile_id"], name), data)
            names.append(name)
        hr, _ = records.decode_pair_arrays(record)
        yield tile_xy(record), (record["tile_id"], tracker_value(record), has_black_pixel(hr), names)


class PlaceChipDoFn(beam.DoFn):
    """Per <x>_<y>: moves the owner's staged PNGs into the layout and drops the others' (each a
    `png_xy_collision` reject). Yields (tile_id, lr_index) for the tracker."""

    def __init__(self, output: str):
        self.output = output
        self.png_root = storage.join(output, "png")
        self._written = Metrics.counter(WritePngLayout.__name__, "png_pairs")
        self._black = Metrics.counter(WritePngLayout.__name__, "png_black_pixel_tiles")

    def process(self, keyed):
        xy, staged = keyed
        facts = {tile_id: (lr_index, black, names) for tile_id, lr_index, black, names in staged}
        winner, others = chip_owner(facts)
        lr_index, black, names = facts[winner]
        for name in names:
            storage.move(staged_path(self.output, winner, name), final_path(self.png_root, winner, name))
        self._written.inc()
        if black:
            self._black.inc()
            yield beam.pvalue.TaggedOutput("black_pixel_tiles", winner)
        yield winner, lr_index
        for tile_id in others:
            storage.delete([staged_path(self.output, tile_id, name) for name in facts[tile_id][2]])
            yield beam.pvalue.TaggedOutput("rejects", records.reject_record(
                tile_id, "select", "png_xy_collision",
                f"png/sentinel2/{xy}/ holds the pair of {winner}; this pair is left out of png/ only"))


def finish_layout(tracker: dict, output: str) -> str:
    """Writes tracker.json once every chip is placed, and removes the emptied staging folder."""
    path = write_tracker(tracker, storage.join(output, "png"))
    storage.remove_empty_tree(storage.join(output, STAGING_FOLDER))
    return path


class PngLayoutResult(NamedTuple):
    files: beam.PCollection  # one element, the tracker.json path, once every PNG is in place
    rejects: beam.PCollection  # png_xy_collision reject records (png layout only)
    black_pixel_tiles: beam.PCollection  # ids of written pairs the training code would skip


class WritePngLayout(beam.PTransform):
    """Pair records -> `<output>/png/` (module doc). Pairs stream into per-tile staging folders;
    only small (x_y, tile id, lr_index) facts are shuffled to settle chip collisions, and the owners'
    files are then moved into place. No pair record waits for another."""

    def __init__(self, output: str):
        super().__init__()
        self.output = output

    def expand(self, pairs) -> PngLayoutResult:
        placed = (
            pairs
            | "StagePngs" >> beam.ParDo(StagePngsDoFn(self.output))
            | "GroupByXy" >> beam.GroupByKey()
            | "PlaceChips" >> beam.ParDo(PlaceChipDoFn(self.output)).with_outputs(
                "rejects", "black_pixel_tiles", main="tracker")
        )
        files = (
            placed.tracker
            | "MergeTracker" >> beam.CombineGlobally(MergeDicts())
            | "FinishLayout" >> beam.Map(finish_layout, output=self.output)
        )
        return PngLayoutResult(files, placed.rejects, placed.black_pixel_tiles)
