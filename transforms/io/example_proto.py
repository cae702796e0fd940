"""`tf.train.Example` without TensorFlow, and the one mapping of pair records to Example features.

The messages are TensorFlow's `tensorflow.Example`, `Features`, `Feature`, `BytesList`, `FloatList`
and `Int64List` (core/example/example.proto and feature.proto): same full names, field numbers and
packing, so the bytes are what `tf.train.Example.SerializeToString()` would give and
`tf.io.parse_single_example` reads them. Their descriptors are built at import from
`descriptor_pb2` in a private descriptor pool (no protoc step, no clash with TensorFlow's own pool
when both are imported); `message_classes()` makes the classes (a DoFn calls it in `setup`).

The feature of each column is derived from `records.PAIR_SCHEMA`, so a new column reaches every
sink and reader: strings and binaries -> bytes, integers (also list<int32>) -> int64, floats ->
float. `feature_spec()` describes it (name -> kind, length) for a `tf.data` parse spec. What each
column means: docs/outputs.md (e.g. `candidate_indices` is in PSNR order in the paper and
companion modes only; robust ranks its top-k by gap-free correlation).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import pyarrow as pa
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from transforms import records

_F = descriptor_pb2.FieldDescriptorProto


def _field(name: str, number: int, type_: int, *, type_name: str = "", repeated: bool = False,
           packed: bool = False, oneof_index: int | None = None) -> _F:
    field = _F(name=name, number=number, type=type_,
               label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if type_name:
        field.type_name = type_name
    if packed:
        field.options.packed = True
    if oneof_index is not None:
        field.oneof_index = oneof_index
    return field


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """feature.proto and example.proto's messages (without SequenceExample) in one proto3 file."""
    f = descriptor_pb2.FileDescriptorProto(
        name="s2naip/tensorflow_example.proto", package="tensorflow", syntax="proto3")
    f.message_type.add(name="BytesList").field.append(_field("value", 1, _F.TYPE_BYTES, repeated=True))
    f.message_type.add(name="FloatList").field.append(
        _field("value", 1, _F.TYPE_FLOAT, repeated=True, packed=True))
    f.message_type.add(name="Int64List").field.append(
        _field("value", 1, _F.TYPE_INT64, repeated=True, packed=True))
    feature = f.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate(
        [("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")], start=1
    ):
        feature.field.append(_field(name, number, _F.TYPE_MESSAGE, type_name=f".tensorflow.{type_name}",
                                    oneof_index=0))
    features = f.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.append(_field("key", 1, _F.TYPE_STRING))
    entry.field.append(_field("value", 2, _F.TYPE_MESSAGE, type_name=".tensorflow.Feature"))
    features.field.append(_field("feature", 1, _F.TYPE_MESSAGE, repeated=True,
                                 type_name=".tensorflow.Features.FeatureEntry"))
    f.message_type.add(name="Example").field.append(
        _field("features", 1, _F.TYPE_MESSAGE, type_name=".tensorflow.Features"))
    return f


POOL = descriptor_pool.DescriptorPool()
POOL.Add(_file_descriptor())


class MessageClasses(NamedTuple):
    Example: type
    Features: type
    Feature: type
    BytesList: type
    FloatList: type
    Int64List: type


@functools.cache
def message_classes() -> MessageClasses:
    """The message classes, made once per process from the private pool."""
    return MessageClasses(*(
        message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"tensorflow.{name}"))
        for name in MessageClasses._fields
    ))


# ---------------------------------------------------------------------------------------------
# Schema -> features


class FeatureSpec(NamedTuple):
    kind: str  # "bytes", "int64" or "float": the Feature's list type
    length: int | None  # 1 for a scalar column (one value), None for a list column (any length)


class _Column(NamedTuple):
    name: str
    spec: FeatureSpec
    text: bool  # string (UTF-8) rather than binary, for bytes features


def _column(field: pa.Field) -> _Column:
    type_, length = field.type, 1
    if pa.types.is_list(type_):
        type_, length = type_.value_type, None
    if pa.types.is_string(type_) or pa.types.is_binary(type_):
        kind = "bytes"
    elif pa.types.is_integer(type_):
        kind = "int64"
    elif pa.types.is_floating(type_):
        kind = "float"
    else:
        raise TypeError(f"column {field.name!r}: no Example feature for Arrow type {field.type}")
    return _Column(field.name, FeatureSpec(kind, length), pa.types.is_string(type_))


PAIR_COLUMNS = tuple(_column(field) for field in records.PAIR_SCHEMA)
_LIST_FIELD = {"bytes": "bytes_list", "int64": "int64_list", "float": "float_list"}


def feature_spec() -> dict[str, FeatureSpec]:
    """Column name -> FeatureSpec(kind, length) of every pair column, in schema order."""
    return {c.name: c.spec for c in PAIR_COLUMNS}


def tf_parse_spec(tf) -> dict:
    """`feature_spec()` as the features argument of `tf.io.parse_single_example` / `parse_example`
    (`tf` is the imported tensorflow module): scalars FixedLenFeature([]), lists VarLenFeature."""
    dtypes = {"bytes": tf.string, "int64": tf.int64, "float": tf.float32}
    # scalar columns that may be null (absent from the Example) parse to a default instead of failing
    defaults = {"bytes": b"", "int64": -1, "float": float("nan")}
    optional = set(records.LATER_COLUMNS)

    def scalar(name, kind):
        if name in optional:
            return tf.io.FixedLenFeature([], dtypes[kind], default_value=defaults[kind])
        return tf.io.FixedLenFeature([], dtypes[kind])

    return {
        name: scalar(name, s.kind) if s.length == 1 else tf.io.VarLenFeature(dtypes[s.kind])
        for name, s in feature_spec().items()
    }


def encode_example(record: dict, classes: MessageClasses | None = None) -> bytes:
    """A pair record -> serialized tensorflow.Example (deterministic: map keys sorted). A None value
    leaves its feature out."""
    example = (classes or message_classes()).Example()
    features = example.features.feature
    for column in PAIR_COLUMNS:
        value = record[column.name]
        if value is None:
            continue
        values = getattr(features[column.name], _LIST_FIELD[column.spec.kind])
        values.SetInParent()  # an empty list is still a feature of its kind
        if column.spec.length == 1:
            value = [value]
        if column.text:
            value = [v.encode("utf-8") for v in value]
        values.value.extend(value)
    return example.SerializeToString(deterministic=True)


def decode_example(data: bytes, classes: MessageClasses | None = None) -> dict:
    """A serialized Example -> the pair record as the Parquet reader returns it (schema order, str
    for strings, int/float scalars, lists for list columns, None for an absent feature)."""
    features = (classes or message_classes()).Example.FromString(data).features.feature
    record = {}
    for column in PAIR_COLUMNS:
        if column.name not in features:
            record[column.name] = None
            continue
        feature = features[column.name]
        kind = feature.WhichOneof("kind")
        if kind != _LIST_FIELD[column.spec.kind]:
            raise ValueError(f"feature {column.name!r} is {kind}, expected {_LIST_FIELD[column.spec.kind]}")
        values = list(getattr(feature, kind).value)
        if column.text:
            values = [v.decode("utf-8") for v in values]
        if column.spec.length == 1:
            if len(values) != 1:
                raise ValueError(f"feature {column.name!r} has {len(values)} values, expected 1")
            values = values[0]
        record[column.name] = values
    return record
