"""Writes small S2-NAIP-layout tiles for tests: a smooth random scene, its series, and defects."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image
from scipy import ndimage

NAIP_ID = "m_2608101_nw_17_060_20191121"


def scene(rng: np.random.Generator, size: int = 128, bands: int = 4) -> np.ndarray:
    """A textured uint8 scene in [20, 235] without black pixels."""
    noise = rng.normal(size=(size, size, bands))
    smooth = ndimage.gaussian_filter(noise, sigma=(3, 3, 0))
    smooth = (smooth - smooth.min()) / (np.ptp(smooth) + 1e-9)
    return (20 + 215 * smooth).astype(np.uint8)


def area_down(image: np.ndarray, factor: int = 4) -> np.ndarray:
    h, w, c = image.shape
    return image.reshape(h // factor, factor, w // factor, factor, c).mean(axis=(1, 3))


def series_from(hr: np.ndarray, rng: np.random.Generator, t: int, gain: float = 0.8) -> np.ndarray:
    """T noisy, domain-shifted 32x32 views of the HR."""
    base = area_down(hr.astype(np.float64)) * gain + 5
    out = base[None] + rng.normal(scale=12.0, size=(t, *base.shape))
    return np.clip(out, 1, 255).astype(np.uint8)


def cloud(frame: np.ndarray) -> np.ndarray:
    out = frame.astype(np.float64)
    out[4:28, 2:30] = 0.15 * out[4:28, 2:30] + 0.85 * 245
    return np.clip(out, 1, 255).astype(np.uint8)


def black_edge(frame: np.ndarray, width: int = 6) -> np.ndarray:
    out = frame.copy()
    out[:, :width] = 0
    return out


def write_png(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    Image.fromarray(array).save(path)


def write_tile(root: str, tile_id: str, hr: np.ndarray, series: np.ndarray | None, *,
               nir: bool = True, b08: bool = True, extra: dict[str, np.ndarray] | None = None) -> None:
    """hr [128,128,4], series [T,32,32,4] -> naip/<id>/<xy>/{rgb,nir}.png, sentinel2/<xy>/{tci,b08}.png;
    `extra` {band: [T,32,32] uint8} -> sentinel2/<xy>/<band>.png (the robust mode's b01, b10, ...)."""
    naip_id, xy = tile_id.split("/")
    write_png(f"{root}/naip/{naip_id}/{xy}/rgb.png", hr[..., :3])
    if nir:
        write_png(f"{root}/naip/{naip_id}/{xy}/nir.png", hr[..., 3])
    if series is not None:
        stacked = series.reshape(-1, series.shape[2], series.shape[3])
        write_png(f"{root}/sentinel2/{xy}/tci.png", stacked[..., :3])
        if b08:
            write_png(f"{root}/sentinel2/{xy}/b08.png", stacked[..., 3])
    for band, values in (extra or {}).items():
        write_png(f"{root}/sentinel2/{xy}/{band}.png", values.reshape(-1, values.shape[-1]))


def good_tile(root: str, tile_id: str, seed: int, t: int = 12) -> None:
    rng = np.random.default_rng(seed)
    hr = scene(rng)
    write_tile(root, tile_id, hr, series_from(hr, rng, t))
