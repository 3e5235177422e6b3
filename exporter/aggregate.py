"""Pure aggregation over SocketTable batches: no clock, no I/O, no logging.

An accumulator takes batches one by one (a 1M-socket dump never exists as one table) and
`result()` returns an immutable summary that the collectors and the CLI read.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping

import numpy as np

from .sources.table import FAMILY_NAMES, NETSTAT_STATES, SocketTable, TcpState, format_address

FAMILIES = (socket.AF_INET, socket.AF_INET6)
QUEUES = ("receive", "send")
UDP_STATES = {TcpState.ESTABLISHED: "connected", TcpState.CLOSE: "unconnected"}
_STATE_SLOTS = 16  # kernel states fit in 4 bits


def _family_index(family: np.ndarray) -> np.ndarray:
    return (family == socket.AF_INET6).astype(np.intp)


def _count_state_family(table: SocketTable, protocol: str):
    """One batch's (state, family index, counts[state, family index])."""
    state = table.state.astype(np.intp)
    if int(state.max()) >= _STATE_SLOTS:
        raise ValueError(f"{protocol} state {int(state.max())} out of range")
    family = _family_index(table.family)
    counts = np.bincount(state * 2 + family, minlength=_STATE_SLOTS * 2).reshape(_STATE_SLOTS, 2)
    return state, family, counts


def _sum_by(keys: np.ndarray, values: np.ndarray, slots: int) -> np.ndarray:
    """Exact per-key sums of uint32 values. bincount sums in float64, which is exact only
    while a sum stays below 2**53, so no more than 2**21 values go into one call."""
    out = np.zeros(slots, dtype=np.int64)
    step = 1 << 21
    for i in range(0, len(keys), step):
        out += np.bincount(keys[i:i + step], weights=values[i:i + step],
                           minlength=slots).astype(np.int64)
    return out


@dataclass(frozen=True)
class Listener:
    family: str
    address: str
    port: int
    queue_length: int  # connections waiting for accept()
    backlog: int | None  # the accept queue's limit; None when the source cannot tell
    sockets: int  # SO_REUSEPORT groups share an address:port; their queues are summed


@dataclass(frozen=True)
class TcpSummary:
    connections: Mapping[tuple[str, str], int]  # (state, family) -> count, every pair present
    queue_bytes: Mapping[tuple[str, str], int]  # (state, queue) -> bytes, LISTEN excluded
    listeners: tuple[Listener, ...]  # at most the listener limit, fullest queues first
    listeners_total: int  # distinct address:port pairs before the cap
    scanned: int  # sockets decoded
    remote: "RemoteSummary | None" = None  # per remote address and local port, when asked
    programs: "ProgramSummary | None" = None  # per owning program, when asked

    def state_totals(self) -> dict[str, int]:
        return _state_totals(self.connections)


def _state_totals(connections: Mapping[tuple[str, str], int]) -> dict[str, int]:
    """(state, family) -> count  =>  state -> count over both families."""
    totals = dict.fromkeys(NETSTAT_STATES.values(), 0)
    for (state, _family), count in connections.items():
        totals[state] += count
    return totals


@dataclass(frozen=True)
class UdpSummary:
    sockets: Mapping[tuple[str, str], int]  # (family, connected|unconnected) -> count
    queue_bytes: Mapping[tuple[str, str], int]  # (family, queue) -> bytes
    scanned: int  # sockets decoded


class TcpAccumulator:
    """Per state and family counts, queue sums and listeners over any number of batches."""

    def __init__(self, listen_limit: int = 100, backlog_known: bool = True,
                 remote: "RemoteOptions | None" = None, previous: "TcpSummary | None" = None,
                 owners=None, program_top: int = 20):
        self.listen_limit = listen_limit
        self.backlog_known = backlog_known
        self._remote = RemoteAccumulator(remote) if remote is not None else None
        self._previous = previous.remote if previous is not None else None
        self._programs = ProgramAccumulator(owners, program_top) if owners is not None else None
        self._previous_programs = previous.programs if previous is not None else None
        self._counts = np.zeros((_STATE_SLOTS, 2), dtype=np.int64)
        self._queues = np.zeros((_STATE_SLOTS, 2), dtype=np.int64)
        self._listeners: dict[tuple[int, bytes, int], list[int]] = {}
        self._sockets = 0

    def add(self, table: SocketTable) -> None:
        if not len(table):
            return
        self._sockets += len(table)
        state, _family, counts = _count_state_family(table, "TCP")
        self._counts += counts
        for col, queue in enumerate((table.recv_q, table.send_q)):
            self._queues[:, col] += _sum_by(state, queue, _STATE_SLOTS)
        self._add_listeners(table, np.flatnonzero(table.state == TcpState.LISTEN))
        if self._remote is not None:
            self._remote.add(table)
        if self._programs is not None:
            self._programs.add(table)

    def _add_listeners(self, table: SocketTable, rows: np.ndarray) -> None:
        # Listeners are few: a Python loop over them is cheap and keeps exact integers.
        for i in rows:
            key = (int(table.family[i]), table.local_addr[i].tobytes(), int(table.local_port[i]))
            entry = self._listeners.setdefault(key, [0, 0, 0])
            entry[0] += int(table.recv_q[i])
            entry[1] += int(table.send_q[i])
            entry[2] += 1

    def result(self) -> TcpSummary:
        connections = {}
        queue_bytes = {}
        for state, name in NETSTAT_STATES.items():
            for fam_index, family in enumerate(FAMILIES):
                connections[(name, FAMILY_NAMES[family])] = int(self._counts[state, fam_index])
            if state != TcpState.LISTEN:
                for col, queue in enumerate(QUEUES):
                    queue_bytes[(name, queue)] = int(self._queues[state, col])
        # The fullest queues matter most; ties (mostly empty queues) fall back to port and
        # address so that membership is stable from one sample to the next.
        ordered = sorted(self._listeners.items(),
                         key=lambda kv: (-kv[1][0], kv[0][2], kv[0][0], kv[0][1]))
        remote = None
        shown = min(self.listen_limit, len(ordered))
        if self._remote is not None:
            remote = self._remote.result(_state_totals(connections),
                                         {key[2] for key in self._listeners},
                                         self._previous, shown)
            shown -= remote.truncated["netstat_tcp_listen_queue_length"]
        listeners = tuple(
            Listener(family=FAMILY_NAMES[fam],
                     address=format_address(fam, np.frombuffer(raw, dtype=np.uint32)),
                     port=port, queue_length=queued,
                     backlog=backlog if self.backlog_known else None, sockets=count)
            for (fam, raw, port), (queued, backlog, count) in ordered[:shown])
        return TcpSummary(connections=MappingProxyType(connections),
                          queue_bytes=MappingProxyType(queue_bytes), listeners=listeners,
                          listeners_total=len(self._listeners), scanned=self._sockets,
                          remote=remote,
                          programs=self._programs.result(self._previous_programs)
                          if self._programs is not None else None)


class UdpAccumulator:
    def __init__(self):
        self._counts = np.zeros((_STATE_SLOTS, 2), dtype=np.int64)
        self._queues = np.zeros((2, 2), dtype=np.int64)
        self._total = 0

    def add(self, table: SocketTable) -> None:
        if not len(table):
            return
        self._total += len(table)
        _state, fam, counts = _count_state_family(table, "UDP")
        self._counts += counts
        for col, queue in enumerate((table.recv_q, table.send_q)):
            self._queues[:, col] += _sum_by(fam, queue, 2)

    def result(self) -> UdpSummary:
        sockets = {}
        queue_bytes = {}
        for fam_index, family in enumerate(FAMILIES):
            fname = FAMILY_NAMES[family]
            for state, label in UDP_STATES.items():
                sockets[(fname, label)] = int(self._counts[state, fam_index])
            for col, queue in enumerate(QUEUES):
                queue_bytes[(fname, queue)] = int(self._queues[fam_index, col])
        # A UDP socket is either connected or not; anything else would be a kernel surprise
        # we must not hide, so it still counts in the total.
        return UdpSummary(sockets=MappingProxyType(sockets),
                          queue_bytes=MappingProxyType(queue_bytes), scanned=self._total)


def summarize_tcp(tables: Iterable[SocketTable], **options) -> TcpSummary:
    acc = TcpAccumulator(**options)
    for table in tables:
        acc.add(table)
    return acc.result()



# ---------------------------------------------------------------------------------------
# Per remote address and per local port (the seed's recipes), with hard cardinality bounds.

# States whose sockets always have a peer: LISTEN has none, CLOSE sockets are unconnected.
REMOTE_STATES = tuple(s for s in NETSTAT_STATES if s not in (TcpState.LISTEN, TcpState.CLOSE))
PORT_STATES = tuple(s for s in NETSTAT_STATES if s != TcpState.LISTEN)
OTHER = "other"  # the remainder after the top-N (and after the series limit)
EXCLUDED = "excluded"  # addresses left out by --remote.include / --remote.exclude
# An address that was in the top-N keeps its place until a newcomer has more than
# HYSTERESIS_RATIO times its count plus HYSTERESIS_MIN: close counts must not make label sets
# flap between samples (each flap is a new series in Prometheus).
HYSTERESIS_RATIO = 1.1
HYSTERESIS_MIN = 1
SERIES_LIMITED = ("netstat_tcp_remote_connections", "netstat_tcp_local_port_connections",
                  "netstat_tcp_listen_queue_length", "netstat_tcp_listen_backlog")
# The fewest series --series.limit can leave: OTHER and EXCLUDED per remote state and OTHER
# per port state are never cut (they keep the sums exact).
MIN_SERIES_LIMIT = 2 * len(REMOTE_STATES) + len(PORT_STATES)
# Bytes 00 00 ff ff, the third word of an IPv4-mapped IPv6 address, as a native uint32.
_MAPPED_WORD = int(np.frombuffer(b"\0\0\xff\xff", dtype=np.uint32)[0])
_LITTLE = np.little_endian


def _be(words: np.ndarray) -> np.ndarray:
    """Native words holding network-order bytes -> their big-endian integer values."""
    return words.byteswap() if _LITTLE else words


def _mask32(prefix: int) -> int:
    return (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF if prefix else 0


def _mask128_words(prefix: int) -> np.ndarray:
    return np.array([_mask32(min(32, max(0, prefix - 32 * i))) for i in range(4)], dtype=np.uint32)


@dataclass(frozen=True)
class RemoteOptions:
    top: int = 20  # remote addresses per state
    prefix_v4: int = 32
    prefix_v6: int = 128
    include: tuple = ()  # ipaddress networks; empty means every address
    exclude: tuple = ()
    mask_key: bytes | None = None  # when set, addresses become keyed hashes
    local_port_top: int = 50
    series_limit: int = 2000  # across remote, local-port and listener series


@dataclass(frozen=True)
class RemoteKey:
    """An address or network: version 4 or 6, its integer value (already masked), prefix."""
    version: int
    value: int
    prefix: int

    def text(self, mask_key: bytes | None = None) -> str:
        addr = ipaddress.ip_address(self.value) if self.version == 4 else ipaddress.IPv6Address(self.value)
        full = 32 if self.version == 4 else 128
        label = str(addr) if self.prefix == full else f"{addr}/{self.prefix}"
        if mask_key is None:
            return label
        # Stable for a given key, not reversible without it; 48 bits keep collisions rare.
        return "hash:" + hmac.new(mask_key, label.encode(), hashlib.sha256).hexdigest()[:12]


@dataclass(frozen=True, eq=False)
class RemoteCounts:
    """Connections per distinct (state, remote), as sorted arrays: only the few addresses
    that make a top-N ever become Python objects."""

    v4_state: np.ndarray  # uint64 state slot
    v4_addr: np.ndarray  # uint64 address (masked), ascending within a state
    v4_count: np.ndarray  # int64
    v6_state: np.ndarray  # uint32
    v6_addr: np.ndarray  # (m, 4) uint32 big-endian words (masked)
    v6_count: np.ndarray  # int64
    prefix_v4: int
    prefix_v6: int

    def top(self, states: Iterable[int], n: int,
            incumbents: frozenset = frozenset()) -> list[tuple[RemoteKey, int]]:
        """The n remotes with most connections over `states` (summed), largest first; ties go
        to the lower address; `incumbents` (the previous top) get the hysteresis advantage."""
        states = np.fromiter(states, dtype=np.int64)
        addr4, count4 = _sum_over_states(self.v4_addr, self.v4_count,
                                         np.isin(self.v4_state, states))
        rows6 = np.isin(self.v6_state, states)
        addr6, count6 = self.v6_addr[rows6], self.v6_count[rows6]
        if len(addr6) and len(states) > 1:
            addr6, inverse = np.unique(addr6, axis=0, return_inverse=True)
            count6 = np.bincount(inverse.ravel(), weights=count6).astype(np.int64)
        pool: dict[RemoteKey, int] = {}
        for i in _largest(count4, n):
            pool[RemoteKey(4, int(addr4[i]), self.prefix_v4)] = int(count4[i])
        for i in _largest(count6, n):
            pool[_key6(addr6[i], self.prefix_v6)] = int(count6[i])
        held = {}
        for key in incumbents:
            if key.version == 4:
                j = int(np.searchsorted(addr4, key.value))
                found = j < len(addr4) and int(addr4[j]) == key.value
                count = int(count4[j]) if found else 0
            else:
                hit = np.flatnonzero((addr6 == _words6(key.value)).all(axis=1)) if len(addr6) else []
                count = int(count6[hit[0]]) if len(hit) else 0
            if count:
                held[key] = count
        return top_n({**pool, **held}, n, frozenset(held))


def _sum_over_states(addr: np.ndarray, count: np.ndarray, rows: np.ndarray):
    addr, count = addr[rows], count[rows]
    if len(addr) and np.any(addr[1:] <= addr[:-1]):  # several states: merge equal addresses
        addr, inverse = np.unique(addr, return_inverse=True)
        count = np.bincount(inverse, weights=count).astype(np.int64)
    return addr, count


def _largest(counts: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest counts in O(len); ties resolved toward lower indices (the
    arrays are sorted by address, so toward lower addresses)."""
    if n <= 0 or not len(counts):
        return np.zeros(0, dtype=np.intp)
    if len(counts) <= n:
        return np.arange(len(counts))
    threshold = np.partition(counts, len(counts) - n)[len(counts) - n]
    above = np.flatnonzero(counts > threshold)
    ties = np.flatnonzero(counts == threshold)[: n - len(above)]
    return np.concatenate([above, ties])


def _words6(value: int) -> np.ndarray:
    return np.array([(value >> (96 - 32 * i)) & 0xFFFFFFFF for i in range(4)], dtype=np.uint32)


def _key6(words: np.ndarray, prefix: int) -> RemoteKey:
    value = 0
    for word in words.tolist():
        value = (value << 32) | word
    return RemoteKey(6, value, prefix)


def top_n(counts: Mapping, n: int, incumbents: frozenset = frozenset()) -> list[tuple]:
    """Pick n keys by count, keeping the previous members unless clearly beaten.

    Worked example, n=1: counts {a: 10, b: 11}, incumbents {a}: a scores 10 * 1.1 + 1 = 12 and
    stays; with b at 13 instead, b takes the place. Keys must be orderable (ties: lower key).
    """
    def score(item):
        key, count = item
        bonus = count * HYSTERESIS_RATIO + HYSTERESIS_MIN if key in incumbents else count
        return (-bonus, key not in incumbents, _order(key))
    ranked = sorted(((k, c) for k, c in counts.items() if c > 0), key=score)[:max(0, n)]
    return sorted(ranked, key=lambda kc: (-kc[1], _order(kc[0])))


def _order(key):
    return (key.version, key.value) if isinstance(key, RemoteKey) else (0, key)


def _in_networks(v4: np.ndarray, v6: np.ndarray, networks) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks: which IPv4 (big-endian ints) and IPv6 (big-endian word rows) addresses
    fall in any of the networks."""
    hit4 = np.zeros(len(v4), dtype=bool)
    hit6 = np.zeros(len(v6), dtype=bool)
    for net in networks:
        if net.version == 4:
            hit4 |= (v4 & _mask32(net.prefixlen)) == int(net.network_address)
        elif len(v6):
            mask = _mask128_words(net.prefixlen)
            hit6 |= ((v6 & mask) == _words6(int(net.network_address))).all(axis=1)
    return hit4, hit6


def _count_remotes(v4_batches, v6_batches, options: RemoteOptions) -> RemoteCounts:
    keys = np.concatenate(v4_batches) if v4_batches else np.zeros(0, dtype=np.uint64)
    keys, counts4 = np.unique(keys, return_counts=True)
    if v6_batches:
        rows, counts6 = np.unique(np.concatenate(v6_batches), axis=0, return_counts=True)
    else:
        rows, counts6 = np.zeros((0, 5), dtype=np.uint32), np.zeros(0, dtype=np.int64)
    return RemoteCounts(
        v4_state=keys >> np.uint64(32), v4_addr=keys & np.uint64(0xFFFFFFFF),
        v4_count=counts4.astype(np.int64), v6_state=rows[:, 0], v6_addr=rows[:, 1:],
        v6_count=counts6.astype(np.int64), prefix_v4=options.prefix_v4,
        prefix_v6=options.prefix_v6)


@dataclass(frozen=True)
class RemoteSummary:
    # (state, remote label) -> count. Per state: the top-N labels, OTHER and (with filters)
    # EXCLUDED, summing exactly to that state's connection count.
    remote: Mapping[tuple[str, str], int]
    # (state, port label) -> server-side sockets (local port is a listening port): the top
    # ports and OTHER, summing to all server-side sockets in that state.
    local_port: Mapping[tuple[str, str], int]
    members: Mapping[str, frozenset]  # state -> RemoteKeys shown (input to the next sample)
    port_members: frozenset  # ports shown
    truncated: Mapping[str, int]  # metric -> label sets folded into OTHER by the series limit
    counts: RemoteCounts  # everything, for the CLI's ad-hoc top lists


class RemoteAccumulator:
    """Collects (state, remote) and (state, local port) keys batch by batch; counting is one
    sort of all keys in result()."""

    def __init__(self, options: RemoteOptions = RemoteOptions()):
        self.options = options
        self._mask4 = np.uint64(_mask32(options.prefix_v4))
        self._mask6 = _mask128_words(options.prefix_v6)
        self._v4: list[np.ndarray] = []  # uint64: state << 32 | address
        self._v6: list[np.ndarray] = []  # (n, 5) uint32: state, four big-endian words
        self._ports: list[np.ndarray] = []  # uint32: state << 16 | local port
        self._excluded = np.zeros(_STATE_SLOTS, dtype=np.int64)

    def add(self, table: SocketTable) -> None:
        state = table.state
        if not len(state):
            return
        connected = state != TcpState.LISTEN
        self._ports.append((state[connected].astype(np.uint32) << 16) | table.local_port[connected])
        sel = connected & (state != TcpState.CLOSE)
        state, family, words = state[sel], table.family[sel], table.remote_addr[sel]
        mapped = ((family == socket.AF_INET6) & (words[:, 0] == 0) & (words[:, 1] == 0)
                  & (words[:, 2] == _MAPPED_WORD))
        is_v4 = (family == socket.AF_INET) | mapped
        v4 = _be(np.where(mapped[is_v4], words[is_v4, 3], words[is_v4, 0]))
        state4, state6 = state[is_v4], state[~is_v4]
        v6 = _be(words[~is_v4])
        if self.options.include or self.options.exclude:
            keep4, keep6 = self._filter(v4, v6)
            self._excluded += np.bincount(state4[~keep4], minlength=_STATE_SLOTS)
            self._excluded += np.bincount(state6[~keep6], minlength=_STATE_SLOTS)
            v4, state4, v6, state6 = v4[keep4], state4[keep4], v6[keep6], state6[keep6]
        self._v4.append((state4.astype(np.uint64) << np.uint64(32))
                        | (v4.astype(np.uint64) & self._mask4))
        if len(v6):
            rows = np.empty((len(v6), 5), dtype=np.uint32)
            rows[:, 0] = state6
            rows[:, 1:] = v6 & self._mask6
            self._v6.append(rows)

    def _filter(self, v4: np.ndarray, v6: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows kept by --remote.include / --remote.exclude, tested on the full address."""
        opts = self.options
        keep4, keep6 = np.ones(len(v4), dtype=bool), np.ones(len(v6), dtype=bool)
        if opts.include:
            keep4, keep6 = _in_networks(v4, v6, opts.include)
        if opts.exclude:
            out4, out6 = _in_networks(v4, v6, opts.exclude)
            keep4, keep6 = keep4 & ~out4, keep6 & ~out6
        return keep4, keep6

    def result(self, state_totals: Mapping[str, int], listening_ports: Iterable[int],
               previous: "RemoteSummary | None" = None, listeners: int = 0) -> RemoteSummary:
        opts = self.options
        counts = _count_remotes(self._v4, self._v6, opts)
        chosen = {}
        for state in REMOTE_STATES:
            name = NETSTAT_STATES[state]
            before = previous.members.get(name, frozenset()) if previous else frozenset()
            chosen[name] = counts.top((state,), opts.top, before)
        ports = sorted(set(listening_ports))
        keys = np.concatenate(self._ports) if self._ports else np.zeros(0, dtype=np.uint32)
        by_port = np.bincount(keys, minlength=_STATE_SLOTS << 16).reshape(_STATE_SLOTS, 1 << 16)
        port_totals = {port: int(by_port[:, port].sum()) for port in ports}
        shown_ports = [p for p, _ in top_n(port_totals, opts.local_port_top,
                                           previous.port_members if previous else frozenset())]
        truncated = _apply_series_limit(chosen, shown_ports, listeners, opts.series_limit)
        remote = {}
        for state in REMOTE_STATES:
            name = NETSTAT_STATES[state]
            for key, count in chosen[name]:
                remote[(name, key.text(opts.mask_key))] = count
            excluded = int(self._excluded[state])
            remote[(name, OTHER)] = (state_totals[name] - excluded
                                     - sum(count for _key, count in chosen[name]))
            if opts.include or opts.exclude:
                remote[(name, EXCLUDED)] = excluded
        local_port = {}
        for state in PORT_STATES:
            name = NETSTAT_STATES[state]
            row = by_port[state]
            for port in shown_ports:
                local_port[(name, str(port))] = int(row[port])
            local_port[(name, OTHER)] = (int(row[ports].sum())
                                         - sum(int(row[p]) for p in shown_ports))
        return RemoteSummary(
            remote=MappingProxyType(remote), local_port=MappingProxyType(local_port),
            members=MappingProxyType({n: frozenset(k for k, _ in c) for n, c in chosen.items()}),
            port_members=frozenset(shown_ports), truncated=MappingProxyType(truncated),
            counts=counts)


def _apply_series_limit(chosen: dict[str, list], shown_ports: list[int], listeners: int,
                        limit: int) -> dict[str, int]:
    """Trim labelled series until they fit in `limit`; return the series cut per metric.

    Cut first: remote entries, smallest count first (one series each; their connections
    fold into OTHER, so sums stay exact); then ports, smallest first (one series per state,
    folded into OTHER); then listeners, emptiest first (a queue-length and a backlog series
    each; still counted in netstat_tcp_listeners). OTHER/EXCLUDED series are never cut.
    Mutates `chosen` and `shown_ports`.
    """
    per_port = len(PORT_STATES)
    used = (MIN_SERIES_LIMIT + sum(len(v) for v in chosen.values())
            + per_port * len(shown_ports) + 2 * listeners)
    truncated = dict.fromkeys(SERIES_LIMITED, 0)
    entries = sorted(((count, name, key) for name, items in chosen.items() for key, count in items),
                     key=lambda e: (e[0], _order(e[2])))
    for count, name, key in entries:
        if used <= limit:
            break
        chosen[name].remove((key, count))
        used -= 1
        truncated["netstat_tcp_remote_connections"] += 1
    while used > limit and shown_ports:
        shown_ports.pop()
        used -= per_port
        truncated["netstat_tcp_local_port_connections"] += per_port
    while used > limit and listeners:
        listeners -= 1
        used -= 2
        truncated["netstat_tcp_listen_queue_length"] += 1
        truncated["netstat_tcp_listen_backlog"] += 1
    return truncated


# ---------------------------------------------------------------------------------------
# Per owning program (netstat -p).

NO_PROGRAM = "none"  # no process holds the socket: TIME_WAIT, SYN_RECV requests, orphans
UNKNOWN_PROGRAM = "unknown"  # a process holds it, but we could not see which


@dataclass(frozen=True)
class ProgramSummary:
    # (state, program label) -> sockets. Per state: the top programs, OTHER, NO_PROGRAM and
    # UNKNOWN_PROGRAM, summing exactly to that state's count.
    connections: Mapping[tuple[str, str], int]
    members: frozenset  # programs shown (input to the next sample's hysteresis)
    processes: int
    skipped: int


def _top_with_remainder(per_key: Mapping[str, Mapping[str, int]], top: int,
                        incumbents: frozenset) -> tuple[list[str], dict[str, int]]:
    """The `top` keys by their count over all states (top_n's hysteresis), and per state
    the count of every other key: the OTHER bucket that keeps the sums exact."""
    totals = {key: sum(states.values()) for key, states in per_key.items()}
    shown = [key for key, _ in top_n(totals, top, incumbents)]
    rest = [states for key, states in per_key.items() if key not in set(shown)]
    return shown, {state: sum(states[state] for states in rest)
                   for state in NETSTAT_STATES.values()}


def _program_label(name: str) -> str:
    """A program called "other", "none" or "unknown" must not merge with those buckets."""
    return f"{name} (program)" if name in (OTHER, NO_PROGRAM, UNKNOWN_PROGRAM) else name


class ProgramAccumulator:
    """Counts sockets per (state, owning program) with the owners map of processes.read()."""

    def __init__(self, owners, top: int = 20):
        self.owners = owners
        self.top = top
        # program slots, then NO_PROGRAM, then UNKNOWN_PROGRAM
        self._slots = len(owners.programs) + 2
        self._counts = np.zeros((_STATE_SLOTS, self._slots), dtype=np.int64)

    def add(self, table: SocketTable) -> None:
        inodes = table.inode.astype(np.uint64)
        slot = np.full(len(inodes), self._slots - 1, dtype=np.intp)  # unknown unless found
        known = self.owners.inodes
        if len(known):
            where = np.minimum(np.searchsorted(known, inodes), len(known) - 1)
            found = known[where] == inodes
            slot[found] = self.owners.program[where[found]]
        slot[inodes == 0] = self._slots - 2
        state = table.state.astype(np.intp)
        self._counts += np.bincount(state * self._slots + slot, minlength=_STATE_SLOTS * self._slots
                                    ).reshape(_STATE_SLOTS, self._slots)

    def result(self, previous: "ProgramSummary | None" = None) -> ProgramSummary:
        per_program = {name: {label: int(self._counts[state, i])
                              for state, label in NETSTAT_STATES.items()}
                       for i, name in enumerate(self.owners.programs)}
        shown, other = _top_with_remainder(per_program, self.top,
                                           previous.members if previous else frozenset())
        connections = {}
        for state, label in NETSTAT_STATES.items():
            for name in shown:
                connections[(label, _program_label(name))] = per_program[name][label]
            connections[(label, NO_PROGRAM)] = int(self._counts[state, -2])
            connections[(label, UNKNOWN_PROGRAM)] = int(self._counts[state, -1])
            connections[(label, OTHER)] = other[label]
        return ProgramSummary(connections=MappingProxyType(connections), members=frozenset(shown),
                              processes=self.owners.processes, skipped=self.owners.skipped)


# ---------------------------------------------------------------------------------------
# Per network namespace (containers, `ip netns`), bounded like the other outside-fed labels.

@dataclass(frozen=True)
class NetnsSummary:
    # (namespace label, state) -> sockets; the top namespaces by sockets, the rest in OTHER
    connections: Mapping[tuple[str, str], int]
    members: frozenset
    namespaces: int  # namespaces read
    unreadable: int  # namespaces or processes we may not look into


def summarize_namespaces(per_namespace: Mapping[str, Mapping[str, int]], top: int,
                         unreadable: int = 0,
                         previous: "NetnsSummary | None" = None) -> NetnsSummary:
    """per_namespace: name -> state -> count (every state present)."""
    shown, other = _top_with_remainder(per_namespace, top,
                                       previous.members if previous else frozenset())
    connections = {}
    for state in NETSTAT_STATES.values():
        for name in shown:
            connections[(name, state)] = per_namespace[name][state]
        connections[(OTHER, state)] = other[state]
    return NetnsSummary(connections=MappingProxyType(connections), members=frozenset(shown),
                        namespaces=len(per_namespace), unreadable=unreadable)
