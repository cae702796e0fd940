"""The benchmark's derived b05 / b09 bands (transforms/devdata/cloud_bands.py): with them a generated
chip has every band s2cloudless reads, so the robust selection's whole cost is what a benchmark measures."""
import os

import numpy as np
import pytest

from transforms import cloud_prob, imagery, tiles
from transforms.devdata import cloud_bands
from transforms.devdata.sample import generate_sample
from transforms.pairs import PairConfig, TileRejected, load_tile
from transforms.selection import SelectionConfig, select_pair


def _chip(t=3, seed=0):
    rng = np.random.default_rng(seed)
    tci = rng.integers(1, 256, (t, 32, 32, 3), dtype=np.uint8)
    b08 = rng.integers(1, 256, (t, 32, 32), dtype=np.uint8)
    return tci, b08


def test_derived_bands_follow_their_formula_at_their_resolution():
    tci, b08 = _chip()
    out = cloud_bands.derive(tci, b08)
    assert set(out) == {"b05", "b09"} and all(v.dtype == np.uint8 and v.shape == b08.shape for v in out.values())
    red = tci[..., 0] * (0.3558 / 255.0)
    nir = b08 / (1e4 / 32.0)
    # b05: 2 x 2 means of 0.5 red + 0.5 nir; b09: 4 x 4 means of 0.6 nir (as DN = reflectance * 1e4 // 32)
    b05 = (0.5 * red + 0.5 * nir).reshape(3, 16, 2, 16, 2).mean(axis=(2, 4))
    b09 = (0.6 * nir).reshape(3, 8, 4, 8, 4).mean(axis=(2, 4))
    np.testing.assert_array_equal(out["b05"][:, ::2, ::2], np.clip(np.floor(b05 * 1e4 / 32), 0, 255))
    np.testing.assert_array_equal(out["b09"][:, ::4, ::4], np.clip(np.floor(b09 * 1e4 / 32), 0, 255))
    assert (out["b09"][:, :4, :4] == out["b09"][:, :1, :1]).all()  # one value per 60 m block


def test_nodata_pixels_stay_nodata_in_the_derived_bands():
    tci, b08 = _chip()
    tci[1, :, :5] = 0  # a swath edge on timestep 1
    out = cloud_bands.derive(tci, b08)
    assert (out["b05"][1, :, :5] == 0).all() and (out["b09"][1, :, :5] == 0).all()
    assert (out["b05"][0] > 0).any()


def test_derive_rejects_what_is_no_chip():
    tci, b08 = _chip()
    with pytest.raises(ValueError, match="expected uint8"):
        cloud_bands.derive(tci[:2], b08)
    with pytest.raises(ValueError, match="expected uint8"):
        cloud_bands.derive(tci.astype(np.float32), b08)


def test_a_benchmark_sample_gets_what_s2cloudless_needs_and_the_robust_mode_runs_it(tmp_path):
    root = str(tmp_path)
    generate_sample(root, 12, seed=3, timesteps=(8, 10), extra_bands=True)
    with open(os.path.join(root, "manifest.txt")) as f:
        ids = [line.strip() for line in f if line.strip()]
    written = cloud_bands.add_to_folder(root, ids)
    assert written > 0 and os.path.exists(os.path.join(root, cloud_bands.MARKER))
    assert cloud_bands.add_to_folder(root, ids) == 0  # once per folder
    config = PairConfig(input_root=root, selection=SelectionConfig(mode="robust"))
    ran = 0
    for tile_id in ids:
        tile = tiles.TileId.parse(tile_id)
        try:
            inputs = load_tile(tile, config)
        except TileRejected:
            continue
        # a chip the sample writes whole now has every band s2cloudless reads
        assert cloud_prob.available(inputs.extra, has_nir=True), sorted(inputs.extra)
        with open(tiles.s2_band_path(root, tile, "b09"), "rb") as f:
            assert imagery.decode_series(f.read(), 1).shape[0] == inputs.series.shape[0]
        selection = select_pair(inputs.hr, inputs.series, config.selection, inputs.extra)
        assert selection.evidence.cloud_prob is not None
        ran += 1
    assert ran >= 8


def test_a_chip_without_tci_or_b08_is_left_as_it_is(tmp_path):
    chip = tmp_path / "sentinel2" / "1_2"
    chip.mkdir(parents=True)
    tci, _ = _chip()
    (chip / "tci.png").write_bytes(imagery.encode_png(tci.reshape(-1, 32, 3)))
    assert cloud_bands.add_to_chip(str(chip)) is False
    assert sorted(os.listdir(chip)) == ["tci.png"]
