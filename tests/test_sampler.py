"""The sampling loop: fallback when netlink is refused, failure isolation, stretching."""
from __future__ import annotations

import dataclasses
import errno
import platform
import logging
import socket
import threading
import time

import pytest

from exporter import aggregate
from exporter.views import build_registry
from exporter.sampler import Sampler, SocketReader
from exporter.views import BY_NAME
from tests.kernel import wait_for
from exporter.sources.table import SocketTable, TcpState, parse_address
from tests.test_proc_sockets import FIXTURES


def refused(*_args, **_kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")
    yield  # a generator, like sockdiag.dump


def test_auto_falls_back_to_proc_when_netlink_is_refused_and_logs_once(caplog):
    reader = SocketReader("auto", procfs=str(FIXTURES), dump=refused)
    sampler = Sampler(reader)
    with caplog.at_level(logging.WARNING):
        first = sampler.sample_once()
        second = sampler.sample_once()
    assert first.results["tcp"].ok and second.results["tcp"].ok
    assert first.socket_sources == {"tcp": "proc", "udp": "proc"}
    assert first.results["tcp"].data.state_totals()["SYN_RECV"] == 7
    warnings = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 2  # once per protocol, not once per sample
    assert "reading" in warnings[0] and "Permission denied" in warnings[0]


def test_netlink_mode_does_not_fall_back_and_reports_failure():
    sampler = Sampler(SocketReader("netlink", procfs=str(FIXTURES), dump=refused))
    snapshot = sampler.sample_once()
    assert not snapshot.results["tcp"].ok
    assert "Permission denied" in snapshot.results["tcp"].error
    registry = build_registry(lambda: sampler.snapshot, "test")
    assert registry.get_sample_value("netstat_exporter_collector_success", {"collector": "tcp"}) == 0
    assert registry.get_sample_value("netstat_tcp_connections",
                                     {"state": "LISTEN", "family": "ipv4"}) is None
    assert registry.get_sample_value("netstat_exporter_build_info",
                                     {"version": "test", "python_version": platform.python_version()}) == 1


def test_one_failing_source_leaves_the_other_working(tmp_path):
    # udp files are garbage, tcp files are good: tcp still reports, udp says why it failed
    net = tmp_path / "net"
    net.mkdir()
    for name in ("tcp", "tcp6"):
        (net / name).write_text((FIXTURES / "net" / name).read_text())
    (net / "udp").write_text("  sl  local_address\n   0: nonsense\n")
    sampler = Sampler(SocketReader("proc", procfs=str(tmp_path)))
    snapshot = sampler.sample_once()
    assert snapshot.results["tcp"].ok
    assert not snapshot.results["udp"].ok
    assert "udp:2" in snapshot.results["udp"].error
    registry = build_registry(lambda: snapshot, "test")
    assert registry.get_sample_value("netstat_exporter_collector_success", {"collector": "udp"}) == 0
    assert registry.get_sample_value("netstat_tcp_connections",
                                     {"state": "ESTABLISHED", "family": "ipv4"}) == 11


def test_missing_ipv6_files_are_not_a_failure(tmp_path):
    net = tmp_path / "net"
    net.mkdir()
    for name in ("tcp", "udp"):
        (net / name).write_text((FIXTURES / "net" / name).read_text())
    snapshot = Sampler(SocketReader("proc", procfs=str(tmp_path))).sample_once()
    assert snapshot.results["tcp"].ok and snapshot.results["udp"].ok
    assert snapshot.results["udp"].data.scanned == 2


def test_missing_proc_entirely_fails_honestly(tmp_path):
    snapshot = Sampler(SocketReader("proc", procfs=str(tmp_path / "nothing"))).sample_once()
    assert not snapshot.results["tcp"].ok and not snapshot.results["udp"].ok


def test_interrupted_dump_is_retried_from_scratch():
    from exporter.sources.sockdiag import DumpInterrupted
    calls = []
    one = SocketTable.from_columns({"family": [socket.AF_INET], "state": [TcpState.LISTEN],
                                    "local_addr": [parse_address("127.0.0.1")[1]],
                                    "local_port": [80], "remote_addr": [[0, 0, 0, 0]],
                                    "remote_port": [0], "recv_q": [0], "send_q": [5],
                                    "inode": [1], "uid": [0]})

    def flaky(protocol, family=socket.AF_UNSPEC, buffer=None):
        calls.append(family)
        yield one
        if len(calls) == 1:
            raise DumpInterrupted(errno.EINTR, "interrupted")

    summary = aggregate_tcp(SocketReader("netlink", dump=flaky))
    assert summary.state_totals()["LISTEN"] == 1  # not 2: the partial batch was dropped
    assert len(calls) == 2


def aggregate_tcp(reader):
    from exporter.views import read_tcp
    return read_tcp(reader, listen_limit=10)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_slow_samples_stretch_the_interval_and_recover(caplog):
    clock = FakeClock()
    cost = {"seconds": 0.0}
    def slow(_ctx):
        clock.now += cost["seconds"]
        return aggregate.TcpAccumulator().result()

    sampler = Sampler(SocketReader("proc", procfs=str(FIXTURES)), interval=5.0, clock=clock,
                      views=(dataclasses.replace(BY_NAME["tcp"], read=slow),))
    cost["seconds"] = 0.5  # a tenth of the interval: fine
    assert sampler.sample_once().effective_interval == 5.0
    cost["seconds"] = 2.0  # 40% of the interval: stretch to 5x the cost
    with caplog.at_level(logging.WARNING):
        assert sampler.sample_once().effective_interval == 10.0
    assert any("more than a fifth" in r.getMessage() for r in caplog.records)
    registry = build_registry(lambda: sampler.snapshot, "test")
    assert registry.get_sample_value("netstat_exporter_sample_effective_interval_seconds") == 10.0
    cost["seconds"] = 0.1
    assert sampler.sample_once().effective_interval == 5.0


def test_peak_window_keeps_the_largest_count_then_forgets_it():
    clock = FakeClock()
    sizes = iter([10, 3, 4])

    def tcp(_ctx):
        acc = aggregate.TcpAccumulator()
        n = next(sizes)
        acc.add(SocketTable.from_columns({
            "family": [socket.AF_INET] * n, "state": [TcpState.CLOSE_WAIT] * n,
            "local_addr": [[1, 0, 0, 0]] * n, "local_port": [1] * n,
            "remote_addr": [[2, 0, 0, 0]] * n, "remote_port": [2] * n,
            "recv_q": [0] * n, "send_q": [0] * n, "inode": [0] * n, "uid": [0] * n}))
        return acc.result()

    sampler = Sampler(SocketReader("proc", procfs=str(FIXTURES)), peak_window=60, clock=clock,
                      views=(dataclasses.replace(BY_NAME["tcp"], read=tcp),))
    assert sampler.sample_once().peaks["CLOSE_WAIT"] == 10
    clock.now += 30
    assert sampler.sample_once().peaks["CLOSE_WAIT"] == 10
    clock.now += 31  # the 10 is now older than the window
    assert sampler.sample_once().peaks["CLOSE_WAIT"] == 4


def test_loop_publishes_new_snapshots_and_stops():
    sampler = Sampler(SocketReader("proc", procfs=str(FIXTURES)), interval=0.05)
    sampler.start()
    first = sampler.snapshot
    assert first is not None  # the first sample is taken before start() returns
    seen = threading.Event()

    def newer():
        return sampler.snapshot is not first

    for _ in range(100):
        if newer():
            seen.set()
            break
        threading.Event().wait(0.02)
    sampler.stop(2)
    assert seen.is_set()
    assert not sampler._thread.is_alive()


def test_a_failing_source_is_logged_once_and_its_recovery_too(tmp_path, caplog):
    net = tmp_path / "net"
    net.mkdir()
    for name in ("tcp", "tcp6", "udp", "udp6"):
        (net / name).write_text((FIXTURES / "net" / name).read_text())
    sampler = Sampler(SocketReader("proc", procfs=str(tmp_path)))
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            assert not sampler.sample_once().results["snmp"].ok  # no snmp files here
        (net / "snmp").write_text("Tcp: ActiveOpens\nTcp: 1\n")
        (net / "netstat").write_text("")
        assert sampler.sample_once().results["snmp"].ok
    messages = [r.getMessage() for r in caplog.records if "snmp" in r.getMessage()]
    assert len([m for m in messages if "failed" in m]) == 1
    assert messages[-1] == "collector snmp works again"


def test_disabled_collectors_are_not_read_or_reported(tmp_path):
    sampler = Sampler(SocketReader("proc", procfs=str(FIXTURES)), collectors=["tcp", "udp"])
    snapshot = sampler.sample_once()
    assert set(snapshot.results) == {"tcp", "udp"}
    registry = build_registry(lambda: snapshot, "test")
    assert registry.get_sample_value("netstat_exporter_collector_success", {"collector": "snmp"}) is None
    with pytest.raises(ValueError, match="unknown collectors: nope"):
        Sampler(SocketReader("proc"), collectors=["tcp", "nope"])


def test_config_constants_are_the_engines():
    # config.py imports nothing from the engine; these copies must not drift
    from exporter import config
    from exporter.aggregate import MIN_SERIES_LIMIT
    from exporter.sources.sockets import SOURCE_MODES
    assert config.SOURCE_MODES == SOURCE_MODES and config.MIN_SERIES_LIMIT == MIN_SERIES_LIMIT


def out_of_descriptors(*_args, **_kwargs):
    raise OSError(errno.EMFILE, "Too many open files")
    yield


def test_running_out_of_descriptors_fails_the_sample_but_never_switches_to_proc(caplog):
    reader = SocketReader("auto", procfs=str(FIXTURES), dump=out_of_descriptors)
    with caplog.at_level(logging.WARNING):
        snapshot = Sampler(reader).sample_once()
    assert not snapshot.results["tcp"].ok
    assert "Too many open files" in snapshot.results["tcp"].error
    assert snapshot.socket_sources == {"tcp": "netlink", "udp": "netlink"}
    assert not [r for r in caplog.records if "instead" in r.getMessage()]


def test_after_a_fallback_netlink_is_tried_again_and_both_switches_are_logged(caplog):
    from exporter.sources import proc_sockets
    now = {"t": 0.0}
    refusing = {"on": True}

    def dump(protocol, family=socket.AF_UNSPEC, buffer=None):
        if refusing["on"]:
            raise PermissionError(errno.EACCES, "Permission denied")
        if family in (socket.AF_UNSPEC, socket.AF_INET):  # both families in one walk
            yield from proc_sockets.read(protocol, str(FIXTURES), [])

    reader = SocketReader("auto", procfs=str(FIXTURES), dump=dump, clock=lambda: now["t"])
    sampler = Sampler(reader, collectors=["tcp"])
    with caplog.at_level(logging.WARNING):
        assert sampler.sample_once().socket_sources["tcp"] == "proc"
        refusing["on"] = False
        now["t"] = 599.0  # not yet time to retry
        assert sampler.sample_once().socket_sources["tcp"] == "proc"
        now["t"] = 601.0
        snapshot = sampler.sample_once()
    assert snapshot.socket_sources["tcp"] == "netlink" and snapshot.results["tcp"].ok
    assert snapshot.results["tcp"].data.state_totals()["SYN_RECV"] == 7
    messages = [r.getMessage() for r in caplog.records]
    assert sum("refused for tcp" in m for m in messages) == 1
    assert sum("works again for tcp" in m for m in messages) == 1
    # refused at a retry: still /proc, and quietly (the first warning said it all)
    refusing["on"] = True
    now["t"] = 1300.0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert sampler.sample_once().socket_sources["tcp"] == "proc"  # a new switch: logged
        now["t"] = 1901.0
        assert sampler.sample_once().socket_sources["tcp"] == "proc"  # a failed retry: not
    assert sum("refused for tcp" in r.getMessage() for r in caplog.records) == 1


def test_a_read_that_never_returns_is_reported_and_blocks_nothing(caplog):
    """A view whose read hangs (a hung mount, a stuck socket): failed within its budget,
    /healthz 503 while it lasts, the other views read every time, and back once it returns."""
    from exporter.pages import Pages
    from prometheus_client import CollectorRegistry
    release = threading.Event()
    hung = dataclasses.replace(BY_NAME["snmp"], read=lambda _ctx: release.wait(30) and {})
    views = (BY_NAME["tcp"], hung)
    sampler = Sampler(SocketReader("proc", procfs=str(FIXTURES)), views=views, budget=0.3,
                      interval=0.1)
    pages = Pages(lambda _get: CollectorRegistry(), lambda: sampler.snapshot)
    with caplog.at_level(logging.WARNING):
        first = sampler.sample_once()
        second = sampler.sample_once()
        health = pages.health()
        release.set()
        wait_for(lambda: not sampler.sample_once().blocked, timeout=5, what="the read to return")
    assert first.results["tcp"].ok and second.results["tcp"].ok
    assert "no answer within 0.3s" in first.results["snmp"].error
    assert "has not returned" in second.results["snmp"].error and second.duration < 0.2
    assert sum("collector snmp failed" in r.getMessage() for r in caplog.records) == 2
    assert first.blocked == second.blocked == {"snmp"}
    # waiting on the hung read is not sampling cost: the others keep their interval
    assert first.effective_interval == second.effective_interval == 0.1
    assert health.status == 503 and health.body.startswith(b"blocked: snmp")
    assert sampler.snapshot.results["snmp"].ok and pages.health().status == 200
    assert any("returned after blocking" in r.getMessage() for r in caplog.records)


def test_the_fast_lane_waits_while_its_view_is_read_in_full():
    # While a sample reads the view the lane reads from (held here) the lane does not dump:
    # that read gives every state exactly and feeds the peaks; once it is done the lane goes
    # on (and it goes on while other views are read: test_fast_lane.py).
    release, reading = threading.Event(), threading.Event()
    lanes, calls = [], []

    def slow_read(_ctx):
        calls.append(1)
        if len(calls) > 1:  # the first sample (start() takes it) is quick
            reading.set()
            release.wait(10)
        return {}
    held = dataclasses.replace(BY_NAME["snmp"], read=slow_read,
                               fast=lambda _ctx: lanes.append(1) or {})
    sampler = Sampler(SocketReader("proc", procfs=str(FIXTURES)), views=(held,),
                      interval=3600, fast_interval=0.02, budget=20)
    sampler.start()
    sampling = threading.Thread(target=sampler.sample_once)
    try:
        wait_for(lambda: len(lanes) >= 3, timeout=5, what="the lane to run")
        sampling.start()
        assert reading.wait(5)
        before = len(lanes)
        time.sleep(0.3)  # some fifteen ticks
        during = len(lanes) - before
        release.set()
        sampling.join(5)
        wait_for(lambda: len(lanes) >= before + during + 3, timeout=5, what="the lane again")
    finally:
        release.set()
        sampler.stop(timeout=5)
    assert during <= 1  # a tick already under way when the sample began may finish


def test_a_read_that_times_out_by_itself_failed_it_is_not_blocked(tmp_path):
    """A dump raises TimeoutError when the kernel stops answering (SO_RCVTIMEO). On Python
    3.11 that is the futures' TimeoutError too: the watchdog took it for its own, reported
    the view blocked, replaced the buffer and dropped the worker (found in review)."""
    def read(_ctx):
        raise TimeoutError(errno.ETIMEDOUT, "sock_diag dump: the kernel stopped answering")
    view = dataclasses.replace(BY_NAME["snmp"], read=read)
    sampler = Sampler(SocketReader("proc", procfs=str(tmp_path)), views=(view,), budget=30,
                      interval=15)
    buffer = sampler.reader.buffer
    snapshot = sampler.sample_once()
    assert not snapshot.results["snmp"].ok
    assert "the kernel stopped answering" in snapshot.results["snmp"].error
    assert snapshot.blocked == frozenset() and sampler.reader.buffer is buffer
    assert sampler.sample_once().blocked == frozenset()  # read again, not "still blocked"


def test_a_late_conntrack_read_keeps_the_buffer_it_began_with(monkeypatch):
    """conntrack's read blocked on a /proc file before it took the shared dump buffer; the
    watchdog gave the next sample a fresh one, and the late read then dumped into that
    same buffer while later samples' TCP dumps used it too (found in review)."""
    from exporter.sources import conntrack, ctnetlink
    from tests.test_proc_sockets import FIXTURES
    release, used = threading.Event(), {}
    monkeypatch.setattr(conntrack, "read", lambda procfs, missing=None: conntrack.Conntrack(1, 10))
    monkeypatch.setattr(conntrack, "read_stats",
                        lambda procfs, missing=None: release.wait(5) and None)

    def dump(buffer=None, timeout=10.0):
        used["conntrack"] = buffer
        return iter(())
    monkeypatch.setattr(ctnetlink, "dump", dump)
    reader = SocketReader("netlink", procfs=str(FIXTURES),
                          dump=lambda *args, buffer=None, **kwargs: iter(()))
    sampler = Sampler(reader, views=(BY_NAME["conntrack"],), budget=0.2, interval=0.1)
    first = reader.buffer
    assert sampler.sample_once().blocked == frozenset({"conntrack"})
    assert reader.buffer is not first
    release.set()
    assert wait_for(lambda: "conntrack" in used, 5)
    assert used["conntrack"] is first


def test_a_read_that_never_returns_does_not_keep_the_process_alive():
    """Reads run in daemon threads: after SIGTERM (SystemExit in the main thread) the process
    exits even while a read hangs on a dead mount (with ThreadPoolExecutor's threads, which
    are joined at exit, it waited for ever; found in review)."""
    import subprocess
    import sys
    script = """
import dataclasses, threading
from exporter.sampler import Sampler, SocketReader
from exporter.views import BY_NAME
never = threading.Event()
hung = dataclasses.replace(BY_NAME["snmp"], read=lambda _ctx: never.wait())
sampler = Sampler(SocketReader("proc", procfs="/nonexistent"), views=(hung,), budget=0.2,
                  interval=0.1)
assert sampler.sample_once().blocked == frozenset({"snmp"})
sampler.stop(1)
raise SystemExit(0)
"""
    done = subprocess.run([sys.executable, "-c", script], timeout=30, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_series_cut_by_a_read_the_watchdog_gave_up_on_are_not_counted():
    """A view counts the label sets it cut; a read that blocked and whose result is thrown
    away cut nothing that was published (it counted, found in review)."""
    release = threading.Event()
    calls = []

    def read(ctx):
        calls.append(1)
        ctx.count_truncated("devices", 3)
        if len(calls) == 2:
            release.wait(5)
        return {}
    view = dataclasses.replace(BY_NAME["snmp"], read=read)
    sampler = Sampler(SocketReader("proc", procfs="/nonexistent"), views=(view,), budget=0.2,
                      interval=0.1)
    assert sampler.sample_once().truncated_total["devices"] == 3
    assert sampler.sample_once().blocked == frozenset({"snmp"})
    release.set()
    assert wait_for(lambda: len(calls) == 2 and not sampler._stuck["snmp"][0].running(), 5)
    snapshot = sampler.sample_once()  # the late read's result is dropped, this one is read
    assert snapshot.results["snmp"].ok and snapshot.truncated_total["devices"] == 6
