"""Worker processes of a local `multi_processing` build, forked from a warm process instead of started cold.

With `--direct_running_mode=multi_processing`, Beam's FnApiRunner starts each worker as
`python -m apache_beam.runners.worker.sdk_worker_main`: every worker imports Beam again (~2 s of
CPU each on this project's CI-class machine, more than a few hundred tiles' work) before it builds
a tile. Here the launcher, which has imported Beam and the build's modules already, forks one
*zygote* process before the pipeline starts (no gRPC channel, server or thread exists yet: the
progress reporter starts after it); Beam runs a tiny stdlib-only proxy as the worker command
(`worker_proxy.py`, `python -S`), which hands its environment (the control, logging and options
descriptors Beam sets) and its stdin/stdout/stderr to the zygote over a Unix socket; the zygote
forks a worker that runs Beam's own harness (`sdk_worker_main.create_harness`, `run`) with them,
and the worker reports its exit code back to the proxy, whose exit code Beam sees.

What stays as with cold workers: each worker is its own process (two cores used), it gets its
DoFns by unpickling them from the pipeline proto (pickling is exercised as before), and it ends
when the runner closes its control stream. What differs: module state of the launcher at the fork
(imports, nothing pipeline-specific: the fork happens before the graph is run) is inherited. A
process that runs other threads at that moment (e.g. one that ran a build before: gRPC and reader
threads) is not forked: a thread holding a lock at the fork could deadlock the copy.
`--cold-workers` keeps Beam's own start-up (tests that must see a worker start from nothing use it).

Only on Linux with the FnApiRunner and `--direct_running_mode=multi_processing`; elsewhere the
build runs as Beam starts it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.portability import python_urns
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

_LOG = logging.getLogger(__name__)
PROXY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker_proxy.py")
BEAM_WORKER_COMMAND = f"{sys.executable} -m apache_beam.runners.worker.sdk_worker_main"
WORKER_EXIT_S = 30.0  # at the end of the build, workers still running after this are killed
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # the proxy's environment (PIPELINE_OPTIONS is the largest part)


def applies(options: PipelineOptions) -> bool:
    """Whether this build's workers can be forked: Linux, the FnApiRunner, multi_processing."""
    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) or runner is None else type(runner).__name__
    direct = options.view_as(DirectOptions)
    return (sys.platform.startswith("linux") and (name or "").rsplit(".", 1)[-1] == "FnApiRunner"
            and direct.direct_running_mode == "multi_processing")


class ForkedWorkersRunner(FnApiRunner):
    """The FnApiRunner whose multi_processing workers are started by `command` (the proxy) instead of
    `python -m apache_beam.runners.worker.sdk_worker_main`; everything else is Beam's."""

    def __init__(self, command: str):
        super().__init__()
        self._command = command
        self.forked_environments = 0  # how many of the job's environments got the proxy command

    def run_via_runner_api(self, pipeline_proto, options=None):
        for env in pipeline_proto.components.environments.values():
            if env.urn == python_urns.SUBPROCESS_SDK and env.payload == BEAM_WORKER_COMMAND.encode():
                env.payload = self._command.encode()
                self.forked_environments += 1
        return super().run_via_runner_api(pipeline_proto, options)


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """One proxy's request: (its JSON message, the file descriptors it passed)."""
    data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST_BYTES, 3)
    buf = bytearray(data)
    while not buf.endswith(b"\n"):
        chunk = conn.recv(MAX_REQUEST_BYTES)
        if not chunk:
            raise ConnectionError("the worker proxy closed its connection mid-request")
        buf += chunk
    return json.loads(buf), list(fds)


def _run_worker(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked worker: Beam's harness with the proxy's environment and stdio; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        root = logging.getLogger()
        for handler in list(root.handlers):  # a cold worker starts without the launcher's handlers
            root.removeHandler(handler)
        from apache_beam.runners.worker import sdk_worker_main

        sdk_worker_main.main([])
        code = 0
    except BaseException:  # noqa: BLE001 - reported as the worker's exit code, as a cold worker's would be
        logging.getLogger(__name__).exception("forked SDK worker failed")
    finally:
        try:
            conn.sendall(f"{code}\n".encode())
        except OSError:
            pass
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _reap(workers: set[int], block: bool) -> None:
    """Waits for ended workers (all of them when `block`): their CPU time then counts in the
    zygote's, and so in the launcher's children's, as a cold worker's does."""
    for pid in list(workers):
        done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
        if done:
            workers.discard(pid)


def _stop_workers(workers: set[int]) -> None:
    """At the end of the build: waits WORKER_EXIT_S for the workers to end (they do when the runner
    closes their control streams), then kills those left."""
    deadline = time.monotonic() + WORKER_EXIT_S
    while workers and time.monotonic() < deadline:
        _reap(workers, block=False)
        time.sleep(0.05)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _reap(workers, block=True)


def _serve(listener: socket.socket, parent_alive: int) -> None:
    """The zygote: forks a worker for each proxy that connects; ends when the launcher's end of
    the `parent_alive` pipe closes (the build ended, or the launcher died), after its workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    from apache_beam.runners.worker import sdk_worker_main  # noqa: F401 - imported once, for every worker

    workers: set[int] = set()
    while True:
        ready, _, _ = select.select([listener, parent_alive], [], [], 1.0)
        _reap(workers, block=False)
        if parent_alive in ready:
            _stop_workers(workers)
            return
        if listener not in ready:
            continue
        conn, _ = listener.accept()
        try:
            request, fds = _recv_request(conn)
        except (OSError, ValueError) as e:
            _LOG.warning("worker proxy request failed: %s", e)
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            os.close(parent_alive)
            _run_worker(conn, request, fds)
        workers.add(pid)
        conn.close()
        for fd in fds:
            os.close(fd)


class WorkerForkServer:
    """The zygote process and the command that asks it for a worker (`command`)."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="s2naip-workers-")
        self.address = os.path.join(self.folder, "zygote.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.address)
        listener.listen(16)
        read_end, self._alive = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the zygote
            code = 0
            try:
                os.close(self._alive)
                _serve(listener, read_end)
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        listener.close()
        os.close(read_end)
        self.command = " ".join(shlex.quote(a) for a in (sys.executable, "-S", "-E", PROXY, self.address))

    def close(self) -> None:
        if self._alive is not None:
            os.close(self._alive)
            self._alive = None
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def runner_for(options: PipelineOptions, cold: bool = False):
    """The runner for `beam.Pipeline(runner=...)`: a ForkedWorkersRunner with its zygote while the
    block runs when `applies(options)` and not `cold`; None (Beam's choice from the options) otherwise."""
    if cold or not applies(options):
        yield None
        return
    if threading.active_count() > 1:
        # forking a process whose other threads may hold locks (a previous job's gRPC or reader
        # threads, in a process that runs several builds) could deadlock the zygote
        _LOG.info("other threads are running in this process: the workers start as Beam starts them")
        yield None
        return
    server = WorkerForkServer()
    try:
        yield ForkedWorkersRunner(server.command)
    finally:
        server.close()
