"""The HTTP front door attacked as a hostile client would: the real exporter process in a private
namespace, raw sockets from the test. Every wait is bounded."""
from __future__ import annotations

import gzip
import re
import resource
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from exporter.pages import MetricsCache, accepts_gzip
from tests.kernel import wait_for

pytestmark = pytest.mark.netns
PORT = 10101


def fetch(path, headers=None, timeout=5):
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def start_exporter(ns, *flags, nofile=None):
    def limit():
        if nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, sys.executable, "-m", "exporter",
         f"--web.listen-address=127.0.0.1:{PORT}", "--sample.interval=0.5", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)

    def up():
        with ns.entered():
            try:
                return fetch("/healthz")[0] == 200
            except OSError:
                return proc.poll() is not None
    wait_for(up, timeout=15, what="the exporter to answer")
    assert proc.poll() is None, proc.stderr.read()
    return proc


@pytest.fixture
def exporter(netns, request):
    flags = getattr(request, "param", ())
    proc = start_exporter(netns, *flags)
    yield SimpleNamespace(ns=netns, proc=proc)
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def stop(proc) -> str:
    """SIGTERM, then the whole log; the exporter must have exited cleanly."""
    proc.terminate()
    assert proc.wait(10) == 0
    return proc.stderr.read()


def connect(timeout=5.0, rcvbuf=None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", PORT))
    return sock


def read_all(sock, limit=5.0) -> bytes:
    """Everything until the server closes (or `limit` seconds pass: then b"<open>" is added)."""
    received, deadline = b"", time.monotonic() + limit
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            return received + b"<reset>"
        if not chunk:
            return received
        received += chunk
    return received + b"<open>"


def threads(pid) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"Threads:\s+(\d+)", status.read()).group(1))


def exporter_pid(proc) -> int:
    """ip netns exec execs the exporter in place: the Popen pid is the exporter's."""
    return proc.pid


@pytest.mark.parametrize("exporter", [("--web.read-header-timeout=1",)], indirect=True)
def test_slow_clients_get_no_thread_and_are_cut_off_while_scrapes_answer(exporter):
    with exporter.ns.entered():
        assert fetch("/metrics")[0] == 200  # the render worker thread now exists
        before = threads(exporter_pid(exporter.proc))
        slow = [connect() for _ in range(300)]
        for sock in slow:
            sock.sendall(b"GET /metr")  # and then nothing more for a while
        assert fetch("/metrics")[0] == 200 and fetch("/healthz")[0] == 200
        assert threads(exporter_pid(exporter.proc)) == before
        # the whole head must arrive within 1 s of its first byte: each gets 408 and a close
        replies = [read_all(sock, limit=5) for sock in slow]
        assert all(r.startswith(b"HTTP/1.1 408 ") and not r.endswith(b"<open>")
                   for r in replies), replies[0]
        for sock in slow:
            sock.close()
    assert "Traceback" not in stop(exporter.proc)


@pytest.mark.parametrize("exporter", [("--web.max-connections=20",)], indirect=True)
def test_connection_cap_evicts_the_longest_idle_and_never_locks_scrapers_out(exporter):
    with exporter.ns.entered():
        idle = [connect() for _ in range(60)]
        for sock in idle[:5]:  # five clients that finished a request and stay idle
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(5):
            assert fetch("/metrics")[0] == 200
        fds = len(__import__("os").listdir(f"/proc/{exporter_pid(exporter.proc)}/fd"))
        assert fds < 20 + 30, fds  # the cap plus the exporter's own files, not 60 more
        closed = sum(not read_all(sock, limit=0.2).endswith(b"<open>") for sock in idle)
        assert closed >= 40  # the oldest waiting connections gave way
        for sock in idle:
            sock.close()
    assert "Traceback" not in stop(exporter.proc)


def test_descriptor_limit_never_switches_the_socket_source(netns):
    # 200 descriptors in all: the exporter keeps 128 for its sources and serves 72 connections
    proc = start_exporter(netns, nofile=200)
    with netns.entered():
        held = [connect() for _ in range(400)]
        status, _, body = fetch("/metrics")
        text = body.decode()
        assert status == 200
        wait_for(lambda: b'netstat_tcp_connections{family="ipv4",state="ESTABLISHED"}' in
                 fetch("/metrics")[2], timeout=5, what="a sample taken under pressure")
        text = fetch("/metrics")[2].decode()
        for sock in held:
            sock.close()
    assert 'netstat_exporter_socket_source{protocol="tcp",source="netlink"} 1.0' in text
    assert 'netstat_exporter_collector_success{collector="tcp"} 1.0' in text
    assert "netstat_tcp_listen_backlog{" in text
    log = stop(proc)
    assert "Too many open files" not in log and "reading" not in log, log


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Many: a\r\n" * 3000 + b"\r\n", 431),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n", 413),
    (b"GET /\r\n", 400),  # HTTP/0.9
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), 400),  # a TLS ClientHello
    (b"\x00\xff\xfe garbage\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Length: 5\r\n\r\n", 400),
])
def test_bad_requests_are_answered_and_closed_at_once(exporter, request_bytes, status):
    with exporter.ns.entered():
        started = time.monotonic()
        with connect() as sock:
            sock.sendall(request_bytes)
            reply = read_all(sock, limit=5)
        took = time.monotonic() - started
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:100]
    assert not reply.endswith(b"<open>") and took < 4  # closed, not left for a deadline
    assert b"Traceback" not in reply


def test_a_body_is_framed_and_never_run_as_a_request(exporter):
    smuggled = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    with exporter.ns.entered(), connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(smuggled), smuggled))
        first = read_all(sock, limit=1)
        sock.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        second = read_all(sock, limit=5)
    # one answer per request: /healthz, then /nope; the body's "GET /metrics" never ran
    assert first.startswith(b"HTTP/1.1 200 ") and first.count(b"HTTP/1.1") == 1
    assert second.startswith(b"HTTP/1.1 404 ") and second.count(b"HTTP/1.1") == 1
    assert b"# HELP" not in first + second


def test_chunked_bodies_are_read_and_discarded_too(exporter):
    with exporter.ns.entered(), connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nGET /\r\n0\r\n\r\n"
                     b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = read_all(sock)
    assert reply.count(b"HTTP/1.1 200 ") == 2 and not reply.endswith(b"<open>")


def test_paths_match_exactly_and_headers_name_no_runtime(exporter):
    with exporter.ns.entered():
        for path in ("//metrics", "/%6detrics", "/metrics/", "/METRICS", "/healthz/.."):
            assert fetch(path)[0] == 404, path
        wanted = {"netstat_tcp_listeners", "netstat_exporter_build_info",
                  "netstat_tcpext_listen_overflows_total", "netstat_interface_receive_bytes_total"}
        status, headers, body = fetch("/metrics?" + "&".join(f"name[]={n}" for n in wanted))
        names = {line.split("{")[0].split(" ")[0] for line in body.decode().splitlines()
                 if not line.startswith("#")}
        assert status == 200 and names == wanted
        assert "Server" not in headers
        assert not any("python" in v.lower() for v in headers.values())


def test_resets_and_timeouts_leave_no_traceback(netns):
    proc = start_exporter(netns, "--web.read-header-timeout=0.5")
    with netns.entered():
        for i in range(200):
            sock = connect()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if i % 2:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")  # reset mid-reply
            sock.close()  # RST
        stalled = [connect() for _ in range(50)]
        for sock in stalled:
            sock.sendall(b"GET /")
        wait_for(lambda: all(not read_all(s, 0.05).endswith(b"<open>") for s in stalled),
                 timeout=10, what="the header deadline to close every stalled client")
        assert fetch("/healthz")[0] == 200
    log = stop(proc)
    assert "Traceback" not in log and "Error" not in log, log
    assert log.count("\n") <= 4, log  # start, shutdown: nothing per connection at info


@pytest.mark.parametrize("exporter", [("--web.max-requests=1",)], indirect=True)
def test_scrapes_beyond_max_requests_get_503(exporter):
    """Renderings at once are capped: twelve scrapers asking for distinct name[] selections
    (each one a rendering) at the same moment, one slot."""
    import concurrent.futures
    with exporter.ns.entered():
        def scrape(i):
            with exporter.ns.entered():
                return fetch(f"/metrics?name[]=netstat_tcp_connections&name[]=x{i}")
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(scrape, range(36)))
        statuses = [status for status, _h, _b in results]
        assert set(statuses) <= {200, 503} and 200 in statuses
        assert 503 in statuses, statuses
        assert all(b"more than 1 scrapes in flight" in body
                   for status, _h, body in results if status == 503)
        assert fetch("/healthz")[0] == 200  # health is not a scrape


def test_clients_that_never_read_hold_no_scrape_slot_and_give_way(netns):
    """45 clients pipelining scrapes and reading nothing: scrapes still answer (a slot is a
    rendering, not a write), and at the connection cap the stalled ones are evicted."""
    proc = start_exporter(netns, "--web.max-connections=30")
    try:
        with netns.entered():
            stuck = []
            for _ in range(45):
                sock = connect(rcvbuf=4096)
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
                stuck.append(sock)
            wait_for(lambda: fetch("/metrics")[0] == 200, timeout=15,
                     what="a scrape answered beside the stalled readers")
            for sock in stuck:
                sock.close()
    finally:
        assert "Traceback" not in stop(proc)


@pytest.mark.parametrize("exporter", [("--sample.interval=3600",)], indirect=True)
def test_one_rendering_per_sample_shared_by_every_scraper(exporter):
    with exporter.ns.entered():
        plain = {fetch("/metrics")[2] for _ in range(5)}
        zipped = {fetch("/metrics", {"Accept-Encoding": "gzip"})[2] for _ in range(5)}
        open_metrics = fetch("/metrics", {"Accept": "application/openmetrics-text"})
    assert len(plain) == 1 and len(zipped) == 1  # byte for byte: one rendering each
    assert gzip.decompress(zipped.pop()) == plain.pop()
    assert open_metrics[1]["Content-Type"].startswith("application/openmetrics-text")
    assert open_metrics[2].endswith(b"# EOF\n")


def test_metrics_cache_renders_once_per_snapshot_and_format():
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily
    collected, seen = [], []

    class Counting:
        def __init__(self, get_snapshot):
            self.get_snapshot = get_snapshot

        def collect(self):
            collected.append(1)
            snapshot = self.get_snapshot()
            seen.append(snapshot)
            yield GaugeMetricFamily("x", "x", value=snapshot.value)

    def make(get_snapshot):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Counting(get_snapshot))
        return registry

    current = SimpleNamespace(value=1)
    cache = MetricsCache(make, lambda: current)
    for _ in range(50):
        cache.render("", False)
        cache.render("", True)
        cache.render("application/openmetrics-text", False)
    assert len(collected) == 3 and all(s is current for s in seen)
    current = SimpleNamespace(value=2)
    content_type, body = cache.render("", False)
    assert len(collected) == 4 and b"x 2.0" in body and content_type.startswith("text/plain")
    cache.render("", False, frozenset({"x"}))
    assert len(collected) == 5


@pytest.mark.parametrize("header, expected", [
    ("gzip", True), ("deflate, gzip;q=1.0, *;q=0.5", True), ("gzip;q=0", False),
    ("identity", False), ("", False), ("x-gzip", True), ("GZIP", True),
])
def test_accepts_gzip(header, expected):
    assert accepts_gzip(header) is expected


@pytest.mark.parametrize("cut", [2, 4, 8, 20])
def test_pipelined_requests_split_anywhere_are_answered(exporter, cut):
    """The next request's line split across two reads, behind a whole request."""
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    second = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with exporter.ns.entered(), connect() as sock:
        sock.sendall(first + second[:cut])
        assert read_all(sock, limit=0.5).count(b"HTTP/1.1 200 ") == 1
        sock.sendall(second[cut:])
        rest = read_all(sock)
    assert rest.startswith(b"HTTP/1.1 200 ") and not rest.endswith(b"<open>")


@pytest.mark.parametrize("request_bytes, expect", [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n"
     b"Connection: close\r\n\r\n", b"HTTP/1.1 100 "),
    (b"GET http://somewhere:10101/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
     b"HTTP/1.1 200 "),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; version=abc"
     b"\r\nConnection: close\r\n\r\n", b"HTTP/1.1 200 "),
])
def test_expect_absolute_form_and_odd_accept_headers(exporter, request_bytes, expect):
    with exporter.ns.entered(), connect() as sock:
        sock.sendall(request_bytes)
        first = read_all(sock, limit=1)
        if expect == b"HTTP/1.1 100 ":  # the client sends its body only after the 100
            assert first.startswith(expect), first[:80]
            sock.sendall(b"abc")
            first += read_all(sock)
            assert b"HTTP/1.1 200 " in first
        else:
            assert first.startswith(expect), first[:80]


def test_chunk_extensions_count_toward_the_body_limit(exporter):
    chunk = b"1;" + b"e" * 8000 + b"\r\nx\r\n"
    with exporter.ns.entered(), connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        started = time.monotonic()
        try:
            for _ in range(200):  # 1.6 MB of extensions for 200 bytes of data
                sock.sendall(chunk)
        except OSError:
            pass  # refused and closed before we were done sending: the point
        reply = read_all(sock, limit=5)
    assert reply.startswith(b"HTTP/1.1 413 ") and time.monotonic() - started < 5


def test_ipv6_sans_compare_as_addresses():
    from exporter.server import _san_allowed
    cert = {"subjectAltName": (("IP Address", "0:0:0:0:0:0:0:1"), ("DNS", "a.example"))}
    assert _san_allowed(cert, frozenset({"::1"}))
    assert _san_allowed(cert, frozenset({"a.example"}))
    assert not _san_allowed(cert, frozenset({"::2", "b.example"}))
