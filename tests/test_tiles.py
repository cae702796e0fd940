import pytest

from transforms import tiles
from transforms.tiles import InvalidTileId, TileId


@pytest.mark.parametrize("text", ["m_2608101_nw_17_060_20191121/35000_55000", "m_4709963_se_14_1_20090818/0_131071"])
def test_valid_ids_roundtrip(text):
    assert str(TileId.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "", "m_2608101_nw_17_060_20191121", "../m_2608101_nw_17_060_20191121/1_2",
        "m_2608101_nw_17_060_20191121/../1_2", "/etc/passwd", "m_2608101_nw_17_060_20191121/1_2/x",
        "m_2608101_nw_17_060_20191121/1_2 ", "m_2608101_nw_17_060_20191121/01_2",
        "m_2608101_nw_17_060_20191121/131072_2", "m_2608101_xx_17_060_20191121/1_2",
        "m_2608101_nw_17_060_2019112/1_2", "m_2608101_nw_17_060_20191121/-1_2",
        "m_2608101_nw_17_060_20191121\\..\\x/1_2", "m_2608101_nw_17_060_20191121/1_2\n",
    ],
)
def test_invalid_ids_are_refused(text):
    with pytest.raises(InvalidTileId):
        TileId.parse(text)


def test_paths():
    t = TileId.parse("m_2608101_nw_17_060_20191121/35000_55000")
    assert tiles.hr_rgb_path("gs://b/set", t) == "gs://b/set/naip/m_2608101_nw_17_060_20191121/35000_55000/rgb.png"
    assert tiles.s2_band_path("/d/", t, "b08") == "/d/sentinel2/35000_55000/b08.png"
    assert tiles.hr_nir_path("/n", t) == "/n/naip/m_2608101_nw_17_060_20191121/35000_55000/nir.png"
    with pytest.raises(ValueError):
        tiles.s2_band_path("/d", t, "../x")
