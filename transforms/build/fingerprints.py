"""Per-tile input fingerprints, taken without decoding (nor, on gs://, reading) any image.

A tile's fingerprint is one string per input file the build reads: `"<size>:<crc32c hex>"`, or None
when the file is missing (or not read by this build: `nir` and `b08` with `--bands rgb`). Files:

* `rgb`: `<input>/naip/<naip_id>/<x>_<y>/rgb.png`
* `nir`: `<nir input>/naip/<naip_id>/<x>_<y>/nir.png`
* `tci`, `b08`: `<input>/sentinel2/<x>_<y>/{tci,b08}.png`
* `extra`: the robust selection mode's optional Sentinel-2 bands (`selection.EXTRA_BANDS`), those
  present, as one string `"b01=<fp>;b11=<fp>"` (None when the mode reads none or none is there).

Locally the CRC32C is computed from the content; on gs:// both numbers come from object metadata
through listings, nothing is downloaded: `group_fingerprints` takes a group of tiles together (the
build groups them per block of zoom-17 columns, `column_block`) and lists all their folders
(`naip/<naip_id>/<x>_<y>/`, `sentinel2/<x>_<y>/`, the NIR root's when it is elsewhere) with range
listings (`object_meta.list_folders_meta`): folders next to each other in name order share a page
of 1,000 objects, so a group of neighbouring tiles costs about one request per 1,000 objects (a
tile has 2 NAIP and up to 10 Sentinel-2 objects) and never more than one per folder.
`tile_fingerprints` lists one tile's folders one level each. The same bytes have the same
fingerprint locally and on gs:// (GCS's base64 CRC32C is converted to hex), whichever way they are
listed.

What a fingerprint says is also what the build need not ask for: a None file is absent, so the build
reads no object the listing did not show (`absent_paths`), and an extra band missing from `extra` is
never requested.

A folder that cannot be listed (after storage's retries) gives `"error:<type>"` for its files: such
a fingerprint never equals a previous one, so the tile is rebuilt (and its new manifest row holds
the error, so the next run looks again).

A range listing also sees whether anything at all lies under a tile's Sentinel-2 folder, which
the fingerprints cannot say (they name only the files the build reads). `group_listings` carries
that after them, as a sixth item (`S2_HOLDS_ANY`: True, False, or None when not known): the build
then tells a tile without Sentinel-2 (`missing_s2`) from one without `tci.png` (`missing_band`)
without listing the folder again (`listed_folders`, `pairs.load_tile`). It is a fact of this
listing, not a fingerprint: never compared with a previous run's nor stored in the manifest
(`compared` drops it), so a previous manifest still compares equal.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

from transforms import tiles
from transforms.build.object_meta import ObjectMeta, list_folders_meta, list_object_meta
from transforms.io import storage
from transforms.tiles import InvalidTileId, TileId

FILES = ("rgb", "nir", "tci", "b08")
FIELDS = ("fp_rgb", "fp_nir", "fp_tci", "fp_b08", "fp_extra")  # the order of a Fingerprints tuple
ERROR_PREFIX = "error:"

Fingerprints = tuple  # (fp_rgb, fp_nir, fp_tci, fp_b08, fp_extra): str or None each
NONE = (None,) * len(FIELDS)
S2_HOLDS_ANY = len(FIELDS)  # the item after the fingerprints that a group listing adds (module doc)


def compared(values) -> Fingerprints:
    """The fingerprints of a tile's listing (what a previous run's manifest is compared with and the
    new one stores), without what the listing adds after them (`group_listings`)."""
    return tuple(values)[:len(FIELDS)]


def s2_holds_any(values) -> bool | None:
    """Whether the listing saw anything under the tile's Sentinel-2 folder; None when it does not
    say (fingerprints alone, a local build, a failed listing)."""
    values = tuple(values)
    return values[S2_HOLDS_ANY] if len(values) > S2_HOLDS_ANY else None


def fingerprint(meta: ObjectMeta | None) -> str | None:
    """`"<size>:<crc32c hex>"` of an object, None when absent. Without a CRC32C (an object store that
    reports none) the generation stands in: `"<size>:g<generation>"`."""
    if meta is None:
        return None
    if meta.crc32c:
        return f"{meta.size}:{meta.crc32c}"
    return f"{meta.size}:g{meta.generation}"


def fingerprint_bytes(data: bytes) -> str:
    """The fingerprint of these bytes (what a file holding them gets)."""
    from transforms.build.object_meta import crc32c_hex

    return f"{len(data)}:{crc32c_hex(data)}"


def is_error(fp: str | None) -> bool:
    return isinstance(fp, str) and fp.startswith(ERROR_PREFIX)


def as_dict(fps: Fingerprints) -> dict[str, str | None]:
    return dict(zip(FIELDS, fps))


@dataclasses.dataclass(frozen=True)
class FingerprintSpec:
    """Which files of a tile the build reads, and where."""

    input_root: str
    nir_root: str | None = None  # default: input_root
    files: tuple[str, ...] = FILES  # a subset of FILES
    extra_bands: tuple[str, ...] = ()  # robust mode: selection.EXTRA_BANDS

    def __post_init__(self):
        unknown = [f for f in self.files if f not in FILES]
        if unknown:
            raise ValueError(f"unknown fingerprint files {unknown}; expected some of {FILES}")

    @property
    def nir_input(self) -> str:
        return self.nir_root or self.input_root

    @classmethod
    def for_config(cls, config) -> "FingerprintSpec":
        """The files a `pairs.PairConfig` build reads: rgb and tci always, nir and b08 with `rgbn`,
        the extra bands when it reads them (`pairs.reads_extra_bands`: the robust mode, and any mode
        with --lr-timesteps N > 1), as `pairs.load_tile` does."""
        from transforms import pairs, selection

        files = ("rgb", "nir", "tci", "b08") if config.bands == "rgbn" else ("rgb", "tci")
        extra = tuple(getattr(selection, "EXTRA_BANDS", ())) if pairs.reads_extra_bands(config) else ()
        return cls(config.input_root, config.nir_root, files, extra)


def _listed(folder: str, names: tuple[str, ...]) -> dict[str, str | None]:
    """{name: fingerprint or None} for `names` in `folder`; every name an error string when the
    listing fails."""
    if not names:
        return {}
    try:
        metas = list_object_meta(folder, names)
    except OSError as e:  # incl. FileNotFoundError of a missing bucket, storage's retries exhausted
        return dict.fromkeys(names, f"{ERROR_PREFIX}{type(e).__name__}")
    return {name: fingerprint(metas.get(name)) for name in names}


def _naip_names(spec: FingerprintSpec) -> tuple[str, ...]:
    """The files of `naip/<naip_id>/<x>_<y>/` under input_root that the build reads."""
    names = ("rgb.png",) if "rgb" in spec.files else ()
    if "nir" in spec.files and _same_nir_root(spec):
        names += ("nir.png",)
    return names


def _same_nir_root(spec: FingerprintSpec) -> bool:
    return storage.join(spec.nir_input, "naip") == storage.join(spec.input_root, "naip")


def _s2_names(spec: FingerprintSpec) -> tuple[str, ...]:
    """The files of `sentinel2/<x>_<y>/` that the build reads (the extra bands: those there)."""
    names = tuple(f"{b}.png" for b in ("tci", "b08") if b in spec.files)
    return names + tuple(f"{b}.png" for b in spec.extra_bands)


def _folders(tile: TileId, spec: FingerprintSpec) -> tuple[str, str, str]:
    """(NAIP folder, NIR folder, Sentinel-2 folder) of a tile."""
    return (storage.join(spec.input_root, "naip", tile.naip_id, tile.xy),
            storage.join(spec.nir_input, "naip", tile.naip_id, tile.xy), tiles.s2_dir(spec.input_root, tile))


def _assemble(spec: FingerprintSpec, found: dict[str, str | None], nir: str | None) -> Fingerprints:
    """The fingerprints tuple from {file name: fingerprint} of the tile's NAIP and Sentinel-2 files
    and the NIR file's own (used when the NIR root is elsewhere)."""
    if "nir" in spec.files and _same_nir_root(spec):
        nir = found.get("nir.png")
    elif "nir" not in spec.files:
        nir = None
    extra = [f"{b}={found[f'{b}.png']}" for b in spec.extra_bands if found.get(f"{b}.png") is not None]
    return (found.get("rgb.png"), nir, found.get("tci.png"), found.get("b08.png"), ";".join(extra) or None)


def tile_fingerprints(tile_id: str, spec: FingerprintSpec) -> Fingerprints:
    """The fingerprints of one tile id (a tuple in FIELDS order), its folders listed one level
    each. An invalid id has no files: all None (it never touches a path)."""
    try:
        tile = TileId.parse(tile_id)
    except InvalidTileId:
        return NONE
    naip_dir, nir_dir, s2_dir = _folders(tile, spec)
    found = {**_listed(naip_dir, _naip_names(spec)), **_listed(s2_dir, _s2_names(spec))}
    nir = _listed(nir_dir, ("nir.png",))["nir.png"] if "nir" in spec.files and not _same_nir_root(spec) else None
    return _assemble(spec, found, nir)


def column_block(tile_id: str, columns: int = 64) -> str:
    """The group key of a tile for `group_fingerprints`: its block of `columns` zoom-17 tile
    columns (`x // columns`). The tiles of a block are neighbours in name order twice: their
    Sentinel-2 chips `sentinel2/<x>_<y>/` (same x first) and each capture's NAIP folders
    `naip/<naip_id>/<x>_<y>/`. An invalid id keys on '' (fingerprinted alone, touching no path)."""
    try:
        return str(TileId.parse(tile_id).x // columns)
    except InvalidTileId:
        return ""


def group_fingerprints(tile_ids: Iterable[str], spec: FingerprintSpec) -> list[Fingerprints]:
    """The fingerprints of a group of tile ids (in their order) on gs://, from range listings of all
    their folders at once (`object_meta.list_folders_meta`). A folder whose listing failed gives
    `"error:<type>"` for its files. Invalid ids get all None."""
    return [compared(values) for values in group_listings(tile_ids, spec)]


def group_listings(tile_ids: Iterable[str], spec: FingerprintSpec) -> list[tuple]:
    """`group_fingerprints` with what the listings also saw: each tile's fingerprints followed by
    `S2_HOLDS_ANY` (whether any object at all lies under its Sentinel-2 folder; None for an invalid
    id or a failed listing)."""
    ids = list(tile_ids)
    parsed: list[TileId | None] = []
    folders = set()
    for tile_id in ids:
        try:
            tile = TileId.parse(tile_id)
        except InvalidTileId:
            parsed.append(None)
            continue
        parsed.append(tile)
        naip_dir, nir_dir, s2_dir = _folders(tile, spec)
        folders.update([naip_dir, s2_dir])
        if "nir" in spec.files and not _same_nir_root(spec):
            folders.add(nir_dir)
    listed = list_folders_meta(folders) if folders else {}

    def files(folder: str, names: tuple[str, ...]) -> dict[str, str | None]:
        metas = listed[folder]
        if isinstance(metas, OSError):
            return dict.fromkeys(names, f"{ERROR_PREFIX}{type(metas).__name__}")
        return {name: fingerprint(metas.get(name)) for name in names}

    out = []
    for tile in parsed:
        if tile is None:
            out.append(NONE + (None,))
            continue
        naip_dir, nir_dir, s2_dir = _folders(tile, spec)
        found = {**files(naip_dir, _naip_names(spec)), **files(s2_dir, _s2_names(spec))}
        nir = files(nir_dir, ("nir.png",))["nir.png"] if "nir" in spec.files and not _same_nir_root(spec) else None
        s2 = listed[s2_dir]
        out.append(_assemble(spec, found, nir) + (None if isinstance(s2, OSError) else s2.holds_any,))
    return out


def lists_in_groups(spec: FingerprintSpec) -> bool:
    """Whether the build fingerprints this input in groups (`group_fingerprints`): gs:// roots."""
    return storage.is_gcs(spec.input_root) and storage.is_gcs(spec.nir_input)


def absent_paths(tile: TileId, spec: FingerprintSpec, fps: Fingerprints) -> frozenset[str]:
    """The files the build would read that these fingerprints say are absent (None; never those of
    an error): what it need not ask for."""
    rgb, nir, tci, b08, extra = compared(fps)
    naip_dir, nir_dir, s2_dir = _folders(tile, spec)
    absent = set()
    for name, fp, folder in (("rgb", rgb, naip_dir), ("nir", nir, nir_dir), ("tci", tci, s2_dir),
                             ("b08", b08, s2_dir)):
        if name in spec.files and fp is None:
            absent.add(storage.join(folder, f"{name}.png"))
    present = {part.split("=", 1)[0] for part in extra.split(";")} if extra else set()
    absent.update(storage.join(s2_dir, f"{b}.png") for b in spec.extra_bands if b not in present)
    return frozenset(absent)


def listed_folders(tile: TileId, spec: FingerprintSpec, values) -> dict[str, bool]:
    """{folder: whether anything lies under it} for the tile's folders its listing saw whole (the
    Sentinel-2 folder after a group listing, `S2_HOLDS_ANY`); {} when it does not say."""
    holds = s2_holds_any(values)
    return {} if holds is None else {tiles.s2_dir(spec.input_root, tile): bool(holds)}
