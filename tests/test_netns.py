"""TCP states per network namespace (--collector.netns), seen from outside them."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from exporter.aggregate import OTHER, summarize_namespaces
from exporter.views import build_registry
from exporter.sampler import Sampler, SocketReader
from exporter.sources.table import NETSTAT_STATES
from tests.kernel import connect_pair, listener, wait_for

STATES = list(NETSTAT_STATES.values())


def counts(**nonzero):
    return {state: nonzero.get(state, 0) for state in STATES}


def test_top_n_other_and_hysteresis():
    per = {"a": counts(ESTABLISHED=10), "b": counts(ESTABLISHED=9, LISTEN=1), "c": counts(LISTEN=2)}
    first = summarize_namespaces(per, top=1)
    assert first.connections[("a", "ESTABLISHED")] == 10
    assert first.connections[(OTHER, "ESTABLISHED")] == 9 and first.connections[(OTHER, "LISTEN")] == 3
    # b now leads by one: a keeps its place (hysteresis), sums stay exact
    second = summarize_namespaces({**per, "b": counts(ESTABLISHED=11)}, top=1, previous=first)
    assert ("a", "ESTABLISHED") in second.connections and ("b", "ESTABLISHED") not in second.connections
    for state in STATES:
        assert sum(v for (_n, s), v in second.connections.items() if s == state) == \
            10 * (state == "ESTABLISHED") + 11 * (state == "ESTABLISHED") + 2 * (state == "LISTEN")


HOLDER = """
import socket, sys, time
server = socket.socket(); server.bind(("127.0.0.1", 7400)); server.listen(8)
pairs = [(socket.create_connection(("127.0.0.1", 7400)), server.accept()[0]) for _ in range(2)]
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.netns
def test_named_and_process_namespaces_are_counted_from_outside(netns_factory):
    a, b = netns_factory(), netns_factory()
    keep = []
    holder = subprocess.Popen(["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {sys.executable} -c '{HOLDER}'"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with a.entered():
            server = listener(socket.AF_INET, "127.0.0.1", 7000, 16)
            keep.append(server)
            for _ in range(3):
                keep += connect_pair(server)
        with b.entered():
            server = listener(socket.AF_INET6, "::1", 7001, 16)
            keep.append(server)
            client, accepted = connect_pair(server)
            client.shutdown(socket.SHUT_WR)  # CLOSE_WAIT on the accepted side
            keep += [client, accepted]
        wait_for(lambda: b.ss_state_counts() == {"LISTEN": 1, "CLOSE_WAIT": 1, "FIN_WAIT2": 1},
                 what="CLOSE_WAIT and FIN_WAIT2 to settle")
        sampler = Sampler(SocketReader("netlink"), collectors=["netns"], namespaces=1000)
        snapshot = sampler.sample_once()
        assert snapshot.results["netns"].ok, snapshot.results["netns"].error
        get = build_registry(lambda: snapshot, "t").get_sample_value
        for state in STATES:
            expected_a = {"LISTEN": 1, "ESTABLISHED": 6}.get(state, 0)
            expected_b = {"LISTEN": 1, "CLOSE_WAIT": 1, "FIN_WAIT2": 1}.get(state, 0)
            assert get("netstat_netns_tcp_connections", {"netns": a.name, "state": state}) == expected_a
            assert get("netstat_netns_tcp_connections", {"netns": b.name, "state": state}) == expected_b
        held = f"pid:{holder.pid}:"
        labels = {k[0] for k in snapshot.results["netns"].data.connections}
        (name,) = [label for label in labels if label.startswith(held)]
        assert get("netstat_netns_tcp_connections", {"netns": name, "state": "ESTABLISHED"}) == 4
        assert get("netstat_netns_namespaces") >= 3
    finally:
        for sock in keep:
            sock.close()
        holder.kill()
        holder.wait()
