"""`netstat-exporter snapshot`: the seed's first recipe, answered from the same sample."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import pytest

from tests.kernel import read_blocks, read_lines


pytestmark = pytest.mark.netns


def snapshot(ns, *args):
    return subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-m", "exporter",
                           "snapshot", *args], capture_output=True, text=True, timeout=30)


def test_snapshot_prints_state_counts_like_the_awk_recipe(mix):
    done = snapshot(mix.ns)
    assert done.returncode == 0, done.stderr
    # netstat -ant | awk '/^tcp/ {++S[$NF]} END {for(a in S) print a, S[a]}', sorted by count
    assert done.stdout == ("ESTABLISHED 15\nSYN_RECV 7\nFIN_WAIT2 5\nTIME_WAIT 5\n"
                           "CLOSE_WAIT 4\nLISTEN 4\nSYN_SENT 2\nFIN_WAIT1 1\nLAST_ACK 1\n")
    awk = mix.ns.exec("sh", "-c", "netstat -ant | awk '/^tcp/ {++S[$NF]} END {for(a in S) print a, S[a]}'")
    assert sorted(awk.split("\n")) == sorted(done.stdout.split("\n"))


def test_snapshot_json_has_every_state_and_the_listeners(mix):
    done = snapshot(mix.ns, "--json", "--collector.sockets.source=proc")
    document = json.loads(done.stdout)
    assert document["tcp"]["states"] == {**dict.fromkeys(document["tcp"]["states"], 0),
                                         **mix.totals()}
    assert len(document["tcp"]["states"]) == 11
    assert document["tcp"]["by_family"]["ESTABLISHED"] == {"ipv4": 11, "ipv6": 4}
    assert {l["port"] for l in document["tcp"]["listeners"]} == {5000, 5001, 5002, 6000}
    assert document["sources"] == {"tcp": "proc", "udp": "proc"}


def test_watch_repeats_until_interrupted(mix):
    proc = subprocess.Popen(["ip", "netns", "exec", mix.ns.name, sys.executable, "-m", "exporter",
                             "snapshot", "--watch", "0.2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    head = read_blocks(proc, 4)  # the fourth block has begun: three are whole
    proc.send_signal(signal.SIGINT)
    out = head + proc.stdout.read()  # through the same buffer read_blocks used
    assert proc.wait(10) == 0
    err = proc.stderr.read()
    assert proc.returncode == 0 and "Traceback" not in err
    blocks = [b for b in out.split("# ") if b]
    assert len(blocks) >= 3
    assert all("ESTABLISHED 15\n" in b for b in blocks)


def test_a_table_is_not_cut_by_the_series_budget_and_json_says_what_was_cut(mix):
    """--series.limit bounds series, not a table's rows: set for the exporter (its
    environment variable, in its container) it cut `snapshot -l` to fewer listeners, and the
    footer blamed --listen.limit; JSON lists cut by --listen.limit said nothing (found in
    review)."""
    import os
    done = subprocess.run(["ip", "netns", "exec", mix.ns.name, sys.executable, "-m", "exporter",
                           "snapshot", "-l"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "NETSTAT_EXPORTER_SERIES_LIMIT": "28"})
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1 + 4 and "more" not in done.stdout
    listed = json.loads(snapshot(mix.ns, "-l", "--json", "--listen.limit", "2").stdout)
    assert len(listed["listeners"]) == 2 and listed["total"] == 4
    document = json.loads(snapshot(mix.ns, "--json", "--listen.limit", "2").stdout)
    assert len(document["tcp"]["listeners"]) == 2 and document["tcp"]["listeners_total"] == 4


def test_watch_with_json_prints_one_document_per_line(mix):
    """A "# <time>" heading before each JSON document made the stream invalid JSON (found
    in review): with --json every line is a document."""
    proc = subprocess.Popen(["ip", "netns", "exec", mix.ns.name, sys.executable, "-m", "exporter",
                             "snapshot", "--json", "--watch", "0.2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = read_lines(proc, 3)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    documents = [json.loads(line) for line in lines]
    assert all(d["tcp"]["states"]["ESTABLISHED"] == 15 for d in documents)
    assert len({d["taken_at"] for d in documents}) == 3


def test_listeners_and_udp(mix):
    done = snapshot(mix.ns, "-l")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["Recv-Q", "Send-Q", "Local", "Address"]
    assert lines[1:] == ["     0     64 127.0.0.1:5000", "     0     64 [::1]:5001",
                         "     2      7 127.0.0.1:5002", "     0   1024 198.18.0.1:6000"]
    proc = snapshot(mix.ns, "-l", "--collector.sockets.source=proc")
    assert "     2      - 127.0.0.1:5002" in proc.stdout  # /proc cannot tell the backlog
    done = snapshot(mix.ns, "-u")
    assert done.returncode == 0 and "ipv4 unconnected 0\n" in done.stdout
