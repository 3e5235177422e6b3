"""The socket table both socket sources produce: columns, not rows.

A dump of 1M sockets must not become 1M Python objects, so a SocketTable holds one numpy
array per column and every consumer works on whole columns.
"""
from __future__ import annotations

import enum
import ipaddress
import socket
from dataclasses import dataclass

import numpy as np


class TcpState(enum.IntEnum):
    """Kernel TCP states (include/net/tcp_states.h)."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12  # request sockets; both sources report them as SYN_RECV


# netstat's own spellings, in the kernel's order; these are the `state` label values.
NETSTAT_STATES: dict[TcpState, str] = {
    TcpState.ESTABLISHED: "ESTABLISHED",
    TcpState.SYN_SENT: "SYN_SENT",
    TcpState.SYN_RECV: "SYN_RECV",
    TcpState.FIN_WAIT1: "FIN_WAIT1",
    TcpState.FIN_WAIT2: "FIN_WAIT2",
    TcpState.TIME_WAIT: "TIME_WAIT",
    TcpState.CLOSE: "CLOSE",
    TcpState.CLOSE_WAIT: "CLOSE_WAIT",
    TcpState.LAST_ACK: "LAST_ACK",
    TcpState.LISTEN: "LISTEN",
    TcpState.CLOSING: "CLOSING",
}
STATE_BY_NAME = {name: state for state, name in NETSTAT_STATES.items()}

# Bitmask of the states a dump asks for: the eleven netstat states. The kernel adds
# NEW_SYN_RECV by itself whenever SYN_RECV is asked for.
ALL_STATES_MASK = sum(1 << s for s in NETSTAT_STATES)

FAMILY_NAMES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}

# Addresses are kept as four native uint32 words holding the network-order bytes, which is
# what both inet_diag (__be32 idiag_src[4]) and /proc/net/tcp ("%08X" of each word) give.
ADDR_WORDS = 4

COLUMNS = ("family", "state", "local_addr", "local_port", "remote_addr", "remote_port",
           "recv_q", "send_q", "inode", "uid", "ifindex")


@dataclass(frozen=True, eq=False)
class SocketTable:
    """One batch of sockets, column by column (all arrays have the same length).

    family: AF_INET or AF_INET6; state: kernel TcpState value; *_addr: (n, 4) uint32 words
    (IPv4 in word 0, the rest zero); *_port: host-order port numbers; recv_q / send_q:
    netstat's Recv-Q / Send-Q (for LISTEN: accept queue length and, from netlink only,
    backlog); inode, uid: as in /proc/net/tcp; ifindex: the interface a socket is bound to
    (idiag_if: a link-local address's zone, or SO_BINDTODEVICE), 0 when none or unknown
    (/proc/net/tcp6 does not say).
    """

    family: np.ndarray
    state: np.ndarray
    local_addr: np.ndarray
    local_port: np.ndarray
    remote_addr: np.ndarray
    remote_port: np.ndarray
    recv_q: np.ndarray
    send_q: np.ndarray
    inode: np.ndarray
    uid: np.ndarray
    ifindex: np.ndarray | None = None

    def __post_init__(self):
        if self.ifindex is None:  # sources that cannot tell: unbound, as far as we know
            object.__setattr__(self, "ifindex", np.zeros(len(self.state), dtype=np.uint32))

    def __len__(self) -> int:
        return len(self.state)

    @classmethod
    def empty(cls) -> "SocketTable":
        return cls.from_columns({})

    @classmethod
    def from_columns(cls, columns: dict) -> "SocketTable":
        """Build from a mapping of column name to sequence; missing columns are empty."""
        def col(name, dtype, shape=()):
            value = columns.get(name)
            if value is None:
                return np.zeros((0, *shape), dtype=dtype)
            return np.asarray(value, dtype=dtype).reshape((-1, *shape))

        return cls(
            family=col("family", np.uint8), state=col("state", np.uint8),
            local_addr=col("local_addr", np.uint32, (ADDR_WORDS,)),
            local_port=col("local_port", np.uint16),
            remote_addr=col("remote_addr", np.uint32, (ADDR_WORDS,)),
            remote_port=col("remote_port", np.uint16),
            recv_q=col("recv_q", np.uint32), send_q=col("send_q", np.uint32),
            inode=col("inode", np.uint32), uid=col("uid", np.uint32),
            ifindex=col("ifindex", np.uint32) if "ifindex" in columns else None)

    @staticmethod
    def concat(tables: list["SocketTable"]) -> "SocketTable":
        if not tables:
            return SocketTable.empty()
        return SocketTable(**{c: np.concatenate([getattr(t, c) for t in tables]) for c in COLUMNS})

    def rows(self):
        """Plain tuples, for tests and small tables only (one object per socket)."""
        for i in range(len(self)):
            yield (int(self.family[i]), int(self.state[i]),
                   format_address(int(self.family[i]), self.local_addr[i]), int(self.local_port[i]),
                   format_address(int(self.family[i]), self.remote_addr[i]), int(self.remote_port[i]),
                   int(self.recv_q[i]), int(self.send_q[i]), int(self.inode[i]), int(self.uid[i]))


def words_to_bytes(words: np.ndarray) -> bytes:
    """(4,) native uint32 words -> the 16 network-order bytes they hold."""
    return np.ascontiguousarray(words, dtype=np.uint32).tobytes()


def format_address(family: int, words: np.ndarray) -> str:
    """Words -> text: [0x0100007F, 0, 0, 0] on a little-endian host -> "127.0.0.1"."""
    raw = words_to_bytes(words)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return str(ipaddress.IPv6Address(raw))


def parse_address(text: str) -> tuple[int, np.ndarray]:
    """The inverse of format_address: "::1" -> (AF_INET6, words)."""
    addr = ipaddress.ip_address(text)
    raw = addr.packed.ljust(16, b"\0")
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    return family, np.frombuffer(raw, dtype=np.uint32).copy()

