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
        self.metric.add_metric([label_text(v) for v in values], value)
        return self


def label_text(value) -> str:
    """Label values are always valid UTF-8: a byte that was not (kept by surrogateescape when
    a device or program name was read) is shown as \\xNN, and so that no other name reads
    the same, a backslash as \\\\. "v\udce90" -> "v\\xe90", "v\\xe90" -> "v\\\\xe90" (with
    backslashes left alone, two programs made one label twice: two series with one label
    set; found in review)."""
    text = str(value)
    if text.isascii() and "\\" not in text:
        return text
    return text.replace("\\", "\\\\").encode("utf-8", "surrogateescape").decode(
        "utf-8", "backslashreplace")


def gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Family:
    return Family("gauge", name, documentation, labels)


def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Family:
    return Family("counter", name, documentation, labels)
