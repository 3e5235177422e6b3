"""The HTTP front door: one asyncio event loop in one thread, HTTP/1.1 parsed and framed by h11.

A connection costs a few kilobytes and no thread, whatever the client does. Every request has
a deadline for its whole head (slow clients are cut off), idle keep-alive connections are
closed after a while and evicted first when the connection cap is reached, bodies are framed
and discarded (never run as a request), and in-flight scrapes are capped (503 beyond
--web.max-requests, as node_exporter). TLS, client certificates, basic auth, headers and a
rate limit come from --web.config.file (webconfig.py). Rendering and bcrypt run in one worker
thread each, so neither ever stalls the loop.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import re
import resource
import socket
import ssl
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus

import h11

from .pages import Pages, Reply
from .webconfig import Authenticator, WebConfig, Watcher

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 8 * 1024  # beyond: 414
MAX_HEAD = 16 * 1024  # request line and headers together; beyond: 431
MAX_BODY = 64 * 1024  # a GET has no business sending more; beyond: 413
ACCEPT_BURST = 16  # connections accepted per wake-up before other work gets a turn
# Bytes of /metrics replies handed to clients that have not read them yet, at most: beyond,
# scrapes get 503. A scrape's slot (--web.max-requests) is its rendering; a client that never
# reads holds only memory, and this bounds it.
WRITE_BUDGET = 64 << 20
# A reply still not read after this long no longer protects its connection from eviction.
STALLED_WRITE = 5.0
BACKLOG = 512  # a burst of scrapers must not overflow the accept queue
# Descriptors kept free for the sources (netlink sockets, /proc files, namespaces).
RESERVED_DESCRIPTORS = 64
# method SP request-target SP HTTP-version CRLF (RFC 9112 3); anything else is refused at once
REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^\s]+ HTTP/1\.[01]\r?\n")
# A first byte that cannot begin a method: a TLS ClientHello (0x16), binary garbage.
METHOD_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# Errors that mean the peer went away or misbehaved: one debug line, never a traceback.
PEER_ERRORS = (ConnectionError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError,
               h11.ProtocolError, OSError)


@dataclass(frozen=True)
class Limits:
    max_connections: int = 1000
    max_requests: int = 40  # in-flight scrapes of the metrics path
    header_timeout: float = 10.0  # whole request head (and body), from its first byte
    idle_timeout: float = 120.0  # keep-alive wait for the next request
    write_timeout: float = 30.0


class _Connection:
    __slots__ = ("task", "writer", "busy", "since", "writing")

    def __init__(self, task, writer, now):
        self.task, self.writer, self.busy, self.since = task, writer, False, now
        self.writing: float | None = None  # when the reply being written began


class _Refused(Exception):
    """A request answered with an error status and the connection then closed."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status = status


class _TokenBucket:
    """rate_limit from the web config: one request per interval, bursts of `burst`."""

    def __init__(self, interval: float, burst: int, clock):
        self.interval, self.burst, self.clock = interval, max(1, burst), clock
        self.tokens, self.updated = float(self.burst), clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) / self.interval)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def _bind(host: str, port: int) -> socket.socket:
    """":port" (host "") binds every address, IPv4 included, or IPv4 only where IPv6 is off."""
    if host == "":
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
            host = "0.0.0.0"
        else:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("::", port))
                return sock
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    raise
                host = "0.0.0.0"
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def connection_cap(wanted: int) -> int:
    """The connection cap that fits the open-file limit, raising the soft limit to the hard
    one if needed (as Go programs do) and keeping descriptors free for the sources."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + 2 * RESERVED_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    fitting = max(1, soft - 2 * RESERVED_DESCRIPTORS)
    if fitting < wanted:
        log.warning("open-file limit %d allows %d connections, not --web.max-connections=%d",
                    soft, fitting, wanted)
    return min(wanted, fitting)


class HttpServer:
    def __init__(self, pages: Pages, host: str, port: int, limits: Limits = Limits(),
                 web: Watcher | None = None, clock=time.monotonic):
        self.pages = pages
        self.limits = limits
        self.web = web
        self.max_connections = connection_cap(limits.max_connections)
        self._sock = _bind(host, port)  # raises OSError (address in use) before any thread
        # listening from here on, so the first sample (taken before start()) counts it
        self._sock.listen(BACKLOG)
        self.server_address = self._sock.getsockname()[:2]
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_error)
        self._render = ThreadPoolExecutor(1, thread_name_prefix="render")
        self._auth = Authenticator(ThreadPoolExecutor(1, thread_name_prefix="bcrypt"))
        self._connections: dict[asyncio.Task, _Connection] = {}
        self._scrapes = 0
        self._bucket: tuple | None = None  # (rate_limit, _TokenBucket)
        self._clock = clock
        self._stopped: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._last_loop_error = 0.0
        self._last_bug = float("-inf")
        self._buffered = 0  # bytes of /metrics replies being written (WRITE_BUDGET)

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="http",
                                        daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            self._sock.close()
            return
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main(ready))
        finally:
            self._loop.close()

    async def _main(self, ready: threading.Event) -> None:
        self._stopped = asyncio.Event()
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock, self._accept_some)
        ready.set()
        await self._stopped.wait()
        self._loop.remove_reader(self._sock)
        self._sock.close()
        for connection in list(self._connections.values()):
            connection.task.cancel()
        await asyncio.gather(*(c.task for c in self._connections.values()),
                             return_exceptions=True)

    def _accept_some(self) -> None:
        # Our own accept loop, not asyncio's: that one takes up to a whole backlog of
        # connections per wake-up before any cap can look at them. Here each accepted
        # connection is under the cap at once: an idle one gives way, or the new one is
        # closed on the spot (its descriptor never outlives this call).
        for _ in range(ACCEPT_BURST):
            try:
                sock, _address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: pause a second, say so
                self._loop_error(self._loop, {"message": "accept failed", "exception": exc})
                self._loop.remove_reader(self._sock)
                self._loop.call_later(1.0, self._loop.add_reader, self._sock,
                                      self._accept_some)
                return
            if len(self._connections) >= self.max_connections and not self._evict_idle():
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # every connection is busy with a request: refuse this one
                continue
            sock.setblocking(False)
            # asyncio sets TCP_NODELAY only on sockets made with proto=IPPROTO_TCP; without
            # it every small reply waits for the client's delayed ACK (40 ms each)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._connection(sock))
            self._connections[task] = _Connection(task, None, self._loop.time())

    def _loop_error(self, loop, context) -> None:
        # at most one line a minute for trouble the loop itself meets (EMFILE on accept)
        now = self._clock()
        if now - self._last_loop_error >= 60:
            self._last_loop_error = now
            log.warning("http: %s: %s", context.get("message"), context.get("exception"))

    # -- connections --------------------------------------------------------------------------
    async def _connection(self, sock: socket.socket) -> None:
        task = asyncio.current_task()
        connection = self._connections[task]
        writer = None
        try:
            web = self.web.refresh() if self.web is not None else WebConfig()
            reader, writer = await self._streams(sock, web)
            connection.writer = writer
            if web.allowed_sans is not None and not _san_allowed(
                    writer.get_extra_info("peercert"), web.allowed_sans):
                log.debug("http: client certificate of %s has no allowed SAN", _peer(sock))
                return
            await self._serve(reader, writer, connection, web)
        except PEER_ERRORS as exc:
            log.debug("http: connection from %s ended: %r", _peer(sock), exc)
        except Exception:  # a bug: say so with its traceback, at most once a minute
            now = self._clock()
            if now - self._last_bug >= 60:
                self._last_bug = now
                log.exception("http: unexpected error serving %s", _peer(sock))
        finally:
            self._connections.pop(task, None)  # gone already if evicted
            if writer is not None:
                writer.transport.abort()
            else:
                sock.close()

    async def _streams(self, sock: socket.socket, web: WebConfig):
        """Reader and writer over the accepted socket, TLS (server side, with the context
        current at accept time, so a rotated certificate serves from the next connection)
        completed within the header deadline."""
        made = self._loop.create_future()
        reader = asyncio.StreamReader(limit=MAX_HEAD)
        protocol = asyncio.StreamReaderProtocol(reader, lambda _r, w: made.set_result(w))
        await self._loop.connect_accepted_socket(
            lambda: protocol, sock, ssl=web.tls,
            ssl_handshake_timeout=self.limits.header_timeout if web.tls else None)
        return reader, await made

    def _evict_idle(self) -> bool:
        """Close the connection that has waited longest without a request in progress: idle
        keep-alives and slow heads give way to new clients instead of locking them out."""
        now = self._loop.time()
        waiting = [c for c in self._connections.values()
                   if not c.busy or (c.writing is not None and now - c.writing > STALLED_WRITE)]
        if not waiting:
            return False
        victim = min(waiting, key=lambda c: c.since)
        if victim.writer is not None:
            victim.writer.transport.abort()
        victim.task.cancel()
        del self._connections[victim.task]
        return True

    async def _serve(self, reader, writer, connection: _Connection, web: WebConfig) -> None:
        protocol = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            connection.busy, connection.since = False, self._loop.time()
            try:
                request = await self._read_request(reader, writer, protocol, connection)
            except _Refused as refused:
                log.debug("http: %s from %s: %s", refused.status, _peer(writer), refused)
                await self._send_raw_error(writer, refused.status)
                return
            if request is None:
                return
            connection.busy = True
            # users, headers and the rate limit as they are now, even on a connection opened
            # before a change (a revoked user must not keep scraping over keep-alive)
            if self.web is not None:
                web = self.web.refresh()
            reply, scrape = await self._answer(request, web)
            held = len(reply.body) if scrape else 0
            if held and self._buffered + held > WRITE_BUDGET:
                reply, held = Reply(503, b"too many scrapes not yet read by their clients\n",
                                    (("Retry-After", "1"),)), 0
            self._buffered += held
            connection.writing = self._loop.time()
            try:
                await self._send(writer, protocol, request, reply, web)
            finally:
                self._buffered -= held
                connection.writing = None
            if protocol.our_state is h11.MUST_CLOSE or protocol.their_state is h11.MUST_CLOSE:
                return
            protocol.start_next_cycle()

    async def _read_request(self, reader, writer, protocol: h11.Connection, connection):
        """The next request, its body read and discarded; None when the client is done.
        Raises _Refused for what must be answered with an error and a close."""
        deadline = None
        # the start of the request, until its first line is checked; a pipelining client's
        # next request may already wait in h11's buffer
        head = bytes(protocol.trailing_data[0])
        if head:
            deadline = self._loop.time() + self.limits.header_timeout
            _check_request_line(head)
        request, body, received = None, 0, len(head)
        while True:
            try:
                event = protocol.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431 and b"\n" not in head:
                    raise _Refused(414, "request line too long") from None
                raise _Refused(exc.error_status_hint, str(exc)) from None
            if event is h11.NEED_DATA:
                timeout = (self.limits.idle_timeout if deadline is None
                           else deadline - self._loop.time())
                try:
                    async with asyncio.timeout(max(0.0, timeout)):
                        data = await reader.read(65536)
                except TimeoutError:
                    if deadline is None:
                        return None  # idle keep-alive ran out: close quietly
                    raise _Refused(408, "request not complete in time") from None
                if deadline is None and data:
                    deadline = self._loop.time() + self.limits.header_timeout
                    connection.since = self._loop.time()
                if request is None and b"\n" not in head:
                    head = (head + data)[:MAX_REQUEST_LINE + 2]
                    _check_request_line(head)
                # h11 bounds only a head that is still incomplete, and a body by its data
                # alone: all bytes of a request (chunk extensions too) are bounded here
                received += len(data)
                if received > MAX_HEAD + 2 * MAX_BODY:
                    raise _Refused(413 if request is not None else 431, "request too large")
                protocol.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
                if sum(len(n) + len(v) + 4 for n, v in event.headers) > MAX_HEAD:
                    raise _Refused(431, "request headers too large")
                fields = dict(event.headers)
                if b"transfer-encoding" in fields and b"content-length" in fields:
                    # two framings: which one a proxy in front used is anyone's guess
                    raise _Refused(400, "both Transfer-Encoding and Content-Length")
                length = fields.get(b"content-length")
                if length is not None and int(length) > MAX_BODY:
                    raise _Refused(413, "request body too large")
                if protocol.they_are_waiting_for_100_continue:  # Expect: 100-continue
                    writer.write(protocol.send(h11.InformationalResponse(status_code=100,
                                                                         headers=[])))
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > MAX_BODY:
                    raise _Refused(413, "request body too large")
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _answer(self, request: h11.Request, web: WebConfig) -> tuple[Reply, int]:
        """The reply, and 1 when it is a scrape (its rendering counted against
        --web.max-requests, its writing against WRITE_BUDGET)."""
        target = request.target
        if target.startswith((b"http://", b"https://")):  # absolute-form (RFC 9112 3.2.2)
            target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
        path, _, query = target.partition(b"?")
        headers = {name: value for name, value in request.headers}  # h11 lower-cases names
        if web.rate_limit is not None:
            if self._bucket is None or self._bucket[0] != web.rate_limit:
                self._bucket = (web.rate_limit, _TokenBucket(*web.rate_limit, self._clock))
            if not self._bucket[1].take():
                return Reply(429, b"too many requests\n"), 0
        authorized = True
        if web.users:
            authorized = await self._auth.allowed(headers.get(b"authorization"), web.users)
            if authorized is None:
                return Reply(503, b"too many password checks at once; try again\n",
                             (("Retry-After", "1"),)), 0
        page = self.pages.route(path)
        if page == "health" and request.method in (b"GET", b"HEAD"):
            return self.pages.health(detailed=authorized), 0
        if not authorized:
            return Reply(401, b"unauthorized\n",
                         (("WWW-Authenticate", 'Basic realm="netstat-exporter"'),)), 0
        if request.method not in (b"GET", b"HEAD"):
            return Reply(405, b"only GET and HEAD\n", (("Allow", "GET, HEAD"),)), 0
        if page is None:
            return Reply(404, b"not found\n"), 0
        if page == "landing":
            return self.pages.landing(), 0
        if self._scrapes >= self.limits.max_requests:
            return Reply(503, f"more than {self.limits.max_requests} scrapes in flight; "
                              f"try again\n".encode()), 0
        self._scrapes += 1
        try:
            reply = await self._loop.run_in_executor(
                self._render, self.pages.metrics, query,
                headers.get(b"accept", b"").decode("latin-1"),
                headers.get(b"accept-encoding", b"").decode("latin-1"))
        finally:
            self._scrapes -= 1
        return reply, 1

    async def _send(self, writer, protocol: h11.Connection, request, reply: Reply,
                    web: WebConfig) -> None:
        headers = [("Content-Type", reply.content_type),
                   ("Content-Length", str(len(reply.body))), *reply.headers, *web.headers]
        head = protocol.send(h11.Response(status_code=reply.status, headers=headers,
                                          reason=HTTPStatus(reply.status).phrase))
        body = protocol.send(h11.Data(data=reply.body)) if request.method != b"HEAD" else b""
        writer.write(head + body + protocol.send(h11.EndOfMessage()))
        async with asyncio.timeout(self.limits.write_timeout):
            await writer.drain()

    async def _send_raw_error(self, writer, status: int) -> None:
        # Written by hand: after a protocol error h11 has no request to answer.
        phrase = HTTPStatus(status).phrase
        body = f"{status} {phrase}\n".encode()
        writer.write(f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8"
                     f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                     + body)
        try:
            async with asyncio.timeout(1.0):
                await writer.drain()
        except PEER_ERRORS:
            pass


def _check_request_line(head: bytes) -> None:
    """Refuse at once what cannot become an HTTP/1.x request (TLS on the plain port, binary
    garbage, HTTP/0.9), instead of waiting for a head that will never come."""
    if head and head[0] not in METHOD_START:
        raise _Refused(400, "not an HTTP request")
    line_end = head.find(b"\n")
    if line_end < 0:
        if len(head) > MAX_REQUEST_LINE:
            raise _Refused(414, "request line too long")
        return
    if not REQUEST_LINE.fullmatch(head[:line_end + 1]):
        raise _Refused(400, "malformed request line")


def _san_allowed(certificate: dict | None, allowed: frozenset[str]) -> bool:
    """client_allowed_sans: one of the certificate's DNS, IP, e-mail or URI names must match.
    IP addresses compare as addresses: Python writes ::1 as 0:0:0:0:0:0:0:1, users as Go does."""
    if not certificate:
        return False
    wanted = {_ip_or_text(value) for value in allowed}
    return any(_ip_or_text(value) in wanted
               for _kind, value in certificate.get("subjectAltName", ()))


def _ip_or_text(value: str):
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return value


def _peer(endpoint) -> str:
    """A writer's or a socket's peer, "address:port"."""
    try:
        peer = (endpoint.get_extra_info("peername") if hasattr(endpoint, "get_extra_info")
                else endpoint.getpeername())
    except OSError:
        peer = None
    return f"{peer[0]}:{peer[1]}" if peer else "?"
