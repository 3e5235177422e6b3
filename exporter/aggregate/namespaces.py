"""Per network namespace (containers, `ip netns`): the top namespaces by sockets, the rest
in OTHER, bounded like the other outside-fed labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from ..sources.table import NETSTAT_STATES
from .ranking import OTHER, top_with_remainder


@dataclass(frozen=True)
class NetnsSummary:
    # (namespace label, state) -> sockets; the top namespaces by sockets, the rest in OTHER
    connections: Mapping[tuple[str, str], int]
    members: frozenset
    namespaces: int  # namespaces read
    unreadable: int  # namespaces or processes we may not look into
    failed: int = 0  # namespaces whose read failed (the others are still counted)


# A namespace named like the bucket (`ip netns add other`) gets this label: a netns name
# holds no "/", so no real namespace is ever called this (found in review: the two merged).
RENAMED_NAMESPACE = "netns/other"


def summarize_namespaces(per_namespace: Mapping[str, Mapping[str, int]], top: int,
                         unreadable: int = 0,
                         previous: "NetnsSummary | None" = None,
                         failed: int = 0) -> NetnsSummary:
    """per_namespace: name -> state -> count (every state present)."""
    if OTHER in per_namespace:
        per_namespace = {(RENAMED_NAMESPACE if name == OTHER else name): counts
                         for name, counts in per_namespace.items()}
    shown, other = top_with_remainder(per_namespace, top,
                                      previous.members if previous else frozenset())
    connections = {}
    for state in NETSTAT_STATES.values():
        for name in shown:
            connections[(name, state)] = per_namespace[name][state]
        connections[(OTHER, state)] = other[state]
    return NetnsSummary(connections=MappingProxyType(connections), members=frozenset(shown),
                        namespaces=len(per_namespace), unreadable=unreadable, failed=failed)
