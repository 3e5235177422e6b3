"""Every /proc and /sys read goes through here (as psutil's open_text/open_binary).

- Regular files only, opened non-blocking: a FIFO left by a broken bind mount or /dev/zero
  is refused at once instead of hanging the sampler or filling memory.
- Reads are bounded: socket tables and routing tables may be large (a million sockets make
  about 180 MB of /proc/net/tcp6), everything else is small.
- Bytes are decoded as UTF-8 with surrogateescape: an interface or program name may hold any
  byte, and a name with an undecodable byte survives (label values escape it visibly).
- Errors name the file; parsers add the line.
"""
from __future__ import annotations

import errno
import io
import os
import re
import stat
from typing import TextIO

SMALL = 4 << 20  # snmp, netstat, sockstat, dev, igmp, sysctls, comm
LARGE = 256 << 20  # socket tables and routing tables: a million rows and then some
MAX_LINE = 64 << 10  # the longest line the kernel writes here is a few KB (TcpExt's header)
MAX_U64 = (1 << 64) - 1
_DIGITS = re.compile(r"-?[0-9]{1,20}")
_GAP = re.compile(r"[ \t]+")


class _Bounded(io.FileIO):
    """A file that refuses to give more than `limit` bytes."""

    def __init__(self, fd: int, path: str, limit: int):
        super().__init__(fd, "rb", closefd=True)
        self.path, self.limit, self.total = path, limit, 0

    def readinto(self, buffer) -> int | None:
        count = super().readinto(buffer)
        if count:
            self.total += count
            if self.total > self.limit:
                raise OSError(errno.EFBIG, f"more than {self.limit} bytes: not what the "
                              "kernel writes here", self.path)
        return count

    def readall(self) -> bytes:
        # FileIO.readall would bypass readinto (and the limit): read in chunks instead
        chunks = []
        while chunk := self.read(1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        buffer = bytearray(size)
        count = self.readinto(buffer)
        return bytes(buffer[:count or 0])


def _open(path: str, limit: int) -> _Bounded:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or socket where a "
                          "/proc file should be)", path)
        return _Bounded(fd, path, limit)
    except BaseException:
        os.close(fd)
        raise


class _Text(io.TextIOWrapper):
    """Lines of at most MAX_LINE characters: a file of one endless line is refused before it
    is held in memory."""

    def __next__(self) -> str:
        line = self.readline(MAX_LINE + 1)
        if not line:
            raise StopIteration
        if len(line) > MAX_LINE:
            raise OSError(errno.EFBIG, f"a line longer than {MAX_LINE} characters",
                          self.buffer.raw.path)
        return line


def open_text(path: str, limit: int = SMALL) -> TextIO:
    """A text stream over a /proc or /sys file, for parsers that go line by line; opening
    errors (ENOENT: an optional file is absent) are raised here, at the call."""
    # newline="\n": lines end at "\n" only, as the kernel writes them; a "\r" in a name it
    # prints (a program's comm, an interface) is part of the name, not a line break
    return _Text(io.BufferedReader(_open(path, limit)), encoding="utf-8",
                 errors="surrogateescape", newline="\n")


def read_text(path: str, limit: int = SMALL) -> str:
    with open_text(path, limit) as stream:
        return stream.read()


def fields(line: str) -> list[str]:
    """A line's fields, split where the kernel puts space: runs of spaces and tabs only. An
    interface name may hold any byte but NUL, "/", ":" and ASCII space, and str.split()
    also splits at \x1c-\x1f, U+0085, U+00A0, U+2000... (a device "eth0\x1f1" became
    two fields, and a route its neighbour's; found in review)."""
    line = line.strip(" \t\n")
    return _GAP.split(line) if line else []


def integer(text: str, where: str, minimum: int = 0, maximum: int = MAX_U64) -> int:
    """Decimal digits in range, or ValueError naming `where` ("path:line"): "1_000", "+5",
    " 7", "1e3" and a 400-digit number are not what the kernel prints."""
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"{where}: not a decimal integer: {text[:40]!r}")
    value = int(text)
    if not minimum <= value <= maximum:
        raise ValueError(f"{where}: {value} is out of range {minimum}..{maximum}")
    return value


def hex_integer(text: str, where: str, maximum: int = MAX_U64) -> int:
    """"0000001A" -> 26, at most `maximum` (a 9-digit queue is not a 32-bit counter)."""
    if not text or len(text) > 32 or not all(c in "0123456789abcdefABCDEF" for c in text):
        raise ValueError(f"{where}: not a hexadecimal integer: {text[:40]!r}")
    value = int(text, 16)
    if value > maximum:
        raise ValueError(f"{where}: {text} is above {maximum:#x}")
    return value
