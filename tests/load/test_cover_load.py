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
    H2_PING,
    H2_PREFACE,
    Server,
    client_roundtrip,
    forward_port,
    server,
)

pytestmark = pytest.mark.slow

PIPELINING_CONNECTIONS, PIPELINED_REQUESTS = 40, 999
# What 40 connections of 999 pipelined requests, never read, may cost the server: each holds
# its unsent answers up to the cover's H1_MAX_UNSENT_BYTES (64 KiB) plus the requests it has
# not parsed yet, not 999 answers (before: +85 MiB, not given back).
PIPELINING_RSS_MIB = 32.0


H2_CONNECTIONS = 20
# 100,000 requests on one connection (1.27 MiB: HPACK makes each a few bytes): nginx answers
# 256, refuses 129 and sends GOAWAY; before, veil answered them all (58 -> 260 MiB, and a
# user's round trip took 10 s).
H2_BURST_REQUESTS = 100_000
# What 20 PING floods and a 100,000-request burst may cost: nginx's flood cut-off (10,001
# frames unsent) and stream limits end each connection; what is left is their buffers.
H2_RSS_MIB = 32.0


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


# How long a flooding connection may stay open: the server cuts it within 0.1 s here when
# idle, but a loaded machine (two shared cores) can take seconds to read that far (the
# 3.7-5.5 MiB of PINGs before the cut); a run beside other CPU-bound jobs once took over 15 s.
FLOOD_END_S = 30.0


def _send_until_closed(tls: ssl.SSLSocket, data: bytes, seconds: float) -> tuple[int, str]:
    """Send ``data`` again and again without reading: (bytes taken, how it ended)."""
    view, sent, deadline = memoryview(data), 0, time.monotonic() + seconds
    pos = 0
    tls.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            n = tls.send(view[pos:])
        except (TimeoutError, ssl.SSLWantWriteError):
            continue
        except OSError as exc:
            return sent, type(exc).__name__
        sent += n
        pos = (pos + n) % len(view)
    return sent, "still open"


def _read_until_closed(tls: ssl.SSLSocket, data: bytes, seconds: float) -> str:
    """Send ``data`` once, then read until the server closes: how it ended."""
    tls.sendall(data)
    tls.settimeout(seconds)
    try:
        while tls.recv(65536):
            pass
    except TimeoutError:
        return "still open"
    except OSError as exc:
        return type(exc).__name__
    return "closed"


def test_h2_floods_are_cut_off_as_by_nginx(server: Server,  # noqa: F811
                                          forward_port: int) -> None:  # noqa: F811
    """PINGs never read, on 20 connections, and a burst of 100,000 requests: each connection
    ends as nginx ends it (a reset after 10,001 unsent frames; GOAWAY after 129 refused
    streams), the server's memory stays bounded and a user's round trip stays short."""
    import hpack

    context = _tls_client(["h2"])
    client_roundtrip(forward_port)
    before = server.rss_mib()
    pings = H2_PING * ((1 << 20) // len(H2_PING))
    encoder = hpack.Encoder()
    headers = [(":method", "GET"), (":path", "/index.html"), (":scheme", "https"),
               (":authority", "example.com")]
    burst = b"".join(
        len(block := encoder.encode(headers)).to_bytes(3, "big") + b"\x01\x05"
        + sid.to_bytes(4, "big") + block for sid in range(1, 2 * H2_BURST_REQUESTS, 2))
    ends: list[str] = []
    taken = 0
    for i in range(H2_CONNECTIONS + 1):
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "h2"
            tls.sendall(H2_PREFACE)
            if i:
                sent, end = _send_until_closed(tls, pings, FLOOD_END_S)
            else:
                sent, end = len(burst), _read_until_closed(tls, burst, FLOOD_END_S)
            taken += sent
            ends.append(end)
        if i == H2_CONNECTIONS // 2:
            during = server.rss_mib()
            rtt = client_roundtrip(forward_port)
    print(f"\nh2: a {H2_BURST_REQUESTS:,}-request burst and {H2_CONNECTIONS} PING floods "
          f"({taken >> 20} MiB taken): ends {sorted(set(ends))}; server RSS {before:.0f} -> "
          f"{during:.0f} MiB; a user's round trip {rtt * 1000:.0f} ms")
    # Known and open (session 28 note): in CI, with other load on the box, one flood
    # connection in 21 may stay open for the whole wait, its reads paused before the count of
    # unsent frames reached nginx's cut. Every other connection must be cut as nginx cuts
    # it; a server that does not cut floods fails here.
    assert ends.count("still open") <= 1, ends
    assert during - before < H2_RSS_MIB
