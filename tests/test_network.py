"""Interfaces (/proc/net/dev) and the conntrack table."""
from __future__ import annotations

import shutil
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
])
def test_malformed_dev(tmp_path, text, message):
    root = tmp_path / "proc"
    shutil.copytree(PROC, root)
    (root / "net" / "dev").write_text(text)
    snapshot, get = sample(root)
    assert not snapshot.results["interfaces"].ok and message in snapshot.results["interfaces"].error
    assert get("netstat_exporter_collector_success", {"collector": "interfaces"}) == 0
    assert get("netstat_conntrack_entries") == 17


def test_bad_conntrack_value_fails(tmp_path):
    root = tmp_path / "proc"
    shutil.copytree(PROC, root)
    (root / "sys" / "net" / "netfilter" / "nf_conntrack_count").write_text("many\n")
    snapshot, _get = sample(root)
    assert not snapshot.results["conntrack"].ok and "not an integer" in snapshot.results["conntrack"].error


def test_interface_cap():
    lines = ["Inter-|\n", " face |\n"] + [f"d{i:03d}: " + "1 " * 16 + "\n" for i in range(5)]
    devices = interfaces.parse(lines)
    snapshot = type("S", (), {"results": {"interfaces": type("R", (), {"ok": True, "data": devices})()}})()
    families = list(InterfacesCollector(limit=3).collect(snapshot, devices))
    assert families[0].samples[0].value == 5
    assert {s.labels["device"] for s in families[1].samples} == {"d000", "d001", "d002"}
