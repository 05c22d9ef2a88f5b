"""The URI shape users paste: ``scheme://userinfo@host[:port][?query][#fragment]``.

veil:// access keys and trojan:// links share it; this module reads the shape, and each of
them gives the parts their meaning (what the userinfo holds, whether a port is required, which
query keys count) and its own error messages.

Why not ``urlsplit`` alone: it takes the host from after the *last* "@" but checks the
brackets of the *first* one, so in ``p@[::]:1@[:x:]:4`` the literal it checks is ``[::]``
(inside the userinfo) and the host it hands out, ``:x:``, is never checked. Both parsers once
had that bug; here a host holding ":" must be a valid IPv6 address.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from veil.errors import ConfigError


class UriError(ConfigError):
    """The text does not have the shape; ``code`` says which part is wrong.

    Codes: ``unreadable`` (urlsplit refused it, or the port is not 0-65535; the message says
    why), ``wrong_scheme``, ``no_user_or_host`` (an empty userinfo or host), ``bad_ipv6``.
    """


@dataclass(frozen=True, slots=True)
class AuthorityUri:
    """The parts of one URI, split but not interpreted."""

    scheme: str
    userinfo: str
    """Everything before the last "@", still percent-encoded (a ":" in it is kept)."""
    host: str
    """Lower-cased, as DNS names compare; an IPv6 literal without its brackets, checked."""
    port: int | None
    """None when the URI has none: whether that is allowed is the caller's business."""
    query: dict[str, list[str]]
    """``parse_qs`` of the query: percent-decoded, keys without a value left out."""
    fragment: str
    """Percent-decoded."""


def parse_authority_uri(text: str, scheme: str) -> AuthorityUri:
    """Split ``text`` (surrounding whitespace ignored); UriError when it is not the shape."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as exc:
        raise UriError(str(exc), code="unreadable") from exc
    if parts.scheme != scheme:
        raise UriError(f"not a {scheme}:// URI", code="wrong_scheme")
    userinfo = parts.netloc.rpartition("@")[0]
    host = parts.hostname
    if not userinfo or not host:
        raise UriError("needs USERINFO@HOST", code="no_user_or_host")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise UriError("bad IPv6 address", code="bad_ipv6") from exc
    return AuthorityUri(parts.scheme, userinfo, host, port, parse_qs(parts.query),
                        unquote(parts.fragment))
