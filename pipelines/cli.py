"""`s2naip`: the command line. Each subcommand is a module with its own `main(argv)`.

Every command runs behind one boundary (`guarded`): a mistake or a failure ends in one line on
stderr and a non-zero exit (2: wrong usage, 1: failure, 130: interrupted), `--debug` (or `-v`)
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import signal
import sys
import textwrap
import threading
from typing import Callable, Iterable

SUBCOMMANDS = {
    "build": ("pipelines.build_pairs", "build paired RGBN records from an S2-NAIP folder"),
    "sample": ("pipelines.sample", "generate a procedural S2-NAIP-layout sample folder"),
    "index": ("pipelines.index", "list an S2-NAIP folder into a tile-id manifest"),
    "bench": ("pipelines.dev.bench", "measure decode, core and pipeline throughput"),
    "bench-gcs": ("pipelines.dev.bench_gcs", "the build from gs:// with an object store's latency, reads ahead or not"),
    "bench-selection": ("pipelines.dev.bench_selection",
                        "measure each selection mode on twin-free synthetic, real Sentinel-2 and easy evaluation sets"),
    "fetch-nir": ("pipelines.fetch_nir", "fetch NAIP NIR (band 4) per tile from a STAC API, grouped per NAIP item"),
    "plan": ("pipelines.plan", "list the quarter quads with a newer NAIP capture: the work list of a release"),
    "review": ("pipelines.review", "rank a build's pairs and write a page to re-pick or drop the worst"),
    "report": ("pipelines.report", "an HTML report with figures of a build's output"),
}
DEBUG_FLAGS = ("--debug", "-v")
EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class CommandError(SystemExit):
    """A mistake the user can fix (wrong input, missing file, unwritable output): one line, no
    traceback. `usage` errors exit 2, the others 1. A SystemExit: it ends the command also where
    no boundary catches it (Python then prints the message and exits 1)."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.exit_code = EXIT_USAGE if usage else EXIT_FAILURE

    def __str__(self) -> str:
        return str(self.code)


_state = {"debug": False, "interrupted": False}


def debug_enabled() -> bool:
    return _state["debug"]


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    rest = [a for a in argv if a not in DEBUG_FLAGS]
    return rest, len(rest) != len(argv)


class _BeamTracebacks(logging.Filter):
    """Beam logs a failing step's traceback at ERROR before the error reaches the command's
    boundary, which reports it in one line: those logs show with --debug only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return debug_enabled() or not (record.name.startswith("apache_beam") and record.levelno >= logging.ERROR)


def configure_logging(debug: bool = False) -> None:
    """INFO logs with timestamps for a command; Beam's own at WARNING (at INFO, with its error
    tracebacks, with --debug)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    debug = debug or debug_enabled()
    logging.getLogger("apache_beam").setLevel(logging.INFO if debug else logging.WARNING)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _BeamTracebacks) for f in handler.filters):
            handler.addFilter(_BeamTracebacks())


def one_line(exc: BaseException) -> str:
    """An exception as one line: its message's first line (a runner's step suffix kept), prefixed
    with its type unless it is a plain user error."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1 and lines[-1].endswith("]") and "[while running" in lines[-1]:
        text += " " + lines[-1][lines[-1].rindex("[while running"):]
    if len(text) > 400:
        text = text[:397] + "..."
    if isinstance(exc, (ValueError, FileNotFoundError, PermissionError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def without_step(exc: BaseException) -> str:
    """An exception's message without the runner's ' [while running <step>]' suffix."""
    return str(exc).split(" [while running", 1)[0]


def _was_interrupted(exc: BaseException) -> bool:
    """Ctrl-C, also when a runner re-raised it wrapped (FnApiRunner: RuntimeError('KeyboardInterrupt ...'))."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KeyboardInterrupt) or str(exc).startswith("KeyboardInterrupt"):
            return True
        exc = exc.__cause__ or exc.__context__
    return _state["interrupted"]


def _on_sigint(signum, frame):
    _state["interrupted"] = True
    raise KeyboardInterrupt


def guarded(prog: str, run: Callable[[list[str]], object], argv: list[str]) -> int:
    """Runs `run(argv)` behind the command line's boundary; returns the exit code."""
    argv, debug = _split_debug(argv)
    saved = dict(_state)
    _state["debug"] = _state["debug"] or debug or bool(os.environ.get("S2NAIP_DEBUG"))
    previous_handler = signal.getsignal(signal.SIGINT)
    own_handler = previous_handler is signal.default_int_handler and _in_main_thread()
    if own_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        return _exit_code(prog, run, argv)
    finally:
        if own_handler:
            signal.signal(signal.SIGINT, previous_handler)
        _state.update(saved)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _exit_code(prog: str, run: Callable[[list[str]], object], argv: list[str]) -> int:
    try:
        result = run(argv)
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    except CommandError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except SystemExit:  # argparse's exits, and raise SystemExit("error: ..."): one line already
        raise
    except BaseException as e:  # noqa: BLE001 - the boundary: everything ends in one line
        if _was_interrupted(e):
            if debug_enabled():
                raise
            print(f"{prog}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        if debug_enabled() or not isinstance(e, Exception):
            raise
        print(f"{prog}: error: {one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE


def command_main(run: Callable[[list[str]], object], argv: list[str] | None = None, prog: str | None = None) -> int:
    """A subcommand's `main`: `run(argv)` (default: sys.argv[1:]) behind the boundary, logging
    configured."""
    argv = sys.argv[1:] if argv is None else argv
    debug = any(a in DEBUG_FLAGS for a in argv)
    configure_logging(debug)
    return guarded(prog or _prog_of(run), run, argv)


def _prog_of(run: Callable) -> str:
    module = getattr(run, "__module__", "") or ""
    for name, (path, _) in SUBCOMMANDS.items():
        if path == module:
            return f"s2naip {name}"
    return module or "s2naip"


def description(doc: str | None) -> str:
    """A module docstring's first paragraph as one sentence for --help (not its first line only)."""
    paragraph = (doc or "").strip().split("\n\n", 1)[0]
    return textwrap.fill(" ".join(paragraph.split()), width=100)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help, unless the help already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default in (None, False, argparse.SUPPRESS) or "default" in text.lower()
                or action.option_strings == [] or isinstance(default, bool)):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`prog: error: ... (see --help)`, exit 2), no abbreviations,
    `did you mean` for a misspelt option, and defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            message = unknown_arguments_message(message[len("unrecognized arguments: "):].split(),
                                                self._option_string_actions)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def unknown_arguments_message(unknown: list[str], known: Iterable[str]) -> str:
    """'unknown option --selecton (did you mean --selection?)', or 'unexpected argument x'."""
    options = [a for a in unknown if a.startswith("-")]
    if not options:
        return "unexpected argument" + ("s " if len(unknown) > 1 else " ") + " ".join(unknown)
    name = options[0].split("=", 1)[0]
    close = difflib.get_close_matches(name, [k for k in known if k.startswith("--")], n=1, cutoff=0.6)
    text = f"unknown option {name}" + (f" (did you mean {close[0]}?)" if close else "")
    if len(options) > 1:
        text += "; also unknown: " + " ".join(o.split("=", 1)[0] for o in options[1:])
    return text


def usage() -> str:
    lines = ["usage: s2naip <command> [options]", "", "commands:"]
    width = max(map(len, SUBCOMMANDS))
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "s2naip <command> --help shows a command's options; --debug (or -v) shows a failure's traceback."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not [a for a in argv if a not in DEBUG_FLAGS] or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv and argv[0] in ("-h", "--help") else EXIT_USAGE
    debug = [a for a in argv if a in DEBUG_FLAGS]
    argv = [a for a in argv if a not in DEBUG_FLAGS]
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, list(SUBCOMMANDS), n=1)
        print(f"s2naip: error: unknown command {name!r}" + (f" (did you mean {close[0]}?)" if close else "")
              + "; s2naip --help lists the commands", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return guarded(f"s2naip {name}", lambda args: module.main(args) or 0, [*debug, *rest])


if __name__ == "__main__":
    # `python -m pipelines.cli`: run the imported module's main, so that the subcommands (which
    # import pipelines.cli) share its state (--debug) instead of this __main__ copy's
    from pipelines.cli import main as cli_main

    sys.exit(cli_main())
