"""The URI shape users paste: ``scheme://userinfo@host[:port][?query][#fragment]``.

veil:// access keys and trojan:// links share it; this module reads and writes the shape (and
the unpadded base64url both use for binary parts), and each of them gives the parts their
meaning (what the userinfo holds, whether a port is required, which query keys count) and its
own error messages.

Why not ``urlsplit`` alone: it takes the host from after the *last* "@" but checks the
brackets of the *first* one, so in ``p@[::]:1@[:x:]:4`` the literal it checks is ``[::]``
(inside the userinfo) and the host it hands out, ``:x:``, is never checked. Both parsers once
had that bug; here a host holding ":" must be a valid IPv6 address.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

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
    text = text.strip()
    _check_bracketed_host(text)
    try:
        parts = urlsplit(text)
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


def _check_bracketed_host(text: str) -> None:
    """Check an IPv6 literal after the last "@" before urlsplit sees it: urlsplit's own check
    differs between Python patch releases (3.11.2 checks the bracket after the last "@" and
    raises, 3.11.7 checks the first one and hands out the host), so the error and its code
    would depend on the interpreter."""
    authority = text.partition("://")[2]
    for end in "/?#":
        authority = authority.partition(end)[0]
    hostport = authority.rpartition("@")[2]
    if not hostport.startswith("["):
        return
    literal, closed, _ = hostport[1:].partition("]")
    try:
        if not closed:
            raise ValueError("unclosed bracket")
        ipaddress.IPv6Address(literal)
    except ValueError as exc:
        raise UriError("bad IPv6 address", code="bad_ipv6") from exc


def format_authority_uri(scheme: str, userinfo: str, authority: str, params: list[str],
                         label: str) -> str:
    """``scheme://userinfo@authority[?params joined by "&"][#label]``, as parsed above.

    ``userinfo`` and ``params`` come already encoded; ``label`` is percent-encoded here.
    """
    query = f"?{'&'.join(params)}" if params else ""
    fragment = f"#{quote(label, safe='')}" if label else ""
    return f"{scheme}://{userinfo}@{authority}{query}{fragment}"


def b64url_encode(data: bytes) -> str:
    """base64url without padding, as keys and pins are written."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """The inverse of :func:`b64url_encode` (padding optional); binascii.Error or ValueError
    when it is not base64url. Characters outside the alphabet are skipped, as by b64decode."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
