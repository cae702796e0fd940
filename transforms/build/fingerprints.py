"""Per-tile input fingerprints, taken without decoding (nor, on gs://, reading) any image.

A tile's fingerprint is one string per input file the build reads: `"<size>:<crc32c hex>"`, or None
when the file is missing (or not read by this build: `nir` and `b08` with `--bands rgb`). Files:

* `rgb`: `<input>/naip/<naip_id>/<x>_<y>/rgb.png`
* `nir`: `<nir input>/naip/<naip_id>/<x>_<y>/nir.png`
* `tci`, `b08`: `<input>/sentinel2/<x>_<y>/{tci,b08}.png`
* `extra`: the robust selection mode's optional Sentinel-2 bands (`selection.EXTRA_BANDS`), those
  present, as one string `"b01=<fp>;b11=<fp>"` (None when the mode reads none or none is there).

Locally the CRC32C is computed from the content; on gs:// both numbers come from object metadata
through listings: one-level listings of the tile's folders (`naip/<naip_id>/<x>_<y>/`,
`sentinel2/<x>_<y>/`, and the NIR root's folder when it is elsewhere), or, for the tiles of one
NAIP capture taken together, one recursive listing of `naip/<naip_id>/` for all their NAIP files
(`capture_naip_fingerprints`) and one listing per tile for Sentinel-2: about one list request per
tile instead of two. The same bytes have the same fingerprint locally and on gs:// (GCS's base64
CRC32C is converted to hex).

A folder that cannot be listed (after storage's retries) gives `"error:<type>"` for its files: such
a fingerprint never equals a previous one, so the tile is rebuilt (and its new manifest row holds
the error, so the next run looks again).
"""
from __future__ import annotations

import dataclasses

from transforms import tiles
from transforms.build.object_meta import ObjectMeta, list_object_meta, list_subfolder_meta
from transforms.io import storage
from transforms.tiles import InvalidTileId, TileId

FILES = ("rgb", "nir", "tci", "b08")
FIELDS = ("fp_rgb", "fp_nir", "fp_tci", "fp_b08", "fp_extra")  # the order of a Fingerprints tuple
ERROR_PREFIX = "error:"

Fingerprints = tuple  # (fp_rgb, fp_nir, fp_tci, fp_b08, fp_extra): str or None each
NONE = (None,) * len(FIELDS)


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
        the extra bands in the robust mode (as `pairs.load_tile` does)."""
        from transforms import selection

        files = ("rgb", "nir", "tci", "b08") if config.bands == "rgbn" else ("rgb", "tci")
        extra = tuple(getattr(selection, "EXTRA_BANDS", ())) if config.selection.mode == "robust" else ()
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


NaipFiles = dict  # {file name: fingerprint or None} of one tile's NAIP folder


def capture_naip_fingerprints(spec: FingerprintSpec, naip_id: str) -> dict[str, NaipFiles] | str:
    """{x_y: NaipFiles} of every tile folder of one NAIP capture (`naip/<naip_id>/`, gs:// only)
    from one recursive listing; the error string of every file when the listing fails."""
    names = _naip_names(spec)
    try:
        metas = list_subfolder_meta(storage.join(spec.input_root, "naip", naip_id))
    except OSError as e:
        return f"{ERROR_PREFIX}{type(e).__name__}"
    return {xy: {name: fingerprint(files.get(name)) for name in names} for xy, files in metas.items()}


def naip_files_from_capture(capture: dict[str, NaipFiles] | str, tile_id: str, spec: FingerprintSpec) -> NaipFiles:
    """One tile's NaipFiles out of `capture_naip_fingerprints` (all None when its folder is not there)."""
    names = _naip_names(spec)
    if isinstance(capture, str):
        return dict.fromkeys(names, capture)
    xy = tile_id.rsplit("/", 1)[-1]
    return capture.get(xy) or dict.fromkeys(names)


def tile_fingerprints(tile_id: str, spec: FingerprintSpec, naip_files: NaipFiles | None = None) -> Fingerprints:
    """The fingerprints of one tile id (a tuple in FIELDS order). An invalid id has no files: all
    None (it never touches a path). `naip_files`, when given, are those of its NAIP folder as a
    capture listing found them (`naip_files_from_capture`); otherwise the folder is listed."""
    try:
        tile = TileId.parse(tile_id)
    except InvalidTileId:
        return NONE
    naip_dir = storage.join(spec.input_root, "naip", tile.naip_id, tile.xy)
    nir_dir = storage.join(spec.nir_input, "naip", tile.naip_id, tile.xy)
    s2_dir = tiles.s2_dir(spec.input_root, tile)
    same_nir = _same_nir_root(spec)
    naip_names = _naip_names(spec)
    s2_names = tuple(f"{b}.png" for b in ("tci", "b08") if b in spec.files)
    s2_names += tuple(f"{b}.png" for b in spec.extra_bands)
    naip_found = _listed(naip_dir, naip_names) if naip_files is None else dict(naip_files)
    found = {**naip_found, **_listed(s2_dir, s2_names)}
    nir = None
    if "nir" in spec.files:
        nir = found.get("nir.png") if same_nir else _listed(nir_dir, ("nir.png",))["nir.png"]
    extra = [f"{b}={found[f'{b}.png']}" for b in spec.extra_bands if found.get(f"{b}.png") is not None]
    return (found.get("rgb.png"), nir, found.get("tci.png"), found.get("b08.png"), ";".join(extra) or None)
