"""Packaging for s2naip-pairs: rebuilds S2-NAIP into clean RGBN super-resolution pairs on Apache Beam.

`requirements.txt` is the pinned lock used for workers and CI; the ranges here are what the code needs.
"""
import pathlib
import re

from setuptools import find_packages, setup

_VERSION_FILE = pathlib.Path(__file__).parent / "transforms" / "version.py"
PIPELINE_VERSION = re.search(r'PIPELINE_VERSION = "([^"]+)"', _VERSION_FILE.read_text()).group(1)

setup(
    name="s2naip-pairs",
    version=PIPELINE_VERSION,
    description="Rebuild S2-NAIP into clean NAIP/Sentinel-2 RGBN super-resolution pairs with Apache Beam",
    python_requires=">=3.11",
    packages=find_packages(include=["pipelines", "pipelines.*", "transforms", "transforms.*"]),
    package_data={"transforms.quality": ["review_assets/*.html", "review_assets/*.js", "review_assets/*.css"],
                  "transforms.devdata": ["data/*.json"]},
    install_requires=[
        "apache-beam[gcp]>=2.77,<2.78",
        "numpy>=2.0",
        "scipy>=1.13",
        "scikit-image>=0.24",
        "rasterio>=1.4",
        "pyarrow>=17",
        "gcsfs>=2024.6",
        "google-cloud-storage>=2.18",
        "pillow>=10.4",
        # PNG decoding (transforms/imagery.py); s2cloudless brings it too
        "opencv-python-headless>=4.8",
        "protobuf>=4.25",
        "google-crc32c>=1.5",
        "matplotlib>=3.9",
        # the s2cloudless model file (read, never imported: transforms/cloud_prob.py)
        "s2cloudless>=1.7,<2",
        # the build's BLAS pools limited to one thread per worker process (transforms/runtime.py)
        "threadpoolctl>=3.1",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pandas>=2.2", "gcp-storage-emulator>=2026.7",
                 "playwright>=1.50", "stac-fastapi-pgstac>=7.2", "pypgstac[psycopg]>=0.10", "uvicorn>=0.30",
                 "planetary-computer>=1.0"],
        # `s2naip fetch-nir --sign planetary-computer`
        "planetary-computer": ["planetary-computer>=1.0"],
        # CI only (.ci/run): TensorFlow's CPU wheel reads the TFRecords in tests/test_sinks.py; pinned
        # with its dependencies in requirements-ci.txt (compatible with the lock's numpy and protobuf)
        "ci": ["tensorflow-cpu>=2.21,<2.22"],
    },
    entry_points={"console_scripts": ["s2naip=pipelines.cli:main"]},
)
