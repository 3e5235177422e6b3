"""HTTP server candidates side by side (issue 9): each serves the same fixed 95,000-byte body on
/metrics (and "ok" on /healthz) in its own process, on 127.0.0.1 in a private network
namespace, one candidate at a time, and is measured and attacked the same way.

    .venv/bin/python -m bench.http_candidates [--only ours,aiohttp] [--trickle 30]

Candidates and the settings used (the server's defaults unless named here):
- ours: exporter.server.HttpServer with its default Limits (1000 connections, 10 s header
  deadline, 120 s idle, 40 scrapes in flight) over a stub of pages.Pages; wrk once more with
  max_requests=100, since wrk's 50 connections exceed the default 40 in flight (503s).
- aiohttp: web.run_app, defaults (keepalive_timeout 75 s, backlog 128), no access log.
- cheroot: cheroot.wsgi.Server, numthreads=10, request_queue_size=512 (listen backlog, as
  ours; the default 5 is a toy); defaults otherwise (timeout 10 s, keep_alive_conn_limit 10).
- waitress: waitress.serve, threads=4; defaults otherwise (connection_limit 100,
  channel_timeout 120 s, backlog 1024).
- uvicorn: uvicorn.run on a small ASGI app, http="h11", loop="asyncio", lifespan off, no
  access log; defaults otherwise (timeout_keep_alive 5 s, backlog 2048, no concurrency limit).

Prints one Markdown row per candidate and measurement:
- RSS and threads with 1000 idle keep-alive connections (each answered one /healthz), and how
  many of them the server kept open;
- wrk -c50 -t2 -d10s on /metrics: requests/s and p99;
- a TLS ClientHello, an HTTP/0.9 line, a 70 KB request line and a GET whose Content-Length body
  holds a second request: what comes back, after how long, and whether the body ran;
- a normal scrape's latency while 1000 clients trickle a request head one byte a second, and
  when (if ever) the slow clients are cut off.
Needs root (unshare) and Debian's wrk. Every wait is bounded: about 90 s per candidate.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

from bench import http
from bench.http import proc_status

PORT = 10102
BODY_SIZE = 95_000
CANDIDATES = ("ours", "aiohttp", "cheroot", "waitress", "uvicorn")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PROBE_SECONDS = 10.0  # how long an attack probe waits for an answer or a close
SLOW_PREFIX = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: "  # then "a" for ever


def body() -> bytes:
    """A fixed exposition-like body of exactly BODY_SIZE bytes."""
    line = 'netstat_bench_sample{{family="inet",state="established",i="{:06d}"}} 1\n'
    text = "".join(line.format(i) for i in range(BODY_SIZE // len(line.format(0)) + 1))
    return text.encode()[:BODY_SIZE - 1] + b"\n"


# -- the servers (run in the child process) -----------------------------------------------------
def serve_ours(port: int, max_requests: int | None = None) -> None:
    from exporter.pages import Reply
    from exporter.server import HttpServer, Limits

    payload = body()

    class StubPages:
        """pages.Pages without a sampler: the same routes, a fixed body."""

        def route(self, path: bytes) -> str | None:
            return {b"/metrics": "metrics", b"/": "landing", b"/healthz": "health"}.get(path)

        def landing(self) -> Reply:
            return Reply(200, b"<html>netstat-exporter</html>\n",
                         content_type="text/html; charset=utf-8")

        def health(self, detailed: bool = True) -> Reply:
            return Reply(200, b"ok\n")

        def metrics(self, query: bytes, accept: str, accept_encoding: str) -> Reply:
            return Reply(200, payload, (("Vary", "Accept, Accept-Encoding"),), CONTENT_TYPE)

    limits = Limits() if max_requests is None else Limits(max_requests=max_requests)
    server = HttpServer(StubPages(), "127.0.0.1", port, limits)
    server.start()
    threading.Event().wait()


def serve_aiohttp(port: int) -> None:
    from aiohttp import web

    payload = body()

    async def metrics(_request):
        return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE})

    async def health(_request):
        return web.Response(body=b"ok\n", content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def wsgi_app(payload: bytes):
    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            start_response("200 OK", [("Content-Type", CONTENT_TYPE),
                                      ("Content-Length", str(len(payload)))])
            return [payload]
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
            return [b"ok\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain"),
                                         ("Content-Length", "10")])
        return [b"not found\n"]
    return app


def serve_cheroot(port: int) -> None:
    from cheroot import wsgi

    server = wsgi.Server(("127.0.0.1", port), wsgi_app(body()), numthreads=10,
                         request_queue_size=512)
    server.start()


def serve_waitress(port: int) -> None:
    import waitress

    waitress.serve(wsgi_app(body()), host="127.0.0.1", port=port, threads=4, _quiet=True)


def serve_uvicorn(port: int) -> None:
    import uvicorn

    payload = body()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/metrics":
            status, content, kind = 200, payload, CONTENT_TYPE.encode()
        elif scope["path"] == "/healthz":
            status, content, kind = 200, b"ok\n", b"text/plain"
        else:
            status, content, kind = 404, b"not found\n", b"text/plain"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind),
                                (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

    uvicorn.run(app, host="127.0.0.1", port=port, http="h11", loop="asyncio", lifespan="off",
                access_log=False, log_level="warning")


SERVERS = {"ours": serve_ours, "aiohttp": serve_aiohttp, "cheroot": serve_cheroot,
           "waitress": serve_waitress, "uvicorn": serve_uvicorn}


# -- measuring (the parent) ---------------------------------------------------------------------
def fetch(path: str, timeout: float = 5.0) -> float:
    return http.fetch(path, timeout, PORT)


def wrk(path: str, seconds: int = 10) -> str:
    done = subprocess.run(["wrk", "-c50", "-t2", f"-d{seconds}s", "--latency", "--timeout", "10s",
                           f"http://127.0.0.1:{PORT}{path}"],
                          capture_output=True, text=True, timeout=seconds + 30)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    p99 = re.search(r"99%\s+(\S+)", done.stdout)
    if not rate or not p99:
        return f"wrk failed: {(done.stdout + done.stderr).strip()[-200:]!r}"
    errors = re.search(r"Socket errors: (.*)", done.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    extra = "".join(f"; {m.group(0).strip()}" for m in (errors, non2xx) if m)
    return f"{float(rate.group(1)):.0f} req/s, p99 {p99.group(1)}{extra}"


def still_open(conn: socket.socket) -> bool:
    conn.settimeout(0)  # with a timeout Python polls first, even with MSG_DONTWAIT
    try:
        return conn.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def idle_connections(pid: int, count: int) -> tuple[str, list]:
    """count keep-alive connections, each answered one /healthz and then left idle. Stops at
    the fifth connection in a row that is refused or not answered within 2 s."""
    before = proc_status(pid)
    held, answered, failures = [], 0, 0
    started = time.monotonic()
    for _ in range(count):
        if failures >= 5:
            break
        try:
            conn = socket.create_connection(("127.0.0.1", PORT), timeout=2)
        except OSError:
            failures += 1
            continue
        held.append(conn)
        try:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            if conn.recv(4096).startswith(b"HTTP/1.1 200"):
                answered, failures = answered + 1, 0
                continue
        except OSError:
            pass
        failures += 1
    opening = time.monotonic() - started
    time.sleep(1)
    during = proc_status(pid)
    alive = sum(still_open(conn) for conn in held)
    growth = (during["VmRSS"] - before["VmRSS"]) / 1024
    return (f"RSS +{growth:.1f} MB ({before['VmRSS'] / 1024:.0f} -> "
            f"{during['VmRSS'] / 1024:.0f} MB), threads {before['Threads']} -> "
            f"{during['Threads']}; {answered} of {count} answered in {opening:.1f} s, "
            f"{alive} still open 1 s later"), held


def client_hello() -> bytes:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="x")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def probe(payload: bytes, results: dict, key: str) -> None:
    """Send payload on a fresh connection; note the status lines that come back, when the first
    byte came and when (if) the server closed, waiting at most PROBE_SECONDS."""
    started = time.monotonic()
    first = closed = None
    received = b""
    note = ""
    try:
        conn = socket.create_connection(("127.0.0.1", PORT), timeout=PROBE_SECONDS)
    except OSError as exc:
        results[key] = f"connect failed: {exc}"
        return
    try:
        conn.sendall(payload)
    except OSError as exc:
        note = f"; send stopped: {type(exc).__name__}"
    while True:
        left = started + PROBE_SECONDS - time.monotonic()
        if left <= 0:
            break
        conn.settimeout(left)
        try:
            data = conn.recv(65536)
        except TimeoutError:
            break
        except OSError as exc:
            closed = time.monotonic() - started
            note += f"; {type(exc).__name__}"
            break
        if not data:
            closed = time.monotonic() - started
            break
        if first is None:
            first = time.monotonic() - started
        received += data
    conn.close()
    statuses = re.findall(rb"HTTP/1\.[01] (\d{3})", received)
    if statuses:
        answer = "answered " + ", ".join(s.decode() for s in statuses)
        answer += f" after {first * 1000:.0f} ms"
    elif received:
        answer = f"{len(received)} bytes without a status line ({received[:20]!r}...)"
    else:
        answer = "no answer"
    if closed is not None:
        answer += f", closed after {closed * 1000:.0f} ms"
    else:
        answer += f", still open after {PROBE_SECONDS:.0f} s"
    results[key] = answer + note


def attacks() -> list[tuple[str, str]]:
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    payloads = {
        "TLS ClientHello on the plain port": client_hello(),
        "HTTP/0.9 line `GET /metrics`": b"GET /metrics\r\n",
        "70 KB request line": b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /healthz with a Content-Length body holding `GET /smuggled`":
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
            + smuggled,
    }
    results: dict[str, str] = {}
    threads = [threading.Thread(target=probe, args=(payload, results, name))
               for name, payload in payloads.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PROBE_SECONDS + 5)
    rows = []
    for name in payloads:
        result = results.get(name, "probe did not finish")
        if name.startswith("GET /healthz with"):
            count = len(re.findall(r"\b\d{3}\b", result.split(" after")[0]))
            result += (" -> body ran as a request" if count > 1
                       else " -> body not run as a request")
        rows.append((name, result))
    return rows


def slow_clients(count: int) -> tuple[list, list]:
    """count connections that have sent "G"; [socket, connected at, cut at, what came back]."""
    held = []
    for _ in range(count):
        try:
            conn = socket.create_connection(("127.0.0.1", PORT), timeout=2)
            conn.sendall(SLOW_PREFIX[:1])
        except OSError:
            break
        conn.settimeout(0)  # trickle() must never wait on one of them
        held.append([conn, time.monotonic(), None, b""])
    return held


def trickle(held: list, seconds: float, stop: threading.Event) -> None:
    """One more head byte a second on every slow connection still open; note when the server
    answers or closes one (the client is cut off)."""
    sent = 1
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set():
        byte = SLOW_PREFIX[sent:sent + 1] or b"a"
        sent += 1
        for entry in held:
            conn = entry[0]
            if entry[2] is not None:
                continue
            try:
                data = conn.recv(4096)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data is not None:
                entry[2], entry[3] = time.monotonic(), data
                continue
            try:
                conn.send(byte)
            except BlockingIOError:
                pass
            except OSError:
                entry[2] = time.monotonic()
        stop.wait(1.0)


def slow_attack(pid: int, count: int, seconds: float) -> str:
    held = slow_clients(count)
    stop = threading.Event()
    thread = threading.Thread(target=trickle, args=(held, seconds, stop))
    thread.start()
    latencies, failed = [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            latencies.append(fetch("/metrics", timeout=5))
        except OSError:
            failed += 1
        time.sleep(0.2)
    stop.set()
    thread.join(5)
    status = proc_status(pid)
    answered = sorted(e[2] - e[1] for e in held if e[2] is not None and e[3])
    dropped = sorted(e[2] - e[1] for e in held if e[2] is not None and not e[3])
    answers = sorted({e[3].split(b"\r\n")[0].decode("latin-1")[:30] for e in held if e[3]})
    for entry in held:
        entry[0].close()
    if latencies:
        scrapes = (f"{len(latencies)} scrapes answered, median "
                   f"{statistics.median(latencies) * 1000:.0f} ms, max "
                   f"{max(latencies) * 1000:.0f} ms")
    else:
        scrapes = "no scrape answered"
    if failed:
        scrapes += f", {failed} failed (5 s timeout or refused)"
    cutoff = []
    if answered:
        cutoff.append(f"{len(answered)} answered ({', '.join(answers)}), first after "
                      f"{answered[0]:.0f} s, median {statistics.median(answered):.0f} s")
    if dropped:
        cutoff.append(f"{len(dropped)} closed or reset without an answer, first after "
                      f"{dropped[0]:.0f} s, median {statistics.median(dropped):.0f} s")
    cutoff = (f"of {len(held)} slow clients: " + ", ".join(cutoff) if cutoff
              else f"none of {len(held)} slow clients cut off in {seconds:.0f} s")
    return f"{scrapes}; {cutoff}; threads {status['Threads']}"


def run_candidate(name: str, idle: int, slow: int, seconds: float,
                  extra: tuple[str, ...] = (), wrk_only: bool = False) -> list[tuple[str, str]]:
    server = subprocess.Popen([sys.executable, "-m", "bench.http_candidates", "--serve", name,
                               *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        for _ in range(100):
            try:
                fetch("/healthz", timeout=1)
                fetch("/metrics", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            return [("start", "did not answer within 10 s")]
        size = len(urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=5).read())
        if wrk_only:
            return [(f"wrk -c50 -t2 -d10s /metrics ({size} bytes)", wrk("/metrics"))]
        result, held = idle_connections(server.pid, idle)
        rows.append((f"{idle} idle keep-alive connections", result))
        for conn in held:
            conn.close()
        time.sleep(1)
        rows.append((f"wrk -c50 -t2 -d10s /metrics ({size} bytes)", wrk("/metrics")))
        rows.extend(attacks())
        time.sleep(1)
        rows.append((f"scrapes while {slow} clients trickle a head at 1 byte/s for "
                     f"{seconds:.0f} s", slow_attack(server.pid, slow, seconds)))
        if server.poll() is not None:
            rows.append(("server", f"exited with {server.returncode}"))
    finally:
        server.kill()
        server.wait()
        time.sleep(1)  # let the port go
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join(CANDIDATES),
                        help="comma-separated: " + ", ".join(CANDIDATES))
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--slow", type=int, default=1000)
    parser.add_argument("--trickle", type=float, default=30.0, help="seconds of slow clients")
    parser.add_argument("--serve", choices=CANDIDATES, help=argparse.SUPPRESS)
    parser.add_argument("--max-requests", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        SERVERS[args.serve](PORT, *([args.max_requests] if args.max_requests else []))
        return
    if "NETSTAT_BENCH_IN_NS" not in os.environ:
        env = {**os.environ, "NETSTAT_BENCH_IN_NS": "1"}
        os.execvpe("unshare", ["unshare", "-n", sys.executable, "-m", "bench.http_candidates",
                               *sys.argv[1:]], env)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    print("| candidate | measurement | result |")
    print("|---|---|---|")
    for name in args.only.split(","):
        for measurement, result in run_candidate(name, args.idle, args.slow, args.trickle):
            print(f"| {name} | {measurement} | {result} |", flush=True)
        if name == "ours":
            # 50 wrk connections against the default cap of 40 scrapes in flight give 503s:
            # the same server with the cap above wrk's concurrency, for its raw throughput
            for measurement, result in run_candidate(name, 0, 0, 0, ("--max-requests", "100"),
                                                     wrk_only=True):
                print(f"| ours, max_requests=100 | {measurement} | {result} |", flush=True)


if __name__ == "__main__":
    main()
