"""Real kernel state for tests: namespaces, veth pairs, socket mixes, spoofed SYNs, ss."""
from __future__ import annotations

import collections
import errno
import os
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field

from exporter.sources import netns as netns_mod

# ss's spellings -> netstat's
SS_STATES = {
    "ESTAB": "ESTABLISHED", "SYN-SENT": "SYN_SENT", "SYN-RECV": "SYN_RECV",
    "FIN-WAIT-1": "FIN_WAIT1", "FIN-WAIT-2": "FIN_WAIT2", "TIME-WAIT": "TIME_WAIT",
    "UNCONN": "CLOSE", "CLOSE-WAIT": "CLOSE_WAIT", "LAST-ACK": "LAST_ACK",
    "LISTEN": "LISTEN", "CLOSING": "CLOSING",
}


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Netns:
    name: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    @classmethod
    def create(cls, name: str) -> "Netns":
        sh("ip", "netns", "add", name)
        ns = cls(name)
        ns.ip("link", "set", "lo", "up")
        return ns

    def destroy(self) -> None:
        sh("ip", "netns", "del", self.name, check=False)

    def ip(self, *args: str) -> str:
        return sh("ip", "-n", self.name, *args)

    def exec(self, *args: str, check: bool = True) -> str:
        return sh("ip", "netns", "exec", self.name, *args, check=check)

    def sysctl(self, key: str, value: str) -> None:
        self.exec("sysctl", "-qw", f"{key}={value}")

    def entered(self):
        return netns_mod.entered(self.path)

    def ss_tcp(self) -> list[dict]:
        """`ss -tanH` rows: state (netstat spelling), recv_q, send_q, local, peer."""
        rows = []
        for line in self.exec("ss", "-tanH").splitlines():
            parts = line.split()
            rows.append({"state": SS_STATES[parts[0]], "recv_q": int(parts[1]),
                         "send_q": int(parts[2]), "local": parts[3], "peer": parts[4]})
        return rows

    def ss_state_counts(self) -> dict[str, int]:
        return dict(collections.Counter(r["state"] for r in self.ss_tcp()))


def veth_pair(a: Netns, b: Netns, addr_a: str, addr_b: str) -> None:
    """Join two namespaces: veth-a in a with addr_a, veth-b in b with addr_b (CIDR)."""
    sh("ip", "link", "add", "veth-a", "netns", a.name, "type", "veth",
       "peer", "name", "veth-b", "netns", b.name)
    for ns, dev, addr in ((a, "veth-a", addr_a), (b, "veth-b", addr_b)):
        ns.ip("addr", "add", addr, "dev", dev)
        ns.ip("link", "set", dev, "up")


def pin_neighbours(ns: Netns, dev: str, addresses: list[str]) -> None:
    """Give unowned addresses a permanent, made-up MAC. Without it ARP fails after ~3 s and
    the kernel aborts the SYN_SENT and SYN_RECV sockets aimed at them (ICMP host
    unreachable); with it the SYNs and SYN-ACKs leave and are never answered, so those
    sockets live for their full retry time (about a minute)."""
    for addr in sorted(set(addresses)):
        ns.ip("neigh", "replace", addr, "lladdr", "02:00:5e:00:53:01", "dev", dev, "nud", "permanent")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_syn(src: str, dst: str, sport: int, dport: int, seq: int) -> bytes:
    """An IPv4 packet holding a bare TCP SYN (the kernel fills the IP checksum and length)."""
    src_b, dst_b = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = src_b + dst_b + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, socket.IPPROTO_TCP, 0, src_b, dst_b)
    return ip + tcp


def send_spoofed_syns(sources: list[str], dst: str, dport: int) -> None:
    """Send one SYN from each (unowned) source address; run inside the sending namespace."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with raw:
        for i, src in enumerate(sources):
            raw.sendto(tcp_syn(src, dst, 40000 + i, dport, 1000 + i), (dst, 0))


def wait_for(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _read_until(stream, done, timeout: float, what: str):
    """Read `stream` line by line in a thread until done(line) says stop; wait at most
    `timeout` seconds for that. Lines go through the stream's own buffer: select() on the
    pipe would miss a line Python had already read into it along with the one before (seen
    in CI), and the caller may go on reading the same stream afterwards."""
    import threading
    result, finished = [], threading.Event()

    def scan():
        try:
            for line in iter(stream.readline, ""):
                result.append(line)
                if done(line):
                    return
            result.append(None)  # the stream ended first
        finally:
            finished.set()
    threading.Thread(target=scan, daemon=True).start()
    if not finished.wait(timeout):
        raise AssertionError(f"timed out waiting for {what}")
    if result and result[-1] is None:
        raise AssertionError(f"the process ended before {what}")
    return result


def wait_for_line(proc, text: str, timeout: float = 15.0) -> str:
    """Read the process's stderr until a line holding `text` (the process must be alive)."""
    return _read_until(proc.stderr, lambda line: text in line, timeout,
                       f"{text!r} on stderr")[-1]


def read_lines(proc, count: int, timeout: float = 15.0) -> list[str]:
    """The process's next `count` lines of stdout (it must be alive to print them)."""
    seen = [0]

    def enough(_line):
        seen[0] += 1
        return seen[0] == count
    return _read_until(proc.stdout, enough, timeout, f"{count} lines on stdout")


def read_blocks(proc, count: int, timeout: float = 15.0) -> str:
    """Wait until a `snapshot --watch` process has printed `count` blocks ("# <time>" lines)
    and the line after the last one; return what was read."""
    seen = [0]

    def enough(line):
        seen[0] += line.startswith("# ")
        return seen[0] >= count
    return "".join(_read_until(proc.stdout, enough, timeout, f"{count} --watch blocks"))


def listener(family: int, addr: str, port: int, backlog: int,
             dual_stack: bool = False) -> socket.socket:
    """dual_stack: an IPv6 listener that also takes IPv4 clients (as ::ffff:a.b.c.d)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if dual_stack:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((addr, port))
    sock.listen(backlog)
    return sock


def connect_pair(server: socket.socket, source: str | None = None
                 ) -> tuple[socket.socket, socket.socket]:
    """A connected (client, accepted server side) pair on a listener."""
    family = server.family
    client = socket.socket(family, socket.SOCK_STREAM)
    if source:
        client.bind((source, 0))
    client.connect(server.getsockname()[:2])
    accepted, _ = server.accept()
    return client, accepted


def fill_until_blocked(sender: socket.socket) -> int:
    """Write until the peer's receive window and our send buffer are full; bytes written."""
    sender.setblocking(False)
    chunk = b"x" * 65536
    sent = 0
    while True:
        try:
            sent += sender.send(chunk)
        except BlockingIOError:
            return sent


@dataclass
class SocketMix:
    """A known mix of TCP states in namespace `a`, with `b` as the far side of a veth."""

    expected: dict[tuple[str, str], int]  # (state, family) -> count
    keep: list = field(default_factory=list)  # sockets held open for as long as the test runs
    listen_queue: dict[int, tuple[int, int]] = field(default_factory=dict)  # port -> (queued, backlog)

    def close(self) -> None:
        for sock in self.keep:
            sock.close()

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = collections.Counter()
        for (state, _family), count in self.expected.items():
            out[state] += count
        return dict(out)


A_ADDR, B_ADDR = "198.18.0.1", "198.18.0.2"


def build_mix(a: Netns, b: Netns) -> SocketMix:
    """Every state we can hold still on a test machine, in namespace a.

    SYN_RECV: SYNs from addresses nobody owns (198.18.100.x, sent raw from b), so A's
    SYN-ACKs are never answered. SYN_SENT: connects to an on-link address nobody owns.
    FIN_WAIT1 / LAST_ACK: the FIN queues behind data the peer has no room for.
    """
    veth_pair(a, b, f"{A_ADDR}/15", f"{B_ADDR}/15")
    a.sysctl("net.ipv4.tcp_max_syn_backlog", "4096")
    spoofed = [f"198.18.100.{i}" for i in range(1, 8)]
    unanswered = ["198.18.9.9", "198.18.9.10"]
    pin_neighbours(a, "veth-a", spoofed + unanswered)
    mix = SocketMix(expected=collections.Counter())
    exp = mix.expected
    keep = mix.keep
    with a.entered():
        v4 = listener(socket.AF_INET, "127.0.0.1", 5000, 64)
        v6 = listener(socket.AF_INET6, "::1", 5001, 64)
        unaccepted = listener(socket.AF_INET, "127.0.0.1", 5002, 7)
        syn_target = listener(socket.AF_INET, A_ADDR, 6000, 1024)
        keep += [v4, v6, unaccepted, syn_target]
        exp["LISTEN", "ipv4"] += 3
        exp["LISTEN", "ipv6"] += 1
        for _ in range(3):
            keep += connect_pair(v4)
        exp["ESTABLISHED", "ipv4"] += 6
        for _ in range(2):
            keep += connect_pair(v6)
        exp["ESTABLISHED", "ipv6"] += 4
        for _ in range(2):  # connected, waiting in the accept queue of :5002
            client = socket.create_connection(("127.0.0.1", 5002))
            keep.append(client)
        exp["ESTABLISHED", "ipv4"] += 4
        mix.listen_queue[5002] = (2, 7)
        for _ in range(4):  # the peer closed (FIN_WAIT2), we did not (CLOSE_WAIT)
            client, server = connect_pair(v4)
            client.shutdown(socket.SHUT_WR)
            keep += [client, server]
        exp["FIN_WAIT2", "ipv4"] += 4
        exp["CLOSE_WAIT", "ipv4"] += 4
        for _ in range(5):  # the active closer ends in TIME_WAIT
            client, server = connect_pair(v4)
            client.close()
            server.recv(1)
            server.close()
        exp["TIME_WAIT", "ipv4"] += 5
        for i in range(2):
            pending = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            pending.setblocking(False)
            err = pending.connect_ex((unanswered[i], 80))
            assert err == errno.EINPROGRESS, os.strerror(err)
            keep.append(pending)
        exp["SYN_SENT", "ipv4"] += 2
        client, server = connect_pair(v4)  # FIN_WAIT1: our FIN waits behind unread data
        fill_until_blocked(client)
        client.shutdown(socket.SHUT_WR)
        keep += [client, server]
        exp["FIN_WAIT1", "ipv4"] += 1
        exp["ESTABLISHED", "ipv4"] += 1
        client, server = connect_pair(v4)  # LAST_ACK: CLOSE_WAIT, then a FIN behind data
        client.shutdown(socket.SHUT_WR)
        wait_for(lambda: server.recv(1) == b"", what="EOF")
        fill_until_blocked(server)
        server.shutdown(socket.SHUT_WR)
        keep += [client, server]
        exp["LAST_ACK", "ipv4"] += 1
        exp["FIN_WAIT2", "ipv4"] += 1
    with b.entered():
        send_spoofed_syns(spoofed, A_ADDR, 6000)
    exp["SYN_RECV", "ipv4"] += len(spoofed)
    mix.expected = dict(exp)
    wait_for(lambda: a.ss_state_counts() == mix.totals(), what="the socket mix to settle")
    # and the queues: the FIN_WAIT1 sender keeps filling its peer's receive buffer for a while
    # (longer on a loaded machine), so wait until five readings in a row are the same
    seen: list = []

    def queues_settled() -> bool:
        seen.append(sorted((r["state"], r["recv_q"], r["send_q"], r["local"], r["peer"])
                           for r in a.ss_tcp()))
        return len(seen) >= 5 and all(s == seen[-1] for s in seen[-5:])
    wait_for(queues_settled, timeout=20, what="the socket queues to settle")
    return mix
