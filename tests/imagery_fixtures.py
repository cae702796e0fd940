"""PNG byte strings for tests: valid noise images, and headers forged to claim any size."""
import io
import struct
import zlib

import numpy as np
from PIL import Image

from transforms.imagery import PNG_SIGNATURE


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_bytes_noise(shape, dtype=np.uint8, black_edge=False, seed=0) -> bytes:
    """Random pixels (no black ones), optionally with a black 3-px left edge."""
    hi = 255 if dtype == np.uint8 else 65535
    array = np.random.default_rng(seed).integers(1, hi, shape).astype(dtype)
    if black_edge:
        array[:, :3] = 0
    return png_bytes(array)


def forged_header_png(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG whose IHDR (with a valid CRC) claims any size; its pixel data is a tiny stub."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat_data = zlib.compress(b"\x00" * 64)
    idat = struct.pack(">I", len(idat_data)) + b"IDAT" + idat_data + struct.pack(">I", zlib.crc32(b"IDAT" + idat_data))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return PNG_SIGNATURE + chunk + idat + iend
