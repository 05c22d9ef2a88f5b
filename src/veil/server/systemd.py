"""systemd's service notification protocol (sd_notify(3)) without libsystemd: one datagram
of ``KEY=value`` lines to the socket named by ``$NOTIFY_SOCKET``. A no-op when the server was
not started by systemd, so nothing else needs to know whether it was."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("veil.server")


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. ``"READY=1"``, ``"STATUS=..."``); True if systemd was told."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        # systemd gone or the socket unreadable: the service still runs; say so once per call.
        log.warning("cannot notify systemd at %s: %s", path.lstrip("\0"), exc.strerror)
        return False
    return True
