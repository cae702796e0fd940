"""What a tile reads, and how cheaply (transforms/pairs.py `read_plan`, `planned_extra_bands`;
transforms/io/storage.py `read_local`; transforms/build/object_meta.py `local_file_meta`;
transforms/imagery.py `stack_channels`): no band is requested that feeds no term of the selection,
no file after one the tile cannot do without, and the outputs are those of reading everything."""
from __future__ import annotations

import dataclasses
import itertools
import os

import numpy as np
import pytest

from tests.tile_factory import NAIP_ID, scene, series_from, write_tile
from transforms import cloud_prob, imagery, pairs, tiles
from transforms.build import fingerprints as fpr
from transforms.build import object_meta
from transforms.build import stages
from transforms.io import storage
from transforms.io.prefetch import ReadAhead
from transforms.pairs import PairConfig, build_tile, planned_extra_bands, read_plan
from transforms.selection import EXTRA_BANDS, SelectionConfig, select_pair, with_timesteps
from transforms.tiles import TileId

LIMIT = imagery.MAX_PNG_BYTES
ROBUST = SelectionConfig(mode="robust")


def tid(i):
    return f"{NAIP_ID}/{37000 + i}_57000"


# ---------------------------------------------------------------------------------------------
# Cheaper forms, the same bytes and arrays


@pytest.mark.parametrize("size", [0, 1, 5, 100, 4096, 70000])
def test_read_local_is_a_buffered_read_of_limit_plus_one(tmp_path, size):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(size))
    for limit in sorted({0, 1, max(size - 1, 0), size, size + 1, LIMIT}):
        with open(path, "rb") as f:
            expected = f.read(limit + 1)
        assert storage.read_local(str(path), limit) == expected, limit
    if size:
        with pytest.raises(ValueError, match=f"larger than {size - 1} bytes"):
            storage.read_bytes(str(path), size - 1)
    assert storage.read_bytes(str(path), LIMIT) == path.read_bytes()
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path), LIMIT)  # a folder is no file
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "missing"), LIMIT)


def test_read_local_reads_on_a_stream_that_is_not_a_regular_file(tmp_path):
    read_end, write_end = os.pipe()  # fstat says 0 bytes; the data comes in two writes
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.write(write_end, b"a" * 10)
        os.write(write_end, b"b" * 10)
        os._exit(0)
    os.close(write_end)
    try:
        data = storage.read_local(f"/proc/self/fd/{read_end}", 15)
    finally:
        os.waitpid(pid, 0)
        os.close(read_end)
    assert data == b"a" * 10 + b"b" * 6  # limit + 1 bytes: the caller's "larger than" test


@pytest.mark.parametrize("size", [0, 3, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 7])
def test_local_fingerprints_are_the_content_crc32c(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "f.png"
    path.write_bytes(data)
    meta = object_meta.local_file_meta(str(path))
    assert meta == object_meta.ObjectMeta(size, object_meta.crc32c_hex(data))
    assert fpr.fingerprint(meta) == fpr.fingerprint_bytes(data)
    assert object_meta.local_file_meta(str(tmp_path)) is None
    assert object_meta.local_file_meta(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("first, second", [((27, 32, 32, 3), (27, 32, 32, 1)), ((128, 128, 3), (128, 128, 1)),
                                           ((1, 32, 32, 3), (1, 32, 32, 1)), ((4, 32, 32, 2), (4, 32, 32, 2))])
def test_stack_channels_is_numpys_concatenation(first, second):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, first, dtype=np.uint8)
    b = rng.integers(0, 256, second, dtype=np.uint8)
    for x in (a, rng.integers(0, 256, (*first[:-1], first[-1] + 1), dtype=np.uint8)[..., 1:]):  # and a view
        out = imagery.stack_channels(x, b)
        expected = np.concatenate([x, b], axis=-1)
        assert out.dtype == expected.dtype and out.shape == expected.shape and out.flags.c_contiguous
        assert np.array_equal(out, expected)
    f = rng.random(first).astype(np.float32)
    assert np.array_equal(imagery.stack_channels(f, f), np.concatenate([f, f], axis=-1))


# ---------------------------------------------------------------------------------------------
# The plan: which optional band feeds which term


def test_the_plan_keeps_what_a_term_uses():
    cloud = set(cloud_prob.CLOUD_BANDS)
    assert set(pairs.EXTRA_BAND_TERMS) == set(EXTRA_BANDS) and cloud <= set(EXTRA_BANDS)
    robust = PairConfig(input_root="r", selection=ROBUST)
    everything = set(EXTRA_BANDS)
    assert planned_extra_bands(robust, everything) == ("b01", "b05", "b09", "b10", "b11", "b12")
    # S2-NAIP's own chip, b06 and b07 aside: every band it has feeds s2cloudless
    assert planned_extra_bands(robust, everything - {"b08"}) == ("b01", "b05", "b09", "b10", "b11", "b12")
    assert planned_extra_bands(robust, everything - {"b09"}) == ("b01", "b10", "b11", "b12")
    assert planned_extra_bands(robust, {"b05", "b09"}) == ()
    rgb = dataclasses.replace(robust, bands="rgb")
    assert planned_extra_bands(rgb, everything) == ("b01", "b05", "b08", "b09", "b10", "b11", "b12")
    assert planned_extra_bands(rgb, everything - {"b08"}) == ("b01", "b10", "b11", "b12")
    paper = PairConfig(input_root="r", selection=SelectionConfig(mode="paper"))
    assert planned_extra_bands(paper, everything) == ()  # one timestep: no optional band at all
    gated = PairConfig(input_root="r", selection=SelectionConfig(mode="paper", lr_timesteps=2))
    assert planned_extra_bands(gated, everything) == ("b01", "b05", "b09", "b10", "b11", "b12")
    assert planned_extra_bands(gated, everything - {"b05"}) == ()  # s2cloudless is its only term


def _bands(rng, t):
    return {b: rng.integers(0, 256, (t, 32, 32), dtype=np.uint8) for b in EXTRA_BANDS}


@pytest.mark.parametrize("config", [ROBUST, SelectionConfig(mode="paper", lr_timesteps=3, allow_fewer=True),
                                    SelectionConfig(mode="companion", lr_timesteps=2, allow_fewer=True)],
                         ids=["robust", "paper-gated", "companion-gated"])
@pytest.mark.parametrize("bands", ["rgbn", "rgb"])
def test_bands_left_out_of_the_plan_change_no_selection(config, bands):
    """For every set of optional bands a chip may hold, the selection from the planned bands equals
    the one from all of them (choice, scores, every evidence array), bar `Evidence.bands`."""
    rng = np.random.default_rng(4)
    hr = scene(rng)
    series = series_from(hr, rng, 6)
    hr, series = (hr, series) if bands == "rgbn" else (hr[..., :3], series[..., :3])
    every = _bands(rng, 6)
    pair_config = PairConfig(input_root="r", bands=bands, selection=config)
    optional = pairs.extra_bands(pair_config)
    checked = 0
    for n in range(len(optional) + 1):
        for present in itertools.combinations(optional, n):
            planned = planned_extra_bands(pair_config, set(present))
            if planned == present:
                continue
            full = with_timesteps(select_pair(hr, series, config, {b: every[b] for b in present}), series, config)
            plan = with_timesteps(select_pair(hr, series, config, {b: every[b] for b in planned}), series, config)
            _assert_same_selection(full, plan)
            checked += 1
    assert checked > 0


def _assert_same_selection(a, b):
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if field.name == "evidence" and x is not None:
            for ef in dataclasses.fields(x):
                if ef.name != "bands":
                    _assert_equal(getattr(x, ef.name), getattr(y, ef.name), ef.name)
        elif field.name != "evidence":
            _assert_equal(x, y, field.name)


def _assert_equal(x, y, name):
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        assert np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True), name
    elif dataclasses.is_dataclass(x):
        for f in dataclasses.fields(x):
            _assert_equal(getattr(x, f.name), getattr(y, f.name), f"{name}.{f.name}")
    else:
        assert x == y or (x != x and y != y), name


# ---------------------------------------------------------------------------------------------
# Requests: a listing's plan asks for nothing the tile does not use


def _nan_equal(value):
    """A record with every NaN float replaced by the string 'nan' (NaN equals nothing, itself included)."""
    if isinstance(value, dict):
        return {k: _nan_equal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_equal(v) for v in value]
    return "nan" if isinstance(value, float) and value != value else value


def _write_chips(root: str) -> dict[str, str]:
    """Tiles: all of s2cloudless's bands; b05 without b09; no b08 (rgbn cannot do without it);
    no tci; a corrupt b05 while b09 is missing."""
    rng = np.random.default_rng(11)
    kinds = {}
    for i, kind in enumerate(["full", "no_b09", "no_b08", "no_tci", "corrupt_b05_no_b09"]):
        hr = scene(rng)
        series = series_from(hr, rng, 5)
        extra = _bands(rng, 5)
        extra.pop("b08")
        if kind in ("no_b09", "corrupt_b05_no_b09"):
            extra.pop("b09")
        write_tile(root, tid(i), hr, series, b08=kind != "no_b08", extra=extra)
        s2 = tiles.s2_dir(root, TileId.parse(tid(i)))
        if kind == "no_tci":
            os.remove(os.path.join(s2, "tci.png"))
        if kind == "corrupt_b05_no_b09":
            with open(os.path.join(s2, "b05.png"), "wb") as f:
                f.write(b"not a png")
        kinds[tid(i)] = kind
    return kinds


@pytest.mark.parametrize("threads", [0, 4])
def test_a_listed_tile_requests_only_what_its_plan_uses(tmp_path, monkeypatch, threads):
    root = str(tmp_path)
    kinds = _write_chips(root)
    config = PairConfig(input_root=root, selection=ROBUST)
    spec = fpr.FingerprintSpec.for_config(config)
    read_ahead = ReadAhead(threads)
    real = storage.read_bytes
    for tile_id, kind in kinds.items():
        direct = build_tile(tile_id, config)  # no listing: reads every file there is
        fps = fpr.tile_fingerprints(tile_id, spec)
        requested = []

        def counting(path, limit):
            requested.append(os.path.basename(path))
            return real(path, limit)

        monkeypatch.setattr(storage, "read_bytes", counting)
        reads = stages.start_reads(read_ahead, tile_id, None, config, fps, spec)
        listed = build_tile(tile_id, config, None, reads)
        reads.cancel()
        read_ahead.close()  # waits for every read started: none may come later
        read_ahead.__init__(threads)
        monkeypatch.setattr(storage, "read_bytes", real)
        assert listed.kind == direct.kind, kind
        expected = {
            "full": ["rgb", "tci", "b08", "nir", "b01", "b05", "b09", "b10", "b11", "b12"],
            "no_b09": ["rgb", "tci", "b08", "nir", "b01", "b10", "b11", "b12"],
            "corrupt_b05_no_b09": ["rgb", "tci", "b08", "nir", "b01", "b10", "b11", "b12"],
            "no_b08": ["rgb", "tci"],
            "no_tci": ["rgb"],
        }[kind]
        assert sorted(requested) == sorted(f"{n}.png" for n in expected), kind
        if kind in ("no_b09", "corrupt_b05_no_b09"):  # b05 fed nothing: no longer named
            assert direct.record["evidence_bands"] == ["b01", "b10", "b11", "b12"]
        assert _nan_equal(listed.record) == _nan_equal(direct.record), kind
    assert build_tile(tid(0), config).record["evidence_bands"] == ["b01", "b05", "b09", "b10", "b11", "b12"]
    assert build_tile(tid(2), config).record["reason"] == "missing_band"
    assert build_tile(tid(3), config).record["reason"] == "missing_band"


def test_a_gated_paper_build_reads_no_band_without_the_whole_set(tmp_path, monkeypatch):
    root = str(tmp_path)
    _write_chips(root)
    config = PairConfig(input_root=root, selection=SelectionConfig(mode="paper", lr_timesteps=2, allow_fewer=True))
    spec = fpr.FingerprintSpec.for_config(config)
    tile = TileId.parse(tid(1))  # b05 without b09
    absent = fpr.absent_paths(tile, spec, fpr.tile_fingerprints(tid(1), spec))
    planned = [os.path.basename(p) for p in read_plan(tile, config, absent)]
    assert planned == ["rgb.png", "tci.png", "b08.png", "nir.png"]
    full = TileId.parse(tid(0))
    absent = fpr.absent_paths(full, spec, fpr.tile_fingerprints(tid(0), spec))
    assert len(read_plan(full, config, absent)) == 4 + 6
    assert read_plan(full, config) == pairs.tile_paths(full, config)  # no listing: every file


def test_the_naip_image_decoded_by_the_read_ahead_is_not_decoded_again(tmp_path, monkeypatch):
    """`stages.hr_reads_on` decodes rgb.png on the reader thread to decide whether the tile reads on;
    `load_tile` takes that image (`TileReads.kept`) instead of decoding the bytes a second time,
    with the same outcome as a direct build."""
    root = str(tmp_path)
    kinds = _write_chips(root)
    rng = np.random.default_rng(12)
    hr = scene(rng)
    hr[:2] = 0  # a black top border: rejected from the kept image
    write_tile(root, tid(9), hr, series_from(scene(rng), rng, 5))
    config = PairConfig(input_root=root, selection=ROBUST)
    real = imagery.decode_hr
    calls = []

    def counting(data, channels):
        calls.append(channels)
        return real(data, channels)

    read_ahead = ReadAhead(4)
    try:
        for tile_id in [*kinds, tid(9)]:
            direct = build_tile(tile_id, config)
            monkeypatch.setattr(imagery, "decode_hr", counting)
            reads = stages.start_reads(read_ahead, tile_id, None, config)
            ahead = build_tile(tile_id, config, None, reads)
            reads.cancel()
            monkeypatch.setattr(imagery, "decode_hr", real)
            assert _nan_equal(ahead.record) == _nan_equal(direct.record), tile_id
            assert calls.count(3) == 1, tile_id  # rgb.png: once, on the reader thread
            calls.clear()
    finally:
        read_ahead.close()
    assert direct.record["reason"] == "naip_black_border"
    assert stages.hr_reads_on(b"not a png") == (False, None)


def test_bench_gcs_s2naip_chips_have_the_cloud_bands_but_a_share_without_b09(tmp_path):
    from pipelines.dev.bench_gcs import with_s2naip_chips

    sample = tmp_path / "sample"
    rng = np.random.default_rng(2)
    for i in range(8):
        hr = scene(rng)
        series = series_from(hr, rng, 3)
        write_tile(str(sample), tid(i), hr, series, extra={"b01": series[..., 0], "b10": series[..., 1]})
    counts = with_s2naip_chips(str(sample), str(tmp_path / "s2naip"), 0.25)
    assert counts == {"chips": 8, "without_b09": 2}
    chips = sorted((tmp_path / "s2naip" / "sentinel2").iterdir())
    assert all((c / "b05.png").read_bytes() == (c / "b01.png").read_bytes() for c in chips)
    assert sum((c / "b09.png").exists() for c in chips) == 6
    assert not (sample / "sentinel2" / chips[0].name / "b05.png").exists()  # the sample is left as it was
    assert with_s2naip_chips(str(sample), str(tmp_path / "s2naip"), 0.0)["without_b09"] == 0


def test_bench_gcs_without_s2_leaves_out_a_share_of_the_chips(tmp_path):
    from pipelines.dev.bench_gcs import without_s2

    sample = tmp_path / "sample"
    rng = np.random.default_rng(4)
    for i in range(10):
        hr = scene(rng)
        write_tile(str(sample), tid(i), hr, series_from(hr, rng, 3))
    assert without_s2(str(sample), str(tmp_path / "no-s2"), 0.2) == {"chips": 10, "removed": 2}
    assert len(list((tmp_path / "no-s2" / "sentinel2").iterdir())) == 8
    assert len(list((tmp_path / "no-s2" / "naip" / NAIP_ID).iterdir())) == 10  # the tiles stay
    assert len(list((sample / "sentinel2").iterdir())) == 10  # the sample is left as it was
    assert without_s2(str(sample), str(tmp_path / "no-s2"), 0.0)["removed"] == 0


@pytest.mark.integration  # starts the GCS emulator
def test_a_gcs_build_gets_no_object_its_plan_leaves_out(gcs_emulator, tmp_path, loopback_only):
    """A whole build on gs:// (the emulator, behind bench-gcs's counting proxy): the objects GET at
    the HTTP layer are those of the plan (no b05 on the chip without b09, nothing after a missing
    b08 or tci), and the pairs and rejects equal a local build's."""
    from pipelines.dev import gcs_emulator as emu
    from pipelines.dev.bench_gcs import run_build
    import io

    import pyarrow.parquet as pq

    root = tmp_path / "input"  # the split is named after the input folder: the same on both sides
    kinds = _write_chips(str(root))
    base = gcs_emulator.bucket("s6-plan") + "/input"
    gcs_emulator.upload_tree(root, base)
    with gcs_emulator.proxy() as proxy:
        run = run_build(gcs_emulator, proxy, base, gcs_emulator.bucket("s6-plan") + "/out", 4,
                        ("--selection", "robust"))
        gets = [emu.operation_object(path) for kind, path in proxy.operations if kind == "get_media"]
    assert run["tiles"] == len(kinds)
    by_chip: dict[str, list[str]] = {}
    for name in gets:
        if name.startswith("input/sentinel2/"):
            _, _, xy, band = name.split("/")
            by_chip.setdefault(xy, []).append(band)
    chip = {kind: tid(i).split("/")[1] for i, kind in enumerate(kinds.values())}
    assert sorted(by_chip[chip["full"]]) == sorted(f"{b}.png" for b in ("tci", "b08", *pairs.extra_bands(
        PairConfig(input_root="r", selection=ROBUST))))
    assert "b05.png" not in by_chip[chip["no_b09"]] and "b05.png" not in by_chip[chip["corrupt_b05_no_b09"]]
    assert len(by_chip[chip["no_b09"]]) == 6  # tci, b08, b01, b10, b11, b12
    assert by_chip[chip["no_b08"]] == ["tci.png"] and chip["no_tci"] not in by_chip
    assert sum(name.endswith("/nir.png") for name in gets) == 3  # not for the tiles missing b08 or tci
    local = tmp_path / "local"
    from pipelines import build_pairs

    build_pairs.run(["--input", str(root), "--output", str(local), "--runner", "FnApiRunner", "--selection", "robust"])
    remote_rows = []
    for url in gcs_emulator.list(gcs_emulator.bucket("s6-plan") + "/out/pairs/"):
        if url.endswith(".parquet"):
            remote_rows += pq.read_table(io.BytesIO(gcs_emulator.read_bytes(url))).to_pylist()
    local_rows = [row for path in sorted((local / "pairs").glob("*.parquet"))
                  for row in pq.read_table(path).to_pylist()]
    assert len(remote_rows) == len(local_rows) == 3  # full, no_b09, corrupt_b05_no_b09
    assert _nan_equal(sorted(remote_rows, key=lambda r: r["tile_id"])) == _nan_equal(
        sorted(local_rows, key=lambda r: r["tile_id"]))


# ---------------------------------------------------------------------------------------------
# A tile without tci.png: missing_s2 or missing_band, from the plan's listing when it saw the folder


S2_CASES = ("full", "no_s2", "only_unused", "b08_no_tci", "deeper_only")


def _write_s2_cases(root: str) -> dict[str, str]:
    """Tiles whose tci.png is there, or missing in each way the reject reason tells apart: no
    Sentinel-2 folder at all (missing_s2); a folder holding only a file no build reads, only b08, or
    only an object one level deeper (missing_band: the folder holds something)."""
    rng = np.random.default_rng(21)
    kinds = {}
    for i, kind in enumerate(S2_CASES):
        tile_id = tid(20 + i)
        hr = scene(rng)
        series = series_from(hr, rng, 5)
        extra = _bands(rng, 5)
        extra.pop("b08")
        if kind == "full":
            write_tile(root, tile_id, hr, series, extra=extra)
        elif kind == "only_unused":
            write_tile(root, tile_id, hr, None, extra={"b06": extra["b01"]})
        else:
            write_tile(root, tile_id, hr, series if kind == "b08_no_tci" else None)
        s2 = tiles.s2_dir(root, TileId.parse(tile_id))
        if kind == "b08_no_tci":
            os.remove(os.path.join(s2, "tci.png"))
        if kind == "deeper_only":
            os.makedirs(os.path.join(s2, "old"))
            with open(os.path.join(s2, "old", "tci.png"), "wb") as f:
                f.write(b"an object below the chip's folder")
        kinds[tile_id] = kind
    return kinds


@pytest.mark.parametrize("holds_any", [True, False, None])
def test_load_tile_asks_the_listing_whether_the_sentinel2_folder_holds_anything(tmp_path, monkeypatch, holds_any):
    """`pairs.load_tile` takes missing_s2 / missing_band from the reads' `holds_any` (a listing that saw
    the folder whole) and lists the folder itself only when that says nothing (None: no listing of
    it, or a failed one), as a build without a listing always does."""
    root = str(tmp_path)
    tile_id = tid(30)
    write_tile(root, tile_id, scene(np.random.default_rng(3)), None)
    config = PairConfig(input_root=root, selection=ROBUST)
    tile = TileId.parse(tile_id)
    s2 = tiles.s2_dir(root, tile)
    listings = []
    real = storage.dir_has_files
    monkeypatch.setattr(storage, "dir_has_files", lambda path: listings.append(path) or real(path))
    read_ahead = ReadAhead(0)
    folders = {} if holds_any is None else {s2: holds_any}
    reads = read_ahead.start(pairs.tile_paths(tile, config), LIMIT, frozenset({tiles.s2_band_path(root, tile, "tci")}),
                             listed=True, folders=folders)
    assert reads.holds_any(s2) is holds_any and reads.holds_any(root) is None
    got = build_tile(tile_id, config, None, reads).record
    assert listings == ([s2] if holds_any is None else [])
    want = {True: "missing_band", False: "missing_s2", None: "missing_s2"}[holds_any]
    assert got["reason"] == want, got
    if want == "missing_s2":
        assert got["detail"] == f"no Sentinel-2 files under {s2}"


def test_the_plans_listing_tells_the_sentinel2_folder_apart_as_storage_does(tmp_path, monkeypatch):
    """`stages.start_reads` with a listing that carries `fingerprints.S2_HOLDS_ANY`: every case's
    outcome equals a build without a listing (reason and detail), none lists the folder again; a
    failed listing (None) falls back to listing it."""
    root = str(tmp_path)
    kinds = _write_s2_cases(root)
    config = PairConfig(input_root=root, selection=ROBUST)
    spec = fpr.FingerprintSpec.for_config(config)
    real = storage.dir_has_files
    listings = []
    read_ahead = ReadAhead(2)
    try:
        for tile_id, kind in kinds.items():
            direct = build_tile(tile_id, config)
            s2 = tiles.s2_dir(root, TileId.parse(tile_id))
            listing = fpr.tile_fingerprints(tile_id, spec) + (real(s2),)
            monkeypatch.setattr(storage, "dir_has_files", lambda path: listings.append(path) or real(path))
            for values, lists in ((listing, 0), (listing[:-1] + (None,), int(kind != "full"))):
                reads = stages.start_reads(read_ahead, tile_id, None, config, values, spec)
                got = build_tile(tile_id, config, None, reads)
                reads.cancel()
                assert _nan_equal(got.record) == _nan_equal(direct.record), kind
                assert len(listings) == lists, (kind, listings)
                listings.clear()
            monkeypatch.setattr(storage, "dir_has_files", real)
    finally:
        read_ahead.close()
    reasons = {kinds[t]: build_tile(t, config).record.get("reason") for t in kinds}
    assert reasons == {"full": None, "no_s2": "missing_s2", "only_unused": "missing_band",
                       "b08_no_tci": "missing_band", "deeper_only": "missing_band"}


@pytest.mark.integration  # starts the GCS emulator
def test_a_gcs_build_lists_no_sentinel2_folder_its_group_listing_saw(gcs_emulator, tmp_path, loopback_only):
    """A whole robust build on gs:// through bench-gcs's counting proxy: a tile without tci.png is
    told missing_s2 (nothing under its Sentinel-2 folder) or missing_band (something there: only
    an unused file, only b08, an object deeper down, the folder's own placeholder object) from the
    fingerprints' range listings, with no listing of its own; every reject equals a build without a
    listing's (reason and detail, on gs:// as today, and locally but for the root in the detail);
    an incremental --since rebuild of the unchanged input builds nothing."""
    from pipelines import build_pairs
    from pipelines.dev import gcs_emulator as emu
    from pipelines.dev.bench_gcs import run_build
    import io
    import urllib.parse

    import pyarrow.parquet as pq

    root = tmp_path / "input"
    kinds = _write_s2_cases(str(root))
    placeholder = tid(29)
    write_tile(str(root), placeholder, scene(np.random.default_rng(5)), None)
    bucket = gcs_emulator.bucket("h8-no-s2")
    base = bucket + "/input"
    gcs_emulator.upload_tree(root, base)
    gcs_emulator.upload_bytes(f"{base}/sentinel2/{placeholder.split('/')[1]}/", b"")  # a "folder" object
    kinds[placeholder] = "placeholder"
    config = PairConfig(input_root=base, selection=ROBUST)
    spec = fpr.FingerprintSpec.for_config(config)
    with gcs_emulator.environment():
        listed = dict(zip(kinds, fpr.group_listings(list(kinds), spec)))
        for tile_id, kind in kinds.items():  # what the range listing saw is what a listing of its own says
            s2 = tiles.s2_dir(base, TileId.parse(tile_id))
            assert fpr.s2_holds_any(listed[tile_id]) is storage.dir_has_files(s2), kind
            assert fpr.compared(listed[tile_id]) == fpr.tile_fingerprints(tile_id, spec), kind
        today = {t: build_tile(t, config).record for t in kinds}  # no listing: the folder listed per tile
        failed = fpr.group_listings([tid(20)], fpr.FingerprintSpec("gs://no-such-bucket/set"))
        assert fpr.s2_holds_any(failed[0]) is None  # a failed listing says nothing: load_tile lists
    assert {kinds[t]: r.get("reason") for t, r in today.items()} == {
        "full": None, "no_s2": "missing_s2", "only_unused": "missing_band", "b08_no_tci": "missing_band",
        "deeper_only": "missing_band", "placeholder": "missing_band"}

    with gcs_emulator.proxy() as proxy:
        full = run_build(gcs_emulator, proxy, base, bucket + "/out", 4, ("--selection", "robust"))
        operations = list(proxy.operations)
        since = run_build(gcs_emulator, proxy, base, bucket + "/since", 4,
                          ("--selection", "robust", "--since", bucket + "/out"))
        since_gets = [p for kind, p in proxy.operations if kind == "get_media"]
    assert full["tiles"] == len(kinds)
    s2_listings = []
    for kind, path in operations:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        if kind == "list" and emu.operation_object(path).startswith("input/sentinel2/") and "startOffset" not in query:
            s2_listings.append(path)
    assert s2_listings == [], s2_listings  # only the fingerprints' range listings saw the chips
    assert full["input_kinds"]["list"] <= 4, full["input_kinds"]  # naip/, naip/<id>/, the range listings

    def rejects(folder):
        out = {}
        for url in gcs_emulator.list(folder + "/rejects/"):
            if url.endswith(".parquet"):
                for row in pq.read_table(io.BytesIO(gcs_emulator.read_bytes(url))).to_pylist():
                    out[row["tile_id"]] = row
        return out

    built = rejects(bucket + "/out")
    for tile_id, record in today.items():
        if record.get("reason") is not None:
            assert {k: built[tile_id][k] for k in ("stage", "reason", "detail")} == {
                k: record[k] for k in ("stage", "reason", "detail")}, kinds[tile_id]
    local = tmp_path / "local"
    build_pairs.run(["--input", str(root), "--output", str(local), "--runner", "FnApiRunner", "--selection", "robust"])
    local_rejects = {row["tile_id"]: row for path in sorted((local / "rejects").glob("*.parquet"))
                     for row in pq.read_table(path).to_pylist()}
    for tile_id, kind in kinds.items():
        if kind not in ("full", "placeholder"):  # a local folder has no placeholder object
            assert built[tile_id]["reason"] == local_rejects[tile_id]["reason"], kind
            assert built[tile_id]["detail"] == local_rejects[tile_id]["detail"].replace(str(root), base), kind
    # the listing's extra item is never compared: the unchanged input is carried whole
    assert since["incremental"]["unchanged"] == len(kinds) and since["incremental"]["processed"] == 0, since
    assert not [p for p in since_gets if emu.operation_object(p).startswith("input/")]
