"""The worker command of a build with forked workers (`transforms.build.forked_workers`).

Run by Beam's FnApiRunner as `python -S -E worker_proxy.py <zygote socket>` instead of
`python -m apache_beam.runners.worker.sdk_worker_main`: standard library only, so it starts in
~20 ms. It passes its environment (the descriptors Beam set for the worker), its working folder and
its stdin/stdout/stderr to the zygote, which forks the worker; then it waits for the worker's exit
code and exits with it (1 when the worker ended without one, e.g. killed), so Beam sees the worker's
end as it would see its own command's.
"""
import json
import os
import socket
import sys


def main(address: str) -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(address)
    message = json.dumps({"env": dict(os.environ), "cwd": os.getcwd()}).encode() + b"\n"
    socket.send_fds(conn, [message[:1]], [0, 1, 2])  # the descriptors ride on the first byte
    conn.sendall(message[1:])
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = conn.recv(64)
        if not chunk:
            sys.stderr.write("s2naip worker proxy: the forked worker ended without an exit code\n")
            return 1
        answer += chunk
    return int(answer)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
