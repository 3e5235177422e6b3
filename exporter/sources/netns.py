"""Network namespaces: find them, and enter one (setns) for a block of code.

setns(2) moves only the calling thread, and a socket stays in the namespace it was created
in, so a thread can open sockets in several namespaces one after another.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from . import files

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(path: str) -> Iterator[None]:
    """Run the block inside the network namespace at `path` (e.g. /run/netns/NAME), then
    return this thread to the namespace it was in."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)


# Where tools bind-mount named namespaces: iproute2 (`ip netns add`), and Docker.
NAMED_DIRS = ("/run/netns", "/var/run/docker/netns")
_SKIP = {errno.ENOENT, errno.ESRCH, errno.EACCES, errno.EPERM}


@dataclass(frozen=True)
class Namespace:
    name: str  # the bind-mount's name, or "pid:<lowest pid>:<comm>" for an unnamed one
    path: str  # what to open for setns
    inode: int


def discover(procfs: str = "/proc", named_dirs=NAMED_DIRS) -> tuple[list[Namespace], int]:
    """Every network namespace but our own: named ones first, then those only processes
    hold. Returns (namespaces, processes we could not look into)."""
    own = os.stat(os.path.join(procfs, "thread-self", "ns", "net")).st_ino
    seen = {own}
    found: list[Namespace] = []
    for directory in named_dirs:
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            try:
                inode = os.stat(path).st_ino
            except OSError as exc:
                if exc.errno not in _SKIP:
                    raise
                continue
            if inode not in seen:
                seen.add(inode)
                found.append(Namespace(name, path, inode))
    skipped = 0
    for pid in sorted(int(e.name) for e in os.scandir(procfs) if e.name.isdigit()):
        path = os.path.join(procfs, str(pid), "ns", "net")
        try:
            inode = os.stat(path).st_ino
            if inode in seen:
                continue
            comm = files.read_text(os.path.join(procfs, str(pid), "comm"), 64).strip()
        except OSError as exc:
            if exc.errno not in _SKIP:
                raise
            skipped += 1
            continue
        seen.add(inode)
        found.append(Namespace(f"pid:{pid}:{comm}", path, inode))
    return found, skipped


def walk(procfs: str, read: Callable[[], T]) -> tuple[dict[str, T], int]:
    """read() inside every other network namespace: ({name: result}, namespaces or processes
    we may not look into). setns needs CAP_SYS_ADMIN; a namespace we may not enter, or that
    vanishes meanwhile, is counted, not fatal.

    The walk runs in a thread of its own: if returning from a namespace ever failed, only that
    thread would be left in it, never the sampler that reads the host's sockets."""
    found, unreadable = discover(procfs)
    results: dict[str, T] = {}
    failure: list[BaseException] = []

    def run():
        nonlocal unreadable
        try:
            for namespace in found:
                try:
                    with entered(namespace.path):
                        results[namespace.name] = read()
                except (PermissionError, FileNotFoundError, ProcessLookupError):
                    unreadable += 1
        except BaseException as exc:  # handed to the calling thread below
            failure.append(exc)

    worker = threading.Thread(target=run, name="netns-walk", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return results, unreadable
