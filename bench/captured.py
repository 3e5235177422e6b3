"""The exporter's own share of a TCP read, without the kernel's walk around it: one dump of a
farm is captured, then each source tree decodes and counts it again and again, the way the
tcp view does (per-remote counting on, the key map handed from read to read), with 8 MiB
written between batches to push the batch and the map out of cache as the walk would.
A read's time here is what the tree adds to the floor, with far less noise than a ratio to
the floor has on a shared machine (quartiles within 2-3% of the median while the machine is
quiet; a ratio's repetitions move by 5% and more).

    .venv/bin/python -m bench.captured --case 100000:1000:30 \\
        --trees before=/tmp/before,after=/tmp/after --reps 20 --rounds 4

--case SOCKETS:REMOTES:IPV6_PERCENT builds the farm bench/dualstack.py builds. Each tree runs
in its own process, --rounds times, the trees taken in turn (ABBA...); prints, per tree,
the median of every read's milliseconds and its quartiles.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid


def child(reps: int) -> None:
    """In the farm's namespace, with the tree under test first on sys.path."""
    import socket

    import numpy as np

    from exporter.aggregate import RemoteOptions
    from exporter.aggregate.tcp import TcpAccumulator
    from exporter.sampler import keep_freed_memory
    from exporter.sources import sockdiag
    from exporter.sources.table import ALL_STATES_MASK

    keep_freed_memory()
    seq = 999
    msg_type, request = sockdiag.build_request(socket.IPPROTO_TCP, socket.AF_UNSPEC,
                                               ALL_STATES_MASK, seq)
    with sockdiag.open_socket() as sock:
        batches = [bytes(batch) for batch in sockdiag.receive(
            sock, request, seq, bytearray(sockdiag.BATCH_BYTES), "sock_diag")]
    buffer = bytearray(sockdiag.BATCH_BYTES)
    view = memoryview(buffer)
    evict = np.zeros(8 << 20, dtype=np.uint8)
    previous = None

    def read() -> float:
        nonlocal previous
        spent = 0.0
        acc = TcpAccumulator(remote=RemoteOptions(), previous=previous)
        for batch in batches:
            np.add(evict, 1, out=evict)  # what the kernel's walk does to the cache
            buffer[:len(batch)] = batch  # and its copy into our buffer
            t0 = time.perf_counter()
            acc.add(sockdiag.decode(view[:len(batch)], seq, msg_type))
            spent += time.perf_counter() - t0
        t0 = time.perf_counter()
        previous = acc.result()
        return spent + time.perf_counter() - t0

    for _ in range(3):  # warm-up: imports, first allocations, the key map
        read()
    print(json.dumps([1e3 * read() for _ in range(reps)]))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(int(sys.argv[2]))
        return
    from bench.dualstack import build, in_ns, tree_env

    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default="100000:1000:30")
    parser.add_argument("--trees", required=True, help="NAME=PATH,...")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    size, remotes, mix = (int(x) for x in args.case.split(":"))
    trees = [tuple(t.split("=", 1)) for t in args.trees.split(",")]
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    farm = None
    times: dict[str, list[float]] = {name: [] for name, _tree in trees}
    try:
        farm = build(ns, size, remotes, mix)
        script = os.path.abspath(__file__)
        for r in range(args.rounds):
            for name, tree in (trees if r % 2 == 0 else trees[::-1]):
                done = in_ns(ns, sys.executable, "-c", "import runpy, sys; "
                             "sys.argv[0] = sys.argv[1]; del sys.argv[1]; "
                             "runpy.run_path(sys.argv[0], run_name='__main__')",
                             script, "child", str(args.reps), env=tree_env(tree), cwd=tree)
                times[name] += json.loads(done.stdout)
    finally:
        if farm is not None:
            farm.close()
        subprocess.run(["ip", "netns", "del", ns], check=True)
    for name, values in times.items():
        q1, _q2, q3 = statistics.quantiles(values, n=4)
        print(f"{name}: {statistics.median(values):.2f} ms per read "
              f"(quartiles {q1:.2f}-{q3:.2f}, {len(values)} reads)")


if __name__ == "__main__":
    main()
