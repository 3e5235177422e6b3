"""The conntrack view against the kernel's own tool, on 10k, 100k and 250k entries.

    .venv/bin/python -m bench.conntrack --sizes 10000,100000,250000 --reps 5

Builds client -> router (MASQUERADE) -> server namespaces, sends one UDP datagram per entry
through the router (distinct destination ports, so each is a flow; the router keeps them
for 10 minutes), then in the router times, alternating, the exporter's conntrack read (the
whole view: count, limit, per-CPU statistics, the ctnetlink dump counted by protocol, state
and NAT, top sources) against `conntrack -L | wc -l` and `conntrack -C`, and measures the
peak RSS of a separate process doing one conntrack sample. Needs root, iproute2, iptables
and conntrack. Prints a Markdown table for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid

SAMPLE = """
import json, resource, socket, sys, time
sys.path.insert(0, {root!r})
from exporter.sampler import Sampler, SocketReader
from exporter.sources import ctnetlink, sockdiag
sampler = Sampler(SocketReader("netlink"), collectors=["conntrack"])
started = time.perf_counter()
snapshot = sampler.sample_once()
took = time.perf_counter() - started
# the floor: the same dump received whole, nothing decoded
with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctnetlink.NETLINK_NETFILTER) as sock:
    sock.bind((0, 0))
    started = time.perf_counter()
    for _batch in sockdiag.receive(sock, ctnetlink.build_request(7), 7, None, "ctnetlink"):
        pass
    floor = time.perf_counter() - started
data = snapshot.results["conntrack"].data
print(json.dumps({{"seconds": took, "floor": floor, "flows": sum(data.flows.flows.values()),
                  "source": data.flows_source,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def sh(*args, **kwargs):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs).stdout


def build(prefix: str) -> tuple[str, str, str]:
    client, router, server = (f"{prefix}-{n}" for n in ("c", "r", "s"))
    for ns in (client, router, server):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", "c0", "netns", client, "type", "veth", "peer", "name", "r0",
       "netns", router)
    sh("ip", "link", "add", "r1", "netns", router, "type", "veth", "peer", "name", "s0",
       "netns", server)
    for ns, dev, addr in ((client, "c0", "10.0.1.2/24"), (router, "r0", "10.0.1.1/24"),
                          (router, "r1", "10.0.2.1/24"), (server, "s0", "10.0.2.2/24")):
        sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
    sh("ip", "-n", client, "route", "add", "default", "via", "10.0.1.1")
    sh("ip", "-n", server, "route", "add", "default", "via", "10.0.2.1")
    sh("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    sh("ip", "netns", "exec", router, "sysctl", "-qw",
       "net.netfilter.nf_conntrack_udp_timeout=600")
    sh("ip", "netns", "exec", router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "r1",
       "-j", "MASQUERADE")
    # the server answers nothing: its kernel would send ICMP port unreachable, which ends
    # nothing in conntrack but costs time; drop instead
    sh("ip", "netns", "exec", server, "iptables", "-A", "INPUT", "-p", "udp", "-j", "DROP")
    return client, router, server


def fill(client: str, router: str, target: int) -> int:
    """Send datagrams until the router tracks `target` entries; return the count."""
    # one socket (one source port) per batch of at most 60000 destination ports: every
    # datagram is a distinct flow
    code = ("import socket, sys\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for port in range(1024, 1024 + int(sys.argv[1])):\n"
            "    s.sendto(b'x', ('10.0.2.2', port))\n")
    sent = 0
    while True:
        have = int(sh("ip", "netns", "exec", router, "conntrack", "-C").strip())
        if have >= target:
            return have
        batch = min(60000, target - have)
        sh("ip", "netns", "exec", client, sys.executable, "-c", code, str(batch))
        sent += batch


def time_shell(ns: str, command: str) -> float:
    started = time.perf_counter()
    subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", command], check=True,
                   capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,250000")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    prefix = f"ctb-{uuid.uuid4().hex[:6]}"
    client, router, server = build(prefix)
    rows = []
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            entries = fill(client, router, size)
            ours, floor, listing, count, rss = [], [], [], [], []
            for _ in range(args.reps):
                out = sh("ip", "netns", "exec", router, sys.executable, "-c",
                         SAMPLE.format(root=root))
                result = json.loads(out)
                assert result["source"] == "netlink" and result["flows"] >= size * 0.99, result
                ours.append(result["seconds"])
                floor.append(result["floor"])
                rss.append(result["rss_mb"])
                listing.append(time_shell(router, "conntrack -L 2>/dev/null | wc -l"))
                count.append(time_shell(router, "conntrack -C"))
            o, f, l, c = (statistics.median(x) for x in (ours, floor, listing, count))
            rows.append(f"| {entries:,} | {o * 1000:.0f} ms ({o / f:.2f}x) | {f * 1000:.0f} ms "
                        f"({f / l:.2f}x) | {l * 1000:.0f} ms ({o / l:.2f}x) "
                        f"| {c * 1000:.0f} ms | {max(rss):.0f} MB |")
    finally:
        for ns in (client, router, server):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    print("| entries | exporter conntrack read (/ floor) | floor: the dump received, not "
          "decoded (/ conntrack -L) | conntrack -L \\| wc -l (ours / theirs) | conntrack -C "
          "| exporter peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
