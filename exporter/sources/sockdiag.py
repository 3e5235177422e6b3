"""TCP and UDP socket tables from the kernel over NETLINK_SOCK_DIAG (inet_diag).

This is what `ss` reads. A dump answers with one inet_diag_msg per socket, packed into
datagrams of up to 32 KiB. We receive many datagrams back to back into one buffer and decode
the whole buffer with numpy: locating every message header and gathering every column is a
handful of vectorised operations per ~30k sockets instead of a Python loop per socket.

The dump covers the network namespace this process (thread) is in.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Iterator

import numpy as np

from .table import ALL_STATES_MASK, SocketTable

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
TCPDIAG_GETSOCK = 18  # the old request: AF_INET and AF_INET6 in one hash-table walk
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300

# include/uapi/linux/netlink.h: struct nlmsghdr (host byte order)
NLMSGHDR = struct.Struct("=IHHII")
# include/uapi/linux/inet_diag.h: struct inet_diag_sockid. idiag_sport/dport and idiag_src/dst
# are big-endian; idiag_if and idiag_cookie are host order. We only ever send zeros here.
INET_DIAG_SOCKID = struct.Struct("=2H16s16sI2I")
# include/uapi/linux/inet_diag.h: struct inet_diag_req_v2 (family, protocol, ext, pad, states, id)
INET_DIAG_REQ_V2 = struct.Struct("=BBBBI" + INET_DIAG_SOCKID.format[1:])
# include/uapi/linux/inet_diag.h: struct inet_diag_req (family, src_len, dst_len, ext, id,
# states, dbs), used by TCPDIAG_GETSOCK
INET_DIAG_REQ = struct.Struct("=BBBB" + INET_DIAG_SOCKID.format[1:] + "II")
# include/uapi/linux/inet_diag.h: struct inet_diag_msg (family, state, timer, retrans, id,
# expires, rqueue, wqueue, uid, inode); sport/dport decoded big-endian below.
INET_DIAG_MSG = struct.Struct("=BBBB" + INET_DIAG_SOCKID.format[1:] + "IIIII")
NLMSGERR_ERRNO = struct.Struct("=i")

# Word offsets (uint32 units) of inet_diag_msg fields from the start of the netlink message.
_W_FAMILY, _W_PORTS, _W_SRC, _W_DST = 4, 5, 6, 10
_W_IF = 14  # idiag_if, host order
_W_RQUEUE, _W_WQUEUE, _W_UID, _W_INODE = 18, 19, 20, 21
_MIN_MSG_LEN = NLMSGHDR.size + INET_DIAG_MSG.size  # 88
_LITTLE = np.little_endian
_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: IntFlag arithmetic is slow per datagram

# The kernel never puts more than 32 KiB in one datagram (netlink_dump caps its skb), so a
# receive with at least this much room never truncates.
_DATAGRAM_ROOM = 64 * 1024
BATCH_BYTES = 1024 * 1024


class DumpInterrupted(OSError):
    """The kernel flagged the dump as inconsistent (NLM_F_DUMP_INTR); start it again."""


class DumpError(OSError):
    """The kernel's answer does not parse as a socket dump."""


def build_request(protocol: int, family: int, states: int, seq: int) -> tuple[int, bytes]:
    """The dump request: (message type, bytes).

    family AF_UNSPEC with TCP asks for both families in one walk (TCPDIAG_GETSOCK); anything
    else is a SOCK_DIAG_BY_FAMILY request for one family and protocol.
    """
    sockid = (0, 0, b"", b"", 0, 0, 0)
    if family == socket.AF_UNSPEC:
        if protocol != socket.IPPROTO_TCP:
            raise ValueError("only TCP can be dumped for both families in one request")
        msg_type = TCPDIAG_GETSOCK
        payload = INET_DIAG_REQ.pack(0, 0, 0, 0, *sockid, states, 0)
    else:
        msg_type = SOCK_DIAG_BY_FAMILY
        payload = INET_DIAG_REQ_V2.pack(family, protocol, 0, 0, states, *sockid)
    header = NLMSGHDR.pack(NLMSGHDR.size + len(payload), msg_type,
                           NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return msg_type, header + payload


def open_socket(timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_SOCK_DIAG)
    # A stuck dump must fail the collector, never hang the sampler.
    sock.settimeout(timeout)
    sock.bind((0, 0))
    return sock


def dump(protocol: int, family: int = socket.AF_UNSPEC, states: int = ALL_STATES_MASK,
         sock: socket.socket | None = None, buffer: bytearray | None = None
         ) -> Iterator[SocketTable]:
    """Yield the sockets of one protocol as SocketTable batches.

    `buffer` (at least 128 KiB) is reused between batches and, when the caller keeps it,
    between dumps: a fresh 4 MiB buffer per dump costs a thousand page faults each time.
    Raises OSError when the kernel refuses (NLMSG_ERROR, e.g. ENOENT when udp_diag is not
    available), DumpInterrupted when the dump must be redone.
    """
    own = sock is None
    if own:
        sock = open_socket()
    try:
        seq = int.from_bytes(os.urandom(4), "little") or 1
        msg_type, request = build_request(protocol, family, states, seq)
        for batch in receive(sock, request, seq, buffer, "sock_diag"):
            table = decode(batch, seq, msg_type)
            if len(table):
                yield table
    finally:
        if own:
            sock.close()


def receive(sock: socket.socket, request: bytes, seq: int, buffer: bytearray | None,
            what: str) -> Iterator[memoryview]:
    """Send a netlink dump request; yield buffers of whole messages (datagrams received back
    to back into `buffer`, handed over whenever it is nearly full and at the end). The views
    are valid until the next one is asked for."""
    sock.send(request)
    buf = buffer if buffer is not None else bytearray(BATCH_BYTES)
    if len(buf) < 2 * _DATAGRAM_ROOM:
        raise ValueError("dump buffer smaller than two datagrams")
    view = memoryview(buf)
    pos = 0
    while True:
        n, _ancdata, flags, _addr = sock.recvmsg_into([view[pos:pos + _DATAGRAM_ROOM]])
        if flags & _MSG_TRUNC:  # never expected (see _DATAGRAM_ROOM); never silent
            raise DumpError(errno.EMSGSIZE, "netlink datagram larger than the receive buffer")
        done = _check_datagram(view[pos:pos + n], seq, what)
        pos += n
        if done or len(buf) - pos < _DATAGRAM_ROOM:
            yield view[:pos]
            pos = 0
        if done:
            return


def _check_datagram(data: memoryview, seq: int, what: str = "sock_diag") -> bool:
    """Look at one datagram's ends only: does it start with an error or end the dump?

    A dump ends with NLMSG_DONE (20 bytes: header and an int), often appended to the last
    datagram of sockets, so it is checked for at the tail; decode() verifies it properly.
    """
    if len(data) < NLMSGHDR.size:
        raise DumpError(errno.EPROTO, f"short netlink datagram ({len(data)} bytes)")
    length, msg_type, _flags, msg_seq, _pid = NLMSGHDR.unpack_from(data, 0)
    if msg_type == NLMSG_ERROR:
        err = NLMSGERR_ERRNO.unpack_from(data, NLMSGHDR.size)[0]
        raise OSError(-err, f"{what} dump refused: {os.strerror(-err)}")
    if len(data) < 20:
        return False
    length, msg_type, _flags, msg_seq, _pid = NLMSGHDR.unpack_from(data, len(data) - 20)
    return length == 20 and msg_type == NLMSG_DONE and msg_seq == seq


def _message_starts(words: np.ndarray, seq: int) -> np.ndarray:
    """Word index of every message header in a buffer of back-to-back messages.

    Fast path: every header carries our sequence number in its third word; take every word
    equal to it as a candidate and check that the candidates chain exactly (each start plus
    its aligned length is the next start, the last reaches the end). A payload word that
    happens to equal the random sequence number breaks the chain and we walk it in Python.
    """
    cand = np.flatnonzero(words[2:] == seq)
    if len(cand):
        step = (words[cand].astype(np.int64) + 3) >> 2
        nxt = cand + step
        if cand[0] == 0 and nxt[-1] == len(words) and np.array_equal(cand[1:], nxt[:-1]):
            return cand
    starts = []
    i, end = 0, len(words)
    while i < end:
        length = int(words[i])
        if length < NLMSGHDR.size or i + ((length + 3) >> 2) > end:
            raise DumpError(errno.EPROTO, f"bad netlink message length {length} at byte {4 * i}")
        starts.append(i)
        i += (length + 3) >> 2
    return np.asarray(starts, dtype=np.int64)


def data_messages(data: memoryview | bytes, seq: int, msg_type: int, what: str):
    """(words, halves, word index of every data message) of a buffer of whole messages;
    raises on an interrupted dump (DumpInterrupted), an error, or anything unexpected."""
    if len(data) % 4:
        raise DumpError(errno.EPROTO, f"netlink buffer of {len(data)} bytes is not 4-aligned")
    words = np.frombuffer(data, dtype=np.uint32)
    halves = np.frombuffer(data, dtype=np.uint16)
    starts = _message_starts(words, seq)
    types = halves[2 * starts + 2]
    flags = halves[2 * starts + 3]
    if np.any(flags & NLM_F_DUMP_INTR):
        raise DumpInterrupted(errno.EINTR, f"{what} dump interrupted")
    is_data = types == msg_type
    other = starts[~is_data]
    for start in other:
        kind = int(halves[2 * start + 2])
        if kind not in (NLMSG_DONE, NLMSG_ERROR):
            raise DumpError(errno.EPROTO, f"unexpected netlink message type {kind}")
        if words[start] < NLMSGHDR.size + 4:
            raise DumpError(errno.EPROTO, f"netlink message type {kind} without its errno")
        err = int(np.frombuffer(data, dtype=np.int32, count=1, offset=4 * start + 16)[0])
        if err or kind == NLMSG_ERROR:
            raise OSError(-err, f"{what} dump failed: {os.strerror(-err)}")
        if start != starts[-1]:
            raise DumpError(errno.EPROTO, "NLMSG_DONE before the end of the dump")
    return words, halves, starts[is_data]


def decode(data: memoryview | bytes, seq: int, msg_type: int) -> SocketTable:
    """Decode a buffer of whole netlink messages (one or more datagrams) into a SocketTable.

    Worked example (one IPv4 listener on 127.0.0.1:3306, accept queue 0, backlog 128):
    header (124, 18, NLM_F_MULTI, seq, pid), then family 2, state 10, sport b"\\x0c\\xea",
    src[0] = 0x0100007F on a little-endian host, rqueue 0, wqueue 128 -> one row with
    family=2, state=10, local_port=3306, recv_q=0, send_q=128.
    """
    words, _halves, b = data_messages(data, seq, msg_type, "sock_diag")
    if not len(b):
        return SocketTable.empty()
    if int(words[b].min()) < _MIN_MSG_LEN:
        raise DumpError(errno.EPROTO, "inet_diag message shorter than inet_diag_msg")
    # Copy the fixed 88-byte head of every message in one gather (a window of 22 words at
    # each start); the columns are views into that copy, never into the reused buffer.
    head = np.lib.stride_tricks.sliding_window_view(words, _MIN_MSG_LEN // 4)[b]
    first = head[:, _W_FAMILY]  # family, state, timer, retrans: one byte each
    # sport and dport are big-endian halves of one word: read it whole, as big-endian.
    ports = head[:, _W_PORTS]
    if _LITTLE:
        family, state, ports = first & 0xFF, (first >> 8) & 0xFF, ports.byteswap()
    else:
        family, state = first >> 24, (first >> 16) & 0xFF
    return SocketTable(
        family=family.astype(np.uint8),
        state=state.astype(np.uint8),
        local_addr=head[:, _W_SRC:_W_SRC + 4],
        local_port=(ports >> 16).astype(np.uint16),
        remote_addr=head[:, _W_DST:_W_DST + 4],
        remote_port=(ports & 0xFFFF).astype(np.uint16),
        recv_q=head[:, _W_RQUEUE],
        send_q=head[:, _W_WQUEUE],
        uid=head[:, _W_UID],
        inode=head[:, _W_INODE],
        ifindex=head[:, _W_IF],
    )

