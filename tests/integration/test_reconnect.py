"""The client survives a server that dies: open streams fail at once, new ones work later."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow


def roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_streams_fail_cleanly_and_the_client_reconnects(tmp_path: Path) -> None:
    echo = procs.TcpEcho()
    server = procs.start_veil_server(tmp_path)
    spec = f"0:127.0.0.1:{echo.port}"
    client = procs.start_veil_client(tmp_path, server.key, socks=False, forwards=[spec])
    fwd = client.forwards[spec]
    try:
        assert roundtrip(fwd, b"one") == b"one"
        held = socket.create_connection(("127.0.0.1", fwd), timeout=10)
        held.sendall(b"ping")
        assert held.recv(4) == b"ping"

        server.proc.send_signal(signal.SIGKILL)  # no goodbye: the TCP connection just dies
        procs.stop(server.proc)  # reaps it and closes its pipes
        held.settimeout(30)
        started = time.monotonic()
        try:
            leftover = held.recv(100)
        except ConnectionResetError:
            leftover = b""
        held.close()
        assert leftover == b""  # the open stream ended instead of hanging
        assert time.monotonic() - started < 30

        server = procs.start_veil_server(tmp_path, port=server.port)

        def echoes() -> bool:
            try:
                return roundtrip(fwd, b"two") == b"two"
            except OSError:
                return False

        wait_until(echoes, 30, lambda: f"the tunnel back after a restart: {client.log_text()}",
                   poll=0.2)
        assert "reconnecting" in client.log_text() or "cannot reach" in client.log_text()
    finally:
        procs.stop(client.proc)
        procs.stop(server.proc)
        echo.close()
