"""The scrape loop: sample the kernel in a background thread, publish immutable snapshots.

Why sample in the background rather than at scrape time (Prometheus' guide prefers the
latter): a dump of 1M sockets takes about a second of CPU, and at scrape time that cost
would be paid once per scraper and show up as /metrics latency. Here it is paid once per
interval whoever scrapes, /metrics answers from memory, and the peak window catches bursts
between scrapes. The snapshot's age is exported so staleness is visible.
"""
from __future__ import annotations

import collections
import errno
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping

from . import aggregate
from .sources import (conntrack, interfaces, multicast, netns, proc_sockets, processes, routes,
                      snmp, sockdiag, sockstat)
from .sources.table import NETSTAT_STATES, SocketTable

log = logging.getLogger(__name__)

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
COLLECTORS = ("tcp", "udp", "snmp", "sockstat", "interfaces", "conntrack", "routes", "multicast")
SOURCE_MODES = ("auto", "netlink", "proc")
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


@dataclass(frozen=True)
class SourceResult:
    ok: bool
    duration: float  # seconds
    data: Any = None
    error: str | None = None


@dataclass(frozen=True)
class Snapshot:
    taken_at: float  # wall clock, seconds since the epoch
    monotonic: float  # when the sample finished, time.monotonic()
    duration: float  # the whole sample, seconds
    effective_interval: float  # the interval the loop is keeping now (>= the configured one)
    results: Mapping[str, SourceResult]
    peaks: Mapping[str, int] = field(default_factory=dict)  # state -> max over peak window
    # metric -> series cut by --series.limit since start (a counter)
    truncated_total: Mapping[str, int] = field(default_factory=dict)
    socket_sources: Mapping[str, str] = field(default_factory=dict)  # protocol -> netlink|proc


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

    def tables(self, protocol: str) -> Iterator[SocketTable]:
        if self.sources[protocol] == "proc":
            return self._proc(protocol)
        return self._netlink(protocol)

    def _proc(self, protocol: str) -> Iterator[SocketTable]:
        missing: list[str] = []
        yield from self._read_proc(PROTOCOLS[protocol], self.procfs, missing)
        note_missing(self.missing, missing)

    def _netlink(self, protocol: str) -> Iterator[SocketTable]:
        proto = PROTOCOLS[protocol]
        if protocol == "tcp" and not self._per_family_tcp:
            try:
                yield from self._dump(proto, socket.AF_UNSPEC, buffer=self.buffer)
                return
            except OSError as exc:
                if exc.errno not in _NO_COMPAT or isinstance(exc, sockdiag.DumpError):
                    raise
                log.info("TCPDIAG_GETSOCK refused (%s); dumping TCP per address family", exc)
                self._per_family_tcp = True
        for family in (socket.AF_INET, socket.AF_INET6):
            yield from self._dump(proto, family, buffer=self.buffer)

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


def read_tcp(reader: SocketReader, listen_limit: int,
             remote: aggregate.RemoteOptions | None = None,
             previous: aggregate.TcpSummary | None = None, owners=None,
             program_top: int = 20) -> aggregate.TcpSummary:
    return _read(reader, "tcp", lambda: aggregate.TcpAccumulator(
        listen_limit=listen_limit, backlog_known=reader.sources["tcp"] == "netlink",
        remote=remote, previous=previous, owners=owners, program_top=program_top))


def read_udp(reader: SocketReader) -> aggregate.UdpSummary:
    return _read(reader, "udp", aggregate.UdpAccumulator)


def _read(reader: SocketReader, protocol: str, new_accumulator):
    # A dump is aggregated batch by batch; if it has to start over (interrupted, or netlink
    # refused and we fall back to /proc), the partial sums are thrown away with it.
    reader.retry_netlink(protocol)
    for _attempt in range(3):
        acc = new_accumulator()
        try:
            for table in reader.tables(protocol):
                acc.add(table)
            reader.netlink_works(protocol)
            return acc.result()
        except sockdiag.DumpInterrupted:
            continue
        except OSError as exc:
            if not reader.fall_back(protocol, exc):
                raise
    raise sockdiag.DumpInterrupted(errno.EINTR, f"{protocol} dump interrupted three times")


class Sampler:
    def __init__(self, reader: SocketReader, interval: float = 5.0, listen_limit: int = 100,
                 peak_window: float = 60.0, remote: aggregate.RemoteOptions | None = None,
                 programs: int | None = None, collectors: Iterable[str] | None = None,
                 namespaces: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.reader = reader
        self.interval = interval
        self.listen_limit = listen_limit
        self.remote = remote
        self.programs = programs  # top-N programs with their own series; None: -p off
        self.namespaces = namespaces  # top-N network namespaces; None: not read
        self._truncated_total = dict.fromkeys(aggregate.SERIES_LIMITED, 0) if remote else {}
        self.peak_window = peak_window
        self._clock = clock
        self._wall_clock = wall_clock
        self._sources: dict[str, Callable[[], Any]] = {
            "tcp": self._read_tcp,
            "udp": lambda: read_udp(self.reader),
            "snmp": lambda: self._optional(snmp.read),
            "sockstat": lambda: self._optional(sockstat.read),
            "interfaces": lambda: self._optional(interfaces.read),
            "conntrack": lambda: self._optional(conntrack.read),
            "routes": lambda: self._optional(routes.read),
            "multicast": lambda: self._optional(multicast.read),
        }
        if namespaces is not None:
            self._sources["netns"] = self._read_namespaces
        if collectors is not None:  # --collector.disable, or the one view the CLI prints
            unknown = set(collectors) - set(self._sources)
            if unknown:
                raise ValueError(f"unknown collectors: {', '.join(sorted(unknown))}")
            self._sources = {k: v for k, v in self._sources.items() if k in set(collectors)}
        self._history: collections.deque[tuple[float, dict[str, int]]] = collections.deque()
        self._errors: dict[str, str] = {}  # source -> its current error, while failing
        self._effective_interval = interval
        self._snapshot: Snapshot | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _optional(self, read):
        missing: list[str] = []
        data = read(self.reader.procfs, missing)
        note_missing(self.reader.missing, missing)
        return data

    def _previous(self, name: str):
        """A source's data in the last snapshot (for top-N hysteresis), None if it failed."""
        last = self._snapshot.results.get(name) if self._snapshot else None
        return last.data if last is not None and last.ok else None

    def _read_tcp(self) -> aggregate.TcpSummary:
        previous = self._previous("tcp")
        # netstat -p: who owns each socket, read just before the dump so both agree closely
        owners = processes.read(self.reader.procfs) if self.programs is not None else None
        summary = read_tcp(self.reader, self.listen_limit, self.remote, previous, owners,
                           self.programs or 0)
        if summary.remote is not None:
            for metric, cut in summary.remote.truncated.items():
                self._truncated_total[metric] += cut
        return summary

    def _read_namespaces(self) -> aggregate.NetnsSummary:
        """TCP states in every other network namespace (setns needs CAP_SYS_ADMIN; a
        namespace we may not enter is counted). The walk runs in a thread of its own: if
        returning from a namespace ever failed, only that thread would be left in it, never
        the sampler that reads the host's sockets."""
        found, unreadable = netns.discover(self.reader.procfs)
        per_namespace: dict[str, dict[str, int]] = {}
        failure: list[BaseException] = []

        def walk():
            nonlocal unreadable
            try:
                for namespace in found:
                    try:
                        with netns.entered(namespace.path):
                            summary = aggregate.summarize_tcp(
                                sockdiag.dump(socket.IPPROTO_TCP, buffer=self.reader.buffer))
                    except (PermissionError, FileNotFoundError, ProcessLookupError):
                        unreadable += 1
                        continue
                    per_namespace[namespace.name] = summary.state_totals()
            except BaseException as exc:  # handed to the sampler thread below
                failure.append(exc)

        worker = threading.Thread(target=walk, name="netns-walk", daemon=True)
        worker.start()
        worker.join()
        if failure:
            raise failure[0]
        return aggregate.summarize_namespaces(per_namespace, self.namespaces, unreadable,
                                              self._previous("netns"))

    @property
    def snapshot(self) -> Snapshot | None:
        """The latest published snapshot; readers take no lock (one reference swap)."""
        return self._snapshot

    def sample(self) -> Snapshot:
        started = self._clock()
        results = {}
        for name, read in self._sources.items():
            t0 = self._clock()
            try:
                data = read()
            except Exception as exc:  # one failing source must never stop the others
                # Log when a source starts failing or fails differently, not every sample.
                if self._errors.get(name) != str(exc):
                    log.error("collector %s failed: %s", name, exc,
                              exc_info=not isinstance(exc, (OSError, ValueError)))
                self._errors[name] = str(exc)
                results[name] = SourceResult(False, self._clock() - t0, error=str(exc))
            else:
                if self._errors.pop(name, None) is not None:
                    log.info("collector %s works again", name)
                results[name] = SourceResult(True, self._clock() - t0, data=data)
        finished = self._clock()
        self._stretch(finished - started)
        return Snapshot(taken_at=self._wall_clock(), monotonic=finished,
                        duration=finished - started,
                        effective_interval=self._effective_interval,
                        results=MappingProxyType(results),
                        peaks=MappingProxyType(self._update_peaks(finished, results)),
                        truncated_total=MappingProxyType(dict(self._truncated_total)),
                        socket_sources=MappingProxyType(dict(self.reader.sources)))

    def _update_peaks(self, now: float, results: Mapping[str, SourceResult]) -> dict[str, int]:
        tcp = results.get("tcp")
        if tcp is not None and tcp.ok:
            self._history.append((now, tcp.data.state_totals()))
        while self._history and self._history[0][0] < now - self.peak_window:
            self._history.popleft()
        peaks = dict.fromkeys(NETSTAT_STATES.values(), 0) if self._history else {}
        for _when, totals in self._history:
            for state, count in totals.items():
                peaks[state] = max(peaks[state], count)
        return peaks

    def sample_once(self) -> Snapshot:
        self._snapshot = self.sample()
        return self._snapshot

    def start(self) -> None:
        """Take the first sample (so the server never answers without one), then loop."""
        if self._snapshot is None:
            self.sample_once()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            took = self._snapshot.duration if self._snapshot else 0.0
            if self._stop.wait(max(0.0, self._effective_interval - took)):
                return
            try:
                self.sample_once()
            except Exception:  # sources are isolated already; this is a bug, keep sampling
                log.exception("sampling failed; keeping the previous snapshot (it will go stale)")

    def _stretch(self, took: float) -> None:
        # Sampling may use at most a fifth of the interval: on a huge host the loop slows
        # down and says so (netstat_exporter_sample_effective_interval_seconds) rather than
        # eat a core.
        wanted = max(self.interval, 5.0 * took)
        if wanted > self.interval and self._effective_interval == self.interval:
            log.warning("a sample took %.3fs, more than a fifth of --sample.interval=%gs; "
                        "sampling every %.1fs instead", took, self.interval, wanted)
        elif wanted == self.interval and self._effective_interval > self.interval:
            log.info("samples are fast again; back to every %gs", self.interval)
        self._effective_interval = wanted
