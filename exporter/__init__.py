"""netstat-exporter: what netstat and ss show, as Prometheus metrics."""

__version__ = "0.1.0"
