"""veil's configuration: one typed, validated options class per command, and the parsers of
what people type.

``veil serve`` builds a :class:`ServerOptions`, ``veil connect`` a :class:`ClientOptions`; a
Python caller builds the same classes and gets the same checks, since every check runs when
an object is built (``__post_init__`` raises :class:`~veil.errors.ConfigError`, one line
naming the flag). The CLI only turns strings into typed values and prints the error.

The parsers (limits, rates, dates, keepalive, forward specs, address pools) are shared by
the CLI and the admin panel, so a value means the same thing wherever it is typed.

This module imports only ``veil.errors`` and ``veil.protocol``: every layer that needs
options may import it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from veil.errors import ConfigError
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address, parse_host_port
from veil.protocol.endpoint import MAX_VIA, Endpoint, parse_endpoint
from veil.protocol.session import (
    DEFAULT_IDLE_CLOSE,
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_KEEPALIVE_TIMEOUT,
    NGINX_KEEPALIVE_TIMEOUT,
    SessionConfig,
)
from veil.protocol.shaping import DEFAULT_SHAPING, NO_SHAPING
from veil.protocol.trojan import TrojanLink

__all__ = [
    "DEFAULT_FORWARD_HOST",
    "DEFAULT_KEEPALIVE",
    "DEFAULT_MAX_SESSIONS",
    "DEFAULT_MAX_SESSIONS_PER_USER",
    "DEFAULT_REFUSED_TCP_PORTS",
    "DEFAULT_SYSTEM_PROXY_HTTP",
    "DEFAULT_TUN_POOL",
    "DEFAULT_TUN_POOL6",
    "MAX_CONNECTIONS",
    "MIN_RATE",
    "ClientOptions",
    "Credentials",
    "ForwardSpec",
    "ServerOptions",
    "parse_credentials",
    "parse_expiry",
    "parse_forward_spec",
    "parse_keepalive",
    "parse_key",
    "parse_limit",
    "parse_port_list",
    "parse_rate",
    "parse_tun_pools",
    "parse_via",
]

# ------------------------------------------------------------------------------ limits
#: Sessions (veil sessions and Trojan connections) one user may hold at once: a client with
#: 16 connections, a phone's Trojan app with its parallel connections, and a laptop fit.
DEFAULT_MAX_SESSIONS_PER_USER = 64
#: Sessions the whole server holds at once; past it, valid keys get the cover like strangers
#: until some end (each session costs ~100 KiB plus its streams' buffers).
DEFAULT_MAX_SESSIONS = 10_000
#: A per-user rate below this carries nothing useful (a TLS record or two per second).
MIN_RATE = 1024.0
#: TLS connections a client keeps to its server: more spread head-of-line blocking, but each
#: is one more fingerprintable flow and one more session against the per-user cap.
MAX_CONNECTIONS = 16
#: The client's keepalive, ``(interval, timeout)``: the session's own default (pings only
#: while streams are open, each wait jittered: see veil.protocol.session).
DEFAULT_KEEPALIVE = (DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT)
#: The range ``--keepalive`` figures must fall in (seconds): below it pings are traffic,
#: above it a dead path goes unnoticed for an hour.
KEEPALIVE_RANGE = (0.5, 3600.0)
#: ``veil connect --refresh`` bounds: no faster than this (each fetch is a request a CDN and
#: the server's logs see; tests use the floor) and no slower than a day (a new way in must
#: reach users while the old one still works).
MIN_SUBSCRIPTION_REFRESH_S = 1.0
MAX_SUBSCRIPTION_REFRESH_S = 86_400.0
#: Address pools of full-device (``--tun``) clients on the server.
#: ``veil serve --routing``: "none" (the app exports send everything through veil) or "cn"
#: (they carry the rules of ``veil connect --rules cn``; veil.manage.rules).
ROUTING_PRESETS = ("none", "cn")
#: TCP destination ports the server refuses unless ``--refuse-ports`` says otherwise: SMTP's
#: 25, which VPS providers block or suspend servers for (a relay for spam gets the server's
#: address blacklisted and the operator's account closed). Submission (587, 465) needs a
#: login and is how mail clients send: not refused.
DEFAULT_REFUSED_TCP_PORTS = (25,)
#: Where ``veil connect --system-proxy`` puts the HTTP proxy when ``--http`` does not say:
#: every desktop's proxy settings take an HTTP proxy; 1081 sits beside SOCKS5's 1080.
DEFAULT_SYSTEM_PROXY_HTTP = "127.0.0.1:1081"
DEFAULT_TUN_POOL = "10.77.0.0/16"
DEFAULT_TUN_POOL6 = "fd77::/64"
#: Where a forward listens when the spec gives no LHOST: never the LAN unless asked.
DEFAULT_FORWARD_HOST = "127.0.0.1"
TLS_STACKS = ("browser", "openssl")

#: The store's period names (``veil.store.base.LimitPeriod``; the store is a layer this one
#: may not import).
LimitPeriod = Literal["month", "total"]


# ------------------------------------------------------------------------------ parsers
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_LIMIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*(?:/\s*(month|total))?\s*$",
                    re.IGNORECASE)


def parse_limit(text: str) -> tuple[int | None, LimitPeriod]:
    """``50GB``, ``50GB/month`` (the default period), ``1TiB/total`` or ``none``."""
    if text.strip().lower() in ("none", "unlimited", "off"):
        return None, "month"
    match = _LIMIT.match(text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ConfigError(f"bad limit {text!r}: use e.g. 50GB, 50GB/month, 1TiB/total or none")
    number, unit, period = match.groups()
    return int(float(number) * _UNITS[unit.upper()]), (period or "month").lower()  # type: ignore[return-value]


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KkMmGg]?)(bit|b|B)(?:/s|ps)?\s*$")
_RATE_SCALE = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


#: The largest ``--workers``: each worker is a whole server process (~60 MiB resident).
MAX_WORKERS = 64


def parse_workers(text: str) -> int:
    """``--workers``: a number, or ``auto`` for one per CPU this process may run on."""
    if text == "auto":
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--workers takes a number or auto, not {text!r}") from None


def parse_rate(text: str) -> float:
    """``100Mbit`` (bits per second), ``20MB`` (bytes per second), ``/s`` optional; -> bytes/s."""
    match = _RATE.match(text)
    if not match:
        raise ConfigError(f"bad rate {text!r}: use e.g. 100Mbit, 1Gbit or 20MB (per second)")
    number, scale, unit = match.groups()
    value = float(number) * _RATE_SCALE[scale.upper()]
    rate = value / 8 if unit in ("bit", "b") else value
    if rate < MIN_RATE:
        raise ConfigError(f"rate {text!r} is too low to carry anything (at least 1 KB/s)")
    return rate


def parse_expiry(text: str) -> float | None:
    """``2027-01-31`` (end of that day, UTC), an ISO 8601 time, or ``never``."""
    if text.strip().lower() in ("never", "none"):
        return None
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):
            day = datetime.date.fromisoformat(text.strip())
            moment = datetime.datetime.combine(day + datetime.timedelta(days=1),
                                               datetime.time(), datetime.UTC)
        else:
            moment = datetime.datetime.fromisoformat(text.strip())
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=datetime.UTC)
    except ValueError as exc:
        raise ConfigError(f"bad date {text!r}: use YYYY-MM-DD, an ISO 8601 time, or never") \
            from exc
    return moment.timestamp()


def parse_port_list(text: str) -> tuple[int, ...]:
    """``--refuse-ports``: ``25``, ``25,465,6881-6889``, or ``none``."""
    if text.strip().lower() in ("", "none"):
        return ()
    ports: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            first = int(low)
            last = int(high) if dash else first
        except ValueError:
            raise ConfigError(f"--refuse-ports takes ports and ranges like 25,6881-6889 or "
                              f"'none', not {text!r}") from None
        if not 1 <= first <= last <= 65535:
            raise ConfigError(f"--refuse-ports: {part.strip()!r} is not a port or a range "
                              "of ports (1-65535)")
        ports.update(range(first, last + 1))
    return tuple(sorted(ports))


def parse_keepalive(text: str) -> tuple[float, float]:
    """``INTERVAL[:TIMEOUT]`` in seconds; the timeout defaults to two thirds of the interval.
    The range is checked by :class:`ClientOptions`."""
    interval_text, _, timeout_text = text.partition(":")
    try:
        interval = float(interval_text)
        timeout = float(timeout_text) if timeout_text else interval * 2 / 3
    except ValueError as exc:
        raise ConfigError(f"--keepalive takes SECONDS[:TIMEOUT], not {text!r}") from exc
    return interval, timeout


def parse_tun_pools(pool: str | None, pool6: str | None,
                    ) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network | None]:
    """``--pool``/``--pool6`` of ``veil serve --tun`` (None: the default; ``none`` turns
    IPv6 off)."""
    try:
        net4 = ipaddress.IPv4Network(pool or DEFAULT_TUN_POOL)
        net6 = (None if (pool6 or "").lower() == "none"
                else ipaddress.IPv6Network(pool6 or DEFAULT_TUN_POOL6))
    except ValueError as exc:
        raise ConfigError(f"bad address pool: {exc}") from exc
    if net4.num_addresses < 4:
        raise ConfigError("--pool needs at least a /30")
    if net6 is not None and net6.prefixlen > 120:
        raise ConfigError("--pool6 needs at least a /120")
    return net4, net6


def parse_key(text: str) -> AccessKey | TrojanLink:
    """A veil access key (``veil://``) or a Trojan link (``trojan://``, any Trojan server)."""
    if text.strip().lower().startswith("trojan://"):
        link = TrojanLink.parse(text)
        if link.network != "tcp":
            raise ConfigError(f"this trojan:// link is Trojan over {link.network} (type="
                              f"{link.network}), for apps behind a CDN; veil's client speaks "
                              "Trojan over TLS only, and reaches the same CDN way with the "
                              "user's veil:// key (veil user show NAME)")
        return link
    return AccessKey.parse(text)


def parse_via(texts: list[str] | tuple[str, ...]) -> tuple[Endpoint, ...]:
    """``--via URL`` (repeatable): the extra ways in announced in keys, in order."""
    try:
        return tuple(parse_endpoint(text.strip()) for text in texts)
    except ConfigError as exc:
        raise ConfigError(f"--via: {exc}", code="bad_endpoint") from exc


def parse_credentials(flag: str, text: str | None) -> Credentials | None:
    """``USER:PASSWORD`` given to ``flag`` (None when the flag was not given)."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"{flag} takes USER:PASSWORD")
    try:
        return Credentials(user.encode(), password.encode())
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from exc


_FORWARD_USAGE = "expected [LHOST:]LPORT:RHOST:RPORT[/udp]"


def parse_forward_spec(text: str) -> ForwardSpec:
    """Parse ``[LHOST:]LPORT:RHOST:RPORT[/udp|/tcp]``; raise ConfigError (one line) if bad.

    Hosts are IP literals (IPv6 in brackets) or names. RPORT is 1-65535; LPORT may also be
    0, for a port the system picks (the forward logs the address it bound).
    """
    shown = text if len(text) <= 100 else text[:100] + "..."

    def bad(why: str) -> ConfigError:
        return ConfigError(f"bad forward {shown!r}: {why}; {_FORWARD_USAGE}", code="bad_forward")

    body = text.strip()
    udp = False
    base, slash, proto = body.rpartition("/")
    if slash:
        if proto.lower() not in ("tcp", "udp"):
            raise bad(f"unknown protocol {proto!r}")
        udp = proto.lower() == "udp"
        body = base
    parts = _split_fields(body)
    if parts is None:
        raise bad("unbalanced brackets")
    if len(parts) == 3:
        parts.insert(0, DEFAULT_FORWARD_HOST)
    elif len(parts) != 4:
        raise bad("wrong number of fields (IPv6 addresses need [brackets])")
    lhost, lport, rhost, rport = parts
    try:
        listen = Address(_host(lhost, "LHOST"), _port(lport, "LPORT", lowest=0))
        dest = Address(_host(rhost, "RHOST"), _port(rport, "RPORT"))
        dest.encode()  # a name must fit the wire format (<= 255 bytes in IDNA)
    except (ValueError, UnicodeError) as exc:
        raise bad(str(exc).splitlines()[0] if str(exc) else "invalid host") from exc
    return ForwardSpec(listen, dest, udp)


def _split_fields(text: str) -> list[str] | None:
    """Split on colons outside brackets; None if brackets do not pair up."""
    fields: list[str] = []
    current: list[str] = []
    in_brackets = False
    for char in text:
        if char == "[":
            if in_brackets:
                return None
            in_brackets = True
        elif char == "]":
            if not in_brackets:
                return None
            in_brackets = False
        elif char == ":" and not in_brackets:
            fields.append("".join(current))
            current = []
            continue
        current.append(char)
    if in_brackets:
        return None
    fields.append("".join(current))
    return fields


def _host(text: str, what: str) -> str:
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"{what} {text!r} is not an IPv6 address") from None
        return inner
    if not text:
        raise ValueError(f"missing {what}")
    if "[" in text or "]" in text or not text.isprintable() or any(c.isspace() for c in text):
        raise ValueError(f"bad {what} {text!r}")
    return text


def _port(text: str, what: str, *, lowest: int = 1) -> int:
    """``text`` as a port from ``lowest`` to 65535 (0 only where a socket is bound: nothing
    can be sent to port 0)."""
    if (not (text.isascii() and text.isdigit() and len(text) <= 5)
            or not lowest <= int(text) <= 0xFFFF):
        raise ValueError(f"{what} must be a number from {lowest} to 65535, got {text!r}")
    return int(text)


def is_local(address: Address) -> bool:
    """Only this machine can connect: a loopback address or name."""
    if address.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------ values
@dataclass(frozen=True, slots=True)
class Credentials:
    """The one username/password pair a listener accepts (RFC 1929).

    Octets, as on the wire (RFC 1929 gives them no encoding); each must be 1 to 255 bytes.
    The password is left out of ``repr`` so it cannot leak into logs or tracebacks.
    """

    username: bytes
    password: bytes = field(repr=False)

    def __post_init__(self) -> None:
        for name, value in (("username", self.username), ("password", self.password)):
            if not 1 <= len(value) <= 255:
                raise ConfigError(f"SOCKS5 {name} must be 1 to 255 bytes", code="bad_credentials")


@dataclass(frozen=True, slots=True)
class ForwardSpec:
    """One port forward: connections/datagrams to ``listen`` go to ``dest``."""

    listen: Address
    dest: Address
    udp: bool = False

    def __str__(self) -> str:
        """The spec in CLI form, e.g. ``127.0.0.1:8053:[2606:4700::1111]:53/udp``."""
        return f"{self.listen}:{self.dest}/{'udp' if self.udp else 'tcp'}"


# ------------------------------------------------------------------------------ options
@dataclass(frozen=True, slots=True)
class ServerOptions:
    """``veil serve``: one field per flag that shapes the running server (``--state`` and
    ``--db`` name the state directory, which is loaded separately)."""

    #: ``--listen``: the TLS port (the first ``--listen``).
    listen: Address
    #: ``--cover``: the web server shown to everybody else; None: the built-in site.
    cover_url: str | None = None
    #: ``--cert``/``--key``: a certificate chain and its key, written into the state
    #: directory when it is initialised (both or neither); None: a self-signed one.
    cert: Path | None = None
    key: Path | None = None
    #: ``--allow-private``: let clients reach private, loopback and link-local addresses.
    allow_private: bool = False
    #: ``--refuse-ports``: TCP destination ports no stream may reach (also ``--tun``'s).
    refused_tcp_ports: tuple[int, ...] = DEFAULT_REFUSED_TCP_PORTS
    #: ``--block-bittorrent``: refuse streams and datagrams that are BitTorrent (its
    #: handshake, tracker requests, DHT, uTP; veil.protocol.bittorrent). Not for ``--tun``.
    block_bittorrent: bool = False
    #: Seconds a connection may take to say whether it is a tunnel or a visitor.
    handshake_timeout: float = 60.0
    #: ``--no-shaping`` turns this off.
    shaping: bool = True
    #: ``--max-sessions-per-user`` and ``--max-sessions`` (each >= 1).
    max_sessions_per_user: int = DEFAULT_MAX_SESSIONS_PER_USER
    max_sessions: int = DEFAULT_MAX_SESSIONS
    #: ``--max-devices-per-user``: client addresses one user may connect from at once
    #: (>= 1); None: any number.
    max_devices_per_user: int | None = None
    #: ``--max-user-rate``: bytes per second one user may move in each direction (all
    #: sessions), at least :data:`MIN_RATE`; None = no limit.
    user_rate: float | None = None
    #: ``--tun``: full-device tunnels; IP streams get addresses from ``--pool``/``--pool6``
    #: (CIDR strings, see :func:`parse_tun_pools`; None: the defaults) (Linux).
    tun: bool = False
    pool: str | None = None
    pool6: str | None = None
    #: ``--trojan``: also accept Trojan clients on the port. Off by default: their h2 request
    #: comes 0.5-2 ms after the handshake, so the gate then holds a silent h2 client's
    #: greeting back for them (server/gate.py GREETING_GRACE_S), a gap nginx does not have.
    trojan: bool = False
    #: Seconds a veil session with no stream open lasts before the server closes it, as nginx
    #: closes a keepalive connection after keepalive_timeout (no flag: tests shorten it).
    idle_close: float = NGINX_KEEPALIVE_TIMEOUT
    #: The further ``--listen`` addresses: the same server on more ports or addresses. Only
    #: listened on: keys name them when a ``--via`` says how clients reach them.
    also_listen: tuple[Address, ...] = ()
    #: ``--via`` (repeatable): further ways in written into every key after the public
    #: address, in order of preference (e.g. ``tls://203.0.113.7:8443``: an extra port, or an
    #: operator's DNAT to this server). Only announced: the server listens where ``--listen``
    #: says.
    via: tuple[Endpoint, ...] = ()
    #: ``--on-block CMD``: a command (argv, run without a shell) the server runs when most
    #: active users report a way in blocked (veil.server.blocks); empty: none.
    on_block: tuple[str, ...] = ()
    #: ``--alert-webhook URL`` (:func:`parse_webhook_url`): where the server posts alerts (a
    #: user at 80% of the limit, the certificate near expiry: veil.server.alerts); None: none.
    alert_webhook: str | None = None
    #: ``--routing``: the rules the Clash Meta and sing-box exports carry, one of
    #: :data:`ROUTING_PRESETS` (veil.manage.rules); "none": everything through veil.
    routing: str = "none"
    #: ``--acme-directory URL``: the ACME CA the certificate for a ``--public`` DNS name comes
    #: from; None: Let's Encrypt for a name a public CA may issue for (veil.server.acme).
    acme_directory: str | None = None
    #: ``--acme-ca-bundle FILE``: the CA certificates that check the directory's TLS (a
    #: private CA's); None: the system's.
    acme_ca_bundle: Path | None = None
    #: ``--acme-email ADDR``: the contact the CA may write to about the certificate.
    acme_email: str | None = None
    #: ``--self-signed``: no ACME; the state's self-signed certificate, even with a name.
    self_signed: bool = False
    #: ``--borrow HOST[:PORT]`` (experimental): borrow that site's identity
    #: (veil.server.borrow): every TLS connection but a veil client's goes to it untouched.
    borrow: Address | None = None
    #: ``--workers N``: server processes sharing the port (veil.server.workers), from 1 (one
    #: process, no parent: the path as it always was) to :data:`MAX_WORKERS`.
    workers: int = 1

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("--cert and --key go together")
        if self.acme_directory is not None and not self.acme_directory.startswith("https://"):
            raise ConfigError(f"--acme-directory takes an https:// URL, not "
                              f"{self.acme_directory!r}")
        if self.self_signed and (self.acme_directory or self.acme_ca_bundle or self.acme_email):
            raise ConfigError("--self-signed asks for no ACME: drop the --acme-* options")
        # Port 0 (the system picks one) may be asked for more than once.
        listens = [a for a in (self.listen, *self.also_listen) if a.port]
        if len(set(listens)) != len(listens):
            raise ConfigError("--listen names the same address twice")
        if len(self.via) > MAX_VIA:
            raise ConfigError(f"--via: at most {MAX_VIA} (a key is one line and a QR code)")
        if len(set(self.via)) != len(self.via):
            raise ConfigError("--via names the same way in twice")
        if self.max_devices_per_user is not None and self.max_devices_per_user < 1:
            raise ConfigError("--max-devices-per-user takes a number >= 1")
        if self.max_sessions_per_user < 1 or self.max_sessions < 1:
            raise ConfigError("--max-sessions and --max-sessions-per-user take a number >= 1")
        if self.user_rate is not None and not self.user_rate >= MIN_RATE:
            raise ConfigError(f"--max-user-rate of {self.user_rate:g} bytes/s is too low to "
                              "carry anything (at least 1 KB/s)")
        if self.pool is not None or self.pool6 is not None:
            parse_tun_pools(self.pool, self.pool6)
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"--workers takes a number from 1 to {MAX_WORKERS}, or auto")
        if self.workers > 1 and self.tun:
            # One TUN device and address pool per server: workers would hand out the same
            # addresses.
            raise ConfigError("--tun runs in one process: drop --workers, or --tun")
        if self.borrow is not None and (self.cover_url or self.trojan or self.cert
                                        or any(way.through_cdn for way in self.via)):
            raise ConfigError("--borrow shows the borrowed site to everyone but veil's "
                              "clients: it takes no --cover, --cert, --trojan or CDN --via")
        if self.routing not in ROUTING_PRESETS:
            raise ConfigError(f"--routing takes one of {', '.join(ROUTING_PRESETS)}, not "
                              f"{self.routing!r}")


#: What ``veil user show --subscription`` prints: https://HOST[:PORT][/SECRET]/s/TOKEN, an
#: optional query (``?format=``) and fragment (``#pin=``). Checked before anything is fetched,
#: so a mistyped key is an error at once, not a connection to wherever it names.
_SUBSCRIPTION_URL = re.compile(r"https://[^/?#@\s]+(/[A-Za-z0-9_\-./~]*)?/s/[A-Za-z0-9_-]{16,64}"
                               r"(\?[^#\s]*)?(#\S*)?", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """``veil connect https://HOST/s/TOKEN``: follow a subscription (veil.client.subscription)
    instead of holding one key."""

    #: The subscription URL as given (``#pin=`` for a server's own port).
    url: str
    #: ``--subscription-cache``: where the last good answer is kept (None: the XDG cache).
    cache: Path | None = None
    #: ``--refresh``: seconds between fetches (None: what the subscription says).
    refresh_s: float | None = None

    def __post_init__(self) -> None:
        if not _SUBSCRIPTION_URL.fullmatch(self.url.strip()):
            shown = self.url if len(self.url) <= 60 else self.url[:60] + "..."
            raise ConfigError(f"{shown!r} is neither an access key nor a subscription URL: an "
                              "access key starts with veil:// (or trojan://), a subscription "
                              "URL is https://HOST/s/TOKEN#pin=... (veil user show NAME "
                              "--subscription)")
        if self.refresh_s is not None and not (
                MIN_SUBSCRIPTION_REFRESH_S <= self.refresh_s <= MAX_SUBSCRIPTION_REFRESH_S):
            raise ConfigError(f"--refresh takes {MIN_SUBSCRIPTION_REFRESH_S:g} to "
                              f"{MAX_SUBSCRIPTION_REFRESH_S:g} seconds")


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """``veil connect``: one field per flag (:meth:`from_args` turns the flags' text into
    these values)."""

    #: The access key (``veil://``) or a Trojan link.
    key: AccessKey | TrojanLink
    #: ``--socks`` and ``--socks-auth``.
    socks: Address | None = None
    socks_credentials: Credentials | None = None
    #: ``--http`` and ``--http-auth`` (Proxy-Authorization: Basic).
    http: Address | None = None
    http_credentials: Credentials | None = None
    #: ``--forward`` (repeatable).
    forwards: tuple[ForwardSpec, ...] = field(default_factory=tuple)
    #: Let other machines use a proxy without a password, or a forward (which has none):
    #: refused by default, since that is an open proxy into the tunnel for the whole network.
    allow_lan: bool = False
    #: ``--connections``: TLS connections kept to the server, 1 to :data:`MAX_CONNECTIONS`
    #: (a Trojan link opens one per stream and ignores this).
    connections: int = 1
    #: ``--stripe``: a bulk stream's bytes spread over all ``connections`` (to a server that
    #: can: veil.protocol.stripe), not only the one it opened on.
    stripe: bool = False
    #: ``--tls``: ``browser`` (Chrome's ClientHello) or ``openssl`` (Python's ssl).
    tls_stack: str = "browser"
    #: ``--no-shaping`` turns this off.
    shaping: bool = True
    #: Full-device tunnel (``--tun``, Linux): a TUN device instead of local proxies.
    tun: bool = False
    #: ``--exclude`` (with ``--tun``): CIDRs kept outside the tunnel.
    tun_exclude: tuple[str, ...] = ()
    #: ``--site`` (with ``--tun``): an office's gateway (docs/site-to-site.md).
    tun_site: bool = False
    #: ``--keepalive``: ping after this many idle seconds; the server is dead after the second
    #: figure more. Both within :data:`KEEPALIVE_RANGE`.
    keepalive: tuple[float, float] = DEFAULT_KEEPALIVE
    #: The range the client's idle close is drawn from (seconds, see
    #: veil.protocol.session.DEFAULT_IDLE_CLOSE; no flag: tests shorten it).
    idle_close: tuple[float, float] = DEFAULT_IDLE_CLOSE
    #: Follow a subscription: ``key`` is its first answer (fetched or cached).
    subscription: SubscriptionOptions | None = None
    #: ``--rules`` (repeatable, in order): rules files, or ``cn`` for the built-in preset
    #: (split routing, veil.client.rules; SOCKS5, HTTP proxy, forwards and --tun).
    rules: tuple[str, ...] = ()
    #: ``--system-proxy``: point the desktop's proxy settings at the HTTP proxy (and SOCKS5
    #: where the desktop has a slot for it) while running (veil.client.sysproxy).
    system_proxy: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ConfigError(f"--connections takes 1 to {MAX_CONNECTIONS}")
        if self.tls_stack not in TLS_STACKS:
            raise ConfigError(f"--tls takes {' or '.join(TLS_STACKS)}, not {self.tls_stack!r}")
        low, high = KEEPALIVE_RANGE
        if not all(low <= figure <= high for figure in self.keepalive):
            raise ConfigError(f"--keepalive: both figures must be between {low:g} and "
                              f"{high:g} seconds")
        if self.system_proxy:
            if self.tun:
                raise ConfigError("--system-proxy points applications at the local proxies; "
                                  "--tun takes the whole device instead: use one or the other")
            if self.http is None:
                raise ConfigError("--system-proxy needs the HTTP proxy (--http)")
            if self.http_credentials is not None or self.socks_credentials is not None:
                raise ConfigError("--system-proxy cannot hand applications a proxy password: "
                                  "drop --http-auth/--socks-auth (the proxies listen on this "
                                  "machine only)")
        if self.allow_lan:
            return
        open_ = []
        if self.socks is not None and self.socks_credentials is None and not is_local(self.socks):
            open_.append(f"--socks {self.socks} (add --socks-auth)")
        if self.http is not None and self.http_credentials is None and not is_local(self.http):
            open_.append(f"--http {self.http} (add --http-auth)")
        open_ += [f"--forward {spec.listen}" for spec in self.forwards
                  if not is_local(spec.listen)]
        if open_:
            raise ConfigError("these listen beyond this machine with no password, an open proxy "
                              "into the tunnel for anyone who can reach them: "
                              + "; ".join(open_) + ". Say --allow-lan if that is meant")

    def session_config(self) -> SessionConfig:
        interval, timeout = self.keepalive
        return SessionConfig(keepalive_interval=interval, keepalive_timeout=timeout,
                             shaping=DEFAULT_SHAPING if self.shaping else NO_SHAPING,
                             idle_close=self.idle_close)

    @classmethod
    def from_args(cls, key: AccessKey | TrojanLink, *, socks: Address | None, http: Address | None,
                  forwards: list[str], socks_auth: str | None, connections: int,
                  default_socks: Address, tls_stack: str = "browser",
                  shaping: bool = True, tun: bool = False,
                  tun_exclude: tuple[str, ...] = (),
                  keepalive: str | None = None, http_auth: str | None = None,
                  allow_lan: bool = False, rules: tuple[str, ...] = (),
                  system_proxy: bool = False, tun_site: bool = False,
                  stripe: bool = False) -> ClientOptions:
        """The options ``veil connect`` flags describe, as typed (``default_socks`` is where
        the SOCKS5 proxy listens when no inbound is named; ``--system-proxy`` adds the HTTP
        proxy on :data:`DEFAULT_SYSTEM_PROXY_HTTP` when ``--http`` does not say)."""
        specs = tuple(parse_forward_spec(text) for text in forwards)
        if tun_site and not tun:
            raise ConfigError("--site is a mode of --tun: say --tun --site")
        if tun_site and (tun_exclude or rules):
            raise ConfigError("--tun --site routes only the other sites into the tunnel: "
                              "--exclude and --rules do not apply")
        if socks is None and http is None and not specs and not tun:
            socks = default_socks
        if system_proxy and http is None and not tun:
            http = parse_host_port(DEFAULT_SYSTEM_PROXY_HTTP)
        return cls(key, socks=socks,
                   socks_credentials=parse_credentials("--socks-auth", socks_auth),
                   http=http, forwards=specs,
                   http_credentials=parse_credentials("--http-auth", http_auth),
                   allow_lan=allow_lan, connections=connections, tls_stack=tls_stack,
                   shaping=shaping, tun=tun, tun_exclude=tun_exclude, tun_site=tun_site,
                   keepalive=parse_keepalive(keepalive) if keepalive else DEFAULT_KEEPALIVE,
                   rules=rules, system_proxy=system_proxy, stripe=stripe)


def parse_webhook_url(url: str) -> str:
    """``--alert-webhook URL``: an http:// or https:// URL with a host; ConfigError otherwise
    (a file: or ftp: URL would read or post where an alert has no business)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("--alert-webhook needs an http:// or https:// URL")
    return url
