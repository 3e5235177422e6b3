"""Side-by-side benchmark: the exporter's full sample against the kernel's floor, ss, netstat
and node_exporter's tcpstat collector, on N idle loopback sockets in a private namespace.

    .venv/bin/python -m bench.run --sizes 1000,10000,100000,200000 --reps 7

Needs root, iproute2, net-tools and prometheus-node-exporter. Prints a Markdown table (the
medians and their ratios to the floor) for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid

from bench.sockets import SocketFarm
from exporter.sources import netns

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
NODE_PORT = 9100  # below the ephemeral range the benchmark sets (10000-65535)


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


def in_ns(ns, *args, **kwargs):
    return subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True,
                          check=True, **kwargs)


def time_shell(ns, command, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        in_ns(ns, "sh", "-c", command)
        times.append(time.perf_counter() - t0)
    return times


def node_exporter(ns, reps):
    """node_exporter's own tcpstat duration (median) and its peak RSS in MB."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, NODE_EXPORTER, "--collector.disable-defaults",
                             "--collector.tcpstat", f"--web.listen-address=127.0.0.1:{NODE_PORT}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        durations = []
        with netns.entered(f"/run/netns/{ns}"):
            deadline = time.monotonic() + 20
            while True:
                try:
                    body = urllib.request.urlopen(f"http://127.0.0.1:{NODE_PORT}/metrics",
                                                  timeout=120).read().decode()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            for _ in range(reps):
                body = urllib.request.urlopen(f"http://127.0.0.1:{NODE_PORT}/metrics",
                                              timeout=120).read().decode()
                found = re.search(r'node_scrape_collector_duration_seconds\{collector="tcpstat"\} (\S+)', body)
                durations.append(float(found.group(1)))
        with open(f"/proc/{proc.pid}/status") as status:
            hwm = int(re.search(r"VmHWM:\s+(\d+)", status.read()).group(1))
        return durations, hwm / 1024
    finally:
        proc.terminate()
        proc.wait()


def measure(ns, reps):
    py = sys.executable
    timing = json.loads(in_ns(ns, py, "-m", "bench.measure", "time", str(reps)).stdout)
    rss = json.loads(in_ns(ns, py, "-m", "bench.measure", "rss", "3").stdout)["rss_kb"] / 1024
    ss = time_shell(ns, "ss -tan | awk '{++S[$1]} END {for (a in S) print a, S[a]}' >/dev/null", reps)
    ns_reps = max(3, reps // 2)
    netstat = time_shell(ns, "netstat -ant | awk '/^tcp/ {++S[$NF]} END {for(a in S) print a, S[a]}' >/dev/null", ns_reps)
    node, node_rss = node_exporter(ns, reps) if os.path.exists(NODE_EXPORTER) else ([float("nan")], float("nan"))
    med = statistics.median
    return {"sockets": timing["sockets"], "floor": med(timing["floor"]), "sample": med(timing["sample"]),
            "default": med(timing["default"]),
            "ss": med(ss), "netstat": med(netstat), "node": med(node), "rss_mb": rss,
            "node_rss_mb": node_rss}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000,200000")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", ns)
    farm = SocketFarm(f"/run/netns/{ns}")
    rows = []
    try:
        in_ns(ns, "ip", "link", "set", "lo", "up")
        in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65535")
        for size in (int(s) for s in args.sizes.split(",")):
            t0 = time.monotonic()
            farm.grow_to(size)
            print(f"# {size} sockets built in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
            row = measure(ns, args.reps)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        farm.close()
        sh("ip", "netns", "del", ns)
    print("| sockets | floor (netlink, no decode) | exporter sample + render | ratio | all default collectors + render | ratio | ss -tan \\| awk | ratio | netstat -ant \\| awk | ratio | node_exporter tcpstat | ratio | exporter peak RSS | node_exporter peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f = r["floor"]
        print(f"| {r['sockets']:,} | {f * 1e3:.1f} ms | {r['sample'] * 1e3:.1f} ms | {r['sample'] / f:.2f} | "
              f"{r['default'] * 1e3:.1f} ms | {r['default'] / f:.2f} | "
              f"{r['ss'] * 1e3:.0f} ms | {r['ss'] / f:.2f} | {r['netstat'] * 1e3:.0f} ms | {r['netstat'] / f:.2f} | "
              f"{r['node'] * 1e3:.0f} ms | {r['node'] / f:.2f} | {r['rss_mb']:.0f} MB | {r['node_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
