"""b05 and b09 for generated chips, so a benchmark tile carries every band s2cloudless reads.

S2-NAIP's chips hold `tci` and `b01, b05, b06, b07, b08, b09, b10, b11, b12`; the generators here
(`sample`, `hard_cases`) write `tci`, `b08` and b01, b10, b11, b12, so the robust selection's
s2cloudless evidence (`transforms.cloud_prob`: it needs b01, b05, b08, b09, b10, b11, b12) never
runs on them, and a benchmark on them leaves out its cost: two more files to read and decode per
tile and the trees on the best candidates. The benchmarks add the two bands to their inputs with
`add_to_folder`; the tests' and the quick start's samples stay as they are.

The two bands are derived from a chip's own `tci` and `b08`, no random draw, so the generators'
other bands and their random streams do not change:
- b05 (705 nm, red edge, 20 m): between red and near-infrared, 0.5 x red + 0.5 x NIR reflectance,
  averaged over 2 x 2 pixels;
- b09 (945 nm, water vapour, 60 m): 0.6 x NIR reflectance, averaged over 4 x 4 pixels;
stored as S2-NAIP stores its single bands (`clip(reflectance * 1e4 // 32, 0, 255)`), 0 where the
timestep has nodata (black) pixels, as the swath edge blanks every band.
"""
from __future__ import annotations

import os

import numpy as np

from transforms import imagery, tiles
from transforms.evidence import TCI_REFLECTANCE  # L1C TCI: 255 is reflectance 0.3558
from transforms.imagery import LR_SIZE

BANDS = ("b05", "b09")
RAW_SCALE = 1e4 / 32.0  # S2-NAIP single bands: DN = raw // 32, raw = reflectance * 1e4
MARKER = ".cloud-bands"  # a folder whose chips all have BANDS


def _block_mean(planes: np.ndarray, k: int) -> np.ndarray:
    """[T, H, W] -> block means over k x k pixels, repeated back to [T, H, W]."""
    t, h, w = planes.shape
    m = planes.reshape(t, h // k, k, w // k, k).mean(axis=(2, 4))
    return np.repeat(np.repeat(m, k, axis=1), k, axis=2)


def derive(tci: np.ndarray, b08: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 tci [T, 32, 32, 3] and b08 [T, 32, 32] -> {"b05": uint8 [T, 32, 32], "b09": ...}."""
    if tci.dtype != np.uint8 or b08.dtype != np.uint8 or tci.shape[:3] != b08.shape or tci.shape[1:] != (LR_SIZE, LR_SIZE, 3):
        raise ValueError(f"expected uint8 tci [T, {LR_SIZE}, {LR_SIZE}, 3] and b08 [T, {LR_SIZE}, {LR_SIZE}], "
                         f"got {tci.dtype} {tci.shape} and {b08.dtype} {b08.shape}")
    red = tci[..., 0] * TCI_REFLECTANCE
    nir = b08 / RAW_SCALE
    nodata = (tci.astype(np.uint16).sum(axis=-1) == 0) | (b08 == 0)
    out = {}
    for name, reflectance, k in (("b05", 0.5 * red + 0.5 * nir, 2), ("b09", 0.6 * nir, 4)):
        dn = np.clip(np.floor(_block_mean(reflectance, k) * RAW_SCALE), 0, 255).astype(np.uint8)
        dn[nodata] = 0
        out[name] = dn
    return out


def add_to_chip(s2_dir: str) -> bool:
    """Writes b05.png and b09.png into a chip folder that has tci.png and b08.png and lacks them
    (each written to a temporary name, then renamed); returns whether it wrote any."""
    paths = {b: os.path.join(s2_dir, f"{b}.png") for b in BANDS}
    if all(os.path.exists(p) for p in paths.values()):
        return False
    try:
        with open(os.path.join(s2_dir, "tci.png"), "rb") as f:
            tci = imagery.decode_series(f.read(), 3)
        with open(os.path.join(s2_dir, "b08.png"), "rb") as f:
            b08 = imagery.decode_series(f.read(), 1)[..., 0]
    except FileNotFoundError:
        return False  # a chip the sample plants without tci or b08 stays without the derived bands too
    if tci.shape[0] != b08.shape[0]:
        return False
    for name, band in derive(tci, b08).items():
        if os.path.exists(paths[name]):
            continue
        tmp = f"{paths[name]}.tmp"
        with open(tmp, "wb") as f:
            f.write(imagery.encode_png(band.reshape(-1, LR_SIZE)))
        os.replace(tmp, paths[name])
    return True


def add_to_folder(root: str, tile_ids: list[str]) -> int:
    """`add_to_chip` for the chips of `tile_ids` under an S2-NAIP-layout folder `root`, once: a
    marker file records that the folder is done. Returns the number of chips written to."""
    marker = os.path.join(root, MARKER)
    if os.path.exists(marker):
        return 0
    written = 0
    for chip in sorted({tiles.s2_dir(root, tiles.TileId.parse(t)) for t in tile_ids}):
        if os.path.isdir(chip):
            written += add_to_chip(chip)
    open(marker, "w").close()
    return written
