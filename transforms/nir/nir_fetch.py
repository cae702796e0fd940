"""NAIP NIR for S2-NAIP tiles: the plain functions of `fetch-nir` (no Beam, no HTTP of their own).

* Resolution of a folder `naip_id` (`m_2408115_sw_17_060_20191128`) to its STAC item
  (`fl_m_2408115_sw_17_060_20191128_20200113` on Planetary Computer): the search parameters (the
  tiles' lon/lat bbox, the capture date from the id) and the choice among the search's features (an
  item id that contains the folder id; else one that contains the quarter-quad name and was
  captured on the id's date), or a `{folder_id: item_id}` mapping file.
* Grouping: a NAIP item's tiles, ordered block by block (squares of `side` x `side` zoom-17
  tiles), cut deterministically into groups of at most side**2 tiles.
* Window planning: the byte ranges of the COG blocks under every tile's source window (the window
  `geo.reproject_to_tile` reads), coalesced into few large ranges.
* Per-group reprojection on the group's one open dataset: nearest neighbour one warp per column
  of adjacent tiles, other resamplings tile by tile; either way a tile's NIR equals
  `geo.reproject_to_tile` of that tile alone (tests/test_nir_fetch.py checks it on real imagery).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import json
import math
import re
from collections.abc import Iterable, Iterator

import numpy as np

from transforms import imagery, tiles
from transforms.io import storage
from transforms.nir import geo

NIR_BAND = 4  # NAIP: 1 red, 2 green, 3 blue, 4 near-infrared
TILE_SIZE = 128
DEFAULT_GROUP_SIDE = 8  # groups of at most 8 x 8 = 64 tiles (a dense group: a ~2 km square)
DEFAULT_MAX_GAP = 256 * 1024  # read through gaps up to this size rather than make another request
DEFAULT_MAX_RANGE = 16 * 1024 * 1024
COG_GHOST_BYTES = 4  # a COG block may carry a 4-byte leader (its size) and trailer: read them too

# Reject vocabulary of fetch-nir (the rejects table has the build's schema: tile_id, stage, reason,
# detail). Every input id ends in exactly one of: written, skipped (nir.png already there), rejected.
NIR_REJECT_REASONS = {
    "invalid_tile_id": "the id does not match <naip_id>/<x>_<y> (never touches a path)",
    "duplicate_tile_id": "the id appeared earlier in the same input; the first one is processed",
    "unresolved_naip_id": "no STAC item matches the folder naip_id (or the --naip-id-map lacks it)",
    "stac_error": "the STAC API failed (after retries) or answered something unusable",
    "fetch_error": "reading the item's COG failed after retries, or the COG is unreadable",
    "no_nir_data": "the item's image has no valid pixel over the tile",
    "write_error": "writing nir.png failed",
    "internal_error": "an unexpected error (a bug: please report)",
}
NIR_REJECT_STAGES = ("manifest", "resolve", "fetch", "write")


def nir_reject(tile_id: str, stage: str, reason: str, detail: str = "") -> dict:
    if reason not in NIR_REJECT_REASONS:
        raise ValueError(f"unknown reject reason {reason!r}")
    if stage not in NIR_REJECT_STAGES:
        raise ValueError(f"unknown reject stage {stage!r}")
    return {"tile_id": str(tile_id)[:1000], "stage": stage, "reason": reason, "detail": str(detail)[:2000]}


# ---------------------------------------------------------------------------------------------
# Folder ids and STAC items

_FOLDER_ID = re.compile(
    r"m_(?P<quad>[0-9]{7})_(?P<quarter>ne|nw|se|sw)_(?P<zone>[0-9]{2})_(?P<res>[0-9a-z]{1,4})_(?P<date>[0-9]{8})")
# STAC item ids as loaded from a mapping file: Planetary Computer style, or any plain id.
_ITEM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,254}")


@dataclasses.dataclass(frozen=True)
class NaipFolderId:
    naip_id: str
    quad: str
    quarter: str
    zone: str
    resolution: str
    date: dt.date

    @property
    def quarter_quad(self) -> str:
        """The quarter-quad name, e.g. m_2408115_sw."""
        return f"m_{self.quad}_{self.quarter}"


def parse_folder_id(naip_id: str) -> NaipFolderId:
    m = _FOLDER_ID.fullmatch(naip_id or "")
    if not m:
        raise ValueError(f"{str(naip_id)[:100]!r} is not a NAIP capture id")
    try:
        date = dt.datetime.strptime(m["date"], "%Y%m%d").date()
    except ValueError:
        raise ValueError(f"{naip_id!r}: {m['date']} is not a date") from None
    return NaipFolderId(naip_id, m["quad"], m["quarter"], m["zone"], m["res"], date)


def lonlat_of_3857(x: float, y: float) -> tuple[float, float]:
    lon = math.degrees(x / 6378137.0)
    lat = math.degrees(2.0 * math.atan(math.exp(y / 6378137.0)) - math.pi / 2.0)
    return lon, lat


def tiles_bbox_lonlat(xys: Iterable[tuple[int, int]], zoom: int = tiles.ZOOM) -> tuple[float, float, float, float]:
    """(west, south, east, north) in degrees of the union of tiles (Web Mercator tiles are
    rectangles in lon/lat too)."""
    xys = list(xys)
    if not xys:
        raise ValueError("no tiles")
    left = min(geo.tile_bounds_3857(x, y, zoom)[0] for x, y in xys)
    bottom = min(geo.tile_bounds_3857(x, y, zoom)[1] for x, y in xys)
    right = max(geo.tile_bounds_3857(x, y, zoom)[2] for x, y in xys)
    top = max(geo.tile_bounds_3857(x, y, zoom)[3] for x, y in xys)
    west, south = lonlat_of_3857(left, bottom)
    east, north = lonlat_of_3857(right, top)
    return (west, south, east, north)


def search_bbox(xys: Iterable[tuple[int, int]], zoom: int = tiles.ZOOM) -> tuple[float, float, float, float]:
    """The bbox a resolution searches with: that of one tile (the first in sort order), which every
    capture holding the folder's tiles covers."""
    first = min(xys)
    return tiles_bbox_lonlat([first], zoom)


def search_datetime(date: dt.date, margin_days: int = 1) -> str:
    """An RFC 3339 interval around the capture date (a day either side: time zones and how an
    item's datetime was set vary; the id check decides)."""
    start = date - dt.timedelta(days=margin_days)
    end = date + dt.timedelta(days=margin_days)
    return f"{start.isoformat()}T00:00:00Z/{end.isoformat()}T23:59:59Z"


def _item_date(feature: dict) -> dt.date | None:
    props = feature.get("properties") or {}
    value = props.get("datetime") or props.get("start_datetime")
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).date()
    except ValueError:
        return None


def choose_item(folder: NaipFolderId, features: Iterable[dict]) -> tuple[dict | None, str]:
    """The feature the folder id names, and why (or None and why not).

    First choice: items whose id contains the whole folder id (`<state>_<folder id>_<published>` on
    Planetary Computer). Else: items whose id contains the quarter-quad name and whose datetime is
    the capture date. Among several (a capture republished), the latest publication (the id's part
    after the folder id, compared as text; then the whole id): deterministic.
    """
    features = [f for f in features if isinstance(f, dict) and isinstance(f.get("id"), str)]
    exact = [f for f in features if folder.naip_id in f["id"]]
    if exact:
        # the publication date follows the folder id: compare that first, whatever the prefix
        best = max(exact, key=lambda f: (f["id"].split(folder.naip_id, 1)[1], f["id"]))
        return best, f"id contains {folder.naip_id}" + (f" ({len(exact)} candidates)" if len(exact) > 1 else "")
    same_quad = [f for f in features if folder.quarter_quad in f["id"] and _item_date(f) == folder.date]
    if same_quad:
        best = max(same_quad, key=lambda f: f["id"])
        return best, f"id contains {folder.quarter_quad}, captured {folder.date}"
    ids = sorted(f["id"] for f in features)[:5]
    return None, (f"none of {len(features)} items found ({', '.join(ids)}{', ...' if len(features) > 5 else ''}) "
                  f"is {folder.naip_id} or {folder.quarter_quad} on {folder.date}")


@dataclasses.dataclass(frozen=True)
class ItemRef:
    """What fetching needs of an item: its id, the COG href (unsigned) and its EPSG code if given."""

    item_id: str
    href: str
    epsg: int | None = None

    def to_tuple(self) -> tuple:
        return (self.item_id, self.href, self.epsg)

    @classmethod
    def from_tuple(cls, t) -> "ItemRef":
        return cls(*t)


def item_ref(feature: dict, asset: str = "image") -> ItemRef:
    """The ItemRef of a STAC item; ValueError when it has no usable `asset` href."""
    item_id = feature.get("id")
    if not isinstance(item_id, str) or not item_id:
        raise ValueError("item without an id")
    assets = feature.get("assets") or {}
    href = (assets.get(asset) or {}).get("href") if isinstance(assets, dict) else None
    if not isinstance(href, str) or not re.match(r"^https?://", href):
        raise ValueError(f"item {item_id!r} has no http(s) {asset!r} asset")
    epsg = (feature.get("properties") or {}).get("proj:epsg")
    if epsg is None:
        code = (feature.get("properties") or {}).get("proj:code")
        if isinstance(code, str) and code.upper().startswith("EPSG:"):
            epsg = code.split(":", 1)[1]
    try:
        epsg = int(epsg) if epsg is not None else None
    except (TypeError, ValueError):
        epsg = None
    return ItemRef(item_id, href, epsg)


def load_id_map(path: str, limit: int = 512 * 1024 * 1024) -> dict[str, str]:
    """A --naip-id-map file: gzip JSON (plain JSON also accepted) {folder_id: item_id}, local or gs://.
    Entries whose key is not a NAIP capture id or whose value is not a plain item id are refused."""
    data = storage.read_bytes(path, limit)
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        mapping = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: expected a JSON object {{folder_id: item_id}}")
    bad = [k for k, v in mapping.items()
           if not tiles.NAIP_ID_PATTERN.fullmatch(str(k)) or not isinstance(v, str) or not _ITEM_ID.fullmatch(v)]
    if bad:
        raise ValueError(f"{path}: {len(bad)} entries are not {{naip_id: item_id}}, e.g. {str(bad[0])[:100]!r}")
    return dict(mapping)


# ---------------------------------------------------------------------------------------------
# Grouping


def dedupe(xys: Iterable[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(unique tiles sorted by (y, x), the extra copies)."""
    seen, extra = set(), []
    for xy in xys:
        xy = (int(xy[0]), int(xy[1]))
        if xy in seen:
            extra.append(xy)
        else:
            seen.add(xy)
    return sorted(seen, key=lambda t: (t[1], t[0])), extra


def split_groups(xys: Iterable[tuple[int, int]], side: int = DEFAULT_GROUP_SIDE) -> list[list[tuple[int, int]]]:
    """Tiles of one item -> groups of at most side**2 tiles, deterministically.

    The tiles are ordered block by block (square blocks of side x side tiles, blocks row by row,
    tiles row by row inside a block) and cut into consecutive runs of side**2: a dense item gives
    one group per block (a compact window), a sparse one gathers several blocks' tiles into one
    group (one COG open for all of them)."""
    if side < 1:
        raise ValueError(f"group side must be >= 1, got {side}")
    order = sorted({(int(x), int(y)) for x, y in xys}, key=lambda t: (t[1] // side, t[0] // side, t[1], t[0]))
    n = side * side
    return [order[i:i + n] for i in range(0, len(order), n)]


# ---------------------------------------------------------------------------------------------
# Window planning


@dataclasses.dataclass
class ReadPlan:
    ranges: list[tuple[int, int]]  # [start, end) byte ranges, coalesced, sorted
    blocks: int  # distinct (band-plane, block) pieces under the tiles' windows
    block_bytes: int  # their bytes
    unplanned: bool = False  # the layout could not be read (everything is then read on demand)

    @property
    def bytes(self) -> int:
        return sum(e - s for s, e in self.ranges)


def coalesce(ranges: Iterable[tuple[int, int]], max_gap: int = DEFAULT_MAX_GAP,
             max_range: int = DEFAULT_MAX_RANGE) -> list[tuple[int, int]]:
    """Merges [start, end) ranges that overlap or lie within `max_gap` bytes of each other, as long
    as a merged range stays within `max_range` bytes (a single larger range is kept whole)."""
    out: list[list[int]] = []
    for start, end in sorted((int(s), int(e)) for s, e in ranges if e > s):
        if out and start - out[-1][1] <= max_gap and max(end, out[-1][1]) - out[-1][0] <= max_range:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def planned_bands(dataset, band: int = NIR_BAND) -> list[int]:
    """Bands whose blocks reading `band` and its validity mask touches: one plane for
    pixel-interleaved files (every band is in each block); for band-interleaved files, `band`, plus
    every band when validity comes from a nodata value (GDAL's dataset mask needs them all) or the
    alpha band."""
    from rasterio.enums import ColorInterp, MaskFlags

    interleave = (dataset.tags(ns="IMAGE_STRUCTURE").get("INTERLEAVE") or "PIXEL").upper()
    if interleave == "PIXEL":
        return [1]
    flags = dataset.mask_flag_enums[band - 1]
    if MaskFlags.nodata in flags:
        return list(range(1, dataset.count + 1))
    if MaskFlags.alpha in flags:
        alpha = [i + 1 for i, c in enumerate(dataset.colorinterp) if c == ColorInterp.alpha]
        return sorted({band, *alpha})
    return [band]


def tile_windows(dataset, xys: Iterable[tuple[int, int]], *, zoom: int = tiles.ZOOM,
                 padding: float = 0.25) -> dict:
    """{(x, y): the window `geo.reproject_to_tile` reads for the tile, or None}, computed once per
    group for planning and warping."""
    return {(int(x), int(y)): geo.source_window(dataset, int(x), int(y), zoom=zoom, padding=padding)
            for x, y in xys}


def plan_reads(dataset, xys: Iterable[tuple[int, int]], *, band: int = NIR_BAND, zoom: int = tiles.ZOOM,
               padding: float = 0.25, max_gap: int = DEFAULT_MAX_GAP,
               max_range: int = DEFAULT_MAX_RANGE, windows: dict | None = None) -> ReadPlan:
    """Byte ranges of the blocks under the source windows of `xys` (those `reproject_to_tile`
    will read), from the TIFF's block offsets (GDAL's `TIFF` metadata domain), coalesced."""
    bw, bh = dataset.block_shapes[band - 1][1], dataset.block_shapes[band - 1][0]
    windows = windows if windows is not None else tile_windows(dataset, xys, zoom=zoom, padding=padding)
    needed: set[tuple[int, int]] = set()
    for x, y in xys:
        w = windows[(int(x), int(y))]
        if w is None:
            continue
        c0, r0 = int(w.col_off) // bw, int(w.row_off) // bh
        c1, r1 = (int(w.col_off + w.width) - 1) // bw, (int(w.row_off + w.height) - 1) // bh
        needed.update((c, r) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1))
    raw = []
    for b in planned_bands(dataset, band):
        for c, r in needed:
            offset = dataset.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=b)
            size = dataset.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=b)
            if offset is None or size is None:
                if dataset.driver != "GTiff":
                    return ReadPlan([], 0, 0, unplanned=True)
                continue  # a sparse block: nothing stored
            offset, size = int(offset), int(size)
            if size > 0:
                raw.append((max(0, offset - COG_GHOST_BYTES), offset + size + COG_GHOST_BYTES))
    return ReadPlan(coalesce(raw, max_gap, max_range), len(raw), sum(e - s for s, e in raw))


# ---------------------------------------------------------------------------------------------
# Per-group reprojection and output


def reproject_group(dataset, xys: Iterable[tuple[int, int]], *, band: int = NIR_BAND, resampling: str = "nearest",
                    zoom: int = tiles.ZOOM, size: int = TILE_SIZE, padding: float = 0.25,
                    area_of_interest: str | None = None,
                    windows: dict | None = None) -> Iterator[tuple[tuple[int, int], np.ndarray, np.ndarray]]:
    """((x, y), nir uint8 [size, size], valid bool [size, size]) for each tile, from one open
    dataset (reading the bytes the group prefetched; GDAL's block cache decodes each block once).

    Nearest (the default): one warp per column of the group's tiles (`reproject_column`), which
    gives each tile exactly what `geo.reproject_to_tile` gives it alone, at a third of the cost.
    Other resamplings scale their kernels by the warped chunk's size, so each tile is warped on its
    own with `geo.reproject_to_tile`.

    `area_of_interest` should be the item's (`geo.area_of_interest(dataset)`): the coordinate
    operation is then chosen once per item, so a tile's result does not depend on which other
    tiles share its group (and GDAL's transformation cache hits)."""
    xys = [(int(x), int(y)) for x, y in xys]
    if resampling != "nearest":
        for x, y in xys:
            out, valid = geo.reproject_to_tile(dataset, x, y, bands=(band,), zoom=zoom, size=size,
                                               resampling=resampling, padding=padding, with_mask=True,
                                               area_of_interest=area_of_interest)
            yield (x, y), out[:, :, 0], valid
        return
    done = {}
    for x, ys in column_runs(xys):
        done.update(reproject_column(dataset, x, ys, band=band, zoom=zoom, size=size, padding=padding,
                                     area_of_interest=area_of_interest, windows=windows))
    for xy in xys:
        nir, valid = done[xy]
        yield xy, nir, valid


def column_runs(xys: Iterable[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """[(x, [y, y+1, ...])]: the tiles as runs of vertically adjacent tiles (a column warp covers
    exactly the tiles it is for, never rows between them)."""
    runs: list[tuple[int, list[int]]] = []
    for x, y in sorted({(int(x), int(y)) for x, y in xys}):
        if runs and runs[-1][0] == x and runs[-1][1][-1] == y - 1:
            runs[-1][1].append(y)
        else:
            runs.append((x, [y]))
    return runs


def reproject_column(dataset, x: int, ys: Iterable[int], *, band: int = NIR_BAND, zoom: int = tiles.ZOOM,
                     size: int = TILE_SIZE, padding: float = 0.25, area_of_interest: str | None = None,
                     windows: dict | None = None) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """Nearest-neighbour warp of `band` onto the tiles (x, y) for y in `ys` in one call: the
    destination is the column of tiles from min(ys) to max(ys) (`size` wide), the source the union of
    their `geo.reproject_to_tile` windows, validity GDAL's dataset mask as an alpha band, as there.

    Why a column gives each tile what warping it alone gives: GDAL's approximate transformer
    interpolates source coordinates along each destination row of a chunk, between exactly
    transformed points at the row's ends and middle; a column's rows are the tiles' own rows (same
    ends), rows are transformed independently, and nearest neighbour uses no kernel scale. Only
    floating-point rounding of the offsets differs (~1e-9 px). Tested equal on every tile of the
    real captures (tests/test_nir_fetch.py)."""
    import rasterio.warp
    import rasterio.windows

    ys = sorted({int(y) for y in ys})
    if dataset.dtypes[band - 1] != "uint8":
        raise ValueError(f"band {band} must be uint8, got {dataset.dtypes[band - 1]}")
    y0, y1 = ys[0], ys[-1]
    k = y1 - y0 + 1
    known = windows or {}
    windows = [w for w in ((known[(x, y)] if (x, y) in known else geo.source_window(dataset, x, y, zoom=zoom,
                                                                                      padding=padding))
                           for y in range(y0, y1 + 1)) if w is not None]
    destination = np.zeros((2, size * k, size), dtype=np.uint8)
    if windows:
        c0 = min(int(w.col_off) for w in windows)
        r0 = min(int(w.row_off) for w in windows)
        c1 = max(int(w.col_off + w.width) for w in windows)
        r1 = max(int(w.row_off + w.height) for w in windows)
        window = rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0)
        source = np.empty((2, r1 - r0, c1 - c0), dtype=np.uint8)
        source[0] = dataset.read(band, window=window)
        source[1] = dataset.dataset_mask(window=window)
        rasterio.warp.reproject(
            source=source,
            destination=destination,
            src_transform=dataset.window_transform(window),
            src_crs=dataset.crs,
            src_alpha=2,
            dst_transform=geo.tile_transform(x, y0, size, zoom),  # the top tile's; rows go on downwards
            dst_crs=geo.WEB_MERCATOR,
            dst_alpha=2,
            resampling=geo.RESAMPLING["nearest"],
            **({"AREA_OF_INTEREST": area_of_interest} if area_of_interest else {}),
        )
    out = {}
    for y in ys:
        i = (y - y0) * size
        valid = destination[1, i:i + size] > 0
        nir = destination[0, i:i + size].copy()
        nir[~valid] = 0
        out[(x, y)] = (nir, valid)
    return out


def render_tiles(dataset, xys: Iterable[tuple[int, int]], *, resampling: str = "nearest",
                 area_of_interest: str | None = None,
                 windows: dict | None = None) -> list[tuple[tuple[int, int], bytes | None]]:
    """[((x, y), nir.png bytes, or None when no pixel of the tile has valid source)]."""
    return [(xy, encode_nir(nir) if valid.any() else None)
            for xy, nir, valid in reproject_group(dataset, xys, resampling=resampling,
                                                  area_of_interest=area_of_interest, windows=windows)]


def encode_nir(nir: np.ndarray) -> bytes:
    """uint8 [128, 128] -> single-channel (mode L) PNG bytes."""
    if nir.shape != (TILE_SIZE, TILE_SIZE) or nir.dtype != np.uint8:
        raise ValueError(f"NIR tile must be uint8 {TILE_SIZE}x{TILE_SIZE}, got {nir.dtype} {nir.shape}")
    return imagery.encode_png(nir)


def nir_path(output: str, naip_id: str, x: int, y: int) -> str:
    """`<output>/naip/<naip_id>/<x>_<y>/nir.png` (the id is validated again: it becomes a path)."""
    tile = tiles.TileId.parse(f"{naip_id}/{x}_{y}")
    return tiles.hr_nir_path(output, tile)
