"""Per owning program (netstat -p): sockets per (state, program), bounded like every
outside-fed label, with the sockets no process holds or we cannot attribute kept apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np

from ..sources.table import NETSTAT_STATES, SocketTable
from .ranking import OTHER, top_with_remainder
from .states import STATE_SLOTS

NO_PROGRAM = "none"  # no process holds the socket: TIME_WAIT, SYN_RECV requests, orphans
UNKNOWN_PROGRAM = "unknown"  # a process holds it, but we could not see which


@dataclass(frozen=True)
class ProgramSummary:
    # (state, program label) -> sockets. Per state: the top programs, OTHER, NO_PROGRAM and
    # UNKNOWN_PROGRAM, summing exactly to that state's count.
    connections: Mapping[tuple[str, str], int]
    members: frozenset  # programs shown (input to the next sample's hysteresis)
    processes: int
    skipped: int


# A program named like a bucket gets this suffix. comm is at most 15 bytes (TASK_COMM_LEN),
# and "other (a program)" is 17: no real program name can ever equal a renamed one, so every
# label names one thing and the sums per state stay exact whatever programs are called.
RENAMED = " (a program)"


def _program_label(name: str) -> str:
    """"other" -> "other (a program)"; "other (program)" (a legal 15-byte comm) -> itself."""
    return name + RENAMED if name in (OTHER, NO_PROGRAM, UNKNOWN_PROGRAM) else name


class ProgramAccumulator:
    """Counts sockets per (state, owning program) with the owners map of processes.read()."""

    def __init__(self, owners, top: int = 20):
        self.owners = owners
        self.top = top
        # program slots, then NO_PROGRAM, then UNKNOWN_PROGRAM
        self._slots = len(owners.programs) + 2
        self._counts = np.zeros((STATE_SLOTS, self._slots), dtype=np.int64)

    def add(self, table: SocketTable) -> None:
        inodes = table.inode.astype(np.uint64)
        slot = np.full(len(inodes), self._slots - 1, dtype=np.intp)  # unknown unless found
        known = self.owners.inodes
        if len(known):
            where = np.minimum(np.searchsorted(known, inodes), len(known) - 1)
            found = known[where] == inodes
            slot[found] = self.owners.program[where[found]]
        slot[inodes == 0] = self._slots - 2
        state = table.state.astype(np.intp)
        self._counts += np.bincount(state * self._slots + slot, minlength=STATE_SLOTS * self._slots
                                    ).reshape(STATE_SLOTS, self._slots)

    def result(self, previous: "ProgramSummary | None" = None) -> ProgramSummary:
        per_program = {name: {label: int(self._counts[state, i])
                              for state, label in NETSTAT_STATES.items()}
                       for i, name in enumerate(self.owners.programs)}
        shown, other = top_with_remainder(per_program, self.top,
                                          previous.members if previous else frozenset())
        connections = {}
        for state, label in NETSTAT_STATES.items():
            for name in shown:
                connections[(label, _program_label(name))] = per_program[name][label]
            connections[(label, NO_PROGRAM)] = int(self._counts[state, -2])
            connections[(label, UNKNOWN_PROGRAM)] = int(self._counts[state, -1])
            connections[(label, OTHER)] = other[label]
        return ProgramSummary(connections=MappingProxyType(connections), members=frozenset(shown),
                              processes=self.owners.processes, skipped=self.owners.skipped)
