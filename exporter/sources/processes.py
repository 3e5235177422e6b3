"""Which program owns each socket (`netstat -p`): socket inode -> (pid, program name), from
/proc/PID/fd links ("socket:[4242]") and /proc/PID/comm.

Seeing other users' descriptors needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (or root);
processes we may not look into, and those that exit while we look, are skipped and counted,
and their sockets are reported as owned by an unknown program.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import numpy as np

from . import files

# Expected while walking a live /proc: the process exited (ENOENT, ESRCH) or is not ours
# to look at (EACCES, EPERM). Anything else is a real error.
_SKIP = {errno.ENOENT, errno.ESRCH, errno.EACCES, errno.EPERM}


@dataclass(frozen=True, eq=False)
class SocketOwners:
    inodes: np.ndarray  # uint64, sorted, unique
    program: np.ndarray  # int index into programs, parallel to inodes
    programs: tuple[str, ...]
    processes: int  # processes whose descriptors were read
    skipped: int  # processes that vanished or were not readable


def parse_socket_link(target: str) -> int | None:
    """"socket:[4242]" -> 4242; any other link (a file, a pipe) -> None."""
    if target.startswith("socket:[") and target.endswith("]"):
        return int(target[8:-1])
    return None


def read(procfs: str = "/proc") -> SocketOwners:
    """Walk every process once. A socket shared by several processes (inherited across
    fork) goes to the lowest pid."""
    owners: dict[int, int] = {}
    programs: dict[str, int] = {}
    processes = skipped = 0
    pids = sorted(int(e.name) for e in os.scandir(procfs) if e.name.isdigit())
    for pid in pids:
        base = os.path.join(procfs, str(pid))
        try:
            name = files.read_text(os.path.join(base, "comm"), 64)
            name = (name[:-1] if name.endswith("\n") else name) or "?"  # the one it adds
            links = []
            with os.scandir(os.path.join(base, "fd")) as fds:
                for fd in fds:
                    try:
                        links.append(os.readlink(fd.path))
                    except OSError as exc:  # the descriptor closed meanwhile
                        if exc.errno not in _SKIP:
                            raise
        except OSError as exc:
            if exc.errno not in _SKIP:
                raise
            skipped += 1
            continue
        processes += 1
        index = programs.setdefault(name, len(programs))
        for link in links:
            inode = parse_socket_link(link)
            if inode is not None:
                owners.setdefault(inode, index)
    inodes = np.fromiter(owners.keys(), dtype=np.uint64, count=len(owners))
    program = np.fromiter(owners.values(), dtype=np.intp, count=len(owners))
    order = np.argsort(inodes)
    return SocketOwners(inodes=inodes[order], program=program[order],
                        programs=tuple(programs), processes=processes, skipped=skipped)
