"""Hold many real TCP sockets in a network namespace, in forked workers.

The open-file limit here is 20000 per process, so each worker owns one listener and at most
9000 loopback connections (both ends: 18001 descriptors). The parent keeps a pipe to each
worker; closing it lets the worker exit and the kernel free its sockets.
"""
from __future__ import annotations

import os
import socket
import sys

from exporter.sources import netns

PAIRS_PER_WORKER = 9000
FIRST_PORT = 2000  # below the ephemeral range the benchmark sets (10000-65535)


class SocketFarm:
    def __init__(self, ns_path: str):
        self.ns_path = ns_path
        self.workers: list[tuple[int, int]] = []  # (pid, write end of the stop pipe)
        self.sockets = 0

    def grow_to(self, total_sockets: int, sources: list[str] | None = None) -> None:
        """Add ESTABLISHED sockets (two per connection, plus a listener per worker) until
        about total_sockets exist. `sources`: client addresses to cycle through (127.0.0.0/8),
        for distinct remote addresses."""
        while self.sockets + 3 <= total_sockets:
            pairs = min(PAIRS_PER_WORKER, (total_sockets - self.sockets - 1) // 2)
            self._spawn(pairs, sources)
            self.sockets += 2 * pairs + 1

    def _spawn(self, pairs: int, sources: list[str] | None) -> None:
        port = FIRST_PORT + len(self.workers)
        ready_r, ready_w = os.pipe()
        stop_r, stop_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # worker
            try:
                os.close(ready_r)
                os.close(stop_w)
                with netns.entered(self.ns_path):
                    held = _connect_pairs(port, pairs, sources, self.sockets // 2)
                os.write(ready_w, b"1")
                os.read(stop_r, 1)  # returns when the parent closes its end
                del held
            except BaseException as exc:
                print(f"worker for port {port}: {exc!r}", file=sys.stderr)
            finally:
                os._exit(0)
        os.close(ready_w)
        os.close(stop_r)
        if os.read(ready_r, 1) != b"1":
            raise RuntimeError(f"worker for port {port} failed")
        os.close(ready_r)
        self.workers.append((pid, stop_w))

    def close(self) -> None:
        for _pid, stop_w in self.workers:
            os.close(stop_w)
        for pid, _ in self.workers:
            os.waitpid(pid, 0)
        self.workers.clear()
        self.sockets = 0


def _connect_pairs(port: int, pairs: int, sources: list[str] | None,
                   offset: int) -> list[socket.socket]:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(4096)
    held = [server]
    for i in range(pairs):
        client = socket.socket()
        if sources:
            client.bind((sources[(offset + i) % len(sources)], 0))
        client.connect(("127.0.0.1", port))
        accepted, _ = server.accept()
        held += (client, accepted)
    return held


if __name__ == "__main__":
    print("use bench/run.py", file=sys.stderr)
