from __future__ import annotations

import platform

from .base import SnapshotCollector, counter, gauge


class ExporterCollector(SnapshotCollector):
    """The exporter's own health: build, per-collector success and cost, sample freshness."""

    def __init__(self, get_snapshot, version: str):
        super().__init__(get_snapshot)
        self.version = version

    def families(self):
        return (
            gauge("exporter_build_info", "Always 1; labels name the exporter and Python "
                  "versions.", ("version", "python_version")),
            gauge("exporter_collector_success", "1 when the collector's last sample "
                  "succeeded, 0 when it failed (its metrics are then absent).", ("collector",)),
            gauge("exporter_collector_duration_seconds", "Time the collector's last sample "
                  "took.", ("collector",)),
            gauge("exporter_sample_timestamp_seconds", "Unix time the snapshot this scrape "
                  "was rendered from was taken; its age is time() minus this (the body is "
                  "rendered once per sample and shared by every scraper)."),
            gauge("exporter_sample_duration_seconds", "Time the last whole sample took."),
            gauge("exporter_sample_effective_interval_seconds", "Interval the sampling loop "
                  "keeps now: --sample.interval, stretched when a sample takes more than a "
                  "fifth of it."),
            gauge("exporter_sockets_scanned", "Sockets decoded in the last sample.",
                  ("protocol",)),
            gauge("exporter_socket_source", "1 for the kernel interface the socket tables "
                  "are read from (netlink or proc).", ("protocol", "source")),
            counter("exporter_series_truncated", "Label sets cut by --series.limit, summed "
                    "over samples; their counts went to the metric's \"other\" series.",
                    ("metric",)),
        )

    def collect(self):
        (build, success, duration, timestamp, sample_duration, interval, scanned,
         source, truncated) = self.families()
        build.add((self.version, platform.python_version()), 1)
        snapshot = self.get_snapshot()
        if snapshot is not None:
            for name, result in snapshot.results.items():
                success.add((name,), 1 if result.ok else 0)
                duration.add((name,), result.duration)
                count = getattr(result.data, "scanned", None)
                if count is not None:
                    scanned.add((name,), count)
            timestamp.add((), snapshot.taken_at)
            sample_duration.add((), snapshot.duration)
            interval.add((), snapshot.effective_interval)
            for protocol, name in snapshot.socket_sources.items():
                source.add((protocol, name), 1)
            for metric, cut in snapshot.truncated_total.items():
                truncated.add((metric,), cut)
        for family in (build, success, duration, timestamp, sample_duration, interval, scanned,
                       source, truncated):
            yield family.metric
