"""Socket usage from /proc/net/sockstat and sockstat6, and the limits it is compared with.

    sockets: used 230
    TCP: inuse 5 orphan 0 tw 0 alloc 7 mem 1      -> ("TCP", "inuse", 5), ("TCP", "orphan", 0) ...
    FRAG: inuse 0 memory 0
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

from . import files


_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class SockstatParseError(ValueError):
    pass


@dataclass(frozen=True)
class Sockstat:
    values: dict[tuple[str, str], int]  # (protocol as printed, key) -> value
    page_size: int
    tcp_max_orphans: int | None
    tcp_mem: tuple[int, int, int] | None  # pages: min, pressure, max
    udp_mem: tuple[int, int, int] | None
    local_port_range: tuple[int, int] | None  # net.ipv4.ip_local_port_range (per namespace)


def parse(lines: Iterable[str], name: str = "?") -> Iterator[tuple[str, str, int]]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        protocol, sep, rest = line.partition(":")
        parts = rest.split()
        # protocols and keys become label values and metric names: ASCII words only
        if not sep or not _WORD.fullmatch(protocol.strip()) or len(parts) % 2 \
                or not all(_WORD.fullmatch(key) for key in parts[::2]):
            raise SockstatParseError(f"{name}:{lineno}: expected 'PROTO: key value ...': "
                                     f"{line.rstrip()!r}")
        for key, value in zip(parts[::2], parts[1::2]):
            try:
                yield protocol.strip(), key, files.integer(value, f"{name}:{lineno}: {key}")
            except ValueError as exc:
                raise SockstatParseError(str(exc)) from None


def _read_ints(path: str, count: int) -> tuple[int, ...] | None:
    """A sysctl file of `count` integers; None when it does not exist (e.g. /proc/sys not
    mounted in a container)."""
    try:
        text = files.read_text(path)
    except FileNotFoundError:
        return None
    values = text.split()
    if len(values) != count:
        raise SockstatParseError(f"{path}: expected {count} integers, got {text.strip()[:80]!r}")
    try:
        return tuple(files.integer(v, path) for v in values)
    except ValueError as exc:
        raise SockstatParseError(str(exc)) from None


def read(procfs: str = "/proc", missing: list[str] | None = None) -> Sockstat:
    values: dict[tuple[str, str], int] = {}
    for name in ("sockstat", "sockstat6"):
        path = os.path.join(procfs, "net", name)
        try:
            stream = files.open_text(path)
        except OSError as exc:
            if name == "sockstat6" and exc.errno == errno.ENOENT and missing is not None:
                missing.append(path)
                continue
            raise
        with stream:
            for protocol, key, value in parse(stream, path):
                if (protocol, key) in values:
                    raise SockstatParseError(f"{path}: {protocol} {key} appears twice")
                values[(protocol, key)] = value
    sysctl = os.path.join(procfs, "sys", "net", "ipv4")
    orphans = _read_ints(os.path.join(sysctl, "tcp_max_orphans"), 1)
    return Sockstat(values=values, page_size=os.sysconf("SC_PAGE_SIZE"),
                    tcp_max_orphans=orphans[0] if orphans else None,
                    tcp_mem=_read_ints(os.path.join(sysctl, "tcp_mem"), 3),
                    udp_mem=_read_ints(os.path.join(sysctl, "udp_mem"), 3),
                    local_port_range=_read_ints(os.path.join(sysctl, "ip_local_port_range"), 2))
