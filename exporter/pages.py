"""What the HTTP server answers: /metrics (rendered at most once per sample and format, shared by
every scraper), the landing page and /healthz. No sockets here: server.py carries the bytes."""
from __future__ import annotations

import gzip
import html
import threading
import time
import urllib.parse
from typing import Callable, NamedTuple

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

# /healthz turns 503 when the snapshot is older than this many sampling intervals.
STALE_INTERVALS = 3
# Distinct renderings kept per sample: 2 formats x 2 encodings, and apart from them up to
# this many name[] selections.
CACHE_ENTRIES = 16
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class Reply(NamedTuple):
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "text/plain; charset=utf-8"


def accepts_gzip(accept_encoding: str) -> bool:
    """"gzip, deflate" -> True; "gzip;q=0" -> False; "identity" -> False."""
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() in ("gzip", "x-gzip"):
            q = params.strip().lower()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False


class MetricsCache:
    """Renders the registry from one snapshot per scrape and keeps the bytes until the next
    sample: with many scrapers, rendering costs once per sample, not once per request.

    make_registry(get_snapshot) builds the collectors over the snapshot pinned here, so every
    collector of one rendering reads the same sample."""

    def __init__(self, make_registry: Callable, get_snapshot: Callable):
        self._get_snapshot = get_snapshot
        self._pinned = None
        self._registry = make_registry(lambda: self._pinned)
        self._lock = threading.Lock()
        self._snapshot = None
        self._rendered: dict[tuple, tuple[str, bytes]] = {}
        self._selected: dict[tuple, tuple[str, bytes]] = {}

    def render(self, accept: str, compress: bool,
               names: frozenset[str] | None = None) -> tuple[str, bytes]:
        """(content type, body) of the latest snapshot in the format the Accept header asks
        for (text or OpenMetrics); blocking, call it off the event loop."""
        # Two formats only, whatever the header says: an odd version ("version=abc" makes
        # client_python raise) or endless variants must neither fail nor empty the cache.
        encoder, content_type = choose_encoder(
            OPENMETRICS if "application/openmetrics-text" in accept else "")
        with self._lock:
            snapshot = self._get_snapshot()
            if snapshot is not self._snapshot:
                self._snapshot, self._rendered, self._selected = snapshot, {}, {}
            # the plain renderings every scraper shares apart from name[] selections, so
            # many selections cannot push them out
            cache = self._rendered if names is None else self._selected
            key = (content_type, compress, names)
            if key not in cache:
                if len(cache) >= CACHE_ENTRIES:
                    cache.clear()
                cache[key] = content_type, self._encode(snapshot, encoder, compress, names)
            return cache[key]

    def _encode(self, snapshot, encoder, compress, names) -> bytes:
        registry = self._registry if names is None else _Only(self._registry, names)
        self._pinned = snapshot
        try:
            body = encoder(registry)
        finally:
            self._pinned = None
        return gzip.compress(body, 6) if compress else body


class _Only:
    """name[]=...: only the samples of those names. client_python's restricted_registry finds
    collectors by what they describe, and ours cannot describe the netstat -s fields or
    devices before reading the kernel, so it would answer nothing for them."""

    def __init__(self, registry, names: frozenset[str]):
        self.registry, self.names = registry, names

    def collect(self):
        for family in self.registry.collect():
            samples = [s for s in family.samples if s.name in self.names]
            if samples:
                kept = Metric(family.name, family.documentation, family.type, family.unit)
                kept.samples = samples
                yield kept


class Pages:
    def __init__(self, make_registry: Callable, get_snapshot: Callable,
                 telemetry_path: str = "/metrics", version: str = "",
                 clock: Callable[[], float] = time.monotonic):
        self.get_snapshot = get_snapshot
        self.telemetry_path = telemetry_path.encode()
        self.clock = clock
        self.cache = MetricsCache(make_registry, get_snapshot)
        self._landing = _landing_page(telemetry_path, version).encode()

    def route(self, path: bytes) -> str | None:
        """Exact paths only: "//metrics" and "/%6detrics" are not /metrics."""
        return {self.telemetry_path: "metrics", b"/": "landing",
                b"/healthz": "health"}.get(path)

    def landing(self) -> Reply:
        return Reply(200, self._landing, content_type="text/html; charset=utf-8")

    def health(self, detailed: bool = True) -> Reply:
        """200 while the sample is fresh. Without credentials (when basic auth is on) only the
        verdict is given, not which collectors fail: liveness probes need no password."""
        snapshot = self.get_snapshot()
        if snapshot is None:
            return Reply(503, b"no sample yet\n")
        age = self.clock() - snapshot.monotonic
        limit = STALE_INTERVALS * snapshot.effective_interval
        if age > limit:
            text = f"stale: last sample {age:.1f}s ago (limit {limit:.1f}s)"
            return Reply(503, (text if detailed else "stale").encode() + b"\n")
        blocked = sorted(getattr(snapshot, "blocked", ()))
        if blocked:  # a read that never returns: the exporter is not well, say so
            text = f"blocked: {', '.join(blocked)} not answering"
            return Reply(503, (text if detailed else "blocked").encode() + b"\n")
        failed = sorted(name for name, r in snapshot.results.items() if not r.ok)
        text = f"ok: last sample {age:.1f}s ago" + (f"; failing: {', '.join(failed)}"
                                                    if failed else "")
        return Reply(200, (text if detailed else "ok").encode() + b"\n")

    def metrics(self, query: bytes, accept: str, accept_encoding: str) -> Reply:
        """Blocking (it may render): run it in a worker thread."""
        params = urllib.parse.parse_qs(query.decode("latin-1"))
        names = frozenset(params["name[]"]) if "name[]" in params else None
        compress = accepts_gzip(accept_encoding)
        content_type, body = self.cache.render(accept, compress, names)
        headers = (("Content-Encoding", "gzip"),) if compress else ()
        return Reply(200, body, headers + (("Vary", "Accept, Accept-Encoding"),), content_type)


def _landing_page(telemetry_path: str, version: str) -> str:
    path = html.escape(telemetry_path)
    return (f"<!doctype html><html><head><title>netstat-exporter</title></head><body>"
            f"<h1>netstat-exporter</h1><p>Version {html.escape(version)}</p><ul>"
            f'<li><a href="{path}">{path}</a>: metrics</li>'
            f'<li><a href="/healthz">/healthz</a>: 200 while the sample is fresh</li>'
            f"</ul></body></html>\n")
