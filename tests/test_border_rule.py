"""The black-border rule through `select_pair`, in every selection mode: each of the four 2-px strips
on its own, the threshold (exactly `max_border_black` black pixels are kept, one more drops the
timestep), the strip width, and the defaults of `SelectionConfig`.

Timestep 0 of each series is an exact copy of the HR downsampled (the best timestep in every mode),
so a timestep the rule wrongly keeps or drops shows both in `valid_indices` and in the pick."""
import numpy as np
import pytest

from tests.tile_factory import scene, series_from
from transforms import selection as S

MODES = S.SELECTION_MODES
# (row, col) of pixels inside one strip only (not in a corner, where strips overlap), 2 per side
SIDES = {
    "top": [(0, 10), (1, 20)],
    "bottom": [(31, 10), (30, 20)],
    "left": [(10, 0), (20, 1)],
    "right": [(10, 31), (20, 30)],
}


def _tile(mode: str, seed: int = 0, t: int = 8):
    rng = np.random.default_rng(seed)
    hr = scene(rng)
    series = series_from(hr, rng, t)
    method = S.SelectionConfig(mode=mode).downsample_method
    series[0] = S.to_uint8(S.downsample(hr, 32, method))
    assert series.min() > 0  # no black pixel anywhere but the planted ones
    return hr, series


def _blacken(frame: np.ndarray, pixels) -> np.ndarray:
    out = frame.copy()
    for r, c in pixels:
        out[r, c, :3] = 0  # RGB black; the NIR band keeps its value (the rule looks at RGB only)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_the_clean_copy_is_the_pick(mode):
    hr, series = _tile(mode)
    sel = S.select_pair(hr, series, S.SelectionConfig(mode=mode))
    assert sel.lr_index == 0 and sel.valid_indices.tolist() == list(range(len(series)))


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("mode", MODES)
def test_each_strip_counts_at_the_default_threshold(mode, side):
    """The default (max_border_black = 1): one black pixel in a strip is kept, two drop the timestep."""
    hr, series = _tile(mode)
    one, two = series.copy(), series.copy()
    one[0] = _blacken(series[0], SIDES[side][:1])
    two[0] = _blacken(series[0], SIDES[side])
    kept = S.select_pair(hr, one, S.SelectionConfig(mode=mode))
    assert 0 in kept.valid_indices and kept.lr_index == 0
    dropped = S.select_pair(hr, two, S.SelectionConfig(mode=mode))
    assert 0 not in dropped.valid_indices and 0 not in dropped.candidate_indices and dropped.lr_index != 0
    assert dropped.valid_indices.tolist() == list(range(1, len(series)))


@pytest.mark.parametrize("mode", MODES)
def test_threshold_is_max_border_black_exactly(mode):
    """Exactly `max_border_black` black pixels are kept, one more is dropped, spread over all four
    strips (each strip counted)."""
    hr, series = _tile(mode, seed=1)
    all_pixels = [p for side in ("top", "right", "bottom", "left") for p in SIDES[side]]  # 8 pixels, 4 sides
    for limit in (0, 3, 7):
        config = S.SelectionConfig(mode=mode, max_border_black=limit)
        at = series.copy()
        at[0] = _blacken(series[0], all_pixels[:limit])
        assert 0 in S.select_pair(hr, at, config).valid_indices, limit
        over = series.copy()
        over[0] = _blacken(series[0], all_pixels[: limit + 1])
        assert 0 not in S.select_pair(hr, over, config).valid_indices, limit


@pytest.mark.parametrize("mode", MODES)
def test_a_corner_pixel_counts_twice(mode):
    """A black corner lies in two strips: one pixel alone is over the default threshold."""
    hr, series = _tile(mode, seed=2)
    for corner in ((0, 0), (0, 31), (31, 0), (31, 31)):
        planted = series.copy()
        planted[0] = _blacken(series[0], [corner])
        assert 0 not in S.select_pair(hr, planted, S.SelectionConfig(mode=mode)).valid_indices, corner


@pytest.mark.parametrize("mode", MODES)
def test_strip_width_is_border_px(mode):
    """Black pixels on the third row/column are outside the default 2-px strips; border_px=3 sees them."""
    hr, series = _tile(mode, seed=3)
    planted = series.copy()
    planted[0] = _blacken(series[0], [(2, 10), (2, 20), (10, 29), (29, 12)])  # row 2, col 29, row 29
    assert S.select_pair(hr, planted, S.SelectionConfig(mode=mode)).lr_index == 0
    wide = S.select_pair(hr, planted, S.SelectionConfig(mode=mode, border_px=3))
    assert 0 not in wide.valid_indices


def test_a_black_nir_band_is_not_a_black_border():
    hr, series = _tile("paper", seed=4)
    planted = series.copy()
    planted[0, :2, :, 3] = 0  # NIR only: the RGB sum decides
    assert S.select_pair(hr, planted, S.SelectionConfig(mode="paper")).lr_index == 0


def test_selection_config_defaults_through_select_pair():
    """SelectionConfig() as every entry point builds it: 2-px strips, at most 1 black pixel; and the
    library default mode applies the same rule."""
    config = S.SelectionConfig()
    assert (config.border_px, config.max_border_black) == (2, 1)
    hr, series = _tile(config.mode, seed=5)
    one, two = series.copy(), series.copy()
    one[0] = _blacken(series[0], [(0, 15)])
    two[0] = _blacken(series[0], [(0, 15), (31, 15)])
    assert S.select_pair(hr, one).lr_index == 0
    assert 0 not in S.select_pair(hr, two).valid_indices
