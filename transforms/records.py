"""The one schema of the outputs: pair rows, reject rows, and their Arrow schemas.

Every sink and reader uses these definitions; docs/outputs.md (and the README's short table)
documents them.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from transforms.selection import Selection
from transforms.tiles import ZOOM, TileId
from transforms.version import PIPELINE_VERSION

# Stages and reasons of reject records (docs/outputs.md documents this vocabulary).
REJECT_REASONS = {
    "invalid_tile_id": "the id does not match <naip_id>/<x>_<y> (never touches a path)",
    "duplicate_tile_id": "the id appeared earlier in the same input; the first one is processed",
    "missing_hr": "naip/<naip_id>/<x>_<y>/rgb.png does not exist",
    "missing_s2": "sentinel2/<x>_<y>/ has none of the needed band files",
    "missing_band": "sentinel2/<x>_<y>/ lacks a needed band file (tci, or b08 for rgbn)",
    "missing_nir": "the NAIP NIR nir.png does not exist (only with --bands rgbn)",
    "decode_error": "a PNG is corrupt, truncated or not a PNG",
    "bad_dtype": "a PNG is not 8-bit, or is a palette image",
    "bad_shape": "wrong width/height/channels, or band files with different timestep counts",
    "image_too_large": "the PNG header or file size exceeds the limits (not decoded)",
    "read_error": "the storage layer failed to read a file after retries",
    "naip_black_border": "the NAIP RGB has more than 1 black pixel in its 2-px border",
    "no_valid_timesteps": "every Sentinel-2 timestep has a black border",
    "too_few_timesteps": "--lr-timesteps N: fewer than N acceptable timesteps (the mode's top-k; robust: "
                         "those whose evidence passes, selection.acceptable); --allow-fewer writes them instead",
    "internal_error": "an unexpected error in the per-tile core (a bug: please report)",
    "removed_by_correction": "a --corrections file maps the tile to null: removed by a reviewer",
    "bad_correction": "a --corrections entry is not a timestep index, is out of range, or names a "
                      "black-bordered timestep",
    "png_xy_collision": "png layout only: a pair on the same <x>_<y> whose tile id sorts first owns "
                        "png/sentinel2/<x>_<y>/; this pair is left out of png/ (parquet/tfrecord keep it)",
}
REJECT_STAGES = ("manifest", "read", "prefilter", "select")

# Evidence columns: per candidate (aligned with candidate_indices) and of the chosen timestep, each
# the name of an `evidence.Evidence` field or property.
EVIDENCE_LISTS = {
    "candidate_distance": "distance",
    "candidate_haze": "haze",
    "candidate_dark_channel": "dark_channel",
    "candidate_cloud": "cloud",
    "candidate_shadow": "shadow",
    "candidate_snow": "snow",
    "candidate_cirrus": "cirrus",
    "candidate_aerosol": "aerosol",
    "candidate_shift_px": "shift_px",
    "candidate_shift_peak": "shift_peak",
    "candidate_misregistration_px": "misregistration_px",
    "candidate_veil": "veil",
    "candidate_cloud_prob": "cloud_prob",
}
EVIDENCE_SCALARS = {
    "lr_haze": "haze",
    "lr_dark_channel": "dark_channel",
    "lr_cloud": "cloud",
    "lr_shadow": "shadow",
    "lr_snow": "snow",
    "lr_cirrus": "cirrus",
    "lr_aerosol": "aerosol",
    "lr_shift_px": "shift_px",
    "lr_shift_peak": "shift_peak",
    "lr_misregistration_px": "misregistration_px",
    "lr_veil": "veil",
    "lr_cloud_prob": "cloud_prob",
}
EVIDENCE_COLUMNS = (*EVIDENCE_LISTS, *EVIDENCE_SCALARS, "evidence_bands", "evidence_note")
# Columns added after the first release: null in a record that lacks them (older outputs); the
# readers fill them in, so every reader returns every column of PAIR_SCHEMA.
LATER_COLUMNS = ("confidence", "lr_indices", *EVIDENCE_COLUMNS)

PAIR_SCHEMA = pa.schema(
    [
        ("tile_id", pa.string()),
        ("naip_id", pa.string()),
        ("tile_x", pa.int32()),
        ("tile_y", pa.int32()),
        ("zoom", pa.int8()),
        ("split", pa.string()),
        ("hr", pa.binary()),
        ("lr", pa.binary()),
        ("hr_shape", pa.list_(pa.int32())),
        ("lr_shape", pa.list_(pa.int32())),
        ("lr_index", pa.int32()),
        # the written timesteps, best first (lr_indices[0] == lr_index); lr is [N, 32, 32, C] when
        # the build asked for --lr-timesteps N > 1, else [32, 32, C]; the HR is histogram-matched to
        # the first. Older outputs lack it: readers fill in [lr_index]
        ("lr_indices", pa.list_(pa.int32())),
        ("n_timesteps", pa.int32()),
        ("valid_indices", pa.list_(pa.int32())),
        # the top-k timesteps the mode scored, best first by its ranking: PSNR against the
        # downsampled HR (paper, companion) or gap-free correlation with it (robust: not PSNR order);
        # psnr and scores aligned with them, scores in the build's mode (lower is better)
        ("candidate_indices", pa.list_(pa.int32())),
        ("candidate_psnr", pa.list_(pa.float32())),
        ("candidate_scores", pa.list_(pa.float32())),
        ("psnr", pa.float32()),
        ("score", pa.float32()),
        ("selection", pa.string()),
        ("alpha", pa.float32()),
        ("pipeline_version", pa.string()),
        ("confidence", pa.float32()),  # selection.pair_confidence; null for manual choices
    ]
    # Evidence of the robust selection, null in the other modes (docs/selection-modes.md).
    + [(name, pa.list_(pa.float32())) for name in EVIDENCE_LISTS]
    + [(name, pa.float32()) for name in EVIDENCE_SCALARS]
    + [("evidence_bands", pa.list_(pa.string())), ("evidence_note", pa.string())]
)

REJECT_SCHEMA = pa.schema(
    [
        ("tile_id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


def pair_record(
    tile: TileId,
    selection: Selection,
    *,
    n_timesteps: int,
    split: str,
    mode: str,
    alpha: float,
    evidence_note: str | None = None,
) -> dict:
    hr = np.ascontiguousarray(selection.hr_matched, dtype=np.uint8)
    lr = np.ascontiguousarray(selection.lr, dtype=np.uint8)
    return {
        "tile_id": str(tile),
        "naip_id": tile.naip_id,
        "tile_x": tile.x,
        "tile_y": tile.y,
        "zoom": ZOOM,
        "split": split,
        "hr": hr.tobytes(),
        "lr": lr.tobytes(),
        "hr_shape": list(hr.shape),
        "lr_shape": list(lr.shape),
        "lr_index": selection.lr_index,
        "lr_indices": [selection.lr_index] if selection.lr_indices is None else np.asarray(selection.lr_indices).tolist(),
        "n_timesteps": n_timesteps,
        "valid_indices": selection.valid_indices.tolist(),
        "candidate_indices": selection.candidate_indices.tolist(),
        "candidate_psnr": selection.candidate_psnr.tolist(),
        "candidate_scores": selection.candidate_scores.tolist(),
        "psnr": selection.psnr,
        "score": selection.score,
        "selection": mode,
        "alpha": alpha,
        "pipeline_version": PIPELINE_VERSION,
        "confidence": selection.confidence,
        **evidence_columns(selection, evidence_note),
    }


def evidence_columns(selection: Selection, note: str | None = None) -> dict:
    """The evidence columns of a pair: the robust mode's per-candidate lists and the chosen
    timestep's values (looked up by lr_index among the candidates; a manual choice outside them
    brings its own, `Selection.lr_evidence`); all null without evidence. `note` (e.g. an unusable
    extra band) goes to evidence_note."""
    out = dict.fromkeys(EVIDENCE_COLUMNS)
    out["evidence_note"] = note or None
    ev = selection.evidence
    if ev is None:
        return out
    at = np.flatnonzero(np.asarray(selection.candidate_indices) == selection.lr_index)
    for column, name in EVIDENCE_LISTS.items():
        values = getattr(ev, name)
        out[column] = None if values is None else np.asarray(values, dtype=np.float32).tolist()
    chosen = ev.take(at[:1]) if at.size else selection.lr_evidence
    for column, name in EVIDENCE_SCALARS.items():
        values = None if chosen is None else getattr(chosen, name)
        out[column] = None if values is None else float(np.float32(values[0]))
    out["evidence_bands"] = list(ev.bands)
    return out


def reject_record(tile_id: str, stage: str, reason: str, detail: str = "") -> dict:
    if reason not in REJECT_REASONS:
        raise ValueError(f"unknown reject reason {reason!r}")
    if stage not in REJECT_STAGES:
        raise ValueError(f"unknown reject stage {stage!r}")
    return {"tile_id": tile_id[:1000], "stage": stage, "reason": reason, "detail": detail[:2000]}


def decode_pair_arrays(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """A pair row (dict from Parquet or TFRecord) -> (hr, lr) uint8 arrays; lr as stored, [32, 32, C]
    or [N, 32, 32, C] (`lr_timesteps` gives it one shape)."""
    hr = np.frombuffer(row["hr"], dtype=np.uint8).reshape(row["hr_shape"])
    lr = np.frombuffer(row["lr"], dtype=np.uint8).reshape(row["lr_shape"])
    return hr, lr


def lr_timesteps(row: dict) -> np.ndarray:
    """A pair row's LR as [N, 32, 32, C] whatever its stored shape (N = 1 for single-timestep rows)."""
    lr = decode_pair_arrays(row)[1]
    return lr[None] if lr.ndim == 3 else lr


def lr_indices(row: dict) -> list[int]:
    """A pair row's written timesteps, best first; [lr_index] for rows older than the column."""
    indices = row.get("lr_indices")
    return [row["lr_index"]] if indices is None else list(indices)
