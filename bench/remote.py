"""Issue 3's benchmark: what per-remote and per-port counting adds to a sample.

    .venv/bin/python -m bench.remote --cases 100000:10000,100000:50000,1000000:10000,1000000:100000

Each case SOCKETS:REMOTES builds SOCKETS loopback sockets whose client ends are bound to
REMOTES distinct 127.0.0.0/8 addresses (the server ends then see that many remotes; the
client ends all see 127.0.0.1), then times the foundation's sample against the same sample
with per-remote/per-port counts, alternating in one process.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import subprocess
import sys
import time
import uuid

from bench.sockets import SocketFarm


def in_ns(ns, *args):
    return subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True,
                          check=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="100000:10000,100000:50000,1000000:10000,1000000:100000")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    rows = []
    for case in args.cases.split(","):
        size, remotes = (int(x) for x in case.split(":"))
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        farm = SocketFarm(f"/run/netns/{ns}")
        try:
            in_ns(ns, "ip", "link", "set", "lo", "up")
            in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65535")
            base = int(ipaddress.IPv4Address("127.1.0.0"))
            sources = [str(ipaddress.IPv4Address(base + i)) for i in range(remotes)]
            t0 = time.monotonic()
            farm.grow_to(size, sources)
            print(f"# {size} sockets, {remotes} sources, built in {time.monotonic() - t0:.1f}s",
                  file=sys.stderr, flush=True)
            timing = json.loads(in_ns(ns, sys.executable, "-m", "bench.measure", "remote",
                                      str(args.reps)).stdout)
            rss = json.loads(in_ns(ns, sys.executable, "-m", "bench.measure", "remote-rss",
                                   "3").stdout)["rss_kb"] / 1024
            row = {"sockets": timing["sockets"], "remotes": timing["distinct_remotes"],
                   "base": statistics.median(timing["base"]),
                   "remote": statistics.median(timing["remote"]), "rss_mb": rss}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            farm.close()
            subprocess.run(["ip", "netns", "del", ns], check=True)
    print("| sockets | distinct (state, remote) | foundation sample + render | with per-remote/per-port | added | peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['sockets']:,} | {r['remotes']:,} | {r['base'] * 1e3:.1f} ms | "
              f"{r['remote'] * 1e3:.1f} ms | {100 * (r['remote'] / r['base'] - 1):+.1f}% | {r['rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
