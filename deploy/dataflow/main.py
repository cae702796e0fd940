"""Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE): `s2naip build` on Dataflow.

The Flex Template launcher runs this file with the template's parameters as `--name=value`
arguments (input, output, manifest, ..., plus Beam options such as sdk_container_image). It only
builds the job graph and hands it to Dataflow; the tiles are read by the workers.

The image already holds every dependency and the project itself, so no requirements or setup file
is staged (FLEX_TEMPLATE_PYTHON_REQUIREMENTS_FILE / _SETUP_FILE are deliberately unset). This file is
kept tiny because Beam pickles `__main__` for the workers (save_main_session).
"""
from __future__ import annotations

import sys


def launcher_argv(argv: list[str]) -> list[str]:
    """The build's arguments on the launcher: Dataflow unless a runner is named.

    Without --runner the CLI would fall back to the in-process runner and try to build the whole
    dataset on the launcher VM.
    """
    if any(a == "--runner" or a.startswith("--runner=") for a in argv):
        return list(argv)
    return ["--runner=DataflowRunner", *argv]


def main(argv: list[str] | None = None) -> int:
    from pipelines.build_pairs import main as build_main

    return build_main(launcher_argv(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
