"""Ways in: the endpoints an access key names, each a URL whose scheme says how to reach it.

::

    tls://HOST:PORT      veil's TLS port at another address or port (an extra --listen port,
                         an operator's DNAT, a second address of the same server)
    https://HOST[:PORT]/SECRET/
                         through a CDN or reverse proxy in front of veil's port, on a secret
                         path: packet-up (a streaming GET down, small POSTs up), which survives
                         a proxy that buffers request bodies (veil.transport.cdn)
    wss://HOST[:PORT]/SECRET/
                         the same path as a WebSocket, for proxies that pass WebSockets on

The key's own ``HOST:PORT`` is the first way in (``tls``, the preferred one); ``via=`` query
parameters add the others, in order of preference. A scheme this veil does not speak (say a
future ``https://`` CDN URL) is kept as written, so a key round-trips, and a client skips it:
new kinds of ways in do not break old clients, which simply use the ones they know.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from veil.errors import ConfigError
from veil.protocol.address import Address, parse_host_port

#: The schemes this veil can connect through.
KNOWN_SCHEMES = ("tls", "https", "wss")
#: The ways through a CDN: the session inside rides Noise NK to the key's ``nk`` (the CDN
#: reads what its TLS carried), and which carrier variant each scheme asks for.
CDN_VARIANTS = {"https": "packet-up", "wss": "websocket"}
#: A CDN way's secret path: ``/SECRET/``, at least this many characters between the slashes
#: (unguessable; veil serve makes 22 of base64url), of a kind the cover's path normalisation
#: leaves alone.
MIN_SECRET_CHARS = 16
_SECRET_PATH = re.compile(r"/(?!.*//)(?!.*/\.)[A-Za-z0-9_\-/.~]+/")
#: Extra ways in one key may carry: a key is one line and a QR code (each way costs ~30-100
#: characters; eight keep a key with CDN URLs under ~1 KB, a QR code a phone still reads).
MAX_VIA = 8
#: Longest way in, as written: a CDN URL with a long secret path fits; a pasted page does not.
MAX_ENDPOINT_CHARS = 512
# RFC 3986's scheme syntax, then "://" and a non-empty rest.
_SHAPE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.+)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One way in."""

    url: str
    """As it is written into keys (the scheme in lower case)."""
    scheme: str
    address: Address | None = None
    """Where to connect, for the schemes this veil speaks; None for the others."""
    path: str = ""
    """A CDN way's secret path (``/SECRET/``); empty for the others."""

    @property
    def known(self) -> bool:
        """Whether this client can use it."""
        return self.scheme in KNOWN_SCHEMES

    @property
    def through_cdn(self) -> bool:
        return self.scheme in CDN_VARIANTS

    def __str__(self) -> str:
        """How logs name it: ``HOST:PORT`` for TLS, a CDN way without its secret path
        (logs hold no secrets), the URL otherwise."""
        if self.through_cdn:
            return self.url[: len(self.url) - len(self.path)] + "/..."
        return str(self.address) if self.address is not None else self.url


def tls_endpoint(address: Address) -> Endpoint:
    """The TLS way in at ``address``."""
    return Endpoint(f"tls://{address}", "tls", address)


def parse_endpoint(text: str) -> Endpoint:
    """Read one way in; ConfigError with a one-line reason when it is not one.

    ``tls://HOST:PORT`` must be exactly that (IPv6 in brackets, nothing after the port); any
    other scheme is kept as written, provided it is one printable line of URL shape.
    """
    shown = text if len(text) <= 80 else text[:80] + "..."
    if len(text) > MAX_ENDPOINT_CHARS:
        raise ConfigError(f"way in {shown!r} is longer than {MAX_ENDPOINT_CHARS} characters",
                          code="bad_endpoint")
    if not text.isascii() or not text.isprintable() or any(c.isspace() for c in text):
        raise ConfigError(f"way in {shown!r} must be one line of printable ASCII without spaces",
                          code="bad_endpoint")
    match = _SHAPE.fullmatch(text)
    if match is None:
        raise ConfigError(f"way in {shown!r} is not a URL: use e.g. tls://203.0.113.7:8443",
                          code="bad_endpoint")
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme in CDN_VARIANTS:
        return _cdn_endpoint(scheme, rest, shown)
    if scheme != "tls":
        return Endpoint(f"{scheme}://{rest}", scheme)
    if any(c in rest for c in "/?#@"):
        raise ConfigError(f"way in {shown!r}: tls:// takes HOST:PORT and nothing else",
                          code="bad_endpoint")
    try:
        address = parse_host_port(rest)
        if not 1 <= address.port <= 0xFFFF:
            raise ValueError(f"port {address.port} is not 1-65535")
        if "[" in address.host or "]" in address.host:
            raise ValueError("stray bracket")
        if ":" in address.host:
            ipaddress.IPv6Address(address.host)
    except ValueError as exc:
        raise ConfigError(f"way in {shown!r}: {exc}", code="bad_endpoint") from exc
    return tls_endpoint(Address(address.host.lower(), address.port))


def _cdn_endpoint(scheme: str, rest: str, shown: str) -> Endpoint:
    authority, slash, path = rest.partition("/")
    path = slash + path
    if not authority or "@" in authority or "?" in path or "#" in path:
        raise ConfigError(f"way in {shown!r}: {scheme}:// takes HOST[:PORT]/SECRET/ and nothing "
                          "else", code="bad_endpoint")
    if not _SECRET_PATH.fullmatch(path) or len(path) < MIN_SECRET_CHARS + 2:
        raise ConfigError(f"way in {shown!r}: the path must be /SECRET/ with at least "
                          f"{MIN_SECRET_CHARS} characters of letters, digits and -_.~/ "
                          "(veil serve --help shows how to make one)", code="bad_endpoint")
    try:
        address = parse_host_port(authority if authority.rpartition(":")[2].isdigit()
                                  and not authority.endswith("]") else f"{authority}:443")
        if not 1 <= address.port <= 0xFFFF:
            raise ValueError(f"port {address.port} is not 1-65535")
    except ValueError as exc:
        raise ConfigError(f"way in {shown!r}: {exc}", code="bad_endpoint") from exc
    host = address.host.lower()
    url_host = f"[{host}]" if ":" in host else host
    port = "" if address.port == 443 else f":{address.port}"
    return Endpoint(f"{scheme}://{url_host}{port}{path}", scheme, Address(host, address.port),
                    path)
