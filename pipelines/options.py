"""Pipeline options of the build, validated up front (before any worker starts)."""
from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from transforms import storage
from transforms.pairs import BAND_SETS, PairConfig
from transforms.publish import OutputSpec
from transforms.selection import DEFAULT_SELECTION, DOWNSAMPLE_METHODS, SELECTION_MODES, SelectionConfig

DEFAULT_SAMPLE_TILES = 200
REMOTE_READ_THREADS = 16  # GCS: ~20-50 ms per small read, ~10 reads per tile, ~10 ms of CPU per tile


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _flag(parser, *names: str, help: str) -> None:
    """A boolean flag that also takes a value (`--x`, `--x=true`, `--x=false`): template launchers
    pass every parameter as name=value."""
    dest = names[-1].lstrip("-").replace("-", "_")
    parser.add_argument(*names, dest=dest, nargs="?", const=True, default=False, type=_parse_bool, help=help)


class BuildOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--input", default=None,
                            help="S2-NAIP set folder (naip/, sentinel2/); local or gs://. "
                                 "Omitted: generate the embedded sample and build it.")
        parser.add_argument("--output", default=None, help="Output folder of this run (local or gs://).")
        parser.add_argument("--nir-input", "--nir_input", dest="nir_input", default=None,
                            help="Root of naip/<naip_id>/<x>_<y>/nir.png (default: --input).")
        parser.add_argument("--manifest", default=None,
                            help="Tile ids to build: text (one id a line) or .parquet (tile_id column). "
                                 "Omitted: list --input.")
        parser.add_argument("--selection", default=DEFAULT_SELECTION, choices=SELECTION_MODES,
                            help="paper (default): the paper's score as written; robust: the paper's closeness "
                                 "without SSIM's haze bias, plus evidence of haze, cloud (s2cloudless), shadow, "
                                 "snow and misregistration (docs/selection-method.md); companion: the published "
                                 "code's rule.")
        parser.add_argument("--alpha", type=float, default=0.7, help="Weight of the raw distance.")
        parser.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=16,
                            help="Timesteps kept by PSNR before scoring.")
        parser.add_argument("--downsample", default=None, choices=DOWNSAMPLE_METHODS,
                            help="HR->32x32 resampling (default: bicubic_aa for paper, "
                                 "bicubic_torch, the companion's non-antialiased one, for companion).")
        parser.add_argument("--bands", default="rgbn", choices=BAND_SETS)
        parser.add_argument("--split", default=None,
                            help="Value of the split column (default: the input folder's name).")
        parser.add_argument("--format", default="parquet",
                            help="Comma-separated output formats: parquet, tfrecord, png (each in its own folder).")
        _flag(parser, "--tfrecord-gzip", "--tfrecord_gzip", help="Gzip the TFRecord files (.tfrecord.gz).")
        parser.add_argument("--num-shards", "--num_shards", dest="num_shards", type=int, default=0,
                            help="Output shards per table (0: the runner decides).")
        _flag(parser, "--overwrite", help="Replace a run already in --output (default: refuse).")
        parser.add_argument("--since", default=None,
                            help="Build incrementally against a published run (a run folder with manifest/, or a "
                                 "latest pointer *.json naming one): only new and changed tiles are built, the "
                                 "others' records are copied. Omitted: a full build.")
        parser.add_argument("--latest", default=None,
                            help="A latest pointer (JSON, local or gs://) moved to this run after its _SUCCESS.")
        parser.add_argument("--corrections", action="append", default=None,
                            help="Reviewer corrections, JSON {tile_id: lr_index or null} (local or gs://); "
                                 "repeatable or comma-separated, a later file wins. An index builds that "
                                 "timestep (selection manual), null removes the tile.")
        parser.add_argument("--read-threads", "--read_threads", dest="read_threads", type=int, default=None,
                            help="Per worker process, input reads (and fingerprint listings) run ahead on this "
                                 "many threads while tiles are built, so that object-store round trips overlap; "
                                 f"0: read each file when it is needed. Default: {REMOTE_READ_THREADS} when an "
                                 "input is on an object store (gs://), 0 for local files.")
        parser.add_argument("--sample-tiles", "--sample_tiles", dest="sample_tiles", type=int,
                            default=DEFAULT_SAMPLE_TILES,
                            help="Tiles of the embedded sample when --input is omitted.")


def default_split(input_root: str) -> str:
    return input_root.rstrip("/").rsplit("/", 1)[-1] or "default"


def default_read_threads(opts: BuildOptions) -> int:
    """Reads ahead only pay where a read is a round trip: on an object store, not on local disk
    (measured: README, "Reading from cloud storage")."""
    roots = [opts.input] + ([opts.nir_input] if opts.nir_input else [])
    return 0 if all(storage.is_local(root) for root in roots) else REMOTE_READ_THREADS


def pair_config(opts: BuildOptions) -> PairConfig:
    """The validated per-tile configuration; raises ValueError with a clear message."""
    if not opts.input:
        raise ValueError("--input is required here")
    if opts.alpha is None or not 0.0 <= opts.alpha <= 1.0:
        raise ValueError(f"--alpha must be within [0, 1], got {opts.alpha}")
    if opts.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {opts.top_k}")
    if opts.read_threads is not None and opts.read_threads < 0:
        raise ValueError(f"--read-threads must be >= 0, got {opts.read_threads}")
    return PairConfig(
        input_root=opts.input,
        nir_root=opts.nir_input,
        bands=opts.bands,
        split=opts.split if opts.split is not None else default_split(opts.input),
        selection=SelectionConfig(mode=opts.selection, alpha=opts.alpha, top_k=opts.top_k,
                                  downsample=opts.downsample),
        corrections=tuple(p.strip() for arg in (opts.corrections or ()) for p in arg.split(",") if p.strip()),
        read_threads=opts.read_threads if opts.read_threads is not None else default_read_threads(opts),
    )


def output_spec(opts: BuildOptions) -> OutputSpec:
    """The validated output formats and sharding; raises ValueError with a clear message."""
    return OutputSpec.parse(opts.output, opts.format, opts.num_shards, opts.tfrecord_gzip)


def use_in_process_runner_by_default(options: PipelineOptions) -> None:
    """Without --runner, run on Beam's in-process FnApiRunner: the DirectRunner would first try to
    download the Prism runner, which needs the network and is slower for this job."""
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = "FnApiRunner"
