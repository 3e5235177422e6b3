"""One frozen Config from command-line values and the environment, validated as a whole.

Every option has a flag (`--sample.interval`) and an environment variable
(`NETSTAT_EXPORTER_SAMPLE_INTERVAL`); the flag wins. All errors are collected and reported
together, so a user fixes a bad deployment in one round.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping

# config imports nothing from the engine: the view names come from the caller (build()'s
# `views`), and these two constants are checked against the engine's by a test.
SOURCE_MODES = ("auto", "netlink", "proc")
# Two series per remote state and one per port state must always fit (their "other" rows).
MIN_SERIES_LIMIT = 28
MAX_SERIES_LIMIT = 10_000_000

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
    web_config_file: str = ""
    max_requests: int = 40
    max_connections: int = 1000
    read_header_timeout: float = 10.0
    idle_timeout: float = 120.0
    sample_interval: float = 5.0
    peak_window: float = 60.0
    fast_interval: float = 1.0
    socket_source: str = "auto"
    procfs: str = "/proc"
    listen_limit: int = 100
    log_level: str = "info"
    remote_top: int = 20
    remote_min_connections: int = 2
    remote_prefix_v4: int = 32
    remote_prefix_v6: int = 128
    remote_include: tuple = ()
    remote_exclude: tuple = ()
    remote_mask: bool = False
    remote_mask_key: str = ""
    local_port_top: int = 50
    series_limit: int = 2000
    snmp_fields: re.Pattern | None = None
    device_include: re.Pattern | None = None
    device_exclude: re.Pattern | None = None
    netns_top: int = 20
    disabled: tuple = ()  # views switched off by --collector.disable
    processes_top: int = 20
    collectors: frozenset = frozenset()  # the views to read, after every switch

    def enabled(self, view: str) -> bool:
        return view in self.collectors

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


def _seconds(minimum: float, maximum: float = 86400.0) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.removesuffix("s"))
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not minimum <= value <= maximum:
            raise ValueError(f"must be a number of seconds from {minimum:g} to {maximum:g}, "
                             f"got {text!r}")
        return value
    return parse


def _count(minimum: int, maximum: int) -> Callable[[str], int]:
    """Every count has both bounds: a typo like 1e10 is an error at start, not a crash later."""
    def parse(text: str) -> int:
        # digits only: int() would also take "1_000" and " 7 "
        value = int(text) if re.fullmatch(r"-?[0-9]{1,12}", text) else None
        if value is None or not minimum <= value <= maximum:
            raise ValueError(f"must be an integer from {minimum} to {maximum}, got {text!r}")
        return value
    return parse


def _networks(text: str) -> tuple:
    """"10.0.0.0/8, ::1/128" -> (IPv4Network('10.0.0.0/8'), IPv6Network('::1/128'))."""
    networks = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise ValueError(f"{exc} (write networks as address/prefix, e.g. 10.0.0.0/8)") from None
    return tuple(networks)


def _names(text: str) -> tuple:
    """"a, b" -> ("a", "b"); the names are checked against the views in build()."""
    return tuple(filter(None, (part.strip() for part in text.split(","))))


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {text!r}")


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


def _file(text: str) -> str:
    if text and not os.path.isfile(text):
        raise ValueError(f"no such file: {text!r}")
    return text


def _directory(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text.rstrip("/") or "/"


def _regex(text: str) -> re.Pattern:
    try:
        return re.compile(text)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None


# flag -> (Config field, parser, help)
OPTIONS: dict[str, tuple[str, Callable[[str], object], str]] = {
    "--web.listen-address": ("listen_address", _listen,
                             "address to serve on, [host]:port (default :10101)"),
    "--web.telemetry-path": ("telemetry_path", _path_in_url,
                             "path of the metrics endpoint (default /metrics)"),
    "--web.config.file": ("web_config_file", _file,
                          "exporter-toolkit web config (TLS, mutual TLS, basic auth, headers); "
                          "see README 'Securing the endpoint'"),
    "--web.max-requests": ("max_requests", _count(1, 10000),
                           "scrapes served at once; more get 503 (default 40)"),
    "--web.max-connections": ("max_connections", _count(1, 1000000),
                              "open HTTP connections; beyond, the longest idle one is closed "
                              "(default 1000)"),
    "--web.read-header-timeout": ("read_header_timeout", _seconds(0.1, 3600),
                                  "seconds a client has for a whole request head (default 10)"),
    "--web.idle-timeout": ("idle_timeout", _seconds(1, 86400),
                           "seconds an idle keep-alive connection is kept (default 120)"),
    "--sample.interval": ("sample_interval", _seconds(0.05),
                          "seconds between samples of the kernel (default 5)"),
    "--sample.peak-window": ("peak_window", _seconds(0),
                             "seconds over which netstat_tcp_connections_peak is kept (default 60)"),
    "--sample.fast-interval": ("fast_interval", _seconds(0, 60),
                               "seconds between state-filtered dumps of the states the alerts "
                               "watch (SYN_RECV, CLOSE_WAIT, FIN_WAIT2, ...), feeding the "
                               "peaks; 0 turns the fast lane off (default 1)"),
    "--collector.sockets.source": ("socket_source", _choice(SOURCE_MODES),
                                   "auto (netlink, falling back to /proc), netlink or proc"),
    "--path.procfs": ("procfs", _directory, "procfs mount point (default /proc)"),
    "--listen.limit": ("listen_limit", _count(0, 100_000),
                       "most listeners exported with per-listener metrics (default 100)"),
    "--log.level": ("log_level", _choice(LOG_LEVELS), "debug, info, warning or error"),
    "--remote.top": ("remote_top", _count(0, 100_000),
                     "remote addresses per TCP state with their own series (default 20)"),
    "--remote.min-connections": ("remote_min_connections", _count(1, 1_000_000),
                                 "connections a remote needs in a state for a series of its "
                                 "own; below, it counts in remote=\"other\" (default 2: a "
                                 "random-source SYN flood makes no series per source)"),
    "--remote.prefix-v4": ("remote_prefix_v4", _count(0, 32),
                           "aggregate IPv4 remotes into networks of this prefix (default 32)"),
    "--remote.prefix-v6": ("remote_prefix_v6", _count(0, 128),
                           "aggregate IPv6 remotes into networks of this prefix (default 128; 64 is common)"),
    "--remote.include": ("remote_include", _networks,
                         "comma-separated CIDRs: only these remotes get their own series"),
    "--remote.exclude": ("remote_exclude", _networks,
                         "comma-separated CIDRs counted as remote=\"excluded\" (e.g. 127.0.0.0/8,::1/128)"),
    "--remote.mask": ("remote_mask", _boolean,
                      "replace remote addresses with a keyed hash (key: NETSTAT_EXPORTER_REMOTE_MASK_KEY)"),
    "--remote.mask-key": ("remote_mask_key", str,
                          "key for --remote.mask; prefer the environment variable (flags show in ps)"),
    "--local-port.top": ("local_port_top", _count(0, 65_536),
                         "listening ports with their own series (default 50)"),
    "--series.limit": ("series_limit", _count(MIN_SERIES_LIMIT, MAX_SERIES_LIMIT),
                       "hard cap on remote, local-port and listener series together (default 2000)"),
    "--collector.disable": ("disabled", _names,
                            "comma-separated views to switch off, like --no-collector.NAME "
                            "for each"),
    "--collector.netns.top": ("netns_top", _count(0, 100_000),
                              "namespaces with their own series (default 20)"),
    "--collector.processes.top": ("processes_top", _count(0, 100_000),
                                  "programs with their own series (default 20)"),
    "--collector.interfaces.device-include": ("device_include", _regex,
                                              "regex: only these devices are reported "
                                              "(default: all)"),
    "--collector.interfaces.device-exclude": ("device_exclude", _regex,
                                              "regex: these devices are left out (e.g. "
                                              "'veth.*|cali.*')"),
    "--collector.snmp.fields": ("snmp_fields", _regex,
                                "regex over Group_Field (e.g. 'Tcp_.*|TcpExt_Listen.*'): the "
                                "netstat -s fields to export (default: all)"),
}

# Flags that take no value on the command line.
SWITCHES = ("--remote.mask",)


def toggle_flag(view: str) -> str:
    """Every view is switched the same way: --collector.NAME / --no-collector.NAME, or
    NETSTAT_EXPORTER_COLLECTOR_NAME=true|false."""
    return f"--collector.{view}"


def env_name(flag: str) -> str:
    """"--sample.interval" -> "NETSTAT_EXPORTER_SAMPLE_INTERVAL"."""
    return ENV_PREFIX + flag.lstrip("-").replace(".", "_").replace("-", "_").upper()


def build(flags: Mapping[str, str | None], env: Mapping[str, str],
          views: Mapping[str, bool] = {}) -> Config:
    """flags: flag -> raw value or None (not given); views: view name -> on by default.
    Raises ConfigError with every problem."""
    values, errors = {}, []
    for flag, (field, parse, _help) in OPTIONS.items():
        raw, origin = _raw(flag, flags, env)
        if raw is None:
            continue
        try:
            values[field] = parse(raw)
        except ValueError as exc:
            errors.append(f"{origin}: {exc}")
    enabled = {name for name, default in views.items() if default}
    for name in views:
        raw, origin = _raw(toggle_flag(name), flags, env)
        if raw is None:
            continue
        try:
            (enabled.add if _boolean(raw) else enabled.discard)(name)
        except ValueError as exc:
            errors.append(f"{origin}: {exc}")
    for name in values.get("disabled", ()):
        if name not in views:
            errors.append(f"--collector.disable: unknown collector {name!r} (known: "
                          f"{', '.join(views)})")
        enabled.discard(name)
    if errors:
        raise ConfigError(errors)
    return dataclasses.replace(Config(), **values, collectors=frozenset(enabled))


def _raw(flag: str, flags: Mapping[str, str | None], env: Mapping[str, str]):
    """(raw value, where it came from): the flag wins over its environment variable."""
    if flags.get(flag) is not None:
        return flags[flag], flag
    if env_name(flag) in env:
        return env[env_name(flag)], env_name(flag)
    return None, flag
