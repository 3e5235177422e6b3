"""--web.config.file: the exporter-toolkit format parsed strictly, and TLS, mutual TLS and basic
auth proven on the real exporter process (certificates made in the test by trustme)."""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request

import bcrypt
import pytest
import trustme
from hypothesis import given, settings, strategies as st

from exporter import webconfig
from exporter.webconfig import WebConfigError, basic_credentials
from tests.conftest import unavailable
from tests.kernel import wait_for

PORT = 10101
PASSWORD = "s3cret"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A server certificate for 127.0.0.1, a client certificate from the same CA, and one
    from another CA, all as files."""
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("prometheus@example.org", "scraper.example.org")
    stranger = other_ca.issue_cert("scraper.example.org")
    ca.cert_pem.write_to_path(folder / "ca.pem")
    server.cert_chain_pems[0].write_to_path(folder / "server.crt")
    server.private_key_pem.write_to_path(folder / "server.key")
    client.private_key_and_cert_chain_pem.write_to_path(folder / "client.pem")
    stranger.private_key_and_cert_chain_pem.write_to_path(folder / "stranger.pem")
    return type("PKI", (), {"folder": folder, "ca": ca, "server": server})


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


# -- the file format ---------------------------------------------------------------------------

def test_an_empty_file_means_plain_http_without_auth(tmp_path):
    config = webconfig.load(str(write(tmp_path / "web.yml", "")))
    assert config.tls is None and not config.users and config.headers == ()


def test_relative_paths_resolve_against_the_files_folder(pki, tmp_path):
    for name in ("server.crt", "server.key", "ca.pem"):
        shutil.copy(pki.folder / name, tmp_path / name)
    config = webconfig.load(str(write(tmp_path / "web.yml", """
        tls_server_config:
          cert_file: server.crt
          key_file: server.key
          client_auth_type: RequireAndVerifyClientCert
          client_ca_file: ca.pem
          min_version: TLS13
          cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]
        http_server_config:
          http2: false
          headers: {X-Frame-Options: deny, X-Content-Type-Options: nosniff,
                    Strict-Transport-Security: max-age=31536000, X-XSS-Protection: ""}
        basic_auth_users: {prometheus: '%s'}
        rate_limit: {interval: 100ms, burst: 5}
        """ % HASH)))
    assert config.tls.verify_mode == ssl.CERT_REQUIRED
    assert config.tls.minimum_version == ssl.TLSVersion.TLSv1_3
    assert set(config.files) == {str(tmp_path / n) for n in
                                 ("web.yml", "server.crt", "server.key", "ca.pem")}
    assert config.headers == (("X-Frame-Options", "deny"), ("X-Content-Type-Options", "nosniff"),
                              ("Strict-Transport-Security", "max-age=31536000"))
    assert config.users == {"prometheus": HASH.encode()} and config.rate_limit == (0.1, 5)


@pytest.mark.parametrize("text, message", [
    ("tls_server_config: {cert_file: a.crt}", "missing key_file"),
    ("tls_server_config: {cert_file: nope.crt, key_file: nope.key}", "nope.crt: No such file"),
    ("tls_server_confg: {}", "unknown field 'tls_server_confg'"),
    ("tls_server_config: {client_auth_type: Sometimes, cert_file: a, key_file: b}",
     "invalid client_auth_type 'Sometimes'"),
    ("tls_server_config: {cert_file: a, key_file: b, min_version: TLS14}", "unknown TLS version"),
    ("tls_server_config: {cert_file: a, key_file: b, cipher_suites: [TLS_FAKE]}",
     "cipher suite 'TLS_FAKE'"),
    ("tls_server_config: {cert_file: a, key_file: b, client_ca_file: ca.pem}",
     "without a client_auth_type"),
    ("basic_auth_users: {alice: plaintext}", "not a bcrypt hash"),
    ("http_server_config: {headers: {X-Powered-By: me}}", "header 'X-Powered-By' is not allowed"),
    ("http_server_config: {headers: {X-Frame-Options: allow}}", "X-Frame-Options must be one of"),
    ("http_server_config: {headers: {Content-Security-Policy: \"a\\r\\nSet-Cookie: x\"}}",
     "not a valid header value"),
    ("http_server_config: {headers: {Content-Security-Policy: \"default-src 'self' \"}}",
     "not a valid header value"),  # h11 would refuse to send it: every reply would fail
    ("http_server_config: {headers: {X-XSS-Protection: \"1 ✓\"}}", "not a valid header value"),
    ("rate_limit: " + "[" * 5000 + "]" * 5000, "web.yml"),  # RecursionError in the parser
    ("rate_limit: {interval: soon, burst: 1}", "expected a duration"),
    ("- just\n- a list", "expected a mapping"),
    ("{{{", "web.yml"),
])
def test_bad_files_are_one_clear_error(tmp_path, text, message):
    with pytest.raises(WebConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        webconfig.load(str(write(tmp_path / "web.yml", text)))


def test_tls_choices_python_cannot_honour_are_refused_clearly(pki, tmp_path):
    base = f"tls_server_config:\n  cert_file: {pki.folder}/server.crt\n  key_file: {pki.folder}/server.key\n"
    with pytest.raises(WebConfigError, match="one curve only"):
        webconfig.load(str(write(tmp_path / "w.yml", base + "  curve_preferences: [X25519, CurveP256]\n")))
    config = webconfig.load(str(write(tmp_path / "w.yml", base + "  curve_preferences: [CurveP384]\n")))
    assert config.tls is not None


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_are_a_config_or_a_clear_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "web.yml"
    path.write_bytes(data)
    try:
        webconfig.load(str(path))
    except WebConfigError as exc:
        assert "web.yml" in str(exc) or "tls_server_config" in str(exc)


@pytest.mark.parametrize("header, expected", [
    (b"Basic " + base64.b64encode(b"u:pw"), ("u", b"pw")),
    (b"basic " + base64.b64encode(b"u:p:w"), ("u", b"p:w")),
    (b"Basic " + base64.b64encode("zoë:x".encode()), ("zoë", b"x")),
    (b"Basic " + base64.b64encode(b"no-colon"), None),
    (b"Basic !!!", None), (b"Bearer abc", None), (b"", None), (None, None),
    (b"Basic " + base64.b64encode(b"\xff:x"), None),
])
def test_basic_credentials(header, expected):
    assert basic_credentials(header) == expected


def test_watcher_reloads_on_change_and_keeps_the_last_good_config(tmp_path, caplog):
    now = {"t": 0.0}
    path = write(tmp_path / "web.yml", "basic_auth_users: {a: '%s'}\n" % HASH)
    watcher = webconfig.Watcher(str(path), clock=lambda: now["t"])
    assert set(watcher.refresh().users) == {"a"}
    write(path, "basic_auth_users: {a: '%s', b: '%s'}\n" % (HASH, HASH))
    assert set(watcher.refresh().users) == {"a"}  # checked at most once a second
    now["t"] = 1.5
    assert set(watcher.refresh().users) == {"a", "b"}
    write(path, "basic_auth_users: {a: nonsense}\n")
    now["t"] = 3.0
    assert set(watcher.refresh().users) == {"a", "b"}
    assert "keeping the last good one" in caplog.text and "not a bcrypt hash" in caplog.text


# -- the real exporter ---------------------------------------------------------------------------

def start(ns, config_path, *flags):
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, sys.executable, "-m", "exporter",
         f"--web.listen-address=127.0.0.1:{PORT}", f"--web.config.file={config_path}",
         "--sample.interval=1", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def up():
        with ns.entered():
            try:
                socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
                return True
            except OSError:
                return proc.poll() is not None
    wait_for(up, timeout=15, what="the exporter to listen")
    assert proc.poll() is None, proc.stderr.read()
    return proc


def healthcheck(ns, config_path) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-m", "exporter",
                           "healthcheck", f"--web.listen-address=127.0.0.1:{PORT}",
                           f"--web.config.file={config_path}"],
                          capture_output=True, text=True, timeout=20)


def client_context(pki, certificate: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.folder / "ca.pem"))
    if certificate:
        context.load_cert_chain(str(pki.folder / certificate))
    return context


def get(ns, path, context=None, user=None, password=PASSWORD, scheme=None):
    scheme = scheme or ("https" if context else "http")
    headers = {}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{PORT}{path}", headers=headers)
    with ns.entered():
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()


@pytest.mark.netns
def test_basic_auth_over_tls(netns, pki, tmp_path):
    path = write(tmp_path / "web.yml", f"""
        tls_server_config:
          cert_file: {pki.folder}/server.crt
          key_file: {pki.folder}/server.key
        http_server_config:
          headers: {{X-Content-Type-Options: nosniff}}
        basic_auth_users:
          prometheus: '{HASH}'
        """)
    proc = start(netns, path)
    tls = client_context(pki)
    try:
        status, headers, body = get(netns, "/metrics", tls, "prometheus")
        assert status == 200 and b"netstat_tcp_connections" in body
        assert headers["X-Content-Type-Options"] == "nosniff"
        for user, password in (("prometheus", "wrong"), ("nobody", PASSWORD), (None, "")):
            status, headers, body = get(netns, "/metrics", tls, user, password)
            assert status == 401 and b"netstat" not in body
            assert headers["WWW-Authenticate"] == 'Basic realm="netstat-exporter"'
        assert get(netns, "/", tls)[0] == 401
        # liveness probes carry no password: /healthz answers, without the details
        status, _, body = get(netns, "/healthz", tls)
        assert (status, body) == (200, b"ok\n")
        assert get(netns, "/healthz", tls, "prometheus")[2].startswith(b"ok: last sample")
        check = healthcheck(netns, path)  # the image's HEALTHCHECK, with TLS and auth on
        assert check.returncode == 0 and check.stdout == "ok\n", check
        # plain HTTP on the TLS port: refused promptly, nothing served
        with netns.entered(), socket.create_connection(("127.0.0.1", PORT), timeout=5) as raw:
            raw.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            started = time.monotonic()
            received = b""
            while chunk := raw.recv(4096):
                received += chunk
            assert b"netstat_tcp" not in received and time.monotonic() - started < 4
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert "Traceback" not in proc.stderr.read()


@pytest.mark.netns
@pytest.mark.parametrize("auth_type, no_cert_allowed", [
    ("RequireAndVerifyClientCert", False), ("VerifyClientCertIfGiven", True)])
def test_client_certificates(netns, pki, tmp_path, auth_type, no_cert_allowed):
    path = write(tmp_path / "web.yml", f"""
        tls_server_config:
          cert_file: {pki.folder}/server.crt
          key_file: {pki.folder}/server.key
          client_auth_type: {auth_type}
          client_ca_file: {pki.folder}/ca.pem
        """)
    proc = start(netns, path)
    try:
        assert get(netns, "/metrics", client_context(pki, "client.pem"))[0] == 200
        for certificate in ("stranger.pem",) + (() if no_cert_allowed else (None,)):
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                get(netns, "/metrics", client_context(pki, certificate))
        if no_cert_allowed:
            assert get(netns, "/metrics", client_context(pki))[0] == 200
        check = healthcheck(netns, path)
        assert check.returncode == 0, check
        assert check.stdout.startswith("ok" if no_cert_allowed else "alive (client certificate")
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert "Traceback" not in proc.stderr.read()
    check = healthcheck(netns, path)  # nothing listens any more
    assert check.returncode == 1 and check.stderr.startswith("unhealthy:"), check


@pytest.mark.netns
def test_client_allowed_sans(netns, pki, tmp_path):
    other = pki.ca.issue_cert("someone-else.example.org")
    other.private_key_and_cert_chain_pem.write_to_path(tmp_path / "other.pem")
    path = write(tmp_path / "web.yml", f"""
        tls_server_config:
          cert_file: {pki.folder}/server.crt
          key_file: {pki.folder}/server.key
          client_auth_type: RequireAndVerifyClientCert
          client_ca_file: {pki.folder}/ca.pem
          client_allowed_sans: [scraper.example.org]
        """)
    proc = start(netns, path)
    try:
        assert get(netns, "/metrics", client_context(pki, "client.pem"))[0] == 200
        context = client_context(pki)
        context.load_cert_chain(str(tmp_path / "other.pem"))
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            get(netns, "/metrics", context)
    finally:
        proc.terminate()
        proc.wait(10)


def fingerprint(ns) -> str:
    with ns.entered(), socket.create_connection(("127.0.0.1", PORT), timeout=5) as raw:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with context.wrap_socket(raw) as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


@pytest.mark.netns
def test_certificates_rotate_without_a_restart_and_a_bad_change_keeps_the_old(netns, pki, tmp_path):
    for name in ("server.crt", "server.key"):
        shutil.copy(pki.folder / name, tmp_path / name)
    path = write(tmp_path / "web.yml", """
        tls_server_config: {cert_file: server.crt, key_file: server.key}
        """)
    proc = start(netns, path)
    try:
        first = fingerprint(netns)
        renewed = pki.ca.issue_cert("127.0.0.1")
        renewed.private_key_pem.write_to_path(tmp_path / "server.key.new")
        renewed.cert_chain_pems[0].write_to_path(tmp_path / "server.crt.new")
        # rename over the old files, as cert-manager and Kubernetes secret mounts do
        (tmp_path / "server.key.new").rename(tmp_path / "server.key")
        (tmp_path / "server.crt.new").rename(tmp_path / "server.crt")
        second = wait_for(lambda: (f := fingerprint(netns)) != first and f, timeout=10,
                          what="the renewed certificate to be served")
        (tmp_path / "server.crt").write_text("not a certificate\n")
        # across the next reload checks (one a second), the last good certificate is served
        until = time.monotonic() + 2.5
        while time.monotonic() < until:
            assert fingerprint(netns) == second
        wait_for(lambda: get(netns, "/healthz", client_context(pki))[0] == 200, timeout=5,
                 what="TLS to keep working with the last good certificate")
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    log = proc.stderr.read()
    assert "reloaded" in log and "keeping the last good one" in log and "Traceback" not in log


def test_an_invalid_file_at_start_is_one_line_and_exit_2(tmp_path):
    path = write(tmp_path / "web.yml", "basic_auth_users: {a: plaintext}\n")
    done = subprocess.run([sys.executable, "-m", "exporter", f"--web.config.file={path}",
                           "--web.listen-address=127.0.0.1:0"], capture_output=True, text=True,
                          timeout=20)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("netstat-exporter: error: --web.config.file:")
    assert "not a bcrypt hash" in done.stderr


@pytest.mark.netns
def test_prometheus_scrapes_over_mutual_tls_with_basic_auth(netns, pki, tmp_path):
    if shutil.which("prometheus") is None:
        unavailable("prometheus is not installed (Debian package 'prometheus')")
    path = write(tmp_path / "web.yml", f"""
        tls_server_config:
          cert_file: {pki.folder}/server.crt
          key_file: {pki.folder}/server.key
          client_auth_type: RequireAndVerifyClientCert
          client_ca_file: {pki.folder}/ca.pem
        basic_auth_users:
          prometheus: '{HASH}'
        """)
    prometheus_yml = write(tmp_path / "prometheus.yml", f"""
        global: {{scrape_interval: 1s}}
        scrape_configs:
          - job_name: netstat
            scheme: https
            tls_config:
              ca_file: {pki.folder}/ca.pem
              cert_file: {pki.folder}/client.pem
              key_file: {pki.folder}/client.pem
            basic_auth: {{username: prometheus, password: {PASSWORD}}}
            static_configs: [{{targets: ['127.0.0.1:{PORT}']}}]
        """)
    exporter = start(netns, path)
    prometheus = subprocess.Popen(
        ["ip", "netns", "exec", netns.name, "prometheus", f"--config.file={prometheus_yml}",
         f"--storage.tsdb.path={tmp_path / 'data'}", "--web.listen-address=127.0.0.1:19090"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def value(query):
        url = "http://127.0.0.1:19090/api/v1/query?query=" + urllib.parse.quote(query)
        with netns.entered():
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    result = json.loads(response.read())["data"]["result"]
            except OSError:
                return None
        return float(result[0]["value"][1]) if result else None
    try:
        wait_for(lambda: value('up{job="netstat"}') == 1, timeout=60,
                 what="Prometheus to scrape over mutual TLS with basic auth")
        assert value('netstat_tcp_connections{state="LISTEN",family="ipv4"}') >= 2
    finally:
        prometheus.terminate()
        prometheus.wait(10)
        exporter.terminate()
        exporter.wait(10)



@pytest.mark.netns
def test_sighup_rereads_the_web_config_and_never_kills(netns, tmp_path):
    import signal
    from tests.kernel import wait_for_line
    path = write(tmp_path / "web.yml", "basic_auth_users: {a: '%s'}\n" % HASH)
    proc = start(netns, path)
    try:
        assert get(netns, "/metrics", user="a")[0] == 200
        proc.send_signal(signal.SIGHUP)
        assert "the web config is re-read at the next connection" in wait_for_line(
            proc, "SIGHUP", timeout=5)
        assert get(netns, "/metrics", user="a")[0] == 200  # still serving, and re-reading
        wait_for_line(proc, "reloaded", timeout=5)
        assert proc.poll() is None
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert "Traceback" not in proc.stderr.read()


def test_a_flood_of_wrong_passwords_never_queues_in_front_of_a_known_scraper():
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor
    release = threading.Event()
    slow = ThreadPoolExecutor(1)
    slow.submit(release.wait)  # the bcrypt worker is busy: new checks wait behind it
    auth = webconfig.Authenticator(slow)
    users = {"prometheus": HASH.encode()}

    def header(password):
        return b"Basic " + base64.b64encode(b"prometheus:" + password)

    async def scenario():
        # the scraper's credentials were checked once already
        auth._granted[hashlib.sha256(b"\0".join((b"prometheus", PASSWORD.encode(),
                                                HASH.encode()))).digest()] = True
        flood = [asyncio.ensure_future(auth.allowed(header(b"guess%d" % i), users))
                 for i in range(webconfig.AUTH_PENDING_LIMIT)]
        await asyncio.sleep(0)
        turned_away = await auth.allowed(header(b"one more guess"), users)
        known = await auth.allowed(header(PASSWORD.encode()), users)
        release.set()
        results = await asyncio.gather(*flood)
        return turned_away, known, results
    turned_away, known, results = asyncio.run(scenario())
    assert turned_away is None  # answered 503 at once, not queued
    assert known is True  # the known scraper never waited
    assert results == [False] * webconfig.AUTH_PENDING_LIMIT


@pytest.mark.parametrize("kind", ["fifo", "huge", "directory"])
def test_a_config_that_is_not_a_small_regular_file_is_refused_without_blocking(tmp_path, kind):
    import os
    path = tmp_path / "web.yml"
    if kind == "fifo":  # open() would wait for a writer forever
        os.mkfifo(path)
    elif kind == "huge":  # a truncated read must not pass for the whole file
        path.write_text("#" * webconfig.CONFIG_LIMIT + "\nbasic_auth_users: {a: '%s'}\n" % HASH)
    else:
        path.mkdir()
    with pytest.raises(WebConfigError, match=str(path)):
        webconfig.load(str(path))


def test_a_certificate_path_that_is_a_fifo_is_refused(pki, tmp_path):
    import os
    os.mkfifo(tmp_path / "cert.pem")
    with pytest.raises(WebConfigError, match="not a regular file"):
        webconfig.load(str(write(tmp_path / "web.yml", f"""
            tls_server_config: {{cert_file: cert.pem, key_file: {pki.folder}/server.key}}
            """)))


def test_unknown_users_and_long_passwords_are_plain_refusals():
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    auth = webconfig.Authenticator(ThreadPoolExecutor(1))
    users = {"prometheus": HASH.encode()}

    def header(user, password):
        return b"Basic " + base64.b64encode(user + b":" + password)

    async def scenario():
        return [await auth.allowed(header(user, password), users) for user, password in (
            (b"nobody", b"x" * 100), (b"prometheus", b"x" * 100), (b"nobody", b"pw"),
            (b"prometheus", PASSWORD.encode()))]
    assert asyncio.run(scenario()) == [False, False, False, True]


def test_wrong_passwords_never_push_out_the_scraper():
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    auth = webconfig.Authenticator(ThreadPoolExecutor(1))
    users = {"prometheus": HASH.encode()}
    good = b"Basic " + base64.b64encode(b"prometheus:" + PASSWORD.encode())

    async def scenario():
        assert await auth.allowed(good, users) is True
        for i in range(webconfig.AUTH_CACHE_ENTRIES + 50):  # a flood of distinct guesses
            bad = b"Basic " + base64.b64encode(b"prometheus:guess%d" % i)
            assert await auth.allowed(bad, users) is False
        return len(auth._granted), len(auth._refused)
    granted, refused = asyncio.run(scenario())
    assert granted == 1 and refused == webconfig.AUTH_CACHE_ENTRIES


@pytest.mark.netns
def test_a_revoked_user_is_refused_on_a_connection_opened_before(netns, tmp_path):
    import http.client
    path = write(tmp_path / "web.yml", "basic_auth_users: {a: '%s', b: '%s'}\n" % (HASH, HASH))
    proc = start(netns, path)
    auth = {"Authorization": "Basic " + base64.b64encode(f"a:{PASSWORD}".encode()).decode()}
    try:
        with netns.entered():
            conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)

            def status():
                conn.request("GET", "/metrics", headers=auth)
                response = conn.getresponse()
                response.read()
                return response.status
            assert status() == 200
            write(path, "basic_auth_users: {b: '%s'}\n" % HASH)  # a is revoked
            wait_for(lambda: status() == 401, timeout=5, what="a to be refused on its "
                     "keep-alive connection")
            conn.close()
    finally:
        proc.terminate()
        proc.wait(10)
