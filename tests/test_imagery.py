"""Safe PNG decoding: every bad input is a reject reason, and headers are checked before decoding."""
import io

import numpy as np
import pytest
from PIL import Image

from tests.imagery_fixtures import forged_header_png, png_bytes
from transforms import imagery
from transforms.imagery import ImageRejected


NOISE = np.random.default_rng(0).integers(0, 255, (128, 128, 3)).astype(np.uint8)


def test_decode_series_splits_rows_into_timesteps():
    stacked = np.arange(3 * 32 * 32 * 3, dtype=np.uint32).reshape(96, 32, 3).astype(np.uint8)
    series = imagery.decode_series(png_bytes(stacked), 3)
    assert series.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(series[1], stacked[32:64])


def test_single_channel_and_rgba():
    grey = np.full((128, 128), 9, np.uint8)
    assert imagery.decode_hr(png_bytes(grey), 1).shape == (128, 128, 1)
    rgba = np.full((128, 128, 4), 9, np.uint8)
    assert imagery.decode_hr(png_bytes(rgba), 3).shape == (128, 128, 3)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "decode_error"),
        (b"GIF89a" + b"\0" * 40, "decode_error"),
        (png_bytes(NOISE)[: len(png_bytes(NOISE)) // 2], "decode_error"),  # truncated stream
        (png_bytes(np.zeros((128, 128), np.uint16)), "bad_dtype"),  # 16-bit
        (png_bytes(np.zeros((64, 128, 3), np.uint8)), "bad_shape"),
        (png_bytes(np.zeros((128, 128), np.uint8)), "bad_shape"),  # 1 channel where RGB is needed
        (forged_header_png(50_000, 50_000), "image_too_large"),  # decompression bomb header
        (forged_header_png(128, 128, colour_type=3), "bad_dtype"),  # palette
    ],
)
def test_bad_hr_inputs_are_rejected_with_reason(data, reason):
    with pytest.raises(ImageRejected) as e:
        imagery.decode_hr(data, 3)
    assert e.value.reason == reason


def test_corrupt_ihdr_crc():
    data = bytearray(png_bytes(np.zeros((128, 128, 3), np.uint8)))
    data[20] ^= 0xFF
    with pytest.raises(ImageRejected, match="checksum"):
        imagery.decode_hr(bytes(data), 3)


def test_corrupt_pixel_data_is_decode_error():
    data = bytearray(png_bytes(NOISE))
    data[100:140] = b"\xff" * 40
    with pytest.raises(ImageRejected) as e:
        imagery.decode_hr(bytes(data), 3)
    assert e.value.reason == "decode_error"


@pytest.mark.parametrize("height, reason", [(33, "bad_shape"), (0, "bad_shape"), (32 * 5000, "image_too_large")])
def test_series_heights(height, reason):
    with pytest.raises(ImageRejected) as e:
        imagery.decode_series(forged_header_png(32, height), 3)
    assert e.value.reason == reason


def test_bomb_header_is_rejected_before_decoding(monkeypatch):
    def no_decoding(*a, **k):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(imagery, "_decode_pixels", no_decoding)
    with pytest.raises(ImageRejected):
        imagery.decode_series(forged_header_png(32, 2**31 - 1), 3)
    with pytest.raises(ImageRejected):
        imagery.decode_hr(forged_header_png(2**31 - 1, 2**31 - 1), 3)


def test_encode_png_roundtrip_keeps_single_channel_mode():
    arr = np.random.default_rng(1).integers(0, 255, (32, 32, 1)).astype(np.uint8)
    data = imagery.encode_png(arr)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
    np.testing.assert_array_equal(imagery.decode_png(data, channels=1, width=32, height=32), arr)


def _pillow_png(array: np.ndarray, mode: str | None, **save) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array) if mode is None else Image.fromarray(array, mode)).save(buf, format="PNG", **save)
    return buf.getvalue()


def _pillow_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode, channels", [("L", 1), ("LA", 1), ("RGB", 3), ("RGBA", 3), ("RGBA", 4)])
@pytest.mark.parametrize("save", [{}, {"compress_level": 0}, {"compress_level": 9}, {"optimize": True}])
def test_decoded_pixels_equal_pillows(seed, mode, channels, save):
    """The OpenCV decoder returns Pillow's pixels, channel order included, on every colour type the
    build accepts, for images of noise, flat areas and gradients (all PNG row filters occur)."""
    rng = np.random.default_rng(seed)
    depth = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    h = 32 * (1 + seed)
    img = rng.integers(0, 256, (h, 32, depth)).astype(np.uint8)
    img[: h // 2, :16] = rng.integers(0, 256, depth)  # a flat block
    img[h // 2 :, 16:] = (np.arange(16)[None, :, None] * (seed + 3) + np.arange(h - h // 2)[:, None, None]) % 256
    data = _pillow_png(img[..., 0] if depth == 1 else img, mode, **save)
    ours = imagery.decode_png(data, channels=channels, width=32, height=h)
    expected = _pillow_pixels(data)[:, :, :channels]
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, expected)


def test_rgb_with_a_transparent_colour_keeps_its_rgb():
    rgb = np.random.default_rng(3).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    data = _pillow_png(rgb, "RGB", transparency=(1, 2, 3))
    np.testing.assert_array_equal(imagery.decode_png(data, channels=3, width=32, height=32), rgb)


def test_sixteen_bit_and_palette_pngs_are_rejected_before_decoding(monkeypatch):
    def no_decoding(*a, **k):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(imagery, "_decode_pixels", no_decoding)
    sixteen = _pillow_png(np.full((32, 32), 4000, np.uint16), None)
    palette = _pillow_png(np.zeros((32, 32), np.uint8), "P")
    for data in (sixteen, palette):
        with pytest.raises(ImageRejected) as e:
            imagery.decode_png(data, channels=1, width=32, height=32)
        assert e.value.reason == "bad_dtype"


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_truncated_pixel_data_is_a_decode_error_not_partial_pixels(cut):
    data = png_bytes(NOISE)
    with pytest.raises(ImageRejected) as e:
        imagery.decode_hr(data[: int(len(data) * cut)], 3)
    assert e.value.reason == "decode_error"
