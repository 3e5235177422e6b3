"""Hold many real TCP sockets in a network namespace, in forked workers.

The open-file limit here is 20000 per process, so each worker owns one listener per family it
serves and at most 9000 loopback connections (both ends: 18002 descriptors at most). The
parent keeps a pipe to each worker; closing it lets the worker exit and the kernel free its
sockets.

Dual-stack farms (`v6_percent`): that share of the connections goes over IPv6, from client
addresses in `sources6` (any address of a prefix routed `local` to lo, see bench/dualstack.py)
to a [::1] listener; the rest from `sources` to 127.0.0.1.
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
        self.connections = 0

    def grow_to(self, total_sockets: int, sources: list[str] | None = None,
                v6_percent: int = 0, sources6: list[str] | None = None) -> None:
        """Add ESTABLISHED sockets (two per connection, plus a listener per worker and family)
        until about total_sockets exist. `sources`: client addresses to cycle through
        (127.0.0.0/8), for distinct remote addresses; `v6_percent` of the connections come
        from `sources6` (IPv6) instead."""
        listeners = 2 if v6_percent else 1
        while self.sockets + 2 + listeners <= total_sockets:
            pairs = min(PAIRS_PER_WORKER, (total_sockets - self.sockets - listeners) // 2)
            self._spawn(pairs, sources, v6_percent, sources6)
            self.sockets += 2 * pairs + listeners
            self.connections += pairs

    def _spawn(self, pairs: int, sources: list[str] | None, v6_percent: int = 0,
               sources6: list[str] | None = None) -> None:
        port = FIRST_PORT + len(self.workers)
        ready_r, ready_w = os.pipe()
        stop_r, stop_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # worker
            try:
                os.close(ready_r)
                os.close(stop_w)
                with netns.entered(self.ns_path):
                    held = _connect_pairs(port, pairs, sources, self.connections,
                                          v6_percent, sources6)
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
        self.connections = 0


def _is_v6(connection: int, v6_percent: int) -> bool:
    """Spread the IPv6 connections evenly: 30 -> connections 3, 6, 9, 13, 16, ... of each 100
    (a Bresenham line)."""
    return (connection + 1) * v6_percent // 100 > connection * v6_percent // 100


def _listener(family: int, address: str, port: int) -> socket.socket:
    server = socket.socket(family)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    server.bind((address, port))
    server.listen(4096)
    return server


def _connect_pairs(port: int, pairs: int, sources: list[str] | None, offset: int,
                   v6_percent: int = 0, sources6: list[str] | None = None) -> list[socket.socket]:
    servers = {socket.AF_INET: _listener(socket.AF_INET, "127.0.0.1", port)}
    if v6_percent:
        servers[socket.AF_INET6] = _listener(socket.AF_INET6, "::1", port)
    held = list(servers.values())
    for connection in range(offset, offset + pairs):
        v6 = _is_v6(connection, v6_percent)
        # the index among connections of the same family, to cycle through its sources
        nth = connection * v6_percent // 100 if v6 else connection - connection * v6_percent // 100
        family, pool = (socket.AF_INET6, sources6) if v6 else (socket.AF_INET, sources)
        client = socket.socket(family)
        if pool:
            client.bind((pool[nth % len(pool)], 0))
        client.connect(("::1" if v6 else "127.0.0.1", port))
        accepted, _ = servers[family].accept()
        held += (client, accepted)
    return held


if __name__ == "__main__":
    print("use bench/run.py", file=sys.stderr)
