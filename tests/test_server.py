"""HTTP behaviour: the real exporter process in a private namespace, and the pages alone."""
from __future__ import annotations

import gzip
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from exporter.pages import Pages
from tests.conftest import unavailable
from tests.kernel import build_mix, wait_for, wait_for_line

PORT = 10101


def fetch(path, headers=None, method="GET"):
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", headers=headers or {},
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def running(netns_factory, request):
    """The exporter serving inside namespace a, which holds the known socket mix.

    By default it samples once an hour: its only sample is then the one taken before it
    answered, before any HTTP connection existed, so the counts are exact (the mix plus the
    exporter's own listener). Tests that want snapshots swapping under them ask for less.
    """
    interval = getattr(request, "param", 3600)
    a, b = netns_factory(), netns_factory()
    mix = build_mix(a, b)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", a.name, sys.executable, "-m", "exporter",
         f"--web.listen-address=127.0.0.1:{PORT}", f"--sample.interval={interval}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # Connect only once it says it listens: that line comes after its first sample, and a
    # connection made earlier (the kernel completes handshakes before any accept()) would be
    # in that sample.
    wait_for_line(proc, "listening on", timeout=15)
    with a.entered():
        assert fetch("/healthz")[0] == 200
    yield SimpleNamespace(ns=a, proc=proc, mix=mix)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    mix.close()


@pytest.mark.netns
def test_metrics_have_exact_values_and_pass_promtool(running):
    with running.ns.entered():
        status, headers, body = fetch("/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    expected = dict(running.mix.expected)
    expected["LISTEN", "ipv4"] += 1  # the exporter's own
    for (state, family), count in expected.items():
        assert f'netstat_tcp_connections{{family="{family}",state="{state}"}} {count}.0\n' in text
    assert 'netstat_tcp_connections{family="ipv4",state="CLOSING"} 0.0\n' in text
    assert 'netstat_tcp_listen_queue_length{address="127.0.0.1",port="5002"} 2.0\n' in text
    assert 'netstat_tcp_listen_backlog{address="127.0.0.1",port="5002"} 7.0\n' in text
    assert 'netstat_exporter_collector_success{collector="tcp"} 1.0\n' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("promtool is not installed (Debian package 'prometheus')")
    check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.netns
def test_negotiation_landing_page_health_and_errors(running):
    with running.ns.entered():
        status, headers, body = fetch("/metrics", {"Accept": "application/openmetrics-text"})
        assert status == 200
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.endswith(b"# EOF\n")
        status, headers, body = fetch("/metrics", {"Accept-Encoding": "gzip"})
        assert headers.get("Content-Encoding") == "gzip"
        assert b"netstat_tcp_connections" in gzip.decompress(body)
        status, _, body = fetch("/")
        assert status == 200 and b'href="/metrics"' in body and b"0.1.0" in body
        status, _, body = fetch("/healthz")
        assert status == 200 and body.startswith(b"ok")
        assert fetch("/nope")[0] == 404
        assert fetch("/metrics", method="POST")[0] == 405


@pytest.mark.netns
def test_scrapes_reuse_one_connection(running):
    """Keep-alive: a scraper that keeps its connection leaves no TIME_WAIT behind per scrape."""
    import http.client
    with running.ns.entered():
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)
        sockets = []
        for path in ("/metrics", "/healthz", "/nope", "/metrics"):
            conn.request("GET", path, headers={"Accept-Encoding": "gzip"})
            response = conn.getresponse()
            body = response.read()
            assert response.version == 11 and response.getheader("Connection") != "close"
            assert int(response.getheader("Content-Length")) == len(body)
            sockets.append(conn.sock)
        assert response.status == 200 and gzip.decompress(body).startswith(b"# HELP")
        assert all(s is sockets[0] for s in sockets)  # one TCP connection for all four
        # HEAD (headers, no body) and POST (405) keep the framing, and the connection, intact
        for method, status in (("HEAD", 200), ("POST", 405), ("GET", 200)):
            conn.request(method, "/metrics")
            response = conn.getresponse()
            body = response.read()
            assert response.status == status and conn.sock is sockets[0]
            if method == "HEAD":
                assert body == b"" and int(response.getheader("Content-Length")) > 1000
        assert body.startswith(b"# HELP")
        conn.close()
        # a client that asks to close gets the whole answer and then EOF
        with socket.create_connection(("127.0.0.1", PORT), timeout=5) as raw:
            raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            received = b""
            while chunk := raw.recv(4096):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200 OK") and received.endswith(b"\n")


@pytest.mark.netns
@pytest.mark.parametrize("running", [0.1], indirect=True)
def test_concurrent_scrapes_all_succeed(running):
    failures, bodies = [], []

    def scrape():
        with running.ns.entered():
            for _ in range(25):
                try:
                    status, _, body = fetch("/metrics")
                except OSError as exc:
                    failures.append(repr(exc))
                    continue
                if status != 200 or b'netstat_tcp_connections{family="ipv4",state="SYN_RECV"} 7.0' not in body:
                    failures.append((status, body.decode()[-3000:]))
                bodies.append(len(body))

    threads = [threading.Thread(target=scrape) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[:3]
    assert len(bodies) == 200


@pytest.mark.netns
def test_sigterm_shuts_down_cleanly(running):
    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(10) == 0
    stderr = running.proc.stderr.read()
    assert "Traceback" not in stderr and "shutting down" in stderr


def run_cli(*args, timeout=20):
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_port_in_use_is_one_clear_line():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        done = run_cli(f"--web.listen-address=127.0.0.1:{port}")
    finally:
        holder.close()
    assert done.returncode == 1
    assert done.stderr.strip() == (f"netstat-exporter: error: cannot listen on 127.0.0.1:{port}: "
                                   "Address already in use")


@pytest.mark.parametrize("args, message", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--sample.interval=0"], "--sample.interval: must be a number of seconds from 0.05 to 86400"),
    (["--sample.interval=1e10"], "--sample.interval: must be a number of seconds from 0.05"),
    (["--web.max-requests=0"], "--web.max-requests: must be an integer from 1 to 10000"),
    (["--web.config.file=/nonexistent.yml"], "--web.config.file: no such file"),
    (["--web.listen-address=nonsense"], "--web.listen-address: expected [host]:port"),
    (["--web.listen-address=:99999"], "port must be 0-65535"),
    (["--web.listen-address=::1:80"], "brackets"),
    (["--collector.sockets.source=ebpf"], "must be one of auto, netlink, proc"),
    (["--web.telemetry-path=metrics"], "must start with /"),
    (["--listen.limit=-1"], "must be an integer from 0 to 100000"),
    (["--remote.top=1_000"], "--remote.top: must be an integer from 0 to 100000, got '1_000'"),
    (["--series.limit=99999999999"], "--series.limit: must be an integer from 28 to 10000000"),
    (["--sample.peak-window=1e10"], "--sample.peak-window: must be a number of seconds from 0"),
    (["--collector.disable=tcp,bogus"], "unknown collector 'bogus'"),
    (["snapshot", "--watch=-3"], "--watch: must be a number of seconds from 0.05 to 86400"),
    (["snapshot", "--watch=abc"], "--watch: must be a number of seconds from 0.05 to 86400"),
    # inf passed the old check and overflowed the watchdog's wait (found in review)
    (["snapshot", "--watch=inf"], "--watch: must be a number of seconds from 0.05 to 86400"),
    (["snapshot", "--watch=1e308"], "--watch: must be a number of seconds from 0.05 to 86400"),
    (["snapshot", "-s", "-r"], "not allowed with argument"),
    (["snapshot", "-p", "--top", "3"], "-p: not allowed with --top or --state"),
    (["snapshot", "--state", "LISTEN"], "LISTEN sockets have no remote address"),
])
def test_bad_flags_exit_2_with_one_line(args, message):
    done = run_cli(*args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_bad_flags_are_reported_together():
    done = run_cli("--sample.interval=x", "--listen.limit=y")
    assert done.returncode == 2
    assert "--sample.interval" in done.stderr and "--listen.limit" in done.stderr


def test_environment_variables_configure_and_flags_win(monkeypatch):
    from exporter import config
    cfg = config.build({"--listen.limit": "7"}, {"NETSTAT_EXPORTER_LISTEN_LIMIT": "3",
                                                 "NETSTAT_EXPORTER_SAMPLE_INTERVAL": "2s"})
    assert cfg.listen_limit == 7 and cfg.sample_interval == 2.0
    with pytest.raises(config.ConfigError, match="NETSTAT_EXPORTER_PATH_PROCFS"):
        config.build({}, {"NETSTAT_EXPORTER_PATH_PROCFS": ""})


def test_healthz_turns_503_when_the_sample_is_stale():
    from prometheus_client import CollectorRegistry
    now = {"t": 1000.0}
    snap = SimpleNamespace(monotonic=1000.0, effective_interval=5.0,
                           results={"tcp": SimpleNamespace(ok=True), "udp": SimpleNamespace(ok=False)})
    pages = Pages(lambda _get: CollectorRegistry(), lambda: snap, clock=lambda: now["t"])
    reply = pages.health()
    assert reply.status == 200 and reply.body == b"ok: last sample 0.0s ago; failing: udp\n"
    assert pages.health(detailed=False).body == b"ok\n"
    now["t"] = 1015.5
    reply = pages.health()
    assert reply.status == 503 and reply.body.startswith(b"stale: last sample 15.5s ago")
    assert pages.health(detailed=False).body == b"stale\n"
    assert Pages(lambda _get: CollectorRegistry(), lambda: None).health().status == 503
