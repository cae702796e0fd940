"""`s2naip index`: list an S2-NAIP folder once and write its tile ids as a manifest.

The listing runs on the workers (one task per NAIP capture folder); later builds read the manifest
in shards instead of listing the bucket again.
"""
from __future__ import annotations

import os
import sys

import apache_beam as beam

from pipelines.cli import ArgumentParser, CommandError, command_main, description, without_step
from pipelines.options import (
    check_output_writable,
    check_set_folder,
    parse_beam_options,
    runs_here,
    use_in_process_runner_by_default,
    use_own_image_on_dataflow_by_default,
)
from transforms.build.stages import NoTiles, ReadTileIds, no_tiles_message
from transforms.io import storage


def require_tile_ids(count: int, input_root: str) -> int:
    if count == 0:
        raise NoTiles(no_tiles_message({"input": input_root}))
    return count


def build(p: beam.Pipeline, input_root: str, manifest: str):
    ids = p | "ListTileIds" >> ReadTileIds(input_root)
    # an empty listing fails the job: a wrong --input never looks like an empty set
    _ = (ids | "CountIds" >> beam.combiners.Count.Globally()
         | "RequireIds" >> beam.Map(require_tile_ids, input_root=input_root))
    return ids | "WriteManifest" >> beam.io.WriteToText(manifest, num_shards=1, shard_name_template="")


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="s2naip index", description=description(__doc__),
                       epilog="Apache Beam options (--runner, ...) are accepted too.")
    p.add_argument("--input", required=True,
                   help="S2-NAIP set folder, the one holding naip/<naip_id>/<x>_<y>/rgb.png (local or gs://)")
    p.add_argument("--manifest", required=True, help="Manifest file to write (text, one id a line)")
    return p


def run(argv: list[str]) -> int:
    args, beam_args = parser().parse_known_args(argv)
    options = parse_beam_options(beam_args)
    here = runs_here(options)
    existed = storage.exists(args.manifest) if here else True
    if here:
        check_set_folder(args.input)
        check_output_writable(os.path.dirname(args.manifest) or ".", "--manifest's folder")
    use_in_process_runner_by_default(options)
    use_own_image_on_dataflow_by_default(options)
    try:
        with beam.Pipeline(options=options) as p:
            build(p, args.input, args.manifest)
    except BaseException as e:  # failed or interrupted: no manifest of this run stays
        if here and not existed:
            storage.delete([args.manifest])
        if isinstance(e, NoTiles):
            raise CommandError(without_step(e)) from None
        raise
    print(f"manifest: {args.manifest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main(run, argv, prog="s2naip index")


if __name__ == "__main__":
    sys.exit(main())
