"""`s2naip index`: list an S2-NAIP folder once and write its tile ids as a manifest.

The listing runs on the workers (one task per NAIP capture folder); later builds read the manifest
in shards instead of listing the bucket again.
"""
from __future__ import annotations

import argparse
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.cli import configure_logging
from pipelines.options import use_in_process_runner_by_default, use_own_image_on_dataflow_by_default
from transforms.beam import ReadTileIds


def build(p: beam.Pipeline, input_root: str, manifest: str):
    return (
        p
        | "ListTileIds" >> ReadTileIds(input_root)
        | "WriteManifest" >> beam.io.WriteToText(manifest, num_shards=1, shard_name_template="")
    )


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    parser = argparse.ArgumentParser(prog="s2naip index", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="S2-NAIP set folder (local or gs://)")
    parser.add_argument("--manifest", required=True, help="Manifest file to write (text, one id a line)")
    args, beam_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    options = PipelineOptions(beam_args)
    use_in_process_runner_by_default(options)
    use_own_image_on_dataflow_by_default(options)
    with beam.Pipeline(options=options) as p:
        build(p, args.input, args.manifest)
    print(f"manifest: {args.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
