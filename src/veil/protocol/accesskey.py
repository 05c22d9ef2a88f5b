"""Access keys: one ``veil://`` URI holding everything a client needs.

::

    veil://SECRET@HOST:PORT?pin=PIN[&sni=NAME][&via=URL...]#LABEL

- SECRET: the user's 32-byte secret, base64url without padding (the credential).
- HOST:PORT: where the server listens (IPv6 in brackets).
- pin: SHA-256 of the server certificate's SubjectPublicKeyInfo, base64url (RFC 7469 style).
  The client trusts the server only if its TLS key matches: never the web PKI.
- sni: the TLS server name to present; omitted when the server is reached by IP, as a
  browser would (no SNI for IP literals).
- nk: the server's Noise static public key (X25519, base64url), present when a via goes
  through a CDN (``https://``, ``wss://``): there TLS ends at the CDN, and the client
  authenticates the server by this key instead of the pin (veil.net.noise_channel).
- via: another way in to the same server (repeatable, in order of preference after
  HOST:PORT), e.g. ``via=tls://203.0.113.7:8443`` (veil.protocol.endpoint). Schemes this
  client does not speak are kept and skipped, so future kinds of ways in break no old client;
  clients from before ``via`` read the key as before and use HOST:PORT alone.
- borrowed: ``borrowed=1`` when the server has a borrowed identity (``veil serve --borrow``,
  experimental): sni names the borrowed site, and the client seals its ClientHello for nk
  (veil.protocol.borrow) and authenticates the server by that hello's secret, not the pin.
- LABEL: a human name (the user's), percent-encoded; informational only.
"""

from __future__ import annotations

import binascii
import hashlib
import ipaddress
from dataclasses import dataclass
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from veil.errors import ConfigError
from veil.protocol.address import Address
from veil.protocol.auth import SECRET_SIZE
from veil.protocol.endpoint import MAX_VIA, Endpoint, parse_endpoint, tls_endpoint
from veil.protocol.uri import (
    UriError,
    b64url_decode,
    b64url_encode,
    format_authority_uri,
    parse_authority_uri,
)

SCHEME = "veil"
PIN_SIZE = 32
NOISE_KEY_SIZE = 32  # an X25519 public key
# What each shape error of protocol.uri says about an access key ("{}": urlsplit's reason).
_URI_ERRORS = {
    "unreadable": "invalid access key: {}",
    "wrong_scheme": f"an access key starts with {SCHEME}://",
    "no_user_or_host": "invalid access key: needs SECRET@HOST:PORT",
    "bad_ipv6": "invalid access key: bad IPv6 address",
}


@dataclass(frozen=True, slots=True)
class AccessKey:
    server: Address
    secret: bytes
    pin: bytes
    sni: str | None = None
    label: str = ""
    #: The ways in after ``server``, in order of preference (``via=``).
    via: tuple[Endpoint, ...] = ()
    #: The server's Noise static public key (``nk=``), for the ways through a CDN and for a
    #: borrowed identity's sealed hellos.
    noise_key: bytes | None = None
    #: ``borrowed=1``: the server shows a borrowed site (``sni``) to everyone else; the client
    #: seals its hello for ``noise_key`` (veil.protocol.borrow).
    borrowed: bool = False

    def __post_init__(self) -> None:
        if self.borrowed and (self.noise_key is None or not self.sni):
            raise ConfigError("invalid access key: borrowed=1 needs nk= and sni=")

    def ways(self) -> tuple[Endpoint, ...]:
        """Every way in, the preferred (``server``) first."""
        return (tls_endpoint(self.server), *self.via)

    def to_uri(self) -> str:
        params = [f"pin={b64url_encode(self.pin)}"]
        if self.sni:
            params.append(f"sni={quote(self.sni, safe='')}")
        # ":" and "/" may stand in a query (RFC 3986): left as they are, tls://HOST:PORT reads.
        if self.noise_key is not None:
            params.append(f"nk={b64url_encode(self.noise_key)}")
        if self.borrowed:
            params.append("borrowed=1")
        params += [f"via={quote(way.url, safe=':/')}" for way in self.via]
        return format_authority_uri(SCHEME, b64url_encode(self.secret), str(self.server), params,
                                    self.label)

    @classmethod
    def parse(cls, uri: str) -> AccessKey:
        """Parse a key; ConfigError with a one-line reason when it is not a valid one."""
        try:
            parts = parse_authority_uri(uri, SCHEME)
        except UriError as exc:
            raise ConfigError(_URI_ERRORS[exc.code].format(exc)) from exc
        # The secret is the user part (urlsplit's username): text after a ":" is not read.
        text = parts.userinfo.partition(":")[0]
        if not text or parts.port is None:
            raise ConfigError(_URI_ERRORS["no_user_or_host"])
        try:
            secret = b64url_decode(text)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError("invalid access key: the secret is not base64url") from exc
        if len(secret) != SECRET_SIZE:
            raise ConfigError("invalid access key: wrong secret length (truncated copy?)")
        # b64decode skips characters outside the alphabet: only a key exactly as to_uri
        # writes it passes.
        if b64url_encode(secret) != text.rstrip("="):
            raise ConfigError("invalid access key: the secret is not base64url")
        query = parts.query
        try:
            pin = b64url_decode(query["pin"][0])
        except (KeyError, binascii.Error, ValueError) as exc:
            raise ConfigError("invalid access key: missing or bad pin") from exc
        if len(pin) != PIN_SIZE:
            raise ConfigError("invalid access key: wrong pin length")
        sni = query.get("sni", [None])[0]
        noise_key = None
        if "nk" in query:
            try:
                noise_key = b64url_decode(query["nk"][0])
            except (binascii.Error, ValueError) as exc:
                raise ConfigError("invalid access key: bad nk (the server's Noise key)") from exc
            if len(noise_key) != NOISE_KEY_SIZE:
                raise ConfigError("invalid access key: wrong nk length (truncated copy?)")
        server = Address(parts.host, parts.port)
        borrowed = query.get("borrowed", ["0"])[0] == "1"
        return cls(server, secret, pin, sni, parts.fragment, _parse_via(server, query),
                   noise_key, borrowed)


def _parse_via(server: Address, query: dict[str, list[str]]) -> tuple[Endpoint, ...]:
    texts = query.get("via", [])
    if len(texts) > MAX_VIA:
        raise ConfigError(f"invalid access key: {len(texts)} ways in (via=), at most {MAX_VIA}")
    ways: list[Endpoint] = [tls_endpoint(server)]
    for text in texts:
        try:
            way = parse_endpoint(text)
        except ConfigError as exc:
            raise ConfigError(f"invalid access key: bad via: {exc}") from exc
        if way in ways:
            raise ConfigError(f"invalid access key: via {way.url} repeats a way in")
        ways.append(way)
    return tuple(ways[1:])


def default_sni(host: str) -> str | None:
    """The SNI a browser would send for ``host``: the name itself, nothing for IP literals."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def spki_pin(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's SubjectPublicKeyInfo: what access keys pin."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def pin_of_der(der: bytes) -> bytes:
    return spki_pin(x509.load_der_x509_certificate(der))
