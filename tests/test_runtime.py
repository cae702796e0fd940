"""Process-level tuning of the build's workers (transforms/runtime.py): the BLAS pool is limited to
one thread, in the worker's own process, whatever the environment said before numpy was loaded."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
import numpy
from threadpoolctl import threadpool_info
def blas():
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
before = blas()
{setup}
print(json.dumps({{"before": before, "after": blas()}}))
"""


def run_probe(setup: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["OPENBLAS_NUM_THREADS"] = "2"  # a pool of two before the limit, on any machine
    proc = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_limit_native_threads_sets_numpys_blas_pool_to_one_thread():
    out = run_probe("from transforms import runtime\nassert runtime.limit_native_threads()")
    assert out["before"] and all(n == 2 for n in out["before"])  # numpy's BLAS was seen, with 2 threads
    assert out["after"] == [1] * len(out["before"])


def test_the_build_workers_setup_limits_the_blas_pool():
    setup = ("from transforms.build.stages import BuildPairDoFn\n"
             "from transforms.pairs import PairConfig\n"
             "BuildPairDoFn(PairConfig(input_root='.')).setup()")
    out = run_probe(setup)
    assert out["before"] and all(n == 2 for n in out["before"])
    # every BLAS loaded by then (the build's imports may bring scipy's own) runs one thread
    assert out["after"] and all(n == 1 for n in out["after"])
