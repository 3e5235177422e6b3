"""One frozen Config from command-line values and the environment, validated as a whole.

Every option has a flag (`--sample.interval`) and an environment variable
(`NETSTAT_EXPORTER_SAMPLE_INTERVAL`); the flag wins. All errors are collected and reported
together, so a user fixes a bad deployment in one round.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import math
from dataclasses import dataclass
from typing import Callable, Mapping

from .sampler import SOURCE_MODES

ENV_PREFIX = "NETSTAT_EXPORTER_"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Config:
    listen_address: str = ":10101"
    telemetry_path: str = "/metrics"
    sample_interval: float = 5.0
    peak_window: float = 60.0
    socket_source: str = "auto"
    procfs: str = "/proc"
    sysfs: str = "/sys"
    listen_limit: int = 100
    log_level: str = "info"

    @property
    def listen(self) -> tuple[str, int]:
        return parse_listen_address(self.listen_address)


def parse_listen_address(text: str) -> tuple[str, int]:
    """":10101" -> ("", 10101) (all addresses), "[::1]:9" -> ("::1", 9),
    "127.0.0.1:9" -> ("127.0.0.1", 9), "localhost:9" -> ("localhost", 9)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"expected [host]:port, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif ":" in host:
        raise ValueError(f"write IPv6 addresses in brackets: {text!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be 0-65535, got {port!r}")
    return host, int(port)


def _seconds(minimum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text.removesuffix("s"))
        if not math.isfinite(value) or value < minimum:
            raise ValueError(f"must be a number of seconds >= {minimum:g}, got {text!r}")
        return value
    return parse


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError(f"must be an integer >= {minimum}, got {text!r}")
        return value
    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        return text
    return parse


def _path_in_url(text: str) -> str:
    if not text.startswith("/") or text in ("/", "/healthz"):
        raise ValueError(f"must start with / and not be / or /healthz, got {text!r}")
    return text


def _listen(text: str) -> str:
    parse_listen_address(text)
    return text


def _directory(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text.rstrip("/") or "/"


# flag -> (Config field, parser, help)
OPTIONS: dict[str, tuple[str, Callable[[str], object], str]] = {
    "--web.listen-address": ("listen_address", _listen,
                             "address to serve on, [host]:port (default :10101)"),
    "--web.telemetry-path": ("telemetry_path", _path_in_url,
                             "path of the metrics endpoint (default /metrics)"),
    "--sample.interval": ("sample_interval", _seconds(0.05),
                          "seconds between samples of the kernel (default 5)"),
    "--sample.peak-window": ("peak_window", _seconds(0),
                             "seconds over which netstat_tcp_connections_peak is kept (default 60)"),
    "--collector.sockets.source": ("socket_source", _choice(SOURCE_MODES),
                                   "auto (netlink, falling back to /proc), netlink or proc"),
    "--path.procfs": ("procfs", _directory, "procfs mount point (default /proc)"),
    "--path.sysfs": ("sysfs", _directory, "sysfs mount point (default /sys)"),
    "--listen.limit": ("listen_limit", _count(0),
                       "most listeners exported with per-listener metrics (default 100)"),
    "--log.level": ("log_level", _choice(LOG_LEVELS), "debug, info, warning or error"),
}


def env_name(flag: str) -> str:
    """"--sample.interval" -> "NETSTAT_EXPORTER_SAMPLE_INTERVAL"."""
    return ENV_PREFIX + flag.lstrip("-").replace(".", "_").replace("-", "_").upper()


def build(flags: Mapping[str, str | None], env: Mapping[str, str]) -> Config:
    """flags: flag -> raw value or None (not given). Raises ConfigError with every problem."""
    values, errors = {}, []
    for flag, (field, parse, _help) in OPTIONS.items():
        raw, origin = flags.get(flag), flag
        if raw is None and env_name(flag) in env:
            raw, origin = env[env_name(flag)], env_name(flag)
        if raw is None:
            continue
        try:
            values[field] = parse(raw)
        except ValueError as exc:
            errors.append(f"{origin}: {exc}")
    if errors:
        raise ConfigError(errors)
    return dataclasses.replace(Config(), **values)
