"""Multicast group memberships (`netstat -g`): /proc/net/igmp and /proc/net/igmp6.

igmp lists a device line, then one indented line per group (address as %08X of the host
value of network-order bytes):
    Idx  Device    : Count Querier       Group    Users Timer       Reporter
    1    lo        :     1      V3
                                010000E0     1 0:00000000           0
-> ("lo", "224.0.0.1", users=1)
igmp6 has one line per group:
    1    lo              ff020000000000000000000000000001     1 0000000C 0
-> ("lo", "ff02::1", users=1)
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator

from . import files


class MulticastParseError(ValueError):
    pass


@dataclass(frozen=True)
class Membership:
    family: int
    device: str
    group: str
    users: int


def parse_igmp(lines: Iterable[str], name: str = "?") -> Iterator[Membership]:
    device = None
    for lineno, line in enumerate(lines, start=1):
        if lineno == 1 or not line.strip(" \t\n"):
            continue
        try:
            if line[0] not in " \t":  # "1\tlo        :     1      V3"
                head, sep, _rest = line.partition(":")
                parts = files.fields(head)
                if not sep or len(parts) != 2:
                    raise ValueError("expected 'index device :'")
                device = parts[1]
                continue
            if device is None:
                raise ValueError("group before any device")
            fields = files.fields(line)
            raw = int(fields[0], 16).to_bytes(4, sys.byteorder)
            yield Membership(socket.AF_INET, device, socket.inet_ntop(socket.AF_INET, raw),
                             int(fields[1]))
        except (ValueError, IndexError, OverflowError) as exc:
            raise MulticastParseError(f"{name}:{lineno}: {exc}: {line.rstrip()!r}") from None


def parse_igmp6(lines: Iterable[str], name: str = "?") -> Iterator[Membership]:
    for lineno, line in enumerate(lines, start=1):
        fields = files.fields(line)
        if not fields:
            continue
        try:
            if len(fields) != 6 or len(fields[2]) != 32:
                raise ValueError("expected 6 columns")
            yield Membership(socket.AF_INET6, fields[1],
                             str(ipaddress.IPv6Address(int(fields[2], 16))), int(fields[3]))
        except ValueError as exc:
            raise MulticastParseError(f"{name}:{lineno}: {exc}: {line.rstrip()!r}") from None


def read(procfs: str = "/proc", missing: list[str] | None = None) -> list[Membership]:
    memberships = []
    for name, parse in (("igmp", parse_igmp), ("igmp6", parse_igmp6)):
        path = os.path.join(procfs, "net", name)
        try:
            stream = files.open_text(path)
        except FileNotFoundError:
            if name == "igmp6" and missing is not None:  # IPv6 disabled
                missing.append(path)
                continue
            raise
        with stream:
            memberships.extend(parse(stream, path))
    return memberships
