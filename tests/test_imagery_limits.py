"""The exact limits of the PNG checks and the black-border defaults (mutation testing found them
unpinned: see docs/testing.md)."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.imagery_fixtures import forged_header_png, png_bytes
from transforms import imagery
from transforms.imagery import PNG_SIGNATURE, ImageRejected


def _reason(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except ImageRejected as e:
        return e.reason, e.detail
    return None, None


def test_the_series_height_limit_is_max_timesteps_exactly():
    assert imagery.MAX_TIMESTEPS == 4096
    at = forged_header_png(32, 32 * imagery.MAX_TIMESTEPS, colour_type=2)
    over = forged_header_png(32, 32 * (imagery.MAX_TIMESTEPS + 1), colour_type=2)
    assert _reason(imagery.decode_series, over, 3)[0] == "image_too_large"
    assert _reason(imagery.decode_series, at, 3)[0] == "decode_error"  # passes the size check; stub pixels


def test_the_file_size_limit_is_64_mib_exactly():
    assert imagery.MAX_PNG_BYTES == 64 * 1024 * 1024
    at = PNG_SIGNATURE + bytes(imagery.MAX_PNG_BYTES - len(PNG_SIGNATURE))
    assert _reason(imagery.decode_hr, at, 3)[0] == "decode_error"  # not too large: a bad IHDR
    assert _reason(imagery.decode_hr, at + b"\0", 3)[0] == "image_too_large"


def test_a_33_byte_header_is_enough_and_the_signature_is_checked_first():
    header = forged_header_png(128, 128)[:33]  # signature, IHDR chunk and its CRC: nothing else
    assert imagery.png_header(header) == (128, 128, 8, 2)
    reason, detail = _reason(imagery.png_header, b"GIF89a" + forged_header_png(128, 128)[6:])
    assert reason == "decode_error" and "signature" in detail
    with pytest.raises(ImageRejected, match="signature"):
        imagery.png_header(header[:32])


def test_an_ihdr_of_the_wrong_length_is_rejected_as_such():
    ihdr = struct.pack(">IIBBBBB", 128, 128, 8, 2, 0, 0, 0) + b"\0"
    chunk = struct.pack(">I", 14) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    reason, detail = _reason(imagery.png_header, PNG_SIGNATURE + chunk + bytes(20))
    assert reason == "decode_error" and "IHDR" in detail and "checksum" not in detail


def test_grey_alpha_pngs_decode_as_grey():
    la = np.dstack([np.full((128, 128), 77, np.uint8), np.full((128, 128), 255, np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(la, "LA").save(buf, format="PNG")
    out = imagery.decode_hr(buf.getvalue(), 1)
    assert out.shape == (128, 128, 1) and (out == 77).all()


def test_black_border_defaults_are_two_px_and_one_pixel():
    img = np.full((32, 32, 3), 50, np.uint8)
    img[2, 10] = img[2, 20] = 0  # the third row: outside the default 2-px strips
    assert imagery.black_border_count(img) == 0 and not imagery.has_black_border(img)
    assert imagery.has_black_border(img, border=3)
    img[2, 20] = 50
    img[1, 10] = img[1, 20] = 0
    assert imagery.black_border_count(img) == 2 and imagery.has_black_border(img)
    assert imagery.black_border_count(img, border=3) == 3


def test_encode_png_keeps_rgb():
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    with Image.open(io.BytesIO(imagery.encode_png(rgb))) as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), rgb)
    assert png_bytes(rgb)[:8] == PNG_SIGNATURE


def _strip_counts(images, border):
    """The rule written out: four strips, a pixel black when its R, G and B are all 0."""
    rgb = images[..., :3]
    strips = (rgb[..., :border, :, :], rgb[..., -border:, :, :], rgb[..., :, :border, :], rgb[..., :, -border:, :])
    return sum((s == 0).all(axis=-1).sum(axis=(-2, -1)) for s in strips)


def test_black_border_count_gathered_is_the_four_strips_count():
    """The one-gather count (4 contiguous bands read as 32-bit words, else an OR of R, G, B) equals
    the four strips' counts: 3, 4 and 5 bands, non-contiguous stacks, a black NIR alone, one image
    and stacks, borders 0 (numpy's -0 slice: whole rows), 1, 2, and wider than the image."""
    rng = np.random.default_rng(5)
    for shape in ((27, 32, 32, 4), (27, 32, 32, 3), (6, 32, 32, 5), (128, 128, 4), (128, 128, 3), (2, 3, 4, 5, 4), (4, 3, 3, 4)):
        images = rng.integers(0, 2, shape, dtype=np.uint8)
        images[..., 3:] = rng.integers(0, 2, images[..., 3:].shape, dtype=np.uint8)
        for view in (images, images[..., ::-1, :, :], images[..., :, 1:, :]):  # non-contiguous too
            for border in (0, 1, 2, 5):
                got = imagery.black_border_count(view, border)
                want = _strip_counts(view, border)
                assert np.shape(got) == np.shape(want)
                np.testing.assert_array_equal(got, want)
    nir_only = np.zeros((3, 32, 32, 4), np.uint8)
    nir_only[..., :3] = 9  # lit R, G, B over a black NIR: no black pixel
    assert (imagery.black_border_count(nir_only) == 0).all()
    nir_only[1, 0, 5, :3] = 0
    np.testing.assert_array_equal(imagery.black_border_count(nir_only), [0, 1, 0])
