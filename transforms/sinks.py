"""Sinks of pair records besides Parquet: TFRecord of tf.train.Example, and the PNG folder layout that
the satlas-super-resolution S2-NAIP training code reads as it is.

PNG layout under `<output>/png/` (one chosen timestep per tile, so train with `n_s2_images: 1`):

    naip/<naip_id>/<x>_<y>/rgb.png         HR RGB, histogram-matched (the only PNGs under naip/:
                                           the dataset class makes a sample of every PNG there)
    nir/naip/<naip_id>/<x>_<y>/nir.png     HR NIR, mode L                      (rgbn only)
    sentinel2/<x>_<y>/tci.png              the chosen 32x32 timestep, RGB
    sentinel2/<x>_<y>/b08.png              its B08, mode L                      (rgbn only)
    tracker.json                           {tile_id: lr_index}, written after every PNG

sentinel2/ is keyed by <x>_<y> alone, so of the pairs sharing an <x>_<y> (different NAIP captures)
only the one whose tile id sorts first is written; each other one becomes a `png_xy_collision`
reject. That reject is about the PNG layout only: the pair stays in Parquet and TFRecord.
"""
from __future__ import annotations

import json
from typing import Iterable, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics

from transforms import example_proto, records, storage, tiles
from transforms.imagery import encode_png

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
                tiles.join(self.output, "tfrecord", "pairs"),
                file_name_suffix=".tfrecord.gz" if self.compress else ".tfrecord",
                num_shards=self.num_shards,
                shard_name_template="-SSSSS-of-NNNNN",
                compression_type=CompressionTypes.GZIP if self.compress else CompressionTypes.UNCOMPRESSED,
            )
        )


# ---------------------------------------------------------------------------------------------
# PNG layout: pure functions


def tile_xy(record: dict) -> str:
    return f"{record['tile_x']}_{record['tile_y']}"


def has_black_pixel(hr: np.ndarray) -> bool:
    """Whether any pixel's R, G and B are all 0: the training code's `has_black_pixels`, which makes
    its dataset skip the tile."""
    return bool((hr[..., :3] == 0).all(axis=-1).any())


def png_files(record: dict, png_root: str) -> list[tuple[str, bytes]]:
    """The (path, PNG bytes) of one pair in the layout under `png_root` (module doc)."""
    hr, lr = records.decode_pair_arrays(record)
    naip_id, xy = record["naip_id"], tile_xy(record)
    files = [
        (tiles.join(png_root, "naip", naip_id, xy, "rgb.png"), encode_png(hr[..., :3])),
        (tiles.join(png_root, "sentinel2", xy, "tci.png"), encode_png(lr[..., :3])),
    ]
    if hr.shape[-1] == 4:
        files += [
            (tiles.join(png_root, "nir", "naip", naip_id, xy, "nir.png"), encode_png(hr[..., 3])),
            (tiles.join(png_root, "sentinel2", xy, "b08.png"), encode_png(lr[..., 3])),
        ]
    return files


def xy_collision_rejects(keyed: tuple[str, Iterable[str]]) -> Iterable[dict]:
    """(x_y, tile ids of its pairs) -> a `png_xy_collision` reject for each id but the first sorted."""
    xy, tile_ids = keyed
    winner, *others = sorted(tile_ids)
    for tile_id in others:
        yield records.reject_record(
            tile_id, "select", "png_xy_collision",
            f"png/sentinel2/{xy}/ holds the pair of {winner}; this pair is left out of png/ only")


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
    path = tiles.join(png_root, "tracker.json")
    storage.write_bytes_atomic(path, json.dumps(tracker, sort_keys=True, separators=(",", ":")).encode())
    return path


# ---------------------------------------------------------------------------------------------
# PNG layout: transforms


class WritePngDoFn(beam.DoFn):
    """Writes a pair's PNGs unless it lost an x_y collision; yields (tile_id, lr_index) for the
    tracker, and the tile id to 'black_pixel_tiles' when its HR RGB has a pure-black pixel."""

    def __init__(self, png_root: str):
        self.png_root = png_root
        self._written = Metrics.counter(WritePngLayout.__name__, "png_pairs")
        self._black = Metrics.counter(WritePngLayout.__name__, "png_black_pixel_tiles")

    def process(self, record: dict, collided: dict):
        if record["tile_id"] in collided:
            return
        for path, data in png_files(record, self.png_root):
            storage.write_bytes_atomic(path, data)
        self._written.inc()
        hr, _ = records.decode_pair_arrays(record)
        if has_black_pixel(hr):
            self._black.inc()
            yield beam.pvalue.TaggedOutput("black_pixel_tiles", record["tile_id"])
        yield record["tile_id"], record["lr_index"]


class PngLayoutResult(NamedTuple):
    files: beam.PCollection  # one element, the tracker.json path, once every PNG is written
    rejects: beam.PCollection  # png_xy_collision reject records (png layout only)
    black_pixel_tiles: beam.PCollection  # ids of written pairs the training code would skip


class WritePngLayout(beam.PTransform):
    """Pair records -> `<output>/png/` (module doc). Only (x_y, tile_id) strings are shuffled to find
    collisions; the losers reach the writer as a side input (few: one per extra capture of an x_y)."""

    def __init__(self, output: str):
        super().__init__()
        self.png_root = tiles.join(output, "png")

    def expand(self, pairs) -> PngLayoutResult:
        rejects = (
            pairs
            | "KeyByXy" >> beam.Map(lambda r: (tile_xy(r), r["tile_id"]))
            | "GroupByXy" >> beam.GroupByKey()
            | "XyCollisions" >> beam.FlatMap(xy_collision_rejects)
        )
        collided = rejects | "CollidedIds" >> beam.Map(lambda r: (r["tile_id"], r["reason"]))
        written = pairs | "WritePngs" >> beam.ParDo(
            WritePngDoFn(self.png_root), collided=beam.pvalue.AsDict(collided)
        ).with_outputs("black_pixel_tiles", main="tracker")
        files = (
            written.tracker
            | "MergeTracker" >> beam.CombineGlobally(MergeDicts())
            | "WriteTracker" >> beam.Map(write_tracker, png_root=self.png_root)
        )
        return PngLayoutResult(files, rejects, written.black_pixel_tiles)
