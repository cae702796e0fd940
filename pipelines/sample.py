"""`s2naip sample`: write the deterministic procedural S2-NAIP-layout sample (transforms/devdata/sample.py)."""
import os
import sys

from pipelines.cli import ArgumentParser
from transforms.devdata import sample


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="s2naip sample",
        description="Write a deterministic procedural S2-NAIP-layout sample with planted defects.")
    parser.add_argument("--output", required=True, help="local folder to write the sample into")
    parser.add_argument("--tiles", type=int, default=200, help="number of tiles (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--timesteps", type=int, nargs=2, metavar=("MIN", "MAX"), default=(24, 40),
                        help="inclusive range of Sentinel-2 timesteps per tile (default 24 40)")
    parser.add_argument("--extra-bands", action="store_true",
                        help="also write b01, b10, b11, b12 (aerosol, cirrus, SWIR)")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    args = parser.parse_args(argv)
    if args.tiles < 1:
        parser.error(f"--tiles must be >= 1, got {args.tiles}")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        parser.error(f"--output {args.output} is a file; expected a folder (created if missing)")
    try:
        summary = sample.generate_sample(args.output, args.tiles, args.seed, timesteps=tuple(args.timesteps),
                                  extra_bands=args.extra_bands, workers=args.workers)
    except ValueError as exc:
        parser.error(str(exc))
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
