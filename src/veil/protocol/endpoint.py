"""Ways in: the endpoints an access key names, each a URL whose scheme says how to reach it.

::

    tls://HOST:PORT      veil's TLS port at another address or port (an extra --listen port,
                         an operator's DNAT, a second address of the same server)

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
KNOWN_SCHEMES = ("tls",)
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

    @property
    def known(self) -> bool:
        """Whether this client can use it."""
        return self.scheme in KNOWN_SCHEMES

    def __str__(self) -> str:
        """How logs name it: ``HOST:PORT`` for TLS, the URL otherwise."""
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
