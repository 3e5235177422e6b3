"""Routing tables (`netstat -r`): /proc/net/route (IPv4 main table) and /proc/net/ipv6_route.

    Iface  Destination  Gateway   Flags  RefCnt  Use  Metric  Mask      MTU  Window  IRTT
    eth0   00000000     010200C0  0003   0       0    0       00000000  0    0       0
-> Route(family=AF_INET, device="eth0", destination="0.0.0.0", prefix=0, gateway="192.0.2.1",
         flags=0x3, metric=0)

IPv4 words are printed with %08X of the host value of network-order bytes (as in
/proc/net/tcp); IPv6 addresses are 32 hex digits in network order.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator

from . import files

RTF_UP, RTF_GATEWAY, RTF_HOST, RTF_REJECT = 0x1, 0x2, 0x4, 0x200


class RoutesParseError(ValueError):
    pass


@dataclass(frozen=True)
class Route:
    family: int
    device: str
    destination: str
    prefix: int
    gateway: str
    flags: int
    metric: int

    @property
    def is_default(self) -> bool:
        """A usable default route. The kernel also lists an unreachable ::/0 null entry
        (RTF_REJECT), and prints an IPv4 blackhole or throw default with no device ("*")
        and RTF_UP alone, as if usable (found in review); a device really named "*" is
        taken for one of those."""
        if self.family == socket.AF_INET and self.device == "*":
            return False
        return self.prefix == 0 and self.flags & RTF_UP and not self.flags & RTF_REJECT


def _ipv4(word: str) -> str:
    """"010200C0" -> "192.0.2.1" (on a little-endian host, as the kernel printed it)."""
    return socket.inet_ntop(socket.AF_INET, int(word, 16).to_bytes(4, sys.byteorder))


def parse_ipv4(lines: Iterable[str], name: str = "?") -> Iterator[Route]:
    for lineno, line in enumerate(lines, start=1):
        fields = files.fields(line)
        if lineno == 1:
            if not fields or fields[0] != "Iface":
                raise RoutesParseError(f"{name}:1: not a route table header: {line.rstrip()!r}")
            continue
        if not fields:
            continue
        try:
            if len(fields) != 11:
                raise ValueError("expected 11 columns")
            mask = int(fields[7], 16)
            yield Route(family=socket.AF_INET, device=fields[0], destination=_ipv4(fields[1]),
                        prefix=bin(mask).count("1"), gateway=_ipv4(fields[2]),
                        flags=int(fields[3], 16), metric=int(fields[6]))
        except (ValueError, OverflowError) as exc:
            raise RoutesParseError(f"{name}:{lineno}: {exc}: {line.rstrip()!r}") from None


def parse_ipv6(lines: Iterable[str], name: str = "?") -> Iterator[Route]:
    """"fd00...0000 40 0000... 00 0000... 00000100 00000001 00000000 00000001 eth0"
    -> destination fd00::/64 via :: on eth0, metric 256, flags RTF_UP."""
    for lineno, line in enumerate(lines, start=1):
        fields = files.fields(line)
        if not fields:
            continue
        try:
            if len(fields) != 10 or len(fields[0]) != 32 or len(fields[4]) != 32:
                raise ValueError("expected 10 columns")
            yield Route(family=socket.AF_INET6, device=fields[9],
                        destination=str(ipaddress.IPv6Address(int(fields[0], 16))),
                        prefix=int(fields[1], 16),
                        gateway=str(ipaddress.IPv6Address(int(fields[4], 16))),
                        flags=int(fields[8], 16), metric=int(fields[5], 16))
        except ValueError as exc:
            raise RoutesParseError(f"{name}:{lineno}: {exc}: {line.rstrip()!r}") from None


def read(procfs: str = "/proc", missing: list[str] | None = None) -> list[Route]:
    """Both tables; ipv6_route may be absent (IPv6 disabled)."""
    routes = []
    path = os.path.join(procfs, "net", "route")
    with files.open_text(path, files.LARGE) as stream:
        routes.extend(parse_ipv4(stream, path))
    path = os.path.join(procfs, "net", "ipv6_route")
    try:
        stream = files.open_text(path, files.LARGE)
    except FileNotFoundError:
        if missing is not None:
            missing.append(path)
        return routes
    with stream:
        routes.extend(parse_ipv6(stream, path))
    return routes
