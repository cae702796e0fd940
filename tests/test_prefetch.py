"""Reads started ahead (transforms/io/prefetch.py): the same bytes and the same exceptions as direct
reads, every file `load_tile` reads and no other, and the same outcomes from build_tile."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.tile_factory import NAIP_ID, black_edge, good_tile, scene, series_from, write_tile
from transforms import imagery
from transforms.io import storage
from transforms.io.prefetch import ReadAhead
from transforms.pairs import PairConfig, build_tile, load_tile, tile_paths
from transforms.selection import EXTRA_BANDS, SelectionConfig
from transforms.tiles import TileId

LIMIT = imagery.MAX_PNG_BYTES


def tid(i):
    return f"{NAIP_ID}/{36000 + i}_56000"


@pytest.fixture
def read_ahead():
    pool = ReadAhead(4)
    yield pool
    pool.close()


def test_reads_give_the_bytes_and_raise_what_a_direct_read_raises(tmp_path, read_ahead):
    present, missing, large = tmp_path / "a.png", tmp_path / "missing.png", tmp_path / "large.png"
    present.write_bytes(b"abc")
    large.write_bytes(b"x" * 100)
    reads = read_ahead.start([str(present), str(missing), str(large), str(present)], LIMIT)
    assert reads(str(present), LIMIT) == b"abc"
    with pytest.raises(FileNotFoundError):
        reads(str(missing), LIMIT)  # raised when asked for, as a direct read raises it
    small = read_ahead.start([str(large)], 10)
    with pytest.raises(ValueError, match="larger than 10 bytes"):
        small(str(large), 10)
    # not started ahead, or with another limit: read directly
    other = tmp_path / "b.png"
    other.write_bytes(b"b")
    assert reads(str(other), LIMIT) == b"b"
    with pytest.raises(ValueError, match="larger than 50 bytes"):
        reads(str(large), 50)  # the read ahead had LIMIT: this one is direct, with its own limit
    reads.cancel()
    assert ReadAhead(0).start([str(present)], LIMIT)(str(present), LIMIT) == b"abc"  # no pool: direct
    with pytest.raises(ValueError, match="threads"):
        ReadAhead(-1)


@pytest.mark.parametrize("mode, bands", [("robust", "rgbn"), ("paper", "rgbn"), ("paper", "rgb"), ("robust", "rgb")])
def test_tile_paths_are_the_files_load_tile_reads(tmp_path, mode, bands):
    root = str(tmp_path)
    rng = np.random.default_rng(0)
    hr = scene(rng)
    series = series_from(hr, rng, 5)
    write_tile(root, tid(0), hr, series, extra={b: series[..., 0] for b in EXTRA_BANDS})
    config = PairConfig(input_root=root, bands=bands, selection=SelectionConfig(mode=mode))
    asked = []

    def recording(path, limit):
        asked.append(path)
        return storage.read_bytes(path, limit)

    tile = TileId.parse(tid(0))
    load_tile(tile, config, recording)
    assert asked == tile_paths(tile, config)
    # robust: b01, b05, b08, b09, b10, b11, b12, but b08 is already the rgbn series' fourth band
    assert len(asked) == {"rgbn": 4, "rgb": 2}[bands] + ({"rgbn": 6, "rgb": 7}[bands] if mode == "robust" else 0)
    assert len(EXTRA_BANDS) == 7


def test_build_tile_with_reads_ahead_gives_the_same_outcomes(tmp_path, read_ahead):
    root = str(tmp_path)
    for i in range(3):
        good_tile(root, tid(i), seed=i, t=6)
    rng = np.random.default_rng(5)
    hr = scene(rng)
    write_tile(root, tid(3), hr, np.stack([black_edge(f) for f in series_from(hr, rng, 4)]))  # no valid timestep
    write_tile(root, tid(4), scene(rng), None)  # no Sentinel-2
    good_tile(root, tid(5), seed=5, t=4)
    os.remove(os.path.join(root, "naip", NAIP_ID, "36005_56000", "nir.png"))
    with open(os.path.join(root, "sentinel2", "36000_56000", "b10.png"), "wb") as f:
        f.write(b"corrupt")  # an unusable extra band: noted, not fatal
    config = PairConfig(input_root=root, selection=SelectionConfig(mode="robust"))  # reads the extra bands
    for i in range(6):
        direct = build_tile(tid(i), config)
        reads = read_ahead.start(tile_paths(TileId.parse(tid(i)), config), LIMIT)
        ahead = build_tile(tid(i), config, None, reads)
        reads.cancel()
        assert ahead.kind == direct.kind and ahead.record == direct.record, i
    assert build_tile(tid(0), config).record["evidence_note"].startswith("b10: decode_error")


def test_the_pool_is_shared_per_process_and_renewed_after_a_fork():
    from transforms.io import prefetch

    a = prefetch.shared_read_ahead(3)
    assert prefetch.shared_read_ahead(3) is a and prefetch.shared_read_ahead(2) is not a
    assert a.threads == 3
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a new pool, not the parent's (whose threads it does not have)
        os.write(write_end, b"1" if prefetch.shared_read_ahead(3) is not a else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"1"


def test_a_first_file_can_hold_back_the_other_reads(tmp_path, read_ahead, monkeypatch):
    """`first_decides`: the first path is read alone; its bytes decide whether the others start.
    Held back, they are never requested, yet still read directly if the tile asks for them."""
    files = [tmp_path / n for n in ("first", "b", "c")]
    for i, f in enumerate(files):
        f.write_bytes(b"x%d" % i)
    requested = []
    real = storage.read_bytes

    def counting(path, limit):
        requested.append(os.path.basename(path))
        return real(path, limit)

    monkeypatch.setattr(storage, "read_bytes", counting)
    paths = [str(f) for f in files]
    no = read_ahead.start(paths, LIMIT, first_decides=lambda data: data != b"x0")
    assert no(paths[0], LIMIT) == b"x0"
    no.cancel()
    assert requested == ["first"]
    yes = read_ahead.start(paths, LIMIT, first_decides=lambda data: True)
    assert yes(paths[0], LIMIT) == b"x0" and yes(paths[2], LIMIT) == b"x2"
    yes.cancel()
    assert sorted(requested[1:]) == ["b", "c", "first"]
    requested.clear()
    broken = read_ahead.start(paths, LIMIT, first_decides=lambda data: 1 / 0)  # unsure: read all
    assert broken(paths[0], LIMIT) == b"x0" and broken(paths[1], LIMIT) == b"x1"
    broken.cancel()
    assert sorted(requested) == ["b", "c", "first"]
    requested.clear()
    held = read_ahead.start(paths, LIMIT, first_decides=lambda data: False)
    assert held(paths[0], LIMIT) == b"x0" and held(paths[1], LIMIT) == b"x1"  # asked anyway: read directly
    held.cancel()
    assert requested == ["first", "b"]


def test_a_black_bordered_naip_tile_requests_nothing_else(tmp_path, read_ahead, monkeypatch):
    """BuildPairs' reads ahead (stages.start_reads) ask for no Sentinel-2 or NIR object of a tile
    that load_tile rejects on its NAIP image, with the same outcome as direct reads."""
    from transforms.build import stages

    root = str(tmp_path)
    rng = np.random.default_rng(3)
    good_tile(root, tid(0), seed=0, t=5)
    hr = scene(rng)
    hr[:, :2] = 0  # a black left border
    write_tile(root, tid(1), hr, series_from(scene(rng), rng, 5), extra={b: series_from(scene(rng), rng, 5)[..., 0]
                                                                          for b in EXTRA_BANDS})
    config = PairConfig(input_root=root, selection=SelectionConfig(mode="robust"))
    requested = []
    real = storage.read_bytes

    def counting(path, limit):
        requested.append(path)
        return real(path, limit)

    outcomes = {}
    for i in range(2):
        direct = build_tile(tid(i), config)
        monkeypatch.setattr(storage, "read_bytes", counting)
        reads = stages.start_reads(read_ahead, tid(i), None, config)
        ahead = build_tile(tid(i), config, None, reads)
        reads.cancel()
        read_ahead.close()  # waits for every read started: none may come later
        read_ahead.__init__(4)
        monkeypatch.setattr(storage, "read_bytes", real)
        assert ahead.kind == direct.kind and ahead.record == direct.record, i
        outcomes[i] = (ahead.kind, list(requested))
        requested.clear()
    assert outcomes[1][0] == "reject" and build_tile(tid(1), config).record["reason"] == "naip_black_border"
    assert outcomes[1][1] == [tiles_rgb(root, tid(1))]
    assert outcomes[0][0] == "pair" and len(outcomes[0][1]) > 4  # a good tile reads all it has


def tiles_rgb(root, tile_id):
    from transforms import tiles

    return tiles.hr_rgb_path(root, TileId.parse(tile_id))
