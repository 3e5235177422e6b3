"""Per remote address and per local port (the seed's recipes), with hard cardinality bounds:
prefixes, include/exclude lists and masking decide what a label is; ranking and the series
limit decide which labels are shown.

Every remote address, IPv4 or IPv6, is one 128-bit key held as two uint64 words in the
kernel's byte order (no byteswap per socket), so both families cost the same. Sockets are
counted by (address words, state and family) as the kernel gives them, in a hash map kept in
numpy arrays (KeyCounter) whose every lookup compares the full key (exact); the map is handed
from one sample to the next, so a sample mostly looks keys up rather than inserting them.
Only the distinct keys then take their IPv4-mapped form (::ffff:a.b.c.d, so an IPv6
socket's mapped peer and an IPv4 socket's peer are one remote), filters and prefixes. No
sort over all sockets, no `np.unique(axis=0)`; only the few addresses that make a top-N
become Python objects.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

import numpy as np

from ..sources.table import NETSTAT_STATES, SocketTable, TcpState
from .ranking import OTHER, top_n
from .series import apply_series_limit
from .states import PORT_STATES, REMOTE_STATES, STATE_SLOTS, count_small, count_state_family

EXCLUDED = "excluded"  # addresses left out by --remote.include / --remote.exclude
_ALL = (1 << 128) - 1


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
    # A remote gets its own series only with at least this many connections in a state: a
    # flood from random sources (one SYN each) lands in OTHER instead of making a new
    # series per source and sample. The exporter's default (--remote.min-connections) is 2.
    min_connections: int = 1


@dataclass(frozen=True, order=True)
class RemoteKey:
    """An address or network: version 4 or 6, its integer value (already masked), prefix.
    Ordered by those fields, so ranking ties go to IPv4 first, then the lower address."""
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


def _raw(value: int) -> tuple[int, int]:
    """A 128-bit big-endian value -> the two native uint64 words its 16 bytes make in memory,
    the form the kernel's addresses are read in. On a little-endian host,
    0x20010db8_00000000_00000000_00000001 (2001:db8::1) -> (0x0000_0000_b80d_0120,
    0x0100_0000_0000_0000)."""
    hi, lo = np.frombuffer(value.to_bytes(16, "big"), dtype=np.uint64)
    return int(hi), int(lo)


def _value(hi: int, lo: int) -> int:
    """The inverse of _raw: two native words -> the big-endian 128-bit value."""
    return int.from_bytes(np.array([hi, lo], dtype=np.uint64).tobytes(), "big")


def _mask128(prefix: int) -> int:
    return (_ALL << (128 - prefix)) & _ALL


# ::ffff:0.0.0.0/96: a key is IPv4 when its first 96 bits are these
_MAPPED_HI, _MAPPED_LO = _raw(0xFFFF << 32)
_MASK96_LO = _raw(_mask128(96))[1]
# An IPv4 address sits in bytes 0-3 of the kernel's 16-byte field; in its mapped form it
# sits in bytes 12-15, i.e. in the other half of the second native word.
_V4_IN_LO = (np.left_shift if np.little_endian else np.right_shift)


def _mapped(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    return (hi == _MAPPED_HI) & ((lo & np.uint64(_MASK96_LO)) == np.uint64(_MAPPED_LO))


def _network(net) -> tuple[int, int, int, int, bool]:
    """An ipaddress network -> (value hi, value lo, mask hi, mask lo, is IPv6) in raw words;
    an IPv4 network becomes its IPv4-mapped /96+prefix."""
    if net.version == 4:
        value, prefix = (0xFFFF << 32) | int(net.network_address), 96 + net.prefixlen
    else:
        value, prefix = int(net.network_address), net.prefixlen
    return (*_raw(value), *_raw(_mask128(prefix)), net.version == 6)


def _key_masks(options) -> tuple[int, int, int, int]:
    """Raw masks applied to IPv4 (mapped form: the 96-bit marker kept) and IPv6 keys."""
    return (*_raw(_mask128(96 + options.prefix_v4))[1:], *_raw(_mask128(options.prefix_v6)))


# Odd 64-bit multipliers, two per round.
_ROUNDS = ((0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F), (0xD6E8FEB86659FD93, 0xA0761D6478BD642F),
           (0x8EBC6AF09C88C6E3, 0x589965CC75374CC3), (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53))
_MAX_ROUNDS = 12
_TAG_MIX, _U64 = 0x9E3779B97F4A7C15, (1 << 64) - 1  # the tag's multiplier (odd), per round
_LARGE = 1 << 17  # count_keys gives larger inputs 2-4 slots per row, not 4-8 (memory)
_MIN_TABLE_BITS = 10  # KeyCounter's smallest table: 1024 slots (tests make it tiny)


def _buckets(hi: np.ndarray, lo: np.ndarray, tag: np.ndarray, round_: int,
             bits: int) -> np.ndarray:
    """Each key's bucket in a table of 2**bits for this round, as intp: the top bits of
    hi * c1 ^ (lo + tag * k) * c2, which every bit of hi and lo reaches (multiplicative
    hashing). k is odd and differs from round to round: with the same k in every round, the
    keys (hi, c - t, t) for every tag t shared a bucket in all of them (found in review),
    and a thirteenth such key could never be placed; now two keys with one hi agree on
    lo + tag * k in one round at most."""
    c_hi, c_lo = _ROUNDS[round_ % len(_ROUNDS)]
    bucket = np.multiply(tag, np.uint64(_TAG_MIX * (2 * round_ + 1) & _U64), dtype=np.uint64)
    bucket += lo
    if round_ >= len(_ROUNDS):  # past the table of multipliers: shift the input instead
        bucket += np.uint64(round_ // len(_ROUNDS))
    bucket *= np.uint64(c_lo)
    bucket ^= hi * np.uint64(c_hi)
    bucket >>= np.uint64(64 - bits)
    return bucket.view(np.intp)


def count_keys(hi: np.ndarray, lo: np.ndarray, tag: np.ndarray,
               weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (tag, hi, lo) keys: (index of one row holding each, its count or summed
    weight), in no particular order; weights are summed in float64, exact while a key's sum
    stays below 2**53 (socket counts, the only weights passed, always do). Exact: every row
    is compared with the row that won its bucket, in full; rows of other keys go round again
    with another hash, and the few left after _MAX_ROUNDS are sorted.

    Worked example: hi [0, 0, 0], lo [5, 7, 5], tag [1, 1, 1] -> rows [0, 1] (some order),
    counts [2, 1]."""
    rows = np.arange(len(hi))
    found, counts = [], []
    for round_ in range(_MAX_ROUNDS):
        if not len(rows):
            break
        # 4-8 slots per row, few collide; 2-4 for large inputs, to bound the memory
        slots = (4 if len(rows) <= _LARGE else 2) * len(rows)
        bits = max(4, (slots - 1).bit_length())
        bucket = _buckets(hi, lo, tag, round_, bits)
        index = rows if round_ == 0 else np.arange(len(rows))
        owner = np.empty(1 << bits, dtype=np.int32)  # len(rows) < 2**31: a dump is smaller
        owner[bucket] = index  # the last write wins
        won = owner[bucket].astype(np.intp)
        del bucket, owner  # the peak of a 1M-socket sample is here
        same = hi[won] == hi
        same &= lo[won] == lo
        same &= tag[won] == tag
        everyone = bool(same.all())
        winners = np.flatnonzero(won == index)  # the rows that own their bucket
        # tallied on the winning row's index
        if everyone:
            tally = np.bincount(won, weights=weights, minlength=len(rows))
        else:
            tally = np.bincount(won[same], minlength=len(rows),
                                weights=None if weights is None else weights[same])
        found.append(rows[winners])
        counts.append(tally[winners])
        if everyone:
            rows = rows[:0]
            break
        rest = ~same
        rows, hi, lo, tag = rows[rest], hi[rest], lo[rest], tag[rest]
        weights = None if weights is None else weights[rest]
    if len(rows):  # practically never: keys that lost every round
        table = np.empty(len(rows), dtype=[("tag", tag.dtype), ("hi", "u8"), ("lo", "u8")])
        table["tag"], table["hi"], table["lo"] = tag, hi, lo
        _u, first, inverse = np.unique(table, return_index=True, return_inverse=True)
        found.append(rows[first])
        counts.append(np.bincount(inverse.ravel(), weights=weights))
    if not found:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.int64)
    return np.concatenate(found), np.concatenate(counts).astype(np.int64)


_LOOKUP_ROWS = 1 << 17  # rows RemoteAccumulator looks up at a time


class KeyCounter:
    """Counts of distinct (hi, lo, tag) keys over any number of batches: a hash map in numpy
    arrays, so a batch is counted by looking its rows up (a few vectorised passes) and only
    keys not seen before are counted among themselves (count_keys) and inserted.

    The keys live in arrays (hi, lo, tag, count) indexed by insertion order; tables[r] maps
    round r's bucket of a key (_buckets) to its index, -1 when empty. A key sits in the first
    round whose bucket was free when it was inserted, so every earlier round's bucket holds
    another key; nothing is ever removed. A lookup therefore goes round by round: a match is
    found, an empty bucket proves the key is new, another key sends it to the next round.
    Round 0's table holds at most a quarter as many keys as slots (later rounds, which get
    fewer keys, are smaller); past that every table is rebuilt with 8 slots per key.

    Before this, every 64k rows were counted by themselves and the counts merged level by
    level: with 1M sockets of 100k remotes the merges took as long as the counting.
    """

    def __init__(self, expected: int | None = None):
        # round 0's table: 4 slots per expected key
        self._bits = max(_MIN_TABLE_BITS, (4 * max(expected or 0, 256) - 1).bit_length())
        self._tables: list[np.ndarray] = []
        self.size = 0
        self.hi = np.empty(0, dtype=np.uint64)
        self.lo = np.empty(0, dtype=np.uint64)
        self.tag = np.empty(0, dtype=np.uint8)
        self.count = np.empty(0, dtype=np.int64)

    def _table_bits(self, round_: int) -> int:
        return max(_MIN_TABLE_BITS, self._bits - 2 * round_)

    def add(self, hi: np.ndarray, lo: np.ndarray, tag: np.ndarray,
            weights: np.ndarray | None = None) -> None:
        """Count each row once (or by its weight: non-negative integers whose sums stay below
        2**53, as socket counts do: bincount adds weights in float64)."""
        rows = np.arange(len(hi))
        new = []
        for round_, table in enumerate(self._tables):
            if not len(rows):
                break
            h, lo_, t = (hi, lo, tag) if round_ == 0 else (hi[rows], lo[rows], tag[rows])
            w = weights if weights is None or round_ == 0 else weights[rows]
            # intp once: every gather below would convert an int32 index array again
            owner = table[_buckets(h, lo_, t, round_, self._table_bits(round_))].astype(np.intp)
            # an empty bucket (-1) reads the arrays' last slot, maybe a key, maybe garbage
            # that looks like one: `taken` masks it
            taken = owner >= 0
            hit = np.take(self.hi, owner) == h
            hit &= np.take(self.lo, owner) == lo_
            hit &= np.take(self.tag, owner) == t
            hit &= taken
            if hit.all():  # every row a known key: the usual case once a dump is under way
                self.count[:self.size] += np.bincount(owner, weights=w, minlength=self.size
                                                      ).astype(np.int64, copy=False)
                rows = rows[:0]
                break
            # The rows missed are usually few: they are handled by index, and the hits counted
            # in place, the misses sent to a bin past the end (no copy of the hits).
            missed = np.flatnonzero(~hit)
            bucket_owner = owner[missed]
            owner[missed] = self.size
            self.count[:self.size] += np.bincount(owner, weights=w, minlength=self.size + 1
                                                  )[:self.size].astype(np.int64, copy=False)
            new.append(rows[missed[bucket_owner < 0]])  # an empty bucket: not in the map
            rows = rows[missed[bucket_owner >= 0]]  # another key's bucket: the next round
        new.append(rows)
        new = np.concatenate(new) if len(new) > 1 else new[0]
        if len(new):
            h, lo_, t = hi[new], lo[new], tag[new]
            w = None if weights is None else weights[new]
            first, counts = count_keys(h, lo_, t, w)
            self._insert(h[first], lo_[first], t[first], counts)

    def _insert(self, hi, lo, tag, counts) -> None:
        """Distinct keys that are not in the map yet."""
        start, end = self.size, self.size + len(hi)
        if end > len(self.hi):  # grow the arrays, doubling
            room = max(2 * len(self.hi), end, 1024)
            for name in ("hi", "lo", "tag", "count"):
                old = getattr(self, name)
                grown = np.empty(room, dtype=old.dtype)
                grown[:len(old)] = old
                setattr(self, name, grown)
        self.hi[start:end], self.lo[start:end], self.tag[start:end] = hi, lo, tag
        self.count[start:end] = counts
        self.size = end
        if 4 * end > 1 << self._bits:  # too full: larger tables, every key placed again
            self._bits = (4 * 2 * end - 1).bit_length()
            self._tables = []
            self._place(np.arange(end))
        else:
            self._place(np.arange(start, end))

    def _place(self, keys: np.ndarray) -> None:
        for round_ in range(_MAX_ROUNDS):
            if not len(keys):
                return
            if round_ == len(self._tables):
                self._tables.append(np.full(1 << self._table_bits(round_), -1, dtype=np.int32))
            table = self._tables[round_]
            bucket = _buckets(self.hi[keys], self.lo[keys], self.tag[keys], round_,
                              self._table_bits(round_))
            free = table[bucket] < 0
            table[bucket[free]] = keys[free]  # keys that share a free bucket: the last wins
            placed = np.zeros(len(keys), dtype=bool)
            placed[free] = table[bucket[free]] == keys[free]
            keys = keys[~placed]
        if len(keys):  # practically never: rebuild larger, with other buckets for everyone
            if self._bits > (8 * max(self.size, 256) - 1).bit_length() + 4:
                # 128 slots per key and still no room: the keys defeat the hash; fail the
                # read rather than grow the tables until memory runs out
                raise RuntimeError(f"remote key map: {len(keys)} keys share a bucket in "
                                   f"every round of a table of 2**{self._bits}")
            self._bits += 2
            self._tables = []
            self._place(np.arange(self.size))

    def items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(hi, lo, tag, count) of every key, in insertion order (counts may be 0)."""
        n = self.size
        return self.hi[:n], self.lo[:n], self.tag[:n], self.count[:n]

    def reuse(self) -> "KeyCounter":
        """This map for the next sample: counts back to 0, the keys kept (most will be seen
        again, and a lookup costs a fraction of an insert); when more keys went unseen than
        were seen, only the seen ones are kept, so churn cannot grow it without bound."""
        n = self.size
        seen = np.flatnonzero(self.count[:n] != 0)
        if n - len(seen) > max(len(seen), 1024):
            fresh = KeyCounter(len(seen))
            fresh._insert(self.hi[seen], self.lo[seen], self.tag[seen],
                          np.zeros(len(seen), dtype=np.int64))
            return fresh
        self.count[:n] = 0
        return self


@dataclass(frozen=True, eq=False)
class RemoteCounts:
    """Connections per distinct (state, remote): raw 128-bit keys (see the module's comment),
    grouped by state, in no particular order within a state. Only the few addresses that
    make a top-N ever become Python objects."""

    state: np.ndarray  # uint8 state slot, ascending
    hi: np.ndarray  # uint64 raw words of the (masked) address, IPv4 in its mapped form
    lo: np.ndarray
    count: np.ndarray  # int64
    prefix_v4: int
    prefix_v6: int

    def __len__(self) -> int:
        return len(self.count)

    def _rows(self, state: int) -> slice:
        return slice(*np.searchsorted(self.state, [state, state + 1]).tolist())

    def top(self, states: Iterable[int], n: int, incumbents: frozenset = frozenset(),
            minimum: int = 1) -> list[tuple[RemoteKey, int]]:
        """The n remotes with most connections over `states` (summed), largest first; ties go
        to IPv4, then to the lower address; `incumbents` (the previous top) get the
        hysteresis advantage; only remotes with at least `minimum` connections compete (the
        n largest hold every one that does)."""
        parts = [self._rows(int(s)) for s in sorted(set(states))]
        hi, lo, count = (np.concatenate([column[p] for p in parts]) if len(parts) != 1
                         else column[parts[0]] for column in (self.hi, self.lo, self.count))
        if len(parts) > 1 and len(count):  # several states: merge equal addresses
            rows, count = count_keys(hi, lo, np.zeros(len(hi), dtype=np.uint8), count)
            hi, lo = hi[rows], lo[rows]
        pool = {self._key(hi[i], lo[i]): int(count[i]) for i in _best(hi, lo, count, n).tolist()}
        held = {}
        for key in incumbents:
            found = pool.get(key)
            if found is None:
                raw_hi, raw_lo = _raw((0xFFFF << 32 | key.value) if key.version == 4 else key.value)
                hit = np.flatnonzero((lo == np.uint64(raw_lo)) & (hi == np.uint64(raw_hi)))
                found = int(count[hit[0]]) if len(hit) else 0
            if found:
                held[key] = found
        return top_n({**pool, **held}, n, frozenset(held), minimum)

    def _key(self, hi, lo) -> RemoteKey:
        value = _value(int(hi), int(lo))
        if value >> 32 == 0xFFFF:  # ::ffff:a.b.c.d, i.e. IPv4 (IPv6 keys never look mapped)
            return RemoteKey(4, value & 0xFFFFFFFF, self.prefix_v4)
        return RemoteKey(6, value, self.prefix_v6)


def _best(hi: np.ndarray, lo: np.ndarray, count: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest counts in O(len); ties go to IPv4, then to the lower address
    (RemoteKey's order)."""
    if n <= 0 or not len(count):
        return np.zeros(0, dtype=np.intp)
    if len(count) <= n:
        return np.arange(len(count))
    threshold = _nth_largest(count, n)
    above = np.flatnonzero(count > threshold)
    ties = np.flatnonzero(count == threshold)
    return np.concatenate([above, ties[_lowest(hi[ties], lo[ties], n - len(above))]])


def _nth_largest(values: np.ndarray, n: int) -> int:
    """The n-th largest of non-negative integers, by bisecting values rather than positions:
    np.partition degrades badly on what counts look like (thousands of 1s and one large
    count: 5 ms for 50k values, against a few passes here)."""
    pool, above = values, 0  # candidates left; how many values lie above them
    while True:
        low, high = int(pool.min()), int(pool.max())
        if low == high:
            return low
        middle = (low + high + 1) // 2
        upper = pool >= middle
        at_least = above + int(np.count_nonzero(upper))
        if at_least >= n:  # the answer is >= middle
            pool = pool[upper]
        else:
            pool, above = pool[~upper], at_least


def _lowest(hi: np.ndarray, lo: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k lowest distinct keys in RemoteKey's order (IPv4 first, then by value)
    in O(len)."""
    if k >= len(hi):
        return np.arange(len(hi))
    v4 = _mapped(hi, lo)
    four = np.flatnonzero(v4)
    if len(four) >= k:  # an IPv4 key's value is in lo alone
        value = _be(lo[four])
        return four[np.flatnonzero(value <= _kth_smallest(value, k))]
    six = np.flatnonzero(~v4)
    return np.concatenate([four, six[_lowest_pairs(_be(hi[six]), _be(lo[six]),
                                                   k - len(four))]])


def _lowest_pairs(first: np.ndarray, second: np.ndarray, k: int) -> np.ndarray:
    """The k lowest of distinct (first, second) pairs, in no particular order."""
    if k >= len(first):
        return np.arange(len(first))
    cut = _kth_smallest(first, k)
    below = np.flatnonzero(first < cut)
    equal = np.flatnonzero(first == cut)
    need = k - len(below)
    if need < len(equal):
        tail = second[equal]
        equal = equal[tail <= _kth_smallest(tail, need)]
    return np.concatenate([below, equal])


def _kth_smallest(values: np.ndarray, k: int) -> int:
    """The k-th smallest value (1 <= k <= len). A strided sample's k-th smallest bounds it
    from above, so only the values under that bound are partitioned: a few hundred rather
    than, say, 50k remotes tied at one connection each."""
    if len(values) > 64 * k:
        sample = values[::len(values) // (16 * k)]
        values = values[values <= np.partition(sample, k - 1)[k - 1]]
    return np.partition(values, k - 1)[k - 1]


def _be(words: np.ndarray) -> np.ndarray:
    """Raw native words -> their big-endian values (the address order)."""
    return words.byteswap() if np.little_endian else words


def _address_words(addr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 4) uint32 address words -> the two native uint64 words of each 16-byte address,
    as views when the rows allow it (the decoder's columns do)."""
    try:
        pairs = addr.view(np.uint64)
    except ValueError:  # a last axis that is not contiguous
        pairs = np.ascontiguousarray(addr).view(np.uint64)
    return pairs[:, 0], pairs[:, 1]


def _as_mapped(hi: np.ndarray, lo: np.ndarray,
               v4: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw key words -> new (hi, lo) arrays with every `v4` row (an IPv4 address in bytes
    0-3) in its IPv4-mapped form, ::ffff:a.b.c.d."""
    return (np.where(v4, np.uint64(_MAPPED_HI), hi),
            np.where(v4, _V4_IN_LO(hi, np.uint64(32)) | np.uint64(_MAPPED_LO), lo))


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
    # client-side TIME_WAIT (local port not a listening one) per destination "addr:port",
    # the top --remote.top and OTHER: the sockets that hold ephemeral ports toward one
    # destination, which is where ports run out (server-side TIME_WAIT holds none)
    client_time_wait: Mapping[str, int] = field(default_factory=dict)
    client_time_wait_members: frozenset = frozenset()
    # the key map, for the next sample to take (list.pop: one taker even if a blocked read
    # and its successor both start from this summary)
    handoff: list = field(default_factory=list, compare=False, repr=False)


class RemoteAccumulator:
    """Counts (state, remote) keys batch by batch (KeyCounter) and collects (state, local
    port) keys, counted per listening port in result()."""

    def __init__(self, options: RemoteOptions = RemoteOptions(),
                 previous: "RemoteSummary | None" = None):
        """previous: the last sample's summary, whose key map this one takes over."""
        self.options = options
        self._masks = _key_masks(options)  # (IPv4 lo, IPv6 hi, IPv6 lo) raw masks
        self._masked = options.prefix_v4 < 32 or options.prefix_v6 < 128
        self._networks = ([_network(n) for n in options.include],
                          [_network(n) for n in options.exclude])
        # (raw address words as two uint64, tag = state * 2 + family index) -> sockets
        try:
            self._keys = previous.handoff.pop().reuse()
        except (AttributeError, IndexError):  # no previous sample, or its map is taken
            self._keys = KeyCounter()
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # not looked up
        self._pending_rows = 0
        # connected sockets' (state, local port), counted per listening port in result()
        self._port_state: list[np.ndarray] = []
        self._port: list[np.ndarray] = []
        self._excluded = np.zeros(STATE_SLOTS, dtype=np.int64)
        self._time_wait: list[tuple[np.ndarray, ...]] = []  # (hi, lo, remote port, local port)

    def add(self, table: SocketTable, counts: np.ndarray | None = None,
            key: np.ndarray | None = None) -> None:
        """counts, key: count_state_family's for this batch when the caller has them
        (TcpAccumulator does): the counts tell which passes over the batch can be skipped,
        the key is the tag below.

        Rows are kept as the kernel gives them (raw address words, and a tag of state * 2 +
        family index): the IPv4-mapped form, filters and prefixes are applied once per
        distinct key when a chunk is counted, not once per socket."""
        state = table.state
        if not len(state):
            return
        if counts is None or key is None:
            key, counts = count_state_family(table, "TCP")
        if counts[TcpState.TIME_WAIT].any():
            waiting = np.flatnonzero(state == TcpState.TIME_WAIT)
            tw_hi, tw_lo = _as_mapped(*_address_words(table.remote_addr[waiting]),
                                      table.family[waiting] == socket.AF_INET)
            self._time_wait.append((tw_hi, tw_lo, table.remote_port[waiting].copy(),
                                    table.local_port[waiting].copy()))
        tag = key  # uint8: state * 2 + family index
        port, addr = table.local_port, table.remote_addr
        if counts[TcpState.LISTEN].any() or counts[TcpState.CLOSE].any():
            connected = state != TcpState.LISTEN
            peered = connected & (state != TcpState.CLOSE)
            self._port_state.append(state[connected])
            self._port.append(port[connected])
            tag, addr = tag[peered], addr[peered]
        else:  # most batches hold connected sockets only (kept as they are: the decoder's
            # columns are arrays of their own, holding at most the family and peer port too)
            self._port_state.append(state)
            self._port.append(port)
        hi, lo = _address_words(addr)
        self._pending.append((hi, lo, tag))
        self._pending_rows += len(tag)
        if self._pending_rows >= _LOOKUP_ROWS:
            self._look_up()

    def _look_up(self) -> None:
        """Count the pending rows. Looked up many batches at a time: between two batches
        the kernel's walk evicts the map from cache, and a larger lookup reuses what it
        brings back (at 1M sockets of 100k remotes, per batch cost twice as much)."""
        if self._pending:
            self._keys.add(*(np.concatenate(column) for column in zip(*self._pending)))
        self._pending, self._pending_rows = [], 0

    def _filter(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Rows kept by --remote.include / --remote.exclude, tested on the full address. An
        IPv6 network never holds an IPv4 (mapped) peer; an IPv4 one only those."""
        mapped = _mapped(hi, lo)

        def hits(networks):
            hit = np.zeros(len(hi), dtype=bool)
            for net_hi, net_lo, mask_hi, mask_lo, is_v6 in networks:
                match = ((hi & np.uint64(mask_hi)) == np.uint64(net_hi)) \
                    & ((lo & np.uint64(mask_lo)) == np.uint64(net_lo))
                hit |= match & ~mapped if is_v6 else match
            return hit
        include, exclude = self._networks
        keep = hits(include) if include else np.ones(len(hi), dtype=bool)
        return keep & ~hits(exclude) if exclude else keep

    def _counts(self) -> RemoteCounts:
        """Every distinct (state, remote) with its count: the raw keys counted so far, in
        IPv4-mapped form, filtered and cut to their prefix (per distinct key, not per socket),
        and counted as one where that made two keys one."""
        opts = self.options
        self._look_up()
        hi, lo, tag, counts = self._keys.items()
        seen = counts > 0  # keys kept from earlier samples but not seen in this one: 0
        if not seen.all():
            hi, lo, tag, counts = hi[seen], lo[seen], tag[seen], counts[seen]
        state = tag >> 1
        v4 = (tag & 1) == 0
        hi, lo = _as_mapped(hi, lo, v4)
        if self._networks[0] or self._networks[1]:
            keep = self._filter(hi, lo)
            self._excluded += np.bincount(state[~keep], weights=counts[~keep],
                                          minlength=STATE_SLOTS).astype(np.int64)
            state, hi, lo, counts, v4 = state[keep], hi[keep], lo[keep], counts[keep], v4[keep]
        if self._masked:
            mask4_lo, mask6_hi, mask6_lo = (np.uint64(m) for m in self._masks)
            lo = lo & np.where(_mapped(hi, lo), mask4_lo, mask6_lo)
            hi = hi & mask6_hi  # a mapped key's first word is 0 whatever the mask
        # an IPv6 socket's mapped peer and an IPv4 socket's peer, or two addresses a prefix
        # joins, may now be one key: count them as one
        if len(counts) and (self._masked or (~v4 & _mapped(hi, lo)).any()):
            rows, counts = count_keys(hi, lo, state, counts)
            hi, lo, state = hi[rows], lo[rows], state[rows]
        order = np.argsort(state, kind="stable")  # a radix sort of bytes
        return RemoteCounts(state=state[order], hi=hi[order], lo=lo[order], count=counts[order],
                            prefix_v4=opts.prefix_v4, prefix_v6=opts.prefix_v6)

    def result(self, state_totals: Mapping[str, int], listening_ports: Iterable[int],
               previous: "RemoteSummary | None" = None, listeners: int = 0,
               backlog_known: bool = True) -> RemoteSummary:
        opts = self.options
        counts = self._counts()
        chosen = {}
        for state in REMOTE_STATES:
            name = NETSTAT_STATES[state]
            before = previous.members.get(name, frozenset()) if previous else frozenset()
            chosen[name] = counts.top((state,), opts.top, before, opts.min_connections)
        ports = sorted(set(listening_ports))
        by_port = self._by_port(ports)  # [state, position in ports]
        column = {port: i for i, port in enumerate(ports)}
        port_totals = dict(zip(ports, by_port.sum(0).tolist()))
        shown_ports = [p for p, _ in top_n(port_totals, opts.local_port_top,
                                           previous.port_members if previous else frozenset())]
        truncated = apply_series_limit(chosen, shown_ports, listeners, opts.series_limit,
                                       backlog_known=backlog_known)
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
            row = by_port[state].tolist()
            for port in shown_ports:
                local_port[(name, str(port))] = row[column[port]]
            local_port[(name, OTHER)] = sum(row) - sum(row[column[p]] for p in shown_ports)
        client, client_members = self._client_time_wait(
            ports, previous.client_time_wait_members if previous else frozenset())
        return RemoteSummary(
            remote=MappingProxyType(remote), local_port=MappingProxyType(local_port),
            members=MappingProxyType({n: frozenset(k for k, _ in c) for n, c in chosen.items()}),
            port_members=frozenset(shown_ports), truncated=MappingProxyType(truncated),
            counts=counts, client_time_wait=MappingProxyType(client),
            client_time_wait_members=client_members, handoff=[self._keys])

    def _by_port(self, listening: list[int]) -> np.ndarray:
        """Connected sockets per (state, listening port): [state, position in `listening`],
        by a gather through a port -> position table and a small bincount per batch (batch
        by batch: at 1M sockets one pass over all would need 20 MB of temporaries)."""
        slots = (len(listening) + 1) * STATE_SLOTS
        counted = np.zeros(slots, dtype=np.int64)
        if listening:
            # port -> its position * STATE_SLOTS; one more position takes every other port
            # (a small table gathers fast: 128 KiB for fewer than 4095 listening ports)
            narrow = np.uint16 if slots <= 1 << 16 else np.int32
            column = np.full(1 << 16, len(listening) * STATE_SLOTS, dtype=narrow)
            column[listening] = np.arange(len(listening)) * STATE_SLOTS
            for port, state in zip(self._port, self._port_state):
                keys = column[port]
                keys += state
                counted += count_small(keys, slots)
        return counted.reshape(-1, STATE_SLOTS)[:-1].T

    def _client_time_wait(self, listening: list[int], incumbents: frozenset):
        """TIME_WAIT sockets whose local port is not a listening port (we connected out),
        counted per destination address and port; exact addresses (no prefix), labels
        masked like the remotes', and --remote.include/--remote.exclude applied: a
        destination they leave out is counted in destination="excluded" (it was labelled
        regardless, found in review: an excluded address leaked through this metric)."""
        filtered = bool(self._networks[0] or self._networks[1])
        if not self._time_wait:
            return ({OTHER: 0, EXCLUDED: 0} if filtered else {OTHER: 0}), frozenset()
        hi, lo, rport, lport = (np.concatenate(column) for column in zip(*self._time_wait))
        client = ~np.isin(lport, np.asarray(listening, dtype=lport.dtype))
        hi, lo, rport = hi[client], lo[client], rport[client]
        excluded = 0
        if filtered:
            keep = self._filter(hi, lo)
            excluded = len(keep) - int(np.count_nonzero(keep))
            hi, lo, rport = hi[keep], lo[keep], rport[keep]
        # no rows left: count_keys finds no key, and the result is OTHER (and EXCLUDED) alone
        rows, counts = count_keys(hi, lo, rport.astype(np.uint64))
        destinations = {}
        for row, count in zip(rows.tolist(), counts.tolist()):
            value = _value(int(hi[row]), int(lo[row]))
            key = (RemoteKey(4, value & 0xFFFFFFFF, 32) if value >> 32 == 0xFFFF
                   else RemoteKey(6, value, 128))
            destinations[(key, int(rport[row]))] = count
        shown = [dest for dest, _count in top_n(destinations, self.options.top, incumbents,
                                                self.options.min_connections)]
        out = {}
        for key, port in shown:
            text = key.text(self.options.mask_key)
            out[f"[{text}]:{port}" if key.version == 6 else f"{text}:{port}"] = \
                destinations[(key, port)]
        out[OTHER] = int(counts.sum()) - sum(out.values())
        if filtered:
            out[EXCLUDED] = excluded
        return out, frozenset(shown)
