"""Per-remote and per-port counts on real sockets in private namespaces, against ss."""
from __future__ import annotations

import collections
import ipaddress
import json
import socket
import subprocess
import sys

import pytest

from exporter.aggregate import REMOTE_STATES, RemoteOptions
from exporter.views import build_registry
from exporter.sampler import Sampler, SocketReader
from exporter.sources.table import NETSTAT_STATES
from tests.conftest import new_netns
from tests.kernel import (A_ADDR, B_ADDR, connect_pair, listener, pin_neighbours,
                          send_spoofed_syns, veth_pair, wait_for)

pytestmark = pytest.mark.netns

ESTABLISHED = {"127.0.0.1": 26, "127.0.1.1": 9, "127.0.1.2": 7, "127.0.1.3": 5, "::1": 4,
               "127.0.2.1": 3, "127.0.1.4": 1, "127.0.1.5": 1}
SYN_RECV = {"198.18.100.1": 5, "198.18.100.2": 3, "198.18.101.7": 2}
TIME_WAIT = {"127.0.3.1": 4}


class Remotes:
    def __init__(self, ns):
        self.ns = ns
        self.keep: list[socket.socket] = []


@pytest.fixture(scope="module")
def remotes():
    """Clients from distinct 127.0.0.0/8 sources, IPv6 and IPv4-mapped peers, a server that
    closed first (TIME_WAIT on its side) and spoofed SYNs from 198.18.0.0/15."""
    a, b = new_netns(), new_netns()
    built = Remotes(a)
    try:
        veth_pair(a, b, f"{A_ADDR}/15", f"{B_ADDR}/15")
        pin_neighbours(a, "veth-a", list(SYN_RECV))
        with a.entered():
            v4 = listener(socket.AF_INET, "127.0.0.1", 7000, 256)
            dual = listener(socket.AF_INET6, "::", 7001, 64, dual_stack=True)
            syn_target = listener(socket.AF_INET, A_ADDR, 6000, 1024)
            built.keep += [v4, dual, syn_target]
            for source, count in (("127.0.1.1", 9), ("127.0.1.2", 7), ("127.0.1.3", 5),
                                  ("127.0.1.4", 1), ("127.0.1.5", 1)):
                for _ in range(count):
                    built.keep += connect_pair(v4, source)
            for _ in range(3):  # IPv4 client on a dual-stack listener: the server side is
                client = socket.socket()  # AF_INET6 with peer ::ffff:127.0.2.1
                client.bind(("127.0.2.1", 0))
                client.connect(("127.0.0.1", 7001))
                built.keep += [client, dual.accept()[0]]
            for _ in range(2):
                client = socket.socket(socket.AF_INET6)
                client.connect(("::1", 7001))
                built.keep += [client, dual.accept()[0]]
            for _ in range(4):  # the server closes first: TIME_WAIT on the server side
                client, server = connect_pair(v4, "127.0.3.1")
                server.close()
                assert client.recv(1) == b""
                client.close()
        with b.entered():
            sources = [s for s, n in SYN_RECV.items() for _ in range(n)]
            send_spoofed_syns(sources, A_ADDR, 6000)
        wait_for(lambda: a.ss_state_counts() == {"LISTEN": 3, "ESTABLISHED": 56, "TIME_WAIT": 4,
                                                 "SYN_RECV": 10}, what="remotes to settle")
        yield built
    finally:
        for sock in built.keep:
            sock.close()
        a.destroy()
        b.destroy()


def sample(ns, **options):
    with ns.entered():
        sampler = Sampler(SocketReader("netlink"), remote=RemoteOptions(**options))
        sampler.sample_once()
    return sampler


def ss_peers(ns) -> dict[str, collections.Counter]:
    by_state = collections.defaultdict(collections.Counter)
    for row in ns.ss_tcp():
        if row["state"] == "LISTEN":
            continue
        host = row["peer"].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
        by_state[row["state"]][host] += 1
    return by_state


def test_full_counts_per_state_equal_ss(remotes):
    counts = sample(remotes.ns).snapshot.results["tcp"].data.remote.counts
    peers = ss_peers(remotes.ns)
    assert peers["ESTABLISHED"] == ESTABLISHED and peers["SYN_RECV"] == SYN_RECV
    assert peers["TIME_WAIT"] == TIME_WAIT
    for state in REMOTE_STATES:
        name = NETSTAT_STATES[state]
        ours = {key.text(): n for key, n in counts.top((state,), 1000)}
        assert ours == dict(peers.get(name, {})), name


def test_metrics_top_n_other_and_sums(remotes):
    sampler = sample(remotes.ns, top=3)
    get = build_registry(lambda: sampler.snapshot, "test").get_sample_value
    est = {r: get("netstat_tcp_remote_connections", {"remote": r, "state": "ESTABLISHED"})
           for r in ("127.0.0.1", "127.0.1.1", "127.0.1.2", "127.0.1.3", "other")}
    assert est == {"127.0.0.1": 26, "127.0.1.1": 9, "127.0.1.2": 7, "127.0.1.3": None, "other": 14}
    assert get("netstat_tcp_remote_connections", {"remote": "198.18.100.1", "state": "SYN_RECV"}) == 5
    assert get("netstat_tcp_remote_connections", {"remote": "other", "state": "SYN_RECV"}) == 0
    assert get("netstat_tcp_remote_connections", {"remote": "127.0.3.1", "state": "TIME_WAIT"}) == 4
    tcp = sampler.snapshot.results["tcp"].data
    for state in REMOTE_STATES:
        name = NETSTAT_STATES[state]
        total = sum(v for (s, _r), v in tcp.remote.remote.items() if s == name)
        assert total == get("netstat_tcp_connections", {"state": name, "family": "ipv4"}) + \
            get("netstat_tcp_connections", {"state": name, "family": "ipv6"})
    ports = {(p, s): get("netstat_tcp_local_port_connections", {"port": p, "state": s})
             for p, s in (("7000", "ESTABLISHED"), ("7000", "TIME_WAIT"), ("7001", "ESTABLISHED"),
                          ("6000", "SYN_RECV"), ("other", "ESTABLISHED"))}
    assert ports == {("7000", "ESTABLISHED"): 23, ("7000", "TIME_WAIT"): 4,
                     ("7001", "ESTABLISHED"): 5, ("6000", "SYN_RECV"): 10,
                     ("other", "ESTABLISHED"): 0}
    assert get("netstat_exporter_series_truncated_total",
               {"metric": "netstat_tcp_remote_connections"}) == 0


def test_prefixes_filters_and_mask_on_real_sockets(remotes):
    remote = sample(remotes.ns, prefix_v4=24, prefix_v6=64).snapshot.results["tcp"].data.remote.remote
    assert remote[("SYN_RECV", "198.18.100.0/24")] == 8
    assert remote[("SYN_RECV", "198.18.101.0/24")] == 2
    assert remote[("ESTABLISHED", "127.0.1.0/24")] == 23
    assert remote[("ESTABLISHED", "::/64")] == 4
    loopback = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    remote = sample(remotes.ns, exclude=loopback).snapshot.results["tcp"].data.remote.remote
    assert remote[("ESTABLISHED", "excluded")] == 56 and remote[("ESTABLISHED", "other")] == 0
    assert remote[("SYN_RECV", "198.18.100.1")] == 5 and remote[("SYN_RECV", "excluded")] == 0
    masked = sample(remotes.ns, mask_key=b"secret").snapshot.results["tcp"].data.remote.remote
    assert not any(label[1].startswith(("127.", "198.")) for label in masked)
    assert sorted(v for (s, l), v in masked.items() if s == "SYN_RECV" and l != "other") == [2, 3, 5]


def cli(ns, *args):
    done = subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-m", "exporter",
                           "snapshot", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cli_answers_the_seed_recipes(remotes):
    # recipe 1: top remote IPs
    assert cli(remotes.ns, "--top", "5") == ("     26 127.0.0.1\n      9 127.0.1.1\n      7 127.0.1.2\n"
                                             "      5 127.0.1.3\n      5 198.18.100.1\n")
    # recipe 2: who holds TIME_WAIT
    assert cli(remotes.ns, "--state", "TIME_WAIT") == "      4 127.0.3.1\n"
    # recipe 3: who sends SYNs, exactly as netstat | awk | uniq -c | sort -nr prints it
    ours = cli(remotes.ns, "--state", "SYN_RECV", "--state", "SYN_SENT")
    recipe = remotes.ns.exec("sh", "-c", "netstat -an | grep SYN | awk '{print $5}' | "
                                         "awk -F: '{print $1}' | sort | uniq -c | sort -nr")
    assert ours == recipe == "      5 198.18.100.1\n      3 198.18.100.2\n      2 198.18.101.7\n"
    assert cli(remotes.ns, "--state", "SYN_RECV", "--remote.prefix-v4", "24") == \
        "      8 198.18.100.0/24\n      2 198.18.101.0/24\n"
    assert json.loads(cli(remotes.ns, "--state", "SYN_RECV", "--top", "1", "--json")) == \
        [{"count": 5, "remote": "198.18.100.1"}]
    masked = cli(remotes.ns, "--state", "SYN_RECV", "--remote.mask")
    assert [line.split()[0] for line in masked.splitlines()] == ["5", "3", "2"]
    assert "198.18" not in masked


@pytest.mark.netns
def test_client_side_time_wait_per_destination(netns_factory):
    """Connections we open and close first leave TIME_WAIT on our side, holding an ephemeral
    port toward one destination; server-side TIME_WAIT (closed first by our server) holds
    none and is not counted here."""
    from exporter.aggregate import RemoteOptions
    ns = netns_factory()
    with ns.entered():
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 7500))
        server.listen(64)
        for _ in range(6):  # we are the client and close first: client-side TIME_WAIT
            client = socket.create_connection(("127.0.0.1", 7500))
            accepted, _ = server.accept()
            client.close()
            accepted.close()
        for _ in range(4):  # our server closes first: TIME_WAIT on the listening port
            client = socket.create_connection(("127.0.0.1", 7500))
            accepted, _ = server.accept()
            accepted.close()
            client.close()
        wait_for(lambda: ns.ss_state_counts().get("TIME_WAIT") == 10, what="ten TIME_WAIT")
        snapshot = Sampler(SocketReader("netlink"), collectors=["tcp"],
                           remote=RemoteOptions()).sample_once()
        server.close()
    get = build_registry(lambda: snapshot, "t").get_sample_value
    assert get("netstat_tcp_client_time_wait", {"destination": "127.0.0.1:7500"}) == 6
    assert get("netstat_tcp_client_time_wait", {"destination": "other"}) == 0
    assert get("netstat_tcp_connections", {"state": "TIME_WAIT", "family": "ipv4"}) == 10


def test_many_ipv6_peers_and_mapped_ones_equal_ss(netns):
    """Real IPv6 peers from many addresses (2001:db8::/64 and 7f00:1::/64, whose first word
    reads like 127.0.1.0, routed `local` to lo), IPv4 peers and IPv4-mapped ones on a
    dual-stack listener: per-state counts equal ss's, and a /64 prefix folds them."""
    netns.sysctl("net.ipv6.ip_nonlocal_bind", "1")
    for prefix in ("2001:db8::/64", "7f00:1::/64"):
        netns.ip("-6", "route", "add", "local", prefix, "dev", "lo")
    keep: list[socket.socket] = []
    try:
        with netns.entered():
            six = listener(socket.AF_INET6, "::1", 7100, 512)
            dual = listener(socket.AF_INET6, "::", 7101, 512, dual_stack=True)
            four = listener(socket.AF_INET, "127.0.0.1", 7102, 512)
            keep += [six, dual, four]
            for n in range(1, 41):
                for _ in range(n % 4 + 1):
                    keep += connect_pair(six, f"2001:db8::1:{n:x}")
                keep += connect_pair(six, f"7f00:1::{n:x}")
            for n in range(1, 11):  # IPv4 clients of the dual-stack listener: mapped peers
                for _ in range(n % 3 + 1):
                    client = socket.socket()
                    client.bind((f"127.0.6.{n}", 0))
                    client.connect(("127.0.0.1", 7101))
                    keep += [client, dual.accept()[0]]
                keep += connect_pair(four, f"127.0.6.{n}")
        counts = sample(netns).snapshot.results["tcp"].data.remote.counts
        peers = ss_peers(netns)
        assert sum(peers["ESTABLISHED"].values()) == len(keep) - 3
        for state in REMOTE_STATES:
            name = NETSTAT_STATES[state]
            ours = {key.text(): n for key, n in counts.top((state,), 10**6)}
            assert ours == dict(peers.get(name, {})), name
        folded = sample(netns, prefix_v6=64, prefix_v4=24).snapshot.results["tcp"].data.remote
        est = {label: n for (state, label), n in folded.remote.items() if state == "ESTABLISHED"}
        assert est["2001:db8::/64"] == sum(n % 4 + 1 for n in range(1, 41))
        assert est["7f00:1::/64"] == 40
        assert est["127.0.6.0/24"] == sum(n % 3 + 1 for n in range(1, 11)) + 10
    finally:
        for sock in keep:
            sock.close()
