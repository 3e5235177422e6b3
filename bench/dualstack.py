"""Issue 12's benchmark: per-remote counting on dual-stack hosts, in-process and in the
exporter's own process, for one or more source trees of the exporter side by side.

    .venv/bin/python -m bench.dualstack --cases 100000:1000,200000:100000 --mixes 0,30,70 \\
        --trees before=/tmp/before,after=/tmp/after --reps 7 --exporter-samples 5 --rounds 1

Each case SOCKETS:REMOTES and mix (percent of connections over IPv6) builds a farm in a
fresh namespace: IPv4 connections from REMOTES*(100-mix)% distinct 127.1.0.0+ addresses to
127.0.0.1, IPv6 ones from REMOTES*mix% distinct 2001:db8::1:0+ addresses to [::1]. The IPv6
sources need no `ip addr add`: 2001:db8::/64 is routed `local` to lo (AnyIP) and
net.ipv6.ip_nonlocal_bind lets clients bind any of its addresses. Server ends see those
REMOTES peers; client ends all see 127.0.0.1 or ::1.

Then, for each tree (a copy of the source tree, e.g. `git archive`), inside the namespace:
- bench/dualmeasure.py: the floor and the default sample alternating in one process (medians
  in ms; ratios: the median of each repetition's own ratio to the floor measured just before
  it, so drift between repetitions cancels out);
- `python -m exporter` with default flags, its own
  netstat_exporter_collector_duration_seconds{collector="tcp"} over --exporter-samples
  samples (median), beside the one-walk TCP floor of the in-process run, and its VmHWM.
Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import ipaddress
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

HERE = os.path.dirname(os.path.abspath(__file__))
V4_BASE = int(ipaddress.IPv4Address("127.1.0.0"))
V6_BASE = int(ipaddress.IPv6Address("2001:db8::1:0"))
EXPORTER_PORT = 10101  # the default; the namespace's ephemeral range starts above it


def in_ns(ns, *args, **kwargs):
    done = subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True,
                          **kwargs)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr[-2000:]}")
    return done


def tree_env(tree):
    return {**os.environ, "PYTHONPATH": tree}


def in_process(ns, tree, mode, reps, script="dualmeasure.py"):
    # run_path, not `python FILE`: bench/ on sys.path would shadow the standard library's http
    script = os.path.join(HERE, script)
    args = (mode, str(reps)) if mode else (str(reps),)
    done = in_ns(ns, sys.executable, "-c", "import runpy, sys; sys.argv[0] = sys.argv[1]; "
                 "del sys.argv[1]; runpy.run_path(sys.argv[0], run_name='__main__')",
                 script, *args, env=tree_env(tree), cwd=tree)
    return json.loads(done.stdout)


def scrape(url):
    return urllib.request.urlopen(url, timeout=60).read().decode()


def exporter(ns, tree, samples):
    """The exporter as users run it: its own process, default flags. Returns its tcp
    collector durations (one per sample) and its peak RSS in MB."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "exporter"],
                            cwd=tree, env=tree_env(tree), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{EXPORTER_PORT}/metrics"
    durations: dict[str, float] = {}  # sample timestamp -> tcp duration
    try:
        with netns.entered(f"/run/netns/{ns}"):
            deadline = time.monotonic() + 60 + 10 * samples
            while len(durations) < samples + 1:  # the first sample is a cold one: dropped
                if time.monotonic() > deadline:
                    raise TimeoutError(f"exporter gave {len(durations)} samples")
                try:
                    body = scrape(url)
                except OSError:
                    time.sleep(0.5)
                    continue
                taken = re.search(r"^netstat_exporter_sample_timestamp_seconds (\S+)", body, re.M)
                tcp = re.search(r'^netstat_exporter_collector_duration_seconds\{collector="tcp"\} (\S+)',
                                body, re.M)
                if taken and tcp:
                    durations.setdefault(taken.group(1), float(tcp.group(1)))
                time.sleep(1.0)
        with open(f"/proc/{proc.pid}/status") as status:  # `ip netns exec` execs python
            hwm = int(re.search(r"VmHWM:\s+(\d+)", status.read()).group(1))
        ordered = [durations[k] for k in sorted(durations, key=float)]
        return ordered[1:], hwm / 1024
    finally:
        proc.terminate()
        proc.wait()


def build(ns, size, remotes, mix):
    in_ns(ns, "ip", "link", "set", "lo", "up")
    in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=10200 65535")
    in_ns(ns, "sysctl", "-qw", "net.ipv6.ip_nonlocal_bind=1")
    in_ns(ns, "ip", "-6", "route", "add", "local", "2001:db8::/64", "dev", "lo")
    remotes6 = round(remotes * mix / 100)
    sources = [str(ipaddress.IPv4Address(V4_BASE + i)) for i in range(remotes - remotes6)]
    sources6 = [str(ipaddress.IPv6Address(V6_BASE + i)) for i in range(remotes6)]
    farm = SocketFarm(f"/run/netns/{ns}")
    t0 = time.monotonic()
    farm.grow_to(size, sources or None, mix, sources6 or None)
    print(f"# {size} sockets, {mix}% IPv6, {remotes} sources: built in "
          f"{time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
    return farm


def timings(ns, trees, reps, rounds):
    """Each tree's dualmeasure.py timings, `reps` repetitions in all, in `rounds` processes
    per tree taken in the order ABBA... so that drift over the case (the machine's other
    tenants, the farm ageing) falls on every tree alike rather than on the one measured
    last."""
    rounds = max(1, min(rounds, reps))
    out = {name: None for name, _tree in trees}
    for r in range(rounds):
        share = reps // rounds + (r < reps % rounds)
        for name, tree in (trees if r % 2 == 0 else trees[::-1]):
            got = in_process(ns, tree, "time", share)
            if out[name] is None:
                out[name] = got
            else:
                for key, value in got.items():
                    if isinstance(value, list):
                        out[name][key] += value
    return out


def measure_case(size, remotes, mix, trees, reps, samples, parts=False, rounds=1):
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    farm = None
    try:
        farm = build(ns, size, remotes, mix)
        row = {"sockets_built": farm.sockets, "mix": mix, "remotes": remotes, "trees": {}}
        timed = timings(ns, trees, reps, rounds)
        for name, tree in trees:
            timing = timed[name]
            rss = in_process(ns, tree, "rss", 3)["rss_kb"] / 1024
            durations, hwm = exporter(ns, tree, samples) if samples else ([float("nan")], 0.0)
            med = statistics.median
            row["sockets"] = timing["sockets"]
            row["distinct"] = timing["distinct"]
            def paired(part, base):  # the median of each repetition's own ratio: drift
                # between repetitions (other tenants of the machine) cancels out
                return med(a / b for a, b in zip(timing[part], timing[base]))
            row["trees"][name] = {
                "tcp_ratio": paired("tcp", "tcp_floor"), "sample_ratio": paired("sample", "floor"),
                "sample_cpu_ratio": paired("sample_cpu", "floor_cpu"),
                "tcp_ratio_unmarked": paired("tcp", "tcp_floor_unmarked"),
                "plain_ratio": paired("tcp_plain", "tcp_floor"),
                "tcp_floor": med(timing["tcp_floor"]), "floor": med(timing["floor"]),
                "sample": med(timing["sample"]), "tcp": med(timing["tcp"]),
                "tcp_plain": med(timing["tcp_plain"]), "rss_mb": rss,
                "exporter_tcp": med(durations), "exporter_runs": durations,
                "exporter_rss_mb": hwm}
            if parts:
                split = in_process(ns, tree, None, reps, "dualparts.py")
                row["trees"][name]["parts"] = {
                    part: med(values) for part, values in split.items()}
                row["trees"][name]["parts"]["ratio"] = med(
                    (r + d + a + res) / f for r, d, a, res, f in zip(
                        split["receive"], split["decode"], split["add"], split["result"],
                        split["floor"]))
            print(json.dumps({"case": [size, remotes, mix], "tree": name,
                              **row["trees"][name]}), file=sys.stderr, flush=True)
        return row
    finally:
        if farm is not None:
            farm.close()
        subprocess.run(["ip", "netns", "del", ns], check=True)


def table(rows, names):
    head = ["sockets", "IPv6", "distinct (state, remote)"]
    for name in names:
        head += [f"{name}: default sample / floor (CPU time / floor's)",
                 f"{name}: tcp view / TCP floor (/ floor without the mark)",
                 f"{name}: exporter process, tcp / TCP floor", f"{name}: peak RSS"]
    head += ["tcp view without per-remote / TCP floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        cells = [f"{r['sockets']:,}", f"{r['mix']}%", f"{r['distinct']:,}"]
        for name in names:
            t = r["trees"][name]
            cells += [f"{t['sample'] * 1e3:.1f} / {t['floor'] * 1e3:.1f} ms: {t['sample_ratio']:.2f}"
                      f" (CPU {t['sample_cpu_ratio']:.2f})",
                      f"{t['tcp'] * 1e3:.1f} / {t['tcp_floor'] * 1e3:.1f} ms: {t['tcp_ratio']:.2f}"
                      f" ({t['tcp_ratio_unmarked']:.2f})",
                      f"{t['exporter_tcp'] * 1e3:.1f} ms = {t['exporter_tcp'] / t['tcp_floor']:.2f}",
                      f"{t['rss_mb']:.0f} / {t['exporter_rss_mb']:.0f} MB"]
        cells += [" ; ".join(f"{r['trees'][n]['plain_ratio']:.2f}" for n in names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parts_table(rows, names):
    head = ["sockets", "IPv6", "distinct (state, remote)"]
    for name in names:
        head += [f"{name}: floor / receive / decode / add / result (ms)",
                 f"{name}: read / floor", f"{name}: page faults per read"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        cells = [f"{r['sockets']:,}", f"{r['mix']}%", f"{r['distinct']:,}"]
        for name in names:
            p = r["trees"][name]["parts"]
            cells += [" / ".join(f"{p[k] * 1e3:.1f}" for k in
                                 ("floor", "receive", "decode", "add", "result")),
                      f"{p['ratio']:.2f}", f"{p['faults']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="100000:1000,100000:50000,200000:1000,200000:100000")
    parser.add_argument("--mixes", default="0,30,70")
    parser.add_argument("--trees", default=f"current={os.path.dirname(HERE)}",
                        help="NAME=PATH,...: source trees of the exporter to measure")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--exporter-samples", type=int, default=5)
    parser.add_argument("--parts", action="store_true",
                        help="also time a read part by part (bench/dualparts.py)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="split each tree's repetitions over this many processes, the "
                             "trees taken in turn (ABBA...)")
    args = parser.parse_args()
    trees = [tuple(t.split("=", 1)) for t in args.trees.split(",")]
    rows = []
    for case in args.cases.split(","):
        size, remotes = (int(x) for x in case.split(":"))
        for mix in (int(m) for m in args.mixes.split(",")):
            rows.append(measure_case(size, remotes, mix, trees, args.reps,
                                     args.exporter_samples, args.parts, args.rounds))
    print(table(rows, [name for name, _ in trees]))
    if args.parts:
        print()
        print(parts_table(rows, [name for name, _ in trees]))


if __name__ == "__main__":
    main()
