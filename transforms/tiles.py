"""Tile ids, the S2-NAIP folder layout, and where each input file of a tile lives.

A tile id is `<naip_id>/<x>_<y>`: the NAIP quarter-quad capture and the Web-Mercator zoom-17 tile
column and row. Ids come from manifests and listings, i.e. untrusted text, so every id is parsed
against a strict pattern before it is joined to any path: no `..`, no separators, no absolute paths.
"""
from __future__ import annotations

import dataclasses
import re

from transforms.io.storage import join

ZOOM = 17
MAX_TILE_INDEX = 2**ZOOM - 1

# NAIP quarter-quad capture names: m_<7-digit quad>_<quarter>_<UTM zone>_<resolution>_<YYYYMMDD>,
# e.g. m_2608101_nw_17_060_20191121 (S2-NAIP, 0.6 m) or m_4709963_se_14_1_20090818 (1 m era).
NAIP_ID_PATTERN = re.compile(r"m_[0-9]{7}_(?:ne|nw|se|sw)_[0-9]{2}_[0-9a-z]{1,4}_[0-9]{8}")
_XY_PATTERN = re.compile(r"(0|[1-9][0-9]{0,5})_(0|[1-9][0-9]{0,5})")

# Sentinel-2 bands as S2-NAIP names its files; `tci` is the RGB true-colour composite.
S2_BANDS = ("tci", "b01", "b05", "b06", "b07", "b08", "b09", "b10", "b11", "b12")


class InvalidTileId(ValueError):
    """A tile id that does not match `<naip_id>/<x>_<y>`; it never reaches a path."""


@dataclasses.dataclass(frozen=True, order=True)
class TileId:
    naip_id: str
    x: int
    y: int

    @property
    def xy(self) -> str:
        return f"{self.x}_{self.y}"

    def __str__(self) -> str:
        return f"{self.naip_id}/{self.xy}"

    @classmethod
    def parse(cls, text: str) -> "TileId":
        if not isinstance(text, str):
            raise InvalidTileId(f"tile id must be text, got {type(text).__name__}")
        parts = text.split("/")
        if len(parts) != 2:
            raise InvalidTileId(f"tile id {text[:200]!r} is not <naip_id>/<x>_<y>")
        naip_id, xy = parts
        if not NAIP_ID_PATTERN.fullmatch(naip_id):
            raise InvalidTileId(f"tile id {text[:200]!r}: {naip_id[:100]!r} is not a NAIP capture id")
        m = _XY_PATTERN.fullmatch(xy)
        if not m:
            raise InvalidTileId(f"tile id {text[:200]!r}: {xy[:100]!r} is not <x>_<y>")
        x, y = int(m.group(1)), int(m.group(2))
        if x > MAX_TILE_INDEX or y > MAX_TILE_INDEX:
            raise InvalidTileId(f"tile id {text[:200]!r}: x/y outside zoom {ZOOM}")
        return cls(naip_id, x, y)


def manifest_line_id(line: str) -> str | None:
    """A text manifest's line -> its tile id, or None for a blank or comment line. '#' starts a
    comment anywhere on a line (`<id>  # note`): no tile id contains '#'."""
    text = line.split("#", 1)[0].strip()
    return text or None


def keyed_by_itself(tile_id: str) -> tuple[str, None]:
    """(tile_id, None): an id keyed for a join (a module function, pickled by name, not by value)."""
    return tile_id, None


def hr_rgb_path(root: str, tile: TileId) -> str:
    return join(root, "naip", tile.naip_id, tile.xy, "rgb.png")


def hr_nir_path(nir_root: str, tile: TileId) -> str:
    return join(nir_root, "naip", tile.naip_id, tile.xy, "nir.png")


def s2_dir(root: str, tile: TileId) -> str:
    return join(root, "sentinel2", tile.xy)


def s2_band_path(root: str, tile: TileId, band: str) -> str:
    if band not in S2_BANDS:
        raise ValueError(f"unknown Sentinel-2 band {band!r}; expected one of {S2_BANDS}")
    return join(s2_dir(root, tile), f"{band}.png")
