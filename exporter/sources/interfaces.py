"""Interface counters (`netstat -i`) from /proc/net/dev, and each device's MTU and flags.

    Inter-|   Receive                                                |  Transmit
     face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs ...
        lo:  208961     179    0    0    0     0          0         0   208961     179    0 ...
-> {"lo": {"receive_bytes": 208961, "receive_packets": 179, ..., "transmit_bytes": 208961, ...}}
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from typing import Iterable

from . import files

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
        device = device.strip(" ")  # "%6s:": padded with spaces only (a name holds none)
        values = files.fields(rest)
        if not sep or not device or len(values) != len(COLUMNS):
            raise InterfacesParseError(f"{name}:{lineno}: expected 'device: {len(COLUMNS)} counters': "
                                       f"{line.rstrip()!r}")
        if device in devices:  # two lines for one device: which one is true?
            raise InterfacesParseError(f"{name}:{lineno}: device {device!r} appears twice")
        try:
            devices[device] = {column: files.integer(value, f"{name}:{lineno}: {column}")
                                       for column, value in zip(COLUMNS, values)}
        except ValueError as exc:
            raise InterfacesParseError(f"counters must be integers: {exc}") from None
    return devices


def read(procfs: str = "/proc", missing: list[str] | None = None) -> dict[str, dict[str, int]]:
    path = os.path.join(procfs, "net", "dev")
    with files.open_text(path) as stream:
        return parse(stream, path)


# include/uapi/linux/if.h: net_device_flags, named as netstat -i and ip link name them.
IFF = {"up": 0x1, "broadcast": 0x2, "debug": 0x4, "loopback": 0x8, "pointopoint": 0x10,
       "notrailers": 0x20, "running": 0x40, "noarp": 0x80, "promisc": 0x100,
       "allmulti": 0x200, "master": 0x400, "slave": 0x800, "multicast": 0x1000,
       "dynamic": 0x8000}
# netstat -i's Flg column: flag -> net-tools' letter, in net-tools' order.
FLAG_LETTERS = (("allmulti", "A"), ("broadcast", "B"), ("debug", "D"), ("loopback", "L"),
                ("multicast", "M"), ("dynamic", "d"), ("promisc", "P"), ("notrailers", "N"),
                ("noarp", "O"), ("pointopoint", "P"), ("slave", "s"), ("master", "m"),
                ("running", "R"), ("up", "U"))
SIOCGIFFLAGS, SIOCGIFMTU = 0x8913, 0x8921  # include/uapi/linux/sockios.h
IFREQ = struct.Struct("16s24x")  # struct ifreq: the name, then a 24-byte union
_SKIP = {errno.ENODEV, errno.ENXIO}  # the device went away, or is in another namespace


@dataclass(frozen=True)
class Link:
    mtu: int  # bytes
    flags: frozenset[str]  # "up", "running", "broadcast", ... as SIOCGIFFLAGS reports them

    @property
    def letters(self) -> str:
        """netstat -i's Flg: frozenset({"up", "broadcast", "running", "multicast"}) -> "BMRU"."""
        return "".join(letter for name, letter in FLAG_LETTERS if name in self.flags)


def read_links(devices: Iterable[str]) -> dict[str, Link]:
    """MTU and flags of each device, by the ioctls netstat -i uses. The flags are the kernel's
    dev_get_flags(), RUNNING included, which /sys/class/net/*/flags does not carry. Names
    go to the kernel as the bytes they were read as (any byte but / : and whitespace)."""
    links = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for device in devices:
            request = IFREQ.pack(os.fsencode(device)[:15])
            try:
                flags = struct.unpack_from("=H", fcntl.ioctl(sock, SIOCGIFFLAGS, request), 16)[0]
                mtu = struct.unpack_from("=i", fcntl.ioctl(sock, SIOCGIFMTU, request), 16)[0]
            except OSError as exc:
                if exc.errno not in _SKIP:
                    raise
                continue
            links[device] = Link(mtu, frozenset(n for n, bit in IFF.items() if flags & bit))
    return links


@dataclass(frozen=True)
class InterfaceTable:
    counters: dict[str, dict[str, int]]  # /proc/net/dev, device -> column -> value
    links: dict[str, Link]  # devices of our own namespace; absent ones have no link data
    shown: tuple[str, ...] | None = None  # devices with their own series (None: all)


def read_table(procfs: str = "/proc", missing: list[str] | None = None) -> InterfaceTable:
    counters = read(procfs, missing)
    return InterfaceTable(counters, read_links(counters))
