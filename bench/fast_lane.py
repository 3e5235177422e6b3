"""What the fast lane costs: 100k idle ESTABLISHED sockets plus a few in the states it
watches, the exporter in its own process with default flags (fast lane every second) against
the same with --sample.fast-interval=0, CPU seconds per second over a minute of each.

    .venv/bin/python -m bench.fast_lane --sockets 100000 --seconds 60

Also the lane's own cost per tick from netstat_exporter_fast_lane_duration_seconds, and, in
one process, a state-filtered dump against a full one (alternating, medians). Needs root.
"""
from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid

from bench.sockets import SocketFarm
from exporter.sources import netns, sockdiag
from exporter.sources.table import ALL_STATES_MASK
from exporter.views import FAST_STATES

PORT = 10191
TICKS = 1.0 / 100  # clock ticks in /proc/PID/stat (USER_HZ)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICKS  # utime + stime


def exporter_cpu(ns: str, seconds: float, *flags: str) -> tuple[float, list[float]]:
    """CPU seconds per second of an exporter with default flags (and `flags`), and the fast
    lane durations it reported."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "exporter",
                             f"--web.listen-address=127.0.0.1:{PORT}", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lanes = []
    try:
        with netns.entered(f"/run/netns/{ns}"):
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{PORT}/healthz", timeout=5)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            time.sleep(6)  # past the first samples and the start-up imports
            start_cpu, start = cpu_seconds(proc.pid), time.monotonic()
            while time.monotonic() - start < seconds:
                time.sleep(5)
                body = urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics",
                                              timeout=10).read().decode()
                found = re.search(r"^netstat_exporter_fast_lane_duration_seconds (\S+)$", body,
                                  re.M)
                if found:
                    lanes.append(float(found.group(1)))
            used = cpu_seconds(proc.pid) - start_cpu
            return used / (time.monotonic() - start), lanes
    finally:
        proc.terminate()
        proc.wait()


def in_process(ns: str, reps: int) -> tuple[float, float]:
    """(state-filtered dump, full dump) medians, alternating, in this process."""
    mask = sum(1 << state for state in FAST_STATES)
    buffer = bytearray(sockdiag.BATCH_BYTES)
    fast, full = [], []
    with netns.entered(f"/run/netns/{ns}"):
        for _ in range(reps):
            for states, times in ((mask, fast), (ALL_STATES_MASK, full)):
                t0 = time.perf_counter()
                for _table in sockdiag.dump(socket.IPPROTO_TCP, states=states, buffer=buffer):
                    pass
                times.append(time.perf_counter() - t0)
    return statistics.median(fast), statistics.median(full)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sockets", type=int, default=100000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args()
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    farm = SocketFarm(f"/run/netns/{ns}")
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                        "net.ipv4.ip_local_port_range=10000 65535"], check=True)
        farm.grow_to(args.sockets)
        sockets = farm.sockets
        fast, full = in_process(ns, args.reps)
        on, lanes = exporter_cpu(ns, args.seconds)
        off, _ = exporter_cpu(ns, args.seconds, "--sample.fast-interval=0")
    finally:
        farm.close()
        subprocess.run(["ip", "netns", "del", ns])
    print(f"| {sockets:,} sockets | filtered dump {fast * 1000:.1f} ms vs full {full * 1000:.1f} ms "
          f"({fast / full:.2f}x) | lane per tick (self-reported, median) "
          f"{statistics.median(lanes) * 1000:.1f} ms | exporter CPU with the lane "
          f"{on * 100:.2f}% of a core, without {off * 100:.2f}%: the lane costs "
          f"{(on - off) * 100:.2f}% |")


if __name__ == "__main__":
    main()
