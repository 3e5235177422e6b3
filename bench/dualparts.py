"""Run inside a benchmark namespace, with the exporter under test first on PYTHONPATH (like
bench/dualmeasure.py): where a TCP read's time goes, part by part.

    PYTHONPATH=TREE python bench/dualparts.py REPS -> JSON {floor, receive, decode, add,
        result: [s...], faults: [n...]}

One read is the tcp view's work done by hand, batch by batch, with the clock read between
the parts: receiving the dump (sockdiag.receive), decoding each batch (sockdiag.decode),
adding it to a TcpAccumulator with per-remote counting (as the default sample does), and
its result(); faults are the process's minor page faults during the read. Each accumulator
starts from the last read's summary, as in the exporter. floor: the one-walk dump with no
decoding (bench/dualmeasure.py's), alternating with the reads.
"""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import socket
import sys
import time

from exporter.aggregate import RemoteOptions
from exporter.aggregate.tcp import TcpAccumulator
from exporter.sampler import Sampler, SocketReader
from exporter.sources import sockdiag
from exporter.sources.table import ALL_STATES_MASK


def _dualmeasure():
    """bench/dualmeasure.py, for its floor (loaded by path: bench/ itself on sys.path would
    shadow the standard library's http)."""
    path = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "dualmeasure.py")
    spec = importlib.util.spec_from_file_location("dualmeasure", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dualmeasure = _dualmeasure()


def read(reader: SocketReader, previous):
    parts = dict.fromkeys(("receive", "decode", "add"), 0.0)
    seq = 4242
    msg_type, request = sockdiag.build_request(socket.IPPROTO_TCP, socket.AF_UNSPEC,
                                               ALL_STATES_MASK, seq)
    acc = TcpAccumulator(remote=RemoteOptions(), previous=previous)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with sockdiag.open_socket() as sock:
        batches = sockdiag.receive(sock, request, seq, reader.buffer, "sock_diag")
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            t1 = time.perf_counter()
            parts["receive"] += t1 - t0
            if batch is None:
                break
            table = sockdiag.decode(batch, seq, msg_type)
            t2 = time.perf_counter()
            acc.add(table)
            parts["add"] += time.perf_counter() - t2
            parts["decode"] += t2 - t1
    t0 = time.perf_counter()
    summary = acc.result()
    parts["result"] = time.perf_counter() - t0
    parts["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return summary, parts


def main() -> None:
    reps = int(sys.argv[1])
    # the sampler as the exporter builds it (in trees that tune the allocator, it does so)
    reader = Sampler(SocketReader("netlink"), remote=RemoteOptions()).reader
    previous = None
    for _ in range(3):  # warm-up: imports, first allocations, the key map
        previous, _parts = read(reader, previous)
    out: dict[str, list] = {"floor": [], "receive": [], "decode": [], "add": [], "result": [],
                            "faults": []}
    for _ in range(reps):
        t0 = time.perf_counter()
        dualmeasure.floor(dualmeasure.TCP)
        out["floor"].append(time.perf_counter() - t0)
        previous, parts = read(reader, previous)
        for name, value in parts.items():
            out[name].append(value)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
