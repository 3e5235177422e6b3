"""Every /proc parser fed arbitrary bytes (not only ASCII) through the same file helpers the
exporter uses: the result is data, or an error that names the file; never another exception,
and never a value that cannot be rendered."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client import generate_latest

from exporter.sampler import Sampler, SocketReader
from exporter.sources import (conntrack, ctnetlink, interfaces, multicast, proc_sockets, routes,
                              snmp, sockstat)
from exporter.views import build_registry

PROC = Path(__file__).parent / "fixtures" / "kernels" / "linux-6.18" / "proc"

# (file under procfs, the source read that opens it)
READERS = [
    ("net/snmp", lambda root: snmp.read(root, [])),
    ("net/netstat", lambda root: snmp.read(root, [])),
    ("net/snmp6", lambda root: snmp.read(root, [])),
    ("net/sockstat", lambda root: sockstat.read(root, [])),
    ("net/sockstat6", lambda root: sockstat.read(root, [])),
    ("net/dev", lambda root: interfaces.read(root, [])),
    ("net/route", lambda root: routes.read(root, [])),
    ("net/ipv6_route", lambda root: routes.read(root, [])),
    ("net/igmp", lambda root: multicast.read(root, [])),
    ("net/igmp6", lambda root: multicast.read(root, [])),
    ("net/tcp", lambda root: list(proc_sockets.read(socket.IPPROTO_TCP, root, []))),
    ("net/tcp6", lambda root: list(proc_sockets.read(socket.IPPROTO_TCP, root, []))),
    ("net/udp", lambda root: list(proc_sockets.read(socket.IPPROTO_UDP, root, []))),
    ("net/nf_conntrack", lambda root: ctnetlink.read_proc(root)),
    ("net/stat/nf_conntrack", lambda root: ctnetlink.read_stats(root)),
    ("sys/net/netfilter/nf_conntrack_count", lambda root: conntrack.read(root, [])),
    ("sys/net/ipv4/tcp_mem", lambda root: sockstat.read(root, [])),
]


def _bytes():
    """Arbitrary bytes, and arbitrary bytes spliced into a real file's lines (which reach
    deeper into a parser than noise from the first byte on)."""
    return st.one_of(st.binary(max_size=600),
                     st.tuples(st.integers(0, 2000), st.binary(min_size=1, max_size=40)))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("proc")
    shutil.copytree(PROC, path, dirs_exist_ok=True)
    for name in ("net/tcp", "net/tcp6", "net/udp", "net/udp6", "net/nf_conntrack",
                 "net/stat/nf_conntrack"):
        source = Path(__file__).parent / "fixtures" / "proc" / name
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.exists():
            shutil.copy(source, target)
        elif not target.exists():
            target.write_text("")
    return path


@pytest.mark.parametrize("name, read", READERS, ids=[name for name, _ in READERS])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_bytes())
def test_arbitrary_bytes_give_data_or_an_error_naming_the_file(root, name, read, data):
    path = root / name
    original = path.read_bytes()
    if isinstance(data, tuple):
        at, noise = data
        at = min(at, len(original))
        data = original[:at] + noise + original[at:]
    path.write_bytes(data)
    try:
        read(str(root))
    except (ValueError, OSError) as exc:
        assert str(path) in str(exc), (type(exc), str(exc)[:300])
    finally:
        path.write_bytes(original)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([name for name, _ in READERS]), _bytes())
def test_whatever_the_files_hold_metrics_render(root, name, data):
    """No value that cannot be rendered reaches the registry: a 400-digit number, a
    surrogate in a device name and the like fail their collector or render as text."""
    path = root / name
    original = path.read_bytes()
    if isinstance(data, tuple):
        at, noise = data
        data = original[:min(at, len(original))] + noise + original[min(at, len(original)):]
    path.write_bytes(data)
    try:
        snapshot = Sampler(SocketReader("proc", procfs=str(root)), budget=30).sample_once()
        text = generate_latest(build_registry(lambda: snapshot, "t"))
        text.decode("utf-8")
        for result in snapshot.results.values():
            assert result.ok or os.path.basename(str(path)) in result.error \
                or str(root) in result.error, result.error
    finally:
        path.write_bytes(original)
