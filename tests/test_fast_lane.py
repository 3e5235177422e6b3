"""The fast lane: a burst of SYN_RECV that comes and goes between two samples 15 s apart
shows in netstat_tcp_connections_peak, and without the lane it is missed."""
from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tests.kernel import _checksum, pin_neighbours, send_spoofed_syns, veth_pair, wait_for

pytestmark = pytest.mark.netns
PORT = 10101


def scrape(ns) -> str:
    with ns.entered():
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=5) as reply:
            return reply.read().decode()


def value(text: str, series: str) -> float:
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert found, series
    return float(found.group(1))


def send_spoofed_resets(sources: list[str], dst: str, dport: int) -> None:
    """End the half-open connections send_spoofed_syns began: an RST with the next sequence
    number from each source (run inside the sending namespace)."""
    import socket
    import struct
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with raw:
        for i, src in enumerate(sources):
            src_b, dst_b = socket.inet_aton(src), socket.inet_aton(dst)
            tcp = struct.pack("!HHIIBBHHH", 40000 + i, dport, 1000 + i + 1, 0, 5 << 4, 0x04,
                              0, 0, 0)
            pseudo = src_b + dst_b + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
            tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, socket.IPPROTO_TCP, 0,
                             src_b, dst_b)
            raw.sendto(ip + tcp, (dst, 0))


def start(ns, fast_interval: str):
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, sys.executable, "-m", "exporter",
         f"--web.listen-address=127.0.0.1:{PORT}", "--sample.interval=15",
         f"--sample.fast-interval={fast_interval}", "--sample.peak-window=60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def up():
        try:
            return "netstat_exporter_sample_timestamp_seconds" in scrape(ns)
        except OSError:
            return proc.poll() is not None
    wait_for(up, timeout=15, what="the exporter to answer")
    return proc


def _in(ns, send, sources):
    with ns.entered():
        send(sources, "198.18.0.1", 6000)


def test_a_three_second_syn_burst_between_samples_shows_in_the_peak(netns_factory):
    runs = {}
    for fast in ("1", "0"):  # with the lane, and the control without it
        a, b = netns_factory(), netns_factory()
        veth_pair(a, b, "198.18.0.1/15", "198.18.0.2/15")
        with a.entered():
            import socket
            target = socket.socket()
            target.bind(("198.18.0.1", 6000))
            target.listen(1024)
        runs[fast] = (a, b, target, start(a, fast))
    try:
        first = {fast: value(scrape(a), "netstat_exporter_sample_timestamp_seconds")
                 for fast, (a, _b, _t, _p) in runs.items()}
        # a 3-second flood: 50 SYNs from addresses nobody owns (their SYN-ACKs go to a
        # made-up MAC), then an RST from each, which ends its half-open connection
        sources = [f"198.18.100.{i}" for i in range(1, 51)]
        for a, b, _target, _proc in runs.values():
            pin_neighbours(a, "veth-a", sources)

        def flood(send):
            threads = [threading.Thread(target=lambda b=b: _in(b, send, sources))
                       for _a, b, _t, _p in runs.values()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        flood(send_spoofed_syns)
        for a, _b, _t, _p in runs.values():
            wait_for(lambda a=a: a.ss_state_counts().get("SYN_RECV", 0) == 50, timeout=3,
                     what="the burst")
        time.sleep(3)  # the incident itself: a burst that lasts 3 s (not a wait for a result)
        flood(send_spoofed_resets)
        for a, _b, _t, _p in runs.values():
            wait_for(lambda a=a: a.ss_state_counts().get("SYN_RECV", 0) == 0, timeout=5,
                     what="the burst to end")
        texts = {}
        for fast, (a, _b, _t, _p) in runs.items():
            wait_for(lambda a=a, fast=fast: value(scrape(a), "netstat_exporter_sample_timestamp_seconds")
                     > first[fast], timeout=20, what="the next sample, 15 s after the first")
            texts[fast] = scrape(a)
    finally:
        for _a, _b, target, proc in runs.values():
            proc.terminate()
            proc.wait(10)
            target.close()
    for fast, text in texts.items():  # the burst came and went between the two samples
        assert value(text, 'netstat_tcp_connections{family="ipv4",state="SYN_RECV"}') == 0
    assert value(texts["1"], 'netstat_tcp_connections_peak{state="SYN_RECV"}') == 50
    assert value(texts["1"], "netstat_exporter_fast_lane_duration_seconds") < 1
    assert value(texts["0"], 'netstat_tcp_connections_peak{state="SYN_RECV"}') == 0  # missed


def test_the_lane_keeps_running_while_other_views_are_read():
    """The lane pauses while the TCP view is read in full, not for the whole sample: a burst
    while a slow view (conntrack, the netns walk) was read never reached the peak (found in
    review)."""
    import dataclasses
    import threading
    import time
    from exporter.sampler import Sampler, SocketReader
    from exporter.views import BY_NAME
    from tests.test_proc_sockets import FIXTURES
    syn = {"n": 0}
    in_slow = threading.Event()

    def slow(_ctx):
        in_slow.set()
        time.sleep(0.6)
        return {}
    tcp = dataclasses.replace(BY_NAME["tcp"], fast=lambda ctx: {"SYN_RECV": syn["n"]})
    sampler = Sampler(SocketReader("proc", procfs=str(FIXTURES)),
                      views=(tcp, dataclasses.replace(BY_NAME["snmp"], read=slow)),
                      interval=3600, fast_interval=0.02, budget=20, peak_window=60)
    sampler.start()  # the first sample, then the lane
    in_slow.clear()
    sampling = threading.Thread(target=sampler.sample_once)
    sampling.start()
    try:
        assert in_slow.wait(5)  # a sample is reading the slow view now
        syn["n"] = 50
        time.sleep(0.3)  # some 15 ticks of the lane
        syn["n"] = 0
        sampling.join(5)
        assert sampler.sample_once().peaks["SYN_RECV"] == 50
    finally:
        sampler.stop(2)


def test_no_lane_duration_where_no_lane_reads_anything():
    """Where the socket tables come from /proc the lane has no cheap read (it returns None),
    and where it fails it read nothing: netstat_exporter_fast_lane_duration_seconds must not
    be there to say a lane works (found in review)."""
    import dataclasses
    import time
    from exporter.sampler import Sampler, SocketReader
    from exporter.views import BY_NAME
    from tests.test_proc_sockets import FIXTURES

    def failing(_ctx):
        raise OSError("no lane here")
    for fast in (lambda _ctx: None, failing):
        tcp = dataclasses.replace(BY_NAME["tcp"], fast=fast)
        sampler = Sampler(SocketReader("proc", procfs=str(FIXTURES)), views=(tcp,),
                          interval=3600, fast_interval=0.02, budget=20)
        sampler.start()
        try:
            time.sleep(0.3)
            assert sampler.sample_once().fast_duration is None
        finally:
            sampler.stop(2)
