"""netfilter connection tracking table fill (`netstat -M` territory): entries in use and the
table's limit, from /proc/sys/net/netfilter/nf_conntrack_{count,max}.

Both are per network namespace. When nf_conntrack is not loaded the files do not exist:
that is expected, and read() returns None (no metrics rather than zeros).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from . import ctnetlink, files


class ConntrackParseError(ValueError):
    pass


@dataclass(frozen=True)
class Conntrack:
    entries: int
    limit: int


def parse_int(text: str, path: str) -> int:
    """"262144\\n" -> 262144"""
    try:
        return files.integer(text.strip(), path)
    except ValueError as exc:
        raise ConntrackParseError(str(exc)) from None


def read(procfs: str = "/proc", missing: list[str] | None = None) -> Conntrack | None:
    values = []
    for name in ("nf_conntrack_count", "nf_conntrack_max"):
        path = os.path.join(procfs, "sys", "net", "netfilter", name)
        try:
            values.append(parse_int(files.read_text(path), path))
        except FileNotFoundError:
            if missing is not None:
                missing.append(path)
            return None
    return Conntrack(entries=values[0], limit=values[1])


def read_stats(procfs: str = "/proc", missing: list[str] | None = None) -> dict[str, int] | None:
    """The kernel's per-CPU statistics summed (found, insert_failed, drop, early_drop, ...);
    None where /proc/net/stat/nf_conntrack does not exist (module not loaded)."""
    try:
        return ctnetlink.read_stats(procfs)
    except FileNotFoundError:
        if missing is not None:
            missing.append(os.path.join(procfs, "net", "stat", "nf_conntrack"))
        return None
