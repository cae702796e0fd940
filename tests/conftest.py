"""Shared pytest fixtures."""
import os
from pathlib import Path

import pytest

# --- real NAIP data (tests/real_tiles.py) -------------------------------------------------------

REAL_DATA_ENV = "S2NAIP_REAL_DATA"
DEFAULT_REAL_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "naip_real"


@pytest.fixture(scope="session")
def real_naip_dir() -> Path:
    """The folder of real NAIP GeoTIFFs (m_*.tif) that tests/real_tiles.py builds tiles from.

    $S2NAIP_REAL_DATA if set (then it must exist and hold GeoTIFFs, or the session errors);
    else <repo>/../shared/data/naip_real if it exists; else every test using it is skipped.
    Never copy these files, or tiles built from them, into the project.
    """
    env = os.environ.get(REAL_DATA_ENV)
    if env:
        path = Path(env)
        if not path.is_dir():
            raise FileNotFoundError(f"${REAL_DATA_ENV}={env!r} is not a directory")
    else:
        path = DEFAULT_REAL_DATA_DIR
        if not path.is_dir():
            pytest.skip(f"no real NAIP data: set ${REAL_DATA_ENV} or provide {path}")
    if not any(path.glob("m_*.tif")):
        raise FileNotFoundError(f"real NAIP data folder {path} holds no m_*.tif GeoTIFFs")
    return path


@pytest.fixture(scope="session")
def real_tile_set(real_naip_dir, tmp_path_factory):
    """(root, [RealTile]): 20 tiles built once per session from the real data, default settings."""
    from tests.real_tiles import build_real_tiles

    root = tmp_path_factory.mktemp("real_s2naip")
    return root, build_real_tiles(root, real_naip_dir, n_tiles=20, seed=0)
