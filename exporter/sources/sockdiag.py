"""TCP and UDP socket tables from the kernel over NETLINK_SOCK_DIAG (inet_diag).

This is what `ss` reads. A dump answers with one inet_diag_msg per socket, packed into
datagrams of up to 32 KiB. We receive many datagrams back to back into one buffer and decode
the whole buffer with numpy: a dump's messages mostly share one length, so runs of them are
followed a window at a time, their headers checked and each column copied out of the buffer
in one strided copy (_run_columns); anything else goes the general way, every header located
and checked, then gathered (data_messages). Either is a handful of vectorised operations per
~17k sockets instead of a Python loop per socket.

The dump covers the network namespace this process (thread) is in.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
import sys
from typing import Iterator

import numpy as np

from .netns import libc
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
TIMEVAL = struct.Struct("@ll")  # struct timeval (tv_sec, tv_usec), for SO_RCVTIMEO

# Word offsets (uint32 units) of inet_diag_msg fields from the start of the netlink message.
_W_FAMILY, _W_PORTS, _W_SRC, _W_DST = 4, 5, 6, 10
_W_IF = 14  # idiag_if, host order
_W_RQUEUE, _W_UID = 18, 20  # then idiag_wqueue and idiag_inode
_MIN_MSG_LEN = NLMSGHDR.size + INET_DIAG_MSG.size  # 88
_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: IntFlag arithmetic is slow per datagram
# The byte of nlmsg_type (host order, at offset 4) that holds NLMSG_ERROR's and NLMSG_DONE's
# value; the other byte is 0 for both.
_TYPE_BYTE = 4 if sys.byteorder == "little" else 5

# The kernel never puts more than 32 KiB in one datagram (netlink_dump caps its skb), so a
# receive with at least this much room never truncates.
_DATAGRAM_ROOM = 64 * 1024
# A batch costs about a hundred numpy calls of a microsecond or two whatever its size, so
# fewer, larger batches cost less; but the kernel's copy into a buffer that no longer fits
# in cache costs more (receiving into 1 MiB took 1.5% longer than into 64 KiB, into 4 MiB
# 2.7%). Of 1, 2 and 4 MiB, 2 MiB (about 17k sockets) cost least in all, with 4 MiB close.
BATCH_BYTES = 2 * 1024 * 1024


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


# linux/capability.h: capget/capset, _LINUX_CAPABILITY_VERSION_3 (two words per set)
_CAP_VERSION_3 = 0x20080522
_CAP_NET_ADMIN = 12


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _capabilities(caps=None) -> "ctypes.Array | None":
    """This thread's capability sets (capget), or set them (capset); None on failure."""
    header = _CapHeader(_CAP_VERSION_3, 0)  # pid 0: the calling thread
    data = caps if caps is not None else (_CapData * 2)()
    call = libc.capset if caps is not None else libc.capget
    return data if call(ctypes.byref(header), data) == 0 else None


@contextlib.contextmanager
def _without_net_admin():
    """CAP_NET_ADMIN out of this thread's effective set for the body (kept in the permitted
    set, so it comes back after; capabilities are per thread, so no other thread notices).

    A sock_diag socket opened by a holder of CAP_NET_ADMIN gets INET_DIAG_MARK in every
    socket's message (8 of 124 bytes); we never read it, and without it a TCP dump is 6.5%
    smaller and ~5% faster for the kernel (100k sockets: 78.5 -> 74.1 ms, same run).
    Anything unexpected (no capget, a seccomp filter) leaves the capability alone."""
    try:
        caps = _capabilities()
    except AttributeError:  # a C library without capget
        caps = None
    if caps is None or not caps[0].effective & 1 << _CAP_NET_ADMIN:
        yield
        return
    held = caps[0].effective
    caps[0].effective = held & ~(1 << _CAP_NET_ADMIN)
    dropped = _capabilities(caps) is not None
    try:
        yield
    finally:
        if dropped:
            caps[0].effective = held
            if _capabilities(caps) is None:  # never expected: it is still permitted
                raise PermissionError(ctypes.get_errno(), "capset: CAP_NET_ADMIN could not "
                                      "be raised again after opening a sock_diag socket")


def open_socket(timeout: float = 10.0, protocol: int = NETLINK_SOCK_DIAG) -> socket.socket:
    """A bound netlink socket whose receives fail after `timeout` seconds without a datagram:
    a stuck dump must fail the collector, never hang the sampler. The kernel keeps that
    time (SO_RCVTIMEO), not Python: a Python socket timeout polls before every receive, one
    more system call per datagram, some 400 per 100k sockets. A sock_diag socket is opened
    without CAP_NET_ADMIN (_without_net_admin); conntrack's needs it."""
    with _without_net_admin() if protocol == NETLINK_SOCK_DIAG else contextlib.nullcontext():
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    try:
        seconds = int(timeout)
        limit = TIMEVAL.pack(seconds, int((timeout - seconds) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
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
    recv_into = sock.recv_into
    last = len(buf) - _DATAGRAM_ROOM  # the last start with a whole datagram's room after it
    pos = 0
    while True:
        # MSG_TRUNC: the datagram's real length, even when it did not fit
        try:
            n = recv_into(view[pos:pos + _DATAGRAM_ROOM], _DATAGRAM_ROOM, _MSG_TRUNC)
        except BlockingIOError:  # SO_RCVTIMEO ran out (open_socket)
            raise TimeoutError(errno.ETIMEDOUT, f"{what} dump: the kernel stopped answering"
                               ) from None
        end = pos + n
        # Hundreds of datagrams per dump: two bytes say whether one may start with an error
        # or end with NLMSG_DONE, and only those are looked at closely (_check_datagram).
        if n < 20 or n > _DATAGRAM_ROOM or buf[pos + _TYPE_BYTE] == NLMSG_ERROR \
                or buf[end - 20 + _TYPE_BYTE] == NLMSG_DONE:
            if n > _DATAGRAM_ROOM:  # never expected (see _DATAGRAM_ROOM); never silent
                raise DumpError(errno.EMSGSIZE,
                                "netlink datagram larger than the receive buffer")
            if _check_datagram(buf, pos, n, seq, what):
                yield view[:end]
                return
        pos = end
        if pos > last:
            yield view[:pos]
            pos = 0


def _check_datagram(buf, start: int, size: int, seq: int, what: str = "sock_diag") -> bool:
    """Look at one datagram's ends only (buf[start:start + size]): does it start with an error
    or end the dump?

    A dump ends with NLMSG_DONE (20 bytes: header and an int), often appended to the last
    datagram of sockets, so it is checked for at the tail; decode() verifies it properly.
    """
    if size < NLMSGHDR.size:
        raise DumpError(errno.EPROTO, f"short netlink datagram ({size} bytes)")
    _length, msg_type, _flags, _seq, _pid = NLMSGHDR.unpack_from(buf, start)
    if msg_type == NLMSG_ERROR:
        if size < NLMSGHDR.size + NLMSGERR_ERRNO.size:
            raise DumpError(errno.EPROTO, "netlink error message without its errno")
        err = NLMSGERR_ERRNO.unpack_from(buf, start + NLMSGHDR.size)[0]
        raise OSError(-err, f"{what} dump refused: {os.strerror(-err)}")
    if size < 20:
        return False
    length, msg_type, _flags, msg_seq, _pid = NLMSGHDR.unpack_from(buf, start + size - 20)
    return length == 20 and msg_type == NLMSG_DONE and msg_seq == seq


def _type_flags(msg_type: int, flags: int) -> int:
    """A header's second word (nlmsg_type, then nlmsg_flags, each host order) as it reads as
    one native uint32: type | flags << 16 on a little-endian host, type << 16 | flags on a
    big-endian one (s390x)."""
    return int(np.frombuffer(struct.pack("=HH", msg_type, flags), dtype=np.uint32)[0])


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
    # A data message's type and flags word is exactly (msg_type, NLM_F_MULTI): only the
    # others (NLMSG_DONE at the end, an error, an interrupted dump) are looked at closely.
    odd = np.flatnonzero(words[starts + 1] != _type_flags(msg_type, NLM_F_MULTI))
    if not len(odd):
        return words, halves, starts
    odd_starts = starts[odd]
    if np.any(halves[2 * odd_starts + 3] & NLM_F_DUMP_INTR):
        raise DumpInterrupted(errno.EINTR, f"{what} dump interrupted")
    other = odd[halves[2 * odd_starts + 2] != msg_type]
    for index in other:
        start = starts[index]
        kind = int(halves[2 * start + 2])
        if kind not in (NLMSG_DONE, NLMSG_ERROR):
            raise DumpError(errno.EPROTO, f"unexpected netlink message type {kind}")
        if words[start] < NLMSGHDR.size + 4:
            raise DumpError(errno.EPROTO, f"netlink message type {kind} without its errno")
        err = int(np.frombuffer(data, dtype=np.int32, count=1, offset=4 * start + 16)[0])
        if err or kind == NLMSG_ERROR:
            raise OSError(-err, f"{what} dump failed: {os.strerror(-err)}")
        if index != len(starts) - 1:
            raise DumpError(errno.EPROTO, "NLMSG_DONE before the end of the dump")
    if not len(other):
        return words, halves, starts
    return words, halves, starts[:-1]  # only the last can be NLMSG_DONE (checked above)


_WINDOW = 4096  # messages per window: ~500 KB of the buffer, read while it stays in L2
_HEAD_WORDS = _MIN_MSG_LEN // 4
_HEAD = np.dtype(f"V{_MIN_MSG_LEN}")  # a message's fixed head as one opaque element
# The columns a SocketTable takes, as (name, byte offset in the message, element type read
# there): one strided copy each, straight out of the receive buffer.
_COLUMNS = (("family_state", 4 * _W_FAMILY, np.dtype(np.uint16)),
            ("ports", 4 * _W_PORTS, np.dtype("V4")),
            ("local_addr", 4 * _W_SRC, np.dtype("V16")),
            ("remote_addr", 4 * _W_DST, np.dtype("V16")),
            ("ifindex", 4 * _W_IF, np.dtype(np.uint32)),
            ("queues", 4 * _W_RQUEUE, np.dtype("V8")),  # rqueue, wqueue
            ("uid_inode", 4 * _W_UID, np.dtype("V8")))  # uid, inode


def _run_columns(data, words: np.ndarray, seq: int, msg_type: int) -> dict | None:
    """Every data message's columns (name -> array, see _COLUMNS), found by following runs
    of equal lengths; None when lengths change too often to pay, or anything is not a plain
    data message or a clean NLMSG_DONE at the end (decode's general path then says what).

    Most messages of a dump have one length (every ESTABLISHED socket's is the same). From a
    known start i with length L the next messages would start at i + k*step. A window of
    such places is checked first (each header must say length L, a data message, our
    sequence number); every header that holds proves the next start, so the checked prefix
    is exact, and at the first that fails a message of another length starts a new run.
    The checked rows' columns are then copied out one strided copy each, while the window's
    part of the buffer is still in cache: finding, checking and copying are one pass over
    the buffer from memory, and every column comes out contiguous.
    """
    end = len(words)
    data_word = _type_flags(msg_type, NLM_F_MULTI)
    done_word = _type_flags(NLMSG_DONE, NLM_F_MULTI)
    raw = np.frombuffer(data, dtype=np.uint8)
    limit = 4 * end // _MIN_MSG_LEN  # no more messages than this fit
    out = {name: np.empty(limit, dtype=kind) for name, _offset, kind in _COLUMNS}
    rows = breaks = 0
    i = 0
    while i < end:
        if end - i < 5:
            return None
        length = int(words[i])
        if int(words[i + 1]) != data_word or int(words[i + 2]) != seq:
            # the end of the dump: NLMSG_DONE with no other flag (NLM_F_DUMP_INTR!), errno 0
            if (length == 20 and int(words[i + 1]) == done_word
                    and i + 5 == end and int(words[i + 2]) == seq and int(words[i + 4]) == 0):
                break
            return None
        step = (length + 3) >> 2
        if length < _MIN_MSG_LEN or i + step > end:
            return None
        count = min(_WINDOW, (end - _HEAD_WORDS - i) // step + 1)

        def column(kind, offset):  # the window's places, read as `kind` at `offset`
            return np.ndarray((count,), dtype=kind, buffer=raw, offset=4 * i + offset,
                              strides=(4 * step,))
        held = column(np.uint64, 0) == np.uint64(length | data_word << 32 if np.little_endian
                                                 else length << 32 | data_word)
        held &= column(np.uint32, 8) == seq
        run = count if held.all() else int(np.argmin(held))  # the first that fails
        if i + run * step > end:  # the last message runs past the buffer
            return None
        count = run
        for name, offset, kind in _COLUMNS:
            out[name][rows:rows + run] = column(kind, offset)
        rows += run
        i += run * step
        if run < _WINDOW and i < end - 5:
            breaks += 1
            if breaks > 4 + rows // 512:  # lengths interleave: the general path is cheaper
                return None
    return {name: column[:rows] for name, column in out.items()}


def decode(data: memoryview | bytes, seq: int, msg_type: int) -> SocketTable:
    """Decode a buffer of whole netlink messages (one or more datagrams) into a SocketTable.

    Worked example (one IPv4 listener on 127.0.0.1:3306, accept queue 0, backlog 128):
    header (124, 18, NLM_F_MULTI, seq, pid), then family 2, state 10, sport b"\\x0c\\xea",
    src[0] = 0x0100007F on a little-endian host, rqueue 0, wqueue 128 -> one row with
    family=2, state=10, local_port=3306, recv_q=0, send_q=128.
    """
    if len(data) % 4:
        raise DumpError(errno.EPROTO, f"netlink buffer of {len(data)} bytes is not 4-aligned")
    columns = _run_columns(data, np.frombuffer(data, dtype=np.uint32), seq, msg_type)
    if columns is None:
        columns = _gather_columns(data, seq, msg_type)
    rows = len(columns["ifindex"])
    if not rows:
        return SocketTable.empty()
    # each its own contiguous column: every view reads the states, and numpy is several
    # times slower on every other byte than on contiguous ones
    family, state = columns["family_state"].view(np.uint8).reshape(rows, 2).T.copy()
    # sport and dport are big-endian
    local_port, remote_port = columns["ports"].view(">u2").reshape(rows, 2).T.astype(
        np.uint16, order="C")
    queues = columns["queues"].view(np.uint32).reshape(rows, 2)
    uid_inode = columns["uid_inode"].view(np.uint32).reshape(rows, 2)
    return SocketTable(
        family=family,
        state=state,
        local_addr=columns["local_addr"].view(np.uint32).reshape(rows, 4),
        local_port=local_port,
        remote_addr=columns["remote_addr"].view(np.uint32).reshape(rows, 4),
        remote_port=remote_port,
        recv_q=queues[:, 0],
        send_q=queues[:, 1],
        uid=uid_inode[:, 0],
        inode=uid_inode[:, 1],
        ifindex=columns["ifindex"],
    )


def _gather_columns(data, seq: int, msg_type: int) -> dict:
    """The general path: every message located and checked (data_messages), the fixed 88-byte
    head of each data message copied in one gather (each start is one element of an 88-byte
    type laid every 4 bytes over the buffer, so the copy is a memcpy per row), and the
    columns read out of those heads."""
    words, _halves, b = data_messages(data, seq, msg_type, "sock_diag")
    if len(b) and int(words[b].min()) < _MIN_MSG_LEN:
        raise DumpError(errno.EPROTO, "inet_diag message shorter than inet_diag_msg")
    starts = np.ndarray((len(words) - _HEAD_WORDS + 1,), dtype=_HEAD, buffer=words,
                        strides=(4,)) if len(words) >= _HEAD_WORDS else np.zeros(0, _HEAD)
    heads = np.ascontiguousarray(starts[b]).view(np.uint8).reshape(len(b), _MIN_MSG_LEN)
    return {name: np.ascontiguousarray(heads[:, offset:offset + kind.itemsize]).view(kind)[:, 0]
            for name, offset, kind in _COLUMNS}
