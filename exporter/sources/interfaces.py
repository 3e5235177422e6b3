"""Interface counters (`netstat -i`) from /proc/net/dev, and each device's MTU and flags.

    Inter-|   Receive                                                |  Transmit
     face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs ...
        lo:  208961     179    0    0    0     0          0         0   208961     179    0 ...
-> {"lo": {"receive_bytes": 208961, "receive_packets": 179, ..., "transmit_bytes": 208961, ...}}
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import psutil

# The 16 columns, named as exported (netstat_interface_<name>_total).
COLUMNS = ("receive_bytes", "receive_packets", "receive_errors", "receive_drops",
           "receive_fifo_errors", "receive_frame_errors", "receive_compressed",
           "receive_multicast", "transmit_bytes", "transmit_packets", "transmit_errors",
           "transmit_drops", "transmit_fifo_errors", "transmit_collisions",
           "transmit_carrier_errors", "transmit_compressed")


class InterfacesParseError(ValueError):
    pass


def parse(lines: Iterable[str], name: str = "?") -> dict[str, dict[str, int]]:
    devices: dict[str, dict[str, int]] = {}
    for lineno, line in enumerate(lines, start=1):
        if lineno <= 2:  # the two header lines
            if "|" not in line:
                raise InterfacesParseError(f"{name}:{lineno}: not a /proc/net/dev header: {line.rstrip()!r}")
            continue
        device, sep, rest = line.partition(":")
        values = rest.split()
        if not sep or not device.strip() or len(values) != len(COLUMNS):
            raise InterfacesParseError(f"{name}:{lineno}: expected 'device: {len(COLUMNS)} counters': "
                                       f"{line.rstrip()!r}")
        try:
            devices[device.strip()] = dict(zip(COLUMNS, map(int, values)))
        except ValueError:
            raise InterfacesParseError(f"{name}:{lineno}: counters must be integers: "
                                       f"{line.rstrip()!r}") from None
    return devices


def read(procfs: str = "/proc", missing: list[str] | None = None) -> dict[str, dict[str, int]]:
    path = os.path.join(procfs, "net", "dev")
    with open(path, encoding="ascii") as stream:
        return parse(stream, path)


# netstat -i's Flg column: psutil's flag names -> net-tools' letters, in net-tools' order.
FLAG_LETTERS = (("allmulti", "A"), ("broadcast", "B"), ("debug", "D"), ("loopback", "L"),
                ("multicast", "M"), ("dynamic", "d"), ("promisc", "P"), ("notrailers", "N"),
                ("noarp", "O"), ("pointopoint", "P"), ("slave", "s"), ("master", "m"),
                ("running", "R"), ("up", "U"))


@dataclass(frozen=True)
class Link:
    mtu: int  # bytes
    flags: frozenset[str]  # "up", "running", "broadcast", ... as SIOCGIFFLAGS reports them
    speed_mbps: int  # 0 when the driver does not say (virtual devices)

    @property
    def letters(self) -> str:
        """netstat -i's Flg: frozenset({"up", "broadcast", "running", "multicast"}) -> "BMRU"."""
        return "".join(letter for name, letter in FLAG_LETTERS if name in self.flags)


def read_links() -> dict[str, Link]:
    """MTU, flags and speed of every device in the exporter's own network namespace, by the
    ioctls netstat -i uses (psutil.net_if_stats). The flags are the kernel's dev_get_flags(),
    RUNNING included, which /sys/class/net/*/flags does not carry."""
    return {name: Link(stats.mtu, frozenset(filter(None, stats.flags.split(","))), stats.speed)
            for name, stats in psutil.net_if_stats().items()}


@dataclass(frozen=True)
class InterfaceTable:
    counters: dict[str, dict[str, int]]  # /proc/net/dev, device -> column -> value
    links: dict[str, Link]  # devices of our own namespace; absent ones have no link data


def read_table(procfs: str = "/proc", missing: list[str] | None = None) -> InterfaceTable:
    return InterfaceTable(read(procfs, missing), read_links())
