"""The real Sentinel-2 L2A series (transforms/devdata/real_s2_series.py): scaling, the pinned fetch
(against a loopback server), the labels file, and on the real cube (skipped without it unless
S2NAIP_REQUIRE_REAL_DATA / S2NAIP_REQUIRE_ALL is set; .ci/run fetches it) the loader, the tiles and
a floor for the default selection mode on the tune part."""
import collections
import hashlib
import http.server
import io
import json
import os
import threading
import zipfile

import numpy as np
import pytest

from transforms.devdata import real_s2 as R
from transforms.devdata import real_s2_series as S


def test_s2naip_scaling_of_l2a_tci_and_b08():
    v = np.array([[2000, 1000, 9000, 8160], [0, 3, 40, 33], [4, 4, 4, 9000]], dtype=np.uint16)
    out = S.to_s2naip(v)
    assert out.dtype == np.uint8
    assert out[0].tolist() == [255, 128, 255, 255]  # L2A TCI saturates at 2000; b08 = value / 32
    assert out[1].tolist() == [0, 1, 5, 1]  # 0 stays nodata in TCI; 3 -> 0.38 -> 1 (1..255)
    assert out[2].tolist() == [1, 1, 1, 255]
    x = np.zeros((500, 4), np.uint16)
    x[:, 3] = np.arange(500) * 17
    np.testing.assert_array_equal(S.to_s2naip(x)[:, 3], np.clip(x[:, 3] // 32, 0, 255))


def test_hr_is_four_bands_at_4x():
    rng = np.random.default_rng(0)
    v = (np.array([300, 500, 250, 3500]) * rng.uniform(0.8, 1.2, (32, 32, 1))).astype(np.uint16)
    hr = S.hr_from(v)
    assert hr.shape == (128, 128, 4) and hr.dtype == np.uint8 and hr.min() >= 1
    down = hr.astype(float).reshape(32, 4, 32, 4, 4).mean(axis=(1, 3))
    assert np.corrcoef(down[..., 0].ravel(), v[..., 0].astype(float).ravel())[0, 1] > 0.8  # white noise: bicubic smooths it


def test_labels_file_has_provenance_and_covers_every_chip():
    doc = json.loads(S.DEFAULT_LABELS.read_text())
    src = doc["source"]
    assert (src["package"], src["version"], src["file"]) == (S.PACKAGE, S.VERSION, S.WHEEL)
    assert (src["file_sha256"], src["member"], src["member_sha256"]) == (S.WHEEL_SHA256, S.MEMBER, S.FILE_SHA256)
    labels = S.load_labels()
    dates = set(next(iter(labels.values())))
    assert len(dates) == 68 and all(6 <= int(d[4:6]) <= 9 for d in dates)
    assert set(doc["notes"]) == dates
    for chip_labels in labels.values():
        assert set(chip_labels) == dates and set(chip_labels.values()) <= set(doc["vocabulary"])
        kinds = collections.Counter(chip_labels.values())
        assert kinds[S.CLEAN] >= 20 and kinds["thin_cloud"] >= 5 and kinds["haze"] >= 1  # real bad dates


class _Files(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def wheel_server(loopback_only):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/{S.WHEEL}"
    finally:
        server.shutdown()
        server.server_close()


def _wheel(member_bytes: bytes, member_20m: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(S.MEMBER, member_bytes)
        z.writestr(S.MEMBER_20M, member_20m)
    return buf.getvalue()


def test_fetch_checks_every_hash_and_caches(wheel_server, tmp_path, monkeypatch):
    server, url = wheel_server
    member, member_20m = b"not really netcdf", b"nor this"
    _Files.body = _wheel(member, member_20m)
    with pytest.raises(RuntimeError, match=r"SHA-256 .*, expected " + S.WHEEL_SHA256):
        S.fetch(tmp_path, url=url)
    assert not any(tmp_path.iterdir())  # nothing partial left
    monkeypatch.setattr(S, "WHEEL_SHA256", hashlib.sha256(_Files.body).hexdigest())
    with pytest.raises(RuntimeError, match="nrt/data/sentinel2_cube_subset_romania_10m.nc: SHA-256"):
        S.fetch(tmp_path, url=url)
    monkeypatch.setattr(S, "FILE_SHA256", hashlib.sha256(member).hexdigest())
    with pytest.raises(RuntimeError, match="nrt/data/sentinel2_cube_subset_romania_20m.nc: SHA-256"):
        S.fetch(tmp_path, url=url)
    assert not any(tmp_path.iterdir())
    monkeypatch.setattr(S, "FILE_SHA256_20M", hashlib.sha256(member_20m).hexdigest())
    path = S.fetch(tmp_path, url=url)
    assert path == tmp_path / S.FILE_NAME and path.read_bytes() == member
    assert (tmp_path / S.FILE_NAME_20M).read_bytes() == member_20m
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([S.FILE_NAME, S.FILE_NAME_20M])
    _Files.body = b"changed"  # cached: no download
    assert S.fetch(tmp_path, url=url) == path


def test_fetch_unreachable_is_a_one_line_error(loopback_only, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match=f"could not download {S.WHEEL}") as e:
        S.fetch(tmp_path, url=f"http://127.0.0.1:{port}/{S.WHEEL}", timeout=5)
    assert "\n" not in str(e.value)
    assert S.main(["fetch", str(tmp_path), "extra"]) == 2
    with pytest.raises(FileNotFoundError, match="real_s2_series fetch"):
        S.load(tmp_path)


# --- on the real cube ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cube(real_s2_series_file):
    return S.load(real_s2_series_file)


def test_loader_dates_shapes_and_orientation(cube):
    assert cube.values.shape == (140, 100, 100, 4) and cube.values.dtype == np.uint16
    assert cube.dates[0] == "20150801" and cube.dates[-1] == "20210101" and len(set(cube.dates)) == 140
    assert len(S.season_dates(cube)) == 68
    assert cube.b11.shape == (140, 100, 100) and (cube.b11[:, ::2, ::2] == cube.b11[:, 1::2, 1::2]).all()
    # B11 (SWIR) is far brighter under cloud than over forest: the 20 m cube is the same dates
    index = {d: i for i, d in enumerate(cube.dates)}
    for d in ("20160825", "20180611"):  # overcast
        assert cube.b11[index[d]].mean() > 2 * np.median([cube.b11[index[x]].mean() for x in ("20170706", "20190701")])
    # the labels by eye agree with the provider's scene classification where it is sure, chip by chip
    # (a flipped or shifted read breaks this on the partly cloudy dates): no clean chip holds an SCL
    # medium/high-probability cloud pixel, every overcast chip is mostly such cloud
    index = {d: i for i, d in enumerate(cube.dates)}
    for chip_id, (r, c) in S.CHIPS.items():
        for d, label in cube.labels[chip_id].items():
            cloud = np.isin(cube.scl[index[d], r:r + 32, c:c + 32], (8, 9)).mean()
            if label == S.CLEAN:
                assert cloud == 0, (chip_id, d)
            if label == "overcast":
                assert cloud > 0.6, (chip_id, d)


def test_series_tiles_leave_the_hr_date_out_and_stay_in_its_year(cube):
    tiles = S.series_tiles(cube)
    assert len(tiles) == 261 and len({t.tile_id for t in tiles}) == 261
    held = {t.tile_id.split("/")[1] for t in tiles if R.is_held_out(t.tile_id)}
    assert held == {"r1c1", "r1c2", "r2c1", "r2c2"}  # fixed: never tune on these
    index = {d: i for i, d in enumerate(cube.dates)}
    for t in tiles[::7]:
        assert t.hr.shape == (128, 128, 4) and t.series.shape == (t.n_timesteps, 32, 32, 4)
        assert t.hr_date not in t.capture_of_index and all(d[:4] == t.hr_date[:4] for d in t.capture_of_index)
        assert 7 <= t.n_timesteps <= 18 and S.CLEAN in t.kinds
        chip_id = t.tile_id.split("/")[1]
        r, c = S.CHIPS[chip_id]
        assert set(t.extra) == {"b11"} and t.extra["b11"].shape == (t.n_timesteps, 32, 32)
        for i, d in enumerate(t.capture_of_index):
            v = cube.values[index[d], r:r + 32, c:c + 32].astype(np.float64)
            np.testing.assert_array_equal(t.series[i, ..., :3], np.clip(np.rint(v[..., :3] * 255.0 / 2000), 1, 255))
            np.testing.assert_array_equal(t.series[i, ..., 3], np.clip(v[..., 3] // 32, 0, 255))
            np.testing.assert_array_equal(t.extra["b11"][i], np.clip(cube.b11[index[d], r:r + 32, c:c + 32] // 32, 0, 255))
            assert t.kinds[i] == cube.labels[chip_id][d]
    same = S.series_tiles(cube, include_hr_date=True)
    assert [t.tile_id for t in same] == [t.tile_id for t in tiles]
    for t in same:
        assert t.capture_of_index[t.hr_date_index] == t.hr_date and t.kinds[t.hr_date_index] == S.CLEAN


def test_default_mode_floor_on_the_tune_part(cube):
    """Mandatory in CI: the default mode chooses a clean date in >= 97 % of the tune tiles of the real
    L2A series (RGB only, TCI + B08, and with B11), and never fewer than `paper` (measured 98.6 % vs 93.2 % / 93.9 %
    at 0.3.1, docs/selection-evaluation.md). The held-out chips are not run here."""
    from pipelines.dev import bench_selection as B
    from transforms import selection as SEL

    tiles = [t for t in S.series_tiles(cube) if not R.is_held_out(t.tile_id)]
    assert len(tiles) == 147
    tune = B.EvalSet("real S2 L2A", "real", tiles, frozenset(), same_date=False)
    for bands in ("rgb", "tci+b08", "all"):
        got = {mode: B.evaluate(tune, B.mode_selector(mode), bands)[B.TUNE]["clean"]
               for mode in (SEL.DEFAULT_SELECTION, "paper")}
        assert got[SEL.DEFAULT_SELECTION] >= 0.97, (bands, got)
        assert got[SEL.DEFAULT_SELECTION] >= got["paper"], (bands, got)


def test_bench_selection_prints_the_real_series_rows(real_s2_series_file, tmp_path, capsys):
    from pipelines.dev import bench_selection as B

    report = tmp_path / "sel.json"
    assert B.main(["--real-s2-series", str(real_s2_series_file.parent), "--sets", "real S2 L2A",
                   "--modes", "paper", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "real S2 L2A     rgb" in out and "real S2 L2A     tci+b08" in out
    r = json.loads(report.read_text())
    assert [(x["set"], x["bands"]) for x in r["rows"]] == [("real S2 L2A", "rgb"), ("real S2 L2A", "tci+b08"),
                                                           ("real S2 L2A", "all")]
    x = r["rows"][0]["modes"]["paper"]
    assert (x["tune"]["tiles"], x["held-out"]["tiles"]) == (147, 114)


def test_bench_selection_refuses_a_series_folder_without_the_cube(tmp_path, capsys):
    from pipelines.dev import bench_selection as B

    with pytest.raises(SystemExit):
        B.main(["--real-s2-series", str(tmp_path), "--report", str(tmp_path / "r.json")])
    assert "real_s2_series fetch" in capsys.readouterr().err


# --- the second source: real L1C chips of Lithuania (sentinel-hub/multi-temporal-super-resolution) ----


def test_mtsr_labels_file_has_provenance_and_real_bad_dates():
    doc = json.loads(S.MTSR_LABELS.read_text())
    src = doc["source"]
    assert (src["repository"], src["commit"], src["folder"]) == (S.MTSR_REPO, S.MTSR_COMMIT, S.MTSR_PATH)
    assert {name: f["sha256"] for name, f in src["files"].items()} == {n: sha for n, (_, sha) in S.MTSR_FILES.items()}
    labels = S.load_mtsr_labels()
    assert {p: len(v) for p, v in labels.items()} == {"eopatch-0277_66": 5, "eopatch-0288_0": 7}
    assert set(doc["notes"]) == {f"{p}/{d}" for p, v in labels.items() for d in v}
    for dates in labels.values():
        assert list(dates) == sorted(dates) and set(dates.values()) <= set(doc["vocabulary"])
    kinds = collections.Counter(k for v in labels.values() for k in v.values())
    assert kinds == {S.CLEAN: 7, "cloud": 3, "shadow": 1, "haze": 1}


def test_l1c_scaling_is_s2naips():
    refl = np.array([[0.1779, 0.3558, 0.9, 0.816], [0.0, 0.0002, 0.01, 0.0032]])  # B02, B03, B04, B08
    out = S.l1c_to_s2naip(refl)
    assert out.dtype == np.uint8
    assert out[0].tolist() == [255, 255, 128, 255]  # R, G, B: L1C TCI saturates at 3558; b08 = value / 32
    assert out[1].tolist() == [7, 1, 1, 1]  # TCI never 0 (1..255); b08 0.0032 -> 32 -> 1


def _fake_mtsr(folder, rng):
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (patchlet, _) in S.MTSR_FILES.items():
        n = len(S.load_mtsr_labels()[patchlet])
        buf = io.BytesIO()
        np.savez(buf, features=rng.uniform(0.02, 0.4, (n, 32, 32, 4)))
        (folder / name).write_bytes(buf.getvalue())
        out[name] = (patchlet, hashlib.sha256(buf.getvalue()).hexdigest())
    return out


def test_import_mtsr_checks_every_hash_and_the_tiles(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    files = _fake_mtsr(checkout / S.MTSR_PATH, np.random.default_rng(0))
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match=r"data_eopatch-0277_66_2\.npz: SHA-256 .*expected 4ab8547f"):
        S.import_mtsr(checkout, cache)
    assert not cache.exists()  # nothing partial
    with pytest.raises(RuntimeError, match="cannot read"):
        S.import_mtsr(tmp_path / "nowhere", cache)
    assert S.main(["import-mtsr", str(tmp_path / "nowhere"), str(cache)]) == 1
    assert S.main(["import-mtsr"]) == 2
    with pytest.raises(FileNotFoundError, match="import-mtsr"):
        S.load_mtsr(cache)
    monkeypatch.setattr(S, "MTSR_FILES", files)
    assert S.import_mtsr(checkout, cache) == cache / S.MTSR_FOLDER and S.has_mtsr(cache)
    chips = S.load_mtsr(cache)
    tiles = S.mtsr_tiles(chips)
    assert [t.tile_id.split("/", 1)[1] for t in tiles] == [
        "eopatch-0277_66/20200618", "eopatch-0277_66/20200628", "eopatch-0277_66/20200716", "eopatch-0277_66/20200802",
        "eopatch-0288_0/20200807", "eopatch-0288_0/20200815", "eopatch-0288_0/20200817"]
    for t in tiles:
        patchlet = t.tile_id.split("/")[1]
        dates = list(chips.labels[patchlet])
        assert t.hr_date not in t.capture_of_index and len(t.capture_of_index) == len(dates) - 1
        assert t.kinds == tuple(chips.labels[patchlet][d] for d in t.capture_of_index)
        rows = [dates.index(d) for d in t.capture_of_index]
        np.testing.assert_array_equal(t.series, S.l1c_to_s2naip(chips.refl[patchlet][rows]))
        assert t.hr.shape == (128, 128, 4) and t.hr.dtype == np.uint8
    for t in S.mtsr_tiles(chips, include_hr_date=True):
        assert t.capture_of_index[t.hr_date_index] == t.hr_date
    (cache / S.MTSR_FOLDER / "data_eopatch-0288_0_3.npz").write_bytes(b"changed")
    with pytest.raises(ValueError, match="SHA-256"):
        S.load_mtsr(cache)


@pytest.fixture(scope="module")
def mtsr_chips(tmp_path_factory):
    """The real L1C chips: imported from the checkout $S2NAIP_MTSR_REPO names, else the mtsr/ of the real
    series' folder ($S2NAIP_REAL_S2_SERIES, then the default cache) if it holds them; else skipped
    (allowed in CI: GitHub only, docs/testing.md)."""
    env = os.environ.get("S2NAIP_MTSR_REPO")
    if env:
        return S.load_mtsr(S.import_mtsr(env, tmp_path_factory.mktemp("mtsr")))
    for folder in filter(None, (os.environ.get("S2NAIP_REAL_S2_SERIES"), S.default_cache())):
        if S.has_mtsr(folder):
            return S.load_mtsr(folder)
    pytest.skip("S2NAIP_MTSR_REPO names no checkout of sentinel-hub/multi-temporal-super-resolution")


def test_mtsr_real_chips_match_their_labels(mtsr_chips):
    refl, labels = mtsr_chips.refl, mtsr_chips.labels
    assert {p: x.shape for p, x in refl.items()} == {"eopatch-0277_66": (5, 32, 32, 4), "eopatch-0288_0": (7, 32, 32, 4)}
    for p, x in refl.items():
        nir = x[..., 3].mean(axis=(1, 2))
        clean = np.median([nir[i] for i, d in enumerate(labels[p]) if labels[p][d] == S.CLEAN])
        for i, d in enumerate(labels[p]):
            if labels[p][d] == "shadow" or d == "20200726":  # whole-chip shadows: B08 far below the clean dates
                assert nir[i] < 0.6 * clean, (p, d)
            if labels[p][d] == S.CLEAN:
                assert abs(nir[i] - clean) < 0.15 * clean, (p, d)
        assert (x[..., 0] > x[..., 2]).mean() > 0.9  # TOA (L1C): blue above red over forest
    tiles = S.mtsr_tiles(mtsr_chips)
    assert {t.tile_id.split("/")[1] for t in tiles if R.is_held_out(t.tile_id)} == {"eopatch-0288_0"}


def test_mtsr_default_mode_on_the_real_l1c_chips(mtsr_chips):
    """Every real L1C tile (tune and held-out: 7) gets a clean date from the default mode and from paper
    (measured 100 % for all three modes, docs/selection-evaluation.md)."""
    from pipelines.dev import bench_selection as B
    from transforms import selection as SEL

    tiles = S.mtsr_tiles(mtsr_chips)
    every = B.EvalSet("real S2 L1C", "real", tiles, frozenset(), same_date=False)
    for bands in ("rgb", "tci+b08"):
        for mode in (SEL.DEFAULT_SELECTION, "paper"):
            assert B.evaluate(every, B.mode_selector(mode), bands)[B.TUNE]["clean"] == 1.0, (bands, mode)


def test_bench_selection_l1c_rows_from_the_cache_folder(tmp_path, monkeypatch, capsys):
    from pipelines.dev import bench_selection as B

    (tmp_path / S.FILE_NAME).write_bytes(b"")  # the --real-s2-series folder check only
    with pytest.raises(SystemExit):
        B.main(["--real-s2-series", str(tmp_path), "--sets", "real S2 L1C", "--report", str(tmp_path / "r.json")])
    assert "import-mtsr" in capsys.readouterr().err
    monkeypatch.setattr(S, "MTSR_FILES", _fake_mtsr(tmp_path / S.MTSR_FOLDER, np.random.default_rng(1)))
    report = tmp_path / "sel.json"
    assert B.main(["--real-s2-series", str(tmp_path), "--sets", "real S2 L1C,real S2 L1C+hr", "--modes", "paper",
                   "--report", str(report)]) == 0
    assert "real S2 L1C     rgb" in capsys.readouterr().out
    r = json.loads(report.read_text())
    assert [(x["set"], x["bands"]) for x in r["rows"]] == [("real S2 L1C", "rgb"), ("real S2 L1C", "tci+b08"),
                                                           ("real S2 L1C+hr", "rgb")]
    x = r["rows"][0]["modes"]["paper"]
    assert (x["tune"]["tiles"], x["held-out"]["tiles"]) == (4, 3)


def test_import_mtsr_from_a_bare_git_clone(tmp_path, monkeypatch):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.fail("git is needed (it is on every machine of this project)")
    work = tmp_path / "work"
    files = _fake_mtsr(work / S.MTSR_PATH, np.random.default_rng(2))
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": os.environ["PATH"], "HOME": str(tmp_path)}

    def git(*args, cwd=work):
        return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "chips")
    commit = git("rev-parse", "HEAD")
    git("clone", "-q", "--bare", str(work), str(tmp_path / "bare.git"), cwd=tmp_path)
    monkeypatch.setattr(S, "MTSR_FILES", files)
    monkeypatch.setattr(S, "MTSR_COMMIT", "0" * 40)  # not in the clone: a one-line error
    with pytest.raises(RuntimeError, match="cannot read"):
        S.import_mtsr(tmp_path / "bare.git", tmp_path / "cache")
    monkeypatch.setattr(S, "MTSR_COMMIT", commit)
    folder = S.import_mtsr(tmp_path / "bare.git", tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    assert len(S.mtsr_tiles(S.load_mtsr(tmp_path / "cache"))) == 7
