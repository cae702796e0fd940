"""Pipeline options of the build, validated up front (before any worker starts).

`parse_build_options` is the build's command line: every option of `BuildOptions` plus any Apache
Beam option; anything else stops the build before it starts (`did you mean`). The `check_*`
functions look at the input and output before the pipeline starts (one listing, a probe file), so
that a wrong path ends in one line instead of an empty run.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
    WorkerOptions,
    _BeamArgumentParser,
)

from pipelines.cli import CommandError, HelpFormatter, unknown_arguments_message
from transforms import tiles
from transforms.build import dataset_manifest as dm
from transforms.io import publish, storage
from transforms.io.publish import OutputSpec
from transforms.pairs import BAND_SETS, PairConfig
from transforms.selection import DEFAULT_SELECTION, DOWNSAMPLE_METHODS, SELECTION_MODES, SelectionConfig

DEFAULT_SAMPLE_TILES = 200
REMOTE_READ_THREADS = 16  # GCS: ~20-50 ms per small read, ~10 reads per tile, ~10 ms of CPU per tile
# The name of the image this process runs in, baked in at build time (deploy/dataflow/Dockerfile).
IMAGE_ENV = "S2NAIP_IMAGE"


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
    parser.add_argument(*names, dest=dest, nargs="?", const=True, default=False, type=_parse_bool, metavar="true|false",
                        help=help)


class BuildOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        src = parser.add_argument_group("input")
        src.add_argument("--input", default=None,
                         help="S2-NAIP set folder, the one holding naip/<naip_id>/<x>_<y>/rgb.png and "
                              "sentinel2/; local or gs://. Omitted: generate the embedded sample and build it.")
        src.add_argument("--nir-input", "--nir_input", dest="nir_input", default=None,
                         help="Root of naip/<naip_id>/<x>_<y>/nir.png (default: --input).")
        src.add_argument("--manifest", default=None,
                         help="Tile ids to build: text (one id a line, '#' starts a comment) or .parquet "
                              "(tile_id column). Omitted: list --input.")
        src.add_argument("--since", default=None,
                         help="Build incrementally against a published run (a run folder with manifest/, or a "
                              "latest pointer *.json naming one): only new and changed tiles are built, the "
                              "others' records are copied. Omitted: a full build.")
        src.add_argument("--corrections", action="append", default=None,
                         help="Reviewer corrections, JSON {tile_id: lr_index or null} (local or gs://); "
                              "repeatable or comma-separated, a later file wins. An index builds that "
                              "timestep (selection manual), null removes the tile.")
        src.add_argument("--sample-tiles", "--sample_tiles", dest="sample_tiles", type=int,
                         default=DEFAULT_SAMPLE_TILES,
                         help="Tiles of the embedded sample when --input is omitted (>= 1).")

        sel = parser.add_argument_group("selection")
        sel.add_argument("--selection", default=DEFAULT_SELECTION, choices=SELECTION_MODES,
                         help="robust (default): the paper's score plus evidence of veils against the clearest "
                              "timesteps and the HR, a dark gate, cirrus, snow and cloud (s2cloudless) "
                              "(docs/selection-method.md); paper: the paper's score as written; companion: the "
                              "published code's rule.")
        sel.add_argument("--alpha", type=float, default=0.7,
                         help="Weight, in [0, 1], of the raw comparison against the one after histogram "
                              "matching.")
        sel.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=16,
                         help="Candidate timesteps scored per tile: the k closest to the downsampled NAIP, "
                              "by PSNR (paper, companion) or by gap-free correlation (robust).")
        sel.add_argument("--lr-timesteps", "--lr_timesteps", dest="lr_timesteps", type=int, default=1,
                         help="Sentinel-2 timesteps written per pair, best first by the mode's own ranking "
                              "(1, the paper's single pair; up to --top-k): lr is [N, 32, 32, C] and the PNG "
                              "layout stacks them for n_s2_images: N. Acceptable: robust's evidence passes; "
                              "paper and companion's clean gates (not dark, no thick cloud, s2cloudless) pass. "
                              "A tile with fewer acceptable timesteps is a too_few_timesteps reject "
                              "(docs/outputs.md).")
        _flag(sel, "--allow-fewer", "--allow_fewer",
              help="With --lr-timesteps N: write a tile with fewer than N acceptable timesteps with those "
                   "it has, instead of rejecting it.")
        sel.add_argument("--downsample", default=None, choices=DOWNSAMPLE_METHODS,
                         help="NAIP -> 32x32 resampling. Default: the mode's, bicubic_aa (antialiased) for "
                              "robust and paper, bicubic_torch (PyTorch's, not antialiased) for companion.")

        out = parser.add_argument_group("output")
        out.add_argument("--output", default=None, help="Output folder of this run (local or gs://); required.")
        out.add_argument("--format", default="parquet",
                         help="Comma-separated output formats: parquet, tfrecord, png (each in its own folder).")
        out.add_argument("--bands", default="rgbn", choices=BAND_SETS,
                         help="Bands of the records: rgbn (R, G, B and NAIP/Sentinel-2 NIR) or rgb.")
        out.add_argument("--split", default=None,
                         help="Value of the split column (default: the input folder's name).")
        _flag(out, "--tfrecord-gzip", "--tfrecord_gzip", help="Gzip the TFRecord files (.tfrecord.gz).")
        out.add_argument("--num-shards", "--num_shards", dest="num_shards", type=int, default=0,
                         help="Output shards per table (0: the runner decides).")
        _flag(out, "--overwrite", help="Replace a run already in --output (default: refuse).")
        out.add_argument("--latest", default=None,
                         help="A latest pointer (JSON, local or gs://) moved to this run after its _SUCCESS.")

        run = parser.add_argument_group("cloud / runner")
        run.add_argument("--read-threads", "--read_threads", dest="read_threads", type=int, default=None,
                         help="Per worker process, input reads (and fingerprint listings) run ahead on this "
                              "many threads while tiles are built, so that object-store round trips overlap; "
                              f"0: read each file when it is needed. Default: {REMOTE_READ_THREADS} when an "
                              "input is on an object store (gs://), 0 for local files.")
        _flag(run, "--cold-workers", "--cold_workers",
              help="With --direct_running_mode=multi_processing: start each worker process as Beam does "
                   "(a fresh interpreter importing Beam) instead of forking it from a process that has "
                   "imported it already (transforms/build/forked_workers.py; Linux).")


def default_split(input_root: str) -> str:
    return input_root.rstrip("/").rsplit("/", 1)[-1] or "default"


def default_read_threads(opts: BuildOptions, input_root: str | None = None) -> int:
    """Reads ahead only pay where a read is a round trip: on an object store, not on local disk
    (measured: docs/cloud.md, "Reading from cloud storage: reads started ahead")."""
    roots = [input_root or opts.input] + ([opts.nir_input] if opts.nir_input else [])
    return 0 if all(storage.is_local(root) for root in roots) else REMOTE_READ_THREADS


def pair_config(opts: BuildOptions, input_root: str | None = None) -> PairConfig:
    """The validated per-tile configuration (of `input_root`, default --input); raises ValueError
    with a clear message."""
    input_root = input_root or opts.input
    if not input_root:
        raise ValueError("--input is required here")
    if opts.alpha is None or not 0.0 <= opts.alpha <= 1.0:
        raise ValueError(f"--alpha must be within [0, 1], got {opts.alpha}")
    if opts.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {opts.top_k}")
    if opts.lr_timesteps is None or not 1 <= opts.lr_timesteps <= opts.top_k:
        raise ValueError(f"--lr-timesteps must be within [1, --top-k = {opts.top_k}], got {opts.lr_timesteps}")
    if opts.read_threads is not None and opts.read_threads < 0:
        raise ValueError(f"--read-threads must be >= 0, got {opts.read_threads}")
    return PairConfig(
        input_root=input_root,
        nir_root=opts.nir_input,
        bands=opts.bands,
        split=opts.split if opts.split is not None else default_split(input_root),
        selection=SelectionConfig(mode=opts.selection, alpha=opts.alpha, top_k=opts.top_k,
                                  downsample=opts.downsample, lr_timesteps=opts.lr_timesteps,
                                  allow_fewer=bool(opts.allow_fewer)),
        corrections=tuple(p.strip() for arg in (opts.corrections or ()) for p in arg.split(",") if p.strip()),
        read_threads=opts.read_threads if opts.read_threads is not None else default_read_threads(opts, input_root),
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


def runner_name(options: PipelineOptions, default: str = "") -> str:
    """--runner as a lower-case class name (a qualified name or a runner instance too)."""
    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) else type(runner).__name__ if runner else default
    return name.rsplit(".", 1)[-1].lower()


def use_own_image_on_dataflow_by_default(options: PipelineOptions) -> None:
    """On Dataflow without --sdk_container_image, run the workers on the image this process runs in.

    Inside the project's image (`S2NAIP_IMAGE` names it) a launch that omits the option (the Flex
    Template from the Console or the REST API, `index` or `fetch-nir` from a Cloud Run job) would
    otherwise get Beam's stock worker image, which lacks this project (ModuleNotFoundError:
    transforms). Outside the image nothing changes.
    """
    image = os.environ.get(IMAGE_ENV, "").strip()
    if not image or runner_name(options) not in ("dataflow", "dataflowrunner"):
        return
    worker = options.view_as(WorkerOptions)
    if worker.sdk_container_image or worker.worker_harness_container_image:
        return
    worker.sdk_container_image = image


# ---------------------------------------------------------------------------------------------
# The command line

# Beam options shown in `s2naip build --help` (every other Beam option is accepted too).
BEAM_HELP_OPTIONS = (
    (StandardOptions, ("runner",)),
    (DirectOptions, ("direct_num_workers", "direct_running_mode")),
    (GoogleCloudOptions, ("project", "region", "job_name", "temp_location", "staging_location",
                          "template_location", "service_account_email")),
    (WorkerOptions, ("num_workers", "max_num_workers", "machine_type", "disk_size_gb", "sdk_container_image")),
    (DebugOptions, ("experiments",)),
)
BEAM_HELP_OVERRIDES = {
    "runner": "Where the pipeline runs: FnApiRunner (the default here: in this process), DataflowRunner, "
              "FlinkRunner, PortableRunner, ... or any PipelineRunner's qualified name.",
}
BUILD_DESCRIPTION = """\
Build paired RGBN records from an S2-NAIP set folder (naip/<naip_id>/<x>_<y>/rgb.png and
sentinel2/<x>_<y>/*.png): Parquet pairs, Parquet rejects with their reason, run.json and _SUCCESS.
Without --input, the embedded sample is generated beside --output and built."""
BUILD_EPILOG = """\
Without --runner the build runs in this process, on Beam's FnApiRunner.
Any other Apache Beam pipeline option is accepted as well (--name=value), e.g. --direct_running_mode=
multi_processing; see https://beam.apache.org/releases/pydoc/current/apache_beam.options.pipeline_options.html.
--debug (or -v) shows a failure's traceback instead of its one-line message."""


class _OneLineParser(_BeamArgumentParser):
    def error(self, message):
        if message.startswith("ambiguous option: "):  # as Beam's: an unknown prefix is reported below
            return
        raise CommandError(message, usage=True)


def _beam_parser() -> _BeamArgumentParser:
    """Every option Beam knows in this process (all PipelineOptions subclasses, the build's
    included), as `PipelineOptions.get_all_options` collects them."""
    parser = _OneLineParser(allow_abbrev=False, add_help=False)
    seen = {}
    for cls in PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)  # noqa: SLF001 - Beam's own registration hook
    return parser


def build_help(prog: str = "s2naip build") -> str:
    parser = argparse.ArgumentParser(prog=prog, description=BUILD_DESCRIPTION, epilog=BUILD_EPILOG,
                                     formatter_class=HelpFormatter, usage=f"{prog} --output DIR [--input DIR] [options]")
    BuildOptions._add_argparse_args(parser)  # noqa: SLF001
    group = next(g for g in parser._action_groups if g.title == "cloud / runner")  # noqa: SLF001
    for cls, dests in BEAM_HELP_OPTIONS:
        beam = _BeamArgumentParser(add_help=False)
        cls._add_argparse_args(beam)  # noqa: SLF001
        actions = {a.dest: a for a in beam._actions}  # noqa: SLF001
        for dest in dests:
            if dest in actions:
                action = copy.copy(actions[dest])  # shown only, never parsed
                action.help = BEAM_HELP_OVERRIDES.get(dest, action.help)
                group._add_action(action)  # noqa: SLF001
    return parser.format_help()


def parse_beam_options(argv: list[str]) -> PipelineOptions:
    """PipelineOptions of the arguments a command left to Beam; CommandError for any Beam does
    not know either."""
    parser = _beam_parser()
    _, unknown = parser.parse_known_args(argv)
    if unknown:
        raise CommandError(unknown_arguments_message(unknown, parser._option_string_actions), usage=True)  # noqa: SLF001
    return PipelineOptions(argv)


def parse_build_options(argv: list[str], prog: str = "s2naip build") -> PipelineOptions:
    """The build's PipelineOptions from its arguments. --help prints the grouped help and exits 0;
    an unknown option (a misspelt build option, not a Beam one), a stray argument or a bad value
    raises CommandError before anything runs."""
    if "-h" in argv or "--help" in argv:
        print(build_help(prog))
        raise SystemExit(0)
    return parse_beam_options(argv)


# ---------------------------------------------------------------------------------------------
# Checks before the pipeline starts

LOCAL_RUNNERS = {"fnapirunner", "directrunner", "bundlebaseddirectrunner", "switchingdirectrunner",
                 "prismrunner", "direct", "prism"}


def runs_here(options: PipelineOptions) -> bool:
    """Whether the pipeline runs in this process (the in-process runners), so that this machine reads
    what the workers will read. A remote launcher may not be allowed to read the input: there, the
    job itself fails on a missing manifest or on zero tiles."""
    if options.view_as(GoogleCloudOptions).template_location:
        return False
    return runner_name(options, default="FnApiRunner") in LOCAL_RUNNERS


def expected_layout(leaf: str = "rgb.png") -> str:
    return f"expected the S2-NAIP set folder, the one holding naip/<naip_id>/<x>_<y>/{leaf}"


def check_set_folder(root: str, option: str = "--input", leaf: str = "rgb.png") -> None:
    """CommandError unless `root` looks like an S2-NAIP set folder, i.e. something lies under its
    naip/ (one probe; on gs:// a listing of at most one object). When not, one listing of `root`
    names the mistake: a missing path, a file, an empty folder, the naip/ folder itself."""
    expected = expected_layout(leaf)
    try:
        if storage.dir_has_files(storage.join(root, "naip")):
            return
        children = storage.list_children(root)
    except FileNotFoundError:  # no such bucket
        children = []
    except NotADirectoryError:  # a local file given as the folder
        children = []
    if not children:
        if storage.is_local(root):
            if os.path.isfile(root):
                raise CommandError(f"{option} {root} is a file; {expected}")
            if not os.path.exists(root):
                raise CommandError(f"{option} {root} does not exist; {expected}")
            raise CommandError(f"{option} {root} is an empty folder; {expected}")
        if storage.exists(root):
            raise CommandError(f"{option} {root} is a file; {expected}")
        raise CommandError(f"{option} {root} does not exist or is empty; {expected}")
    if "naip" not in children:
        if any(tiles.NAIP_ID_PATTERN.fullmatch(name) for name in children):
            parent = root.rstrip("/").rsplit("/", 1)[0] if "/" in root.rstrip("/") else "its parent"
            raise CommandError(f"{option} {root} is a naip/ folder; pass the set folder above it ({parent}), "
                               f"the one holding naip/<naip_id>/<x>_<y>/{leaf}")
        raise CommandError(f"{option} {root} has no naip/ folder; {expected}")
    raise CommandError(f"{option} {root}: naip/ is empty; {expected}")


def check_files_exist(paths, option: str) -> None:
    for path in paths:
        if not storage.exists(path):
            raise CommandError(f"{option} not found: {path}")
        if storage.is_local(path) and os.path.isdir(path):
            raise CommandError(f"{option} {path} is a folder; expected a file")


def check_output_writable(output: str, option: str = "--output") -> None:
    """CommandError unless a local `output` folder can be written: a probe file in it, or in its
    nearest existing parent when it does not exist yet (nothing is left behind). Object stores are
    not probed: a write there needs the same rights as the run's own."""
    if not storage.is_local(output):
        return
    path = os.path.abspath(output)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == path else f"is under a file, {existing}"
        raise CommandError(f"{option} {output} {what}; expected a folder (created if missing)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".s2naip-write-check-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        where = "" if existing == path else f" (its parent {existing} is not)"
        raise CommandError(f"{option} {output} is not writable{where}: {e.strerror or e}") from None


def check_build_inputs(opts: BuildOptions) -> None:
    """The inputs a build reads, checked before it starts (see `runs_here`; a remote job checks
    them on its workers)."""
    corrections = [p.strip() for arg in (opts.corrections or ()) for p in arg.split(",") if p.strip()]
    if opts.manifest:
        check_files_exist([opts.manifest], "--manifest")
    check_files_exist(corrections, "--corrections")
    if not opts.manifest or storage.is_local(opts.input):  # with a manifest, an object store is never listed
        check_set_folder(opts.input)
    if opts.nir_input and opts.nir_input.rstrip("/") != opts.input.rstrip("/"):
        if not opts.manifest and not storage.dir_has_files(storage.join(opts.nir_input, "naip")):
            raise CommandError(f"--nir-input {opts.nir_input} has no naip/ folder, or an empty one; expected the "
                               "folder holding naip/<naip_id>/<x>_<y>/nir.png")


def check_run_folder(run: str) -> None:
    """CommandError unless `run` holds a build's output (run.json, _SUCCESS or pairs/)."""
    if storage.is_local(run) and not os.path.exists(run):
        raise CommandError(f"--run {run} does not exist; expected a build's --output folder")
    if not any((storage.exists(storage.join(run, "run.json")), storage.exists(storage.join(run, "_SUCCESS")),
                storage.dir_has_files(storage.join(run, "pairs")))):
        raise CommandError(f"--run {run} holds no build (no run.json, _SUCCESS or pairs/); expected a build's "
                           "--output folder")


# ---------------------------------------------------------------------------------------------
# The build's output folder and --since, checked on the launcher before the job starts


def prepare_output(output: str, overwrite: bool) -> int:
    """`publish.prepare_output` (refuse, or clear with `_SUCCESS` first), plus the `manifest/` folder,
    which `publish` does not know about. Returns the number of files deleted."""
    pattern = storage.join(output, dm.MANIFEST_FOLDER, "**")
    manifest = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    if manifest and not overwrite:
        raise publish.OutputNotEmpty(
            f"{output} already holds a run or part of one ({publish.count_text(len(manifest), 'manifest file')}, "
            f"e.g. {manifest[0]}); "
            "choose a new --output or pass --overwrite to replace it")
    deleted = publish.prepare_output(output, overwrite)  # _SUCCESS first, then the data folders
    if manifest:
        storage.delete(manifest)
    return deleted + len(manifest)


def discard_unpublished_run(output: str) -> None:
    """After a failed or interrupted run: deletes what it wrote (data shards, manifest, the runner's
    beam-temp-* files, empty folders) unless it was published (_SUCCESS), so that nothing of it
    looks like a dataset and a partial Parquet file does not break a reader of the table folder.
    The output held no run when it started (`prepare_output`)."""
    if publish.read_success(output) is not None:
        return
    prepare_output(output, overwrite=True)
    if storage.is_local(output):
        for folder in (*publish.run_folders(), dm.MANIFEST_FOLDER):
            storage.remove_empty_tree(storage.join(output, folder))




def check_since(previous_run: str | None, output: str) -> str | None:
    """The previous run folder, normalised; ValueError when it is the output folder itself (the
    build clears its output first: it would delete what it is about to read)."""
    if not previous_run:
        return None
    previous = previous_run.rstrip("/")
    same = previous == output.rstrip("/")
    if not same and storage.is_local(previous) and storage.is_local(output):
        same = os.path.realpath(previous) == os.path.realpath(output)
    if same:
        raise ValueError(f"--since {previous_run} is the output folder itself: build into a new --output")
    return previous
