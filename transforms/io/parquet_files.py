"""Records -> Parquet files, one per bundle, named `<name>-SSSSS-of-NNNNN.parquet` at the end.

What Beam's `WriteToParquet` does with `num_shards=0`, in fewer steps: its `WriteImpl` adds an
initialising step (a temp folder, made on a worker), a GroupByKey and two more stages to finalise,
i.e. four stages of their own per table, each a bundle on every worker (~20-50 ms of fixed cost a
stage on a local runner), plus ~15 transforms to build and translate; and its record-to-Arrow step
appends every field of every row to Python lists. Here:

  WriteParquetFiles: records -> (fused with the producer) `ParquetBundleWriterDoFn`: each bundle's
      rows, 64 a record batch (`pyarrow.RecordBatch.from_pylist`), a row group per ~32 MiB, into one
      temp file `<folder>/temp-<uuid>.parquet.part` -> its path
  -> one finalising step (`finalize_files`, the temp paths as a side input): renames them to
      `<folder>/<name>-00000-of-0000N.parquet` in name order, deletes the part files of bundle
      attempts the runner discarded, writes one empty file (the schema, no row) when there was no
      record, and yields the final names.

Same schema, codec (zstd), row groups and file names as before: readers see the same tables.
A temp file is never a `.parquet` file, so a reader of the folder never takes a partial one. The
folder holds one table (the build's pairs/, rejects/, manifest/ ...): the finalising step deletes
every part file in it that its bundles did not commit. The
plain functions (`parquet_writer`, `finalize_files`, `shard_name`) are used by the DoFn and tested
without a pipeline.
"""
from __future__ import annotations

import uuid
from typing import Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from transforms.io import storage

TEMP_PREFIX = "temp-"
TEMP_SUFFIX = ".parquet.part"
MIME_TYPE = "application/x-parquet"


def shard_name(folder: str, name: str, index: int, count: int) -> str:
    """`<folder>/<name>-SSSSS-of-NNNNN.parquet`, Beam's shard name template of the build."""
    return storage.join(folder, f"{name}-{index:05d}-of-{count:05d}.parquet")


def temp_name(folder: str) -> str:
    return storage.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex}{TEMP_SUFFIX}")


def _create(path: str):
    if storage.is_local(path):
        storage.makedirs(path.rsplit("/", 1)[0])
        return open(path, "wb")
    return FileSystems.create(path, mime_type=MIME_TYPE)


def parquet_writer(path: str, schema, codec: str):
    """(the open file, a pyarrow ParquetWriter on it) for `path`: settings as Beam's `_ParquetSink`."""
    import pyarrow.parquet as pq

    f = _create(path)
    return f, pq.ParquetWriter(f, schema, compression=codec, use_deprecated_int96_timestamps=False,
                               use_compliant_nested_type=True)


def write_empty(path: str, schema, codec: str) -> None:
    f, writer = parquet_writer(path, schema, codec)
    with f:
        writer.close()


def _existing_temps(folder: str) -> list[str]:
    pattern = storage.join(folder, f"{TEMP_PREFIX}*{TEMP_SUFFIX}")
    try:
        return [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    except Exception:  # noqa: BLE001 - nothing matched (some filesystems raise instead of returning [])
        return []


def finalize_files(temps: Iterable[str], folder: str, name: str, schema, codec: str) -> list[str]:
    """The bundles' temp files -> the table's final files (module doc), renamed in name order.
    Safe to run again after a partial run (a retried finalising bundle): a temp file already
    renamed is skipped."""
    temps = sorted(set(temps))
    finals = [shard_name(folder, name, i, len(temps)) for i in range(len(temps))]
    for temp, final in zip(temps, finals):
        if storage.exists(temp) or not storage.exists(final):
            storage.move(temp, final)
    if not temps:
        finals = [shard_name(folder, name, 0, 1)]
        write_empty(finals[0], schema, codec)
    kept = set(temps)
    storage.delete([t for t in _existing_temps(folder) if t not in kept])  # attempts the runner dropped
    return finals


def finalize_once(_, temps: list[str], folder: str, name: str, schema, codec: str) -> list[str]:
    """finalize_files with the element first, for the finalising step's FlatMap."""
    return finalize_files(temps, folder, name, schema, codec)


class ParquetBundleWriterDoFn(beam.DoFn):
    """Rows (dicts) -> one temp Parquet file per bundle; yields its path at the bundle's end."""

    def __init__(self, folder: str, schema, codec: str, row_group_bytes: int, record_batch: int):
        self.folder, self.schema, self.codec = folder, schema, codec
        self.row_group_bytes, self.record_batch = row_group_bytes, record_batch

    def start_bundle(self):
        self._rows: list[dict] = []
        self._batches: list = []
        self._batch_bytes = 0
        self._file = self._writer = self._path = None

    def process(self, row: dict):
        self._rows.append(row)
        if len(self._rows) >= self.record_batch:
            self._flush_rows()

    def _flush_rows(self) -> None:
        import pyarrow as pa

        batch = pa.RecordBatch.from_pylist(self._rows, schema=self.schema)
        self._rows = []
        self._batches.append(batch)
        self._batch_bytes += batch.nbytes
        if self._batch_bytes >= self.row_group_bytes:
            self._write_row_group()

    def _write_row_group(self) -> None:
        import pyarrow as pa

        if self._writer is None:
            self._path = temp_name(self.folder)
            self._file, self._writer = parquet_writer(self._path, self.schema, self.codec)
        self._writer.write_table(pa.Table.from_batches(self._batches, schema=self.schema))
        self._batches, self._batch_bytes = [], 0

    def finish_bundle(self):
        if self._rows:
            self._flush_rows()
        if self._batches:
            self._write_row_group()
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        path, self._file, self._writer = self._path, None, None
        yield GlobalWindows.windowed_value(path)


class WriteParquetFiles(beam.PTransform):
    """Records -> `<folder>/<name>-SSSSS-of-NNNNN.parquet`, one file per bundle (module doc);
    yields the final file names."""

    def __init__(self, folder: str, name: str, schema, codec: str = "zstd",
                 row_group_bytes: int = 32 * 1024 * 1024, record_batch: int = 64):
        super().__init__()
        self.folder, self.name, self.schema, self.codec = folder, name, schema, codec
        self.row_group_bytes, self.record_batch = row_group_bytes, record_batch

    def expand(self, rows):
        temps = rows | "WriteBundles" >> beam.ParDo(ParquetBundleWriterDoFn(
            self.folder, self.schema, self.codec, self.row_group_bytes, self.record_batch))
        return (
            rows.pipeline
            | "Once" >> beam.Create([None])
            | "Finalize" >> beam.FlatMap(finalize_once, temps=beam.pvalue.AsList(temps), folder=self.folder,
                                         name=self.name, schema=self.schema, codec=self.codec)
        )
