"""--series.limit: one budget over the label sets the outside world feeds (remote addresses,
local ports, listeners), counted here alone so that the budget matches what is exported.
"""
from __future__ import annotations

from .states import PORT_STATES, REMOTE_STATES

# What the budget cuts, by kind; collectors/exporter.py names the metric of each kind.
SERIES_LIMITED = ("remote", "local_port", "listen_queue_length", "listen_backlog")
# The fewest series --series.limit can leave: OTHER and EXCLUDED per remote state and OTHER
# per port state are never cut (they keep the sums exact).
MIN_SERIES_LIMIT = 2 * len(REMOTE_STATES) + len(PORT_STATES)


def listener_series(backlog_known: bool) -> tuple[str, ...]:
    """The series one listener makes: its queue length always, its backlog only when the
    source reports one (sock_diag does; /proc/net/tcp does not, and no backlog is exported)."""
    if backlog_known:
        return ("listen_queue_length", "listen_backlog")
    return ("listen_queue_length",)


def apply_series_limit(chosen: dict[str, list], shown_ports: list[int], listeners: int,
                       limit: int, *, backlog_known: bool) -> dict[str, int]:
    """Trim labelled series until they fit in `limit`; return the series cut per metric.

    Cut first: remote entries, smallest count first (one series each; their connections
    fold into OTHER, so sums stay exact); then ports, smallest first (one series per state,
    folded into OTHER); then listeners, emptiest first (listener_series each; still counted
    in the listener total). OTHER/EXCLUDED series are never cut.
    Mutates `chosen` and `shown_ports`.
    """
    per_port = len(PORT_STATES)
    per_listener = listener_series(backlog_known)
    used = (MIN_SERIES_LIMIT + sum(len(v) for v in chosen.values())
            + per_port * len(shown_ports) + len(per_listener) * listeners)
    truncated = dict.fromkeys(SERIES_LIMITED, 0)
    entries = sorted(((count, name, key) for name, items in chosen.items() for key, count in items),
                     key=lambda e: (e[0], e[2]))
    for count, name, key in entries:
        if used <= limit:
            break
        chosen[name].remove((key, count))
        used -= 1
        truncated["remote"] += 1
    while used > limit and shown_ports:
        shown_ports.pop()
        used -= per_port
        truncated["local_port"] += per_port
    while used > limit and listeners:
        listeners -= 1
        used -= len(per_listener)
        for metric in per_listener:
            truncated[metric] += 1
    return truncated
