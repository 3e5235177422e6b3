"""The conntrack table (`netstat -M`, `conntrack -L`): a ctnetlink dump over NETLINK_NETFILTER,
decoded in bulk like the socket dump, or /proc/net/nf_conntrack where ctnetlink is refused.

A ctnetlink entry is a list of attributes, some nested (include/uapi/linux/netfilter/
nfnetlink_conntrack.h). What we keep of each, as one row of a FlowTable:
    CTA_TUPLE_ORIG { CTA_TUPLE_IP { CTA_IP_V4_SRC 7f000001 ... } CTA_TUPLE_PROTO { CTA_PROTO_NUM 6 ... } }
    CTA_STATUS 0000000e (big-endian: SEEN_REPLY | ASSURED | CONFIRMED)
    CTA_PROTOINFO { CTA_PROTOINFO_TCP { CTA_PROTOINFO_TCP_STATE 3 ... } }
-> family 2, protocol 6, state 3 (ESTABLISHED), status 0xe, source 127.0.0.1.
The order of the top-level attributes differs between kernels, so they are walked, all
entries of a batch at once: one numpy step per attribute position, not per entry.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import struct
from typing import Iterator

import numpy as np

from . import files, sockdiag

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET = 0, 1
# include/uapi/linux/netfilter/nfnetlink.h: struct nfgenmsg (family, version, res_id big-endian)
NFGENMSG = struct.Struct("=BBH")
CTA_TUPLE_ORIG, CTA_STATUS, CTA_PROTOINFO = 1, 3, 4
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V6_SRC = 1, 3
CTA_PROTO_NUM = 1
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
# include/uapi/linux/netfilter/nf_conntrack_common.h: enum ip_conntrack_status
IPS_SEEN_REPLY, IPS_ASSURED, IPS_SRC_NAT, IPS_DST_NAT = 0x2, 0x4, 0x10, 0x20
# include/uapi/linux/netfilter/nf_conntrack_tcp.h: enum tcp_conntrack, as conntrack -L prints it
TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
              "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")
NO_STATE = 255  # entries of protocols without states (UDP, ICMP, ...)
_MAX_ATTRIBUTES = 64  # an entry has about fifteen top-level attributes


class FlowTable:
    """One batch of conntrack entries, column by column."""
    __slots__ = ("family", "protocol", "state", "status", "source")

    def __init__(self, family, protocol, state, status, source):
        self.family = family  # uint8, AF_INET / AF_INET6
        self.protocol = protocol  # uint8, IPPROTO_*
        self.state = state  # uint8: TCP_STATES index, NO_STATE for other protocols
        self.status = status  # uint32, IPS_* bits
        self.source = source  # (n, 4) uint32: the original source address, network order bytes

    def __len__(self) -> int:
        return len(self.family)


def build_request(seq: int, family: int = socket.AF_UNSPEC) -> bytes:
    payload = NFGENMSG.pack(family, 0, 0)
    msg_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return sockdiag.NLMSGHDR.pack(sockdiag.NLMSGHDR.size + len(payload), msg_type,
                                  sockdiag.NLM_F_REQUEST | sockdiag.NLM_F_DUMP, seq, 0) + payload


def dump(buffer: bytearray | None = None, timeout: float = 10.0) -> Iterator[FlowTable]:
    """Every entry of this network namespace's conntrack table, batch by batch. Needs
    CAP_NET_ADMIN: without it the kernel answers EPERM."""
    with sockdiag.open_socket(timeout, NETLINK_NETFILTER) as sock:
        seq = int.from_bytes(os.urandom(4), "little") or 1
        for batch in sockdiag.receive(sock, build_request(seq), seq, buffer, "ctnetlink"):
            table = decode(batch, seq)
            if len(table):
                yield table


def _be32(words: np.ndarray) -> np.ndarray:
    return words.byteswap() if np.little_endian else words


def decode(data, seq: int) -> FlowTable:
    reply_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
    words, halves, starts = sockdiag.data_messages(data, seq, reply_type, "ctnetlink")
    raw = np.frombuffer(data, dtype=np.uint8)
    if not len(starts):
        return _empty()
    begin = starts.astype(np.int64) * 4
    end = begin + words[starts]
    if int((end - begin).min()) < 24:
        raise sockdiag.DumpError(errno.EPROTO, "ctnetlink message shorter than its header")
    orig = np.full(len(begin), -1, dtype=np.int64)
    info = np.full(len(begin), -1, dtype=np.int64)
    status = np.zeros(len(begin), dtype=np.uint32)
    pos = begin + 20  # after nlmsghdr and nfgenmsg
    for _ in range(_MAX_ATTRIBUTES):
        live = np.flatnonzero(pos + 4 <= end)
        if not len(live):
            break
        at = pos[live]
        length, kind = _attr(halves, at)
        if int(length.min()) < 4 or np.any(at + length > end[live]):
            raise sockdiag.DumpError(errno.EPROTO, "ctnetlink attribute overruns its entry")
        orig[live[kind == CTA_TUPLE_ORIG]] = at[kind == CTA_TUPLE_ORIG]
        info[live[kind == CTA_PROTOINFO]] = at[kind == CTA_PROTOINFO]
        has_status = (kind == CTA_STATUS) & (length >= 8)
        status[live[has_status]] = _be32(words[(at[has_status] + 4) // 4])
        pos[live] = at + ((length + 3) & ~3)
    else:
        raise sockdiag.DumpError(errno.EPROTO, "ctnetlink entry with too many attributes")
    if np.any(orig < 0):
        raise sockdiag.DumpError(errno.EPROTO, "ctnetlink entry without its original tuple")
    return _tuples(raw, words, halves, orig, info, status, raw[begin + 16])


def _attr(halves, at):
    """(length, type) of the attributes at byte offsets `at` (each header in the buffer)."""
    return halves[at // 2].astype(np.int64), halves[at // 2 + 1] & NLA_TYPE_MASK


def _tuples(raw, words, halves, orig, info, status, family) -> FlowTable:
    """CTA_TUPLE_ORIG { CTA_TUPLE_IP { SRC, DST } CTA_TUPLE_PROTO { NUM, ... } }: the source
    is the IP nest's first attribute, the protocol number the proto nest's first. Every
    nested attribute must lie inside its parent before anything inside it is read (nests
    were read unchecked: an empty one at the end of the buffer raised IndexError, a
    zero-length CTA_PROTO_NUM read the next header as the protocol; found in review)."""
    def layout(ok, what):
        if not np.all(ok):
            raise sockdiag.DumpError(errno.EPROTO, f"ctnetlink original tuple: {what}")
    orig_end = orig + _attr(halves, orig)[0]  # inside the entry (decode checked)
    ip = orig + 4
    layout(ip + 4 <= orig_end, "empty")
    ip_len, ip_kind = _attr(halves, ip)
    ip_end = ip + ip_len
    src = ip + 4
    layout((ip_kind == CTA_TUPLE_IP) & (ip_end <= orig_end) & (src + 4 <= ip_end),
           "CTA_TUPLE_IP first, holding an address")
    src_len, src_kind = _attr(halves, src)
    v6 = src_kind == CTA_IP_V6_SRC
    layout((((src_kind == CTA_IP_V4_SRC) & (src_len == 8)) | (v6 & (src_len == 20)))
           & (src + src_len <= ip_end), "a source address of 4 or 16 bytes first")
    proto = ip + ((ip_len + 3) & ~3)
    layout(proto + 8 <= orig_end, "CTA_TUPLE_PROTO after CTA_TUPLE_IP")
    proto_len, proto_kind = _attr(halves, proto)
    num_len, num_kind = _attr(halves, proto + 4)
    layout((proto_kind == CTA_TUPLE_PROTO) & (proto + proto_len <= orig_end)
           & (num_kind == CTA_PROTO_NUM) & (num_len >= 5) & (proto + 4 + num_len <= proto + proto_len),
           "CTA_TUPLE_PROTO holding CTA_PROTO_NUM first")
    source = np.zeros((len(orig), 4), dtype=np.uint32)
    first = (src + 4) // 4
    source[:, 0] = words[first]
    for i in range(1, 4):
        source[v6, i] = words[first[v6] + i]
    protocol = raw[proto + 8]
    # a TCP entry's state: CTA_PROTOINFO { CTA_PROTOINFO_TCP { CTA_PROTOINFO_TCP_STATE } },
    # each inside the one around it; where it is not, the entry has no state (NO_STATE)
    state = np.full(len(orig), NO_STATE, dtype=np.uint8)
    rows = np.flatnonzero((protocol == socket.IPPROTO_TCP) & (info >= 0))
    at = info[rows]
    info_end = at + _attr(halves, at)[0]  # inside the entry (decode checked)
    fits = at + 8 <= info_end
    rows, at, info_end = rows[fits], at[fits], info_end[fits]
    tcp_len, tcp_kind = _attr(halves, at + 4)
    tcp_end = at + 4 + tcp_len
    fits = (tcp_kind == CTA_PROTOINFO_TCP) & (tcp_end <= info_end) & (at + 12 <= tcp_end)
    rows, at, tcp_end = rows[fits], at[fits], tcp_end[fits]
    state_len, state_kind = _attr(halves, at + 8)
    fits = (state_kind == CTA_PROTOINFO_TCP_STATE) & (state_len >= 5) \
        & (at + 8 + state_len <= tcp_end)
    state[rows[fits]] = raw[at[fits] + 12]
    return FlowTable(family.astype(np.uint8), protocol.astype(np.uint8), state, status, source)


def _empty() -> FlowTable:
    return FlowTable(np.zeros(0, np.uint8), np.zeros(0, np.uint8), np.zeros(0, np.uint8),
                     np.zeros(0, np.uint32), np.zeros((0, 4), np.uint32))


# -- /proc/net/nf_conntrack, where ctnetlink is refused ------------------------------------

_FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
_STATE_INDEX = {name: i for i, name in enumerate(TCP_STATES)}


def parse_proc(lines, name: str = "?") -> FlowTable:
    """/proc/net/nf_conntrack lines -> a FlowTable. The status bits are not printed: NAT is
    seen as the reply tuple not mirroring the original one.

    "ipv4 2 tcp 6 431999 ESTABLISHED src=10.0.0.2 dst=192.0.2.9 sport=40000 dport=80
     src=192.0.2.9 dst=198.51.100.1 sport=80 dport=40000 [ASSURED] mark=0 zone=0 use=2"
    -> family 2, protocol 6, ESTABLISHED, source 10.0.0.2, status ASSURED|SEEN_REPLY|SRC_NAT
    """
    rows = []
    for lineno, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            rows.append(_proc_row(fields))
        except (ValueError, KeyError, IndexError, OSError) as exc:
            raise ValueError(f"{name}:{lineno}: {exc}: {line.rstrip()[:200]!r}") from None
    if not rows:
        return _empty()
    family, protocol, state, status, source = zip(*rows)
    return FlowTable(np.array(family, np.uint8), np.array(protocol, np.uint8),
                     np.array(state, np.uint8), np.array(status, np.uint32),
                     np.array(source, np.uint32).reshape(-1, 4))


def _proc_row(fields: list[str]) -> tuple:
    family = _FAMILIES[fields[0]]
    protocol = files.integer(fields[3], "protocol", 0, 255)
    # the timeout is left out of an offloaded entry's line (ct_seq_show): the state follows
    # the protocol number at once there (found in review)
    named = fields[5] if fields[4].isdigit() else fields[4]
    state = _STATE_INDEX.get(named, NO_STATE) if protocol == socket.IPPROTO_TCP else NO_STATE
    pairs = [f.split("=", 1) for f in fields if "=" in f]
    src = [v for k, v in pairs if k == "src"]
    dst = [v for k, v in pairs if k == "dst"]
    if len(src) < 2 or len(dst) < 2:
        raise ValueError("expected the original and the reply tuple")
    # ports where the protocol has them (None twice where not): a REDIRECT or a port-only
    # DNAT changes the port alone (found in review)
    sport = ([v for k, v in pairs if k == "sport"] + [None, None])[:2]
    dport = ([v for k, v in pairs if k == "dport"] + [None, None])[:2]
    status = 0 if "[UNREPLIED]" in fields else IPS_SEEN_REPLY
    status |= IPS_ASSURED if "[ASSURED]" in fields else 0
    # the reply goes to someone else (or another port): source NAT; comes from someone else
    # (or another port): destination NAT
    status |= IPS_SRC_NAT if (dst[1], dport[1]) != (src[0], sport[0]) else 0
    status |= IPS_DST_NAT if (src[1], sport[1]) != (dst[0], dport[0]) else 0
    packed = socket.inet_pton(family, src[0])
    source = tuple(np.frombuffer(packed.ljust(16, b"\0"), dtype=np.uint32))
    return family, protocol, state, status, source


def read_proc(procfs: str) -> FlowTable:
    path = os.path.join(procfs, "net", "nf_conntrack")
    with files.open_text(path, files.LARGE) as stream:
        return parse_proc(stream, path)


# -- /proc/net/stat/nf_conntrack: the per-CPU statistics -------------------------------------

def parse_stats(lines, name: str = "?") -> dict[str, int]:
    """The header names the columns, then one line of hex values per CPU; summed over CPUs.
    "entries" is the table's size on every line (not per CPU) and is left out.

    "entries  clashres found ...", "00000003 00000000 00000001 ...", ... -> {"clashres": 0,
    "found": 1, ...}
    """
    header: list[str] | None = None
    totals: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        fields = line.split()
        if header is None:
            if not fields or not all(re.fullmatch(r"[a-z_][a-z0-9_]*", f) for f in fields):
                raise ValueError(f"{name}:1: not a statistics header: {line.rstrip()[:200]!r}")
            header = fields
            totals = dict.fromkeys((f for f in header if f != "entries"), 0)
            continue
        if len(fields) != len(header):
            raise ValueError(f"{name}:{lineno}: {len(fields)} values for {len(header)} columns")
        for column, value in zip(header, fields):
            if column != "entries":
                totals[column] += files.hex_integer(value, f"{name}:{lineno}: {column}",
                                                    (1 << 32) - 1)
    if header is None:
        raise ValueError(f"{name}: empty, without the statistics header")
    return totals


def read_stats(procfs: str) -> dict[str, int]:
    path = os.path.join(procfs, "net", "stat", "nf_conntrack")
    with files.open_text(path) as stream:
        return parse_stats(stream, path)
