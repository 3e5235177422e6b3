"""Interfaces (/proc/net/dev) and the conntrack table."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.views import build_registry
from exporter.collectors.network import InterfacesCollector
from exporter.sampler import Sampler, SocketReader
from exporter.sources import interfaces

PROC = Path(__file__).parent / "fixtures" / "kernels" / "linux-6.18" / "proc"


def sample(procfs):
    sampler = Sampler(SocketReader("proc", procfs=str(procfs)),
                      collectors=["interfaces", "conntrack"])
    snapshot = sampler.sample_once()
    return snapshot, build_registry(lambda: snapshot, "t").get_sample_value


def test_interfaces_and_conntrack_from_fixture():
    snapshot, get = sample(PROC)
    assert get("netstat_interface_receive_bytes_total", {"device": "lo"}) == 10388
    assert get("netstat_interface_transmit_drops_total", {"device": "veth-a"}) == 2
    assert get("netstat_interface_devices") == 2
    assert get("netstat_conntrack_entries") == 17
    assert get("netstat_conntrack_entries_limit") == 262144


def test_conntrack_not_loaded_is_absence_not_failure(tmp_path):
    root = tmp_path / "proc"
    shutil.copytree(PROC, root)
    shutil.rmtree(root / "sys" / "net" / "netfilter")
    snapshot, get = sample(root)
    assert snapshot.results["conntrack"].ok
    assert get("netstat_conntrack_entries") is None
    assert get("netstat_exporter_collector_success", {"collector": "conntrack"}) == 1


@pytest.mark.parametrize("text, message", [
    ("Inter-|\n face |\n lo: 1 2 3\n", "expected 'device: 16 counters'"),
    ("garbage\n", "not a /proc/net/dev header"),
    ("Inter-|\n face |\n lo: " + "x " * 16 + "\n", "must be integers"),
    ("Inter-|\n face |\n lo: " + "1 " * 15 + "9" * 400 + "\n", "transmit_compressed: not a decimal"),
    ("Inter-|\n face |\n lo: " + "1 " * 16 + "\n lo: " + "2 " * 16 + "\n", "'lo' appears twice"),
])
def test_malformed_dev(tmp_path, text, message):
    root = tmp_path / "proc"
    shutil.copytree(PROC, root)
    (root / "net" / "dev").write_text(text)
    snapshot, get = sample(root)
    assert not snapshot.results["interfaces"].ok and message in snapshot.results["interfaces"].error
    assert get("netstat_exporter_collector_success", {"collector": "interfaces"}) == 0
    assert get("netstat_conntrack_entries") == 17


@pytest.mark.parametrize("text", ["many\n", "9" * 400 + "\n", "-3\n"])
def test_bad_conntrack_value_fails(tmp_path, text):
    root = tmp_path / "proc"
    shutil.copytree(PROC, root)
    path = root / "sys" / "net" / "netfilter" / "nf_conntrack_count"
    path.write_text(text)
    snapshot, get = sample(root)
    assert not snapshot.results["conntrack"].ok and str(path) in snapshot.results["conntrack"].error
    assert get("netstat_interface_devices") == 2  # the others still report and render


def test_interface_cap():
    lines = ["Inter-|\n", " face |\n"] + [f"d{i:03d}: " + "1 " * 16 + "\n" for i in range(5)]
    devices = interfaces.InterfaceTable(interfaces.parse(lines), {})
    families = list(InterfacesCollector(limit=3).collect(None, devices))
    assert families[0].samples[0].value == 5
    assert {s.labels["device"] for s in families[1].samples} == {"d000", "d001", "d002"}


@pytest.mark.netns
def test_mtu_and_flags_match_netstat_i(netns_factory):
    import subprocess
    import sys
    a, b = netns_factory(), netns_factory()
    subprocess.run(["ip", "link", "add", "va", "netns", a.name, "mtu", "1280", "type", "veth",
                    "peer", "name", "vb", "netns", b.name], check=True)
    a.exec("ip", "link", "set", "va", "up")
    a.exec("ip", "link", "set", "va", "promisc", "on")
    a.exec("ip", "link", "add", "dummy-free", "type", "veth", "peer", "name", "down0")
    theirs = {}
    for line in a.exec("netstat", "-ia").splitlines()[2:]:
        fields = line.split()
        theirs[fields[0]] = (fields[1], fields[-1])
    done = subprocess.run(["ip", "netns", "exec", a.name, sys.executable, "-m", "exporter",
                           "snapshot", "-i"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    ours = {f[0]: (f[1], f[-1]) for f in (line.split() for line in done.stdout.splitlines()[1:])}
    assert ours == theirs and theirs["va"] == ("1280", "BMPU")  # up, no carrier: not R
    with a.entered():
        snapshot = Sampler(SocketReader("netlink"), collectors=["interfaces"]).sample_once()
    get = build_registry(lambda: snapshot, "t").get_sample_value
    assert get("netstat_interface_mtu_bytes", {"device": "va"}) == 1280
    assert get("netstat_interface_up", {"device": "va"}) == 1
    assert get("netstat_interface_running", {"device": "lo"}) == 1
    assert get("netstat_interface_up", {"device": "down0"}) == 0


@pytest.mark.netns
def test_interface_names_with_any_byte_are_read_and_rendered(netns):
    """Linux allows any byte in a device name but / : and whitespace."""
    import shutil as sh
    import subprocess
    from prometheus_client import generate_latest
    subprocess.run(["ip", "netns", "exec", netns.name, "ip", "link", "add", b"v\xe91", "type",
                    "veth", "peer", "name", "vé0"], check=True)
    with netns.entered():
        snapshot = Sampler(SocketReader("netlink"),
                           collectors=["interfaces", "routes", "multicast"]).sample_once()
    assert all(r.ok for r in snapshot.results.values()), snapshot.results
    registry = build_registry(lambda: snapshot, "t")
    get = registry.get_sample_value
    assert get("netstat_interface_mtu_bytes", {"device": "vé0"}) == 1500
    assert get("netstat_interface_mtu_bytes", {"device": "v\\xe91"}) == 1500  # escaped, visible
    text = generate_latest(registry)
    text.decode("utf-8")  # valid UTF-8 throughout
    promtool = sh.which("promtool")
    if promtool:
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr
    done = subprocess.run(["ip", "netns", "exec", netns.name, sys.executable, "-m", "exporter",
                           "snapshot", "-i"], capture_output=True, timeout=30)
    assert done.returncode == 0 and b"v\\xe91 " in done.stdout and "vé0 ".encode() in done.stdout


@pytest.mark.netns
def test_device_filters_budget_and_the_busiest_kept(netns):
    """300 quiet cali* devices and one busy eth0: eth0 keeps its series (it used to be the
    one cut, by name); the filters leave devices out; device series count in the budget."""
    import re
    from exporter.aggregate import RemoteOptions
    netns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    netns.ip("link", "set", "eth0", "up")
    netns.ip("link", "set", "eth0p", "up")
    batch = "".join(f"link add cali{i:03d} type dummy\n" for i in range(300))
    done = subprocess.run(["ip", "-n", netns.name, "-batch", "-"], input=batch, text=True,
                          capture_output=True)
    if done.returncode != 0:  # no dummy links here: veth pairs make two devices each
        batch = "".join(f"link add cali{i:03d} type veth peer name calp{i:03d}\n"
                        for i in range(150))
        subprocess.run(["ip", "-n", netns.name, "-batch", "-"], input=batch, text=True,
                       check=True, capture_output=True)
    netns.ip("addr", "add", "10.9.0.1/24", "dev", "eth0")
    netns.ip("neigh", "add", "10.9.0.2", "lladdr", "02:00:5e:00:53:02", "dev", "eth0")
    with netns.entered():
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(200):
            sender.sendto(b"x" * 1000, ("10.9.0.2", 9))
        sender.close()

        def sample(**kwargs):
            sampler = Sampler(SocketReader("netlink", procfs="/proc/thread-self"),
                              collectors=["tcp", "interfaces"], remote=RemoteOptions(), **kwargs)
            return sampler.sample_once()
        default = sample()
        filtered = sample(device_exclude=re.compile("cal.*"))
        tight = Sampler(SocketReader("netlink", procfs="/proc/thread-self"),
                        collectors=["tcp", "interfaces"],
                        remote=RemoteOptions(series_limit=28 + 19 * 3)).sample_once()
    shown = default.results["interfaces"].data.shown
    # 2000 series by default, those of the TCP view, 19 per device: about a hundred devices
    assert "eth0" in shown and 90 <= len(shown) <= 2000 // 19
    assert default.truncated_total["devices"] > 0
    assert set(filtered.results["interfaces"].data.counters) == {"lo", "eth0", "eth0p"}
    tight_shown = tight.results["interfaces"].data.shown
    assert "eth0" in tight_shown and len(tight_shown) <= 3
    get = build_registry(lambda: default, "t").get_sample_value
    assert get("netstat_interface_transmit_bytes_total", {"device": "eth0"}) > 0
    assert get("netstat_exporter_series_truncated_total", {"metric": "netstat_interface_*"}) > 0
