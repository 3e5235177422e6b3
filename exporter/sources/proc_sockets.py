"""TCP and UDP socket tables from /proc/net/{tcp,tcp6,udp,udp6}: the fallback for hosts
where netlink sock_diag is refused (seccomp, an old container runtime, a missing module).

It gives the same SocketTable as sockdiag.py for the same kernel state, except that a
LISTEN socket's Send-Q is not its backlog here (the kernel prints write_seq - snd_una, 0),
so callers must not report listen backlogs from this source.
"""
from __future__ import annotations

import errno
import os
import socket
from typing import IO, Iterable, Iterator

from . import files
from .table import SocketTable

FILES = {
    # protocol -> ((file name, family), ...)
    socket.IPPROTO_TCP: (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)),
    socket.IPPROTO_UDP: (("udp", socket.AF_INET), ("udp6", socket.AF_INET6)),
}
_BATCH_LINES = 32768
_ADDR_HEX = {socket.AF_INET: 8, socket.AF_INET6: 32}


class ProcParseError(ValueError):
    pass


def parse_endpoint(text: str, family: int) -> tuple[tuple[int, int, int, int], int]:
    """One "address:port" column -> (four address words, port).

    The kernel prints each 32-bit word of the network-order address with %08X of its host
    value, so int(word, 16) is already the host value we store:
    "0100007F:0CEA" -> ((0x0100007F, 0, 0, 0), 3306) on a little-endian host (127.0.0.1).
    """
    addr, sep, port = text.partition(":")
    if not sep or len(addr) != _ADDR_HEX[family] or len(port) != 4:
        raise ValueError(f"bad endpoint {text!r}")
    words = tuple(files.hex_integer(addr[i:i + 8], "address") for i in range(0, len(addr), 8))
    return (words + (0, 0, 0))[:4], files.hex_integer(port, "port")


def parse_lines(lines: Iterable[str], family: int, name: str = "?") -> Iterator[tuple]:
    """Yield one tuple per socket line (after the header):
    (state, local words, local port, remote words, remote port, rx_queue, tx_queue, uid, inode).

    "   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0
    0 4242 ..." -> (10, (0x0100007F, 0, 0, 0), 3306, (0, 0, 0, 0), 0, 0, 0, 0, 4242)
    """
    lineno = 0
    for lineno, line in enumerate(lines, start=1):
        if lineno == 1:
            if not line.lstrip().startswith("sl"):
                raise ProcParseError(f"{name}:1: not a socket table header: {line.rstrip()!r}")
            continue
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) < 10 or not fields[0].endswith(":"):
                raise ValueError("too few fields")
            local, lport = parse_endpoint(fields[1], family)
            remote, rport = parse_endpoint(fields[2], family)
            state = files.hex_integer(fields[3], "state", 255)
            tx, sep, rx = fields[4].partition(":")
            if not sep or not state:
                raise ValueError("bad state or queues")
            u32 = (1 << 32) - 1
            yield (state, local, lport, remote, rport, files.hex_integer(rx, "rx_queue", u32),
                   files.hex_integer(tx, "tx_queue", u32),
                   files.integer(fields[7], "uid", 0, u32), files.integer(fields[9], "inode"))
        except ValueError as exc:
            raise ProcParseError(f"{name}:{lineno}: {exc}: {line.rstrip()[:200]!r}") from None
    if lineno == 0:  # not even the header: a truncated or wrong file, not "no sockets"
        raise ProcParseError(f"{name}: empty, without the socket table header")


def _table(rows: list[tuple], family: int) -> SocketTable:
    state, local, lport, remote, rport, rx, tx, uid, inode = zip(*rows)
    return SocketTable.from_columns({
        "family": [family] * len(rows), "state": state, "local_addr": local,
        "local_port": lport, "remote_addr": remote, "remote_port": rport,
        "recv_q": rx, "send_q": tx, "uid": uid, "inode": inode})


def parse_file(stream: IO[str], family: int, name: str = "?") -> Iterator[SocketTable]:
    rows: list[tuple] = []
    for row in parse_lines(stream, family, name):
        rows.append(row)
        if len(rows) >= _BATCH_LINES:
            yield _table(rows, family)
            rows = []
    if rows:
        yield _table(rows, family)


def read(protocol: int, procfs: str = "/proc", missing: list[str] | None = None
         ) -> Iterator[SocketTable]:
    """Yield the sockets of one protocol from procfs/net/*.

    A missing IPv6 file (IPv6 disabled) is expected: its name goes to `missing` and IPv4 is
    still read. Anything else raises.
    """
    for name, family in FILES[protocol]:
        path = os.path.join(procfs, "net", name)
        try:
            stream = files.open_text(path, files.LARGE)
        except OSError as exc:
            # Only the IPv6 tables may be absent (IPv6 disabled); without the IPv4 one
            # there is no honest count to give.
            if exc.errno == errno.ENOENT and family == socket.AF_INET6 and missing is not None:
                missing.append(path)
                continue
            raise
        with stream as lines:
            yield from parse_file(lines, family, path)
