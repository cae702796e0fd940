"""The build's Parquet writer (transforms.io.parquet_files): one file per bundle, then one finalising
step; the same tables, schema and file names as Beam's WriteToParquet, every record written once."""
import glob
import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.test_sinks import make_record
from transforms import records
from transforms.build.stages import PARQUET_RECORD_BATCH, PARQUET_ROW_GROUP_BYTES, WriteParquet
from transforms.io import parquet_files as PF

RUNNER = "FnApiRunner"


@pytest.fixture(scope="module")
def pairs():
    return [make_record(x=36000 + i, seed=i, t=3) for i in range(70)]  # more than one record batch


def read_folder(folder) -> pa.Table:
    files = sorted(glob.glob(os.path.join(folder, "*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("tile_id")


def left_over(folder) -> list[str]:
    return [n for n in os.listdir(folder) if not n.endswith(".parquet")]


def test_files_hold_the_same_table_as_beams_write_to_parquet(tmp_path, pairs):
    with TestPipeline(runner=RUNNER) as p:
        rows = p | beam.Create(pairs)
        files = rows | WriteParquet(str(tmp_path / "ours"), "pairs", records.PAIR_SCHEMA)
        rows | beam.io.WriteToParquet(str(tmp_path / "beam" / "pairs" / "pairs"), schema=records.PAIR_SCHEMA,
                                      codec="zstd", file_name_suffix=".parquet", shard_name_template="-SSSSS-of-NNNNN",
                                      row_group_buffer_size=PARQUET_ROW_GROUP_BYTES,
                                      record_batch_size=PARQUET_RECORD_BATCH)
        assert_that(files, equal_to([str(tmp_path / "ours" / "pairs" / "pairs-00000-of-00001.parquet")]))
    ours, theirs = read_folder(tmp_path / "ours" / "pairs"), read_folder(tmp_path / "beam" / "pairs")
    assert ours.num_rows == len(pairs)
    assert ours.schema.equals(theirs.schema, check_metadata=False)
    assert ours.equals(theirs)
    assert ours.column("tile_id").to_pylist() == sorted(r["tile_id"] for r in pairs)
    assert left_over(tmp_path / "ours" / "pairs") == []


def test_every_record_once_over_several_bundles_and_row_groups(tmp_path, pairs):
    options = PipelineOptions(direct_num_workers=2, direct_running_mode="multi_threading")
    folder = str(tmp_path / "pairs")
    with TestPipeline(runner=RUNNER, options=options) as p:
        files = (p | beam.Create(pairs) | beam.Reshuffle()
                 | PF.WriteParquetFiles(folder, "pairs", records.PAIR_SCHEMA, row_group_bytes=1, record_batch=8))
        assert_that(files | beam.Map(os.path.basename) | beam.Map(lambda n: n.rsplit("-", 1)[0]),
                    lambda names: len(set(names)) == 1 and names[0].startswith("pairs-"))
    names = sorted(os.listdir(folder))
    assert len(names) >= 2  # two workers: a bundle each, a file per bundle
    assert names == [f"pairs-{i:05d}-of-{len(names):05d}.parquet" for i in range(len(names))]
    table = read_folder(folder)
    assert sorted(table.column("tile_id").to_pylist()) == sorted(r["tile_id"] for r in pairs)
    # row_group_bytes=1: every record batch of 8 rows closes a row group
    assert sum(pq.ParquetFile(os.path.join(folder, n)).metadata.num_row_groups for n in names) >= len(pairs) // 8


def test_no_record_writes_one_empty_file_with_the_schema(tmp_path):
    with TestPipeline(runner=RUNNER) as p:
        files = p | beam.Create([]) | WriteParquet(str(tmp_path), "rejects", records.REJECT_SCHEMA)
        assert_that(files, equal_to([str(tmp_path / "rejects" / "rejects-00000-of-00001.parquet")]))
    table = pq.read_table(tmp_path / "rejects" / "rejects-00000-of-00001.parquet")
    assert table.num_rows == 0 and table.schema.equals(records.REJECT_SCHEMA, check_metadata=False)


def write_temp(folder: str, rows: list[dict]) -> str:
    path = PF.temp_name(folder)
    f, writer = PF.parquet_writer(path, records.PAIR_SCHEMA, "zstd")
    with f:
        writer.write_table(pa.Table.from_pylist(rows, schema=records.PAIR_SCHEMA))
        writer.close()
    return path


def test_finalize_renames_in_order_drops_discarded_attempts_and_can_run_again(tmp_path, pairs):
    folder = str(tmp_path / "pairs")
    temps = [write_temp(folder, pairs[:3]), write_temp(folder, pairs[3:5])]
    discarded = write_temp(folder, pairs[5:6])  # a bundle attempt the runner retried: not in the list
    finals = PF.finalize_files(temps, folder, "pairs", records.PAIR_SCHEMA, "zstd")
    assert finals == [f"{folder}/pairs-00000-of-00002.parquet", f"{folder}/pairs-00001-of-00002.parquet"]
    assert sorted(os.listdir(folder)) == [os.path.basename(f) for f in finals]
    assert not os.path.exists(discarded)
    by_temp_order = [pq.read_table(f).column("tile_id").to_pylist() for f in finals]
    expected = [[r["tile_id"] for r in rows] for _, rows in sorted(zip(temps, [pairs[:3], pairs[3:5]]))]
    assert by_temp_order == expected
    # a retried finalising bundle finds its files already renamed: the same result, nothing lost
    assert PF.finalize_files(temps, folder, "pairs", records.PAIR_SCHEMA, "zstd") == finals
    assert read_folder(folder).num_rows == 5
    # a temp file that is neither there nor renamed is an error, never a silently smaller table
    with pytest.raises(OSError):
        PF.finalize_files([*temps, PF.temp_name(folder)], str(tmp_path / "other"), "pairs", records.PAIR_SCHEMA,
                          "zstd")


def test_fixed_shard_count_still_writes_exactly_n_files(tmp_path, pairs):
    with TestPipeline(runner=RUNNER) as p:
        p | beam.Create(pairs[:10]) | WriteParquet(str(tmp_path), "pairs", records.PAIR_SCHEMA, num_shards=3)
    names = sorted(os.listdir(tmp_path / "pairs"))
    assert names == [f"pairs-{i:05d}-of-00003.parquet" for i in range(3)]
    assert read_folder(tmp_path / "pairs").num_rows == 10
