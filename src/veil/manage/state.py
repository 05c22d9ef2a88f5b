"""The server's state directory: identity, certificate, user store and the config that goes
into access keys.

::

    DIR/config.json   {"public": "host:port", "sni": name-or-null, "cert": ..., "key": ...}
    DIR/key.pem       the TLS private key (0600); its public key is what clients pin
    DIR/cert.pem      a self-signed certificate for that key, renewed before it expires
    DIR/users.db      the SQLite user store (or "db": a postgresql:// URL in config.json)
    DIR/store.key     the key that seals secrets in the store (0600; docs/store.md): a fleet
                      of servers on one PostgreSQL shares one copy of it

The pin is the SHA-256 of the certificate's SubjectPublicKeyInfo, so renewing the certificate
with the same key (done automatically, and what ACME clients do with --reuse-key) keeps every
access key valid.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from veil.errors import ConfigError
from veil.protocol.accesskey import AccessKey, default_sni, spki_pin
from veil.protocol.address import Address, parse_host_port
from veil.protocol.trojan import password_hash_for_secret
from veil.store import open_store
from veil.store.base import SecretBox, User, UserStore

CONFIG_NAME = "config.json"
STORE_KEY_NAME = "store.key"
# Let's Encrypt issues 90-day certificates; a self-signed one of the same lifetime looks
# less unusual than a ten-year one, and is renewed when a third of it is left.
CERT_LIFETIME = datetime.timedelta(days=90)
CERT_RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True, slots=True)
class ServerState:
    directory: Path
    public: Address
    sni: str | None
    cert_path: Path
    key_path: Path
    pin: bytes
    #: A postgresql:// URL for a shared store, or None for DIR/users.db.
    db: str | None = None

    def open_store(self) -> UserStore:
        return open_store(self.db or self.directory / "users.db",
                          trojan_hash=password_hash_for_secret,
                          box=SecretBox(_store_key(self.directory)))

    def access_key(self, user: User) -> AccessKey:
        return AccessKey(self.public, user.secret, self.pin, self.sni, user.name)


def self_signed_certificate(key: ec.EllipticCurvePrivateKey, name: str) -> x509.Certificate:
    """A server certificate for ``name`` (a DNS name or an IP address) signed by ``key``."""
    now = datetime.datetime.now(datetime.UTC)
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        san = x509.DNSName(name)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + CERT_LIFETIME)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _store_key(directory: Path) -> bytes:
    path = directory / STORE_KEY_NAME
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    key = os.urandom(SecretBox.KEY_SIZE)
    # O_EXCL: two processes creating it at once must not end with two different keys.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


def _ensure_certificate(directory: Path, name: str) -> None:
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    if key_path.exists():
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            # Never replaced: every access key pins it.
            raise ConfigError(f"cannot read the server key {key_path}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path}: expected an EC private key")
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        _write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    if cert_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError:
            cert = None  # damaged: made anew below for the same key, so pins stay valid
        if cert is not None:
            left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
            if left > CERT_RENEW_BEFORE and cert.public_key() == key.public_key():
                return
    cert = self_signed_certificate(key, name)
    tmp = cert_path.with_suffix(".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp.replace(cert_path)


def init_state(directory: Path, *, listen: Address, public: str | None = None,
               cert: Path | None = None, key: Path | None = None,
               db: str | None = None) -> tuple[ServerState, bool]:
    """Create the state directory if needed, or load it. Returns (state, created)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    config_path = directory / CONFIG_NAME
    created = not config_path.exists()
    if created:
        public_addr = parse_host_port(public, listen.port) if public else listen
        if public_addr.host in ("0.0.0.0", "::"):
            raise ConfigError("listening on all addresses: say which address clients use "
                              "with --public HOST[:PORT]")
        config = {"public": str(public_addr), "sni": default_sni(public_addr.host),
                  "cert": str(cert) if cert else None, "key": str(key) if key else None,
                  "db": db}
        _write_config(config_path, config)
    else:
        config = json.loads(config_path.read_text())
        changed = False
        if public and parse_host_port(public, listen.port) != parse_host_port(config["public"]):
            config["public"] = str(parse_host_port(public, listen.port))
            config["sni"] = default_sni(parse_host_port(public, listen.port).host)
            changed = True
        if cert and key:
            config["cert"], config["key"] = str(cert), str(key)
            changed = True
        if db and db != config.get("db"):
            config["db"] = db
            changed = True
        if changed:
            _write_config(config_path, config)
    return load_state(directory), created


def _write_config(path: Path, config: Mapping[str, object]) -> None:
    # 0600: with a PostgreSQL store the config holds the database URL and its password.
    tmp = path.with_suffix(".tmp")
    _write_private(tmp, (json.dumps(config, indent=2) + "\n").encode())
    tmp.replace(path)


def load_state(directory: Path, db: str | None = None) -> ServerState:
    """Load an initialised state directory; ``db`` overrides the configured store."""
    config_path = directory / CONFIG_NAME
    if not config_path.exists():
        raise ConfigError(f"{directory} is not an initialised veil state directory "
                          "(run `veil serve --state DIR --listen HOST:PORT` once, or pass "
                          "--public HOST:PORT)")
    try:
        config = json.loads(config_path.read_text())
        public = parse_host_port(config["public"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{config_path} is damaged: {exc}") from exc
    sni = config.get("sni")
    if config.get("cert") and config.get("key"):
        cert_path, key_path = Path(config["cert"]), Path(config["key"])
    else:
        _ensure_certificate(directory, sni or public.host)
        cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read certificate {cert_path}: {exc}") from exc
    return ServerState(directory, public, sni, cert_path, key_path, spki_pin(cert),
                       db or config.get("db"))


def server_ssl_context(state: ServerState,
                       alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
    """TLS settings of a default nginx on Debian: TLS 1.2 and 1.3, and the ALPN protocols
    ``alpn`` in the server's order of preference. The gate passes its cover's
    (:attr:`Cover.alpn_protocols`): ``h2`` first for the built-in cover, as nginx with
    ``listen 443 ssl http2`` answers a browser; ``http/1.1`` alone for a URL cover, which
    relays to an HTTP/1.1 server, and for the admin panel.

    It lives with the state, not the server's runtime, because the tunnel port and the admin
    panel both present the state's certificate and key this way."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("HIGH:!aNULL:!MD5")
    context.set_alpn_protocols(list(alpn))
    context.load_cert_chain(state.cert_path, state.key_path)
    return context
