"""The known socket mix in a private namespace: exact counts, cross-checked against ss, and
netlink and /proc agreeing row for row."""
from __future__ import annotations

import collections
import socket
import struct

import pytest

from exporter.views import build_registry
from exporter.sampler import Sampler, SocketReader
from exporter.sources import proc_sockets, sockdiag
from exporter.sources.table import NETSTAT_STATES, SocketTable, TcpState

pytestmark = pytest.mark.netns
STATES = list(NETSTAT_STATES.values())


def sample_in(ns, source="auto", **options):
    with ns.entered():
        sampler = Sampler(SocketReader(source, procfs="/proc/thread-self"), **options)
        return sampler.sample_once()


@pytest.mark.parametrize("source", ["netlink", "proc"])
def test_state_counts_are_exact_and_match_ss(mix, source):
    snapshot = sample_in(mix.ns, source)
    tcp = snapshot.results["tcp"]
    assert tcp.ok, tcp.error
    expected = {(state, fam): mix.expected.get((state, fam), 0)
                for state in STATES for fam in ("ipv4", "ipv6")}
    assert dict(tcp.data.connections) == expected  # all 22 pairs, zeros included
    ss_counts = mix.ns.ss_state_counts()
    assert {s: n for s, n in tcp.data.state_totals().items() if n} == ss_counts
    assert snapshot.socket_sources["tcp"] == source


def test_queue_sums_and_listeners_match_ss(mix):
    snapshot = sample_in(mix.ns, "netlink")
    tcp = snapshot.results["tcp"].data
    ss_rows = mix.ns.ss_tcp()
    for state in STATES:
        if state == "LISTEN":
            continue
        rows = [r for r in ss_rows if r["state"] == state]
        assert tcp.queue_bytes[(state, "receive")] == sum(r["recv_q"] for r in rows), state
        assert tcp.queue_bytes[(state, "send")] == sum(r["send_q"] for r in rows), state
    assert tcp.queue_bytes[("FIN_WAIT1", "send")] > 0  # the FIN really waits behind data
    listeners = {(l.address, l.port): (l.queue_length, l.backlog) for l in tcp.listeners}
    assert listeners == {("127.0.0.1", 5002): (2, 7), ("127.0.0.1", 5000): (0, 64),
                         ("::1", 5001): (0, 64), ("198.18.0.1", 6000): (0, 1024)}
    # fullest queue first
    assert (tcp.listeners[0].address, tcp.listeners[0].port) == ("127.0.0.1", 5002)
    ss_listen = {(r["local"].rsplit(":", 1)[0].strip("[]"), int(r["local"].rsplit(":", 1)[1])):
                 (r["recv_q"], r["send_q"]) for r in ss_rows if r["state"] == "LISTEN"}
    assert listeners == ss_listen


def test_proc_source_reports_no_backlog(mix):
    tcp = sample_in(mix.ns, "proc").results["tcp"].data
    assert {(l.port, l.queue_length, l.backlog) for l in tcp.listeners} == {
        (5000, 0, None), (5001, 0, None), (5002, 2, None), (6000, 0, None)}


def test_listen_limit_caps_listeners_fullest_first(mix):
    tcp = sample_in(mix.ns, "netlink", listen_limit=2).results["tcp"].data
    assert tcp.listeners_total == 4
    assert [(l.port, l.queue_length) for l in tcp.listeners] == [(5002, 2), (5000, 0)]


def test_netlink_and_proc_tables_are_identical(mix):
    with mix.ns.entered():
        for proto, name in ((socket.IPPROTO_TCP, "tcp"), (socket.IPPROTO_UDP, "udp")):
            if name == "udp":
                keep = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
                        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM),
                        socket.socket(socket.AF_INET, socket.SOCK_DGRAM)]
                keep[0].bind(("127.0.0.1", 5353))
                keep[1].bind(("::1", 0))
                keep[2].connect(("127.0.0.1", 5353))
                keep[2].send(b"datagram")
                family_dumps = [sockdiag.dump(proto, f) for f in (socket.AF_INET, socket.AF_INET6)]
                netlink = SocketTable.concat([t for d in family_dumps for t in d])
            else:
                netlink = SocketTable.concat(list(sockdiag.dump(proto)))
            proc = SocketTable.concat(list(proc_sockets.read(proto, "/proc/thread-self")))
            listen = TcpState.LISTEN if name == "tcp" else -1

            def comparable(table, listen=listen):
                # /proc cannot show a listener's backlog (Send-Q); everything else must match
                return sorted(row if row[1] != listen else row[:7] + (None,) + row[8:]
                              for row in table.rows())

            assert len(netlink) == len(proc) > 0
            assert comparable(netlink) == comparable(proc)
        assert collections.Counter(r[1] for r in netlink.rows()) == {7: 2, 1: 1}


def test_metrics_carry_the_exact_counts(mix):
    with mix.ns.entered():
        sampler = Sampler(SocketReader("netlink"))
        sampler.sample_once()
    registry = build_registry(lambda: sampler.snapshot, "test")
    get = registry.get_sample_value
    for state in STATES:
        for fam in ("ipv4", "ipv6"):
            assert get("netstat_tcp_connections", {"state": state, "family": fam}) == \
                mix.expected.get((state, fam), 0), (state, fam)
        assert get("netstat_tcp_connections_peak", {"state": state}) == mix.totals().get(state, 0)
    assert get("netstat_tcp_listen_queue_length", {"address": "127.0.0.1", "port": "5002"}) == 2
    assert get("netstat_tcp_listen_backlog", {"address": "127.0.0.1", "port": "5002"}) == 7
    assert get("netstat_tcp_listeners") == 4
    assert get("netstat_exporter_sockets_scanned", {"protocol": "tcp"}) == sum(mix.totals().values())
    assert get("netstat_exporter_collector_success", {"collector": "tcp"}) == 1
    assert get("netstat_exporter_collector_success", {"collector": "udp"}) == 1
    assert get("netstat_udp_sockets", {"family": "ipv4", "state": "unconnected"}) == 0


def test_syn_recv_dump_filtered_by_state(mix):
    with mix.ns.entered():
        mask = (1 << TcpState.SYN_RECV) | (1 << TcpState.CLOSE_WAIT)
        table = SocketTable.concat(list(sockdiag.dump(socket.IPPROTO_TCP, states=mask)))
    assert collections.Counter(table.state.tolist()) == {TcpState.SYN_RECV: 7, TcpState.CLOSE_WAIT: 4}
    remotes = sorted(r[4] for r in table.rows() if r[1] == TcpState.SYN_RECV)
    assert remotes == [f"198.18.100.{i}" for i in range(1, 8)]


@pytest.mark.netns
def test_scoped_ipv6_listeners_are_two_listeners_with_their_zones(netns):
    """fe80::1%a1 and fe80::1%a2 on one port, backlogs 50 and 5: two series, each with its
    own backlog (not one fe80::1 with 55)."""
    for dev, peer in (("a1", "b1"), ("a2", "b2")):
        netns.ip("link", "add", dev, "type", "veth", "peer", "name", peer)
        netns.ip("link", "set", dev, "up")
        netns.ip("link", "set", peer, "up")
        netns.ip("addr", "add", "fe80::1/64", "dev", dev, "nodad")
    keep = []
    with netns.entered():
        for dev, backlog in (("a1", 50), ("a2", 5)):
            sock = socket.socket(socket.AF_INET6)
            sock.bind(("fe80::1", 8080, 0, socket.if_nametoindex(dev)))
            sock.listen(backlog)
            keep.append(sock)
        snapshot = Sampler(SocketReader("netlink"), collectors=["tcp"]).sample_once()
    try:
        get = build_registry(lambda: snapshot, "t").get_sample_value
        assert get("netstat_tcp_listen_backlog", {"address": "fe80::1%a1", "port": "8080"}) == 50
        assert get("netstat_tcp_listen_backlog", {"address": "fe80::1%a2", "port": "8080"}) == 5
        assert get("netstat_tcp_listen_backlog", {"address": "fe80::1", "port": "8080"}) is None
        assert get("netstat_tcp_listeners") == 2
    finally:
        for sock in keep:
            sock.close()


def test_listener_cap_keeps_its_members_until_clearly_beaten():
    """--listen.limit with hysteresis: one connection queued on a listener outside the cap
    does not push a shown, empty one out; a clearly fuller queue does."""
    from exporter.aggregate import TcpAccumulator
    from exporter.sources.table import SocketTable, parse_address

    def listeners(queues):  # port -> accept queue length
        n = len(queues)
        words = parse_address("127.0.0.1")[1]
        return SocketTable.from_columns({
            "family": [socket.AF_INET] * n, "state": [10] * n, "local_addr": [words] * n,
            "local_port": list(queues), "remote_addr": [[0] * 4] * n, "remote_port": [0] * n,
            "recv_q": list(queues.values()), "send_q": [128] * n, "inode": [1] * n,
            "uid": [0] * n})

    def sample(queues, previous=None):
        acc = TcpAccumulator(listen_limit=2, previous=previous)
        acc.add(listeners(queues))
        return acc.result()

    first = sample({80: 0, 443: 0, 8080: 0})
    assert [l.port for l in first.listeners] == [80, 443]
    second = sample({80: 0, 443: 0, 8080: 1}, first)  # one queued connection: no swap
    assert [l.port for l in second.listeners] == [80, 443]
    third = sample({80: 0, 443: 0, 8080: 3}, second)  # clearly fuller: it takes a place
    assert sorted(l.port for l in third.listeners) == [80, 8080]
    assert third.listeners[0].port == 8080  # shown fullest first
    assert third.listeners_total == 3


def test_a_datagram_larger_than_the_room_left_fails_the_dump_never_shortens_it(netns,
                                                                                 monkeypatch):
    # The kernel fills a dump datagram up to about a page (more when the reader's buffer is
    # larger); with room for 512 bytes only, 40 listeners' messages cannot fit, and MSG_TRUNC
    # must turn that into an error instead of a table missing the rest of the datagram.
    with netns.entered():
        held = []
        for _ in range(40):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            held.append(listener)
        try:
            assert len(SocketTable.concat(list(sockdiag.dump(socket.IPPROTO_TCP)))) == 40
            monkeypatch.setattr(sockdiag, "_DATAGRAM_ROOM", 512)
            with pytest.raises(sockdiag.DumpError, match="larger than the receive buffer"):
                list(sockdiag.dump(socket.IPPROTO_TCP))
        finally:
            for listener in held:
                listener.close()


def _attribute_types(sock, seq=77) -> set[int]:
    """The netlink attribute types in a TCP dump's messages, read by hand."""
    _type, request = sockdiag.build_request(socket.IPPROTO_TCP, socket.AF_UNSPEC,
                                            sockdiag.ALL_STATES_MASK, seq)
    types = set()
    for batch in sockdiag.receive(sock, request, seq, None, "sock_diag"):
        data = bytes(batch)
        at = 0
        while at < len(data):
            length, kind = struct.unpack_from("=IH", data, at)
            if kind == sockdiag.TCPDIAG_GETSOCK:
                attr = at + 88
                while attr < at + length:
                    size, attr_type = struct.unpack_from("=HH", data, attr)
                    types.add(attr_type)
                    attr += (size + 3) & ~3
            at += (length + 3) & ~3
    return types


def _effective_capabilities() -> int:
    with open("/proc/thread-self/status") as status:
        return int(next(l for l in status if l.startswith("CapEff:")).split()[1], 16)


def test_sock_diag_sockets_are_opened_without_net_admin_so_the_kernel_leaves_the_mark_out(
        netns):
    # INET_DIAG_MARK (15) comes with every socket when the dumping socket's opener holds
    # CAP_NET_ADMIN; our sockets are opened without it in the effective set, which comes
    # back right after (conntrack's dumps need it).
    if not _effective_capabilities() & 1 << 12:
        pytest.skip("this process does not hold CAP_NET_ADMIN: the kernel adds no mark anyway")
    with netns.entered():
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        try:
            plain = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, sockdiag.NETLINK_SOCK_DIAG)
            plain.bind((0, 0))
            with plain:
                assert 15 in _attribute_types(plain)  # the test can tell
            with sockdiag.open_socket() as ours:
                types = _attribute_types(ours)
            assert types and 15 not in types
            assert _effective_capabilities() & 1 << 12  # given back
            assert len(SocketTable.concat(list(sockdiag.dump(socket.IPPROTO_TCP)))) == 1
        finally:
            server.close()
