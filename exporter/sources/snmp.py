"""Protocol statistics (`netstat -s`): /proc/net/snmp, /proc/net/netstat, /proc/net/snmp6.

snmp and netstat hold pairs of lines, a header naming the fields and a line of values:
    Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens ...
    Tcp: 1 200 120000 -1 34 ...
snmp6 holds one "NameValue" per line, the group being the name's prefix up to its "6":
    Ip6InReceives      1        -> ("Ip6", "InReceives", 1)
"""
from __future__ import annotations

import errno
import os
import re
from typing import Iterable, Iterator

from . import files

Stats = dict[str, dict[str, int]]  # group -> field -> value, in file order

FILES = ("snmp", "netstat")
_SNMP6_NAME = re.compile(r"([A-Za-z]+6)([A-Za-z0-9]+)$")
# Group and field names become metric names: ASCII letters and digits only ("TcpExt",
# "ListenOverflows"); anything else is not what the kernel prints.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")


class SnmpParseError(ValueError):
    pass


def parse_pairs(lines: Iterable[str], name: str = "?") -> Iterator[tuple[str, str, int]]:
    """Header/value line pairs -> (group, field, value).

    "Tcp: RtoAlgorithm RtoMin", "Tcp: 1 200" -> ("Tcp", "RtoAlgorithm", 1), ("Tcp", "RtoMin", 200)
    """
    header: tuple[str, list[str], int] | None = None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        group, sep, rest = line.partition(":")
        if not sep or not _NAME.fullmatch(group):
            raise SnmpParseError(f"{name}:{lineno}: expected 'Group: ...': {line.rstrip()!r}")
        if header is None:
            fields = rest.split()
            bad = next((f for f in fields if not _NAME.fullmatch(f)), None)
            if bad is not None:
                raise SnmpParseError(f"{name}:{lineno}: {group} field {bad[:40]!r} is not a "
                                     f"name")
            header = (group, fields, lineno)
            continue
        head_group, fields, head_line = header
        header = None
        values = rest.split()
        if group != head_group:
            raise SnmpParseError(f"{name}:{lineno}: values for {group!r} follow the header of "
                                 f"{head_group!r} (line {head_line})")
        if len(values) != len(fields):
            raise SnmpParseError(f"{name}:{lineno}: {group} has {len(fields)} fields but "
                                 f"{len(values)} values")
        for field, value in zip(fields, values):
            yield group, field, _int(value, name, lineno, field)
    if header is not None:
        raise SnmpParseError(f"{name}:{header[2]}: header of {header[0]!r} without values "
                             "(truncated read?)")


def parse_snmp6(lines: Iterable[str], name: str = "?") -> Iterator[tuple[str, str, int]]:
    """"Ip6InReceives   1" -> ("Ip6", "InReceives", 1)"""
    for lineno, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        match = _SNMP6_NAME.match(parts[0]) if len(parts) == 2 else None
        if match is None:
            raise SnmpParseError(f"{name}:{lineno}: expected 'Name6Field value': {line.rstrip()!r}")
        yield match.group(1), match.group(2), _int(parts[1], name, lineno, parts[0])


# The one field the kernel prints negative: Tcp MaxConn is -1 ("no limit"). Every other field
# is a counter or a small gauge, 0 to 2**64-1.
SIGNED = {"MaxConn"}


def _int(text: str, name: str, lineno: int, field: str) -> int:
    try:
        return files.integer(text, f"{name}:{lineno}: {field}",
                             minimum=-(1 << 63) if field in SIGNED else 0)
    except ValueError as exc:
        raise SnmpParseError(str(exc)) from None


def _collect(triples: Iterator[tuple[str, str, int]], stats: Stats, name: str) -> None:
    for group, field, value in triples:
        fields = stats.setdefault(group, {})
        if field in fields:
            raise SnmpParseError(f"{name}: {group} {field} appears twice")
        fields[field] = value


def read(procfs: str = "/proc", missing: list[str] | None = None) -> Stats:
    """Every group of snmp, netstat and snmp6. snmp6 may be absent (IPv6 disabled): its path
    goes to `missing`. The others must exist."""
    stats: Stats = {}
    for name in FILES:
        path = os.path.join(procfs, "net", name)
        with files.open_text(path) as stream:
            _collect(parse_pairs(stream, path), stats, path)
    path = os.path.join(procfs, "net", "snmp6")
    try:
        stream = files.open_text(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT or missing is None:
            raise
        missing.append(path)
        return stats
    with stream:
        _collect(parse_snmp6(stream, path), stats, path)
    return stats
