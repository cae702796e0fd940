"""Mutation testing of the core modules: `python -m tests.mutation [MODULE ...] [options]`.

Each mutant is one small change of one module (a comparison's boundary, an arithmetic operator, a
numeric constant, `.all`/`.any`, `argmin`/`argmax`, `maximum`/`minimum`, `and`/`or`, a dropped
unary minus or `not`, ...), made on the AST of the module in a private copy of the project; the
module's fast test subset (FAST_TESTS) then runs against it. A mutant is *killed* when a test fails
(or the run times out), *survives* otherwise. The score is killed / mutants.

The tests run in a forked child of a process that has already imported the heavy third-party
libraries (numpy, scipy, scikit-image, Beam, ...), never the project's modules, so each mutant costs
only its tests. Nothing in the working tree is changed.

`--deliberate` instead applies the hand-written bugs of DELIBERATE (the regressions issue 17 lists)
one at a time and runs the tests they name: every one must be caught.

Options: --sample N (a deterministic sample of N mutants per module, --seed), --timeout S (per
mutant), --report FILE (JSON: every mutant, its status and the command line), --list (print the
mutants, run nothing). Real-data and server tests are switched off in the children (their REQUIRE
variables are removed), so the subsets stay fast and self-contained.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

MODULES = {
    "selection": "transforms/selection.py",
    "evidence": "transforms/evidence.py",
    "imagery": "transforms/imagery.py",
    "corrections": "transforms/corrections.py",
}
_UNIT = "not gcs and not bench and not real and not mosaic and not dev_tiles and not build and not dataflow"
FAST_TESTS = {
    # fastest and most sensitive first: with -x a killed mutant stops at its first failure
    "selection": ["tests/test_selection.py", "tests/test_robust_behaviour.py", "tests/test_border_rule.py",
                  "tests/test_mode_references.py", "tests/test_robust_selection.py", "-k", _UNIT],
    "evidence": ["tests/test_evidence_limits.py", "tests/test_evidence.py", "tests/test_robust_behaviour.py",
                 "tests/test_robust_selection.py", "-k", _UNIT],
    "imagery": ["tests/test_imagery.py", "tests/test_imagery_limits.py", "tests/test_border_rule.py",
                "tests/test_selection.py", "-k", _UNIT],
    "corrections": ["tests/test_corrections_limits.py", "tests/test_corrections.py", "-k",
                    "not gcs and not end_to_end and not missing_corrections"],
}

# (name, file, exact old text, new text, tests): the deliberate bugs of issue 17
DELIBERATE = [
    ("border: .all -> .any", "transforms/imagery.py", "(strip == 0).all(axis=-1)", "(strip == 0).any(axis=-1)",
     ["tests/test_border_rule.py", "tests/test_selection.py", "tests/test_imagery.py"]),
    ("border: > -> >=", "transforms/imagery.py", "return black_border_count(images, border) > max_black",
     "return black_border_count(images, border) >= max_black", ["tests/test_border_rule.py"]),
    ("border: right strip dropped", "transforms/imagery.py", "        + black_in(rgb[..., :, -border:, :])\n",
     "", ["tests/test_border_rule.py"]),
    ("SelectionConfig.max_border_black default 1 -> 8", "transforms/selection.py", "max_border_black: int = 1",
     "max_border_black: int = 8", ["tests/test_border_rule.py"]),
    ("paper: alpha swapped", "transforms/selection.py",
     "return alpha * (1.0 - s_raw) + (1.0 - alpha) * (1.0 - s_matched)",
     "return (1.0 - alpha) * (1.0 - s_raw) + alpha * (1.0 - s_matched)",
     ["tests/test_selection.py", "tests/test_mode_references.py"]),
    ("histogram matching rounds instead of truncating", "transforms/selection.py",
     "return lut.astype(np.uint8).reshape(n, c, 256)", "return np.rint(lut).astype(np.uint8).reshape(n, c, 256)",
     ["tests/test_selection.py"]),
    ("argmin -> argmax", "transforms/selection.py", "best = int(np.argmin(scores))", "best = int(np.argmax(scores))",
     ["tests/test_selection.py", "tests/test_mode_references.py"]),
    ("companion: alpha swapped", "transforms/selection.py",
     "return 1.0 - (alpha * s_raw + (1.0 - alpha) * s_matched)",
     "return 1.0 - ((1.0 - alpha) * s_raw + alpha * s_matched)", ["tests/test_mode_references.py"]),
    ("companion: HM_j rounded instead of truncated", "transforms/selection.py",
     "matched = match_histograms(hr32, candidates).astype(np.uint8)",
     "matched = np.rint(match_histograms(hr32, candidates)).astype(np.uint8)", ["tests/test_mode_references.py"]),
    ("companion: scikit-image's SSIM", "transforms/selection.py",
     'both = ssim_to_reference(hr32, np.concatenate([candidates, matched]), "reflect", clamp_variance=True)',
     'both = ssim_to_reference(hr32, np.concatenate([candidates, matched]), "valid", clamp_variance=False)',
     ["tests/test_mode_references.py"]),
    ("robust: alpha swapped", "transforms/selection.py",
     "distance = alpha * (1.0 - lc_raw) + (1.0 - alpha) * (1.0 - lc_matched)",
     "distance = (1.0 - alpha) * (1.0 - lc_raw) + alpha * (1.0 - lc_matched)", ["tests/test_robust_behaviour.py"]),
    ("robust: cloud weight 0", "transforms/selection.py", "cloud: float = 2.0", "cloud: float = 0.0",
     ["tests/test_robust_behaviour.py"]),
    ("robust: shift weight 0", "transforms/selection.py", "shift: float = 0.5", "shift: float = 0.0",
     ["tests/test_robust_behaviour.py"]),
    ("gs://: 429 not retried", "transforms/io/storage.py", "_TRANSIENT_STATUS = frozenset({408, 429, 500,",
     "_TRANSIENT_STATUS = frozenset({408, 500,", ["tests/test_gcs.py", "-k", "retr"]),
    ("STAC: 429 not retried", "transforms/nir/stac.py", "TRANSIENT_STATUS = frozenset({408, 429, 500,",
     "TRANSIENT_STATUS = frozenset({408, 500,", ["tests/test_stac.py", "-k", "transient or retry_after"]),
]

_SKIP_FIELDS = {"annotation", "returns", "decorator_list"}
_CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
_BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
             ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
_NAME_SWAP = {"all": "any", "any": "all", "argmin": "argmax", "argmax": "argmin", "maximum": "minimum",
              "minimum": "maximum", "max": "min", "min": "max", "floor": "ceil", "ceil": "floor",
              "True": "False", "False": "True"}


@dataclass
class Mutant:
    module: str
    index: int  # position of the node in ast.walk order
    variant: int
    line: int
    description: str
    status: str = "pending"  # killed | survived | timeout | error
    seconds: float = 0.0


def _eligible(tree: ast.AST) -> list[ast.AST]:
    """Nodes of `tree` in ast.walk order, None for those inside annotations, decorators or docstrings."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        for name, value in ast.iter_fields(node):
            if name in _SKIP_FIELDS:
                for child in (value if isinstance(value, list) else [value]):
                    if isinstance(child, ast.AST):
                        skip.update(id(n) for n in ast.walk(child))
        if isinstance(node, ast.JoinedStr):  # messages
            skip.update(id(n) for n in ast.walk(node) if n is not node)
    return [None if id(n) in skip else n for n in ast.walk(tree)]


def _variants(node: ast.AST) -> list[tuple[str, callable]]:
    """(description, mutate-in-place) for one node."""
    out = []
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in _CMP_SWAP:
                new = _CMP_SWAP[type(op)]
                out.append((f"{type(op).__name__} -> {new.__name__}",
                            lambda n, i=i, new=new: n.ops.__setitem__(i, new())))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BIN_SWAP:
        new = _BIN_SWAP[type(node.op)]
        out.append((f"{type(node.op).__name__} -> {new.__name__}", lambda n, new=new: setattr(n, "op", new())))
    elif isinstance(node, ast.AugAssign) and type(node.op) in _BIN_SWAP:
        new = _BIN_SWAP[type(node.op)]
        out.append((f"{type(node.op).__name__}= -> {new.__name__}=", lambda n, new=new: setattr(n, "op", new())))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f"{type(node.op).__name__} -> {new.__name__}", lambda n, new=new: setattr(n, "op", new())))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        out.append((f"drop {type(node.op).__name__}", None))  # replaced in the parent: see _apply
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        v = node.value
        new_values = [1] if v == 0 else [0, v + 1] if v == 1 else [v + 1] if isinstance(v, int) else [v * 1.5]
        if isinstance(v, float) and v == 0.0:
            new_values = [1.0]
        for nv in new_values:
            out.append((f"{v!r} -> {nv!r}", lambda n, nv=nv: setattr(n, "value", nv)))
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        out.append((f"{node.value} -> {not node.value}", lambda n: setattr(n, "value", not n.value)))
    elif isinstance(node, ast.Attribute) and node.attr in _NAME_SWAP:
        new = _NAME_SWAP[node.attr]
        out.append((f".{node.attr} -> .{new}", lambda n, new=new: setattr(n, "attr", new)))
    elif isinstance(node, ast.Name) and node.id in ("max", "min") and isinstance(node.ctx, ast.Load):
        new = _NAME_SWAP[node.id]
        out.append((f"{node.id} -> {new}", lambda n, new=new: setattr(n, "id", new)))
    return out


def mutants_of(module: str) -> list[Mutant]:
    tree = ast.parse((REPO / MODULES[module]).read_text())
    out = []
    for index, node in enumerate(_eligible(tree)):
        if node is None:
            continue
        for variant, (description, _) in enumerate(_variants(node)):
            snippet = ast.unparse(node)
            snippet = snippet if len(snippet) <= 70 else snippet[:67] + "..."
            out.append(Mutant(module, index, variant, getattr(node, "lineno", 0), f"{description}: {snippet}"))
    return out


class _DropUnary(ast.NodeTransformer):
    def __init__(self, target):
        self.target = target

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        return node.operand if node is self.target else node


def mutated_source(mutant: Mutant) -> str:
    tree = ast.parse((REPO / MODULES[mutant.module]).read_text())
    node = list(ast.walk(tree))[mutant.index]
    description, mutate = _variants(node)[mutant.variant]
    if mutate is None:
        tree = _DropUnary(node).visit(tree)
    else:
        mutate(node)
    return ast.unparse(ast.fix_missing_locations(tree))


# ---------------------------------------------------------------------------------------------
# Running: a private copy of the project, tests in forked children


def _copy_project(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".venv", ".git", "mutants", ".pytest_cache")
    for name in ("transforms", "pipelines", "tests", "deploy"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("pytest.ini", "setup.py", "requirements.txt", "README.md"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)


def _preload() -> None:
    """Third-party imports shared by every child (never the project's own modules)."""
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import pytest  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import skimage.exposure  # noqa: F401
    import skimage.metrics  # noqa: F401
    try:
        import apache_beam  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        pass


def _run_tests(workdir: Path, test_args: list[str], timeout: float) -> tuple[str, float]:
    """'passed' | 'failed' | 'timeout' | 'error' of pytest on `test_args` in a forked child."""
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            os.chdir(workdir)
            for name in [n for n in sys.modules if n == "tests" or n.startswith("tests.")]:
                del sys.modules[name]  # this runner's own package: the copy's must be imported
            sys.path[:] = [str(workdir)] + [p for p in sys.path if p not in ("", ".", str(REPO))]
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            import pytest

            code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *test_args]))
        finally:
            os._exit(code)
    deadline = start + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.monotonic() - start
        time.sleep(0.05)
    code = os.waitstatus_to_exitcode(status)
    outcome = {0: "passed", 1: "failed", 5: "no tests"}.get(code, "error")
    return outcome, time.monotonic() - start


def _clean_environment() -> None:
    for name in list(os.environ):
        if name.startswith("S2NAIP_REQUIRE") or name in ("S2NAIP_REAL_DATA", "S2NAIP_REAL_S2", "CI"):
            del os.environ[name]
    # without $S2NAIP_REAL_DATA, tests/conftest.py looks beside the private copy (in the temp folder),
    # finds nothing and skips the real-data tests
    sys.dont_write_bytecode = True


def run_modules(modules: list[str], sample: int | None, seed: int, timeout: float, report: Path | None,
                argv: list[str], lines: set[int] | None = None) -> dict:
    _clean_environment()
    _preload()
    results: dict = {"command": "python -m tests.mutation " + " ".join(argv), "modules": {}}
    with tempfile.TemporaryDirectory(prefix="s2naip-mutation-") as tmp:
        work = Path(tmp)
        _copy_project(work)
        for module in modules:
            path = work / MODULES[module]
            original = path.read_text()
            base, seconds = _run_tests(work, FAST_TESTS[module], timeout * 4)
            if base != "passed":
                raise SystemExit(f"{module}: the fast tests do not pass on the unmutated code ({base})")
            mutants = mutants_of(module)
            total = len(mutants)
            if sample and sample < total:
                mutants = sorted(random.Random(seed).sample(mutants, sample), key=lambda m: (m.index, m.variant))
            if lines:
                mutants = [m for m in mutants if m.line in lines]
            print(f"{module}: {len(mutants)} of {total} mutants; unmutated tests {seconds:.1f} s", flush=True)
            limit = max(timeout, 3 * seconds)
            for i, m in enumerate(mutants):
                try:
                    path.write_text(mutated_source(m))
                    outcome, m.seconds = _run_tests(work, FAST_TESTS[module], limit)
                finally:
                    path.write_text(original)
                m.status = {"passed": "survived", "failed": "killed", "timeout": "timeout"}.get(outcome, "killed")
                if outcome in ("error", "no tests"):
                    m.status = "error"  # e.g. the mutant breaks an import: counted as killed in the score
                print(f"  [{i + 1}/{len(mutants)}] {m.status:8s} L{m.line} {m.description}", flush=True)
            killed = sum(m.status != "survived" for m in mutants)
            results["modules"][module] = {
                "mutants": len(mutants), "of": total, "killed": killed,
                "score": round(killed / max(len(mutants), 1), 4),
                "survivors": [asdict(m) for m in mutants if m.status == "survived"],
                "all": [asdict(m) for m in mutants],
            }
            print(f"{module}: score {killed}/{len(mutants)} = {killed / max(len(mutants), 1):.1%}", flush=True)
            if report:
                report.write_text(json.dumps(results, indent=1))
    return results


# ---------------------------------------------------------------------------------------------
# The deliberate bugs


def _deliberate_edit(name: str, text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise SystemExit(f"{name}: the text to change is not found exactly once; update DELIBERATE")
    return text.replace(old, new)


def run_deliberate(timeout: float, report: Path | None, only: list[str]) -> dict:
    _clean_environment()
    _preload()
    results = {}
    with tempfile.TemporaryDirectory(prefix="s2naip-deliberate-") as tmp:
        work = Path(tmp)
        _copy_project(work)
        for name, file, old, new, tests in DELIBERATE:
            if only and not any(o in name for o in only):
                continue
            path = work / file
            original = path.read_text()
            try:
                path.write_text(_deliberate_edit(name, original, old, new))
                outcome, seconds = _run_tests(work, tests, timeout)
            finally:
                path.write_text(original)
            caught = outcome in ("failed", "timeout", "error")
            results[name] = {"caught": caught, "outcome": outcome, "tests": tests, "seconds": round(seconds, 1)}
            print(f"{'caught ' if caught else 'MISSED '} {name} ({' '.join(tests)}; {seconds:.0f} s)", flush=True)
    if report:
        report.write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", choices=[*MODULES, []], default=[])
    parser.add_argument("--sample", type=int, help="test a deterministic sample of N mutants per module")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant (at least 3x the unmutated run)")
    parser.add_argument("--report", type=Path, help="write the results as JSON")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--lines", help="only the mutants on these source lines (comma-separated), e.g. "
                                        "to re-run a report's survivors")
    parser.add_argument("--deliberate", nargs="*", metavar="NAME",
                        help="apply the deliberate bugs (all, or those whose name contains NAME) instead")
    args = parser.parse_args(argv)
    if args.deliberate is not None:
        results = run_deliberate(args.timeout * 5, args.report, args.deliberate)
        return 0 if all(r["caught"] for r in results.values()) else 1
    modules = args.modules or list(MODULES)
    if args.list:
        for module in modules:
            for m in mutants_of(module):
                print(f"{module}:{m.line}: {m.description}")
        return 0
    lines = {int(x) for x in args.lines.split(",")} if args.lines else None
    results = run_modules(modules, args.sample, args.seed, args.timeout, args.report, argv, lines)
    for module, r in results["modules"].items():
        print(f"{module}: {r['killed']}/{r['mutants']} killed ({r['score']:.1%}), {len(r['survivors'])} survived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
