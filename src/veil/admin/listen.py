"""Where the admin panel listens, and whether that is safe without TLS.

Kept apart from ``app.py`` (which imports aiohttp) so that parsing ``--admin`` costs nothing
when ``veil --help`` runs."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from veil.errors import ConfigError

HTTPS = "https://"


@dataclass(frozen=True, slots=True)
class AdminListen:
    """``--admin [https://]HOST:PORT``: ``tls`` when the https:// form was used."""

    host: str
    port: int
    tls: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{HTTPS if self.tls else ''}{host}:{self.port}"


def parse_admin_listen(text: str) -> AdminListen:
    """``127.0.0.1:8080``, ``[::1]:8080``, ``localhost:8080`` or ``https://0.0.0.0:8443``."""
    tls = text.startswith(HTTPS)
    rest = text[len(HTTPS):] if tls else text
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
    else:
        host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 0xFFFF:
        raise ConfigError(f"bad admin address {text!r}: use HOST:PORT, e.g. 127.0.0.1:8080, "
                          "or https://HOST:PORT")
    return AdminListen(host, int(port), tls)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (a name other than localhost might
    resolve to anything, so it is not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_admin_listen(host: str, tls: bool) -> None:
    """Refuse to serve the panel beyond this machine in the clear."""
    if not tls and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve the admin panel on {host} without TLS: the password and the "
            "session cookie would cross the network in the clear. Listen on loopback "
            "(--admin 127.0.0.1:8080, reached with `ssh -L 8080:127.0.0.1:8080 server`), "
            f"or use --admin https://{host}:PORT (TLS with the server's certificate)")
