"""netstat -p: sockets per owning program, from /proc/PID/fd."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.aggregate import NO_PROGRAM, UNKNOWN_PROGRAM, TcpAccumulator
from exporter.views import build_registry
from exporter.sampler import Sampler, SocketReader
from exporter.sources import processes
from exporter.sources.table import NETSTAT_STATES, SocketTable
from tests.kernel import wait_for


def fake_proc(root: Path, table: dict[int, tuple[str, list[str]]]) -> Path:
    for pid, (comm, links) in table.items():
        (root / str(pid) / "fd").mkdir(parents=True)
        (root / str(pid) / "comm").write_text(comm + "\n")
        for fd, target in enumerate(links):
            os.symlink(target, root / str(pid) / "fd" / str(fd))
    (root / "net").mkdir()  # not a pid: ignored
    return root


def test_parse_socket_link():
    assert processes.parse_socket_link("socket:[4242]") == 4242
    assert processes.parse_socket_link("pipe:[7]") is None
    assert processes.parse_socket_link("/dev/null") is None


def test_owners_from_a_fake_proc(tmp_path):
    root = fake_proc(tmp_path, {
        10: ("nginx", ["socket:[100]", "/var/log/x", "socket:[101]"]),
        11: ("nginx", ["socket:[102]"]),
        12: ("forked-child", ["socket:[100]"]),  # shared with pid 10: the lower pid wins
        13: ("other", ["socket:[103]"]),
    })
    (root / "14").mkdir()  # a process that exited between listing and reading
    owners = processes.read(str(root))
    assert owners.inodes.tolist() == [100, 101, 102, 103]
    assert [owners.programs[i] for i in owners.program] == ["nginx", "nginx", "nginx", "other"]
    assert (owners.processes, owners.skipped) == (4, 1)
    states = [1, 1, 8, 6, 1, 10]
    inodes = [100, 102, 103, 0, 999, 101]  # 0: no owner (TIME_WAIT); 999: owner not visible
    table = SocketTable.from_columns({"family": [2] * 6, "state": states, "inode": inodes,
                                      "local_addr": [[0] * 4] * 6, "remote_addr": [[0] * 4] * 6,
                                      "local_port": [1] * 6, "remote_port": [1] * 6,
                                      "recv_q": [0] * 6, "send_q": [0] * 6, "uid": [0] * 6})
    acc = TcpAccumulator(owners=owners, program_top=1)
    acc.add(table)
    programs = acc.result().programs.connections
    assert programs[("ESTABLISHED", "nginx")] == 2
    assert programs[("ESTABLISHED", UNKNOWN_PROGRAM)] == 1
    assert programs[("CLOSE_WAIT", "other")] == 1  # "other" the bucket: the top is nginx
    assert ("CLOSE_WAIT", "other (a program)") not in programs
    assert programs[("TIME_WAIT", NO_PROGRAM)] == 1
    assert programs[("LISTEN", "nginx")] == 1
    for state in NETSTAT_STATES.values():
        assert sum(v for (s, _p), v in programs.items() if s == state) == \
            sum(1 for s in states if NETSTAT_STATES.get(s) == state)


def test_a_program_name_is_read_byte_for_byte(tmp_path):
    """comm is any bytes but NUL, and the kernel adds one "\n": a "\r" or "\n" of the name
    stays (read with universal newlines, "web\rnginx" became "web\nnginx" and "sshd\r"
    merged with "sshd"; found in review)."""
    names = ["web\rnginx", "sshd\r", "sshd", "two\n", "caf\udcc3"]
    root = fake_proc(tmp_path, {10 + i: (name, [f"socket:[{100 + i}]"])
                                for i, name in enumerate(names[:-1])})
    (root / "14" / "fd").mkdir(parents=True)
    (root / "14" / "comm").write_bytes(b"caf\xc3\n")  # not UTF-8
    os.symlink("socket:[104]", root / "14" / "fd" / "0")
    owners = processes.read(str(root))
    assert [owners.programs[i] for i in owners.program] == names


def test_reserved_names_do_not_merge_with_buckets_or_each_other(tmp_path):
    # every name a process may take that looks like a bucket or a renamed bucket (comm is
    # at most 15 bytes: "other (program)" and "none (a progra" are legal ones)
    names = ["other", "other (program)", "none", "unknown", "none (a progra", "other (a progr"]
    root = fake_proc(tmp_path, {pid: (name, [f"socket:[{pid}]"])
                                for pid, name in enumerate(names, start=1)})
    owners = processes.read(str(root))
    n = len(names)
    table = SocketTable.from_columns({"family": [2] * n, "state": [1] * n,
                                      "inode": list(range(1, n + 1)),
                                      "local_addr": [[0] * 4] * n, "remote_addr": [[0] * 4] * n,
                                      "local_port": [1] * n, "remote_port": [1] * n,
                                      "recv_q": [0] * n, "send_q": [0] * n, "uid": [0] * n})
    acc = TcpAccumulator(owners=owners, program_top=20)
    acc.add(table)
    programs = acc.result().programs.connections
    established = {p: v for (s, p), v in programs.items() if s == "ESTABLISHED" and v}
    assert len(established) == n and sum(established.values()) == n  # n labels, one each
    assert established.keys() >= {"other (a program)", "none (a program)",
                                  "unknown (a program)", "other (program)"}
    assert not {"other", "none", "unknown"} & established.keys()  # the buckets stay empty


LEAKER = """
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, b"cw-leaker", 0, 0, 0)  # PR_SET_NAME: our comm
server = socket.socket(); server.bind(("127.0.0.1", 7300)); server.listen(16)
print("ready", flush=True)
held = [server.accept()[0] for _ in range(3)]
print("accepted", flush=True)
time.sleep(60)
"""


@pytest.mark.netns
def test_close_wait_is_attributed_to_the_leaking_program(netns):
    leaker = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-c", LEAKER],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert leaker.stdout.readline().strip() == "ready"
        with netns.entered():
            clients = [socket.create_connection(("127.0.0.1", 7300)) for _ in range(3)]
        assert leaker.stdout.readline().strip() == "accepted"
        for client in clients:
            client.close()  # the leaker never closes its side: CLOSE_WAIT there
        wait_for(lambda: netns.ss_state_counts() == {"LISTEN": 1, "CLOSE_WAIT": 3, "FIN_WAIT2": 3},
                 what="CLOSE_WAIT here and FIN_WAIT2 on the closed side")
        with netns.entered():
            sampler = Sampler(SocketReader("netlink"), programs=20,
                              collectors=["processes", "tcp"])
            snapshot = sampler.sample_once()
        get = build_registry(lambda: snapshot, "t").get_sample_value
        assert get("netstat_process_connections", {"program": "cw-leaker", "state": "CLOSE_WAIT"}) == 3
        assert get("netstat_process_connections", {"program": "cw-leaker", "state": "LISTEN"}) == 1
        # our closed clients are orphans finishing in FIN_WAIT2: nobody owns them
        assert get("netstat_process_connections", {"program": NO_PROGRAM, "state": "FIN_WAIT2"}) == 3
        for state in NETSTAT_STATES.values():
            per_program = sum(v for (s, _p), v in
                              snapshot.results["tcp"].data.programs.connections.items() if s == state)
            assert per_program == snapshot.results["tcp"].data.state_totals()[state], state
        done = subprocess.run(["ip", "netns", "exec", netns.name, sys.executable, "-m", "exporter",
                               "snapshot", "-p"], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert "      3 cw-leaker CLOSE_WAIT\n" in done.stdout
        assert "      3 none FIN_WAIT2\n" in done.stdout
        assert "      1 cw-leaker LISTEN\n" in done.stdout
    finally:
        leaker.kill()
        leaker.wait()
