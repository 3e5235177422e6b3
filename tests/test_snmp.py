"""netstat -s: fixtures from three kernels, golden output, types, live counters, bad input."""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from prometheus_client import generate_latest

from exporter.views import build_registry
from exporter.collectors.snmp import GAUGES, metric_for, snake
from exporter.sampler import Sampler, SocketReader
from exporter.sources import snmp, sockstat
from tests.conftest import unavailable
from tests.kernel import read_blocks, wait_for

KERNELS = Path(__file__).parent / "fixtures" / "kernels"
GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def sample(procfs):
    sampler = Sampler(SocketReader("proc", procfs=str(procfs)), collectors=["snmp", "sockstat"])
    return sampler.sample_once()


def render(snapshot, **options) -> str:
    registry = build_registry(lambda: snapshot, "golden", **options)
    lines = generate_latest(registry).decode().splitlines(keepends=True)
    # the exporter's own timing and build metrics vary from run to run
    return "".join(l for l in lines if "netstat_exporter_" not in l)


def test_worked_examples():
    pairs = list(snmp.parse_pairs(["Tcp: RtoAlgorithm RtoMin\n", "Tcp: 1 200\n"]))
    assert pairs == [("Tcp", "RtoAlgorithm", 1), ("Tcp", "RtoMin", 200)]
    assert list(snmp.parse_snmp6(["Ip6InReceives   \t1\n", "Icmp6OutType143 7\n"])) == [
        ("Ip6", "InReceives", 1), ("Icmp6", "OutType143", 7)]
    assert list(sockstat.parse(["TCP: inuse 5 orphan 0 tw 2\n"])) == [
        ("TCP", "inuse", 5), ("TCP", "orphan", 0), ("TCP", "tw", 2)]
    assert metric_for("TcpExt", "ListenOverflows") == ("counter", "tcpext_listen_overflows", 1)
    assert metric_for("Tcp", "RetransSegs") == ("counter", "tcp_retrans_segs", 1)
    assert metric_for("Ip6", "InReceives") == ("counter", "ip6_in_receives", 1)
    assert metric_for("Tcp", "RtoMin") == ("gauge", "tcp_rto_min_seconds", 0.001)
    assert metric_for("Tcp", "CurrEstab") == ("gauge", "tcp_curr_estab", 1)
    assert snake("TCPReqQFullDoCookies") == "tcp_req_q_full_do_cookies"
    assert snake("MPJoinSynAckHMacFailure") == "mp_join_syn_ack_hmac_failure"


@pytest.mark.parametrize("kernel", sorted(p.name for p in KERNELS.iterdir() if p.is_dir()))
def test_golden_output_and_promtool(kernel):
    snapshot = sample(KERNELS / kernel / "proc")
    assert snapshot.results["snmp"].ok and snapshot.results["sockstat"].ok
    text = render(snapshot)
    golden = GOLDEN / f"snmp-{kernel}.prom"
    if UPDATE:
        golden.write_text(text)
    assert text == golden.read_text(), f"run with UPDATE_GOLDEN=1 to accept changes to {golden}"
    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("promtool is not installed (Debian package 'prometheus')")
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_kernel_differences_are_visible():
    new = render(sample(KERNELS / "linux-6.18" / "proc"))
    old = render(sample(KERNELS / "linux-4.19-noipv6" / "proc"))
    assert "netstat_mptcpext_mp_curr_estab " in new and "netstat_mptcpext" not in old
    assert "netstat_ip6_in_receives_total" in new and "netstat_ip6_" not in old
    assert 'netstat_sockstat_sockets_in_use{protocol="tcp6"}' not in old
    assert "netstat_tcpext_listen_overflows_total 0.0" in old


def test_types_names_and_units():
    text = render(sample(KERNELS / "linux-6.18" / "proc"))
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE"))
    for name, kind in types.items():
        assert name.endswith("_total") == (kind == "counter"), name
        assert f"\n{name} " in text or f"\n{name}{{" in text, name
    for (group, field), _unit in GAUGES.items():
        kind, name, _scale = metric_for(group, field)
        assert types["netstat_" + name] == "gauge"
    assert "netstat_tcp_rto_min_seconds 0.2\n" in text
    assert "netstat_tcp_rto_max_seconds 120.0\n" in text
    assert "netstat_tcp_max_conn -1.0\n" in text
    assert "netstat_ip_forwarding 2.0\n" in text
    assert types["netstat_tcpext_listen_overflows_total"] == "counter"
    assert 'netstat_sockstat_memory_pages{protocol="tcp"} 2199.0' in text
    snapshot = sample(KERNELS / "linux-6.18" / "proc")
    get = build_registry(lambda: snapshot, "t").get_sample_value
    assert get("netstat_sockstat_memory_bytes", {"protocol": "tcp"}) == 2199 * os.sysconf("SC_PAGE_SIZE")
    assert get("netstat_sockstat_tcp_mem_limit_pages", {"level": "pressure"}) == 383868
    assert 'netstat_sockstat_tcp_mem_limit_pages{level="max"}' in text
    assert "netstat_sockstat_tcp_max_orphans " in text
    stats = snmp.read(str(KERNELS / "linux-6.18" / "proc"))
    exported = sum(len(f) for f in stats.values())
    assert sum(1 for l in text.splitlines() if l.startswith("# TYPE netstat_") and "sockstat" not in l) == exported


def test_field_filter_and_unknown_fields(tmp_path):
    root = tmp_path / "proc"
    shutil.copytree(KERNELS / "linux-6.18" / "proc", root)
    with open(root / "net" / "netstat", "a") as stream:
        stream.write("FutureExt: BrandNewCounter TCPThing\nFutureExt: 41 7\n")
    snapshot = sample(root)
    text = render(snapshot)
    assert "# TYPE netstat_futureext_brand_new_counter_total counter" in text
    assert "netstat_futureext_tcp_thing_total 7.0" in text
    assert "netstat_futureext_brand_new_counter_total 41.0" in text
    limited = render(snapshot, snmp_fields=re.compile(r"TcpExt_Listen.*|Tcp_CurrEstab"))
    names = {l.split()[2] for l in limited.splitlines() if l.startswith("# TYPE") and "sockstat" not in l}
    assert names == {"netstat_tcpext_listen_overflows_total", "netstat_tcpext_listen_drops_total",
                     "netstat_tcp_curr_estab"}


@pytest.mark.parametrize("name, text, message", [
    ("snmp", "Tcp: A B\nTcp: 1\n", "2 fields but 1 values"),
    ("snmp", "Tcp: A B\nUdp: 1 2\n", "follow the header"),
    ("snmp", "Tcp: A B\nTcp: 1 x\n", ":2: B: not a decimal integer"),
    ("snmp", "Tcp: A B\nTcp: 1 -5\n", ":2: B: -5 is out of range 0.."),  # a negative counter
    ("snmp", "Tcp: A MaxConn\nTcp: 1 -1\n", None),  # MaxConn is -1 when unlimited
    ("snmp", "Tcp: A B\nTcp: 1 1_000\n", ":2: B: not a decimal integer"),
    ("snmp", "Tcp: A B\nTcp: 1 " + "9" * 400 + "\n", ":2: B: not a decimal integer"),
    ("snmp", "Tcp: A B\nTcp: 1 18446744073709551616\n", "out of range"),  # 2**64
    ("snmp", "Tcp: A B\nTcp: 1 2\nTcp: A\nTcp: 3\n", "Tcp A appears twice"),
    ("sockstat", "TCP: inuse 99999999999999999999999\n", ":1: inuse: "),
    ("snmp", "Tcp: A B\n", "truncated read"),
    ("snmp", "garbage\n", "expected 'Group: ...'"),
    ("snmp6", "Ip6InReceives\n", "expected 'Name6Field value'"),
    ("snmp6", "Ip6InReceives 1 2\n", "expected 'Name6Field value'"),
    ("sockstat", "TCP: inuse\n", "expected 'PROTO: key value ...'"),
])
def test_malformed_files_fail_the_collector_with_file_and_line(tmp_path, name, text, message):
    root = tmp_path / "proc"
    shutil.copytree(KERNELS / "linux-6.18" / "proc", root)
    (root / "net" / name).write_text(text)
    snapshot = sample(root)
    source = "sockstat" if name == "sockstat" else "snmp"
    result = snapshot.results[source]
    if message is None:
        assert result.ok
        render(snapshot)  # and it renders
        return
    assert not result.ok and message in result.error and str(root / "net" / name) in result.error
    render(snapshot)  # the other collectors still render: no value that cannot be rendered
    other = snapshot.results["sockstat" if source == "snmp" else "snmp"]
    assert other.ok  # the rest is unaffected


def test_missing_files(tmp_path):
    root = tmp_path / "proc"
    shutil.copytree(KERNELS / "linux-6.18" / "proc", root)
    (root / "net" / "netstat").unlink()
    shutil.rmtree(root / "sys")
    snapshot = sample(root)
    assert not snapshot.results["snmp"].ok and "No such file" in snapshot.results["snmp"].error
    text = render(snapshot)
    assert "\nnetstat_sockstat_tcp_max_orphans " not in text  # absent, not zero
    assert "netstat_sockstat_sockets_used 37.0" in text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="TcpUdIx6: 0123456789-\n\tAB", max_size=200),
       st.sampled_from(["snmp", "netstat", "snmp6", "sockstat", "sockstat6"]))
def test_arbitrary_content_never_crashes_the_sample(tmp_path_factory, text, name):
    root = tmp_path_factory.mktemp("proc")
    shutil.copytree(KERNELS / "linux-6.18" / "proc", root, dirs_exist_ok=True)
    (root / "net" / name).write_text(text)
    snapshot = sample(root)
    for result in snapshot.results.values():
        # a failure is one of our parse errors, naming the file (not an IndexError & co.)
        assert result.ok or str(root / "net" / name) in result.error, result.error
    render(snapshot)  # whatever parsed renders


@pytest.mark.netns
def test_live_counters_move_by_exactly_what_was_done(netns):
    """In a fresh namespace every counter starts at 0: connect, refuse, overflow a listener."""
    with netns.entered():
        keep = []
        server = socket.socket()
        server.bind(("127.0.0.1", 7100))
        server.listen(1)  # the accept queue holds backlog + 1 = 2, never accepted
        keep.append(server)
        for _ in range(2):
            keep.append(socket.create_connection(("127.0.0.1", 7100)))
        for _ in range(3):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", 7199))
        for _ in range(4):  # queue full: each SYN is dropped and counted once (the first
            late = socket.socket()  # retransmission comes after 1 s; we read before that)
            late.setblocking(False)
            assert late.connect_ex(("127.0.0.1", 7100)) == errno.EINPROGRESS
            keep.append(late)
        sampler = Sampler(SocketReader("netlink", procfs="/proc/thread-self"))
        # each of the four SYNs is dropped when the kernel handles it: wait for all four
        wait_for(lambda: sampler.sample_once().results["snmp"].data["TcpExt"]["ListenOverflows"]
                 >= 4, timeout=0.9, what="four dropped SYNs")
        snapshot = sampler.snapshot
        for sock in keep:
            sock.close()
    get = build_registry(lambda: snapshot, "t").get_sample_value
    assert get("netstat_tcpext_listen_overflows_total") == 4
    assert get("netstat_tcpext_listen_drops_total") == 4
    assert get("netstat_tcp_active_opens_total") == 2 + 3 + 4
    assert get("netstat_tcp_passive_opens_total") == 2
    assert get("netstat_tcp_attempt_fails_total") == 3
    assert get("netstat_tcp_out_rsts_total") == 3
    assert get("netstat_tcp_curr_estab") == 4
    # hashed TCP sockets: the listener, 2 clients, 2 queued children, 4 in SYN_SENT
    assert get("netstat_sockstat_sockets_in_use", {"protocol": "tcp"}) == 9


@pytest.mark.netns
def test_cli_statistics_grouped_like_netstat_s(netns):
    import signal
    import sys
    done = subprocess.run(["ip", "netns", "exec", netns.name, sys.executable, "-m", "exporter",
                           "snapshot", "-s"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "\nTcp:\n    RtoAlgorithm 1\n    RtoMin 200\n" in done.stdout
    assert "\nTcpExt:\n    SyncookiesSent 0\n" in done.stdout
    assert done.stdout.startswith("Ip:\n    Forwarding ")
    proc = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-m", "exporter",
                             "snapshot", "-s", "--watch", "0.3"], stdout=subprocess.PIPE, text=True)
    head = read_blocks(proc, 3)  # the third block has begun: two are whole
    proc.send_signal(signal.SIGINT)
    out = head + proc.stdout.read()  # through the same buffer read_blocks used
    proc.wait(10)
    blocks = [b for b in out.split("# ") if b]
    assert len(blocks) >= 2
    assert "    ActiveOpens 0 (+0.0/s)\n" in blocks[1]
    assert "    RtoMin 200\n" in blocks[1]  # a gauge: no rate
