"""Two designs the tcp view does not use, measured beside it against the floor: what each
would buy and what it would cost (bench/RESULTS.md, "Issue 12, fourth pass").

    .venv/bin/python -m bench.alternatives --case 200000:100000:30 --reps 30

In the farm's namespace (bench/dualstack.py builds it), one process reads the whole TCP table
again and again, the variants taken in turn and each repetition divided by a floor read just
before it (bench/dualmeasure.py's, on a socket without the mark, as the exporter opens its
own), in time and in the process's CPU time (every thread's):

- numpy: the tcp view's read as it is (sockdiag.receive and decode, TcpAccumulator with
  per-remote counting, result()).
- threaded: the same, but a second thread receives into free 1 MiB windows of a 4 MiB buffer
  while the first decodes and counts the full ones (the kernel walks its table inside our
  receives, so the decoding could hide behind the walk).
- compiled decode: the same, but each batch decoded by a small C function (built here with
  cc and called through ctypes) that walks the messages and copies the fields into columns
  in one pass; the counting stays in numpy.
- compiled decode alone: the C decode and no counting at all: the least a reader that
  decodes every socket spends beyond the floor, with no per-state or per-remote work.

Needs a C compiler for the compiled variants (skipped, and said, without one).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

# The prototype decoder: one pass over a buffer of netlink messages, the fields of every
# inet_diag_msg (include/uapi/linux/inet_diag.h) into columns. Only as careful as a benchmark
# needs: lengths and sequence numbers checked, nothing else.
C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
long decode(const uint8_t *buf, long len, uint32_t seq, uint32_t msg_type,
            uint8_t *family, uint8_t *state, uint16_t *lport, uint16_t *rport,
            uint32_t *laddr, uint32_t *raddr, uint32_t *ifindex, uint32_t *queues,
            uint32_t *uid_inode, long cap)
{
    long pos = 0, rows = 0;
    while (pos + 16 <= len) {
        uint32_t mlen, mseq;
        uint16_t type;
        memcpy(&mlen, buf + pos, 4);
        memcpy(&type, buf + pos + 4, 2);
        memcpy(&mseq, buf + pos + 8, 4);
        if (mlen < 16 || pos + mlen > len || mseq != seq)
            return -1;
        if (type == msg_type) {
            const uint8_t *m = buf + pos + 16;
            if (mlen < 88 || rows >= cap)
                return -2;
            family[rows] = m[0];
            state[rows] = m[1];
            lport[rows] = (uint16_t)(m[4] << 8 | m[5]);
            rport[rows] = (uint16_t)(m[6] << 8 | m[7]);
            memcpy(laddr + 4 * rows, m + 8, 16);
            memcpy(raddr + 4 * rows, m + 24, 16);
            memcpy(ifindex + rows, m + 40, 4);
            memcpy(queues + 2 * rows, m + 56, 8);
            memcpy(uid_inode + 2 * rows, m + 64, 8);
            rows++;
        } else if (type != 3) {  /* NLMSG_DONE ends it; anything else is not a dump */
            return -3;
        }
        pos += (mlen + 3) & ~3u;
    }
    return rows;
}
"""


def compiled_decoder(workdir: str):
    """The C decoder as a Python function (batch, seq, msg_type) -> SocketTable, or None
    without a compiler."""
    import numpy as np

    from exporter.sources.table import SocketTable
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    source, library = os.path.join(workdir, "decode.c"), os.path.join(workdir, "decode.so")
    with open(source, "w") as out:
        out.write(C_SOURCE)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", library, source], check=True)
    function = ctypes.CDLL(library).decode
    function.restype = ctypes.c_long
    function.argtypes = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_uint32, ctypes.c_uint32]
                         + [ctypes.c_void_p] * 9 + [ctypes.c_long])

    def decode(batch, seq, msg_type):
        cap = len(batch) // 88
        columns = {"family": np.empty(cap, np.uint8), "state": np.empty(cap, np.uint8),
                   "local_port": np.empty(cap, np.uint16),
                   "remote_port": np.empty(cap, np.uint16),
                   "local_addr": np.empty((cap, 4), np.uint32),
                   "remote_addr": np.empty((cap, 4), np.uint32),
                   "ifindex": np.empty(cap, np.uint32)}
        queues, uid_inode = np.empty((cap, 2), np.uint32), np.empty((cap, 2), np.uint32)
        start = np.frombuffer(batch, dtype=np.uint8).ctypes.data  # where the view starts
        rows = function(start, len(batch), seq, msg_type,
                        *(c.ctypes.data for c in (*columns.values(), queues, uid_inode)), cap)
        if rows < 0:
            raise ValueError(f"compiled decode failed ({rows})")
        return SocketTable(**{k: v[:rows] for k, v in columns.items()},
                           recv_q=queues[:rows, 0], send_q=queues[:rows, 1],
                           uid=uid_inode[:rows, 0], inode=uid_inode[:rows, 1])
    return decode


def threaded_receive(sock, request: bytes, seq: int, buffer: bytearray, windows: int = 4):
    """sockdiag.receive with a thread of its own receiving into free windows of `buffer`."""
    from exporter.sources import sockdiag
    room = sockdiag._DATAGRAM_ROOM
    size = len(buffer) // windows
    view = memoryview(buffer)
    free: queue.SimpleQueue = queue.SimpleQueue()
    full: queue.SimpleQueue = queue.SimpleQueue()
    for at in range(0, size * windows, size):
        free.put(view[at:at + size])

    def fill(window):
        pos = 0
        while True:
            n = sock.recv_into(window[pos:pos + room], room, sockdiag._MSG_TRUNC)
            end = pos + n
            if sockdiag._check_datagram(window, pos, n, seq):
                return end, True
            pos = end
            if pos > len(window) - room:
                return pos, False

    def receiver():
        try:
            while True:
                window = free.get()
                got, ended = fill(window)
                full.put((window, got, ended))
                if ended:
                    return
        except BaseException as exc:  # noqa: BLE001 (the reader raises it)
            full.put(exc)

    sock.send(request)
    worker = threading.Thread(target=receiver, daemon=True)
    worker.start()
    try:
        while True:
            item = full.get()
            if isinstance(item, BaseException):
                raise item
            window, got, ended = item
            yield window[:got]
            free.put(window)
            if ended:
                return
    finally:
        worker.join()


def child(reps: int) -> None:
    """In the farm's namespace, with this checkout's exporter."""
    import socket

    from bench.dualmeasure import TCP, floor
    from exporter.aggregate import RemoteOptions
    from exporter.aggregate.tcp import TcpAccumulator
    from exporter.sampler import keep_freed_memory
    from exporter.sources import sockdiag
    from exporter.sources.table import ALL_STATES_MASK

    keep_freed_memory()
    workdir = tempfile.mkdtemp()
    compiled = compiled_decoder(workdir)
    buffers = {"plain": bytearray(sockdiag.BATCH_BYTES), "threaded": bytearray(4 << 20)}
    previous: dict = {}

    def read(variant: str):
        seq = 4242
        msg_type, request = sockdiag.build_request(socket.IPPROTO_TCP, socket.AF_UNSPEC,
                                                   ALL_STATES_MASK, seq)
        counting = variant != "compiled decode alone"
        acc = TcpAccumulator(remote=RemoteOptions(), previous=previous.get(variant)) \
            if counting else None
        decode = compiled if variant.startswith("compiled") else sockdiag.decode
        with sockdiag.open_socket() as sock:
            batches = threaded_receive(sock, request, seq, buffers["threaded"]) \
                if variant == "threaded" else sockdiag.receive(sock, request, seq,
                                                               buffers["plain"], "sock_diag")
            for batch in batches:
                table = decode(batch, seq, msg_type)
                if acc is not None:
                    acc.add(table)
        if acc is not None:
            previous[variant] = acc.result()

    variants = ["numpy", "threaded"]
    if compiled is not None:
        variants += ["compiled decode", "compiled decode alone"]
    for variant in variants:  # warm-up, and the key map each variant hands itself
        read(variant)
    for variant in variants[1:3]:  # every variant counts exactly what numpy counts
        assert previous[variant].connections == previous["numpy"].connections
        assert previous[variant].remote.remote == previous["numpy"].remote.remote
    out = {v: {"time": [], "cpu": []} for v in variants}
    for rep in range(reps):
        for variant in (variants if rep % 2 else variants[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            floor(TCP, mark=False)
            t1, c1 = time.perf_counter(), time.process_time()
            read(variant)
            t2, c2 = time.perf_counter(), time.process_time()
            out[variant]["time"].append((t2 - t1) / (t1 - t0))
            out[variant]["cpu"].append((c2 - c1) / (c1 - c0))
    shutil.rmtree(workdir)
    print(json.dumps({"compiler": compiled is not None, **out}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(int(sys.argv[2]))
        return
    from bench.dualstack import build, in_ns

    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default="200000:100000:30", help="SOCKETS:REMOTES:IPV6%%")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    size, remotes, mix = (int(x) for x in args.case.split(":"))
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    farm = None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        farm = build(ns, size, remotes, mix)
        done = in_ns(ns, sys.executable, "-m", "bench.alternatives", "child", str(args.reps),
                     cwd=root)
        result = json.loads(done.stdout)
    finally:
        if farm is not None:
            farm.close()
        subprocess.run(["ip", "netns", "del", ns], check=True)
    if not result.pop("compiler"):
        print("# no C compiler: the compiled variants are left out")
    med = statistics.median
    print(f"| {size:,} sockets, {remotes:,} remotes, {mix}% IPv6 | "
          + " | ".join(f"{name}: {med(v['time']):.3f} (CPU {med(v['cpu']):.3f})"
                       for name, v in result.items()) + " |")


if __name__ == "__main__":
    main()
