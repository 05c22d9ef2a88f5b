"""TCP keepalive: how a dead peer of an idle connection is found below TLS, where it shows
no record.

A session sends no PING while idle (veil.protocol.session, as Chromium's HTTP/2), so an idle
session's dead path is found by the kernel's keepalive probes, as a browser's is: Chromium
turns TCP keepalive on for every socket it connects, after 45 s idle and every 45 s after
(net/socket/tcp_socket_posix.cc, kTCPKeepAliveSeconds), so veil's client probes on that
schedule and a censor sees a browser's probes. The server probes only once its client has
fallen silent for longer than any live client's probes leave it (CLIENT_KEEPALIVE idle
plus slack): a live client's probes keep it quiet, as nginx's peers see none; a client that
vanished with streams open is found within SERVER_KEEPALIVE's span instead of holding its
streams until a target closes them.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Keepalive:
    idle_s: int
    """Silence before the first probe (TCP_KEEPIDLE)."""
    interval_s: int
    """Between unanswered probes (TCP_KEEPINTVL)."""
    probes: int | None
    """Unanswered probes before the connection is reset (TCP_KEEPCNT); None: the system's
    (9 on Linux), as Chromium leaves it."""


CLIENT_KEEPALIVE = Keepalive(idle_s=45, interval_s=45, probes=None)
SERVER_KEEPALIVE = Keepalive(idle_s=120, interval_s=30, probes=4)


class _SocketLike(Protocol):
    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...


def set_keepalive(sock: _SocketLike | None, keepalive: Keepalive) -> None:
    """Turn TCP keepalive on with ``keepalive``'s timing where the platform has the options
    (Linux has all three); a transport without a socket is left alone."""
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", keepalive.idle_s),
                        ("TCP_KEEPINTVL", keepalive.interval_s),
                        ("TCP_KEEPCNT", keepalive.probes)):
        option = getattr(socket, name, None)
        if option is not None and value is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
