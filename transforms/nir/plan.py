"""Quarter-quad planning for `s2naip plan`: a published dataset's quarter quads (from its manifest
rows), the STAC search window of each, the newer captures found and the chips they affect. The
command (pipelines/plan.py) writes the work list; its docstring describes the files.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from collections import defaultdict

from transforms.build import dataset_manifest as dm
from transforms.nir import nir_fetch, stac

_LOG = logging.getLogger(__name__)
_FOLDER_ID_IN_ITEM = re.compile(r"m_[0-9]{7}_(?:ne|nw|se|sw)_[0-9]{2}_[0-9a-z]{1,4}_[0-9]{8}")


@dataclasses.dataclass
class QuarterQuad:
    name: str  # m_<quad>_<quarter>
    captures: dict[str, list[tuple[int, int]]]  # naip_id -> its chips (x, y) in the dataset

    @property
    def latest_capture(self) -> nir_fetch.NaipFolderId:
        return max((nir_fetch.parse_folder_id(n) for n in self.captures), key=lambda f: (f.date, f.naip_id))

    @property
    def chips(self) -> list[tuple[int, int]]:
        return sorted({xy for xys in self.captures.values() for xy in xys})

    def tiles_on(self, chips: set[tuple[int, int]]) -> list[str]:
        return sorted(f"{n}/{x}_{y}" for n, xys in self.captures.items() for x, y in xys if (x, y) in chips)


# ---------------------------------------------------------------------------------------------
# Pure parts


def quarter_quads(rows) -> dict[str, QuarterQuad]:
    """Manifest rows (dicts with tile_id, naip_id, tile_xy, outcome) -> the current tiles per
    quarter quad. Retired rows and invalid ids are left out."""
    out: dict[str, QuarterQuad] = {}
    for row in rows:
        if row.get("outcome") in dm.RETIRED or not row.get("naip_id") or not row.get("tile_xy"):
            continue
        try:
            folder = nir_fetch.parse_folder_id(row["naip_id"])
        except ValueError:
            continue
        x, y = (int(v) for v in row["tile_xy"].split("_"))
        qq = out.setdefault(folder.quarter_quad, QuarterQuad(folder.quarter_quad, {}))
        qq.captures.setdefault(folder.naip_id, []).append((x, y))
    return out


def search_window(qq: QuarterQuad) -> tuple[tuple[float, float, float, float], str]:
    """(lon/lat bbox of the quad's chips, RFC 3339 open interval from the day after its latest capture)."""
    after = qq.latest_capture.date + dt.timedelta(days=1)
    return nir_fetch.tiles_bbox_lonlat(qq.chips), f"{after.isoformat()}T00:00:00Z/.."


def newer_captures(qq: QuarterQuad, features) -> list[dict]:
    """The features that are captures of the same quarter quad after its latest capture, one per
    folder id (the latest publication, as `nir_fetch.choose_item` picks), oldest first:
    [{naip_id, item_id, datetime, bbox}]."""
    latest = qq.latest_capture
    by_id: dict[str, list[dict]] = defaultdict(list)
    for feature in features:
        if not isinstance(feature, dict) or not isinstance(feature.get("id"), str):
            continue
        m = _FOLDER_ID_IN_ITEM.search(feature["id"])
        if not m:
            continue
        try:
            folder = nir_fetch.parse_folder_id(m.group(0))
        except ValueError:
            continue
        if folder.quarter_quad == qq.name and folder.date > latest.date:
            by_id[folder.naip_id].append(feature)
    out = []
    for naip_id, candidates in by_id.items():
        chosen, _ = nir_fetch.choose_item(nir_fetch.parse_folder_id(naip_id), candidates)
        props = chosen.get("properties") or {}
        out.append({"naip_id": naip_id, "item_id": chosen["id"], "datetime": props.get("datetime"),
                    "bbox": chosen.get("bbox")})
    return sorted(out, key=lambda c: (c["naip_id"].rsplit("_", 1)[-1], c["naip_id"]))


def chips_within(chips, bbox) -> list[tuple[int, int]]:
    """The chips whose lon/lat bounds intersect `bbox` (all of them when the item gives no bbox)."""
    if not bbox or len(bbox) < 4:
        return list(chips)
    west, south, east, north = bbox[0], bbox[1], bbox[-2], bbox[-1]
    out = []
    for x, y in chips:
        w, s, e, n = nir_fetch.tiles_bbox_lonlat([(x, y)])
        if w < east and e > west and s < north and n > south:
            out.append((x, y))
    return out


def plan_quad(qq: QuarterQuad, client: stac.StacClient) -> dict:
    """One quad's line of quarter_quads.jsonl (one STAC search, every page)."""
    bbox, window = search_window(qq)
    line = {
        "quarter_quad": qq.name,
        "captures": sorted(qq.captures),
        "latest_capture": qq.latest_capture.naip_id,
        "tiles": sum(len(v) for v in qq.captures.values()),
        "chips": len(qq.chips),
        "bbox": [round(v, 7) for v in bbox],
        "datetime": window,
    }
    try:
        features = client.search(bbox=bbox, datetime=window)
    except (stac.HttpError, stac.StacError, OSError) as e:
        return {**line, "newer": None, "error": f"{type(e).__name__}: {e}"[:500]}
    newer = newer_captures(qq, features)
    line.update(newer=bool(newer), newer_captures=newer)
    if newer:
        newest = newer[-1]
        affected = chips_within(qq.chips, newest.get("bbox"))
        line.update(newest=newest["naip_id"], affected_chips=len(affected),
                    fetch_nir=[f"{newest['naip_id']}/{x}_{y}" for x, y in sorted(affected)],
                    affected_tiles=qq.tiles_on(set(affected)))
    return line


# ---------------------------------------------------------------------------------------------
# The command
