"""TFRecord and PNG sinks, the Example codec, and the project's readers."""
import gzip
import json
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from tests.tile_factory import NAIP_ID, scene, series_from
from transforms import records
from transforms.build.stages import WriteParquet
from transforms.io import example_proto
from transforms.io.readers import CorruptRecordError, as_stored, read_parquet_pairs, read_tfrecord_pairs
from transforms.io.sinks import WritePngLayout, WriteTFRecords, has_black_pixel
from transforms.selection import SelectionConfig, select_pair
from transforms.tiles import TileId

RUNNER = "FnApiRunner"
OTHER_NAIP_ID = "m_2608101_ne_17_060_20191121"  # sorts before NAIP_ID ('ne' < 'nw')


def make_record(naip_id=NAIP_ID, x=35000, y=55000, seed=0, bands=4, t=5):
    rng = np.random.default_rng(seed)
    hr = scene(rng, bands=bands)
    selection = select_pair(hr, series_from(hr, rng, t), SelectionConfig(top_k=3))
    return records.pair_record(TileId(naip_id, x, y), selection, n_timesteps=t, split="test",
                               mode="paper", alpha=0.7)


@pytest.fixture(scope="module")
def pairs():
    return [make_record(x=35000 + i, seed=i) for i in range(4)]


def write_tfrecords(out, pairs, compress=False, num_shards=2):
    with TestPipeline(runner=RUNNER) as p:
        files = p | beam.Create(pairs) | WriteTFRecords(str(out), num_shards=num_shards, compress=compress)
        assert_that(files | beam.combiners.Count.Globally(), equal_to([num_shards]))


def by_id(rows):
    return {r["tile_id"]: r for r in rows}


# ---------------------------------------------------------------------------------------------
# Example codec


def test_feature_spec_covers_every_column():
    spec = example_proto.feature_spec()
    assert list(spec) == records.PAIR_SCHEMA.names
    assert spec["hr"] == ("bytes", 1) and spec["tile_id"] == ("bytes", 1)
    assert spec["tile_x"] == ("int64", 1) and spec["zoom"] == ("int64", 1)
    assert spec["hr_shape"] == ("int64", None) and spec["candidate_psnr"] == ("float", None)
    assert spec["psnr"] == ("float", 1)


def test_example_codec_round_trip_and_empty_lists(pairs):
    record = dict(pairs[0], valid_indices=[], candidate_scores=[])
    assert example_proto.decode_example(example_proto.encode_example(record)) == as_stored(record)


def test_example_classes_are_tensorflows_names_in_a_private_pool():
    from google.protobuf import descriptor_pool

    classes = example_proto.message_classes()
    assert classes.Example.DESCRIPTOR.full_name == "tensorflow.Example"
    assert classes.Feature.DESCRIPTOR.fields_by_name["int64_list"].number == 3
    assert classes.Example.DESCRIPTOR.file.pool is not descriptor_pool.Default()


# ---------------------------------------------------------------------------------------------
# TFRecord


@pytest.mark.parametrize("compress", [False, True])
def test_tfrecord_round_trip(tmp_path, pairs, compress):
    write_tfrecords(tmp_path, pairs, compress=compress)
    suffix = ".tfrecord.gz" if compress else ".tfrecord"
    names = sorted(os.listdir(tmp_path / "tfrecord"))
    assert names == [f"pairs-0000{i}-of-00002{suffix}" for i in range(2)]
    if compress:
        with open(tmp_path / "tfrecord" / names[0], "rb") as f:
            assert f.read(2) == b"\x1f\x8b"
    rows = list(read_tfrecord_pairs(str(tmp_path / "tfrecord")))
    assert by_id(rows) == by_id(as_stored(r) for r in pairs)
    hr, lr = records.decode_pair_arrays(rows[0])
    assert hr.shape == (128, 128, 4) and lr.shape == (32, 32, 4)


def test_tfrecord_corruption_is_detected(tmp_path, pairs):
    write_tfrecords(tmp_path, pairs[:1], num_shards=1)
    path = tmp_path / "tfrecord" / "pairs-00000-of-00001.tfrecord"
    data = bytearray(path.read_bytes())
    data[5000] ^= 0x01  # inside the Example
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError, match="data checksum"):
        list(read_tfrecord_pairs(str(path)))
    data[5000] ^= 0x01
    data[2] ^= 0x01  # the length
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError, match="length checksum"):
        list(read_tfrecord_pairs(str(path)))
    data[2] ^= 0x01
    gz = tmp_path / "truncated.tfrecord.gz"
    gz.write_bytes(gzip.compress(bytes(data[:-10])))
    with pytest.raises(CorruptRecordError, match="truncated data"):
        list(read_tfrecord_pairs(str(gz)))
    gz.write_bytes(gzip.compress(bytes(data))[:-100])  # the gzip stream itself cut short
    with pytest.raises(CorruptRecordError, match="gzip"):
        list(read_tfrecord_pairs(str(gz)))


def test_tensorflow_parses_the_examples(tmp_path, pairs):
    """TensorFlow itself reads the TFRecords (the `[ci]` extra installs its CPU wheel; skipped without
    it unless S2NAIP_REQUIRE_TENSORFLOW or S2NAIP_REQUIRE_ALL is set)."""
    from tests.conftest import skip_unless_required

    try:
        import tensorflow as tf
    except ImportError as e:
        skip_unless_required(f"tensorflow is not installed ({e}): pip install -e '.[ci]'", "S2NAIP_REQUIRE_TENSORFLOW")
    write_tfrecords(tmp_path, pairs, compress=True)
    files = sorted(str(p) for p in (tmp_path / "tfrecord").iterdir())
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP")
    spec = example_proto.tf_parse_spec(tf)
    expected = by_id(as_stored(r) for r in pairs)
    n = 0
    for serialized in dataset:
        parsed = tf.io.parse_single_example(serialized, spec)
        want = expected[parsed["tile_id"].numpy().decode()]
        hr = tf.reshape(tf.io.decode_raw(parsed["hr"], tf.uint8), tf.sparse.to_dense(parsed["hr_shape"]))
        np.testing.assert_array_equal(hr.numpy(), records.decode_pair_arrays(want)[0])
        assert parsed["lr_index"].numpy() == want["lr_index"]
        assert tf.sparse.to_dense(parsed["candidate_indices"]).numpy().tolist() == want["candidate_indices"]
        np.testing.assert_array_equal(tf.sparse.to_dense(parsed["candidate_psnr"]).numpy(),
                                      np.float32(want["candidate_psnr"]))
        n += 1
    assert n == len(pairs)
    # and the bytes are TensorFlow's own serialization of the same message
    ours = example_proto.encode_example(pairs[0])
    assert tf.train.Example.FromString(ours).SerializeToString(deterministic=True) == ours


# ---------------------------------------------------------------------------------------------
# Readers


def test_parquet_reader_equals_tfrecord_reader(tmp_path, pairs):
    with TestPipeline(runner=RUNNER) as p:
        rows = p | beam.Create(pairs)
        rows | WriteParquet(str(tmp_path), "pairs", records.PAIR_SCHEMA, num_shards=2)
        rows | WriteTFRecords(str(tmp_path), num_shards=3)
    from_parquet = list(read_parquet_pairs(str(tmp_path / "pairs"), batch_size=1))
    assert len(from_parquet) == len(pairs)
    assert by_id(from_parquet) == by_id(read_tfrecord_pairs(str(tmp_path / "tfrecord" / "*.tfrecord")))
    assert by_id(from_parquet) == by_id(as_stored(r) for r in pairs)
    with pytest.raises(FileNotFoundError):
        list(read_parquet_pairs(str(tmp_path / "nothing")))


# ---------------------------------------------------------------------------------------------
# PNG layout


def test_png_layout(tmp_path, pairs):
    collider = make_record(naip_id=OTHER_NAIP_ID, x=35001, seed=9)  # same x_y as pairs[1], sorts first
    black = make_record(x=35100, seed=10)
    hr = records.decode_pair_arrays(black)[0].copy()
    hr[60, 70, :3] = 0  # one pure-black pixel, away from the border
    black["hr"] = hr.tobytes()
    inputs = [*pairs, collider, black]

    with TestPipeline(runner=RUNNER) as p:
        result = p | beam.Create(inputs) | WritePngLayout(str(tmp_path))
        assert_that(result.files, equal_to([str(tmp_path / "png" / "tracker.json")]), label="files")
        assert_that(result.rejects | beam.Map(lambda r: (r["tile_id"], r["stage"], r["reason"])),
                    equal_to([(pairs[1]["tile_id"], "select", "png_xy_collision")]), label="rejects")
        assert_that(result.black_pixel_tiles, equal_to([black["tile_id"]]), label="black")

    written = [r for r in inputs if r is not pairs[1]]
    png = tmp_path / "png"
    tracker = json.loads((png / "tracker.json").read_text())
    assert tracker == {r["tile_id"]: r["lr_index"] for r in written}
    naip_pngs = sorted(str(p.relative_to(png)) for p in (png / "naip").rglob("*.png"))
    assert naip_pngs == sorted(f"naip/{r['tile_id']}/rgb.png" for r in written)
    for r in written:
        hr, lr = records.decode_pair_arrays(r)
        xy = f"{r['tile_x']}_{r['tile_y']}"
        expect = {
            f"naip/{r['tile_id']}/rgb.png": ("RGB", hr[..., :3]),
            f"nir/naip/{r['tile_id']}/nir.png": ("L", hr[..., 3]),
            f"sentinel2/{xy}/tci.png": ("RGB", lr[..., :3]),
            f"sentinel2/{xy}/b08.png": ("L", lr[..., 3]),
        }
        for rel, (mode, array) in expect.items():
            with Image.open(png / rel) as im:
                assert im.mode == mode, rel
                np.testing.assert_array_equal(np.asarray(im), array, err_msg=rel)
    assert not list(png.rglob("*.tmp-*"))


def test_png_layout_rgb_bands_writes_no_nir(tmp_path):
    record = make_record(bands=3)
    with TestPipeline(runner=RUNNER) as p:
        result = p | beam.Create([record]) | WritePngLayout(str(tmp_path))
        assert_that(result.rejects, equal_to([]), label="rejects")
    png = tmp_path / "png"
    files = sorted(str(p.relative_to(png)) for p in png.rglob("*") if p.is_file())
    assert files == [f"naip/{record['tile_id']}/rgb.png", "sentinel2/35000_55000/tci.png", "tracker.json"]


def test_png_layout_of_no_pairs_writes_an_empty_tracker(tmp_path):
    with TestPipeline(runner=RUNNER) as p:
        p | beam.Create([]).with_output_types(dict) | WritePngLayout(str(tmp_path))
    assert json.loads((tmp_path / "png" / "tracker.json").read_text()) == {}


def test_has_black_pixel_needs_all_three_channels():
    hr = np.full((4, 4, 4), 10, np.uint8)
    hr[0, 0, :2] = 0
    hr[1, 1, 3] = 0  # NIR does not count
    assert not has_black_pixel(hr)
    hr[2, 2, :3] = 0
    assert has_black_pixel(hr)
