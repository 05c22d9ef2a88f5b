"""The server's state directory: identity, certificate, user store and the config that goes
into access keys.

::

    DIR/config.json   {"public": "host:port", "sni": name-or-null, "cert": ..., "key": ...,
                      "trojan": whether the last start that succeeded had its Trojan way in
                      on (``veil serve --trojan``), absent until a server has started,
                      "via": the further ways in keys name (``veil serve --via``), in order,
                      "routing": the rules the app exports carry (``veil serve --routing``),
                      "none" when absent}
    DIR/key.pem       the TLS private key (0600); its public key is what clients pin
    DIR/cert.pem      a self-signed certificate for that key and the public name, renewed
                      before it expires and when ``--public`` renames the server
    DIR/acme-cert.pem the CA-issued chain for DIR/key.pem, when ACME obtained one
                      (veil.manage.acme): presented instead of cert.pem while it names the
                      public name and is not expired; cert.pem stays the fallback
    DIR/users.db      the SQLite user store (or "db": a postgresql:// URL in config.json)
    DIR/store.key     the key that seals secrets in the store (0600; docs/store.md): a fleet
                      of servers on one PostgreSQL shares one copy of it
    DIR/site.seed     {"seed": hex, "created": unix time} (0600): what this install's cover
                      site and the pattern of its self-signed certificate are drawn from, so
                      that no two installs look alike and each looks the same across restarts

The pin is the SHA-256 of the certificate's SubjectPublicKeyInfo, so renewing the certificate
with the same key (done automatically, and what ACME clients do with --reuse-key) keeps every
access key valid.
"""

from __future__ import annotations

import dataclasses
import datetime
import hmac
import ipaddress
import json
import os
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from veil.errors import ConfigError
from veil.manage.libssl import match_nginx_sessions
from veil.protocol.accesskey import NOISE_KEY_SIZE, AccessKey, default_sni, spki_pin
from veil.protocol.address import Address, parse_host_port
from veil.protocol.endpoint import Endpoint, parse_endpoint, tls_endpoint
from veil.protocol.noise import generate_static_keypair, public_key_from_private
from veil.protocol.seeded import SEED_BYTES, Draw, SiteSeed
from veil.protocol.trojan import password_hash_for_secret
from veil.store import open_store
from veil.store.base import SecretBox, User, UserStore

CONFIG_NAME = "config.json"
STORE_KEY_NAME = "store.key"
SEED_NAME = "site.seed"
NOISE_KEY_NAME = "noise.key"
ACME_CERT_NAME = "acme-cert.pem"
# A certificate is renewed when a third of its life is left, and at most this early: a
# 90-day one (Let's Encrypt's lifetime) 30 days before it expires, a 398-day one too.
CERT_RENEW_BEFORE = datetime.timedelta(days=30)
# Lifetimes real self-signed and CA-issued certificates have, in days: openssl req's default
# (30), ACME's (90), `-days 365`, the CA/B Forum maximum (398) and its common 397, two years.
# Drawn once per install, so installs differ and each keeps its own across renewals.
CERT_LIFETIMES_DAYS = (30, 90, 90, 365, 365, 397, 398, 730)
# notBefore is set this far into the past (hours, drawn per install, plus minutes): issuers
# backdate against clock skew (Let's Encrypt by an hour), openssl not at all.
CERT_BACKDATE_HOURS = (0, 47)
# Key types of real small sites' certificates, in the client's pinning (SPKI: any key works)
# and TLS code (ECDSA and RSA-PSS signatures): RSA-2048 and P-256 are the common ones.
KEY_TYPES = ("P-256", "P-256", "P-384", "RSA-2048", "RSA-2048")
# Subject countries for certificates that name one (openssl's default names AU).
_COUNTRIES = ("AU", "DE", "NL", "FR", "GB", "US", "SE", "PL", "CZ", "FI", "CA", "AT")
_ORG_WORDS = ("Studio", "Works", "Digital", "Labs", "Media", "Systems", "Web", "Design")
_ORG_NAMES = ("Nordlicht", "Blue Harbour", "Kestrel", "Larch", "Ferro", "Mosaic", "Tallow",
              "Quarry", "Juniper", "Meridian", "Brightwater", "Copperfield")


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
    #: What this install's built-in cover site is generated from (DIR/site.seed).
    site_seed: SiteSeed | None = None
    #: Whether the last server start that succeeded on this state had the Trojan way in on
    #: (:func:`record_start`); None: no server has started on it since veil records this,
    #: so nobody knows (the exports then refuse to hand out a Trojan link).
    trojan: bool | None = None
    #: The further ways in every key names after ``public`` (``veil serve --via``).
    via: tuple[Endpoint, ...] = ()
    #: The Noise static private key (DIR/noise.key) the CDN ways in answer with.
    noise_private: bytes | None = None
    #: The routing rules the Clash Meta and sing-box exports carry (``veil serve --routing``,
    #: written down by :func:`record_start`): "none" or "cn" (veil.manage.rules); anything
    #: else exports no rules.
    routing: str = "none"
    #: Where the certificate presented comes from: "operator" (``--cert``/``--key``), "acme"
    #: (DIR/acme-cert.pem) or "self-signed" (DIR/cert.pem).
    cert_source: str = "self-signed"
    #: ``veil serve --borrow HOST[:PORT]`` (experimental): the site whose identity the server
    #: borrows, written into keys as their SNI (veil.server.borrow); None: its own.
    borrow: Address | None = None

    @property
    def noise_public(self) -> bytes | None:
        return None if self.noise_private is None else public_key_from_private(self.noise_private)

    @property
    def cdn_ways(self) -> tuple[Endpoint, ...]:
        return tuple(way for way in self.via if way.through_cdn)

    def open_store(self) -> UserStore:
        return open_store(self.db or self.directory / "users.db",
                          trojan_hash=password_hash_for_secret,
                          box=SecretBox(_store_key(self.directory)))

    def subscription_key(self) -> bytes:
        """The key subscription tokens are drawn with (veil.manage.subscription): derived
        from DIR/store.key, so a fleet that shares the store key shares the tokens, and
        nothing in the database alone gives them."""
        return hmac.digest(_store_key(self.directory), b"veil subscription token", "sha256")

    def access_key(self, user: User) -> AccessKey:
        # The Noise key only where a way needs it: keys without CDN ways stay as they were.
        noise_key = self.noise_public if self.cdn_ways or self.borrow else None
        if self.borrow is not None:
            return AccessKey(self.public, user.secret, self.pin, self.borrow.host, user.name,
                             self.via, noise_key, borrowed=True)
        return AccessKey(self.public, user.secret, self.pin, self.sni, user.name, self.via,
                         noise_key)

    def ways(self) -> tuple[Endpoint, ...]:
        """Every way in keys name, the public address first."""
        return (tls_endpoint(self.public), *self.via)


@dataclass(frozen=True, slots=True)
class CertificateProfile:
    """How this install's self-signed certificates look: drawn from its seed, the same for
    every renewal (and the key is kept, so pins survive)."""

    key_type: str = "P-256"
    lifetime: datetime.timedelta = datetime.timedelta(days=90)
    backdate: datetime.timedelta = datetime.timedelta(hours=1)
    #: (attribute, value) pairs before the CN, as openssl req writes them.
    subject: tuple[tuple[str, str], ...] = ()
    #: openssl req -x509's extensions (key identifiers, CA:TRUE) rather than a leaf's.
    openssl_style: bool = False

    @classmethod
    def for_seed(cls, seed: SiteSeed) -> CertificateProfile:
        d = Draw(seed.seed, "veil certificate v1")
        key_type = d.choice(KEY_TYPES)
        lifetime = datetime.timedelta(days=d.choice(CERT_LIFETIMES_DAYS))
        backdate = datetime.timedelta(hours=d.between(*CERT_BACKDATE_HOURS),
                                      seconds=d.below(3600))
        form = d.below(4)
        subject: tuple[tuple[str, str], ...]
        if form == 0:
            subject = ()
        elif form == 1:  # openssl req's defaults, accepted by pressing Enter
            subject = (("C", "AU"), ("ST", "Some-State"), ("O", "Internet Widgits Pty Ltd"))
        else:
            org = f"{d.choice(_ORG_NAMES)} {d.choice(_ORG_WORDS)}"
            subject = (("C", d.choice(_COUNTRIES)), ("O", org))
            if form == 3:
                subject += (("OU", d.choice(("IT", "Web", "Operations", "Hosting"))),)
        return cls(key_type, lifetime, backdate, subject, d.chance(40))

    def new_key(self) -> ServerKey:
        if self.key_type == "RSA-2048":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        curve = ec.SECP384R1() if self.key_type == "P-384" else ec.SECP256R1()
        return ec.generate_private_key(curve)



ServerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def renew_before(lifetime: datetime.timedelta) -> datetime.timedelta:
    """How long before it expires a certificate of this lifetime is renewed."""
    return min(CERT_RENEW_BEFORE, lifetime / 3)
_SUBJECT_OIDS = {"C": NameOID.COUNTRY_NAME, "ST": NameOID.STATE_OR_PROVINCE_NAME,
                 "O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME}


def self_signed_certificate(key: ServerKey, name: str,
                            profile: CertificateProfile | None = None) -> x509.Certificate:
    """A server certificate for ``name`` (a DNS name or an IP address) signed by ``key``,
    shaped by ``profile`` (the install's; by default 90 days, backdated an hour, CN only)."""
    profile = profile or CertificateProfile()
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        san = x509.DNSName(name)
    subject = x509.Name([x509.NameAttribute(_SUBJECT_OIDS[k], v) for k, v in profile.subject]
                        + [x509.NameAttribute(NameOID.COMMON_NAME, name)])
    not_before = now - profile.backdate
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before)
               .not_valid_after(not_before + profile.lifetime))
    if profile.openssl_style:
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        builder = (builder.add_extension(ski, critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                       ski), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                  critical=True)
                   .add_extension(x509.SubjectAlternativeName([san]), critical=False))
    else:
        builder = (builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage(
                       [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    digest = hashes.SHA384() if profile.key_type == "P-384" else hashes.SHA256()
    return builder.sign(key, digest)


def _names(cert: x509.Certificate, name: str) -> bool:
    """Whether ``cert`` is one :func:`self_signed_certificate` made for ``name``: its
    subjectAltName holds ``name`` and nothing else."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        wanted: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        wanted = x509.DNSName(name)
    return list(san) == [wanted]


def _key_type(key: ServerKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA-2048"
    return "P-384" if key.curve.name == "secp384r1" else "P-256"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, readable by the owner only (0600): keys and secrets."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _private_file(path: Path, make: Callable[[], bytes]) -> bytes:
    """A secret kept in ``path`` (mode 0600), made by ``make`` on first use."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    secret = make()
    # O_EXCL: two processes creating it at once must not end with two different secrets.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
        f.flush()
        os.fsync(f.fileno())
    return secret


def _store_key(directory: Path) -> bytes:
    return _private_file(directory / STORE_KEY_NAME, lambda: os.urandom(SecretBox.KEY_SIZE))


def _noise_key(directory: Path) -> bytes:
    """The server's Noise static private key (the CDN ways in, veil.net.noise_channel): made
    on first use, so a state from before CDN ways gets one at its next start."""
    key = _private_file(directory / NOISE_KEY_NAME, lambda: generate_static_keypair().private)
    if len(key) != NOISE_KEY_SIZE:
        raise ConfigError(f"{directory / NOISE_KEY_NAME} is damaged (not {NOISE_KEY_SIZE} "
                          "bytes); keys with CDN ways in name its public half, so restore it "
                          "from a backup rather than delete it")
    return key


def _site_seed(directory: Path) -> SiteSeed:
    """The install's seed, made on first use (at init, or the first start of a state from
    before seeds: nothing else in the state changes)."""
    path = directory / SEED_NAME
    try:
        return _parse_seed(path, path.read_bytes())
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    seed = SiteSeed.new(time.time())
    data = json.dumps({"seed": seed.seed.hex(), "created": seed.created}).encode() + b"\n"
    # O_EXCL: two processes starting at once must not end with two different sites.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _parse_seed(path, path.read_bytes())
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return seed


def _parse_seed(path: Path, data: bytes) -> SiteSeed:
    try:
        raw = json.loads(data)
        seed = SiteSeed(bytes.fromhex(raw["seed"]), int(raw["created"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is damaged: {exc}") from exc
    if len(seed.seed) != SEED_BYTES:
        raise ConfigError(f"{path} is damaged: the seed is not {SEED_BYTES} bytes")
    return seed


def _ensure_certificate(directory: Path, name: str, profile: CertificateProfile) -> None:
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key: ServerKey
    if key_path.exists():
        try:
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            # Never replaced: every access key pins it.
            raise ConfigError(f"cannot read the server key {key_path}: {exc}") from exc
        if not isinstance(loaded, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ConfigError(f"{key_path}: expected an EC or RSA private key")
        key = loaded
        # The key decides the signature hash, not the profile drawn for a new install.
        profile = dataclasses.replace(profile, key_type=_key_type(key))
    else:
        key = profile.new_key()
        write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    if cert_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError:
            cert = None  # damaged: made anew below for the same key, so pins stay valid
        if cert is not None:
            # Judged by the certificate's own lifetime, not the profile's: a state whose seed
            # was made after its certificate (an older install) draws another lifetime.
            lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
            left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
            if (left > renew_before(lifetime) and cert.public_key() == key.public_key()
                    and _names(cert, name)):
                return
    # Renewed, repaired, or renamed (`--public` changed): made anew for the same key, so
    # every access key (they pin the key, not the certificate) stays valid.
    cert = self_signed_certificate(key, name, profile)
    tmp = cert_path.with_suffix(".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp.replace(cert_path)


def init_state(directory: Path, *, listen: Address, public: str | None = None,
               cert: Path | None = None, key: Path | None = None,
               db: str | None = None,
               via: Sequence[Endpoint] | None = None,
               borrow: Address | bool | None = False) -> tuple[ServerState, bool]:
    """Create the state directory if needed, or load it. Returns (state, created).

    ``via`` replaces the ways in keys name after the public address (``veil serve`` says
    them on every start, so a start without ``--via`` announces none); None keeps them.
    ``borrow`` likewise replaces the borrowed site (None: none); False keeps it."""
    _check_directory(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"cannot make the state directory {directory}: "
                          f"{exc.strerror or exc}") from exc
    config_path = directory / CONFIG_NAME
    created = not config_path.exists()
    if created:
        public_addr = parse_host_port(public, listen.port) if public else listen
        if public_addr.host in ("0.0.0.0", "::"):
            raise ConfigError("listening on all addresses: say which address clients use "
                              "with --public HOST[:PORT]")
        config = {"public": str(public_addr), "sni": default_sni(public_addr.host),
                  "cert": str(cert) if cert else None, "key": str(key) if key else None,
                  "db": db, "via": [way.url for way in via or ()]}
        if isinstance(borrow, Address):
            config["borrow"] = str(borrow)
        _check_via(config)
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
        if via is not None and [way.url for way in via] != config.get("via", []):
            config["via"] = [way.url for way in via]
            changed = True
        if borrow is not False and config.get("borrow") != (borrow and str(borrow)):
            config["borrow"] = str(borrow) if isinstance(borrow, Address) else None
            changed = True
        if changed:
            _check_via(config)
            _write_config(config_path, config)
    return load_state(directory), created


def _check_via(config: Mapping[str, object]) -> None:
    """A way in that is the public address already would make every key unreadable."""
    public = tls_endpoint(parse_host_port(str(config["public"])))
    vias = config.get("via") or []
    if isinstance(vias, list) and public.url in vias:
        raise ConfigError(f"--via {public.url} is the public address already: keys name it "
                          "first by themselves")


def _write_config(path: Path, config: Mapping[str, object]) -> None:
    # 0600: with a PostgreSQL store the config holds the database URL and its password.
    tmp = path.with_suffix(".tmp")
    write_private(tmp, (json.dumps(config, indent=2) + "\n").encode())
    tmp.replace(path)


def _check_directory(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"the state directory {directory} is a file, not a directory "
                          "(say another --state DIR)")


def load_state(directory: Path, db: str | None = None) -> ServerState:
    """Load an initialised state directory; ``db`` overrides the configured store."""
    _check_directory(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.exists():
        raise ConfigError(f"{directory} is not an initialised veil state directory "
                          "(run `veil serve --state DIR --listen HOST:PORT` once, or pass "
                          "--public HOST:PORT)")
    try:
        config = json.loads(config_path.read_text())
        public = parse_host_port(config["public"])
        via = tuple(parse_endpoint(text) for text in config.get("via") or [])
        borrow = parse_host_port(config["borrow"], 443) if config.get("borrow") else None
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
        raise ConfigError(f"{config_path} is damaged: {exc}") from exc
    sni = config.get("sni")
    site_seed = _site_seed(directory)
    cert_source = "self-signed"
    if config.get("cert") and config.get("key"):
        cert_path, key_path = Path(config["cert"]), Path(config["key"])
        cert_source = "operator"
    else:
        _ensure_certificate(directory, sni or public.host, CertificateProfile.for_seed(site_seed))
        cert_path, key_path = directory / "cert.pem", directory / "key.pem"
        if sni is not None and current_ca_certificate(directory, sni) is not None:
            cert_path, cert_source = directory / ACME_CERT_NAME, "acme"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read certificate {cert_path}: {exc}") from exc
    trojan = config.get("trojan")
    # A value this veil does not know (a newer one's preset) means no routing rules.
    routing = config.get("routing", "none")
    if not isinstance(routing, str):
        routing = "none"
    return ServerState(directory, public, sni, cert_path, key_path, spki_pin(cert),
                       db or config.get("db"), site_seed,
                       trojan if isinstance(trojan, bool) else None, via,
                       _noise_key(directory), routing, cert_source, borrow)


def current_ca_certificate(directory: Path, name: str) -> x509.Certificate | None:
    """The leaf of DIR/acme-cert.pem if it may be presented: for the state's key (the pin),
    naming ``name``, and not expired; None otherwise (absent, damaged, for another name)."""
    try:
        cert = x509.load_pem_x509_certificate((directory / ACME_CERT_NAME).read_bytes())
        key = serialization.load_pem_private_key((directory / "key.pem").read_bytes(), None)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return None
    now = datetime.datetime.now(datetime.UTC)
    if (cert.public_key() != key.public_key() or name not in san.get_values_for_type(x509.DNSName)
            or not cert.not_valid_before_utc <= now < cert.not_valid_after_utc):
        return None
    return cert


def record_start(directory: Path, *, trojan: bool, via: Sequence[Endpoint] = (),
                 routing: str = "none") -> None:
    """Write down what a server that has just started listening serves, for the CLI and the
    panel that hand out links (a start that failed must not get here: it serves nothing):
    whether it takes Trojan, the further ways in its keys name, and the routing rules its
    app exports carry."""
    config_path = directory / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot update {config_path}: {exc}") from exc
    urls = [way.url for way in via]
    if (config.get("trojan") is not trojan or config.get("via", []) != urls
            or config.get("routing", "none") != routing):
        config["trojan"] = trojan
        config["via"] = urls
        if routing == "none":  # the default, absent: a state from before stays as it was
            config.pop("routing", None)
        else:
            config["routing"] = routing
        _check_via(config)
        try:
            _write_config(config_path, config)
        except OSError as exc:
            raise ConfigError(f"cannot update {config_path}: {exc.strerror}") from exc


def server_ssl_context(state: ServerState,
                       alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
    """TLS settings of a default nginx on Debian (TLS 1.0 to 1.3 allowed, OpenSSL 3.0 letting
    only 1.2 and 1.3 complete), and the ALPN protocols
    ``alpn`` in the server's order of preference. The gate passes its cover's
    (:attr:`Cover.alpn_protocols`): ``h2`` first for the built-in cover, as nginx with
    ``listen 443 ssl http2`` answers a browser; ``http/1.1`` alone for a URL cover, which
    relays to an HTTP/1.1 server, and for the admin panel.

    Sessions as nginx's defaults have them (``ssl_session_timeout 5m``, ``ssl_session_cache
    none``, ``ssl_session_tickets on``), which the ``ssl`` module cannot set:
    :func:`~veil.manage.libssl.match_nginx_sessions` does it through libssl where it can
    verify it is safe, and warns otherwise.

    It lives with the state, not the server's runtime, because the tunnel port and the admin
    panel both present the state's certificate and key this way."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Debian's nginx.conf says ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3: OpenSSL 3.0 then
    # negotiates TLS 1.0 or 1.1 with a client offering nothing newer and fails it for want of
    # a cipher its security level allows (handshake_failure, in the client's version). A
    # TLS 1.2 minimum would answer protocol_version instead, which no nginx on Debian does.
    # (MINIMUM_SUPPORTED is TLS 1.0 here: Debian builds OpenSSL without SSLv3.)
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.set_ciphers("HIGH:!aNULL:!MD5")
    context.set_alpn_protocols(list(alpn))
    # nginx has a server name callback (to pick its server block) and OpenSSL acknowledges
    # the client's SNI (an empty server_name extension: in the ServerHello for TLS 1.2, in
    # EncryptedExtensions for 1.3) only when one is set and accepts the name. One that
    # accepts every name, as nginx's default server does.
    context.sni_callback = _accept_any_server_name
    context.load_cert_chain(state.cert_path, state.key_path)
    match_nginx_sessions(context, _leaf_certificate_der(state.cert_path))
    return context


def _leaf_certificate_der(cert_path: Path) -> bytes:
    """The first certificate of a PEM file (the server's own, before any chain), as DER: the
    one nginx digests into its session id context."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read certificate {cert_path}: {exc}") from exc
    return certificate.public_bytes(serialization.Encoding.DER)


def _accept_any_server_name(_tls: ssl.SSLObject | ssl.SSLSocket, _name: str | None,
                            _context: ssl.SSLContext) -> None:
    return None
