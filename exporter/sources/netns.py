"""Network namespaces: find them, and enter one (setns) for a block of code.

setns(2) moves only the calling thread, and a socket stays in the namespace it was created
in, so a thread can open sockets in several namespaces one after another.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from . import files

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL(None, use_errno=True)  # setns here, capget/capset in sockdiag


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(path: str, inode: int | None = None) -> Iterator[None]:
    """Run the block inside the network namespace at `path` (e.g. /run/netns/NAME), then
    return this thread to the namespace it was in. With `inode`, only if `path` still leads
    to that namespace (ProcessLookupError if not): /proc/PID/ns/net of a holder that exited
    leads wherever a process that took its pid is (found in review: the host's sockets were
    counted under a container's label)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if inode is not None and os.fstat(target).st_ino != inode:
                raise ProcessLookupError(errno.ESRCH, "the namespace found there is gone", path)
            setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)


# Where tools bind-mount named namespaces: iproute2 (`ip netns add`, names chosen by people),
# and Docker (random names, new with every container start).
IPROUTE_DIR = "/run/netns"
DOCKER_DIR = "/var/run/docker/netns"
NAMED_DIRS = (IPROUTE_DIR, DOCKER_DIR)
_SKIP = {errno.ENOENT, errno.ESRCH, errno.EACCES, errno.EPERM}
# /proc/PID/cgroup of a container: Docker, containerd, CRI-O (cgroup v1 and v2), and the
# Kubernetes pod around it, e.g.
#   0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1f2e..._c3.slice/
#      cri-containerd-4b1c...e9.scope
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_CONTAINER = re.compile(r"(?:docker-|cri-containerd-|crio-|libpod-|/docker/|/)([0-9a-f]{64})\b")


@dataclass(frozen=True)
class Namespace:
    name: str  # a label that survives restarts: see label()
    path: str  # what to open for setns
    inode: int


def container_label(cgroup: str) -> str | None:
    """A namespace's stable name from its process's cgroup: the Kubernetes pod (its
    containers share one network namespace), else the container; None outside containers.

    "0::/system.slice/docker-4b1c<60 hex>.scope" -> "container:4b1c..." (12 hex digits)
    "...kubepods-besteffort-pod1f2e3d4c_aaaa_bbbb_cccc_000000000001.slice/..." ->
    "pod:1f2e3d4c-aaaa-bbbb-cccc-000000000001"
    """
    pod = _POD.search(cgroup)
    if pod:
        return "pod:" + pod.group(1).replace("_", "-")
    container = _CONTAINER.search(cgroup)
    if container:
        return "container:" + container.group(1)[:12]
    return None


def _holders(procfs: str) -> tuple[dict[int, int], int]:
    """Network namespace inode -> the lowest pid in it; and processes we could not see."""
    holders: dict[int, int] = {}
    skipped = 0
    for pid in sorted(int(e.name) for e in os.scandir(procfs) if e.name.isdigit()):
        try:
            inode = os.stat(os.path.join(procfs, str(pid), "ns", "net")).st_ino
        except OSError as exc:
            if exc.errno not in _SKIP:
                raise
            skipped += 1
            continue
        holders.setdefault(inode, pid)
    return holders, skipped


def _label(procfs: str, pid: int) -> str | None:
    """container_label of the pid, else "comm:<program>": never the pid, which changes with
    every restart (each new label is a new series)."""
    base = os.path.join(procfs, str(pid))
    try:
        label = container_label(files.read_text(os.path.join(base, "cgroup")))
        return label or "comm:" + files.read_text(os.path.join(base, "comm"), 64).strip()
    except OSError as exc:
        if exc.errno not in _SKIP:
            raise
        return None


def discover(procfs: str = "/proc", named_dirs=NAMED_DIRS) -> tuple[list[Namespace], int]:
    """Every network namespace but our own, with a label that survives restarts: the name
    given with `ip netns add`; else the pod or container of a process in it (Docker's own
    netns names are random per start); else the program holding it. Returns (namespaces,
    processes we could not look into)."""
    own = os.stat(os.path.join(procfs, "thread-self", "ns", "net")).st_ino
    holders, skipped = _holders(procfs)
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
            if inode in seen:
                continue
            seen.add(inode)
            label = name
            if directory != IPROUTE_DIR:  # a tool's random name: name it after its holder
                held = _label(procfs, holders[inode]) if inode in holders else None
                label = held or f"{os.path.basename(directory)}:{name}"
            found.append(Namespace(label, path, inode))
    for inode, pid in sorted(holders.items(), key=lambda item: item[1]):
        if inode in seen:
            continue
        label = _label(procfs, pid)
        if label is None:
            skipped += 1
            continue
        seen.add(inode)
        found.append(Namespace(label, os.path.join(procfs, str(pid), "ns", "net"), inode))
    return found, skipped


def walk(procfs: str, read: Callable[[], T]) -> tuple[list[tuple[str, T]], int, list[str]]:
    """read() inside every other network namespace: ([(label, result)], namespaces or
    processes we may not look into, errors of namespaces whose read failed). A namespace
    we may not enter or that vanishes meanwhile is counted; one whose read fails otherwise is
    reported apart; neither stops the others. Labels may repeat (two namespaces held by one
    program): the caller sums.

    The walk runs in a thread of its own: if returning from a namespace ever failed, only that
    thread would be left in it, never the sampler that reads the host's sockets."""
    found, unreadable = discover(procfs)
    results: list[tuple[str, T]] = []
    errors: list[str] = []
    failure: list[BaseException] = []

    def run():
        nonlocal unreadable
        try:
            for namespace in found:
                try:
                    with entered(namespace.path, namespace.inode):
                        results.append((namespace.name, read()))
                except (PermissionError, FileNotFoundError, ProcessLookupError):
                    unreadable += 1
                except OSError as exc:
                    errors.append(f"{namespace.name}: {exc}")
        except BaseException as exc:  # handed to the calling thread below
            failure.append(exc)

    worker = threading.Thread(target=run, name="netns-walk", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return results, unreadable, errors
