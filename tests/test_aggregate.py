"""exporter.aggregate is pure: parametrised tables and hypothesis properties."""
from __future__ import annotations

import collections
import io
import ipaddress
import socket
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from exporter import aggregate
from exporter.aggregate import (EXCLUDED, MIN_SERIES_LIMIT, OTHER, PORT_STATES, REMOTE_STATES,
                                RemoteKey, RemoteOptions, TcpAccumulator, top_n)
from exporter.sources import proc_sockets
from exporter.sources.table import NETSTAT_STATES, SocketTable, TcpState, parse_address


def table(rows):
    """rows: (state, remote, local_port[, local]) with addresses as text."""
    cols = collections.defaultdict(list)
    for state, remote, lport, *local in rows:
        fam, rwords = parse_address(remote)
        _lf, lwords = parse_address(local[0] if local else ("::1" if fam == socket.AF_INET6 else "127.0.0.1"))
        cols["family"].append(fam)
        cols["state"].append(state)
        cols["remote_addr"].append(rwords)
        cols["remote_port"].append(0 if state == TcpState.LISTEN else 1234)
        cols["local_addr"].append(lwords)
        cols["local_port"].append(lport)
    n = len(rows)
    for name in ("recv_q", "send_q", "inode", "uid"):
        cols[name] = [0] * n
    return SocketTable.from_columns(dict(cols))


def proc_table(rows):
    """The same rows as /proc/net/tcp prints them, read back by the /proc source."""
    def endpoint(address, port):
        return f"{int.from_bytes(socket.inet_aton(address), sys.byteorder):08X}:{port:04X}"
    lines = ["  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid"
             "  timeout inode"]
    for i, (state, remote, lport, *local) in enumerate(rows):
        remote_port = 0 if state == TcpState.LISTEN else 1234
        lines.append(f"{i:4}: {endpoint(local[0] if local else '127.0.0.1', lport)} "
                     f"{endpoint(remote, remote_port)} {state:02X} 00000000:00000000 "
                     f"00:00000000 00000000     0        0 {1000 + i} 1")
    return next(proc_sockets.parse_file(io.StringIO("\n".join(lines)), socket.AF_INET))


def summarize(rows, previous=None, batches=1, listen_limit=100, source="netlink", **options):
    # the sampler's rule: only sock_diag knows a listener's backlog
    acc = TcpAccumulator(listen_limit=listen_limit, remote=RemoteOptions(**options),
                         previous=previous, backlog_known=source == "netlink")
    t = table(rows) if source == "netlink" else proc_table(rows)
    for chunk in np.array_split(np.arange(len(t)), batches):
        acc.add(SocketTable(**{c: getattr(t, c)[chunk] for c in
                               ("family", "state", "local_addr", "local_port", "remote_addr",
                                "remote_port", "recv_q", "send_q", "inode", "uid")}))
    return acc.result()


E, TW, SR = TcpState.ESTABLISHED, TcpState.TIME_WAIT, TcpState.SYN_RECV


def test_top_n_other_and_mapped_addresses():
    rows = ([(E, "203.0.113.1", 443)] * 5 + [(E, "203.0.113.2", 443)] * 3
            + [(E, "::ffff:203.0.113.2", 443)] * 2 + [(E, "2001:db8::7", 443)] * 4
            + [(E, "198.51.100.9", 50000)] + [(TcpState.LISTEN, "0.0.0.0", 443)])
    remote = summarize(rows, top=2).remote
    assert remote.remote[("ESTABLISHED", "203.0.113.1")] == 5
    assert remote.remote[("ESTABLISHED", "203.0.113.2")] == 5  # mapped counts as IPv4
    assert remote.remote[("ESTABLISHED", OTHER)] == 5
    assert ("LISTEN", OTHER) not in remote.remote
    assert remote.local_port[("ESTABLISHED", "443")] == 14  # 50000 is a client port
    assert remote.local_port[("ESTABLISHED", OTHER)] == 0
    assert all(port in ("443", OTHER) for _s, port in remote.local_port)


def test_ties_go_to_the_lower_address():
    rows = [(E, "10.0.0.9", 80), (E, "10.0.0.3", 80), (E, "10.0.0.5", 80)]
    remote = summarize(rows, top=2).remote
    assert [k for k in remote.remote if k[0] == "ESTABLISHED"] == [
        ("ESTABLISHED", "10.0.0.3"), ("ESTABLISHED", "10.0.0.5"), ("ESTABLISHED", OTHER)]


def test_prefix_aggregation():
    rows = ([(SR, "198.18.100.1", 80)] * 5 + [(SR, "198.18.100.2", 80)] * 3
            + [(SR, "198.18.101.7", 80)] * 2 + [(E, "2001:db8:0:1::5", 80)] * 2
            + [(E, "2001:db8:0:1::6", 80)] + [(E, "2001:db8:0:2::1", 80)])
    remote = summarize(rows, prefix_v4=24, prefix_v6=64).remote.remote
    assert remote[("SYN_RECV", "198.18.100.0/24")] == 8
    assert remote[("SYN_RECV", "198.18.101.0/24")] == 2
    assert remote[("ESTABLISHED", "2001:db8:0:1::/64")] == 3
    assert remote[("ESTABLISHED", "2001:db8:0:2::/64")] == 1
    assert summarize(rows, prefix_v4=0).remote.remote[("SYN_RECV", "0.0.0.0/0")] == 10


def test_include_exclude_and_mask():
    rows = ([(E, "127.0.0.1", 80)] * 4 + [(E, "10.1.2.3", 80)] * 2 + [(E, "::1", 80)]
            + [(E, "::ffff:127.0.0.2", 80)])
    loopback = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    remote = summarize(rows, exclude=loopback).remote.remote
    assert remote[("ESTABLISHED", EXCLUDED)] == 6
    assert remote[("ESTABLISHED", "10.1.2.3")] == 2
    assert remote[("ESTABLISHED", OTHER)] == 0
    remote = summarize(rows, include=(ipaddress.ip_network("10.0.0.0/8"),)).remote.remote
    assert remote[("ESTABLISHED", EXCLUDED)] == 6 and remote[("ESTABLISHED", "10.1.2.3")] == 2
    masked = summarize(rows, mask_key=b"k1").remote.remote
    labels = [label for (state, label) in masked if state == "ESTABLISHED" and label != OTHER]
    assert len(labels) == 4 and all(l.startswith("hash:") and len(l) == 17 for l in labels)
    assert summarize(rows, mask_key=b"k1").remote.remote == masked  # stable for a key
    assert set(summarize(rows, mask_key=b"k2").remote.remote) != set(masked)
    assert sum(v for (s, _), v in masked.items() if s == "ESTABLISHED") == 8


def test_hysteresis_keeps_members_until_clearly_beaten():
    assert top_n({"a": 10, "b": 11}, 1, frozenset({"a"})) == [("a", 10)]
    assert top_n({"a": 10, "b": 12}, 1, frozenset({"a"})) == [("a", 10)]
    assert top_n({"a": 10, "b": 13}, 1, frozenset({"a"})) == [("b", 13)]
    assert top_n({"a": 10, "b": 11}, 1) == [("b", 11)]
    # across samples: counts wobbling around each other do not flip membership
    first = summarize([(E, "10.0.0.1", 80)] * 10 + [(E, "10.0.0.2", 80)] * 9, top=1)
    assert first.remote.remote.get(("ESTABLISHED", "10.0.0.1")) == 10
    second = summarize([(E, "10.0.0.1", 80)] * 9 + [(E, "10.0.0.2", 80)] * 10, top=1,
                       previous=first)
    assert second.remote.remote.get(("ESTABLISHED", "10.0.0.1")) == 9
    assert second.remote.remote[("ESTABLISHED", OTHER)] == 10
    third = summarize([(E, "10.0.0.1", 80)] * 5 + [(E, "10.0.0.2", 80)] * 10, top=1,
                      previous=second)
    assert third.remote.remote.get(("ESTABLISHED", "10.0.0.2")) == 10


def test_series_limit_cuts_smallest_first_and_counts_it():
    rows = [(E, f"10.0.0.{i}", 80) for i in range(1, 11) for _ in range(i)]
    rows.append((TcpState.LISTEN, "0.0.0.0", 80))
    # port 80 (one series per state), its listener (two) and three remotes fit
    limit = MIN_SERIES_LIMIT + len(PORT_STATES) + 2 + 3
    summary = summarize(rows, series_limit=limit)
    remote = summary.remote
    shown = [l for (s, l) in remote.remote if s == "ESTABLISHED" and l != OTHER]
    assert shown == ["10.0.0.10", "10.0.0.9", "10.0.0.8"]
    assert remote.remote[("ESTABLISHED", OTHER)] == sum(range(1, 8))
    assert remote.truncated["remote"] == 7
    assert remote.truncated["local_port"] == 0
    assert [l.port for l in summary.listeners] == [80]
    tight = summarize(rows, series_limit=MIN_SERIES_LIMIT + 2)  # only the listener fits
    assert tight.remote.truncated["local_port"] == len(PORT_STATES)
    assert tight.remote.local_port[("ESTABLISHED", OTHER)] == 55
    assert len(tight.listeners) == 1
    tighter = summarize(rows, series_limit=MIN_SERIES_LIMIT)
    assert tighter.listeners == () and tighter.listeners_total == 1
    assert tighter.remote.truncated["listen_backlog"] == 1



def test_series_limit_counts_the_series_a_listener_really_makes():
    # /proc/net/tcp has no backlog, so its listeners make one series (the queue length), not
    # two: the series the backlog would have taken stay with the remotes.
    rows = [(E, f"10.0.0.{i}", 80) for i in range(1, 11) for _ in range(i)]
    rows.append((TcpState.LISTEN, "0.0.0.0", 80, "0.0.0.0"))
    limit = MIN_SERIES_LIMIT + len(PORT_STATES) + 1 + 3  # port 80, its listener, 3 remotes
    proc = summarize(rows, series_limit=limit, source="proc")
    shown = [l for (s, l) in proc.remote.remote if s == "ESTABLISHED" and l != OTHER]
    assert shown == ["10.0.0.10", "10.0.0.9", "10.0.0.8"]
    assert proc.remote.truncated["remote"] == 7
    assert [(l.address, l.port, l.backlog) for l in proc.listeners] == [("0.0.0.0", 80, None)]
    netlink = summarize(rows, series_limit=limit)  # the backlog series costs one remote
    assert netlink.remote.truncated["remote"] == 8
    assert netlink.listeners[0].backlog is not None
    # with room for the listener alone it stays; cut, it never counts a backlog series
    assert len(summarize(rows, series_limit=MIN_SERIES_LIMIT + 1, source="proc").listeners) == 1
    cut = summarize(rows, series_limit=MIN_SERIES_LIMIT, source="proc")
    assert cut.listeners == () and cut.listeners_total == 1
    assert cut.remote.truncated["listen_queue_length"] == 1
    assert cut.remote.truncated["listen_backlog"] == 0


@pytest.mark.parametrize("batches", [1, 3])
def test_batches_do_not_change_the_result(batches):
    rows = [(E, f"10.0.{i % 3}.{i % 7}", 80 + i % 2) for i in range(50)] + \
        [(TcpState.LISTEN, "0.0.0.0", 80), (TcpState.LISTEN, "0.0.0.0", 81)]
    one = summarize(rows, top=4, prefix_v4=30)
    many = summarize(rows, top=4, prefix_v4=30, batches=batches)
    assert dict(one.remote.remote) == dict(many.remote.remote)
    assert dict(one.remote.local_port) == dict(many.remote.local_port)


ADDRESSES = ["10.0.0.1", "10.0.0.2", "10.0.1.1", "192.0.2.77", "::ffff:10.0.0.2",
             "::ffff:192.0.2.1", "2001:db8::1", "2001:db8::2", "2001:db8:1::1", "::1", "127.0.0.1"]
NETWORKS = ["10.0.0.0/8", "10.0.0.0/24", "2001:db8::/32", "::1/128", "127.0.0.0/8", "192.0.2.0/25"]
STATES = [s for s in NETSTAT_STATES if s != TcpState.CLOSE]


@settings(max_examples=250, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from(STATES), st.sampled_from(ADDRESSES),
                               st.sampled_from([22, 80, 443, 40000, 50000])), max_size=60),
       top=st.integers(0, 5), port_top=st.integers(0, 3), prefix_v4=st.integers(0, 32),
       prefix_v6=st.integers(0, 128), extra=st.integers(0, 60), listen_limit=st.integers(0, 5),
       include=st.lists(st.sampled_from(NETWORKS), max_size=2, unique=True),
       exclude=st.lists(st.sampled_from(NETWORKS), max_size=2, unique=True),
       batches=st.integers(1, 3))
def test_sums_are_conserved_and_series_stay_under_the_limit(
        rows, top, port_top, prefix_v4, prefix_v6, extra, listen_limit, include, exclude, batches):
    limit = MIN_SERIES_LIMIT + extra
    summary = summarize(rows, top=top, local_port_top=port_top, prefix_v4=prefix_v4,
                        prefix_v6=prefix_v6, series_limit=limit, listen_limit=listen_limit,
                        include=tuple(map(ipaddress.ip_network, include)),
                        exclude=tuple(map(ipaddress.ip_network, exclude)), batches=batches)
    remote = summary.remote
    per_state = collections.Counter(NETSTAT_STATES[s] for s, _a, _p in rows)
    listening = {p for s, _a, p in rows if s == TcpState.LISTEN}
    for state in REMOTE_STATES:
        name = NETSTAT_STATES[state]
        values = {l: v for (s, l), v in remote.remote.items() if s == name}
        assert sum(values.values()) == per_state[name]
        assert all(v >= 0 for v in values.values())
        assert all(v > 0 for l, v in values.items() if l not in (OTHER, EXCLUDED))
        assert len(values) - 2 <= top
    for state in PORT_STATES:
        name = NETSTAT_STATES[state]
        served = sum(1 for s, _a, p in rows if s == state and p in listening)
        assert sum(v for (s, _l), v in remote.local_port.items() if s == name) == served
    labelled = (sum(1 for (_s, l) in remote.remote if l not in (OTHER, EXCLUDED))
                + sum(1 for (_s, l) in remote.local_port if l != OTHER)
                + 2 * len(summary.listeners))
    assert MIN_SERIES_LIMIT + labelled <= limit
    for (_s, label) in remote.remote:
        if label not in (OTHER, EXCLUDED):
            net = ipaddress.ip_network(label)
            assert net.prefixlen == (prefix_v4 if net.version == 4 else prefix_v6)
    # every sample's truncation is reported per metric
    assert set(remote.truncated) == set(aggregate.SERIES_LIMITED)


def test_remote_key_text():
    assert RemoteKey(4, 0xC0000201, 32).text() == "192.0.2.1"
    assert RemoteKey(4, 0xC0000200, 24).text() == "192.0.2.0/24"
    assert RemoteKey(6, 1, 128).text() == "::1"
    assert RemoteKey(6, 0x20010DB8 << 96, 64).text() == "2001:db8::/64"


# -- per-remote counting against a plain Python reference (issue 12) --------------------------

V4_POOL = st.builds(lambda net, host: str(ipaddress.IPv4Address(net | host)),
                    st.sampled_from([0x0A000000, 0x0A000100, 0xC0000200, 0x7F000000, 0]),
                    st.integers(0, 3))
# IPv6 peers whose words look like IPv4 ones, or like the mapped marker, or differ only in
# their last or first bit: nothing may fold them together with another family or address.
V6_POOL = st.builds(lambda hi, lo: str(ipaddress.IPv6Address(hi << 64 | lo)),
                    st.sampled_from([0, 0x20010DB8 << 32, 0x20010DB8 << 32 | 1, 0x7F000001 << 32,
                                     0x0A000001 << 32, 1 << 63]),
                    st.sampled_from([0, 1, 2, 0xFFFF_0000_0000, 0xFFFF_0A00_0001, 0xFFFE_0A00_0001,
                                     0x0A00_0001, 1 << 63, (1 << 64) - 1]))
PEERS = st.one_of(V4_POOL, V6_POOL, V4_POOL.map(lambda a: "::ffff:" + a))
NETWORKS_12 = ["10.0.0.0/8", "10.0.0.0/24", "0.0.0.0/0", "127.0.0.0/8", "2001:db8::/32",
               "::/0", "::/96", "::ffff:0:0/96", "7f00::/8", "::1/128", "::ffff:10.0.0.1/128"]


def reference_counts(rows, prefix_v4=32, prefix_v6=128, include=(), exclude=()):
    """state -> Counter of RemoteKey, one address at a time with ipaddress."""
    per_state = collections.defaultdict(collections.Counter)
    for state, remote, _port in rows:
        if state in (TcpState.LISTEN, TcpState.CLOSE):
            continue
        addr = ipaddress.ip_address(remote)
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # counted as the IPv4 peer it is

        def within(networks):
            return any(net.version == addr.version and addr in net for net in networks)
        if (include and not within(include)) or within(exclude):
            continue
        prefix = prefix_v4 if addr.version == 4 else prefix_v6
        net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
        per_state[state][RemoteKey(addr.version, int(net.network_address), prefix)] += 1
    return per_state


def ranked(counter):
    return sorted(counter.items(), key=lambda kc: (-kc[1], kc[0]))


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from(STATES), PEERS,
                               st.sampled_from([22, 443, 50000])), max_size=80),
       prefix_v4=st.sampled_from([0, 8, 24, 31, 32]),
       prefix_v6=st.sampled_from([0, 1, 32, 63, 64, 65, 80, 96, 127, 128]),
       include=st.lists(st.sampled_from(NETWORKS_12), max_size=2, unique=True),
       exclude=st.lists(st.sampled_from(NETWORKS_12), max_size=2, unique=True),
       top=st.integers(1, 6), batches=st.integers(1, 3),
       merged=st.lists(st.sampled_from(REMOTE_STATES), min_size=2, max_size=4, unique=True))
def test_remote_counts_equal_a_python_reference(rows, prefix_v4, prefix_v6, include, exclude,
                                                top, batches, merged):
    include = tuple(map(ipaddress.ip_network, include))
    exclude = tuple(map(ipaddress.ip_network, exclude))
    counts = summarize(rows, prefix_v4=prefix_v4, prefix_v6=prefix_v6, include=include,
                       exclude=exclude, batches=batches).remote.counts
    expected = reference_counts(rows, prefix_v4, prefix_v6, include, exclude)
    for state in REMOTE_STATES:
        assert counts.top((state,), 1 << 40) == ranked(expected[state])
        assert counts.top((state,), top) == ranked(expected[state])[:top]  # ties: IPv4, lower
    total = sum((expected[s] for s in merged), collections.Counter())
    assert counts.top(merged, 1 << 40) == ranked(total)
    assert counts.top(merged, top) == ranked(total)[:top]
    # incumbents: the previous top keeps its place as top_n says, absent ones are dropped
    incumbents = frozenset(k for k, _ in ranked(total)[-top:]) | {RemoteKey(4, 0x0A0000FF, prefix_v4)}
    held = frozenset(k for k in incumbents if total.get(k))
    assert counts.top(merged, top, incumbents) == top_n(dict(total), top, held)


def test_remote_counts_at_scale_many_ties_both_families():
    """100k sockets: 60k remotes with one connection each (the top-N ties), a few heavy ones,
    IPv4, mapped IPv4 and IPv6 from one /64 (all IPv6 keys share their first word)."""
    rng = np.random.default_rng(12)
    n = 100_000
    v6 = rng.random(n) < 0.5
    mapped = ~v6 & (rng.random(n) < 0.2)
    host = rng.permutation(n) % 60_000
    host[:2000] = rng.integers(0, 5, 2000)  # five heavy remotes
    words = np.zeros((n, 4), dtype=np.uint32)

    def be(values):  # native words holding network-order bytes, as the kernel's
        values = np.asarray(values, dtype=np.uint32)
        return values if sys.byteorder == "big" else values.byteswap()
    words[:, 0] = np.where(v6, be(0x20010DB8), np.where(mapped, 0, be(0x0A000000 + host)))
    words[:, 2] = np.where(mapped, be(0xFFFF), 0)
    words[:, 3] = np.where(v6, be(host), np.where(mapped, be(0x0A000000 + host), 0))
    state = np.where(rng.random(n) < 0.8, TcpState.ESTABLISHED, TcpState.TIME_WAIT)
    t = SocketTable.from_columns({
        "family": np.where(v6 | mapped, socket.AF_INET6, socket.AF_INET), "state": state,
        "remote_addr": words, "local_addr": words, "local_port": np.full(n, 443),
        "remote_port": np.full(n, 1234), "recv_q": np.zeros(n), "send_q": np.zeros(n),
        "inode": np.zeros(n), "uid": np.zeros(n)})
    acc = TcpAccumulator(remote=RemoteOptions())
    for chunk in np.array_split(np.arange(n), 13):
        acc.add(SocketTable(**{c: getattr(t, c)[chunk] for c in
                               ("family", "state", "local_addr", "local_port", "remote_addr",
                                "remote_port", "recv_q", "send_q", "inode", "uid")}))
    counts = acc.result().remote.counts
    expected = collections.defaultdict(collections.Counter)
    for s, six, h in zip(state.tolist(), v6.tolist(), host.tolist()):
        key = RemoteKey(6, (0x20010DB8 << 96) | h, 128) if six else RemoteKey(4, 0x0A000000 + h, 32)
        expected[s][key] += 1
    for s in (TcpState.ESTABLISHED, TcpState.TIME_WAIT):
        assert counts.top((s,), 20) == ranked(expected[s])[:20]
        assert counts.top((s,), 30_000) == ranked(expected[s])[:30_000]
    both = expected[TcpState.ESTABLISHED] + expected[TcpState.TIME_WAIT]
    assert counts.top((TcpState.ESTABLISHED, TcpState.TIME_WAIT), 50) == ranked(both)[:50]
    assert len(counts) == len(expected[TcpState.ESTABLISHED]) + len(expected[TcpState.TIME_WAIT])


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0, 1, 1 << 63, (1 << 64) - 1]),
                               st.integers(0, 40)), max_size=300),
       rounds=st.sampled_from([1, 2, 12]))
def test_count_keys_is_exact_whatever_collides(keys, rounds):
    """Many rows per key, keys differing in one word or only in the tag; with one round only
    (everything that collides falls through to the sorted fallback) the result is the same."""
    from exporter.aggregate import remotes
    tag = np.array([k[0] for k in keys], dtype=np.uint8)
    hi = np.array([k[1] for k in keys], dtype=np.uint64)
    lo = np.array([k[2] * 0x9E3779B97F4A7C15 % (1 << 64) for k in keys], dtype=np.uint64)
    saved, remotes._MAX_ROUNDS = remotes._MAX_ROUNDS, rounds
    try:
        rows, counts = remotes.count_keys(hi, lo, tag)
        weighted_rows, sums = remotes.count_keys(hi, lo, tag, np.arange(len(keys)) + 1)
    finally:
        remotes._MAX_ROUNDS = saved
    expected = collections.Counter(zip(tag.tolist(), hi.tolist(), lo.tolist()))
    got = {(int(tag[r]), int(hi[r]), int(lo[r])): int(c) for r, c in zip(rows, counts)}
    assert got == dict(expected) and len(rows) == len(expected)
    weights = collections.Counter()
    for i, key in enumerate(zip(tag.tolist(), hi.tolist(), lo.tolist())):
        weights[key] += i + 1
    assert {(int(tag[r]), int(hi[r]), int(lo[r])): int(c)
            for r, c in zip(weighted_rows, sums)} == dict(weights)


def test_kth_smallest_and_largest_on_skewed_arrays():
    from exporter.aggregate.remotes import _kth_smallest, _nth_largest
    rng = np.random.default_rng(3)
    for values in (np.ones(200_000, dtype=np.int64), np.r_[np.ones(99_999, dtype=np.int64), 10**6],
                   rng.integers(0, 50, 150_000), np.arange(300_000)[::-1].copy(),
                   rng.integers(0, 1 << 63, 100_000, dtype=np.uint64)):
        ordered = np.sort(values)
        for k in (1, 2, 19, 20, 1000, len(values)):
            assert _kth_smallest(values, k) == ordered[k - 1]
            assert _nth_largest(values, k) == ordered[len(values) - k]


def test_min_connections_keeps_a_random_source_flood_in_other():
    """1000 SYNs from 1000 new sources every sample: no source gets a series (the churn the
    flood made before: each a one-connection newcomer), the sums stay exact; a client with
    several connections keeps its own."""
    seen_labels = set()
    previous = None
    for sample in range(5):
        rows = [(SR, f"198.18.{sample * 4 + i // 256}.{i % 256}", 443) for i in range(1000)]
        rows += [(E, "10.0.0.9", 443)] * 3
        summary = summarize(rows, previous=previous, min_connections=2)
        remote = summary.remote.remote
        seen_labels |= {address for (state, address) in remote if state == "SYN_RECV"}
        assert remote[("SYN_RECV", OTHER)] == 1000
        assert remote[("ESTABLISHED", "10.0.0.9")] == 3
        previous = summary
    assert seen_labels == {OTHER}  # one series for the flood, however long it lasts
    # without the minimum: twenty new series per sample, a hundred in five samples
    assert len({a for (s, a) in summarize(rows).remote.remote if s == "SYN_RECV"}) == 21


def test_client_time_wait_destinations_obey_include_and_exclude():
    """--remote.exclude keeps an address out of every label: client TIME_WAIT destinations
    were labelled whatever the filters said (found in review)."""
    import ipaddress
    rows = ([(TW, "127.0.0.9", 40000)] * 3 + [(TW, "127.0.0.5", 40001)] * 2
            + [(TW, "10.1.1.1", 40002)])
    summary = summarize(rows, include=(ipaddress.ip_network("127.0.0.0/8"),),
                        exclude=(ipaddress.ip_network("127.0.0.9/32"),)).remote
    assert dict(summary.client_time_wait) == {"127.0.0.5:1234": 2, OTHER: 0, EXCLUDED: 4}
    assert summary.remote[("TIME_WAIT", EXCLUDED)] == 4
    assert dict(summarize(rows).remote.client_time_wait) == {
        "127.0.0.9:1234": 3, "127.0.0.5:1234": 2, "10.1.1.1:1234": 1, OTHER: 0}
    none_left = summarize(rows, exclude=(ipaddress.ip_network("0.0.0.0/0"),)).remote
    assert dict(none_left.client_time_wait) == {OTHER: 0, EXCLUDED: 6}
    server_side = summarize(rows + [(TcpState.LISTEN, "0.0.0.0", 40000)]
                            + [(TcpState.LISTEN, "0.0.0.0", p) for p in (40001, 40002)]).remote
    assert dict(server_side.client_time_wait) == {OTHER: 0}


def test_an_incumbent_below_the_minimum_holds_no_place_a_qualifying_remote_needs():
    """--remote.min-connections applies before the ranking. A remote shown last sample that
    fell below the minimum must not keep, on its hysteresis bonus, the one place that a
    remote with enough connections then cannot take. (Found in review: the place stayed
    empty for a sample and the qualifying remote's connections went to OTHER, in the flood
    the minimum exists for.) The same holds for client TIME_WAIT destinations."""
    first = summarize([(E, "10.0.0.1", 443)] * 3 + [(TW, "10.0.0.1", 40000)] * 3,
                      top=1, min_connections=2)
    assert first.remote.remote[("ESTABLISHED", "10.0.0.1")] == 3
    assert dict(first.remote.client_time_wait) == {"10.0.0.1:1234": 3, OTHER: 0}
    rows = ([(E, "10.0.0.1", 443)] + [(E, "10.0.0.2", 443)] * 2
            + [(TW, "10.0.0.1", 40000)] + [(TW, "10.0.0.2", 40001)] * 2)
    second = summarize(rows, previous=first, top=1, min_connections=2)
    assert {k: v for k, v in second.remote.remote.items() if k[0] == "ESTABLISHED"} == {
        ("ESTABLISHED", "10.0.0.2"): 2, ("ESTABLISHED", OTHER): 1}
    assert dict(second.remote.client_time_wait) == {"10.0.0.2:1234": 2, OTHER: 1}
    # and the incumbent keeps its place while it still qualifies, against a close newcomer
    rows = [(E, "10.0.0.1", 443)] * 2 + [(E, "10.0.0.2", 443)] * 2
    assert summarize(rows, previous=first, top=1, min_connections=2).remote.remote[
        ("ESTABLISHED", "10.0.0.1")] == 2


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from(STATES), PEERS, st.just(443)), max_size=60),
       bits=st.sampled_from([1, 2, 3, 10]), batches=st.integers(1, 6),
       lookup=st.sampled_from([1, 7, 1 << 17]))
def test_counting_over_batches_and_tiny_tables_changes_nothing(rows, bits, batches, lookup):
    """Rows are looked up in one hash map every `lookup` rows; tables of 2-8 slots make keys
    collide, go round after round, and the map grow and rebuild."""
    from exporter.aggregate import remotes
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(remotes, "_MIN_TABLE_BITS", bits)
        patch.setattr(remotes, "_LOOKUP_ROWS", lookup)
        counts = summarize(rows, batches=batches, prefix_v6=64).remote.counts
    expected = reference_counts(rows, prefix_v6=64)
    for state in REMOTE_STATES:
        assert counts.top((state,), 1 << 40) == ranked(expected[state])


def test_keys_that_differ_only_where_the_tag_makes_up_for_it_are_placed_in_a_few_rounds():
    """(hi, c - t, t) for every tag t: with the tag added to lo alike in every round they all
    shared one bucket in every round, and a thirteenth could never be placed (the tables then
    grew until memory ran out; found in review). The tag now enters differently per round."""
    from exporter.aggregate import remotes
    tag = np.arange(256, dtype=np.uint8)
    hi = np.full(256, 7, dtype=np.uint64)
    lo = np.uint64(1 << 40) - tag.astype(np.uint64)
    counter = remotes.KeyCounter()
    counter.add(hi, lo, tag)
    counter.add(hi[::-1].copy(), lo[::-1].copy(), tag[::-1].copy())
    assert counter.items()[3].tolist() == [2] * 256
    assert len(counter._tables) <= 3
    rows, counts = remotes.count_keys(hi, lo, tag)
    assert sorted(rows.tolist()) == list(range(256)) and counts.tolist() == [1] * 256


def test_keys_the_hash_cannot_separate_fail_the_read_instead_of_growing_without_bound():
    """Never expected (see the test above), but bounded: keys that share a bucket in every
    round at every size make the map give up with an error, not ask for gigabytes."""
    from exporter.aggregate import remotes
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(remotes, "_buckets", lambda hi, *_args: np.zeros(len(hi), dtype=np.intp))
        counter = remotes.KeyCounter()
        with pytest.raises(RuntimeError, match="share a bucket in every round"):
            counter.add(np.arange(13, dtype=np.uint64), np.zeros(13, dtype=np.uint64),
                        np.zeros(13, dtype=np.uint8))
        assert counter._bits <= 16


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5),
                                           st.integers(0, 2), st.integers(0, 4)),
                                 max_size=40), max_size=6),
       bits=st.sampled_from([1, 2, 10]), expected=st.sampled_from([None, 1, 10_000]),
       weighted=st.booleans())
def test_key_counter_is_exact(batches, bits, expected, weighted):
    from exporter.aggregate import remotes
    reference = collections.Counter()
    saved, remotes._MIN_TABLE_BITS = remotes._MIN_TABLE_BITS, bits
    try:
        counter = remotes.KeyCounter(expected)
        for batch in batches:
            hi = np.array([h for h, _l, _t, _w in batch], dtype=np.uint64) << np.uint64(60)
            lo = np.array([lo for _h, lo, _t, _w in batch], dtype=np.uint64)
            tag = np.array([t for _h, _l, t, _w in batch], dtype=np.uint8)
            weights = np.array([w for *_k, w in batch], dtype=np.int64) if weighted else None
            counter.add(hi, lo, tag, weights)
            for h, lo_, t, w in batch:
                reference[(h << 60, lo_, t)] += w if weighted else 1
    finally:
        remotes._MIN_TABLE_BITS = saved
    hi, lo, tag, count = counter.items()
    got = {(int(h), int(lo_), int(t)): int(c) for h, lo_, t, c in zip(hi, lo, tag, count)}
    assert len(got) == len(hi)  # every key once
    assert got == dict(reference)  # keys whose weights sum to 0 included


@pytest.mark.parametrize("listening", [3, 300, 5000])  # position tables of 16 and 32 bits
def test_local_port_counts_with_many_listening_ports(listening):
    rows = [(TcpState.LISTEN, "0.0.0.0", 1000 + p) for p in range(listening)]
    rows += [(E, "10.0.0.1", 1000 + p) for p in range(listening) for _ in range(p % 4)]
    rows += [(TW, "10.0.0.2", 1000 + listening - 1)] * 5 + [(E, "10.0.0.3", 60000)] * 7
    remote = summarize(rows, local_port_top=2, series_limit=10_000).remote
    totals = collections.Counter(p for s, _a, p in rows if s != TcpState.LISTEN and p < 60000)
    busiest = sorted(totals, key=lambda p: (-totals[p], p))[:2]  # ties: the lower port
    assert {p for (_s, p) in remote.local_port if p != OTHER} == {str(p) for p in busiest}
    last = 1000 + listening - 1
    assert remote.local_port[("ESTABLISHED", str(last))] == (listening - 1) % 4
    assert remote.local_port[("TIME_WAIT", str(last))] == 5
    served = sum(p % 4 for p in range(listening))  # port 60000 is not listening
    assert sum(v for (s, _p), v in remote.local_port.items() if s == "ESTABLISHED") == served
    assert sum(v for (s, _p), v in remote.local_port.items() if s == "TIME_WAIT") == 5


@settings(max_examples=60, deadline=None)
@given(samples=st.lists(st.lists(st.tuples(st.sampled_from(STATES), PEERS, st.just(443)),
                                 max_size=40), min_size=2, max_size=5),
       bits=st.sampled_from([1, 10]))
def test_the_key_map_carried_from_sample_to_sample_changes_nothing(samples, bits):
    """Each sample takes over the last one's key map (counts back to 0, unseen keys dropped
    when they outnumber the seen): every sample still counts exactly what it saw."""
    from exporter.aggregate import remotes
    previous = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(remotes, "_MIN_TABLE_BITS", bits)
        for rows in samples:
            summary = summarize(rows, previous=previous, batches=2)
            expected = reference_counts(rows)
            for state in REMOTE_STATES:
                assert summary.remote.counts.top((state,), 1 << 40) == ranked(expected[state])
            assert all(count > 0 for count in summary.remote.counts.count.tolist())
            previous = summary


def test_two_reads_from_one_previous_sample_never_share_its_key_map():
    # A read the watchdog gave up on and the read after it both start from the last summary:
    # one takes its map, the other builds its own, and both count right.
    rows = [(E, "10.0.0.1", 443)] * 3 + [(E, "2001:db8::1", 443)] * 2
    first = summarize(rows)
    stuck = TcpAccumulator(remote=RemoteOptions(), previous=first)
    after = TcpAccumulator(remote=RemoteOptions(), previous=first)
    assert stuck._remote._keys is not after._remote._keys
    more = table([(E, "10.0.0.1", 443)] * 7)
    stuck.add(more)
    after.add(table(rows))
    assert after.result().remote.remote[("ESTABLISHED", "10.0.0.1")] == 3
    assert stuck.result().remote.remote[("ESTABLISHED", "10.0.0.1")] == 7


def test_a_map_mostly_of_keys_gone_is_rebuilt_from_the_keys_seen():
    from exporter.aggregate import remotes
    counter = remotes.KeyCounter()
    keys = np.arange(5000, dtype=np.uint64)
    counter.add(keys, keys, np.zeros(5000, dtype=np.uint8))
    counter = counter.reuse()
    counter.add(keys[:10], keys[:10], np.zeros(10, dtype=np.uint8))
    kept = counter.reuse()
    assert kept is not counter and kept.size == 10  # 4990 unseen > max(10, 1024): dropped
    assert kept.items()[3].tolist() == [0] * 10
    kept.add(keys[:3], keys[:3], np.zeros(3, dtype=np.uint8))
    assert kept.items()[3].tolist() == [1, 1, 1] + [0] * 7
    assert kept.reuse() is kept  # 7 unseen of 10: kept as it is


@pytest.mark.parametrize("state", [16, 130, 255])  # 130 << 1 wraps to 4 (SYN_SENT) in a byte
def test_a_state_the_kernel_never_sends_fails_the_batch_never_counts_as_another(state):
    rows = table([(E, "10.0.0.1", 443)] * 2)
    bad = SocketTable(**{c: getattr(rows, c) for c in ("family", "local_addr", "local_port",
                                                       "remote_addr", "remote_port", "recv_q",
                                                       "send_q", "inode", "uid")},
                      state=np.array([1, state], dtype=np.uint8))
    with pytest.raises(ValueError, match=f"state {state} out of range"):
        TcpAccumulator(remote=RemoteOptions()).add(bad)
    with pytest.raises(ValueError, match=f"state {state} out of range"):
        aggregate.UdpAccumulator().add(bad)


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.integers(0, 40), max_size=300), common=st.integers(0, 40),
       share=st.integers(0, 100))
def test_count_small_is_bincount(keys, common, share):
    # any mix, from every row one key to none of them the sampled commonest
    from exporter.aggregate.states import count_small
    keys = np.array([common if i % 100 < share else k for i, k in enumerate(keys)],
                    dtype=np.uint8)
    assert count_small(keys, 41).tolist() == np.bincount(keys, minlength=41).tolist()
