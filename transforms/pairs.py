"""One tile from id to outcome: read its files, pre-filter, select, and build the record.

`build_tile` is a plain function (no Beam) returning exactly one `Outcome` per input id, a pair or a
reject with its reason, whatever the input holds; the Beam DoFn only calls it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from transforms import cloud_prob, corrections, imagery, records, tiles
from transforms.io import storage
from transforms.imagery import ImageRejected
from transforms.selection import EXTRA_BANDS, NoValidTimesteps, SelectionConfig, TooFewTimesteps, select_pair, with_timesteps
from transforms.tiles import InvalidTileId, TileId

BAND_SETS = ("rgbn", "rgb")


@dataclasses.dataclass(frozen=True)
class PairConfig:
    input_root: str
    nir_root: str | None = None  # default: next to rgb.png under input_root
    bands: str = "rgbn"
    split: str = ""
    selection: SelectionConfig = SelectionConfig()
    corrections: tuple[str, ...] = ()  # --corrections files, joined to the ids by BuildPairs
    read_threads: int = 0  # per worker process, reads started ahead (0: none); not in the options hash

    def __post_init__(self):
        if self.bands not in BAND_SETS:
            raise ValueError(f"bands must be one of {BAND_SETS}, got {self.bands!r}")
        if self.read_threads < 0:
            raise ValueError(f"read_threads must be >= 0, got {self.read_threads}")

    @property
    def nir_input(self) -> str:
        return self.nir_root or self.input_root


@dataclasses.dataclass
class Outcome:
    kind: str  # "pair" or "reject"
    record: dict


class TileRejected(Exception):
    """A tile that cannot become a pair; `stage` and `reason` are those of its reject record."""

    def __init__(self, stage: str, reason: str, detail: str):
        super().__init__(detail)
        self.stage, self.reason, self.detail = stage, reason, detail


@dataclasses.dataclass
class TileInputs:
    hr: np.ndarray  # [128, 128, C]
    series: np.ndarray  # [T, 32, 32, C]
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # robust mode: [T, 32, 32] each
    extra_note: str = ""  # extra bands present but unusable (ignored), for the evidence_note column


Reader = Callable[[str, int], bytes]  # storage.read_bytes's signature: (path, limit) -> bytes


def tile_paths(tile: TileId, config: PairConfig) -> list[str]:
    """Every file `load_tile` may read for `tile`, in the order it reads them: what a prefetch
    (`transforms.io.prefetch`) fetches ahead. A tile rejected early reads fewer."""
    paths = [tiles.hr_rgb_path(config.input_root, tile), tiles.s2_band_path(config.input_root, tile, "tci")]
    if config.bands == "rgbn":
        paths += [tiles.s2_band_path(config.input_root, tile, "b08"), tiles.hr_nir_path(config.nir_input, tile)]
    if reads_extra_bands(config):
        paths += [tiles.s2_band_path(config.input_root, tile, band) for band in extra_bands(config)]
    return paths


def extra_bands(config: PairConfig) -> tuple[str, ...]:
    """The optional bands the robust mode reads: EXTRA_BANDS but b08 when the series has it (rgbn)."""
    return tuple(b for b in EXTRA_BANDS if not (b == "b08" and config.bands == "rgbn"))


def reads_extra_bands(config: PairConfig) -> bool:
    """The robust mode reads the extra bands; so do the others with --lr-timesteps N > 1, for
    s2cloudless among their clean gates (`selection.clean_gates`). A single-timestep paper or
    companion build reads none."""
    return config.selection.mode == "robust" or config.selection.lr_timesteps > 1


# Which term of the selection each optional band feeds (`selection.robust_scores`, `clean_gates`,
# `cloud_prob`): a band is read only when a term it feeds can be computed for the tile.
#   aerosol (robust): b01             cirrus (robust): b10
#   swir, the cloud and snow tests (robust): b11, else b12 (b12 is read with b11: it stands in
#       when b11 turns out unusable, which only its decoding tells)
#   s2cloudless (robust; any mode's clean gates with --lr-timesteps N > 1): all of
#       cloud_prob.CLOUD_BANDS, b08 from the rgbn series, only when every one is there
EXTRA_BAND_TERMS = {
    "b01": ("aerosol", "s2cloudless"),
    "b05": ("s2cloudless",),
    "b08": ("s2cloudless",),
    "b09": ("s2cloudless",),
    "b10": ("cirrus", "s2cloudless"),
    "b11": ("swir", "s2cloudless"),
    "b12": ("swir", "s2cloudless"),
}
ROBUST_TERMS = frozenset({"aerosol", "cirrus", "swir"})


def planned_extra_bands(config: PairConfig, present: frozenset[str] | set[str]) -> tuple[str, ...]:
    """The optional bands a tile whose folder holds `present` (band names) reads and uses, in
    `extra_bands` order: those feeding a term that can be computed. s2cloudless needs all of its
    bands, so a chip without b05 or b09 reads neither b05, b09 nor (rgb builds) b08, and a
    paper or companion build with --lr-timesteps N > 1 (s2cloudless is its only term) reads no
    optional band at all. A band left out changes no score, choice nor evidence value: only
    `evidence_bands` no longer names it (it fed no term)."""
    if not reads_extra_bands(config):
        return ()
    bands = extra_bands(config)
    terms = set(ROBUST_TERMS) if config.selection.mode == "robust" else set()
    if all(b in present or (b == "b08" and config.bands == "rgbn") for b in cloud_prob.CLOUD_BANDS):
        terms.add("s2cloudless")
    return tuple(b for b in bands if b in present and terms.intersection(EXTRA_BAND_TERMS[b]))


def read_plan(tile: TileId, config: PairConfig, absent: frozenset[str] = frozenset()) -> list[str]:
    """The files a tile reads, in `load_tile`'s order, when a listing showed the paths of `absent`
    missing: up to the first missing file the tile cannot do without (the tile is rejected there:
    `tci`, and `b08` and `nir` with rgbn), then the optional bands `planned_extra_bands` keeps.
    What a read-ahead starts; with no listing (`absent` empty), `tile_paths`."""
    paths = [tiles.hr_rgb_path(config.input_root, tile), tiles.s2_band_path(config.input_root, tile, "tci")]
    if config.bands == "rgbn":
        paths += [tiles.s2_band_path(config.input_root, tile, "b08"), tiles.hr_nir_path(config.nir_input, tile)]
    for i, path in enumerate(paths):
        if path in absent:
            return paths[: i + 1]
    present = {b for b in extra_bands(config) if tiles.s2_band_path(config.input_root, tile, b) not in absent}
    return paths + [tiles.s2_band_path(config.input_root, tile, b) for b in planned_extra_bands(config, present)]


def _read(path: str, what: str, missing_reason: str, read: Reader = storage.read_bytes) -> bytes:
    try:
        return read(path, imagery.MAX_PNG_BYTES)
    except FileNotFoundError:
        raise TileRejected("read", missing_reason, f"{what} not found: {path}") from None
    except ValueError as e:
        raise TileRejected("read", "image_too_large", str(e)) from None
    except OSError as e:
        raise TileRejected("read", "read_error", f"{what}: {type(e).__name__}: {e}") from None


def _has_files(folder: str, read: Reader = storage.read_bytes) -> bool:
    """Whether anything lies under `folder`: as the listing behind `read` saw it when it listed the
    folder whole (`prefetch.TileReads.holds_any`: a gs:// group listing of the plan), else listed
    now (`storage.dir_has_files`; one more listing on an object store)."""
    holds_any = getattr(read, "holds_any", None)
    known = holds_any(folder) if holds_any is not None else None
    if known is not None:
        return bool(known)
    try:
        return storage.dir_has_files(folder)
    except OSError as e:
        raise TileRejected("read", "read_error", f"listing {folder}: {type(e).__name__}: {e}") from None


def _decode(fn, data: bytes, what: str, channels: int) -> np.ndarray:
    try:
        return fn(data, channels)
    except ImageRejected as e:
        raise TileRejected("read", e.reason, f"{what}: {e.detail}") from None


def _kept(read: Reader, path: str) -> np.ndarray | None:
    """The image a read-ahead already decoded from `path`'s bytes (`prefetch.TileReads.kept`: the
    NAIP rgb.png, decoded on the reader thread to decide whether the tile reads on), or None."""
    kept = getattr(read, "kept", None)
    value = kept(path) if kept is not None else None
    return value if isinstance(value, np.ndarray) else None


def load_tile(tile: TileId, config: PairConfig, read: Reader = storage.read_bytes) -> TileInputs:
    """Reads (with `read`, e.g. a prefetch) and decodes the tile's HR and Sentinel-2 series; raises
    TileRejected with a reason."""
    rgb_path = tiles.hr_rgb_path(config.input_root, tile)
    rgb_png = _read(rgb_path, "rgb.png", "missing_hr", read)
    rgb = _kept(read, rgb_path)
    if rgb is None:
        rgb = _decode(imagery.decode_hr, rgb_png, "rgb.png", 3)
    if imagery.has_black_border(rgb):
        # Checked before anything else is read: a black-bordered HR is dropped whatever else holds.
        raise TileRejected("prefilter", "naip_black_border",
                      f"{int(imagery.black_border_count(rgb))} black pixels in the 2-px border")
    try:
        tci_data = _read(tiles.s2_band_path(config.input_root, tile, "tci"), "tci.png", "missing_band", read)
    except TileRejected as e:
        if e.reason == "missing_band" and not _has_files(tiles.s2_dir(config.input_root, tile), read):
            raise TileRejected("read", "missing_s2", f"no Sentinel-2 files under {tiles.s2_dir(config.input_root, tile)}") from None
        raise
    tci = _decode(imagery.decode_series, tci_data, "tci.png", 3)
    if config.bands == "rgb":
        return _with_extra_bands(TileInputs(rgb, tci), tile, config, read)
    b08 = _decode(imagery.decode_series,
                  _read(tiles.s2_band_path(config.input_root, tile, "b08"), "b08.png", "missing_band", read),
                  "b08.png", 1)
    if b08.shape[0] != tci.shape[0]:
        raise TileRejected("read", "bad_shape", f"tci.png has {tci.shape[0]} timesteps, b08.png {b08.shape[0]}")
    nir = _decode(imagery.decode_hr, _read(tiles.hr_nir_path(config.nir_input, tile), "nir.png", "missing_nir", read),
                  "nir.png", 1)
    return _with_extra_bands(TileInputs(imagery.stack_channels(rgb, nir), imagery.stack_channels(tci, b08)),
                             tile, config, read)


def _with_extra_bands(inputs: TileInputs, tile: TileId, config: PairConfig,
                      read: Reader = storage.read_bytes) -> TileInputs:
    """The optional Sentinel-2 bands (`extra_bands`: b01, b05, b08 unless rgbn, b09, b10, b11, b12)
    that the tile has and `planned_extra_bands` keeps: with a listing (a `read` that knows which
    files are absent, `prefetch.TileReads.listed_absent`) only those are requested; without one,
    each band is read directly (a missing file is one failed read, cheaper than listing the folder
    on an object store) and those the plan leaves out are dropped undecoded. A missing band is
    simply absent; one that cannot be used (read error, corrupt PNG, other width or timestep count)
    is left out too and named in `extra_note`: the pair never depends on them, the evidence just
    has less to go on. Other modes read none, unless --lr-timesteps N > 1 (`reads_extra_bands`)."""
    if not reads_extra_bands(config):
        return inputs
    listed_absent = getattr(read, "listed_absent", None)
    fetched: dict[str, bytes | TileRejected] = {}
    if listed_absent is None:
        present = set()
        for band in extra_bands(config):
            try:
                fetched[band] = _read(tiles.s2_band_path(config.input_root, tile, band), f"{band}.png",
                                      "missing_band", read)
            except TileRejected as e:
                if e.reason == "missing_band":
                    continue
                fetched[band] = e
            present.add(band)
    else:
        present = {b for b in extra_bands(config)
                   if tiles.s2_band_path(config.input_root, tile, b) not in listed_absent}
    notes = []
    for band in planned_extra_bands(config, present):
        try:
            data = fetched.get(band)
            if data is None:
                data = _read(tiles.s2_band_path(config.input_root, tile, band), f"{band}.png", "missing_band", read)
            elif isinstance(data, TileRejected):
                raise data
            series = _decode(imagery.decode_series, data, f"{band}.png", 1)[..., 0]
        except TileRejected as e:
            if e.reason != "missing_band":
                notes.append(f"{band}: {e.reason}: {e.detail}"[:300])
            continue
        if series.shape != inputs.series.shape[:3]:
            notes.append(f"{band}: bad_shape: {series.shape[0]} timesteps, tci.png {inputs.series.shape[0]}")
            continue
        inputs.extra[band] = series
    inputs.extra_note = "; ".join(notes)
    return inputs


def build_tile(tile_id: str, config: PairConfig, correction: corrections.Correction | None = None,
               read: Reader = storage.read_bytes) -> Outcome:
    """The outcome of one input tile id: a pair record, or a reject record with its reason.

    With a `correction` (from --corrections), the tile is removed, or built from the timestep it
    names (selection `manual`, the automatic candidates and their scores kept). Files are read with
    `read` (default: directly; the Beam DoFn passes a prefetch, `transforms.io.prefetch`)."""
    try:
        tile = TileId.parse(tile_id)
    except InvalidTileId as e:
        return Outcome("reject", records.reject_record(tile_id, "manifest", "invalid_tile_id", str(e)))
    if correction is not None and correction.removes:
        return Outcome("reject", records.reject_record(tile_id, "select", "removed_by_correction",
                                                       f"removed by {correction.source or 'a correction'}"))
    mode = config.selection.mode
    try:
        inputs = load_tile(tile, config, read)
        drop = frozenset()
        if correction is not None:
            if corrections.is_drop(correction):
                drop = corrections.check_drop(correction, inputs.series)
            else:
                lr_index = corrections.check_correction(correction, inputs.series, config.selection)
        selection = select_pair(inputs.hr, inputs.series, config.selection, inputs.extra)
        if drop:
            selection, changed = corrections.drop_timesteps(inputs.hr, inputs.series, selection, drop,
                                                            config.selection, inputs.extra)
            mode = corrections.MANUAL if changed else mode
        elif correction is not None:
            selection = corrections.manual_selection(inputs.hr, inputs.series, selection, lr_index, config.selection,
                                                      inputs.extra)
            mode = corrections.MANUAL
        selection = with_timesteps(selection, inputs.series, config.selection, drop)
    except TooFewTimesteps as e:
        return Outcome("reject", records.reject_record(tile_id, "select", "too_few_timesteps", str(e)))
    except corrections.BadCorrection as e:
        return Outcome("reject", records.reject_record(tile_id, "select", "bad_correction", str(e)))
    except TileRejected as e:
        return Outcome("reject", records.reject_record(tile_id, e.stage, e.reason, e.detail))
    except NoValidTimesteps as e:
        return Outcome("reject", records.reject_record(tile_id, "prefilter", "no_valid_timesteps", str(e)))
    except Exception as e:  # never lose a tile nor crash the job on one bad input
        return Outcome("reject", records.reject_record(tile_id, "select", "internal_error",
                                                       f"{type(e).__name__}: {e}"))
    record = records.pair_record(
        tile,
        selection,
        n_timesteps=int(inputs.series.shape[0]),
        split=config.split,
        mode=mode,
        alpha=config.selection.alpha,
        evidence_note=inputs.extra_note or None,
    )
    return Outcome("pair", record)
