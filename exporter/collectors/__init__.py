"""prometheus_client collectors, one per view. Each translates its view's data from one
snapshot (collect(snapshot, data)); none touches the kernel, none fetches a snapshot itself."""
from __future__ import annotations

from .exporter import ExporterCollector


class ScrapeCollector:
    """The one collector registered with prometheus_client: it takes the snapshot once per
    scrape and hands it to every view's collector, so a scrape never mixes two samples.
    A view whose last read failed yields nothing (its success metric says 0)."""

    def __init__(self, get_snapshot, parts, version: str):
        self.get_snapshot = get_snapshot
        self.parts = tuple(parts)  # (view name, collector)
        self.exporter = ExporterCollector(version)

    def describe(self):
        return []  # the families depend on the kernel (netstat -s fields, devices)

    def collect(self):
        snapshot = self.get_snapshot()
        for name, part in self.parts:
            result = snapshot.results.get(name) if snapshot is not None else None
            if result is not None and result.ok:
                yield from part.collect(snapshot, result.data)
        yield from self.exporter.collect(snapshot)
