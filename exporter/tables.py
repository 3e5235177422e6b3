"""The tables `netstat-exporter snapshot` prints, one per view flag, each from one snapshot.

Every renderer takes (snapshot, args, previous): args are the parsed snapshot flags (--json,
--top, --state, and mask_key set by the CLI), previous the snapshot before it under --watch.
Text goes to a terminal, so names read from the kernel are printed with control characters
escaped.
"""
from __future__ import annotations

import json

from .aggregate import REMOTE_STATES
from .collectors.snmp import GAUGES
from .sources import routes as route_source
from .sources.table import STATE_BY_NAME


def printable(text: str) -> str:
    """Control characters and undecodable bytes (kept as surrogates by surrogateescape)
    escaped, so a program or device name cannot move the cursor or rewrite the terminal:
    "a\x1b[2J" -> "a\\x1b[2J", "v\udce9" -> "v\\xe9"."""
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char.isprintable():
            out.append(char)
        else:
            out.append(char.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def states(snapshot, args, previous=None) -> str:
    """The seed's recipe: `STATE count` per line; with --top/--state, remote addresses."""
    if args.top is not None or args.state:
        return remotes(snapshot, args)
    as_json = args.json
    tcp = snapshot.results["tcp"].data
    totals = tcp.state_totals()
    if as_json:
        udp = snapshot.results.get("udp")
        document = {
            "taken_at": snapshot.taken_at,
            "tcp": {"states": totals,
                    "by_family": _nest(tcp.connections),
                    "listeners": [vars(lst) for lst in tcp.listeners],
                    "listeners_total": tcp.listeners_total},
            "udp": _nest(udp.data.sockets) if udp is not None and udp.ok else None,
            "sources": dict(snapshot.socket_sources),
        }
        return json.dumps(document, sort_keys=True)
    # The seed's recipe prints the states present, one "STATE count" per line.
    present = sorted(((n, s) for s, n in totals.items() if n), key=lambda p: (-p[0], p[1]))
    return "\n".join(f"{state} {count}" for count, state in present)


def remotes(snapshot, args) -> str:
    """The seed's recipes 1-3: remote addresses by connection count, most first."""
    counts = snapshot.results["tcp"].data.remote.counts
    states = [STATE_BY_NAME[s] for s in args.state] if args.state else list(REMOTE_STATES)
    top = counts.top(states, args.top if args.top is not None else 1 << 62)
    rows = [(count, key.text(args.mask_key)) for key, count in top]
    if args.json:
        return json.dumps([{"count": c, "remote": r} for c, r in rows])
    # `uniq -c` prints the count right-aligned in seven columns
    return "\n".join(f"{count:7d} {remote}" for count, remote in rows)


def programs(snapshot, args, previous=None) -> str:
    """netstat -p, counted: "count program state", most first."""
    as_json = args.json
    counts = snapshot.results["tcp"].data.programs.connections
    rows = sorted(((n, program, state) for (state, program), n in counts.items() if n),
                  key=lambda r: (-r[0], r[1], r[2]))
    if as_json:
        return json.dumps([{"count": n, "program": p, "state": s} for n, p, s in rows])
    return "\n".join(f"{n:7d} {printable(program)} {state}" for n, program, state in rows)


def listeners(snapshot, args, previous=None) -> str:
    tcp, as_json = snapshot.results["tcp"].data, args.json
    if as_json:  # with how many there are: a list cut by --listen.limit must say so
        return json.dumps({"listeners": [vars(listener) for listener in tcp.listeners],
                           "total": tcp.listeners_total})
    lines = [f"{'Recv-Q':>6} {'Send-Q':>6} Local Address"]
    for lst in sorted(tcp.listeners, key=lambda l: (l.port, l.family, l.address)):
        backlog = "-" if lst.backlog is None else lst.backlog
        address = f"[{lst.address}]" if ":" in lst.address else lst.address
        lines.append(f"{lst.queue_length:>6} {backlog:>6} {address}:{lst.port}")
    if tcp.listeners_total > len(tcp.listeners):
        lines.append(f"# {tcp.listeners_total - len(tcp.listeners)} more (--listen.limit)")
    return "\n".join(lines)


def udp(snapshot, args, previous=None) -> str:
    as_json = args.json
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
    return "".join(letter for bit, letter in ((route_source.RTF_UP, "U"),
                                              (route_source.RTF_GATEWAY, "G"),
                                              (route_source.RTF_HOST, "H"),
                                              (route_source.RTF_REJECT, "!"))
                   if route.flags & bit)


def routes(snapshot, args, previous=None) -> str:
    table, as_json = snapshot.results["routes"].data, args.json
    rows = [(f"{r.destination}/{r.prefix}", r.gateway, _route_flags(r), r.metric, r.device)
            for r in table]
    if as_json:
        return json.dumps([dict(zip(("destination", "gateway", "flags", "metric", "iface"), row))
                           for row in rows])
    lines = [f"{'Destination':<32} {'Gateway':<26} {'Flags':<5} {'Metric':>10} Iface"]
    lines += [f"{d:<32} {g:<26} {f:<5} {m:>10} {printable(i)}" for d, g, f, m, i in rows]
    return "\n".join(lines)


def groups(snapshot, args, previous=None) -> str:
    table, as_json = snapshot.results["multicast"].data, args.json
    if as_json:
        return json.dumps([{"interface": m.device, "refcnt": m.users, "group": m.group}
                           for m in table])
    lines = [f"{'Interface':<15} {'RefCnt':>6} Group"]
    lines += [f"{printable(m.device):<15} {m.users:>6} {m.group}" for m in table]
    return "\n".join(lines)


def interfaces(snapshot, args, previous=None) -> str:
    data, as_json = snapshot.results["interfaces"].data, args.json
    table, links = data.counters, data.links
    if as_json:
        return json.dumps({device: {**counters, **({"mtu": links[device].mtu,
                                                     "flags": links[device].letters}
                                                    if device in links else {})}
                           for device, counters in table.items()})
    columns = (("RX-OK", "receive_packets"), ("RX-ERR", "receive_errors"),
               ("RX-DRP", "receive_drops"), ("RX-OVR", "receive_fifo_errors"),
               ("TX-OK", "transmit_packets"), ("TX-ERR", "transmit_errors"),
               ("TX-DRP", "transmit_drops"), ("TX-OVR", "transmit_fifo_errors"))
    lines = [f"{'Iface':<15} {'MTU':>6}" + "".join(f" {title:>10}" for title, _ in columns)
             + " Flg"]
    for device, counters in sorted(table.items()):
        link = links.get(device)
        lines.append(f"{printable(device):<15} {link.mtu if link else '-':>6}"
                     + "".join(f" {counters[key]:>10}" for _, key in columns)
                     + f" {link.letters if link else '-'}")
    return "\n".join(lines)


def statistics(snapshot, args, previous=None) -> str:
    """netstat -s: one block per group, one field per line; with a previous snapshot,
    counters also show their rate since then."""
    stats, as_json = snapshot.results["snmp"].data, args.json
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


def conntrack(snapshot, args, previous=None) -> str:
    """netstat -M: the conntrack table by protocol and state, and NAT'd entries by source."""
    data = snapshot.results["conntrack"].data
    if data is None:
        return "# nf_conntrack is not loaded"
    flows = data.flows
    if args.json:
        return json.dumps({"entries": data.table.entries, "limit": data.table.limit,
                           "source": data.flows_source, "stats": data.stats,
                           "flows": None if flows is None else {
                               "by_state": [{"protocol": p, "state": s, "entries": n}
                                            for (p, s), n in sorted(flows.flows.items())],
                               "nat": [{"protocol": p, "nat": k, "entries": n}
                                       for (p, k), n in sorted(flows.nat.items())],
                               "nat_sources": [{"source": s, "entries": n}
                                               for s, n in flows.nat_sources]}})
    lines = [f"conntrack entries {data.table.entries} of {data.table.limit}"]
    if flows is None:
        lines.append("# entries by state need CAP_NET_ADMIN (or root for /proc/net/nf_conntrack)")
        return "\n".join(lines)
    nat = {}
    for (protocol, kind), count in flows.nat.items():
        nat[kind] = nat.get(kind, 0) + count
    lines.append(f"IP masquerading entries: source NAT {nat.get('source', 0)}, destination "
                 f"NAT {nat.get('destination', 0)}")
    lines.append(f"{'prot':<8} {'state':<12} {'entries':>9}")
    for (protocol, state), count in sorted(flows.flows.items(), key=lambda kv: (-kv[1], kv[0])):
        if count:
            lines.append(f"{protocol:<8} {state or '-':<12} {count:>9}")
    if any(count for _source, count in flows.nat_sources):
        lines.append(f"{'entries':>9} NAT'd from source")
        lines += [f"{count:>9} {printable(source)}" for source, count in flows.nat_sources
                  if count]
    return "\n".join(lines)
