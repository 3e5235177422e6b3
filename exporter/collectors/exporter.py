from __future__ import annotations

import platform

from .base import counter, gauge


# The kinds of series --series.limit cuts (aggregate.SERIES_LIMITED) and their metrics.
TRUNCATED_METRICS = {"remote": "netstat_tcp_remote_connections",
                     "local_port": "netstat_tcp_local_port_connections",
                     "listen_queue_length": "netstat_tcp_listen_queue_length",
                     "listen_backlog": "netstat_tcp_listen_backlog",
                     # a device cut loses every per-device family at once
                     "devices": "netstat_interface_*",
                     "nat_sources": "netstat_conntrack_nat_source_flows"}


class ExporterCollector:
    """The exporter's own health: build, per-collector success and cost, sample freshness."""

    def __init__(self, version: str):
        self.version = version

    def collect(self, snapshot):
        yield gauge("exporter_build_info", "Always 1; labels name the exporter and Python "
                    "versions.", ("version", "python_version")).add(
                        (self.version, platform.python_version()), 1).metric
        if snapshot is None:
            return
        success = gauge("exporter_collector_success", "1 when the collector's last sample "
                        "succeeded, 0 when it failed (its metrics are then absent).",
                        ("collector",))
        duration = gauge("exporter_collector_duration_seconds", "Time the collector's last "
                         "sample took.", ("collector",))
        scanned = gauge("exporter_sockets_scanned", "Sockets decoded in the last sample.",
                        ("protocol",))
        for name, result in snapshot.results.items():
            success.add((name,), 1 if result.ok else 0)
            duration.add((name,), result.duration)
            count = getattr(result.data, "scanned", None)
            if count is not None:
                scanned.add((name,), count)
        yield success.metric
        yield duration.metric
        yield scanned.metric
        yield gauge("exporter_sample_timestamp_seconds", "Unix time the snapshot this scrape "
                    "was rendered from was taken; its age is time() minus this (the body is "
                    "rendered once per sample and shared by every scraper).").add(
                        (), snapshot.taken_at).metric
        yield gauge("exporter_sample_duration_seconds", "Time the last whole sample "
                    "took.").add((), snapshot.duration).metric
        yield gauge("exporter_sample_effective_interval_seconds", "Interval the sampling "
                    "loop keeps now: --sample.interval, stretched when a sample takes more "
                    "than a fifth of it.").add((), snapshot.effective_interval).metric
        if snapshot.fast_duration is not None:
            yield gauge("exporter_fast_lane_duration_seconds", "Time the last fast-lane read "
                        "took (the state-filtered dump feeding the peaks, every "
                        "--sample.fast-interval).").add((), snapshot.fast_duration).metric
        source = gauge("exporter_socket_source", "1 for the kernel interface the socket "
                       "tables are read from (netlink or proc).", ("protocol", "source"))
        for protocol, name in snapshot.socket_sources.items():
            source.add((protocol, name), 1)
        yield source.metric
        truncated = counter("exporter_series_truncated", "Label sets cut by --series.limit, "
                            "summed over samples; their counts went to the metric's \"other\" "
                            "series.", ("metric",))
        for kind, cut in snapshot.truncated_total.items():
            truncated.add((TRUNCATED_METRICS[kind],), cut)
        yield truncated.metric
