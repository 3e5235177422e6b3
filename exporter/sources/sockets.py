"""The socket tables, from netlink sock_diag or /proc/net/{tcp,udp}*, as --collector.sockets.source
says: in auto mode netlink, and /proc where netlink is refused (logged both ways)."""
from __future__ import annotations

import errno
import logging
import socket
import time
from typing import Callable, Iterator

from . import proc_sockets, sockdiag
from .table import SocketTable

log = logging.getLogger(__name__)

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
SOURCE_MODES = ("auto", "netlink", "proc")  # config.py keeps the same tuple
# A TCPDIAG_GETSOCK refused with one of these means the kernel lacks the one-walk request;
# ask per family instead.
_NO_COMPAT = {errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP}
# Errors that mean "netlink sock_diag is refused here" (no module, seccomp, LSM, no such
# protocol): only these switch a protocol to /proc. Running out of descriptors, memory or
# buffers (EMFILE, ENFILE, ENOMEM, ENOBUFS) is the process's trouble, not netlink's: that
# sample fails and the next one tries netlink again.
REFUSED = {errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT, errno.EACCES, errno.EPERM,
           errno.ENOENT, errno.EOPNOTSUPP, errno.ECONNREFUSED}
# After a fallback to /proc, netlink is tried again this often (a module loaded later, a
# policy changed).
NETLINK_RETRY_SECONDS = 600.0


def note_missing(seen: set[str], paths: list[str]) -> None:
    """Log once per file that an optional file (IPv6's, conntrack's) is absent."""
    for path in sorted(set(paths) - seen):
        log.info("%s is absent (IPv6 disabled or module not loaded); its metrics are left out",
                 path)
    seen.update(paths)


class SocketReader:
    """Reads socket tables from netlink or /proc according to --collector.sockets.source.

    In auto mode a netlink refusal switches that protocol to /proc for good and is logged once.
    """

    def __init__(self, mode: str = "auto", procfs: str = "/proc",
                 dump: Callable[..., Iterator[SocketTable]] = sockdiag.dump,
                 read_proc: Callable[..., Iterator[SocketTable]] = proc_sockets.read,
                 clock: Callable[[], float] = time.monotonic):
        if mode not in SOURCE_MODES:
            raise ValueError(f"unknown socket source {mode!r}")
        self.mode = mode
        self.procfs = procfs
        self._dump = dump
        self._read_proc = read_proc
        self._clock = clock
        self._per_family_tcp = False
        self.sources = {name: ("proc" if mode == "proc" else "netlink") for name in PROTOCOLS}
        self._retry_at: dict[str, float] = {}  # protocol -> when to try netlink again
        self.missing: set[str] = set()  # /proc files found absent where that is expected
        self.buffer = bytearray(sockdiag.BATCH_BYTES)  # reused by every dump (one thread)

    def tables(self, protocol: str, buffer: bytearray | None = None) -> Iterator[SocketTable]:
        """buffer: the one a reader took when it began (the watchdog gives the next sample a
        fresh one while a blocked read may still use its own)."""
        if self.sources[protocol] == "proc":
            return self._proc(protocol)
        return self._netlink(protocol, buffer if buffer is not None else self.buffer)

    def _proc(self, protocol: str) -> Iterator[SocketTable]:
        missing: list[str] = []
        yield from self._read_proc(PROTOCOLS[protocol], self.procfs, missing)
        note_missing(self.missing, missing)

    def _netlink(self, protocol: str, buffer: bytearray) -> Iterator[SocketTable]:
        proto = PROTOCOLS[protocol]
        if protocol == "tcp" and not self._per_family_tcp:
            try:
                yield from self._dump(proto, socket.AF_UNSPEC, buffer=buffer)
                return
            except OSError as exc:
                if exc.errno not in _NO_COMPAT or isinstance(exc, sockdiag.DumpError):
                    raise
                log.info("TCPDIAG_GETSOCK refused (%s); dumping TCP per address family", exc)
                self._per_family_tcp = True
        for family in (socket.AF_INET, socket.AF_INET6):
            yield from self._dump(proto, family, buffer=buffer)

    def retry_netlink(self, protocol: str) -> None:
        """Before a read: after a fallback, give netlink another chance now and then."""
        if self.sources[protocol] == "proc" and protocol in self._retry_at \
                and self._clock() >= self._retry_at[protocol]:
            self.sources[protocol] = "netlink"

    def fall_back(self, protocol: str, exc: OSError) -> bool:
        """After a netlink failure: switch to /proc if netlink is refused and that is
        allowed. True when the caller should read again (from /proc)."""
        if self.mode != "auto" or self.sources[protocol] == "proc":
            return False
        if isinstance(exc, sockdiag.DumpError) or exc.errno not in REFUSED:
            return False
        retrying = protocol in self._retry_at
        self.sources[protocol] = "proc"
        self._retry_at[protocol] = self._clock() + NETLINK_RETRY_SECONDS
        if not retrying:
            log.warning("netlink sock_diag refused for %s (%s); reading %s/net/%s* instead, "
                        "and trying netlink again every %.0fs", protocol,
                        exc.strerror or exc, self.procfs, protocol, NETLINK_RETRY_SECONDS)
        return True

    def netlink_works(self, protocol: str) -> None:
        """After a successful read: if that was a retry, say netlink is back."""
        if self.sources[protocol] == "netlink" and self._retry_at.pop(protocol, None) is not None:
            log.warning("netlink sock_diag works again for %s; reading it instead of /proc",
                        protocol)
