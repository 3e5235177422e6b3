"""`netstat-exporter` serves metrics; `netstat-exporter snapshot` prints the same numbers."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request

from . import __version__, config, webconfig
from .aggregate import RemoteOptions
from .pages import Pages
from .sampler import Sampler
from .server import HttpServer, Limits
from .sources.sockets import SocketReader
from .sources.table import STATE_BY_NAME
from .views import DEFAULTS, VIEWS, build_registry

log = logging.getLogger("netstat_exporter")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, never a usage dump or traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


REMOTE_FLAGS = ("--remote.prefix-v4", "--remote.prefix-v6", "--remote.include",
                "--remote.exclude", "--remote.mask", "--remote.mask-key")


def _common_flags(parser: argparse.ArgumentParser, flags) -> None:
    for flag in flags:
        _field, _parse, help_text = config.OPTIONS[flag]
        if flag in config.SWITCHES:
            parser.add_argument(flag, dest=flag, action="store_const", const="true",
                                help=help_text)
        else:
            parser.add_argument(flag, dest=flag, metavar="VALUE", help=help_text)


def _view_switches(parser: argparse.ArgumentParser) -> None:
    """--collector.NAME / --no-collector.NAME for every registered view."""
    group = parser.add_argument_group("views (collectors)")
    for view in VIEWS:
        flag = config.toggle_flag(view.name)
        state = "on" if view.default else "off"
        group.add_argument(flag, dest=flag, action="store_const", const="true",
                           help=f"{view.help} (default {state}; needs {view.privileges})")
        group.add_argument(f"--no-{flag[2:]}", dest=flag, action="store_const", const="false",
                           help=argparse.SUPPRESS)


def _serve_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="netstat-exporter",
                     description="Serve TCP/UDP socket-table metrics for Prometheus. "
                                 "Run 'netstat-exporter snapshot --help' for the table view. "
                                 "Every view is switched with --collector.NAME and "
                                 "--no-collector.NAME.")
    parser.add_argument("--version", action="version", version=f"netstat-exporter {__version__}")
    _common_flags(parser, config.OPTIONS)
    _view_switches(parser)
    return parser


def _snapshot_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="netstat-exporter snapshot",
                     description="Print TCP connection counts per state, like "
                                 "netstat -ant | awk '/^tcp/ {++S[$NF]} END {for(a in S) print a, S[a]}'.")
    parser.add_argument("--watch", metavar="SECONDS", type=_watch_seconds,
                        help="print again every SECONDS (0.05 to 86400), like netstat -c; "
                             "with --json, one document per line")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    # one table at a time, as with netstat's own -s / -r / -g / -i
    tables = parser.add_mutually_exclusive_group()
    for table in TABLES:
        if table.flag:
            tables.add_argument(table.flag, table.long, dest=f"table{table.flag}",
                                action="store_true", help=table.help)
    parser.add_argument("--top", metavar="N", type=int,
                        help="print the N remote addresses with most connections instead, "
                             "like ... | sort | uniq -c | sort -nr | head -n N")
    parser.add_argument("--state", metavar="STATE", action="append",
                        choices=sorted(STATE_BY_NAME),
                        help="with --top (or alone: every address), count only connections "
                             "in this state; repeat for several (TIME_WAIT, SYN_RECV, ...)")
    _common_flags(parser, ("--collector.sockets.source", "--path.procfs", "--listen.limit",
                           "--log.level", *REMOTE_FLAGS))
    return parser


TABLES = tuple(table for view in VIEWS for table in view.tables)
TABLES_DEFAULT = next(table for table in TABLES if table.flag is None)


def _build_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> config.Config:
    flags = {k: v for k, v in vars(args).items() if k.startswith("--")}
    try:
        return config.build(flags, os.environ, DEFAULTS)
    except config.ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s level=%(levelname)s source=%(name)s msg=%(message)s")


def _remote_options(cfg: config.Config) -> RemoteOptions:
    mask_key = None
    if cfg.remote_mask:
        if not cfg.remote_mask_key:
            log.warning("--remote.mask without NETSTAT_EXPORTER_REMOTE_MASK_KEY: using a random "
                        "key, so masked addresses change when the exporter restarts")
        mask_key = cfg.remote_mask_key.encode() or os.urandom(16)
    return RemoteOptions(
        top=cfg.remote_top, prefix_v4=cfg.remote_prefix_v4, prefix_v6=cfg.remote_prefix_v6,
        include=cfg.remote_include, exclude=cfg.remote_exclude, mask_key=mask_key,
        local_port_top=cfg.local_port_top, series_limit=cfg.series_limit,
        min_connections=cfg.remote_min_connections)


def _sampler(cfg: config.Config, interval: float, views: frozenset[str]) -> Sampler:
    return Sampler(SocketReader(cfg.socket_source, cfg.procfs), interval=interval,
                   listen_limit=cfg.listen_limit, peak_window=cfg.peak_window,
                   fast_interval=cfg.fast_interval, device_include=cfg.device_include,
                   device_exclude=cfg.device_exclude,
                   remote=_remote_options(cfg), programs=cfg.processes_top,
                   namespaces=cfg.netns_top, collectors=views, views=VIEWS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["snapshot"]:
        return snapshot_main(argv[1:])
    if argv[:1] == ["healthcheck"]:
        return healthcheck_main(argv[1:])
    parser = _serve_parser()
    cfg = _build_config(parser.parse_args(argv), parser)
    _setup_logging(cfg.log_level)
    return serve_main(cfg)


def healthcheck_main(argv: list[str]) -> int:
    """Exit 0 while the exporter on --web.listen-address answers /healthz with 200: the image's
    HEALTHCHECK and Kubernetes exec probes. It reads the same flags and environment as the
    server, speaks TLS when the web config has it (without verifying the server: it is
    asking its own port) and needs no password (/healthz is open to liveness probes)."""
    parser = _Parser(prog="netstat-exporter healthcheck",
                     description="Exit 0 while the local exporter's /healthz answers 200.")
    _common_flags(parser, ("--web.listen-address", "--web.config.file"))
    cfg = _build_config(parser.parse_args(argv), parser)
    host, port = cfg.listen
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    tls = None
    if cfg.web_config_file:
        try:
            tls = webconfig.load(cfg.web_config_file).tls
        except webconfig.WebConfigError as exc:
            print(f"unhealthy: {exc}", file=sys.stderr)
            return 1
    context = None
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        if tls.verify_mode == ssl.CERT_REQUIRED:
            return _handshake_check(host, port, context)
    url = f"{'https' if tls else 'http'}://{f'[{host}]' if ':' in host else host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as reply:
            print(reply.read().decode(errors="replace").strip())
            return 0
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {exc.code} {exc.read().decode(errors='replace').strip()}",
              file=sys.stderr)
    except OSError as exc:
        print(f"unhealthy: {getattr(exc, 'reason', exc)}", file=sys.stderr)
    return 1


def _handshake_check(host: str, port: int, context: ssl.SSLContext) -> int:
    """Mutual TLS: without a client certificate no request gets through, but a completed
    TLS 1.3 handshake (the server checks the client's certificate only after it) shows the
    server is up. The sample's freshness cannot be checked this way, and the output says so."""
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        with socket.create_connection((host, port), timeout=4) as raw, \
                context.wrap_socket(raw):
            pass
    except OSError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print("alive (client certificate required: sample freshness not checked)")
    return 0


def serve_main(cfg: config.Config) -> int:
    web = None
    if cfg.web_config_file:
        try:
            web = webconfig.Watcher(cfg.web_config_file)
        except webconfig.WebConfigError as exc:
            print(f"netstat-exporter: error: --web.config.file: {exc}", file=sys.stderr)
            return 2
    stop, hangup, wake = threading.Event(), threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: (stop.set(), wake.set()))
    signal.signal(signal.SIGINT, lambda *_: (stop.set(), wake.set()))
    # SIGHUP (systemctl reload, or a stray one) must not kill the exporter: it re-reads the
    # web config; flags and the environment are read once, at start.
    signal.signal(signal.SIGHUP, lambda *_: (hangup.set(), wake.set()))
    sampler = _sampler(cfg, cfg.sample_interval, cfg.collectors)
    host, port = cfg.listen
    views = tuple(view for view in VIEWS if cfg.enabled(view.name))
    pages = Pages(lambda get_snapshot: build_registry(get_snapshot, __version__, cfg.snmp_fields,
                                                      views),
                  lambda: sampler.snapshot, cfg.telemetry_path, __version__)
    limits = Limits(max_connections=cfg.max_connections, max_requests=cfg.max_requests,
                    header_timeout=cfg.read_header_timeout, idle_timeout=cfg.idle_timeout)
    try:
        server = HttpServer(pages, host, port, limits, web)
    except OSError as exc:
        print(f"netstat-exporter: error: cannot listen on {cfg.listen_address}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    sampler.start()  # the first sample completes before the server answers
    server.start()
    bound = server.server_address
    log.info("netstat-exporter %s listening on %s port %d (%s), sampling every %gs",
             __version__, bound[0], bound[1], "TLS" if web and web.current.tls else "plain HTTP",
             cfg.sample_interval)
    while not stop.is_set():
        # with a timeout: the kernel may hand a signal to any of our threads, and Python runs
        # the handler only when the main thread wakes up
        wake.wait(0.5)
        wake.clear()
        if not hangup.is_set():
            continue
        hangup.clear()
        if web is not None:
            web.reload_soon()
        log.info("SIGHUP: %s; flags and environment variables need a restart",
                 "the web config is re-read at the next connection" if web is not None
                 else "no web config to re-read")
    log.info("shutting down")
    server.stop()
    sampler.stop(5)
    return 0


def _watch_seconds(text: str) -> float:
    """--watch's value, bounded like --sample.interval (inf made the watchdog's wait
    overflow, found in review); argparse turns the ValueError into a usage error."""
    try:
        return config._seconds(0.05)(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def snapshot_main(argv: list[str]) -> int:
    parser = _snapshot_parser()
    args = parser.parse_args(argv)
    if args.top is not None and args.top < 1:
        parser.error(f"--top: must be at least 1, got {args.top}")
    table = next((t for t in TABLES if t.flag and getattr(args, f"table{t.flag}")),
                 TABLES_DEFAULT)
    if table.flag and (args.top is not None or args.state):
        parser.error(f"{table.flag}: not allowed with --top or --state (those list remote "
                     f"addresses)")
    if args.state and "LISTEN" in args.state:
        parser.error("--state: LISTEN sockets have no remote address")
    cfg = _build_config(args, parser)
    _setup_logging(cfg.log_level)
    # read only what this table prints
    needed = set(table.needs) | (set(table.json_needs) if args.json else set())
    disabled = sorted(name for name in table.needs if name in cfg.disabled)
    if disabled:
        parser.error(f"the {disabled[0]} collector is disabled (--collector.disable)")
    # a table is not a set of series: --series.limit (or its environment variable, set for
    # the exporter in its container) must not cut rows from it; --listen.limit and --top
    # say how many (the budget cut listeners and the footer blamed --listen.limit; found in
    # review)
    cfg = dataclasses.replace(cfg, series_limit=config.MAX_SERIES_LIMIT, **dict(table.options))
    sampler = _sampler(cfg, args.watch or cfg.sample_interval, frozenset(needed))
    args.mask_key = sampler.remote.mask_key
    previous = None
    try:
        while True:
            snapshot = sampler.sample_once()
            for name in table.needs:
                result = snapshot.results[name]
                if not result.ok:
                    print(f"netstat-exporter: error: reading {name}: {result.error}",
                          file=sys.stderr)
                    return 1
            text = table.render(snapshot, args, previous)
            # one write with its table: Ctrl-C never leaves a heading alone; JSON gets none
            # (a "#" line made the stream invalid JSON; found in review)
            if args.watch and not args.json:
                taken = time.strftime('%Y-%m-%dT%H:%M:%S%z', time.localtime(snapshot.taken_at))
                text = f"# {taken}\n{text}"
            print(text, flush=True)
            previous = snapshot
            if not args.watch:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `snapshot | head`: the reader is done, so are we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
