"""`s2naip`: the command line. Each subcommand is a module with its own `main(argv)`."""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Callable

SUBCOMMANDS = {
    "build": ("pipelines.build_pairs", "build paired RGBN records from an S2-NAIP folder"),
    "sample": ("transforms.sample", "generate a procedural S2-NAIP-layout sample folder"),
    "index": ("pipelines.index", "list an S2-NAIP folder into a tile-id manifest"),
    "bench": ("pipelines.bench", "measure decode, core and pipeline throughput"),
    "bench-gcs": ("pipelines.bench_gcs", "the build from gs:// with an object store's latency, reads ahead or not"),
    "bench-selection": ("pipelines.bench_selection",
                        "measure each selection mode on twin-free synthetic, real Sentinel-2 and easy evaluation sets"),
    "fetch-nir": ("pipelines.fetch_nir", "fetch NAIP NIR (band 4) per tile from a STAC API, grouped per NAIP item"),
    "plan": ("pipelines.plan", "list the quarter quads with a newer NAIP capture: the work list of a release"),
    "review": ("pipelines.review", "rank a build's pairs and write a page to re-pick or drop the worst"),
    "report": ("pipelines.report", "an HTML report with figures of a build's output"),
}


def configure_logging() -> None:
    """INFO logs with timestamps for a command; Beam's own at WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)


def command_main(run: Callable[[list[str]], object], argv: list[str] | None = None) -> int:
    """A subcommand's `main`: logging configured, then `run(argv)` (default: sys.argv[1:]); 0."""
    configure_logging()
    run(sys.argv[1:] if argv is None else argv)
    return 0


def usage() -> str:
    lines = ["usage: s2naip <command> [options]", "", "commands:"]
    width = max(map(len, SUBCOMMANDS))
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "s2naip <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"s2naip: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
