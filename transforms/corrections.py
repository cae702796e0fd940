"""Manual corrections of the timestep choice, as a reviewer exports them from `s2naip review`.

A corrections file is one JSON object `{tile_id: lr_index or null}` (the companion code's format):
an index picks that timestep of the tile's original series (the pair is built from it, selection
`manual`, the HR still histogram-matched to it); `null` removes the tile (reject
`removed_by_correction`). An entry that is not an integer, is out of range or names a timestep with
a black border makes that tile a `bad_correction` reject, never a crash.

`s2naip build --corrections FILE` (repeatable; a later file wins for a tile listed twice) reads the
files on the workers and joins them to the tile ids with a CoGroupByKey (`JoinCorrections`): memory
stays constant whatever the number of entries (a million-entry file is ~60 MB of JSON), nothing of
it is pickled into the job graph, and no worker holds the whole dict (an `AsDict` side input would
be materialised in full in every worker process).

With --lr-timesteps N > 1 a reviewer can also drop timesteps: `{tile_id: {"drop": [t, ...]}}` skips
those timesteps; the next acceptable ones in the mode's ranking take their places (`drop_timesteps`).
When the first (the selection's choice) is dropped, the next acceptable one becomes the choice,
selection `manual`, the HR histogram-matched to it; with fewer than N left the tile is a
`too_few_timesteps` reject (or written with fewer, --allow-fewer). A drop entry that is not a list
of in-range indices is a `bad_correction`.

The automatic selection still runs for a corrected tile, so its record keeps the candidates' PSNR
and scores; `manual_selection` then overrides the choice.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Iterator, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from transforms.evidence import Evidence
from transforms.imagery import black_border_count
from transforms.io import storage
from transforms.selection import (
    Selection,
    SelectionConfig,
    TooFewTimesteps,
    companion_scores,
    downsample,
    match_histograms,
    multi_timesteps,
    paper_scores,
    psnr,
    select_pair,
    to_uint8,
)

MAX_CORRECTIONS_BYTES = 1024 * 1024 * 1024  # ~17M entries; a 1M-entry file is ~60 MB
MANUAL = "manual"  # the `selection` column of a pair built from a correction


class BadCorrection(Exception):
    """A correction that cannot be applied to its tile (the tile becomes a `bad_correction` reject)."""


class CorrectionsFileError(ValueError):
    """A corrections file that is not a JSON object `{tile_id: lr_index or null}`: fails the run."""


@dataclasses.dataclass(frozen=True)
class Correction:
    value: object  # as read: an int timestep index, None (remove the tile), or anything else (bad)
    source: str = ""  # the file it came from, for reject details

    @property
    def removes(self) -> bool:
        return self.value is None


# ---------------------------------------------------------------------------------------------
# Files


def parse_corrections(data: bytes, source: str = "<corrections>") -> dict[str, object]:
    """The `{tile_id: value}` object of a corrections file; raises CorrectionsFileError."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorrectionsFileError(f"{source}: not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CorrectionsFileError(
            f"{source}: expected a JSON object {{tile_id: lr_index or null}}, got {type(obj).__name__}")
    return obj


def read_corrections_bytes(path: str) -> bytes:
    try:
        return storage.read_bytes(path, MAX_CORRECTIONS_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(f"corrections file not found: {path}") from None


def read_corrections_file(indexed_path: tuple[int, str]) -> Iterator[tuple[str, tuple[int, object, str]]]:
    """(position among --corrections, path) -> (tile_id, (position, value, path)) per entry.

    Plain tuples, so that the shuffle encodes them without pickling."""
    order, path = indexed_path
    for tile_id, value in parse_corrections(read_corrections_bytes(path), path).items():
        yield tile_id, (order, value, path)


def latest(entries: Iterable[tuple[int, object, str]]) -> Correction | None:
    """The entry of the last file listing the tile (None when there is none)."""
    best = max(entries, key=lambda e: e[0], default=None)
    return None if best is None else Correction(best[1], best[2])


def load_corrections(paths: Iterable[str]) -> dict[str, Correction]:
    """Every file merged in memory (a later file wins): for tools and tests, not for the build."""
    merged: dict[str, Correction] = {}
    for path in paths:
        for tile_id, value in parse_corrections(read_corrections_bytes(path), path).items():
            merged[tile_id] = Correction(value, path)
    return merged


# ---------------------------------------------------------------------------------------------
# Beam: the join of tile ids and corrections


_APPLIED = Metrics.counter("corrections", "matched")
_UNMATCHED = Metrics.counter("corrections", "unmatched")


def attach_correction(keyed: tuple[str, dict]) -> Iterator[tuple[str, Correction | None]]:
    """(tile_id, {'ids': [...], 'corrections': [...]}) -> (tile_id, its Correction or None) per id.

    Entries for ids that are not in the input are dropped (counter corrections/unmatched). An id
    that came with fingerprints (`keyed_id`) keeps them: (tile_id, Correction or None, fingerprints)."""
    tile_id, groups = keyed
    ids = list(groups["ids"])
    correction = latest(groups["corrections"])
    if correction is not None:
        (_APPLIED if ids else _UNMATCHED).inc()
    for fingerprints in ids:
        yield (tile_id, correction) if fingerprints is None else (tile_id, correction, fingerprints)


def keyed_id(element) -> tuple:
    """A tile id -> (tile_id, None); (tile_id, fingerprints) from the incremental plan as it is."""
    return (element, None) if isinstance(element, str) else tuple(element)


class JoinCorrections(beam.PTransform):
    """Tile ids -> (tile_id, Correction or None); (tile_id, fingerprints) pairs -> (tile_id,
    Correction or None, fingerprints). The files are read on the workers (one task each;
    a missing or malformed file fails the job with its path) and joined by a CoGroupByKey."""

    def __init__(self, paths: Iterable[str]):
        super().__init__()
        self.paths = tuple(paths)

    def expand(self, ids):
        entries = (
            ids.pipeline
            | "CorrectionFiles" >> beam.Create(list(enumerate(self.paths)))
            | "SpreadFiles" >> beam.Reshuffle()
            | "ReadCorrections" >> beam.FlatMap(read_corrections_file)
        )
        keyed_ids = ids | "KeyIds" >> beam.Map(keyed_id)
        return (
            {"ids": keyed_ids, "corrections": entries}
            | "JoinById" >> beam.CoGroupByKey()
            | "AttachCorrection" >> beam.FlatMap(attach_correction)
        )


# ---------------------------------------------------------------------------------------------
# Per tile


def check_correction(correction: Correction, series: np.ndarray, config: SelectionConfig = SelectionConfig()) -> int:
    """The timestep index a (non-removing) correction names; BadCorrection when it is not an
    integer, is out of range for `series` [T, 32, 32, C], or names a black-bordered timestep."""
    value = correction.value
    where = f" ({correction.source})" if correction.source else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadCorrection(f"correction {str(value)[:100]!r}{where} is not a timestep index (an integer or null)")
    t = int(series.shape[0])
    if not 0 <= value < t:
        raise BadCorrection(f"correction lr_index {value}{where} is out of range: the series has {t} timesteps "
                            f"(0..{t - 1})")
    black = int(black_border_count(series[value], config.border_px))
    if black > config.max_border_black:
        raise BadCorrection(f"correction lr_index {value}{where} names a timestep with a black border "
                            f"({black} black pixels in its {config.border_px}-px border)")
    return value


def is_drop(correction: Correction) -> bool:
    """Whether the correction is a `{"drop": [...]}` entry (module doc)."""
    return isinstance(correction.value, dict)


def check_drop(correction: Correction, series: np.ndarray) -> frozenset[int]:
    """The timesteps a `{"drop": [t, ...]}` correction drops; BadCorrection when it is not that shape
    or names an index outside the series [T, 32, 32, C]."""
    value = correction.value
    where = f" ({correction.source})" if correction.source else ""
    drop = value.get("drop") if isinstance(value, dict) and set(value) == {"drop"} else None
    if not isinstance(drop, list) or not drop or any(isinstance(t, bool) or not isinstance(t, int) for t in drop):
        raise BadCorrection(f"correction {json.dumps(value)[:100]}{where} is not {{\"drop\": [timestep index, ...]}}")
    t = int(series.shape[0])
    outside = [v for v in drop if not 0 <= v < t]
    if outside:
        raise BadCorrection(f"correction drop {outside[:5]}{where} is out of range: the series has {t} timesteps "
                            f"(0..{t - 1})")
    return frozenset(drop)


def drop_timesteps(hr: np.ndarray, series: np.ndarray, automatic: Selection, drop: frozenset[int],
                   config: SelectionConfig = SelectionConfig(),
                   extra: dict[str, np.ndarray] | None = None) -> tuple[Selection, bool]:
    """`automatic` with the reviewer's dropped timesteps skipped: unchanged when its choice is kept
    (the later timesteps skip them in `selection.with_timesteps`), else the next acceptable one in
    the mode's ranking becomes the choice (`manual_selection`). Returns (selection, whether the
    choice changed); raises TooFewTimesteps when no acceptable timestep is left."""
    if automatic.lr_index not in drop:
        return automatic, False
    rest = multi_timesteps(automatic, dataclasses.replace(config, lr_timesteps=2, allow_fewer=True), drop)[1:]
    if rest.size == 0:
        raise TooFewTimesteps(f"no acceptable timestep left after dropping {sorted(drop)[:10]} "
                              f"({config.mode} ranking), {config.lr_timesteps} requested")
    return manual_selection(hr, series, automatic, int(rest[0]), config, extra), True


INDEPENDENT_MODES = ("paper", "companion")  # modes whose score of a timestep ignores the other timesteps


class TimestepMetrics(NamedTuple):
    psnr: np.ndarray  # [N]
    score: np.ndarray  # [N], lower is better
    evidence: Evidence | None  # the robust mode's, aligned with the timesteps; None in other modes


def timestep_metrics(hr: np.ndarray, timesteps: np.ndarray, config: SelectionConfig = SelectionConfig(),
                     extra: dict[str, np.ndarray] | None = None) -> TimestepMetrics:
    """PSNR, score (and evidence) of valid `timesteps` [N, 32, 32, C] against `hr` [128, 128, C], as
    the automatic selection computes them for its candidates: `paper` and `companion` with their own
    reference HR and score; any other mode (`robust`, whose evidence is relative to the tile's other
    timesteps) by its own selection with all N timesteps as candidates (with the tile's extra bands
    `extra` [N, 32, 32] when it has them)."""
    if config.mode not in INDEPENDENT_MODES:
        selection = select_pair(hr, timesteps, dataclasses.replace(config, top_k=len(timesteps), lr_timesteps=1), extra)
        order = np.argsort(selection.candidate_indices)  # candidates (best first) -> timestep order
        evidence = None if selection.evidence is None else selection.evidence.take(order)
        return TimestepMetrics(selection.candidate_psnr[order].astype(np.float64),
                               selection.candidate_scores[order].astype(np.float64), evidence)
    hr_down = downsample(hr, timesteps.shape[1], config.downsample_method)
    if config.mode == "companion":
        return TimestepMetrics(psnr(timesteps, hr_down.astype(np.float32)),
                               companion_scores(hr_down, timesteps, config.alpha), None)
    hr_ref = to_uint8(hr_down)
    return TimestepMetrics(psnr(timesteps, hr_ref), paper_scores(hr_ref, timesteps, config.alpha), None)


def manual_selection(hr: np.ndarray, series: np.ndarray, automatic: Selection, lr_index: int,
                     config: SelectionConfig = SelectionConfig(),
                     extra: dict[str, np.ndarray] | None = None) -> Selection:
    """`automatic` with its choice replaced by timestep `lr_index`: that LR, the HR histogram-matched
    to it, and its PSNR and score (the candidate's when it is one of the top-k, else computed as the
    automatic mode computes them: `robust` scores it, and measures its evidence, among every valid
    timestep, with the tile's extra bands `extra` [T, 32, 32]). Candidates and valid indices are
    kept as they are."""
    at = np.flatnonzero(automatic.candidate_indices == lr_index)
    lr_evidence = None
    if at.size:
        tile_psnr, score = automatic.candidate_psnr[at[0]], automatic.candidate_scores[at[0]]
    elif config.mode in INDEPENDENT_MODES:
        metrics = timestep_metrics(hr, series[lr_index][None], config)
        tile_psnr, score = metrics.psnr[0], metrics.score[0]
    else:  # scored among all the valid timesteps
        valid = np.asarray(automatic.valid_indices)
        every = timestep_metrics(hr, series[valid], config, {name: band[valid] for name, band in (extra or {}).items()})
        position = int(np.flatnonzero(valid == lr_index)[0])
        tile_psnr, score = every.psnr[position], every.score[position]
        if every.evidence is not None:
            lr_evidence = every.evidence.take([position])
    lr = series[lr_index]
    return dataclasses.replace(
        automatic,
        lr_index=int(lr_index),
        psnr=float(tile_psnr),
        score=float(score),
        hr_matched=match_histograms(hr, lr[None])[0],
        lr=lr,
        lr_evidence=lr_evidence,
        confidence=None,  # a reviewer's choice, not the selection's
    )
