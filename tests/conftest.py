from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import uuid

import pytest

from tests.kernel import Netns

IN_CI = os.environ.get("CI") == "true"


def load_script(path, name: str):
    """Import a script that is not part of the package (deploy/, grafana/) under its own name."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unavailable(reason: str):
    """Namespaces missing: skip on a developer's machine, fail in CI (a green CI must mean the
    kernel tests really ran)."""
    if IN_CI:
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def _check_netns_support() -> str | None:
    if os.geteuid() != 0:
        return "network namespace tests need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"nse-probe-{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot create a network namespace: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


_support: list[str | None] = []


def new_netns() -> Netns:
    """A fresh namespace with lo up; skips (fails in CI) where namespaces are unavailable."""
    if not _support:
        _support.append(_check_netns_support())
    if _support[0]:
        unavailable(_support[0])
    return Netns.create(f"nse-{uuid.uuid4().hex[:10]}")


@pytest.fixture
def netns_factory():
    created: list[Netns] = []

    def make() -> Netns:
        ns = new_netns()
        created.append(ns)
        return ns

    yield make
    for ns in reversed(created):
        ns.destroy()


@pytest.fixture
def netns(netns_factory) -> Netns:
    return netns_factory()


@pytest.fixture
def mix(netns_factory):
    """The known socket mix of tests/kernel.py:build_mix in a namespace (mix.ns)."""
    from tests.kernel import build_mix
    a, b = netns_factory(), netns_factory()
    built = build_mix(a, b)
    built.ns = a
    yield built
    built.close()
