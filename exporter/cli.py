"""`netstat-exporter` serves metrics; `netstat-exporter snapshot` prints the same numbers."""
from __future__ import annotations

import argparse
import dataclasses
import json
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
from .collectors import build_registry
from .collectors.snmp import GAUGES
from .aggregate import REMOTE_STATES
from .sampler import COLLECTORS, Sampler, SocketReader
from .sources import routes
from .sources.table import STATE_BY_NAME
from .pages import Pages
from .server import HttpServer, Limits

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


def _serve_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="netstat-exporter",
                     description="Serve TCP/UDP socket-table metrics for Prometheus. "
                                 "Run 'netstat-exporter snapshot --help' for the table view.")
    parser.add_argument("--version", action="version", version=f"netstat-exporter {__version__}")
    _common_flags(parser, config.OPTIONS)
    return parser


def _snapshot_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="netstat-exporter snapshot",
                     description="Print TCP connection counts per state, like "
                                 "netstat -ant | awk '/^tcp/ {++S[$NF]} END {for(a in S) print a, S[a]}'.")
    parser.add_argument("--watch", metavar="SECONDS", type=float,
                        help="print again every SECONDS, like netstat -c")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    # one view at a time, as with netstat's own -s / -r / -g / -i
    views = parser.add_mutually_exclusive_group()
    views.add_argument("-s", "--statistics", action="store_true",
                        help="print the protocol statistics grouped like netstat -s (with "
                             "--watch, counters show their rate)")
    views.add_argument("-l", "--listening", action="store_true",
                        help="print listening TCP sockets with their accept queues, like "
                             "netstat -tln (Recv-Q: waiting connections, Send-Q: backlog)")
    views.add_argument("-u", "--udp", action="store_true",
                        help="print UDP socket counts and queued bytes per family")
    views.add_argument("-r", "--route", action="store_true",
                        help="print the routing tables, like netstat -rn")
    views.add_argument("-g", "--groups", action="store_true",
                        help="print multicast group memberships, like netstat -gn")
    views.add_argument("-i", "--interfaces", action="store_true",
                        help="print interface counters, like netstat -i")
    views.add_argument("-p", "--programs", action="store_true",
                        help="print TCP sockets per owning program and state, like netstat -p "
                             "(root, or CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH, sees every process)")
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


def _build_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> config.Config:
    flags = {k: v for k, v in vars(args).items() if k.startswith("--")}
    try:
        return config.build(flags, os.environ)
    except config.ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s level=%(levelname)s source=%(name)s msg=%(message)s")


def _sampler(cfg: config.Config, interval: float, only: tuple[str, ...] | None = None) -> Sampler:
    if cfg.remote_mask and not cfg.remote_mask_key:
        log.warning("--remote.mask without NETSTAT_EXPORTER_REMOTE_MASK_KEY: using a random "
                    "key, so masked addresses change when the exporter restarts")
    reader = SocketReader(cfg.socket_source, cfg.procfs)
    collectors = [name for name in (only or COLLECTORS) if name not in cfg.disabled]
    return Sampler(reader, interval=interval, listen_limit=cfg.listen_limit,
                   peak_window=cfg.peak_window, remote=cfg.remote_options(os.urandom(16)),
                   programs=cfg.processes_top if cfg.processes else None,
                   collectors=collectors + (["netns"] if cfg.netns and only is None else []),
                   namespaces=cfg.netns_top if cfg.netns and only is None else None)


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
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sampler = _sampler(cfg, cfg.sample_interval)
    host, port = cfg.listen
    pages = Pages(lambda get_snapshot: build_registry(get_snapshot, __version__, cfg.snmp_fields),
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
    stop.wait()
    log.info("shutting down")
    server.stop()
    sampler.stop(5)
    return 0


def snapshot_main(argv: list[str]) -> int:
    parser = _snapshot_parser()
    args = parser.parse_args(argv)
    if args.watch is not None and not args.watch > 0:
        parser.error(f"--watch: must be a positive number of seconds, got {args.watch}")
    if args.top is not None and args.top < 1:
        parser.error(f"--top: must be at least 1, got {args.top}")
    view = next((flag for flag, on in (("-s", args.statistics), ("-l", args.listening),
                                        ("-u", args.udp), ("-r", args.route), ("-g", args.groups),
                                        ("-i", args.interfaces), ("-p", args.programs)) if on), None)
    if view and (args.top is not None or args.state):
        parser.error(f"{view}: not allowed with --top or --state (those list remote addresses)")
    cfg = _build_config(args, parser)
    if args.programs:
        cfg = dataclasses.replace(cfg, processes=True, processes_top=1 << 30)
    if args.state and "LISTEN" in args.state:
        parser.error("--state: LISTEN sockets have no remote address")
    _setup_logging(cfg.log_level)
    needed = ("snmp" if args.statistics else "routes" if args.route else "multicast"
              if args.groups else "interfaces" if args.interfaces else "udp" if args.udp
              else "tcp")
    # read only what this view prints (and UDP for the JSON of the default view)
    only = (needed, "udp") if needed == "tcp" and args.json else (needed,)
    if needed in cfg.disabled:
        parser.error(f"the {needed} collector is disabled (--collector.disable)")
    sampler = _sampler(cfg, args.watch or cfg.sample_interval, only)
    previous = None
    try:
        while True:
            snapshot = sampler.sample_once()
            result = snapshot.results[needed]
            if not result.ok:
                print(f"netstat-exporter: error: reading {needed}: {result.error}", file=sys.stderr)
                return 1
            if args.watch:
                print(f"# {time.strftime('%Y-%m-%dT%H:%M:%S%z', time.localtime(snapshot.taken_at))}")
            if args.statistics:
                print(_render_statistics(snapshot, previous, args.json), flush=True)
                previous = snapshot
            elif args.listening:
                print(_render_listeners(snapshot.results["tcp"].data, args.json), flush=True)
            elif args.udp:
                print(_render_udp(snapshot, args.json), flush=True)
            elif args.route or args.groups or args.interfaces:
                print(TABLES[needed](result.data, args.json), flush=True)
            elif args.programs:
                print(_render_programs(snapshot, args.json), flush=True)
            elif args.top is not None or args.state:
                print(_render_remotes(snapshot, args, sampler.remote.mask_key), flush=True)
            else:
                print(_render(snapshot, args.json), flush=True)
            if not args.watch:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def _render(snapshot, as_json: bool) -> str:
    tcp = snapshot.results["tcp"].data
    totals = tcp.state_totals()
    if as_json:
        udp = snapshot.results.get("udp")
        document = {
            "taken_at": snapshot.taken_at,
            "tcp": {"states": totals,
                    "by_family": _nest(tcp.connections),
                    "listeners": [vars(lst) for lst in tcp.listeners]},
            "udp": _nest(udp.data.sockets) if udp is not None and udp.ok else None,
            "sources": dict(snapshot.socket_sources),
        }
        return json.dumps(document, sort_keys=True)
    # The seed's recipe prints the states present, one "STATE count" per line.
    present = sorted(((n, s) for s, n in totals.items() if n), key=lambda p: (-p[0], p[1]))
    return "\n".join(f"{state} {count}" for count, state in present)


def _render_remotes(snapshot, args, mask_key: bytes | None) -> str:
    """The seed's recipes 1-3: remote addresses by connection count, most first."""
    counts = snapshot.results["tcp"].data.remote.counts
    states = [STATE_BY_NAME[s] for s in args.state] if args.state else list(REMOTE_STATES)
    top = counts.top(states, args.top if args.top is not None else 1 << 62)
    rows = [(count, key.text(mask_key)) for key, count in top]
    if args.json:
        return json.dumps([{"count": c, "remote": r} for c, r in rows])
    # `uniq -c` prints the count right-aligned in seven columns
    return "\n".join(f"{count:7d} {remote}" for count, remote in rows)


def _render_programs(snapshot, as_json: bool) -> str:
    """netstat -p, counted: "count program state", most first."""
    counts = snapshot.results["tcp"].data.programs.connections
    rows = sorted(((n, program, state) for (state, program), n in counts.items() if n),
                  key=lambda r: (-r[0], r[1], r[2]))
    if as_json:
        return json.dumps([{"count": n, "program": p, "state": s} for n, p, s in rows])
    return "\n".join(f"{n:7d} {program} {state}" for n, program, state in rows)


def _render_listeners(tcp, as_json: bool) -> str:
    if as_json:
        return json.dumps([vars(listener) for listener in tcp.listeners])
    lines = [f"{'Recv-Q':>6} {'Send-Q':>6} Local Address"]
    for lst in sorted(tcp.listeners, key=lambda l: (l.port, l.family, l.address)):
        backlog = "-" if lst.backlog is None else lst.backlog
        address = f"[{lst.address}]" if ":" in lst.address else lst.address
        lines.append(f"{lst.queue_length:>6} {backlog:>6} {address}:{lst.port}")
    if tcp.listeners_total > len(tcp.listeners):
        lines.append(f"# {tcp.listeners_total - len(tcp.listeners)} more (--listen.limit)")
    return "\n".join(lines)


def _render_udp(snapshot, as_json: bool) -> str:
    udp = snapshot.results["udp"]
    if not udp.ok:
        return f"# udp: {udp.error}"
    if as_json:
        return json.dumps({"sockets": _nest(udp.data.sockets), "queue_bytes": _nest(udp.data.queue_bytes)})
    lines = []
    for (family, state), count in udp.data.sockets.items():
        lines.append(f"{family} {state} {count}")
    for (family, queue), size in udp.data.queue_bytes.items():
        lines.append(f"{family} {queue}_queue_bytes {size}")
    return "\n".join(lines)


def _route_flags(route) -> str:
    return "".join(letter for bit, letter in ((routes.RTF_UP, "U"), (routes.RTF_GATEWAY, "G"),
                                              (routes.RTF_HOST, "H"), (routes.RTF_REJECT, "!"))
                   if route.flags & bit)


def _render_routes(table, as_json: bool) -> str:
    rows = [(f"{r.destination}/{r.prefix}", r.gateway, _route_flags(r), r.metric, r.device)
            for r in table]
    if as_json:
        return json.dumps([dict(zip(("destination", "gateway", "flags", "metric", "iface"), row))
                           for row in rows])
    lines = [f"{'Destination':<32} {'Gateway':<26} {'Flags':<5} {'Metric':>10} Iface"]
    lines += [f"{d:<32} {g:<26} {f:<5} {m:>10} {i}" for d, g, f, m, i in rows]
    return "\n".join(lines)


def _render_groups(table, as_json: bool) -> str:
    if as_json:
        return json.dumps([{"interface": m.device, "refcnt": m.users, "group": m.group}
                           for m in table])
    lines = [f"{'Interface':<15} {'RefCnt':>6} Group"]
    lines += [f"{m.device:<15} {m.users:>6} {m.group}" for m in table]
    return "\n".join(lines)


def _render_interfaces(table, as_json: bool) -> str:
    if as_json:
        return json.dumps(table)
    columns = (("RX-OK", "receive_packets"), ("RX-ERR", "receive_errors"),
               ("RX-DRP", "receive_drops"), ("RX-OVR", "receive_fifo_errors"),
               ("TX-OK", "transmit_packets"), ("TX-ERR", "transmit_errors"),
               ("TX-DRP", "transmit_drops"), ("TX-OVR", "transmit_fifo_errors"))
    lines = [f"{'Iface':<15}" + "".join(f" {title:>10}" for title, _ in columns)]
    for device, counters in sorted(table.items()):
        lines.append(f"{device:<15}" + "".join(f" {counters[key]:>10}" for _, key in columns))
    return "\n".join(lines)


TABLES = {"routes": _render_routes, "multicast": _render_groups,
          "interfaces": _render_interfaces}


def _render_statistics(snapshot, previous, as_json: bool) -> str:
    """netstat -s: one block per group, one field per line; with a previous snapshot,
    counters also show their rate since then."""
    stats = snapshot.results["snmp"].data
    before = previous.results["snmp"].data if previous and previous.results["snmp"].ok else None
    elapsed = snapshot.monotonic - previous.monotonic if previous else 0.0
    if as_json:
        return json.dumps(stats)
    lines = []
    for group, fields in stats.items():
        lines.append(f"{group}:")
        for field, value in fields.items():
            line = f"    {field} {value}"
            old = (before or {}).get(group, {}).get(field)
            if old is not None and elapsed > 0 and (group, field) not in GAUGES:
                line += f" ({(value - old) / elapsed:+.1f}/s)"
            lines.append(line)
    return "\n".join(lines)


def _nest(pairs) -> dict:
    out: dict = {}
    for (outer, inner), value in pairs.items():
        out.setdefault(outer, {})[inner] = value
    return out
