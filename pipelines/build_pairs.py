"""`s2naip build`: S2-NAIP folder -> paired RGBN records (Parquet), rejects and run.json.

    python -m pipelines.build_pairs --input DIR --output DIR [beam options]
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import tempfile
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions, StandardOptions

from pipelines.cli import CommandError, command_main, without_step
from pipelines.options import (
    BuildOptions,
    check_build_inputs,
    check_output_writable,
    check_since,
    discard_unpublished_run,
    output_spec,
    pair_config,
    parse_build_options,
    prepare_output,
    runs_here,
    use_in_process_runner_by_default,
    use_own_image_on_dataflow_by_default,
)
from transforms import progress
from transforms.build import dataset_manifest, forked_workers
from transforms.build.pipeline import build
from transforms.build.stages import NoTiles
from transforms.io import latest, publish, storage
from transforms.io.publish import OutputSpec
from transforms.pairs import PairConfig
from transforms.version import PIPELINE_VERSION

_LOG = logging.getLogger(__name__)


def run_info(config: PairConfig, spec: OutputSpec, opts: BuildOptions, options: PipelineOptions) -> dict:
    """What run.json records about the run, fixed on the launcher (no per-tile data). Local paths
    are made absolute, so that `report` and `review` find the input from any folder."""
    return {
        "pipeline_version": PIPELINE_VERSION,
        "input": storage.absolute(config.input_root),
        "nir_input": storage.absolute(config.nir_input),
        "manifest": storage.absolute(opts.manifest),
        "corrections": [storage.absolute(c) for c in config.corrections],
        "output": storage.absolute(spec.path),
        "formats": list(spec.formats),
        "options": {
            "selection": config.selection.mode,
            "alpha": config.selection.alpha,
            "top_k": config.selection.top_k,
            "lr_timesteps": config.selection.lr_timesteps,
            "allow_fewer": config.selection.allow_fewer,
            "downsample": config.selection.downsample_method,
            "bands": config.bands,
            "split": config.split,
            "border_px": config.selection.border_px,
            "max_border_black": config.selection.max_border_black,
            "num_shards": spec.num_shards,
            "tfrecord_gzip": spec.tfrecord_gzip,
            "runner": str(options.get_all_options().get("runner")),
        },
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def sample_input_dir(output: str) -> str:
    """Where the embedded sample is generated: beside a local output, in a temp folder otherwise."""
    if storage.is_local(output):
        return output.rstrip("/") + "-sample-input"
    return tempfile.mkdtemp(prefix="s2naip-sample-")


def runs_on_this_machine(options: PipelineOptions) -> bool:
    """True when every worker of the job is a process of this machine (local runners, or any
    portable runner with LOOPBACK workers)."""
    environment = options.view_as(PortableOptions).environment_type
    return runs_here(options) or str(environment).upper() == "LOOPBACK"


@contextlib.contextmanager
def progress_reporting(options: PipelineOptions):
    """A progress folder the workers count into and a reporter printing from it, on a local runner
    (transforms.progress); None elsewhere (Dataflow and Flink have their own consoles)."""
    if not runs_on_this_machine(options):
        yield None
        return
    folder = tempfile.mkdtemp(prefix="s2naip-progress-")
    try:
        with progress.ProgressReporter(folder):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# The folders a build writes, per output format, beside rejects/ and manifest/ (transforms.io.publish).
FORMAT_FOLDERS = {"parquet": ("pairs",), "tfrecord": ("tfrecord",), "png": ("png", "png_rejects")}
INCREMENTAL_SHOWN = ("new", "changed", "carried", "superseded", "removed")


def summary_text(summary: dict) -> str:
    """The lines printed at the end of a build: counts, then every folder the run wrote."""
    counts = summary["counts"]
    output = summary["output"]
    folders = [f for fmt in summary.get("formats", ("parquet",)) for f in FORMAT_FOLDERS.get(fmt, ())]
    folders += ["rejects", "manifest"]
    width = max(len(f) for f in folders) + 1
    lines = [
        f"tiles {counts['tiles']}: {counts['pairs']} pairs, {counts['rejects']} rejects",
        *(f"  rejected {n:>7}  {reason}" for reason, n in counts["rejects_by_reason"].items()),
    ]
    multi = counts.get("lr_timesteps")
    if multi:
        n = multi["requested"]
        fewer = sum(v for k, v in multi["pairs_by_count"].items() if int(k) < n)
        lines.append(f"lr timesteps: {multi['pairs_with_all']} pairs with {n}, {fewer} with fewer (--allow-fewer), "
                     f"{multi['rejected_too_few']} tiles rejected with fewer than {n} acceptable")
    png = counts.get("png")
    if png:
        lines.append(f"png layout: {png['pairs']} pairs in png/, {png['black_pixel_tiles']} of them with a pure-black "
                     "HR pixel (the training code skips those)")
    inc = summary.get("incremental")
    if inc and summary.get("since"):
        lines.append("incremental: " + ", ".join(f"{k} {inc.get(k, 0)}" for k in INCREMENTAL_SHOWN)
                     + f" (since {summary['since']})")
    lines += [f"{folder + ':':<{width}} {storage.join(output, folder)}/" for folder in folders]
    lines.append(f"{'summary:':<{width}} {storage.join(output, 'run.json')}")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> dict | None:
    """Runs the build; returns run.json's content when the runner waited for the job."""
    options = parse_build_options(sys.argv[1:] if argv is None else argv)
    opts = options.view_as(BuildOptions)
    if not opts.output:
        raise CommandError("--output is required (see --help)", usage=True)
    if opts.sample_tiles < 1:
        raise CommandError(f"--sample-tiles must be >= 1, got {opts.sample_tiles}", usage=True)
    try:  # the options' values first, before any file is looked at
        output_spec(opts)
        pair_config(opts, input_root=opts.input or "embedded-sample")
    except ValueError as e:
        raise CommandError(str(e), usage=True) from None
    here = runs_here(options)
    output_existed = storage.exists(opts.output) if here else True
    if here and opts.input:
        check_build_inputs(opts)  # before anything is written, deleted or started
    if here:
        check_output_writable(opts.output)
    if not opts.input:
        from transforms.devdata.sample import generate_sample

        sample_dir = sample_input_dir(opts.output)
        print(f"no --input: generating the embedded sample ({opts.sample_tiles} tiles) in "
              f"{storage.absolute(sample_dir)}", flush=True)
        generate_sample(sample_dir, opts.sample_tiles, seed=0, extra_bands=True)
        opts.input = sample_dir
    try:
        config = pair_config(opts)
        spec = output_spec(opts)
        since = check_since(latest.resolve_since(opts.since), spec.path)
        if since:
            dataset_manifest.manifest_files(since)  # fail fast: a published run with a manifest
        prepare_output(spec.path, opts.overwrite)
    except (ValueError, FileNotFoundError, publish.OutputNotEmpty) as e:
        raise CommandError(str(e)) from None
    use_in_process_runner_by_default(options)
    use_own_image_on_dataflow_by_default(options)
    info = run_info(config, spec, opts, options)
    try:
        with (forked_workers.runner_for(options, cold=opts.cold_workers) as runner,
              progress_reporting(options) as progress_dir,
              beam.Pipeline(runner=runner, options=options) as p):
            build(p, config, spec, info, opts.manifest, since=since, latest_pointer=opts.latest,
                  progress_dir=progress_dir)
    except BaseException as e:  # failed or interrupted (Ctrl-C): nothing of this run stays published
        if here:
            discard_unpublished_run(spec.path)
            if not output_existed:
                storage.remove_empty_tree(spec.path)
        if isinstance(e, NoTiles):
            raise CommandError(without_step(e)) from None
        raise
    if not getattr(p.result, "has_job", True) or options.view_as(StandardOptions).no_wait_until_finish:
        return None  # a template was staged or the job runs on: its run.json does not exist yet
    run_json = storage.join(opts.output, "run.json")
    if storage.exists(run_json):
        summary = json.loads(storage.read_bytes(run_json, 64 * 1024 * 1024))
        print(summary_text(summary))
        return summary
    return None


def main(argv: list[str] | None = None) -> int:
    return command_main(run, argv, prog="s2naip build")


if __name__ == "__main__":
    sys.exit(main())
