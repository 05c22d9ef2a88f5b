"""A request through ``veil connect`` that cannot succeed fails fast, and the user can learn
why: the server down or the key refused (SOCKS5 "network unreachable", HTTP 502 whose body
says why, a log line), a destination the server refuses (a log line at -v). Real processes."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.procs import VEIL
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow

# The inbounds wait 15 s for a tunnel that is not known to be failing; one that is fails
# after one more attempt's grace (client_session.FAIL_FAST_S, 1 s). Room for a loaded machine.
FAILS_WITHIN_S = 6.0
# Reading one reply on loopback.
REPLY_TIMEOUT_S = 20.0


def socks_connect(port: int, dest_port: int) -> tuple[bytes, float]:
    """A SOCKS5 CONNECT to 127.0.0.1:dest_port; (the reply's first bytes, seconds taken)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT_S) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                  + struct.pack("!H", dest_port))
        reply = s.recv(10)
    return reply, time.monotonic() - started


def http_get(port: int, dest_port: int) -> tuple[bytes, float]:
    """A plain HTTP proxy request; (the whole answer, seconds taken)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT_S) as s:
        s.sendall(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                  % (dest_port, dest_port))
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer, time.monotonic() - started


def wait_failing(client: procs.VeilClient, text: str) -> None:
    wait_until(lambda: text in client.log_text(), 15, lambda: f"{text!r} in {client.log_text()}")


def assert_fails_fast(client: procs.VeilClient, reason: str) -> None:
    assert client.socks is not None and client.http is not None
    reply, took = socks_connect(client.socks, 9)
    assert reply[:2] == b"\x05\x03", reply  # network unreachable
    assert took < FAILS_WITHIN_S, took
    answer, took = http_get(client.http, 9)
    assert answer.startswith(b"HTTP/1.1 502 "), answer
    assert reason.encode() in answer.partition(b"\r\n\r\n")[2], answer
    assert took < FAILS_WITHIN_S, took
    assert any("a request failed: " in line and reason in line
               for line in client.log_text().splitlines()), client.log_text()


def test_with_the_server_down_requests_fail_fast_with_the_reason(tmp_path: Path) -> None:
    key = subprocess.run([*VEIL, "user", "add", "alice", "--state", str(tmp_path / "state"),
                          "--public", f"127.0.0.1:{procs.unused_port()}"],
                         capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    client = procs.start_veil_client(tmp_path, key, http=True, wait=False)
    try:
        wait_failing(client, "cannot reach")
        assert_fails_fast(client, "cannot reach")
    finally:
        procs.stop(client.proc)


def test_with_the_key_refused_requests_fail_fast_with_the_reason(tmp_path: Path) -> None:
    server = procs.start_veil_server(tmp_path)
    try:
        key = server.add_user("gone")
        server.revoke("gone")
        client = procs.start_veil_client(tmp_path, key, http=True, wait=False)
        try:
            wait_failing(client, "refused the key")
            assert_fails_fast(client, "refused the key")
        finally:
            procs.stop(client.proc)
    finally:
        procs.stop(server.proc)


def test_a_refused_destination_is_logged_with_its_reason(tmp_path: Path) -> None:
    # Without --allow-private the server refuses loopback destinations.
    server = procs.start_veil_server(tmp_path, allow_private=False)
    echo = procs.TcpEcho()
    try:
        client = procs.start_veil_client(tmp_path, server.key)
        try:
            assert client.socks is not None
            with socket.create_connection(("127.0.0.1", client.socks), timeout=10) as s:
                s.sendall(b"\x05\x01\x00")
                s.recv(2)
                s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                          + struct.pack("!H", echo.port))
                s.recv(10)
                s.sendall(b"hello")
                s.settimeout(REPLY_TIMEOUT_S)
                with contextlib.suppress(ConnectionResetError):
                    assert s.recv(16) == b""  # cut: nothing from the destination
            # At INFO, where a user without -v reads it.
            said = "INFO veil.client: a request failed: the server answered refused destination"
            wait_until(lambda: said in client.log_text(),
                       10, lambda: f"the reason in the log: {client.log_text()}")
            assert str(echo.port) not in client.log_text()  # destinations are never logged
        finally:
            procs.stop(client.proc)
    finally:
        echo.close()
        procs.stop(server.proc)


def http_get_host(port: int, authority: str) -> bytes:
    """A plain HTTP proxy request for http://authority/; the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT_S) as s:
        s.sendall(b"GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n"
                  % (authority.encode(), authority.encode()))
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def test_a_plain_http_request_the_server_cannot_serve_gets_502_saying_why(
        tmp_path: Path) -> None:
    # The server resets the stream before any response byte; the HTTP proxy can still answer,
    # as Squid and Privoxy do, instead of an empty reply. (SOCKS5 cannot: its reply went out
    # when the stream opened.)
    refused_port, closed_port = procs.unused_port(), procs.unused_port()
    server = procs.start_veil_server(tmp_path, "--refuse-ports", str(refused_port))
    try:
        client = procs.start_veil_client(tmp_path, server.key, http=True)
        try:
            assert client.http is not None
            for authority, reason in [
                    (f"127.0.0.1:{refused_port}", b"refused by the server's policy"),
                    ("nothing-here.invalid", b"did not resolve"),
                    (f"127.0.0.1:{closed_port}", b"could not connect")]:
                answer = http_get_host(client.http, authority)
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), (authority, answer)
                assert reason in body and body.count(b"\n") == 1, (authority, answer)
        finally:
            procs.stop(client.proc)
    finally:
        procs.stop(server.proc)
