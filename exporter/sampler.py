"""The scrape loop: sample the kernel in a background thread, publish immutable snapshots.

Why sample in the background rather than at scrape time (Prometheus' guide prefers the
latter): a dump of 1M sockets takes about a second of CPU, and at scrape time that cost
would be paid once per scraper and show up as /metrics latency. Here it is paid once per
interval whoever scrapes, /metrics answers from memory, and the peak window catches bursts
between scrapes. The snapshot's age is exported so staleness is visible.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import queue
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import aggregate
from .sources.netns import libc
from .sources.sockets import SocketReader

log = logging.getLogger(__name__)
FAST_BUFFER_BYTES = 256 * 1024  # the fast lane's dump buffer
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> None:
    """Have the C allocator keep memory a sample frees for the next sample to reuse.

    A sample's numpy temporaries are megabytes per batch. By default glibc maps blocks over a
    threshold fresh from the kernel and returns freed memory at the heap's top, so the next
    sample touches new zeroed pages again: measured, about 1,000 page faults per read of
    100k sockets, 2-3% of the dump's own time. With these thresholds the heap keeps up to
    64 MiB freed for reuse; the resident size stays at its peak, which is what the memory
    budget counts anyway. Not glibc (musl has no such knobs): nothing to do.
    """
    try:
        mallopt = libc.mallopt
    except AttributeError:
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 64 << 20)


class _Worker:
    """One daemon thread running a view's reads in turn. Daemon: a read that never returns (a
    hung mount) must not keep the process from exiting, and ThreadPoolExecutor's threads are
    joined at exit (found in review: after SIGTERM the exporter waited on such a read for
    ever)."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """The thread ends once the read it is in (if any) returns."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # the sampler's to see  # noqa: BLE001
                    future.set_exception(exc)


class Blocked(TimeoutError):
    """A view's read did not return within its budget (the watchdog)."""


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
    blocked: frozenset = frozenset()  # views whose read has not returned within its budget
    fast_duration: float | None = None  # seconds the last fast-lane read took (None: off)


class Sampler:
    """Reads every enabled view once per interval, in registry order, and publishes the
    results as one immutable Snapshot. Views are given by the caller (the CLI passes the
    registry's); the sampler itself names none.

    Readers get the sampler as their context: .reader (the socket reader, procfs), the
    options below, .previous(name) (the last snapshot's data, for top-N hysteresis),
    .current (the results read so far in this sample) and .count_truncated(kind, cut)."""

    def __init__(self, reader: SocketReader, interval: float = 5.0, listen_limit: int = 100,
                 peak_window: float = 60.0, remote: aggregate.RemoteOptions | None = None,
                 programs: int | None = None, collectors: Iterable[str] | None = None,
                 namespaces: int | None = None, views: Sequence | None = None,
                 fast_interval: float = 0.0, budget: float | None = None,
                 device_include=None, device_exclude=None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        """collectors: the views to read (default: those on by default)."""
        if views is None:  # tests and benchmarks; the CLI passes the registry itself
            from .views import VIEWS as views
        keep_freed_memory()
        self.reader = reader
        self.interval = interval
        self.listen_limit = listen_limit
        self.remote = remote
        self.programs = programs if programs is not None else 20  # top-N programs
        self.namespaces = namespaces if namespaces is not None else 20  # top-N namespaces
        self.device_include, self.device_exclude = device_include, device_exclude  # regexes
        self.peak_window = peak_window
        # the fast lane: every fast_interval (0: off) the views' cheap reads feed the peaks
        self.fast_interval = fast_interval
        # its own (it runs beside a sample), and small: the states it asks for are few on a
        # healthy host, and a flood's many only make more batches
        self.fast_buffer = bytearray(FAST_BUFFER_BYTES)
        self._fast_duration: float | None = None
        self._fast_thread: threading.Thread | None = None
        self._lane_paused = threading.Event()  # set while a view with a lane is read
        # the watchdog: a read not back within `budget` seconds is reported failed, and the
        # view is skipped until that read returns; other views and shutdown never wait on it
        self.budget = budget if budget is not None else max(10.0, 2 * interval)
        self._workers: dict[str, _Worker] = {}
        self._stuck: dict[str, tuple[Future, str]] = {}  # view -> (read, when it began)
        self._history_lock = threading.Lock()
        self._clock = clock
        self._wall_clock = wall_clock
        names = {v.name for v in views}
        if collectors is None:
            wanted = {v.name for v in views if v.default}
        else:
            wanted = set(collectors)
            unknown = wanted - names
            if unknown:
                raise ValueError(f"unknown collectors: {', '.join(sorted(unknown))}")
        self.views = tuple(v for v in views if v.name in wanted)
        self.truncated_total: dict[str, int] = (
            dict.fromkeys(aggregate.SERIES_LIMITED, 0) if remote else {})
        self.current: dict[str, Any] = {}  # this sample's results so far, by view
        self._reading = threading.local()  # .cuts: what the read in this thread cut so far
        self._history: collections.deque[tuple[float, dict[str, int]]] = collections.deque()
        self._errors: dict[str, str] = {}  # view -> its current error, while failing
        self._said: set[str] = set()  # once() keys already logged
        self._effective_interval = interval
        self._snapshot: Snapshot | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def once(self, key: str, message: str) -> None:
        """Log a reader's message (a fallback, a missing privilege) the first time only."""
        if key not in self._said:
            self._said.add(key)
            log.warning("%s", message)

    def previous(self, name: str):
        """A view's data in the last snapshot (for top-N hysteresis), None if it failed."""
        last = self._snapshot.results.get(name) if self._snapshot else None
        return last.data if last is not None and last.ok else None

    @property
    def snapshot(self) -> Snapshot | None:
        """The latest published snapshot; readers take no lock (one reference swap)."""
        return self._snapshot

    def sample(self) -> Snapshot:
        started = self._clock()
        results = {}
        self.current = {}
        blocked = 0.0
        for view in self.views:
            name, t0 = view.name, self._clock()
            # the lane pauses while a view it reads from is read in full (that read feeds the
            # peaks itself), not for the whole sample: a burst while conntrack or the netns
            # walk is read would never reach the peak (found in review)
            if view.fast is not None:
                self._lane_paused.set()
            try:
                data = self._read(view)
            except Exception as exc:  # one failing source must never stop the others
                if isinstance(exc, Blocked):
                    blocked += self._clock() - t0
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
                self.current[name] = data
            finally:
                self._lane_paused.clear()
        finished = self._clock()
        # time spent waiting on reads that did not return is not the cost of sampling:
        # it must not slow every other view down (stretch the interval)
        self._stretch(finished - started - blocked)
        return Snapshot(taken_at=self._wall_clock(), monotonic=finished,
                        duration=finished - started,
                        effective_interval=self._effective_interval,
                        results=MappingProxyType(results),
                        peaks=MappingProxyType(self._update_peaks(finished, results)),
                        truncated_total=MappingProxyType(dict(self.truncated_total)),
                        socket_sources=MappingProxyType(dict(self.reader.sources)),
                        blocked=frozenset(self._stuck), fast_duration=self._fast_duration)

    def count_truncated(self, kind: str, cut: int) -> None:
        """Label sets a view's read cut (--series.limit): counted in truncated_total once the
        sampler keeps that read's result, so a read the watchdog gave up on counts nothing
        (it counted before; found in review)."""
        cuts = self._reading.cuts
        cuts[kind] = cuts.get(kind, 0) + cut

    def _read_in_worker(self, view):
        self._reading.cuts = cuts = {}
        try:
            return view.read(self), cuts
        finally:
            self._reading.cuts = None

    def _read(self, view):
        """view.read(self) in the view's own worker thread, waited for at most the budget."""
        stuck = self._stuck.get(view.name)
        if stuck is not None:
            future, since = stuck
            if not future.done():  # the same words each time: logged once, not per sample
                raise Blocked(f"blocked: the read started at {since} has not returned "
                              f"(a hung mount, a stuck netlink socket?)")
            del self._stuck[view.name]
            log.warning("collector %s returned after blocking; reading it again", view.name)
        worker = self._workers.get(view.name)
        if worker is None:
            worker = self._workers[view.name] = _Worker(f"read-{view.name}")
        future = worker.submit(self._read_in_worker, view)
        # wait(), not result(timeout): on Python 3.11 the futures' TimeoutError is the
        # built-in one, which a read raises itself when the kernel stops answering
        # (SO_RCVTIMEO): that read failed, it is not blocked (found in review)
        if wait((future,), timeout=self.budget).done:
            data, cuts = future.result()
            for kind, cut in cuts.items():
                self.truncated_total[kind] = self.truncated_total.get(kind, 0) + cut
            return data
        self._stuck[view.name] = (future, time.strftime(
            "%H:%M:%S", time.localtime(self._wall_clock() - self.budget)))
        # the blocked read keeps its buffer: the others get a fresh one
        self.reader.buffer = bytearray(len(self.reader.buffer))
        self._workers.pop(view.name).shutdown()
        raise Blocked(f"no answer within {self.budget:g}s; reported failed until it returns")

    def _update_peaks(self, now: float, results: Mapping[str, SourceResult]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for view in self.views:
            result = results.get(view.name)
            if view.peaks is not None and result is not None and result.ok:
                counts.update(view.peaks(result.data))
        return self._record_peaks(now, counts)

    def _record_peaks(self, now: float, counts: dict[str, int]) -> dict[str, int]:
        """Add one reading (a sample's, or the fast lane's for a few states) and return the
        largest count per key over the peak window."""
        with self._history_lock:
            if counts:
                self._history.append((now, counts))
            while self._history and self._history[0][0] < now - self.peak_window:
                self._history.popleft()
            peaks: dict[str, int] = {}
            for _when, seen in self._history:
                for key, count in seen.items():
                    peaks[key] = max(peaks.get(key, 0), count)
            return peaks

    def _fast_lane(self) -> None:
        lanes = [view for view in self.views if view.fast is not None]
        failing: set[str] = set()
        while not self._stop.wait(self.fast_interval):
            # a sample reading the lane's view reads every state exactly and feeds the peaks
            # itself; a lane dump beside it would walk the same table again and compete for
            # the same CPU
            if self._lane_paused.is_set():
                continue
            started = self._clock()
            counts: dict[str, int] = {}
            answered = False  # a lane that read something (None: no cheap read here)
            for view in lanes:
                try:
                    read = view.fast(self)
                except Exception as exc:  # the lane is a bonus: say so once, keep sampling
                    if view.name not in failing:
                        failing.add(view.name)
                        log.warning("fast lane of %s failed (peaks fall back to the samples "
                                    "alone): %s", view.name, exc)
                else:
                    failing.discard(view.name)
                    answered |= read is not None
                    counts.update(read or {})
            # no duration where no lane read anything: the metric would say a lane works
            # (found in review)
            self._fast_duration = self._clock() - started if answered else None
            self._record_peaks(self._clock(), counts)

    def sample_once(self) -> Snapshot:
        self._snapshot = self.sample()
        return self._snapshot

    def start(self) -> None:
        """Take the first sample (so the server never answers without one), then loop."""
        if self._snapshot is None:
            self.sample_once()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()
        if self.fast_interval > 0 and any(view.fast for view in self.views):
            self._fast_thread = threading.Thread(target=self._fast_lane, name="fast-lane",
                                                 daemon=True)
            self._fast_thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        for thread in (self._thread, self._fast_thread):
            if thread is not None:
                thread.join(timeout)

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
