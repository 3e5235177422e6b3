"""Run inside a benchmark namespace, with the exporter under test first on PYTHONPATH (so a
`before` source tree and the current one run the same measurement): the kernel's floor and
the exporter's default sample, alternating.

    PYTHONPATH=TREE python bench/dualmeasure.py time REPS -> JSON {tcp_floor,
        tcp_floor_unmarked, floor, sample, tcp, tcp_plain, floor_cpu, sample_cpu: [s...],
        sockets, distinct}
    PYTHONPATH=TREE python bench/dualmeasure.py rss REPS  -> JSON {rss_kb} after REPS samples

tcp_floor: the one TCPDIAG_GETSOCK walk (both families) received until NLMSG_DONE, no
decoding, on a socket opened by a holder of CAP_NET_ADMIN (as root: with INET_DIAG_MARK in
every message); tcp_floor_unmarked: the same on a socket opened without it (no mark: how
the exporter opens its sockets since 0c1cc2e); floor: tcp_floor plus the two UDP dumps a
sample also makes. sample: the default sample,
`Sampler(SocketReader("netlink"), remote=RemoteOptions())` with every default view; tcp: the
tcp view's own duration inside it (what the exporter reports as
netstat_exporter_collector_duration_seconds{collector="tcp"}); tcp_plain: the tcp view of a
sampler without per-remote and per-port counting (--no-remote's cost: decode, states, queues,
listeners). floor_cpu, sample_cpu: the process's CPU time (every thread's) over floor and
sample: a read that receives in one thread while another decodes may take less time than
it takes CPU.
"""
from __future__ import annotations

import ctypes
import json
import resource
import socket
import struct
import sys
import time

from exporter.aggregate import RemoteOptions
from exporter.sampler import Sampler, SocketReader
from exporter.sources import sockdiag
from exporter.sources.table import ALL_STATES_MASK

TCP = ((socket.IPPROTO_TCP, socket.AF_UNSPEC),)
ALL = TCP + ((socket.IPPROTO_UDP, socket.AF_INET), (socket.IPPROTO_UDP, socket.AF_INET6))


def _ends(view, n: int, seq: int) -> bool:
    """Does this datagram end the dump (NLMSG_DONE of ours at its tail)? Our own few lines,
    not the tree's, so every tree under test is held to the same floor."""
    if n < 20:
        return False
    length, kind, _flags, got, _pid = struct.unpack_from("=IHHII", view, n - 20)
    return length == 20 and kind == 3 and got == seq


def _effective(libc, caps=None):
    """capget (or capset, given caps) of this thread, _LINUX_CAPABILITY_VERSION_3."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = caps if caps is not None else (ctypes.c_uint32 * 6)()
    if (libc.capset if caps is not None else libc.capget)(header, data):
        raise OSError(ctypes.get_errno(), "capget/capset")
    return data


def _netlink_socket(mark: bool = True) -> socket.socket:
    """A sock_diag socket that receives without Python's per-receive poll (the kernel keeps
    the timeout): the least a reader can do, whatever the tree under test does. mark=False:
    opened with CAP_NET_ADMIN out of the effective set, so that the kernel leaves
    INET_DIAG_MARK out of every message (the floor of a reader that does not want it)."""
    if mark:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 4)
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        caps = _effective(libc)
        held = caps[0]  # the low word of the effective set; CAP_NET_ADMIN is bit 12
        caps[0] = held & ~(1 << 12)
        _effective(libc, caps)
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 4)
        finally:
            caps[0] = held
            _effective(libc, caps)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 10, 0))
    sock.bind((0, 0))
    return sock


def floor(requests, view=memoryview(bytearray(1 << 16)), mark: bool = True) -> int:
    """The dumps with no decoding at all: receive until NLMSG_DONE. Returns bytes read."""
    total = 0
    for protocol, family in requests:
        with _netlink_socket(mark) as sock:
            seq = 77
            _type, request = sockdiag.build_request(protocol, family, ALL_STATES_MASK, seq)
            sock.send(request)
            while True:
                n = sock.recv_into(view)
                total += n
                if _ends(view, n, seq):
                    break
    return total


def main() -> None:
    mode, reps = sys.argv[1], int(sys.argv[2])
    sampler = Sampler(SocketReader("netlink"), remote=RemoteOptions())
    if mode == "rss":
        for _ in range(reps):
            sampler.sample_once()
        print(json.dumps({"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
        return
    plain = Sampler(SocketReader("netlink"), collectors=["tcp"])
    sampler.sample_once()  # warm-up: imports, first allocations, the top-N's previous
    plain.sample_once()
    floor(ALL)
    out = {"tcp_floor": [], "tcp_floor_unmarked": [], "floor": [], "sample": [], "tcp": [],
           "tcp_plain": [], "floor_cpu": [], "sample_cpu": []}
    for _ in range(reps):  # alternate, so drift hits all alike
        t = time.perf_counter()
        floor(TCP, mark=False)
        out["tcp_floor_unmarked"].append(time.perf_counter() - t)
        t0 = time.perf_counter()
        floor(TCP)
        t1, c1 = time.perf_counter(), time.process_time()
        floor(ALL)
        t2, c2 = time.perf_counter(), time.process_time()
        snapshot = sampler.sample_once()
        t3, c3 = time.perf_counter(), time.process_time()
        out["floor_cpu"].append(c2 - c1)  # every thread's: the sample's reads may use two
        out["sample_cpu"].append(c3 - c2)
        out["tcp_floor"].append(t1 - t0)
        out["floor"].append(t2 - t1)
        out["sample"].append(t3 - t2)
        out["tcp"].append(snapshot.results["tcp"].duration)
        out["tcp_plain"].append(plain.sample_once().results["tcp"].duration)
    tcp = sampler.snapshot.results["tcp"].data
    counts = tcp.remote.counts
    distinct = len(counts) if hasattr(counts, "__len__") else len(counts.v4_addr) + len(counts.v6_addr)
    print(json.dumps({**out, "sockets": tcp.scanned, "distinct": distinct}))


if __name__ == "__main__":
    main()
