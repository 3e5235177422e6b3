"""The HTTP front door under load and attack, measured on the exporter in its own process with
default flags (plus the given ones), on loopback in a private network namespace.

    .venv/bin/python -m bench.http [--label after] [--soak 20000] [--tree DIR] [-- flags]

Prints one Markdown row per measurement for bench/RESULTS.md:
- wrk -c50 -d10s on /metrics and /healthz: requests/s and p99;
- RSS and threads of the exporter with 1000 idle keep-alive connections open, per 1000;
- a normal scrape's latency while 1000 clients trickle request headers one byte a second;
- a soak of N sequential scrapes: RSS and open descriptors at the start and the end.
Needs root (unshare) and Debian's wrk.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

PORT = 10101


def proc_status(pid: int) -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "Threads"):
                values[key] = int(rest.split()[0])
    values["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return values


def fetch(path: str, timeout: float = 10.0, port: int = PORT) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
        reply.read()
    return time.perf_counter() - started


def wrk(path: str, seconds: int = 10) -> tuple[float, str]:
    done = subprocess.run(["wrk", "-c50", "-t2", f"-d{seconds}s", "--latency", "--timeout", "10s",
                           f"http://127.0.0.1:{PORT}{path}"],
                          capture_output=True, text=True, check=True)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1))
    p99 = re.search(r"99%\s+(\S+)", done.stdout).group(1)
    return rate, p99


def idle_connections(pid: int, count: int) -> tuple[dict, dict, list]:
    before = proc_status(pid)
    held = []
    for _ in range(count):
        conn = socket.create_connection(("127.0.0.1", PORT), timeout=10)
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        conn.recv(4096)  # answered; the connection stays open, idle
        held.append(conn)
    time.sleep(1)
    return before, proc_status(pid), held


def slow_clients(count: int) -> list:
    held = []
    for _ in range(count):
        try:
            conn = socket.create_connection(("127.0.0.1", PORT), timeout=10)
            conn.sendall(b"G")
            held.append(conn)
        except OSError:
            break
    return held


def trickle(held: list, seconds: float) -> list[float]:
    """Send one more header byte a second on every slow connection while timing scrapes."""
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for conn in held:
            try:
                conn.send(b"E")
            except OSError:
                pass
        for _ in range(5):
            try:
                latencies.append(fetch("/metrics"))
            except OSError:
                latencies.append(float("inf"))
        time.sleep(1)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="now")
    parser.add_argument("--soak", type=int, default=20000)
    parser.add_argument("--tree", default=".", help="run the exporter from this checkout "
                        "(a git worktree of an older commit, for the before column)")
    parser.add_argument("flags", nargs="*")
    args = parser.parse_args()
    if "NETSTAT_BENCH_IN_NS" not in os.environ:
        env = {**os.environ, "NETSTAT_BENCH_IN_NS": "1"}
        os.execvpe("unshare", ["unshare", "-n", sys.executable, "-m", "bench.http", *sys.argv[1:]],
                   env)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    exporter = subprocess.Popen([sys.executable, "-m", "exporter",
                                 f"--web.listen-address=127.0.0.1:{PORT}", *args.flags],
                                stderr=subprocess.DEVNULL, cwd=args.tree,
                                env={**os.environ, "PYTHONPATH": os.path.abspath(args.tree)})
    try:
        for _ in range(100):
            try:
                fetch("/healthz")
                break
            except OSError:
                time.sleep(0.1)
        rows = []
        for path in ("/metrics", "/healthz"):
            rate, p99 = wrk(path)
            rows.append(f"| {args.label} | wrk -c50 {path} | {rate:.0f} req/s, p99 {p99} |")
        before, during, held = idle_connections(exporter.pid, 1000)
        rows.append(f"| {args.label} | 1000 idle keep-alive connections | RSS +"
                    f"{(during['VmRSS'] - before['VmRSS']) / 1024:.1f} MB, threads "
                    f"{before['Threads']} -> {during['Threads']} |")
        for conn in held:
            conn.close()
        time.sleep(2)
        held = slow_clients(1000)
        latencies = trickle(held, 10)
        status = proc_status(exporter.pid)
        rows.append(f"| {args.label} | scrape while {len(held)} clients trickle headers | "
                    f"median {statistics.median(latencies) * 1000:.0f} ms, max "
                    f"{max(latencies) * 1000:.0f} ms, threads {status['Threads']} |")
        for conn in held:
            conn.close()
        time.sleep(2)
        start = proc_status(exporter.pid)
        for i in range(args.soak):
            fetch("/metrics")
            if i == 1000:  # after warm-up: caches and allocator pools are in place
                start = proc_status(exporter.pid)
        end = proc_status(exporter.pid)
        rows.append(f"| {args.label} | soak {args.soak} scrapes (from scrape 1000) | RSS "
                    f"{start['VmRSS'] / 1024:.1f} -> {end['VmRSS'] / 1024:.1f} MB, fds "
                    f"{start['fds']} -> {end['fds']} |")
        print("\n".join(rows))
    finally:
        exporter.kill()
        exporter.wait()


if __name__ == "__main__":
    main()
