"""The pipeline version, recorded in every pair row and run.json (setup.py reads it from here)."""
PIPELINE_VERSION = "0.2.0"
