"""/proc/net/{tcp,tcp6,udp,udp6} parsing: captured fixtures, worked examples, bad input."""
from __future__ import annotations

import collections
import io
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from exporter.sources import proc_sockets
from exporter.sources.table import NETSTAT_STATES, SocketTable, format_address

FIXTURES = Path(__file__).parent / "fixtures" / "proc"
HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def read_all(protocol, procfs=FIXTURES, missing=None):
    return SocketTable.concat(list(proc_sockets.read(protocol, str(procfs), missing)))


def test_fixture_tcp_states_match_the_captured_mix():
    table = read_all(socket.IPPROTO_TCP)
    counts = collections.Counter(NETSTAT_STATES[s] for s in table.state.tolist())
    assert counts == {"LISTEN": 4, "ESTABLISHED": 15, "FIN_WAIT2": 5, "CLOSE_WAIT": 4,
                      "TIME_WAIT": 5, "SYN_SENT": 2, "FIN_WAIT1": 1, "LAST_ACK": 1,
                      "SYN_RECV": 7}
    assert collections.Counter(table.family.tolist()) == {socket.AF_INET: 39, socket.AF_INET6: 5}


def test_fixture_udp_rows_exactly():
    rows = sorted(read_all(socket.IPPROTO_UDP).rows())
    assert rows == [
        (2, 1, "127.0.0.1", 52860, "127.0.0.1", 5353, 0, 0, 7691, 0),
        (2, 7, "127.0.0.1", 5353, "0.0.0.0", 0, 832, 0, 7690, 0),
        (10, 7, "::1", 5354, "::", 0, 0, 0, rows[2][8], 0),
    ]


def test_worked_example_line():
    line = "   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n"
    (row,) = proc_sockets.parse_lines([HEADER, line], socket.AF_INET)
    assert row == (10, (0x0100007F, 0, 0, 0), 3306, (0, 0, 0, 0), 0, 0, 0, 0, 4242)


def test_ipv6_worked_example():
    words, port = proc_sockets.parse_endpoint("B80D0120000000000000000001000000:01BB",
                                              socket.AF_INET6)
    assert (format_address(socket.AF_INET6, np.array(words, dtype=np.uint32)), port) == \
        ("2001:db8::1", 443)


def test_missing_ipv6_file_is_expected_absence(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text((FIXTURES / "net" / "tcp").read_text())
    missing = []
    assert len(read_all(socket.IPPROTO_TCP, tmp_path, missing)) == 39
    assert missing == [os.path.join(str(tmp_path), "net", "tcp6")]


def test_missing_file_without_a_list_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_all(socket.IPPROTO_TCP, tmp_path)


@pytest.mark.parametrize("line, reason", [
    ("   0: 0100007F:0CEA 00000000:0000\n", "too few fields"),
    ("   0: 0100007G:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1\n", "address: not a hexadecimal integer"),
    ("   0: 0100007F 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1\n", "bad endpoint"),
    ("   0: 0100007F:0CEA 00000000:0000 00 00000000:00000000 00:00000000 00000000 0 0 1\n", "bad state"),
    ("   0: 0100007F:0CEA 00000000:0000 0A 0000000000000000 00:00000000 00000000 0 0 1\n", "bad state or queues"),
    ("   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000 x 0 1\n", "uid: not a decimal integer"),
    ("   0: 0100007F:0CEA 00000000:0000 0A 123456789:00000000 00:00000000 00000000 0 0 1\n", "tx_queue: 123456789 is above 0xffffffff"),
    ("   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1_000\n", "inode: not a decimal integer"),
    ("   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 " + "9" * 400 + "\n", "inode: not a decimal integer"),
])
def test_malformed_lines_name_file_line_and_content(line, reason):
    with pytest.raises(proc_sockets.ProcParseError) as info:
        list(proc_sockets.parse_lines([HEADER, line], socket.AF_INET, "/proc/net/tcp"))
    message = str(info.value)
    assert message.startswith("/proc/net/tcp:2: ") and reason in message
    assert line.strip()[:20] in message


def test_missing_header_is_an_error():
    with pytest.raises(proc_sockets.ProcParseError, match="header"):
        list(proc_sockets.parse_lines(["garbage\n"], socket.AF_INET, "x"))


def test_a_header_alone_is_an_empty_table_but_an_empty_file_is_an_error():
    assert list(proc_sockets.parse_file(io.StringIO(HEADER), socket.AF_INET)) == []
    with pytest.raises(proc_sockets.ProcParseError, match="empty, without the socket table header"):
        list(proc_sockets.parse_file(io.StringIO(""), socket.AF_INET, "/proc/net/tcp"))


@pytest.mark.parametrize("kind", ["fifo", "device", "endless line"])
def test_files_that_are_not_proc_files_fail_at_once_naming_the_file(tmp_path, kind):
    import os
    from exporter.sources import files
    (tmp_path / "net").mkdir()
    path = tmp_path / "net" / "tcp"
    if kind == "fifo":  # a broken bind mount: open() would block forever on a read
        os.mkfifo(path)
    elif kind == "device":  # /dev/zero: reading it never ends
        os.symlink("/dev/zero", path)
    else:
        with open(path, "wb") as out:
            out.write(HEADER.encode())
            out.truncate(files.LARGE + 1)  # sparse: costs no disk
    with pytest.raises(OSError) as caught:
        read_all(socket.IPPROTO_TCP, tmp_path)
    assert str(path) in str(caught.value)
    assert ("not a regular file" if kind != "endless line" else "a line longer") in str(caught.value)


def test_reads_are_bounded(tmp_path):
    from exporter.sources import files
    path = tmp_path / "big"
    path.write_text("0123456789\n" * 20)
    assert files.read_text(str(path), limit=220) == "0123456789\n" * 20
    with pytest.raises(OSError, match=f"more than 100 bytes.*{path}"):
        files.read_text(str(path), limit=100)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="0123456789ABCDEF: \tx-", max_size=120), max_size=6))
def test_garbage_lines_raise_parse_errors_only(lines):
    try:
        rows = list(proc_sockets.parse_lines([HEADER, *[l + "\n" for l in lines]], socket.AF_INET))
    except proc_sockets.ProcParseError:
        return
    for row in rows:
        assert 0 < row[0] < 256 and 0 <= row[2] < 65536


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400))
def test_binary_garbage_in_a_file_raises_parse_errors_only(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("proc")
    (root / "net").mkdir()
    (root / "net" / "udp").write_bytes(HEADER.encode() + data)
    try:
        list(proc_sockets.read(socket.IPPROTO_UDP, str(root), []))
    except proc_sockets.ProcParseError:
        pass
