"""The project's readers of its pair outputs, local or gs://, without TensorFlow.

`read_parquet_pairs` and `read_tfrecord_pairs` yield the same dicts for the same pair: the Parquet
row as `pyarrow` returns it (`records.PAIR_SCHEMA` order, str/int/float/bytes/lists). Both stream
(a row group, a record at a time), so a shard of any size reads in bounded memory. The columns'
meanings: docs/outputs.md; `lr` is [32, 32, C] or, from a build with --lr-timesteps N > 1,
[N, 32, 32, C] (`records.lr_timesteps` gives both as [N, 32, 32, C]; `lr_indices` of older files
reads as [lr_index]) (`candidate_indices` is best first by the build's mode's ranking: PSNR,
or gap-free correlation in robust).
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from typing import BinaryIO, Iterator

import google_crc32c
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms import records
from transforms.io import example_proto, storage

_GLOB_CHARS = "*?["


class CorruptRecordError(ValueError):
    """A TFRecord whose framing or checksum is wrong, or that ends early."""


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def iter_tfrecords(stream: BinaryIO, name: str = "<stream>") -> Iterator[bytes]:
    """The records of a TFRecord stream: uint64 length, masked CRC of the length, data, masked CRC
    of the data (little-endian). Raises CorruptRecordError on a checksum mismatch or truncation."""
    index = 0
    while True:
        header = stream.read(12)
        if not header:
            return
        if len(header) < 12:
            raise CorruptRecordError(f"{name}: record {index}: truncated header")
        length, length_crc = struct.unpack("<QI", header)
        if masked_crc32c(header[:8]) != length_crc:
            raise CorruptRecordError(f"{name}: record {index}: length checksum mismatch")
        body = stream.read(length + 4)
        if len(body) < length + 4:
            raise CorruptRecordError(f"{name}: record {index}: truncated data")
        data, (data_crc,) = body[:length], struct.unpack("<I", body[length:])
        if masked_crc32c(data) != data_crc:
            raise CorruptRecordError(f"{name}: record {index}: data checksum mismatch")
        yield data
        index += 1


def match_files(path_or_glob: str, suffixes: tuple[str, ...]) -> list[str]:
    """Sorted files: those a glob matches, a folder's files ending in one of `suffixes`, or one file."""
    if any(c in path_or_glob for c in _GLOB_CHARS):
        patterns = [path_or_glob]
    elif storage.exists(path_or_glob) and not os.path.isdir(path_or_glob):
        return [path_or_glob]
    else:
        patterns = [storage.join(path_or_glob, f"*{suffix}") for suffix in suffixes]
    files = sorted({m.path for result in FileSystems.match(patterns) for m in result.metadata_list})
    if not files:
        raise FileNotFoundError(f"no file matches {' or '.join(patterns)}")
    return files


def read_tfrecord_pairs(path_or_glob: str) -> Iterator[dict]:
    """Pair records from `.tfrecord` / `.tfrecord.gz` files (a folder, a glob or a file), decoded
    back to the Parquet row of each pair. Gzip is recognised by the `.gz` suffix, as Beam does."""
    classes = example_proto.message_classes()
    for path in match_files(path_or_glob, (".tfrecord", ".tfrecord.gz")):
        with storage.open_file(path) as raw:
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
            try:
                for data in iter_tfrecords(stream, path):
                    yield _filled(example_proto.decode_example(data, classes))
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                raise CorruptRecordError(f"{path}: bad gzip stream: {e}") from e


def read_parquet_pairs(path_or_glob: str, batch_size: int = 64) -> Iterator[dict]:
    """Pair rows from `.parquet` files (a folder, a glob or a file), `batch_size` rows at a time."""
    for path in match_files(path_or_glob, (".parquet",)):
        with storage.open_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
                for row in batch.to_pylist():
                    # columns newer than the file (records.LATER_COLUMNS) read as null
                    yield _filled({name: row.get(name) for name in records.PAIR_SCHEMA.names} | {
                        k: v for k, v in row.items() if k not in records.PAIR_SCHEMA.names})


def _filled(row: dict) -> dict:
    """Rows older than the lr_indices column wrote one timestep: lr_indices reads as [lr_index]."""
    if row.get("lr_indices") is None and row.get("lr_index") is not None:
        row["lr_indices"] = [row["lr_index"]]
    return row


def as_stored(record: dict, schema: pa.Schema = records.PAIR_SCHEMA) -> dict:
    """A record as every sink stores and every reader returns it: values cast to the schema's types
    (float32 columns rounded to float32), in schema order."""
    return pa.Table.from_pylist([record], schema=schema).to_pylist()[0]

