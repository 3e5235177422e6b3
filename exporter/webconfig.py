"""--web.config.file: TLS, mutual TLS, basic auth and response headers in the format of the
Prometheus exporter-toolkit (docs/web-configuration.md there), so a file written for
node_exporter works here unchanged.

    tls_server_config: {cert_file, key_file, client_auth_type, client_ca_file, ...}
    http_server_config: {http2, headers: {X-Frame-Options: deny, ...}}
    basic_auth_users: {prometheus: $2y$10$...}      # bcrypt hashes only
    rate_limit: {interval: 100ms, burst: 10}

Relative paths resolve against the file's own folder. The watcher re-reads the file and every
file it names when one of them changes (certificate rotation without a restart); a bad change
keeps the last good configuration and says why in the log.
"""
from __future__ import annotations

import asyncio
import binascii
import collections
import hashlib
import logging
import os
import re
import ssl
import stat
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import bcrypt
import yaml

from .sources import files

log = logging.getLogger(__name__)


CONFIG_LIMIT = 1 << 20


class WebConfigError(ValueError):
    """A web configuration that cannot be used; the message names the file and the key."""


# Go's tls.ClientAuthType names -> Python's verify mode. Python's ssl verifies every client
# certificate it asks for against client_ca_file (or the system store): it cannot ask for a
# certificate and then accept an unverifiable one. The two Go modes that do that
# (RequestClientCert, RequireAnyClientCert) are therefore served with verification, stricter
# than Go, and a warning says so once.
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
UNVERIFIED_MODES = ("RequestClientCert", "RequireAnyClientCert")

TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}

# Go's cipher suite names (crypto/tls CipherSuites() and InsecureCipherSuites()) -> OpenSSL's.
# TLS 1.3 suites are not configurable in Go either; they are accepted and left to OpenSSL.
CIPHER_SUITES = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
TLS13_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                "TLS_CHACHA20_POLY1305_SHA256")
CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1",
          "X25519": "X25519"}

# exporter-toolkit allows exactly these response headers, some with fixed values.
HEADERS = {"Content-Security-Policy": None, "X-Frame-Options": ("deny", "sameorigin"),
           "X-Content-Type-Options": ("nosniff",), "X-XSS-Protection": None,
           "Strict-Transport-Security": None}

# RFC 9110 field-value, ASCII only: what h11 will send (empty means "unset")
_FIELD_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?")
# "$2y$10$" + 22 salt + 31 hash characters of bcrypt's base64 alphabet
BCRYPT_HASH = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class WebConfig:
    tls: ssl.SSLContext | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: tuple[tuple[str, str], ...] = ()
    allowed_sans: frozenset[str] | None = None  # client_allowed_sans
    rate_limit: tuple[float, int] | None = None  # (seconds between requests, burst)
    files: tuple[str, ...] = ()  # every file read, for change detection


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _only(section: dict, allowed: tuple[str, ...], where: str) -> None:
    # the toolkit unmarshals strictly: a misspelt key is an error, not a silent default
    for key in section:
        if key not in allowed:
            raise WebConfigError(f"{where}: unknown field {key!r} (known: {', '.join(allowed)})")


def _string_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise WebConfigError(f"{where}: expected a list of strings")
    return value


def parse_duration(text: Any, where: str) -> float:
    """Go durations as the toolkit writes them: "100ms" -> 0.1, "1m30s" -> 90.0, 0 -> 0."""
    if text == 0 or text == "0":
        return 0.0
    if not isinstance(text, str) or not re.fullmatch(rf"(?:{DURATION.pattern})+", text):
        raise WebConfigError(f"{where}: expected a duration like 100ms or 1s, got {text!r}")
    return sum(float(n) * DURATION_UNITS[unit] for n, unit in DURATION.findall(text))


def load(path: str) -> WebConfig:
    """Read and check the whole file; raise WebConfigError naming what is wrong."""
    try:
        # regular files only, opened non-blocking and read to at most 1 MiB (a FIFO or a
        # hung mount must not stall the server, nor a truncated read pass as a whole file)
        text = files.read_text(path, CONFIG_LIMIT)
        text.encode("utf-8")  # undecodable bytes are an error here, not names to escape
        document = yaml.safe_load(text) if text.strip() else {}
    except (OSError, UnicodeError, yaml.YAMLError, RecursionError, ValueError) as exc:
        raise WebConfigError(f"{path}: {str(exc)[:300]}") from None
    where = os.path.basename(path)
    document = _mapping(document, where)
    _only(document, ("tls_server_config", "http_server_config", "basic_auth_users",
                     "rate_limit"), where)
    folder = os.path.dirname(os.path.abspath(path))
    watched = [os.path.abspath(path)]
    tls, allowed_sans = _tls(_mapping(document.get("tls_server_config"),
                                      f"{where}: tls_server_config"), folder, watched)
    return WebConfig(tls=tls, users=_users(document.get("basic_auth_users"), where),
                     headers=_headers(_mapping(document.get("http_server_config"),
                                               f"{where}: http_server_config"), where),
                     allowed_sans=allowed_sans,
                     rate_limit=_rate_limit(document.get("rate_limit"), where),
                     files=tuple(watched))


def _users(value: Any, where: str) -> dict[str, bytes]:
    users = {}
    for user, hashed in _mapping(value, f"{where}: basic_auth_users").items():
        if not isinstance(user, str) or not isinstance(hashed, str) \
                or not BCRYPT_HASH.fullmatch(hashed):
            raise WebConfigError(f"{where}: basic_auth_users: the password of {user!r} is not "
                                 f"a bcrypt hash ($2a$, $2b$ or $2y$; htpasswd -nBC 10 \"\")")
        users[user] = hashed.encode()
    return users


def _headers(section: dict, where: str) -> tuple[tuple[str, str], ...]:
    _only(section, ("http2", "headers"), f"{where}: http_server_config")
    if not isinstance(section.get("http2", True), bool):
        raise WebConfigError(f"{where}: http_server_config: http2 must be true or false")
    headers = []
    for name, value in _mapping(section.get("headers"),
                                f"{where}: http_server_config: headers").items():
        if name not in HEADERS:
            raise WebConfigError(f"{where}: http_server_config: header {name!r} is not "
                                 f"allowed (allowed: {', '.join(HEADERS)})")
        if not isinstance(value, str) or not _FIELD_VALUE.fullmatch(value):
            raise WebConfigError(f"{where}: http_server_config: header {name}: not a valid "
                                 f"header value (visible ASCII, no whitespace at the ends)")
        if value == "":
            continue  # "unset if blank"
        if HEADERS[name] is not None and value.lower() not in HEADERS[name]:
            raise WebConfigError(f"{where}: http_server_config: {name} must be one of "
                                 f"{', '.join(HEADERS[name])}, got {value!r}")
        headers.append((name, value))
    return tuple(headers)


def _rate_limit(value: Any, where: str) -> tuple[float, int] | None:
    section = _mapping(value, f"{where}: rate_limit")
    _only(section, ("interval", "burst"), f"{where}: rate_limit")
    if not section:
        return None
    interval = parse_duration(section.get("interval", 0), f"{where}: rate_limit: interval")
    burst = section.get("burst", 0)
    if not isinstance(burst, int) or isinstance(burst, bool) or burst < 0:
        raise WebConfigError(f"{where}: rate_limit: burst must be an integer >= 0")
    return (interval, burst) if interval > 0 else None


TLS_FIELDS = ("cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type",
              "client_ca_file", "client_allowed_sans", "min_version", "max_version",
              "cipher_suites", "prefer_server_cipher_suites", "curve_preferences")


def _tls(section: dict, folder: str, watched: list[str]):
    where = "tls_server_config"
    _only(section, TLS_FIELDS, where)
    for key in TLS_FIELDS:
        if key in section and section[key] is not None and key not in (
                "client_allowed_sans", "cipher_suites", "curve_preferences",
                "prefer_server_cipher_suites") and not isinstance(section[key], str):
            raise WebConfigError(f"{where}: {key} must be a string")
    resolve = (lambda p: p if not p or os.path.isabs(p) else os.path.join(folder, p))
    cert_file, key_file = resolve(section.get("cert_file") or ""), resolve(section.get("key_file") or "")
    cert, key = section.get("cert") or "", section.get("key") or ""
    if not (cert_file or key_file or cert or key):
        return None, None  # as in the toolkit: no certificate, no TLS
    if cert and cert_file or key and key_file:
        raise WebConfigError(f"{where}: give cert/key inline or as files, not both")
    if not (cert or cert_file):
        raise WebConfigError(f"{where}: missing cert_file")
    if not (key or key_file):
        raise WebConfigError(f"{where}: missing key_file")
    auth_type = section.get("client_auth_type") or "NoClientCert"
    if auth_type not in CLIENT_AUTH:
        raise WebConfigError(f"{where}: invalid client_auth_type {auth_type!r} (one of "
                             f"{', '.join(CLIENT_AUTH)})")
    client_ca_file, client_ca = resolve(section.get("client_ca_file") or ""), section.get("client_ca") or ""
    if (client_ca_file or client_ca) and auth_type == "NoClientCert":
        raise WebConfigError(f"{where}: client CAs are configured without a client_auth_type")
    sans = _string_list(section.get("client_allowed_sans"), f"{where}: client_allowed_sans")
    if sans and auth_type not in ("RequireAnyClientCert", "RequireAndVerifyClientCert"):
        raise WebConfigError(f"{where}: client_allowed_sans needs client_auth_type "
                             f"RequireAnyClientCert or RequireAndVerifyClientCert")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _version(section.get("min_version") or "TLS12", "min_version")
    context.maximum_version = _version(section.get("max_version") or "TLS13", "max_version")
    if context.minimum_version > context.maximum_version:
        raise WebConfigError(f"{where}: min_version is above max_version")
    if context.minimum_version < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 refuses TLS 1.0/1.1 otherwise
    _ciphers(context, section)
    for named in (cert_file, key_file, client_ca_file):
        _regular(named)
    _load_chain(context, cert_file, key_file, cert, key)
    watched.extend(f for f in (cert_file, key_file, client_ca_file) if f)
    context.verify_mode = CLIENT_AUTH[auth_type]
    if auth_type in UNVERIFIED_MODES:
        log.warning("client_auth_type %s: Python's ssl verifies every client certificate it "
                    "asks for, so clients need certificates from the client CA here", auth_type)
    if auth_type != "NoClientCert":
        try:
            if client_ca_file or client_ca:
                context.load_verify_locations(cafile=client_ca_file or None,
                                              cadata=client_ca or None)
            else:
                context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        except (OSError, ssl.SSLError) as exc:
            raise WebConfigError(f"{where}: client CA {client_ca_file or '(inline)'}: "
                                 f"{exc.strerror or exc}") from None
    context.set_alpn_protocols(["http/1.1"])
    return context, (frozenset(sans) if sans else None)


def _version(name: str, key: str) -> ssl.TLSVersion:
    if name not in TLS_VERSIONS:
        raise WebConfigError(f"tls_server_config: unknown TLS version {name!r} for {key} "
                             f"(one of {', '.join(TLS_VERSIONS)})")
    return TLS_VERSIONS[name]


def _ciphers(context: ssl.SSLContext, section: dict) -> None:
    suites = _string_list(section.get("cipher_suites"), "tls_server_config: cipher_suites")
    names = []
    for suite in suites:
        if suite in TLS13_SUITES:
            continue
        if suite not in CIPHER_SUITES:
            raise WebConfigError(f"tls_server_config: cipher suite {suite!r} is unknown or "
                                 f"cannot be offered by Python's ssl")
        names.append(CIPHER_SUITES[suite])
    if names:
        try:
            context.set_ciphers(":".join(names))
        except ssl.SSLError:
            raise WebConfigError("tls_server_config: OpenSSL here offers none of the "
                                 "configured cipher_suites") from None
    prefer = section.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise WebConfigError("tls_server_config: prefer_server_cipher_suites must be a boolean")
    if prefer:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    curves = _string_list(section.get("curve_preferences"), "tls_server_config: curve_preferences")
    unknown = [c for c in curves if c not in CURVES]
    if unknown:
        raise WebConfigError(f"tls_server_config: unknown curve {unknown[0]!r} (one of "
                             f"{', '.join(CURVES)})")
    if len(curves) > 1:
        raise WebConfigError("tls_server_config: Python's ssl can restrict the handshake to "
                             "one curve only; list one in curve_preferences or none")
    if curves:
        context.set_ecdh_curve(CURVES[curves[0]])


def _regular(path: str) -> None:
    """OpenSSL opens certificate files blocking: a FIFO there would stall the server."""
    if not path:
        return
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise WebConfigError(f"tls_server_config: {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise WebConfigError(f"tls_server_config: {path}: not a regular file")


def _load_chain(context, cert_file: str, key_file: str, cert: str, key: str) -> None:
    # ssl loads certificates from files only: inline PEM goes through private temporary
    # files (mkstemp: mode 0600) that are removed at once.
    made = []

    def spill(text: str) -> str:
        handle, name = tempfile.mkstemp(prefix="netstat-exporter-", suffix=".pem")
        made.append(name)
        with os.fdopen(handle, "w") as out:
            out.write(text)
        return name

    try:
        context.load_cert_chain(spill(cert) if cert else cert_file,
                                spill(key) if key else key_file)
    except (OSError, ssl.SSLError) as exc:
        raise WebConfigError(f"tls_server_config: cannot load certificate "
                             f"{cert_file or '(inline)'} with key {key_file or '(inline)'}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
    finally:
        for name in made:
            os.unlink(name)


def _stamp(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Watcher:
    """The current WebConfig, re-read when the file or one it names changes (checked at most
    once a second, when a connection arrives). A bad change keeps the last good one."""

    def __init__(self, path: str, clock=time.monotonic):
        self.path = path
        self.clock = clock
        self.current = load(path)  # at start an error is fatal (the caller exits 2)
        self._stamps = self._read_stamps()
        self._checked = clock()
        self._bad: str | None = None

    def _read_stamps(self):
        return tuple(_stamp(f) for f in self.current.files)

    def reload_soon(self) -> None:
        """SIGHUP: look at the files at the next connection, changed or not."""
        self._checked = float("-inf")
        self._stamps = ()

    def refresh(self) -> WebConfig:
        now = self.clock()
        if now - self._checked < 1.0:
            return self.current
        self._checked = now
        stamps = self._read_stamps()
        if stamps == self._stamps:
            return self.current
        try:
            fresh = load(self.path)
        except WebConfigError as exc:
            if str(exc) != self._bad:
                log.error("web config changed but cannot be used, keeping the last good one: "
                          "%s", exc)
                self._bad = str(exc)
            # stamps stay those of the last good config: a file the rejected one names
            # (a certificate not there yet) is looked for again at the next check
            return self.current
        self.current, self._bad = fresh, None
        self._stamps = self._read_stamps()
        log.info("web config %s reloaded (TLS %s, %d basic-auth users)", self.path,
                 "on" if fresh.tls else "off", len(fresh.users))
        return fresh


AUTH_CACHE_ENTRIES = 256
# bcrypt checks waiting at once; beyond, a request with new credentials is turned away at
# once: a flood of wrong passwords must not queue minutes of hashing (each attempt holding a
# connection) in front of the scraper whose credentials are already known.
AUTH_PENDING_LIMIT = 8


def basic_credentials(header: bytes | None) -> tuple[str, bytes] | None:
    """b"Basic dTpwdw==" -> ("u", b"pw"); anything else -> None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = binascii.a2b_base64(token.strip(), strict_mode=True)
        user, sep, password = decoded.partition(b":")
        return (user.decode("utf-8"), password) if sep else None
    except (binascii.Error, UnicodeDecodeError):
        return None


class Authenticator:
    """bcrypt checks (about 70 ms each at cost 10) in one worker thread, off the event loop,
    remembered by a digest of (user, password, hash) so a scraper pays once, not per scrape.

    Successes and failures are remembered apart, each least-recently-used first out: a flood
    of wrong passwords can only push out other wrong passwords, never the scraper's. An
    unknown user is checked against a hash of the same cost as the configured ones, so the
    time an answer takes does not tell which users exist."""

    def __init__(self, executor):
        self._executor = executor
        self._granted: collections.OrderedDict[bytes, bool] = collections.OrderedDict()
        self._refused: collections.OrderedDict[bytes, bool] = collections.OrderedDict()
        self._dummies: dict[bytes, bytes] = {}  # "$2b$10$" -> a hash of that cost
        self._pending = 0

    async def allowed(self, header: bytes | None, users: Mapping[str, bytes]) -> bool | None:
        """True or False; None when too many checks are already waiting (answer 503)."""
        credentials = basic_credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        hashed = users.get(user)
        key = hashlib.sha256(b"\0".join((user.encode(), password, hashed or b""))).digest()
        for known, verdict in ((self._granted, True), (self._refused, False)):
            if key in known:
                known.move_to_end(key)
                return verdict
        if self._pending >= AUTH_PENDING_LIMIT:
            return None
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            against = hashed
            if against is None:
                cost = next(iter(users.values()))[:7] if users else b"$2b$10$"
                if cost not in self._dummies:
                    self._dummies[cost] = await loop.run_in_executor(
                        self._executor, _dummy_hash, cost)
                against = self._dummies[cost]
            verdict = await loop.run_in_executor(self._executor, _check, password, against)
            verdict = verdict and hashed is not None
        finally:
            self._pending -= 1
        known = self._granted if verdict else self._refused
        known[key] = verdict
        while len(known) > AUTH_CACHE_ENTRIES:
            known.popitem(last=False)
        return verdict


def _dummy_hash(prefix: bytes) -> bytes:
    """A hash of the cost in `prefix` ("$2b$12$"), of a password no one knows."""
    return bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(int(prefix[4:6])))


def _check(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # a password over bcrypt's 72 bytes, or a hash it refuses
        return False
