"""The cover site under hostile load from strangers, against a real `veil serve`: what each
attack may make the server hold, and a real user's round trip through the tunnel meanwhile.

The server, the echo server and the user's client are test_load.py's fixtures; the
attackers are plain TLS sockets from this process that send and never read.
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from tests.load.test_load import (  # noqa: F401 (fixtures)
    Server,
    client_roundtrip,
    echo_port,
    forward_port,
    server,
)

pytestmark = pytest.mark.slow

PIPELINING_CONNECTIONS, PIPELINED_REQUESTS = 40, 999
# What 40 connections of 999 pipelined requests, never read, may cost the server: each holds
# its unsent answers up to the cover's H1_MAX_UNSENT_BYTES (64 KiB) plus the requests it has
# not parsed yet, not 999 answers (before: +85 MiB, not given back).
PIPELINING_RSS_MIB = 32.0


def _tls_client(alpn: list[str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(alpn)
    return context


def test_pipelined_requests_never_read_are_bounded(server: Server,  # noqa: F811
                                                   forward_port: int) -> None:  # noqa: F811
    context = _tls_client(["http/1.1"])
    client_roundtrip(forward_port)
    before = server.rss_mib()
    requests = b"GET /index.html HTTP/1.1\r\nHost: example.com\r\n\r\n" * PIPELINED_REQUESTS
    attackers: list[ssl.SSLSocket] = []
    try:
        for _ in range(PIPELINING_CONNECTIONS):
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            # a small receive buffer, never read: the answers pile up on the server's side
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            tls = context.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(requests)
            attackers.append(tls)
        time.sleep(1.0)  # let the server answer what it will
        during = server.rss_mib()
        rtt = client_roundtrip(forward_port)
    finally:
        for tls in attackers:
            tls.close()
    time.sleep(2.0)
    after = server.rss_mib()
    print(f"\n{PIPELINING_CONNECTIONS} x {PIPELINED_REQUESTS} pipelined requests never read: "
          f"server RSS {before:.0f} -> {during:.0f} MiB, {after:.0f} MiB after; "
          f"a user's round trip {rtt * 1000:.0f} ms")
    assert during - before < PIPELINING_RSS_MIB
