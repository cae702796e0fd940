"""The dataset manifest: one row per input tile of a build, and the pure rules of an increment.

Every build writes `<output>/manifest/manifest-SSSSS-of-NNNNN.parquet` (listed in `_SUCCESS`),
`MANIFEST_SCHEMA`, one row per unique input tile id:

| column | meaning |
| --- | --- |
| `tile_id`, `naip_id`, `tile_xy` | the id and its parts (`naip_id`, `tile_xy` null for an invalid id) |
| `fp_rgb`, `fp_nir`, `fp_tci`, `fp_b08`, `fp_extra` | input fingerprints (`transforms.build.fingerprints`) |
| `options_hash` | sha256 of the output-relevant options (`output_options`) |
| `correction` | the corrections entry applied to the tile (`correction_text`), null if none |
| `outcome` | `pair`, `reject`, `superseded` or `removed` |
| `reason` | the reject reason; for `superseded`, `superseded by <tile id>`; null for a pair |
| `computed_in` | the run folder whose pipeline computed the record (a carried row keeps its own) |

`superseded` and `removed` rows ("retired") describe tiles of the previous run that are no longer
in the input: the chip now has another capture (`superseded`), or nothing (`removed`). Their record
is not in this run's `pairs/`/`rejects/` (it still is in `computed_in`'s). A retired row is recorded
once, in the run that retired it; the next run does not carry it again (a tile that comes back is
new).

`options_hash` covers what changes a record: the selection mode and all its parameters (alpha,
top-k, the resolved downsampling, border rule), bands, split, the pipeline version and the record
schema (`record_schema_id`); not the output formats or shard counts, nor the corrections files (a
correction is per tile: adding a tile to a corrections file rebuilds that tile only). Input roots
are not in it either: a dataset moved to another bucket is recognised by its fingerprints (reject
details of carried rejects may then still name the old root).

A previous reject for a transient reason (`RETRY_REASONS`: read_error, internal_error) is never
carried: the tile is rebuilt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pyarrow as pa

from transforms.build import fingerprints as fp
from transforms.io import publish, storage
from transforms.tiles import InvalidTileId, TileId

MANIFEST_FOLDER = "manifest"
OUTCOMES = ("pair", "reject", "superseded", "removed")
RETIRED = ("superseded", "removed")
PLANS = ("new", "changed", "unchanged")

MANIFEST_SCHEMA = pa.schema(
    [
        ("tile_id", pa.string()),
        ("naip_id", pa.string()),
        ("tile_xy", pa.string()),
        *[(name, pa.string()) for name in fp.FIELDS],
        ("options_hash", pa.string()),
        ("correction", pa.string()),
        ("outcome", pa.string()),
        ("reason", pa.string()),
        ("computed_in", pa.string()),
    ]
)
FIELDS = tuple(MANIFEST_SCHEMA.names)


# ---------------------------------------------------------------------------------------------
# Options and corrections


def record_schema_id() -> str:
    """A short hash of the pair and reject schemas: records of another schema (a column added
    without a version bump) are never carried into this one."""
    from transforms import records

    text = "\n".join(schema.to_string(show_schema_metadata=False)
                     for schema in (records.PAIR_SCHEMA, records.REJECT_SCHEMA))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def output_options(config) -> dict:
    """The options of a `pairs.PairConfig` that change a tile's record (every SelectionConfig field,
    lr_timesteps and allow_fewer included,
    the downsampling resolved; bands; split), the pipeline version and the record schema."""
    from transforms.version import PIPELINE_VERSION

    selection = dataclasses.asdict(config.selection)
    selection["downsample"] = config.selection.downsample_method
    return {
        "selection": selection.pop("mode"),
        **selection,
        "bands": config.bands,
        "split": config.split,
        "pipeline_version": PIPELINE_VERSION,
        "record_schema": record_schema_id(),
    }


def options_hash(options: dict) -> str:
    """sha256 (hex) of the canonical JSON of `options` (sorted keys, no whitespace)."""
    text = json.dumps(options, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def config_options_hash(config) -> str:
    return options_hash(output_options(config))


def correction_text(correction) -> str | None:
    """A `corrections.Correction` as the manifest stores it: canonical JSON of its value and source
    file (the file is quoted in the reject details it causes, so it is part of the record), or None."""
    if correction is None:
        return None
    return json.dumps({"value": correction.value, "source": correction.source}, sort_keys=True,
                      separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# Rows


def tile_parts(tile_id: str) -> tuple[str | None, str | None]:
    """(naip_id, x_y) of a valid id, (None, None) otherwise."""
    try:
        tile = TileId.parse(tile_id)
    except InvalidTileId:
        return None, None
    return tile.naip_id, tile.xy


def manifest_row(tile_id: str, fps, options_hash_: str, correction: str | None, outcome: str,
                 reason: str | None, computed_in: str) -> dict:
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown manifest outcome {outcome!r}")
    naip_id, xy = tile_parts(tile_id)
    return {
        "tile_id": tile_id,
        "naip_id": naip_id,
        "tile_xy": xy,
        **fp.as_dict(tuple(fps)),
        "options_hash": options_hash_,
        "correction": correction,
        "outcome": outcome,
        "reason": reason,
        "computed_in": computed_in,
    }


def row_fingerprints(row: dict) -> tuple:
    return tuple(row.get(name) for name in fp.FIELDS)


def to_tuple(row: dict) -> tuple:
    """A row as a plain tuple (FIELDS order): what the shuffles carry."""
    return tuple(row.get(name) for name in FIELDS)


def from_tuple(values) -> dict:
    return dict(zip(FIELDS, values))


# ---------------------------------------------------------------------------------------------
# The increment


# Reject reasons that say nothing about the inputs (storage failed, or a bug): never carried forward.
RETRY_REASONS = frozenset({"read_error", "internal_error"})


def plan_increment(previous_row: dict | None, fingerprints, options_hash_: str, correction: str | None) -> str:
    """What to do with a tile in the current input: 'new' (no usable previous record), 'changed'
    (an input fingerprint, the options or the tile's correction differ, a fingerprint is an error,
    or the previous record is a reject of a transient kind, RETRY_REASONS) or 'unchanged' (its
    previous record is carried forward)."""
    if previous_row is None or previous_row.get("outcome") not in ("pair", "reject"):
        return "new"
    if previous_row.get("outcome") == "reject" and previous_row.get("reason") in RETRY_REASONS:
        return "changed"
    current = tuple(fingerprints)
    previous = row_fingerprints(previous_row)
    if any(fp.is_error(v) for v in current + previous):
        return "changed"
    if current != previous:
        return "changed"
    if previous_row.get("options_hash") != options_hash_:
        return "changed"
    if previous_row.get("correction") != correction:
        return "changed"
    return "unchanged"


def capture_date(naip_id: str) -> str:
    """The capture date YYYYMMDD a NAIP id ends with."""
    return naip_id.rsplit("_", 1)[-1]


def replacement(previous_naip_id: str, current_naip_ids) -> str | None:
    """The capture that replaces `previous_naip_id` on its chip: among the other current ids of the
    same x_y, the latest capture (then the greatest id); None when there is none."""
    others = sorted({n for n in current_naip_ids if n and n != previous_naip_id},
                    key=lambda n: (capture_date(n), n))
    return others[-1] if others else None


def retire(previous_row: dict, current_naip_ids) -> dict:
    """The manifest row of a previous tile that is no longer in the input: 'superseded' (reason
    names the replacing tile id) when another capture of its x_y is in the input, else 'removed'.
    Fingerprints, options, correction and computed_in stay those of its record."""
    row = dict(previous_row)
    xy = previous_row.get("tile_xy")
    new = replacement(previous_row.get("naip_id"), current_naip_ids) if xy else None
    if new is not None:
        row["outcome"], row["reason"] = "superseded", f"superseded by {new}/{xy}"
    else:
        row["outcome"], row["reason"] = "removed", "no longer in the input"
    return row


# ---------------------------------------------------------------------------------------------
# Reading a published run


class IncompleteRun(FileNotFoundError):
    """A run folder without `_SUCCESS`: never used as a base."""


def success_files(run_dir: str) -> list[str]:
    """The data files of a complete run (its `_SUCCESS` list); IncompleteRun without `_SUCCESS`."""
    success = publish.read_success(run_dir)
    if success is None:
        raise IncompleteRun(f"{run_dir} holds no complete run (no {publish.SUCCESS}); "
                            "--since needs a published run")
    return list(success.get("files", []))


def _files_in(run_dir: str, folder: str) -> list[str]:
    """The `_SUCCESS`-listed `.parquet` files of `folder`, resolved against `run_dir` (by their last
    two path parts, so that a run folder copied or moved elsewhere still reads its own files)."""
    out = []
    for f in success_files(run_dir):
        parts = f.rstrip("/").rsplit("/", 2)
        if len(parts) == 3 and parts[1] == folder and parts[2].endswith(".parquet"):
            out.append(storage.join(run_dir, folder, parts[2]))
    return sorted(out)


def manifest_files(run_dir: str) -> list[str]:
    """The manifest files of a complete run; IncompleteRun when the run has no manifest (it was
    built before manifests existed, or by another command)."""
    files = _files_in(run_dir, MANIFEST_FOLDER)
    if not files:
        raise IncompleteRun(f"{run_dir} has no {MANIFEST_FOLDER}/ in its {publish.SUCCESS}: "
                            "rebuild it once without --since")
    return files


def record_files(run_dir: str) -> list[tuple[str, str]]:
    """[(table, file)] of a complete run's pairs and rejects Parquet files, table 'pairs'|'rejects'."""
    return [(table, f) for table in ("pairs", "rejects") for f in _files_in(run_dir, table)]


def read_manifest(run_dir: str, columns: list[str] | None = None) -> pa.Table:
    """The whole manifest of a complete run as one Arrow table (for tools and tests; the pipeline
    reads it in shards on the workers)."""
    import pyarrow.parquet as pq

    tables = []
    for path in manifest_files(run_dir):
        with storage.open_file(path) as f:
            tables.append(pq.read_table(f, columns=columns))
    schema = MANIFEST_SCHEMA if columns is None else pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
    return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()


def is_complete(run_dir: str) -> bool:
    return storage.exists(storage.join(run_dir, publish.SUCCESS))
