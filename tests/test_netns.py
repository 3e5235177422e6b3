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
        # a namespace only a process holds is named after its program (or its container),
        # never its pid: the label survives a restart
        labels = {k[0] for k in snapshot.results["netns"].data.connections}
        assert not any(str(holder.pid) in label for label in labels)
        comm = open(f"/proc/{holder.pid}/comm").read().strip()
        assert get("netstat_netns_tcp_connections", {"netns": f"comm:{comm}",
                                                     "state": "ESTABLISHED"}) >= 4
        assert get("netstat_netns_failed") == 0
        assert get("netstat_netns_namespaces") >= 3
    finally:
        for sock in keep:
            sock.close()
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("cgroup, label", [
    ("0::/system.slice/docker-" + "4b1c" * 16 + ".scope\n", "container:4b1c4b1c4b1c"),
    ("12:pids:/docker/" + "ab" * 32 + "\n", "container:abababababab"),
    ("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1f2e3d4c_aaaa_bbbb_"
     "cccc_000000000001.slice/cri-containerd-" + "9" * 64 + ".scope\n",
     "pod:1f2e3d4c-aaaa-bbbb-cccc-000000000001"),
    ("11:memory:/kubepods/burstable/pod1f2e3d4c-aaaa-bbbb-cccc-000000000002/" + "c" * 64 + "\n",
     "pod:1f2e3d4c-aaaa-bbbb-cccc-000000000002"),
    ("0::/machine.slice/libpod-" + "d" * 64 + ".scope\n", "container:dddddddddddd"),
    ("0::/system.slice/crio-" + "e" * 64 + ".scope\n", "container:eeeeeeeeeeee"),
    ("0::/user.slice/user-0.slice/session-3.scope\n", None),
])
def test_container_and_pod_labels_from_cgroups(cgroup, label):
    from exporter.sources.netns import container_label
    assert container_label(cgroup) == label


def test_a_namespace_named_other_is_not_the_bucket():
    """`ip netns add other`: its label merged with the bucket of the rest (found in review)."""
    per = {"other": counts(ESTABLISHED=50), "a": counts(ESTABLISHED=5),
           "b": counts(ESTABLISHED=7)}
    one = summarize_namespaces(per, top=1).connections
    assert (one[("netns/other", "ESTABLISHED")], one[(OTHER, "ESTABLISHED")]) == (50, 12)
    five = summarize_namespaces(per, top=5).connections
    assert (five[("netns/other", "ESTABLISHED")], five[(OTHER, "ESTABLISHED")]) == (50, 0)


def test_one_failing_namespace_leaves_the_others_counted():
    per = {"a": counts(ESTABLISHED=2)}
    summary = summarize_namespaces(per, top=5, failed=1)
    assert summary.failed == 1 and summary.connections[("a", "ESTABLISHED")] == 2


@pytest.mark.netns
def test_a_holder_whose_pid_is_taken_over_is_not_read(netns_factory, tmp_path, monkeypatch):
    """Between finding a namespace by its holder's /proc/PID/ns/net and entering it, the
    holder may exit and a process of another namespace (the host's) take its pid: the walk
    must not read that one under the first one's label (found in review)."""
    import os
    from exporter.sources import netns as netns_source
    a = netns_factory()
    (tmp_path / "4242" / "ns").mkdir(parents=True)
    (tmp_path / "4242" / "cgroup").write_text("0::/\n")
    (tmp_path / "4242" / "comm").write_text("holder\n")
    link = tmp_path / "4242" / "ns" / "net"
    os.symlink(f"/run/netns/{a.name}", link)
    os.symlink("/proc/thread-self", tmp_path / "thread-self")  # our own: not walked
    found_first = netns_source.discover

    def discover(procfs, named_dirs=()):
        found = found_first(procfs, ())
        link.unlink()  # the holder exits; a host process takes pid 4242
        os.symlink("/proc/self/ns/net", link)
        return found
    monkeypatch.setattr(netns_source, "discover", discover)
    results, unreadable, errors = netns_source.walk(
        str(tmp_path), lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    assert (results, unreadable, errors) == ([], 1, [])


@pytest.mark.netns
def test_walk_isolates_a_namespace_whose_read_fails(netns_factory):
    import errno
    from exporter.sources import netns as netns_source
    a, b = netns_factory(), netns_factory()
    calls = []

    def read():
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EIO, "interrupted once too often")
        return "read"
    found, _unreadable, errors = netns_source.walk("/proc", read)
    mine = [label for label, _ in found if label in (a.name, b.name)]
    assert len(errors) == 1 and "interrupted once too often" in errors[0]
    assert len(found) == len(calls) - 1 and all(result == "read" for _l, result in found)
    assert len(mine) >= 1  # the walk went on past the failure
