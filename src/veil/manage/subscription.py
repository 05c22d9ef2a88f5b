"""Subscriptions: a URL per user that always answers with the user's current key.

An operator who adds a way in (``veil serve --via``), moves the server or turns Trojan on
reaches every user through it, without handing out new keys: clients (veil's own, and the
apps that import subscriptions) fetch it again from time to time.

The path
    ``/s/TOKEN`` on the server's TLS port (and on each ``tls://`` way in), and
    ``/SECRET/s/TOKEN`` under each CDN way's secret path, so it reaches the server through
    a CDN that forwards only that path. TOKEN is 22 base64url characters (128 bits) of
    HMAC-SHA256 under a key derived from DIR/store.key, over the user's name and secret: it
    reveals nothing of the secret, a server computes it without storing anything, a fleet
    sharing the store key agrees on it, and it changes when the user's key is rotated.
    Without the right token (or for a revoked user) the path is the cover's 404, byte for
    byte: the built-in site asks the responder first (veil.cover.site.Responder).

The answer, by ``?format=`` or else by the app's User-Agent (as 3x-ui and Marzban do)
    * ``veil``: JSON, see :func:`veil_document` (``veil connect https://...`` asks for it);
    * ``clash``: a Clash Meta (mihomo) configuration (:func:`veil.manage.export.clash_config`);
    * ``sing-box``: sing-box outbounds (:func:`veil.manage.export.sing_box_config`);
    * ``v2rayn``: base64 of the ``trojan://`` link, one per line, as v2rayN imports.
    The app formats need the Trojan way in (``veil serve --trojan``); without it they are
    not served (404). Every answer carries ``subscription-userinfo`` (upload, download,
    total, expire; 0 for none) and ``profile-update-interval`` (hours).

The rule files
    ``.../s/TOKEN/rules/NAME``: the China lists the exports' routing rules name, in Clash's
    and sing-box's forms, and their provenance (veil.manage.rules), with the same token and
    the same 404 for a wrong one; served whether or not ``--routing`` is on.

Versions
    The JSON is signed by the server's TLS key (veil.protocol.subscription), so an answer
    that came through a CDN is taken only if veil's server made it.
    The JSON's ``version`` grows when fields are added; a client reads the fields it knows
    and ignores the rest, so old clients keep working. A change an old client could not
    read safely would get a new format name, never a reused one.
"""

from __future__ import annotations

import base64
import hmac
import json
from dataclasses import dataclass

from veil.manage.export import (
    ServerCertificate,
    clash_config,
    routing_url,
    sing_box_config,
    trojan_link,
)
from veil.manage.rules import RULE_FILE_NAMES, RULES_SEGMENT, client_manifest
from veil.manage.state import ServerState
from veil.protocol.subscription import SigningKey, sign, signed_part, signed_rules_part, spki_of
from veil.protocol.uri import b64url_encode
from veil.store.base import Usage, User

#: What the JSON format's ``version`` says; raised when fields are added.
SUBSCRIPTION_VERSION = 1
#: The path segment before the token.
PATH_SEGMENT = "s"
#: Characters of a token: 22 base64url characters carry 132 bits, more than enough to be
#: unguessable, and the URL stays short enough for a QR code.
TOKEN_CHARS = 22
#: How often clients should fetch again (hours, the ``profile-update-interval`` header and
#: the JSON's ``refresh_s``): a new way in reaches users within this.
REFRESH_HOURS = 6
FORMATS = ("veil", "clash", "sing-box", "v2rayn")
#: Substrings of User-Agents (lower case) and the format each app imports, first match wins.
_AGENTS = (("veil/", "veil"), ("clash", "clash"), ("mihomo", "clash"), ("stash", "clash"),
           ("sing-box", "sing-box"), ("sfa", "sing-box"), ("sfi", "sing-box"),
           ("sfm", "sing-box"), ("v2ray", "v2rayn"), ("shadowrocket", "v2rayn"),
           ("nekobox", "v2rayn"), ("hiddify", "v2rayn"))
_TOKEN_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def user_token(key: bytes, user: User) -> str:
    """The user's token under ``key`` (:meth:`ServerState.subscription_key`)."""
    mac = hmac.digest(key, user.name.encode() + b"\0" + user.secret, "sha256")
    return b64url_encode(mac)[:TOKEN_CHARS]


def path_prefixes(state: ServerState) -> tuple[str, ...]:
    """Where subscription paths start: ``/`` and each CDN way's secret path."""
    prefixes = ["/"]
    for way in state.cdn_ways:
        if way.path not in prefixes:
            prefixes.append(way.path)
    return tuple(prefixes)


def token_of_path(path: bytes, prefixes: tuple[bytes, ...]) -> bytes | None:
    """The token in a (normalised) request path of a subscription's shape, else None."""
    for prefix in prefixes:
        start = len(prefix) + len(PATH_SEGMENT) + 1
        if (len(path) == start + TOKEN_CHARS and path.startswith(prefix)
                and path[len(prefix):start] == PATH_SEGMENT.encode() + b"/"
                and all(c in _TOKEN_ALPHABET for c in path[start:])):
            return path[start:]
    return None


def rule_file_of_path(path: bytes, prefixes: tuple[bytes, ...]) -> tuple[bytes, str] | None:
    """(token, file name) of a request for a rule file (``.../s/TOKEN/rules/NAME``,
    veil.manage.rules), else None."""
    head, sep, name = path.rpartition(b"/" + RULES_SEGMENT.encode() + b"/")
    if not sep:
        return None
    text = name.decode("ascii", "replace")
    if text not in RULE_FILE_NAMES:
        return None
    token = token_of_path(head, prefixes)
    return None if token is None else (token, text)


def subscription_urls(state: ServerState, user: User) -> list[str]:
    """The user's subscription URL on every way in, in the key's order, each with
    ``#pin=`` (the server's key, which a client has no access key yet to take from): on the
    server's own ports its certificate must have that key, through a CDN (whose certificate
    the web PKI vouches for) the answer must be signed by it (veil.protocol.subscription).
    ``sni=`` when the server has a name other than a direct URL's host."""
    return [url for _through_cdn, url in _urls_by_way(state, user)]


def _urls_by_way(state: ServerState, user: User) -> list[tuple[bool, str]]:
    """(through a CDN, URL) per way in, as :func:`subscription_urls` lists them."""
    token = user_token(state.subscription_key(), user)
    pin = f"pin={b64url_encode(state.pin)}"
    urls: list[tuple[bool, str]] = []
    for way in state.ways():
        if way.through_cdn:
            host = way.url.partition("://")[2][: -len(way.path)]
            url = f"https://{host}{way.path}{PATH_SEGMENT}/{token}#{pin}"
        elif way.address is not None:
            fragment = pin
            if state.sni and state.sni != way.address.host:
                fragment += f"&sni={state.sni}"
            url = f"https://{way.address}/{PATH_SEGMENT}/{token}#{fragment}"
        else:
            continue  # a scheme this veil does not speak
        if url not in (known for _, known in urls):
            urls.append((way.through_cdn, url))
    return urls


def rules_base_url(state: ServerState, user: User, *, self_signed: bool) -> str:
    """The subscription URL (no fragment) under which an app fetches the rule files
    (veil.manage.rules): apps check that download's certificate by the web PKI alone, so with
    a self-signed certificate the first CDN way's URL when there is one (the CDN's certificate
    passes), else the server's own."""
    urls = _urls_by_way(state, user)
    if self_signed:
        urls = [way for way in urls if way[0]] or urls
    return urls[0][1].partition("#")[0]


def choose_format(args: bytes, user_agent: bytes | None, *, trojan: bool) -> str | None:
    """The format asked for: ``format=`` in the query, else the app's User-Agent, else
    v2rayN's base64 (what most apps import) when Trojan is on, veil's JSON when it is not.
    None: an unknown format (answered 404, as any path the site does not have)."""
    for part in args.split(b"&"):
        name, _, value = part.partition(b"=")
        if name == b"format":
            text = value.decode("ascii", "replace").lower()
            return text if text in FORMATS else None
    agent = (user_agent or b"").decode("ascii", "replace").lower()
    for needle, fmt in _AGENTS:
        if needle in agent:
            return fmt
    return "v2rayn" if trojan else "veil"


@dataclass(frozen=True, slots=True)
class Rendered:
    """A subscription's answer: body, Content-Type and header lines."""

    body: bytes
    content_type: bytes
    headers: tuple[tuple[bytes, bytes], ...]


def userinfo(used: Usage, user: User) -> bytes:
    """The ``subscription-userinfo`` header's value (0 = unlimited, never expires)."""
    return (b"upload=%d; download=%d; total=%d; expire=%d"
            % (used.up, used.down, user.limit_bytes or 0, int(user.expires_at or 0)))


def veil_document(state: ServerState, user: User, used: Usage) -> dict[str, object]:
    """veil's own format (``version`` :data:`SUBSCRIPTION_VERSION`)::

        {"version": 1, "key": "veil://...", "label": NAME,
         "ways_in": [URL, ...], "subscription_urls": [URL, ...], "refresh_s": SECONDS,
         "usage": {"upload": N, "download": N, "limit_bytes": N|null, "limit_period": P},
         "expires_at": UNIX|null,
         "rules": {"cn": {"data": {"domains": INFO, "networks": INFO},
                          "files": {NAME: {"sha256": HEX, "bytes": N}, ...}}},
         "signature": {"spki": B64URL, "value": B64URL, "rules": B64URL}}

    ``rules``: the rule data this server serves under ``rules/NAME`` (veil.manage.rules),
    which ``veil connect --rules cn`` takes when it is newer than its own. ``signature``
    (veil.protocol.subscription) is added by :func:`render` when it is given the server's
    key; ``signature.rules`` signs ``rules``.
    """
    return {"version": SUBSCRIPTION_VERSION, "key": state.access_key(user).to_uri(),
            "label": user.name, "ways_in": [way.url for way in state.ways()],
            "subscription_urls": subscription_urls(state, user),
            "refresh_s": REFRESH_HOURS * 3600,
            "usage": {"upload": used.up, "download": used.down,
                      "limit_bytes": user.limit_bytes, "limit_period": user.limit_period},
            "expires_at": user.expires_at, "rules": client_manifest()}


def render(state: ServerState, user: User, used: Usage, fmt: str,
           cert: ServerCertificate | None, signer: SigningKey | None = None) -> Rendered | None:
    """The subscription in ``fmt``; None when it cannot be given (an app format without
    the Trojan way in, or ``cert``). ``signer``: the server's TLS key, which signs veil's
    format (clients that know the pin refuse it unsigned)."""
    headers = ((b"subscription-userinfo", userinfo(used, user)),
               (b"profile-update-interval", b"%d" % REFRESH_HOURS),
               (b"Cache-Control", b"no-store"))
    if fmt == "veil":
        document = veil_document(state, user, used)
        if signer is not None:
            document["signature"] = {
                "spki": b64url_encode(spki_of(signer)),
                "value": b64url_encode(sign(signer, signed_part(document))),
                "rules": b64url_encode(sign(signer, signed_rules_part(document)))}
        body = json.dumps(document, indent=2).encode() + b"\n"
        return Rendered(body, b"application/json", headers)
    if not state.trojan or cert is None:
        return None
    if fmt == "clash":
        return Rendered(clash_config(state, user, cert, routing_url(state, user, cert)).encode()
                        + b"\n", b"text/yaml; charset=utf-8", headers)
    if fmt == "sing-box":
        return Rendered(sing_box_config(state, user, cert, routing_url(state, user, cert))
                        .encode() + b"\n", b"application/json", headers)
    link = trojan_link(state, user, cert).to_uri() + "\n"
    return Rendered(base64.b64encode(link.encode()) + b"\n", b"text/plain; charset=utf-8",
                    headers)
