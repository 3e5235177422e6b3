from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "netstat_"


class Family:
    """A metric family whose label values are checked on the way in: client_python would
    silently drop or misalign a wrong number of label values."""

    def __init__(self, kind: str, name: str, documentation: str, labels: tuple[str, ...] = ()):
        cls = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}[kind]
        self.labels = tuple(labels)
        self.metric = cls(PREFIX + name, documentation, labels=list(self.labels))

    def add(self, values: tuple, value: float) -> "Family":
        if len(values) != len(self.labels):
            raise ValueError(f"{self.metric.name}: {len(values)} label values for {self.labels}")
        self.metric.add_metric([str(v) for v in values], value)
        return self


def gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Family:
    return Family("gauge", name, documentation, labels)


def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Family:
    return Family("counter", name, documentation, labels)


class SnapshotCollector:
    """A collector over the latest snapshot. Subclasses list their metric families in
    families() (fresh, empty ones each call) when the set is fixed, and fill them in collect()."""

    def __init__(self, get_snapshot):
        self.get_snapshot = get_snapshot

    def families(self) -> tuple[Family, ...]:
        return ()  # the set depends on the kernel (netstat -s fields, devices)

    def describe(self):
        return [f.metric for f in self.families()]


def result_of(get_snapshot, name: str):
    """The named source's data from the latest snapshot, or None when it failed."""
    snapshot = get_snapshot()
    if snapshot is None:
        return None, None
    result = snapshot.results.get(name)
    if result is None or not result.ok:
        return snapshot, None
    return snapshot, result.data
