"""Evaluation data from a long real Sentinel-2 series: 140 real L2A dates of one place, fetched from PyPI.

The PyPI package `nrt` 0.2.1 (the JRC's near-real-time forest monitoring library, EUPL-1.2) ships a
real Sentinel-2 L2A cube as package data: `nrt/data/sentinel2_cube_subset_romania_10m.nc`, NetCDF-4,
B02, B03, B04, B08 (bottom-of-atmosphere reflectance x 1e4, uint16) and the scene classification
(SCL) of 140 dates, 2015-08-01 .. 2021-01-01, 100 x 100 pixels at 10 m (a forested box in Romania,
ETRS89-LAEA). Nothing of it is committed: `fetch` downloads the pinned wheel from PyPI by version
and SHA-256 into a cache folder and extracts that one file (checked by its own SHA-256). Nothing is
read at import. `fetch` also extracts the 20 m cube (`FILE_NAME_20M`) for its B11.

* Dates used (`SEASON`): June-September (68 dates, 3-19 a year): real clear dates, real cumulus
  with shadows, overcast, cirrus veils, iridescent thin cloud, haze; every chip x date labelled by
  eye (transforms/devdata/data/nrt_romania_labels.json, with a note per date).
* S2-NAIP scaling (`to_s2naip`): `tci` is ESA's L2A true colour, DN = value * 255 / 2000 rounded and
  clipped to 1..255 (ESA: the TCI's saturation of 255 is 2000 in L2A products); `b08` is the 16-bit
  value / 8160 clipped to [0, 1] as 8-bit, floor(value / 32), as S2-NAIP stores non-TCI bands; so
  is `b11` (`single_band`), from the package's 20 m cube of the same dates, each pixel repeated
  2 x 2 onto the 10 m grid (its pixel centres lie exactly between the 10 m ones), the tiles' extra band.
* Chips (`CHIPS`): the 3 x 3 non-overlapping 32x32 windows from row/column 2, as real_s2's.
* HR (`hr_from`): the chip of a clean date, R, G, B, B08 upsampled 4x (bicubic) to 128x128 with a
  NAIP-like stretch (no path-reflectance subtraction: L2A is already surface reflectance); no
  detail beyond 10 m. Its own date is left out of the series (except with `include_hr_date`).
* `series_tiles`: per chip and clean HR date, the series is every other date of the same year's
  season (the ground changes between years here: clear-cuts appear), in date order; a tile is
  made only when the series holds a clean date (else there is no right answer).
* Held-out part: `real_s2.is_held_out` on the tile id `nrt-romania/<chip>/...` (a hash of the chip
  id): chips r1c1, r1c2, r2c1, r2c2.

A second source, another place at the L1C level (`MTSR_*`, `import_mtsr`, `load_mtsr`, `mtsr_tiles`):
two real 32x32 chips of Lithuania, 2020 (5 and 7 dates, TOA reflectance B02, B03, B04, B08), the test
data of sentinel-hub/multi-temporal-super-resolution at a pinned commit, imported from a checkout
into `<cache>/mtsr/` by SHA-256 (`python -m transforms.devdata.real_s2_series import-mtsr CHECKOUT`:
no package registry serves it); labels by eye in data/mtsr_lithuania_labels.json; held out: the chip
eopatch-0288_0.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import os
import sys
import tempfile
import urllib.request
import warnings
import zipfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from transforms.devdata import hard_cases as H

PACKAGE, VERSION = "nrt", "0.2.1"
WHEEL = "nrt-0.2.1-py3-none-any.whl"
WHEEL_URL = ("https://files.pythonhosted.org/packages/42/76/746cf01e4854b8e9fa126447779f8cdd528929da103b8b42bdea9d767856/"
             + WHEEL)
WHEEL_SHA256 = "cd0291f99ce91268a0d993f05be1c69678d62504b01d36e7124d0ff3a51b3ee9"
MEMBER = "nrt/data/sentinel2_cube_subset_romania_10m.nc"
FILE_NAME = "sentinel2_cube_subset_romania_10m.nc"
FILE_SHA256 = "10165376979ed20f988bef09bf79135ea415e741256ba50fd4fef679b1c1fa9d"
# the same dates at 20 m (B03, B04, B8A, B11, SCL; 50 x 50, pixel centres between the 10 m ones):
# B11 is the one S2-NAIP band it adds
MEMBER_20M = "nrt/data/sentinel2_cube_subset_romania_20m.nc"
FILE_NAME_20M = "sentinel2_cube_subset_romania_20m.nc"
FILE_SHA256_20M = "e22c3545dea25c93b31dea017fb70ba18578c1a6c954bf1040e58218b9fa28ca"
SOURCE_ID = "nrt-romania"

TCI_SATURATION = 2000.0  # ESA L2A TCI: 255 is the 16-bit value 2000 (reflectance 0.2)
BAND_DIVISOR = 8160.0  # S2-NAIP: 16-bit value / 8160 clipped to [0, 1], stored as 8-bit
SIZE = 100
SEASON = (6, 9)  # months used, inclusive
CHIP = H.LR_SIZE
CHIP_ORIGIN = 2
CHIPS = {f"r{r}c{c}": (CHIP_ORIGIN + CHIP * r, CHIP_ORIGIN + CHIP * c) for r in range(3) for c in range(3)}
CLEAN = H.CLEAN
DEFAULT_LABELS = Path(__file__).resolve().parent / "data" / "nrt_romania_labels.json"


def default_cache() -> Path:
    """$S2NAIP_CACHE or $XDG_CACHE_HOME/s2naip or ~/.cache/s2naip, plus real_s2_series/."""
    root = os.environ.get("S2NAIP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "s2naip")
    return Path(root) / "real_s2_series"



def _write_files(folder: Path, contents: dict[str, bytes]) -> None:
    """Each file into `folder` atomically (a temporary file, then a rename), readable by all."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is for secrets; this is a shared cache file
        os.replace(tmp, folder / name)

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def locate(path) -> Path:
    """The cube file: `path` itself, or `path`/FILE_NAME for a folder (the cache)."""
    p = Path(path)
    return p / FILE_NAME if p.is_dir() else p


def fetch(cache=None, url: str = WHEEL_URL, timeout: float = 120.0) -> Path:
    """The cube file in `cache` (default `default_cache()`), downloading the pinned wheel from PyPI
    and extracting it (and the 20 m cube beside it) if absent. Raises RuntimeError (one line) when
    the download fails or a SHA-256 does not match; nothing partial is left."""
    folder = Path(cache) if cache is not None else default_cache()
    target = folder / FILE_NAME
    files = ((MEMBER, FILE_NAME, FILE_SHA256), (MEMBER_20M, FILE_NAME_20M, FILE_SHA256_20M))
    if all((folder / name).is_file() and _sha256((folder / name).read_bytes()) == sha for _, name, sha in files):
        return target
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            wheel = r.read()
    except (OSError, ValueError) as e:  # URLError, timeouts, refused connections
        raise RuntimeError(f"could not download {WHEEL} from {url}: {e}") from None
    if (got := _sha256(wheel)) != WHEEL_SHA256:
        raise RuntimeError(f"{WHEEL} from {url}: SHA-256 {got}, expected {WHEEL_SHA256}")
    contents = {}
    for member, name, sha in files:
        try:
            contents[name] = zipfile.ZipFile(io.BytesIO(wheel)).read(member)
        except (KeyError, zipfile.BadZipFile) as e:
            raise RuntimeError(f"{WHEEL}: cannot read {member}: {e}") from None
        if (got := _sha256(contents[name])) != sha:
            raise RuntimeError(f"{WHEEL}:{member}: SHA-256 {got}, expected {sha}")
    _write_files(folder, contents)
    return target


@dataclasses.dataclass
class Cube:
    values: np.ndarray  # uint16 [T, 100, 100, 4] B04, B03, B02, B08 (reflectance x 1e4), north up
    b11: np.ndarray  # uint16 [T, 100, 100] B11 (20 m, each pixel repeated 2 x 2 onto the 10 m grid)
    scl: np.ndarray  # uint8 [T, 100, 100] the provider's scene classification
    dates: tuple[str, ...]  # YYYYMMDD per date
    labels: dict[str, dict[str, str]]  # chip -> date -> label (CLEAN or a condition), by eye


def load_labels(path=DEFAULT_LABELS) -> dict[str, dict[str, str]]:
    with open(path) as f:
        labels = json.load(f)["labels"]
    if set(labels) != set(CHIPS) or len({frozenset(v) for v in labels.values()}) != 1:
        raise ValueError(f"{path}: expected the same dates labelled for every chip of {sorted(CHIPS)}")
    return labels


def load(path, labels=DEFAULT_LABELS) -> Cube:
    """The cube of `path` (the .nc file or the cache folder holding it), read with rasterio's netCDF
    driver (rows in file order: north up)."""
    import rasterio
    import rasterio.errors

    f = locate(path)
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no real Sentinel-2 series here; get it with "
                                f"`python -m transforms.devdata.real_s2_series fetch {f.parent}`")
    arrays, stamps = {}, None
    with rasterio.Env(GDAL_NETCDF_BOTTOMUP="NO"), warnings.catch_warnings():
        # the cube has no geotransform GDAL understands (its grid is in the x / y variables): rows
        # are read in file order, north first, which is all the tiles need
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        for name in ("B4", "B3", "B2", "B8", "SCL"):
            with rasterio.open(f'NETCDF:"{f}":{name}') as ds:
                arrays[name] = ds.read()
                tags = ds.tags()
            units = tags.get("time#units", "")
            days = [int(v) for v in tags.get("NETCDF_DIM_time_VALUES", "{}").strip("{}").split(",") if v]
            if stamps is None:
                stamps = (units, days)
            elif stamps != (units, days):
                raise ValueError(f"{f}: band {name} has other dates than B4")
    f20 = f.parent / FILE_NAME_20M
    if not f20.is_file():
        raise FileNotFoundError(f"{f20}: the 20 m cube is missing; get both with "
                                f"`python -m transforms.devdata.real_s2_series fetch {f.parent}`")
    with rasterio.Env(GDAL_NETCDF_BOTTOMUP="NO"), warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(f'NETCDF:"{f20}":B11') as ds:
            b11 = ds.read()
            if ds.tags().get("NETCDF_DIM_time_VALUES", "").strip("{}").split(",") != [str(d) for d in stamps[1]]:
                raise ValueError(f"{f20}: other dates than {f.name}")
    units, days = stamps
    if not units.startswith("days since "):
        raise ValueError(f"{f}: unexpected time units {units!r}")
    origin = dt.date.fromisoformat(units[len("days since "):][:10])
    dates = tuple((origin + dt.timedelta(days=d)).strftime("%Y%m%d") for d in days)
    values = np.stack([arrays[b] for b in ("B4", "B3", "B2", "B8")], axis=-1)
    if values.shape != (len(dates), SIZE, SIZE, 4):
        raise ValueError(f"{f}: expected ({len(dates)}, {SIZE}, {SIZE}) per band, got {values.shape[:3]}")
    lab = load_labels(labels)
    if missing := set(next(iter(lab.values()))) - set(dates):
        raise ValueError(f"{f}: labelled dates missing from the cube: {sorted(missing)[:5]}")
    if b11.shape != (len(dates), SIZE // 2, SIZE // 2):
        raise ValueError(f"{f20}: expected ({len(dates)}, {SIZE // 2}, {SIZE // 2}) B11, got {b11.shape}")
    b11 = np.repeat(np.repeat(b11, 2, axis=1), 2, axis=2)  # 20 m centres lie between 10 m pairs: exact
    return Cube(values=values, b11=b11, scl=arrays["SCL"].astype(np.uint8), dates=dates, labels=lab)


def to_s2naip(values: np.ndarray) -> np.ndarray:
    """uint16 [..., 4] B04, B03, B02, B08 -> uint8 [..., 4] TCI R, G, B (L2A scaling) and b08, as
    S2-NAIP stores them (0 stays 0 in TCI: nodata)."""
    v = np.asarray(values, dtype=np.float64)
    tci = np.clip(np.rint(v[..., :3] * 255.0 / TCI_SATURATION), 1, 255)
    tci[v[..., :3] == 0] = 0
    b08 = np.floor(np.clip(v[..., 3] * 255.0 / BAND_DIVISOR, 0.0, 255.0))
    return np.concatenate([tci, b08[..., None]], axis=-1).astype(np.uint8)


def single_band(values: np.ndarray) -> np.ndarray:
    """uint16 values -> uint8 as S2-NAIP stores its non-TCI bands: floor(value / 32) clipped to 0..255."""
    return np.floor(np.clip(np.asarray(values, dtype=np.float64) * 255.0 / BAND_DIVISOR, 0.0, 255.0)).astype(np.uint8)


def chip(a: np.ndarray, chip_id: str) -> np.ndarray:
    """The 32x32 window of `chip_id` of an array [..., 100, 100, C]."""
    r, c = CHIPS[chip_id]
    return a[..., r:r + CHIP, c:c + CHIP, :]


def hr_from(values_chip: np.ndarray) -> np.ndarray:
    """uint16 [32, 32, 4] B04, B03, B02, B08 -> uint8 [128, 128, 4]: a NAIP-like HR (4x bicubic)."""
    x = values_chip.astype(np.float64) / 1e4
    up = np.stack([ndimage.zoom(x[..., b], H.SCALE, order=3, mode="nearest") for b in range(4)], axis=-1)
    gain = np.array([255 / 0.16, 255 / 0.16, 255 / 0.16, 255 / 0.5])
    return np.clip(np.rint(up * gain), 1, 255).astype(np.uint8)


def season_dates(cube: Cube) -> list[str]:
    lo, hi = SEASON
    return [d for d in cube.dates if lo <= int(d[4:6]) <= hi]


def series_tiles(cube: Cube, include_hr_date: bool = False) -> list[H.DevTile]:
    """Per chip and clean HR date: the HR, and the other season dates of its year as the series
    (labels by eye); `include_hr_date`: the HR's own date too (`hr_date_index`: the same-date answer)."""
    season = season_dates(cube)
    index = {d: i for i, d in enumerate(cube.dates)}
    out = []
    for chip_id in CHIPS:
        lab = cube.labels[chip_id]
        values = chip(cube.values, chip_id)
        for hd in season:
            if lab[hd] != CLEAN:
                continue
            dates = [d for d in season if d[:4] == hd[:4] and (include_hr_date or d != hd)]
            if not any(lab[d] == CLEAN for d in dates if d != hd):
                continue
            rows = [index[d] for d in dates]
            series = to_s2naip(values[rows])
            b11 = chip(cube.b11[..., None], chip_id)[rows, ..., 0]
            out.append(H.DevTile(
                tile_id=f"{SOURCE_ID}/{chip_id}/{hd}", hr_date=hd, hr=hr_from(values[index[hd]]), series=series,
                extra={"b11": single_band(b11)}, kinds=tuple(lab[d] for d in dates), capture_of_index=tuple(dates),
                shifts=np.zeros((len(dates), 2)), hr_date_index=dates.index(hd) if include_hr_date else None))
    return out


# ---------------------------------------------------------------------------------------------
# A second source: real Sentinel-2 L1C (top of atmosphere) chips of another place (Lithuania, 2020).
#
# sentinel-hub/multi-temporal-super-resolution (MIT) stores two real 32x32 chips as test data, each
# a series of 10 m B02, B03, B04, B08 TOA reflectance (float, L1C level) with a Deimos-2 image:
# eopatch-0277_66 (5 dates, 2020-06-18 .. 08-02) and eopatch-0288_0 (7 dates, 2020-07-26 .. 09-16),
# with real cloud, cloud shadow and haze dates. No package registry serves it: `import-mtsr`
# copies the two files from a checkout of the pinned commit into the cache, checked by SHA-256.
# Tiles as the nrt source's: per chip and clean HR date, the HR (`real_s2.hr_from`, L1C path
# subtraction) and every other date as the series; labels by eye in data/mtsr_lithuania_labels.json.

MTSR_REPO = "sentinel-hub/multi-temporal-super-resolution"
MTSR_COMMIT = "5ef642304a980db87bdb935a7a7450bd649f8912"
MTSR_PATH = "tests/data/data_loader/input"
MTSR_FILES = {  # file -> (patchlet, SHA-256)
    "data_eopatch-0277_66_2.npz": ("eopatch-0277_66", "4ab8547f41f0b0f7e7a817e91f1c489e845ded1c7d4a08f2f016916b0e6ecd32"),
    "data_eopatch-0288_0_3.npz": ("eopatch-0288_0", "71fa3e0f76406b3063b6d2f618ffc9720aa954d2a8488f70f452e06602ba7957"),
}
MTSR_FOLDER = "mtsr"  # inside the cache folder
MTSR_SOURCE_ID = "mtsr-lithuania"
MTSR_LABELS = Path(__file__).resolve().parent / "data" / "mtsr_lithuania_labels.json"


def mtsr_folder(path) -> Path:
    """The MTSR files' folder: `path`/mtsr for the cache folder (or the folder holding the .nc)."""
    p = Path(path)
    p = p.parent if p.is_file() else p  # the .nc given: its folder (a folder not yet made stays itself)
    return p if p.name == MTSR_FOLDER else p / MTSR_FOLDER


def has_mtsr(path) -> bool:
    return all((mtsr_folder(path) / name).is_file() for name in MTSR_FILES)


def import_mtsr(checkout, cache=None) -> Path:
    """Copy the MTSR test chips from `checkout` (a checkout of MTSR_REPO at MTSR_COMMIT, a folder
    holding the two files, or a git clone, bare too, holding that commit) into `cache`/mtsr; RuntimeError (one line) on a missing file or a SHA-256
    mismatch, nothing partial left."""
    src = Path(checkout)
    src = src / MTSR_PATH if (src / MTSR_PATH).is_dir() else src
    folder = mtsr_folder(Path(cache) if cache is not None else default_cache())
    contents = {}
    for name, (_, sha) in MTSR_FILES.items():
        try:
            contents[name] = (src / name).read_bytes()
        except OSError as e:
            if (data := _git_show(Path(checkout), f"{MTSR_PATH}/{name}")) is None:
                raise RuntimeError(f"{src / name}: cannot read ({e.strerror}); expected {MTSR_REPO} at "
                                   f"{MTSR_COMMIT}") from None
            contents[name] = data
        if (got := _sha256(contents[name])) != sha:
            raise RuntimeError(f"{src / name}: SHA-256 {got}, expected {sha} ({MTSR_REPO} at {MTSR_COMMIT})")
    _write_files(folder, contents)
    return folder


def _git_show(repo: Path, path: str) -> bytes | None:
    """`path` at MTSR_COMMIT from the git repository `repo` (a clone with or without a work tree),
    or None when `repo` is no git repository holding it."""
    import subprocess

    if not repo.is_dir():
        return None
    try:
        r = subprocess.run(["git", "-C", str(repo), "show", f"{MTSR_COMMIT}:{path}"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


@dataclasses.dataclass
class MtsrChips:
    refl: dict[str, np.ndarray]  # patchlet -> float [T, 32, 32, 4] TOA reflectance B02, B03, B04, B08
    labels: dict[str, dict[str, str]]  # patchlet -> date -> label, by eye (dates in series order)


def load_mtsr_labels(path=MTSR_LABELS) -> dict[str, dict[str, str]]:
    with open(path) as f:
        labels = json.load(f)["labels"]
    if set(labels) != {p for p, _ in MTSR_FILES.values()}:
        raise ValueError(f"{path}: expected labels for {sorted(p for p, _ in MTSR_FILES.values())}")
    return labels


def load_mtsr(path, labels=MTSR_LABELS) -> MtsrChips:
    """The two chips in `path` (the cache folder or its mtsr/), checked by SHA-256; `features` only
    (no pickled objects are read: the dates come with the labels file)."""
    folder = mtsr_folder(path)
    lab = load_mtsr_labels(labels)
    refl = {}
    for name, (patchlet, sha) in MTSR_FILES.items():
        f = folder / name
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; import it with `python -m transforms.devdata.real_s2_series "
                                    f"import-mtsr CHECKOUT {folder.parent}` ({MTSR_REPO} at {MTSR_COMMIT})")
        data = f.read_bytes()
        if (got := _sha256(data)) != sha:
            raise ValueError(f"{f}: SHA-256 {got}, expected {sha}")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            x = np.asarray(z["features"], dtype=np.float64)
        if x.ndim != 4 or x.shape[1:] != (CHIP, CHIP, 4) or x.shape[0] != len(lab[patchlet]):
            raise ValueError(f"{f}: features {x.shape}, expected ({len(lab[patchlet])}, {CHIP}, {CHIP}, 4)")
        refl[patchlet] = x
    return MtsrChips(refl=refl, labels=lab)


def l1c_to_s2naip(refl: np.ndarray) -> np.ndarray:
    """float [..., 4] TOA reflectance B02, B03, B04, B08 -> uint8 [..., 4] TCI R, G, B (L1C scaling)
    and b08, as S2-NAIP stores them (`real_s2.to_s2naip` on the four bands)."""
    from transforms.devdata import real_s2 as R

    r = np.asarray(refl, dtype=np.float64)
    full = np.zeros(r.shape[:-1] + (13,))
    full[..., [1, 2, 3, 7]] = r  # B02, B03, B04, B08 in the 13-band order
    b = R.to_s2naip(full)
    return np.concatenate([b["tci"], b["b08"][..., None]], axis=-1)


def mtsr_tiles(chips: MtsrChips, include_hr_date: bool = False) -> list[H.DevTile]:
    """Per chip and clean HR date: the HR (`real_s2.hr_from`) and every other date as the series."""
    from transforms.devdata import real_s2 as R

    out = []
    for patchlet, x in chips.refl.items():
        lab = chips.labels[patchlet]
        dates_all = list(lab)
        for k, hd in enumerate(dates_all):
            if lab[hd] != CLEAN:
                continue
            rows = [i for i, d in enumerate(dates_all) if include_hr_date or d != hd]
            dates = [dates_all[i] for i in rows]
            if not any(lab[d] == CLEAN for d in dates if d != hd):
                continue
            full = np.zeros((CHIP, CHIP, 13))
            full[..., [1, 2, 3, 7]] = x[k]
            out.append(H.DevTile(
                tile_id=f"{MTSR_SOURCE_ID}/{patchlet}/{hd}", hr_date=hd, hr=R.hr_from(full),
                series=l1c_to_s2naip(x[rows]), extra={}, kinds=tuple(lab[d] for d in dates),
                capture_of_index=tuple(dates), shifts=np.zeros((len(dates), 2)),
                hr_date_index=dates.index(hd) if include_hr_date else None))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    usage = ("usage: python -m transforms.devdata.real_s2_series fetch [CACHE_DIR]\n"
             "       python -m transforms.devdata.real_s2_series import-mtsr CHECKOUT [CACHE_DIR]")
    if args and args[0] == "import-mtsr" and len(args) in (2, 3):
        try:
            path = import_mtsr(args[1], args[2] if len(args) > 2 else None)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(path)
        return 0
    if not args or args[0] != "fetch" or len(args) > 2:
        print(usage, file=sys.stderr)
        return 2
    try:
        path = fetch(args[1] if len(args) > 1 else None)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
