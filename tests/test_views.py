"""The view registry: one entry per netstat view, switched the same way, iterated by the
sampler, the server and the CLI, which name none of them."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from prometheus_client.core import GaugeMetricFamily

from exporter import config, views
from exporter.sampler import Sampler, SocketReader
from exporter.views import DEFAULTS, VIEWS, View, build_registry
from tests.test_proc_sockets import FIXTURES

ROOT = Path(__file__).resolve().parents[1]


def test_entries_are_complete_and_consistent():
    names = [view.name for view in VIEWS]
    assert len(names) == len(set(names))
    for view in VIEWS:
        assert view.collector is not None and view.help and view.privileges, view.name
        for flag in view.flags:
            assert flag in config.OPTIONS, (view.name, flag)
        for table in view.tables:
            assert set(table.needs) <= set(names) and view.name in table.needs
    flags = [t.flag for v in VIEWS for t in v.tables if t.flag]
    assert len(flags) == len(set(flags))
    assert [t for v in VIEWS for t in v.tables if t.flag is None] != []
    assert {name for name, on in DEFAULTS.items() if not on} == {"processes", "netns"}


@pytest.mark.parametrize("flags, env, enabled, disabled", [
    ({}, {}, {"tcp", "udp", "snmp"}, {"processes", "netns"}),
    ({"--collector.netns": "true", "--collector.tcp": "false"}, {}, {"netns"}, {"tcp"}),
    ({"--collector.disable": "netns,routes"}, {"NETSTAT_EXPORTER_COLLECTOR_NETNS": "true"},
     {"tcp"}, {"netns", "routes"}),
    ({}, {"NETSTAT_EXPORTER_COLLECTOR_PROCESSES": "yes",
          "NETSTAT_EXPORTER_COLLECTOR_MULTICAST": "off"}, {"processes"}, {"multicast"}),
    ({"--collector.processes": "false"}, {"NETSTAT_EXPORTER_COLLECTOR_PROCESSES": "true"},
     set(), {"processes"}),  # the flag wins over the environment
])
def test_every_view_is_switched_the_same_way(flags, env, enabled, disabled):
    cfg = config.build(flags, env, DEFAULTS)
    assert enabled <= cfg.collectors and not disabled & cfg.collectors


def test_bad_switches_are_reported_together():
    with pytest.raises(config.ConfigError) as caught:
        config.build({"--collector.disable": "bogus", "--collector.tcp": "maybe"}, {}, DEFAULTS)
    assert len(caught.value.errors) == 2
    assert "unknown collector 'bogus'" in str(caught.value)
    assert "--collector.tcp: must be true or false" in str(caught.value)


def test_a_new_view_is_an_entry_and_nothing_else():
    """What the conntrack-entries view will do: a reader, a collector, one entry."""
    class DemoCollector:
        def collect(self, snapshot, data):
            yield GaugeMetricFamily("netstat_demo_things", "Things.", value=data["things"])

    demo = View("demo", "a demonstration", default=True, privileges="none",
                read=lambda ctx: {"things": len(ctx.current["tcp"].listeners)},
                collector=lambda options: DemoCollector())
    registry_views = VIEWS + (demo,)
    sampler = Sampler(SocketReader("proc", procfs=str(FIXTURES)), views=registry_views,
                      collectors=["tcp", "demo"])
    snapshot = sampler.sample_once()
    registry = build_registry(lambda: snapshot, "t", views=registry_views)
    assert registry.get_sample_value("netstat_demo_things") == 4
    assert registry.get_sample_value("netstat_exporter_collector_success",
                                     {"collector": "demo"}) == 1
    cfg = config.build({"--collector.demo": "false"}, {}, {v.name: v.default for v in registry_views})
    assert not cfg.enabled("demo") and cfg.enabled("tcp")


def test_one_snapshot_per_scrape_for_every_collector():
    seen = []

    class Recorder:
        def collect(self, snapshot, data):
            seen.append(snapshot)
            return iter(())

    first = Sampler(SocketReader("proc", procfs=str(FIXTURES)), collectors=["tcp", "udp"])
    snapshots = iter([first.sample_once(), first.sample_once()])
    recorded = tuple(dataclasses.replace(v, collector=lambda o: Recorder())
                     for v in VIEWS if v.name in ("tcp", "udp"))
    registry = build_registry(lambda: next(snapshots), "t", views=recorded)
    list(registry.collect())
    assert len(seen) == 2 and seen[0] is seen[1]  # both views saw the first snapshot


@pytest.mark.parametrize("module", ["sampler.py", "server.py", "pages.py", "cli.py", "config.py"])
def test_the_machinery_names_no_view(module):
    text = (ROOT / "exporter" / module).read_text()
    for view in VIEWS:
        assert not re.search(rf"[\"']{view.name}[\"']", text), (module, view.name)


def test_config_imports_nothing_from_the_engine():
    text = (ROOT / "exporter" / "config.py").read_text()
    assert not re.search(r"^from \.(?!\s)", text, re.M), "config.py imports from the package"
    assert views.BY_NAME["tcp"] is VIEWS[[v.name for v in VIEWS].index("tcp")]


def test_every_series_kind_the_budget_cuts_has_its_metric():
    from exporter import aggregate
    from exporter.collectors.exporter import TRUNCATED_METRICS
    assert set(TRUNCATED_METRICS) == set(aggregate.SERIES_LIMITED) | {"devices", "nat_sources"}


@pytest.mark.parametrize("name, shown", [
    ("nginx", "nginx"), ("a\x1b[2Jb", "a\\x1b[2Jb"), ("tab\there", "tab\\there"),
    ("v\udce90", "v\\xe90"), ("vé0", "vé0"), ("bell\x07", "bell\\x07"),
])
def test_names_reach_the_terminal_escaped(name, shown):
    """A program or device name may hold any byte: the CLI never prints control characters
    or undecodable bytes raw."""
    from types import SimpleNamespace
    from exporter import tables
    assert tables.printable(name) == shown
    snapshot = SimpleNamespace(results={"tcp": SimpleNamespace(data=SimpleNamespace(
        programs=SimpleNamespace(connections={("ESTABLISHED", name): 3})))})
    out = tables.programs(snapshot, SimpleNamespace(json=False))
    assert out == f"      3 {shown} ESTABLISHED" and "\x1b" not in out


@settings(max_examples=500, deadline=None)
@given(names=st.lists(st.lists(st.sampled_from([b"a", b"x", b"9", b"e", b"\\", b"\xc3", b"\xa9",
                                               b"\xe9", b"\x80", b"\x07"]), max_size=6).map(
    lambda parts: b"".join(parts).decode("utf-8", "surrogateescape")),
    min_size=2, max_size=2, unique=True))
def test_label_values_are_valid_utf8_and_two_names_never_share_one(names):
    """Any two names, read as the kernel's bytes are (what is not UTF-8 kept as surrogates),
    give two label values: with backslashes left as they were, "a\\udce9" and a literal "a\\\\xe9" were one
    label, and a sample had two series with one label set (found in review)."""
    from exporter.collectors.base import label_text
    first, second = (label_text(name) for name in names)
    assert first != second
    for name in names:
        shown = label_text(name)
        shown.encode("utf-8")  # no surrogate left
        if shown != name:  # a program may be named what another's label reads
            assert label_text(shown) != shown
