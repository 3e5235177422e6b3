"""HTTP: /metrics (from the latest snapshot; never waits on the kernel), / and /healthz."""
from __future__ import annotations

import errno
import html
import logging
import socket
import socketserver
import threading
import time
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

log = logging.getLogger(__name__)

# /healthz turns 503 when the snapshot is older than this many sampling intervals.
STALE_INTERVALS = 3


def make_app(registry, get_snapshot, telemetry_path: str = "/metrics", version: str = "",
             clock=time.monotonic):
    # client_python's app negotiates OpenMetrics (Accept) and gzip (Accept-Encoding).
    metrics_app = make_wsgi_app(registry)
    landing = _landing_page(telemetry_path, version).encode()

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if method == "HEAD":  # the GET answer's status and headers, without its body
            app({**environ, "REQUEST_METHOD": "GET"}, start_response)
            return []
        if method != "GET":
            return _reply(start_response, "405 Method Not Allowed", b"only GET and HEAD\n",
                          [("Allow", "GET, HEAD")])
        if path == telemetry_path:
            return metrics_app(environ, start_response)
        if path == "/":
            return _reply(start_response, "200 OK", landing, content_type="text/html; charset=utf-8")
        if path == "/healthz":
            return _health(start_response, get_snapshot(), clock())
        return _reply(start_response, "404 Not Found", b"not found\n")

    return app


def _health(start_response, snapshot, now: float):
    if snapshot is None:
        return _reply(start_response, "503 Service Unavailable", b"no sample yet\n")
    age = now - snapshot.monotonic
    limit = STALE_INTERVALS * snapshot.effective_interval
    if age > limit:
        body = f"stale: last sample {age:.1f}s ago (limit {limit:.1f}s)\n".encode()
        return _reply(start_response, "503 Service Unavailable", body)
    failed = sorted(name for name, r in snapshot.results.items() if not r.ok)
    body = f"ok: last sample {age:.1f}s ago" + (f"; failing: {', '.join(failed)}" if failed else "")
    return _reply(start_response, "200 OK", (body + "\n").encode())


def _reply(start_response, status, body: bytes, headers=(), content_type="text/plain; charset=utf-8"):
    start_response(status, [("Content-Type", content_type),
                            ("Content-Length", str(len(body))), *headers])
    return [body]


def _landing_page(telemetry_path: str, version: str) -> str:
    path = html.escape(telemetry_path)
    return (f"<!doctype html><html><head><title>netstat-exporter</title></head><body>"
            f"<h1>netstat-exporter</h1><p>Version {html.escape(version)}</p><ul>"
            f'<li><a href="{path}">{path}</a>: metrics</li>'
            f'<li><a href="/healthz">/healthz</a>: 200 while the sample is fresh</li>'
            f"</ul></body></html>\n")


class _KeepAliveServerHandler(ServerHandler):
    http_version = "1.1"


class _QuietHandler(WSGIRequestHandler):
    """HTTP/1.1 with keep-alive. wsgiref answers one request per connection and closes
    first, which leaves a TIME_WAIT socket on the monitored host for every scrape; Prometheus
    keeps its connections open when the server lets it."""

    protocol_version = "HTTP/1.1"
    timeout = 120  # seconds an idle connection is kept (longer than usual scrape intervals)

    def handle(self):
        self.close_connection = True
        self._handle_one()
        while not self.close_connection:
            self._handle_one()

    def _handle_one(self):
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except TimeoutError:
            self.close_connection = True
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        if len(self.raw_requestline) > 65536:
            self.send_error(414)
            self.close_connection = True
            return
        if not self.parse_request():  # it has answered the error
            return
        if self.command != "GET":
            # wsgiref sends a body even for HEAD; closing keeps the framing honest
            self.close_connection = True
        handler = _KeepAliveServerHandler(self.rfile, self.wfile, self.get_stderr(),
                                          self.get_environ(), multithread=True)
        handler.request_handler = self
        handler.run(self.server.get_app())
        if handler.headers and handler.headers.get("Connection", "").lower() == "close":
            self.close_connection = True

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        log.debug("%s - %s", self.address_string(), format % args)


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 overflows under a handful of concurrent scrapers
    # (the kernel then drops their handshakes and they wait 1-3 s to retry).
    request_queue_size = 128


class _DualStackWSGIServer(_ThreadingWSGIServer):
    address_family = socket.AF_INET6

    def server_bind(self):
        # ":port" means every address, IPv4 included.
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _IPv6WSGIServer(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


def serve(app, host: str, port: int) -> WSGIServer:
    """Bind (raising OSError when the address is taken) and return the server; the caller
    runs serve_forever() in a thread and shutdown() to stop."""
    if host == "":
        try:
            return make_server("::", port, app, _DualStackWSGIServer, _QuietHandler)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):  # IPv6 disabled
                raise
            host = "0.0.0.0"
    server_class = _IPv6WSGIServer if ":" in host else _ThreadingWSGIServer
    return make_server(host, port, app, server_class, _QuietHandler)


def run_in_thread(server: WSGIServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return thread
