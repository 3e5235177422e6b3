"""Run inside the benchmark namespace: time the kernel's floor and the exporter's sample.

    python -m bench.measure time REPS   -> JSON {floor: [s...], sample: [s...], sockets: n}
    python -m bench.measure rss REPS    -> JSON {rss_kb: peak RSS after REPS full samples}
    python -m bench.measure remote REPS -> JSON {base: [s...], remote: [s...]}: the sample
                                           without and with per-remote/per-port counts
    python -m bench.measure remote-rss REPS -> JSON {rss_kb: ...} with per-remote counts
    python -m bench.measure programs REPS -> JSON {base: [s...], programs: [s...]}: without
                                           and with netstat -p attribution
"""
from __future__ import annotations

import json
import os
import resource
import socket
import sys
import time

from bench import dualmeasure
from exporter.aggregate import RemoteOptions
from exporter.views import build_registry
from exporter.sampler import Sampler, SocketReader
from prometheus_client import generate_latest

# The same three requests a sample makes: TCP both families in one walk, UDP per family.
REQUESTS = ((socket.IPPROTO_TCP, socket.AF_UNSPEC), (socket.IPPROTO_UDP, socket.AF_INET),
            (socket.IPPROTO_UDP, socket.AF_INET6))


def floor() -> int:
    """The dumps with no decoding at all (bench/dualmeasure.py's floor)."""
    return dualmeasure.floor(REQUESTS)


def main() -> None:
    mode, reps = sys.argv[1], int(sys.argv[2])
    if mode in ("remote", "remote-rss"):
        return remote(mode, reps)
    if mode == "programs":
        return programs(reps)
    # The foundation's sample as issue 2 defines it: TCP states, queues, listeners and UDP
    # (the same three dumps as the floor), plus rendering /metrics.
    sampler = Sampler(SocketReader("netlink"), listen_limit=100, collectors=["tcp", "udp"])
    # Everything the exporter does by default: also per-remote/per-port counts, netstat -s,
    # sockstat, interfaces, conntrack.
    default = Sampler(SocketReader("netlink"), remote=RemoteOptions())
    registries = {s: build_registry(lambda s=s: s.snapshot, "bench") for s in (sampler, default)}

    def full_sample(which=sampler):
        which.sample_once()
        return generate_latest(registries[which])

    if mode == "rss":
        for _ in range(reps):
            full_sample()
        print(json.dumps({"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
        return
    floors, samples, defaults = [], [], []
    full_sample()  # warm-up: imports, first allocations
    full_sample(default)
    for _ in range(reps):  # alternate, so drift hits all alike
        t0 = time.perf_counter()
        floor()
        t1 = time.perf_counter()
        full_sample()
        t2 = time.perf_counter()
        full_sample(default)
        t3 = time.perf_counter()
        floors.append(t1 - t0)
        samples.append(t2 - t1)
        defaults.append(t3 - t2)
    tcp = sampler.snapshot.results["tcp"].data
    print(json.dumps({"floor": floors, "sample": samples, "default": defaults,
                      "sockets": tcp.scanned, "pid": os.getpid()}))


def remote(mode: str, reps: int) -> None:
    """The foundation's sample against the same sample with per-remote and per-port counts
    (default options: top 20 per state, top 50 ports), alternating."""
    plain = Sampler(SocketReader("netlink"))
    full = Sampler(SocketReader("netlink"), remote=RemoteOptions())
    registries = {s: build_registry(lambda s=s: s.snapshot, "bench") for s in (plain, full)}

    def run(sampler):
        sampler.sample_once()
        return generate_latest(registries[sampler])

    if mode == "remote-rss":
        for _ in range(reps):
            run(full)
        print(json.dumps({"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
        return
    run(plain)
    run(full)
    base, extended = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        run(plain)
        t1 = time.perf_counter()
        run(full)
        t2 = time.perf_counter()
        base.append(t1 - t0)
        extended.append(t2 - t1)
    counts = full.snapshot.results["tcp"].data.remote.counts
    print(json.dumps({"base": base, "remote": extended, "distinct_remotes": len(counts),
                      "sockets": full.snapshot.results["tcp"].data.scanned}))


def programs(reps: int) -> None:
    """The default sample against the same sample with netstat -p attribution, alternating."""
    plain = Sampler(SocketReader("netlink"), remote=RemoteOptions(), collectors=["tcp", "udp"])
    owned = Sampler(SocketReader("netlink"), remote=RemoteOptions(), programs=20,
                    collectors=["processes", "tcp", "udp"])
    plain.sample_once()
    owned.sample_once()
    base, extended = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        plain.sample_once()
        t1 = time.perf_counter()
        owned.sample_once()
        t2 = time.perf_counter()
        base.append(t1 - t0)
        extended.append(t2 - t1)
    data = owned.snapshot.results["tcp"].data
    print(json.dumps({"base": base, "programs": extended, "sockets": data.scanned,
                      "processes": data.programs.processes}))


if __name__ == "__main__":
    main()
