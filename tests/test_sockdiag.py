"""The netlink decoder on hand-built messages: layout, worked examples, hostile input."""
from __future__ import annotations

import itertools
import socket
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from exporter.sources import sockdiag
from exporter.sources.table import TcpState, format_address

SEQ = 0x5EED


def test_struct_sizes_match_the_kernel_headers():
    assert sockdiag.NLMSGHDR.size == 16
    assert sockdiag.INET_DIAG_SOCKID.size == 48
    assert sockdiag.INET_DIAG_REQ_V2.size == 56
    assert sockdiag.INET_DIAG_REQ.size == 60
    assert sockdiag.INET_DIAG_MSG.size == 72


def test_requests():
    msg_type, req = sockdiag.build_request(socket.IPPROTO_TCP, socket.AF_UNSPEC, 0xFFE, 7)
    assert msg_type == sockdiag.TCPDIAG_GETSOCK
    assert sockdiag.NLMSGHDR.unpack_from(req) == (76, 18, 0x301, 7, 0)
    assert struct.unpack_from("=I", req, 16 + 52)[0] == 0xFFE  # idiag_states
    msg_type, req = sockdiag.build_request(socket.IPPROTO_UDP, socket.AF_INET6, 0xFFE, 8)
    assert msg_type == sockdiag.SOCK_DIAG_BY_FAMILY
    assert sockdiag.NLMSGHDR.unpack_from(req) == (72, 20, 0x301, 8, 0)
    assert req[16:20] == bytes([socket.AF_INET6, socket.IPPROTO_UDP, 0, 0])
    with pytest.raises(ValueError):
        sockdiag.build_request(socket.IPPROTO_UDP, socket.AF_UNSPEC, 0xFFE, 9)


def message(family=socket.AF_INET, state=TcpState.LISTEN, src="127.0.0.1", sport=3306,
            dst="0.0.0.0", dport=0, rqueue=0, wqueue=128, uid=1000, inode=4242,
            attrs=b"", msg_type=sockdiag.TCPDIAG_GETSOCK, seq=SEQ, flags=sockdiag.NLM_F_MULTI):
    def addr(text):
        return socket.inet_pton(family, text).ljust(16, b"\0")
    body = struct.pack("=BBBB", family, state, 0, 0) + struct.pack("!HH", sport, dport)
    body += addr(src) + addr(dst) + struct.pack("=I2I", 0, 0, 0)
    body += struct.pack("=IIIII", 0, rqueue, wqueue, uid, inode) + attrs
    length = 16 + len(body)
    pad = b"\0" * (-length % 4)
    return sockdiag.NLMSGHDR.pack(length, msg_type, flags, seq, 99) + body + pad


def done(errno_value=0, seq=SEQ):
    return sockdiag.NLMSGHDR.pack(20, sockdiag.NLMSG_DONE, 2, seq, 99) + struct.pack("=i", errno_value)


def test_worked_example_listener():
    table = sockdiag.decode(message() + done(), SEQ, sockdiag.TCPDIAG_GETSOCK)
    assert list(table.rows()) == [(2, 10, "127.0.0.1", 3306, "0.0.0.0", 0, 0, 128, 4242, 1000)]


def test_mixed_lengths_and_families_decode_in_order():
    msgs = [
        message(state=TcpState.ESTABLISHED, src="10.1.2.3", sport=443, dst="203.0.113.9",
                dport=50123, rqueue=5, wqueue=7, attrs=b"\x05\x00\x08\x00\x01"),  # odd attr
        message(family=socket.AF_INET6, state=TcpState.TIME_WAIT, src="2001:db8::1",
                sport=80, dst="2001:db8::2", dport=65535, uid=0, inode=0),
        message(family=socket.AF_INET6, state=TcpState.LISTEN, src="::", sport=22,
                dst="::", attrs=b"\x08\x00\x01\x00" + b"\0" * 36),
    ]
    table = sockdiag.decode(b"".join(msgs) + done(), SEQ, sockdiag.TCPDIAG_GETSOCK)
    assert [r[:6] for r in table.rows()] == [
        (2, 1, "10.1.2.3", 443, "203.0.113.9", 50123),
        (10, 6, "2001:db8::1", 80, "2001:db8::2", 65535),
        (10, 10, "::", 22, "::", 0),
    ]
    assert table.recv_q.tolist() == [5, 0, 0] and table.send_q.tolist() == [7, 128, 128]


def test_payload_word_equal_to_seq_takes_the_slow_path_and_still_decodes():
    # inode == seq puts a decoy "header" inside the payload; the chain check must notice.
    msgs = message(inode=SEQ) + message(uid=SEQ, sport=1) + done()
    table = sockdiag.decode(msgs, SEQ, sockdiag.TCPDIAG_GETSOCK)
    assert table.inode.tolist() == [SEQ, 4242]
    assert table.local_port.tolist() == [3306, 1]


def test_done_with_error_and_error_message_raise_oserror():
    with pytest.raises(OSError) as info:
        sockdiag.decode(message() + done(-5), SEQ, sockdiag.TCPDIAG_GETSOCK)
    assert info.value.errno == 5
    err = sockdiag.NLMSGHDR.pack(36, sockdiag.NLMSG_ERROR, 0, SEQ, 99) + struct.pack("=i", -2) + b"\0" * 16
    with pytest.raises(OSError) as info:
        sockdiag.decode(err, SEQ, sockdiag.TCPDIAG_GETSOCK)
    assert info.value.errno == 2


def test_dump_intr_flag_asks_for_a_retry():
    data = message(flags=sockdiag.NLM_F_MULTI | sockdiag.NLM_F_DUMP_INTR) + done()
    with pytest.raises(sockdiag.DumpInterrupted):
        sockdiag.decode(data, SEQ, sockdiag.TCPDIAG_GETSOCK)


def test_truncated_message_is_an_error_not_a_short_table():
    data = message()[:-8]
    with pytest.raises(sockdiag.DumpError):
        sockdiag.decode(data + b"\0" * (-len(data) % 4), SEQ, sockdiag.TCPDIAG_GETSOCK)


def test_done_not_last_is_an_error():
    with pytest.raises(sockdiag.DumpError):
        sockdiag.decode(done() + message(), SEQ, sockdiag.TCPDIAG_GETSOCK)


def test_check_datagram_spots_done_at_the_tail_and_errors_at_the_head():
    def check(data, at=0):  # a datagram lying somewhere inside a larger receive buffer
        buf = bytearray(b"\xff" * at + data + b"\xff" * 64)
        return sockdiag._check_datagram(buf, at, len(data), SEQ)
    for at in (0, 44):
        assert check(message() + done(), at) is True
        assert check(message(), at) is False
        assert check(message() + done(seq=SEQ + 1), at) is False
        err = sockdiag.NLMSGHDR.pack(36, sockdiag.NLMSG_ERROR, 0, SEQ, 0) + struct.pack("=i", -13) + b"\0" * 16
        with pytest.raises(PermissionError):
            check(err, at)
        with pytest.raises(sockdiag.DumpError):  # an error cut before its errno
            check(err[:16], at)
        with pytest.raises(sockdiag.DumpError):
            check(message()[:12], at)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600).map(lambda b: b[: len(b) - len(b) % 4]))
def test_random_bytes_raise_oserror_or_decode(data):
    try:
        table = sockdiag.decode(data, SEQ, sockdiag.TCPDIAG_GETSOCK)
    except OSError:
        return
    # whatever decodes is whole messages: at most one row per inet_diag_msg-sized piece,
    # with the states and families the kernel can send
    assert len(table) <= len(data) // sockdiag.INET_DIAG_MSG.size
    assert set(table.family.tolist()) <= {socket.AF_INET, socket.AF_INET6}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([2, 10]), st.integers(1, 11), st.integers(0, 65535),
                          st.integers(0, 2**32 - 1), st.binary(max_size=40)), max_size=20),
       st.integers(0, 200))
def test_valid_dumps_decode_exactly_and_any_truncation_fails(rows, cut):
    msgs = [message(family=f, state=s, src="::1" if f == 10 else "127.0.0.1",
                    dst="::" if f == 10 else "0.0.0.0", sport=p, rqueue=q, attrs=a)
            for f, s, p, q, a in rows]
    data = b"".join(msgs) + done()
    table = sockdiag.decode(data, SEQ, sockdiag.TCPDIAG_GETSOCK)
    assert table.family.tolist() == [r[0] for r in rows]
    assert table.state.tolist() == [r[1] for r in rows]
    assert table.local_port.tolist() == [r[2] for r in rows]
    assert table.recv_q.tolist() == [r[3] for r in rows]
    assert all(format_address(f, w) in ("::1", "127.0.0.1")
               for f, w in zip(table.family.tolist(), table.local_addr))
    # A cut between messages is a valid shorter buffer (batches end between datagrams);
    # a cut inside a message must never decode.
    boundaries = {0, *itertools.accumulate(len(m) for m in msgs)}
    cut_at = len(data) - 4 * (1 + cut % (len(data) // 4))
    if cut_at not in boundaries:
        with pytest.raises(OSError):
            sockdiag.decode(data[:cut_at], SEQ, sockdiag.TCPDIAG_GETSOCK)


def walk(data: bytes) -> list[int]:
    """Message starts (word index) by the plainest walk, the reference for the fast paths."""
    starts, i = [], 0
    while i < len(data):
        starts.append(i // 4)
        i += (struct.unpack_from("=I", data, i)[0] + 3) & ~3
    return starts


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 1500), st.sampled_from([0, 4, 8, 36])), min_size=1,
                max_size=12),
       st.sampled_from([0, 1, 3, 255, 256, 600]), st.booleans())
def test_runs_of_equal_lengths_find_every_message(runs, window, decoy):
    # Runs of up to 1500 equal messages with lengths changing between them, the way a dump
    # of mostly ESTABLISHED sockets looks, and windows from 1 message up: the run follower
    # (or, when lengths change too often, the candidates) must find exactly the plain walk's
    # starts. A decoy sequence number in a payload must not fool either.
    msgs, ports = [], []
    for run, (count, extra) in enumerate(runs):
        msgs += [message(state=TcpState.ESTABLISHED, sport=run,
                         inode=SEQ if decoy and run == 0 else 4242,
                         attrs=b"\x08\x00\x01\x00" + b"\0" * (extra - 4) if extra else b"")] * count
        ports += [run] * count
    data = b"".join(msgs) + done()
    words = np.frombuffer(data, dtype=np.uint32)
    assert sockdiag._message_starts(words, SEQ).tolist() == walk(data)
    old = sockdiag._WINDOW
    try:
        if window:
            sockdiag._WINDOW = window
        columns = sockdiag._run_columns(data, words, SEQ, sockdiag.TCPDIAG_GETSOCK)
        table = sockdiag.decode(data, SEQ, sockdiag.TCPDIAG_GETSOCK)
    finally:
        sockdiag._WINDOW = old
    if len(runs) == 1:  # one length throughout: the run follower must carry it
        assert columns is not None
    if columns is not None:
        general = sockdiag._gather_columns(data, SEQ, sockdiag.TCPDIAG_GETSOCK)
        assert columns.keys() == general.keys()
        assert all(columns[name].tobytes() == general[name].tobytes() for name in columns)
    assert table.local_port.tolist() == ports


def test_done_flagged_interrupted_after_plain_messages_asks_for_a_retry():
    # The kernel may flag only the final NLMSG_DONE; the run follower must not accept it.
    data = message() * 3 + sockdiag.NLMSGHDR.pack(
        20, sockdiag.NLMSG_DONE, sockdiag.NLM_F_MULTI | sockdiag.NLM_F_DUMP_INTR, SEQ, 99) \
        + struct.pack("=i", 0)
    with pytest.raises(sockdiag.DumpInterrupted):
        sockdiag.decode(data, SEQ, sockdiag.TCPDIAG_GETSOCK)


def test_a_dump_the_kernel_never_answers_times_out_instead_of_hanging():
    # A message without NLM_F_REQUEST is dropped by the kernel without a word: the receive
    # must give up after the socket's timeout (SO_RCVTIMEO), with an error saying so.
    import time
    with sockdiag.open_socket(timeout=0.3) as sock:
        silent = sockdiag.NLMSGHDR.pack(16, sockdiag.NLMSG_DONE, 0, SEQ, 0)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="stopped answering"):
            list(sockdiag.receive(sock, silent, SEQ, None, "sock_diag"))
        assert 0.25 < time.monotonic() - started < 3


class ScriptedSocket:
    """Hands out the given datagrams, one per receive, as a netlink socket would (MSG_TRUNC:
    the real length is returned even when only part of it fit)."""

    def __init__(self, datagrams):
        self.datagrams = list(datagrams)

    def send(self, _request):
        pass

    def recv_into(self, view, nbytes, _flags=0):
        if not self.datagrams:
            raise BlockingIOError  # what SO_RCVTIMEO running out looks like
        data = self.datagrams.pop(0)
        view[:min(nbytes, len(data))] = data[:nbytes]
        return len(data)


# a datagram: data messages (of a few lengths, some with attributes), then maybe the end
DATAGRAM = st.lists(st.sampled_from([message(), message(attrs=b"\x08\x00\x08\x00\x01\x00\x00\x00"),
                                     message(family=socket.AF_INET6, src="::1", dst="::2")]),
                    min_size=0, max_size=30).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(datagrams=st.lists(DATAGRAM, min_size=1, max_size=12),
       end=st.sampled_from(["appended", "alone", "error", "garbage", "none"]),
       room=st.sampled_from([2, 3, 5]))
def test_receive_hands_over_every_datagram_up_to_the_end_and_nothing_after(datagrams, end,
                                                                         room):
    """The receive loop looks closely only at datagrams that may start with an error or end
    the dump; whatever the datagrams, what it hands over is exactly what came, in order, up
    to NLMSG_DONE; an error fails; a dump that never ends times out."""
    datagrams = [d for d in datagrams if d] or [message()]
    if end == "appended":
        datagrams[-1] += done()
    elif end == "alone":
        datagrams.append(done())
    elif end == "error":
        datagrams.append(sockdiag.NLMSGHDR.pack(36, sockdiag.NLMSG_ERROR, 0, SEQ, 0)
                         + struct.pack("=i", -13) + b"\0" * 16)
    elif end == "garbage":  # a short datagram
        datagrams.append(b"\x03\x00\x00\x00\x03\x00\x02\x00")
    # never read: the dump has ended (or failed) before them
    after = [] if end == "none" else [message(), done()]
    sock = ScriptedSocket(datagrams + after)
    buffer = bytearray(room * sockdiag._DATAGRAM_ROOM)
    got = []
    try:
        for batch in sockdiag.receive(sock, b"", SEQ, buffer, "sock_diag"):
            assert 0 < len(batch) <= len(buffer)
            got.append(bytes(batch))
    except OSError as exc:
        assert end in ("error", "garbage", "none")
        assert isinstance(exc, {"error": PermissionError, "garbage": sockdiag.DumpError,
                                "none": TimeoutError}[end])
        return
    assert end in ("appended", "alone")
    assert b"".join(got) == b"".join(datagrams)
    assert sock.datagrams == after


def test_a_headers_type_and_flags_word_is_read_in_host_order():
    """The fast paths compare a header's second word as one uint32: it must be the word a
    header packed in host order reads as, on either byte order (s390x is big-endian)."""
    header = sockdiag.NLMSGHDR.pack(88, sockdiag.TCPDIAG_GETSOCK, sockdiag.NLM_F_MULTI, SEQ, 0)
    assert int(np.frombuffer(header, dtype=np.uint32)[1]) == sockdiag._type_flags(
        sockdiag.TCPDIAG_GETSOCK, sockdiag.NLM_F_MULTI)
    done_header = sockdiag.NLMSGHDR.pack(20, sockdiag.NLMSG_DONE, sockdiag.NLM_F_MULTI, SEQ, 0)
    assert int(np.frombuffer(done_header, dtype=np.uint32)[1]) == sockdiag._type_flags(
        sockdiag.NLMSG_DONE, sockdiag.NLM_F_MULTI)
