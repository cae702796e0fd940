"""`s2naip build`: S2-NAIP folder -> paired RGBN records (Parquet), rejects and run.json.

    python -m pipelines.build_pairs --input DIR --output DIR [beam options]
"""
from __future__ import annotations

import json
import logging
import sys
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import BuildOptions, pair_config, use_in_process_runner_by_default
from transforms import storage, tiles
from transforms.beam import BuildPairsPipeline
from transforms.pairs import PairConfig
from transforms.version import PIPELINE_VERSION

_LOG = logging.getLogger(__name__)


def run_info(config: PairConfig, opts: BuildOptions, options: PipelineOptions) -> dict:
    """What run.json records about the run, fixed on the launcher (no per-tile data)."""
    return {
        "pipeline_version": PIPELINE_VERSION,
        "input": config.input_root,
        "nir_input": config.nir_input,
        "manifest": opts.manifest,
        "output": opts.output,
        "options": {
            "selection": config.selection.mode,
            "alpha": config.selection.alpha,
            "top_k": config.selection.top_k,
            "downsample": config.selection.downsample_method,
            "bands": config.bands,
            "split": config.split,
            "border_px": config.selection.border_px,
            "max_border_black": config.selection.max_border_black,
            "runner": str(options.get_all_options().get("runner")),
        },
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def sample_input_dir(output: str) -> str:
    """Where the embedded sample is generated: beside a local output, in a temp folder otherwise."""
    if storage.is_local(output):
        return output.rstrip("/") + "-sample-input"
    import tempfile

    return tempfile.mkdtemp(prefix="s2naip-sample-")


def build(p: beam.Pipeline, config: PairConfig, output: str, info: dict,
          manifest: str | None = None, num_shards: int = 0):
    return p | "BuildPairs" >> BuildPairsPipeline(config, output, info, manifest, num_shards)


def summary_text(summary: dict) -> str:
    counts = summary["counts"]
    lines = [
        f"tiles {counts['tiles']}: {counts['pairs']} pairs, {counts['rejects']} rejects",
        *(f"  rejected {n:>7}  {reason}" for reason, n in counts["rejects_by_reason"].items()),
        f"pairs:   {tiles.join(summary['output'], 'pairs')}/",
        f"rejects: {tiles.join(summary['output'], 'rejects')}/",
        f"summary: {tiles.join(summary['output'], 'run.json')}",
    ]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> dict | None:
    """Runs the build; returns run.json's content when the runner waited for the job."""
    options = PipelineOptions(argv)
    opts = options.view_as(BuildOptions)
    if not opts.output:
        raise SystemExit("error: --output is required")
    if not opts.input:
        from transforms.sample import generate_sample

        sample_dir = sample_input_dir(opts.output)
        _LOG.info("no --input: generating the embedded sample (%d tiles) in %s", opts.sample_tiles, sample_dir)
        generate_sample(sample_dir, opts.sample_tiles, seed=0)
        opts.input = sample_dir
    try:
        config = pair_config(opts)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    use_in_process_runner_by_default(options)
    info = run_info(config, opts, options)
    with beam.Pipeline(options=options) as p:
        build(p, config, opts.output, info, opts.manifest, opts.num_shards)
    run_json = tiles.join(opts.output, "run.json")
    if storage.exists(run_json):
        summary = json.loads(storage.read_bytes(run_json, 64 * 1024 * 1024))
        print(summary_text(summary))
        return summary
    return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    run(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
