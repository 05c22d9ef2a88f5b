"""``veil connect trojan://``: its TLS is veil's browser-shaped client, and its log stays clean.

The ClientHello is captured by a loopback listener that reads one and closes, then judged by
the censor lab's fingerprint detector (JA4 against mainstream browsers): a positive control
(Python's OpenSSL, what the Trojan client used before) must be flagged by the same detector.
The log check runs the real processes: a ``veil serve --trojan`` and ``veil connect
trojan://...`` with requests through its SOCKS5 proxy, each answered and closed by the
destination (the close that made the client log asyncio tracebacks).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import subprocess
import threading
from pathlib import Path

from tests.support import procs
from tests.support.procs import VeilServer
from veil.lab.fingerprint import judge_hello
from veil.lab.tls import parse_client_hello
from veil.net.trojan_client import TrojanDialer
from veil.protocol.address import Address
from veil.protocol.trojan import TrojanLink

# Reading one ClientHello from loopback; minutes only if something hangs.
CAPTURE_TIMEOUT_S = 10.0
# The requests that made the client log five tracebacks for six before.
REQUESTS = 8


async def _capture_hello(connect: object) -> bytes:
    """The first TLS record a client sends to a listener that closes after reading it."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = await reader.readexactly(5)
            body = await reader.readexactly(struct.unpack("!H", header[3:5])[0])
            if not got.done():
                got.set_result(header + body)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if not got.done():
                got.set_exception(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        attempt = asyncio.create_task(connect(port))  # type: ignore[operator]
        try:
            return await asyncio.wait_for(got, CAPTURE_TIMEOUT_S)
        finally:
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(attempt, CAPTURE_TIMEOUT_S)
    finally:
        server.close()
        await server.wait_closed()


def _judge(record: bytes) -> tuple[bool, tuple[str, ...]]:
    assert record[0] == 22 and record[5] == 1, record[:8]  # handshake, ClientHello
    length = int.from_bytes(record[6:9], "big")
    hello = parse_client_hello(record[9:9 + length])
    assert hello is not None
    verdict = judge_hello(hello)
    return verdict.flagged, verdict.evidence


def test_the_trojan_client_hello_is_a_browsers() -> None:
    link = TrojanLink(Address("127.0.0.1", 1), "password", "www.example.org",
                      pin=b"\x01" * 32)

    async def trojan(port: int) -> None:
        dialer = TrojanDialer(TrojanLink(Address("127.0.0.1", port), link.password, link.sni,
                                         pin=link.pin))
        try:
            await dialer.open_server(asyncio.Protocol())
        finally:
            await dialer.close()

    async def openssl(port: int) -> None:
        # The positive control: Python's OpenSSL, as the Trojan client used before.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        context.set_alpn_protocols(["h2", "http/1.1"])
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                  server_hostname=link.sni)
        writer.close()

    flagged, evidence = _judge(asyncio.run(_capture_hello(trojan)))
    assert not flagged, evidence
    control_flagged, control_evidence = _judge(asyncio.run(_capture_hello(openssl)))
    assert control_flagged, control_evidence


def _socks_get(socks_port: int, dest_port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", socks_port), timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                  + struct.pack("!H", dest_port))
        reply = b""
        while len(reply) < 10 and (chunk := s.recv(10 - len(reply))):
            reply += chunk
        assert reply[:2] == b"\x05\x00", reply
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


class _AnswerAndClose:
    """A loopback TCP server that answers every request with a few bytes and closes."""

    ANSWER = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(CAPTURE_TIMEOUT_S)

    def serve_one(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(CAPTURE_TIMEOUT_S)
            conn.recv(65536)
            conn.sendall(self.ANSWER)


def test_requests_over_trojan_log_no_traceback(tmp_path: Path) -> None:
    server: VeilServer = procs.start_veil_server(tmp_path / "server", "--trojan")
    destination = _AnswerAndClose()
    client = None
    try:
        link = subprocess.run([*procs.VEIL, "user", "show", "default", "--state",
                               str(server.state), "--format", "trojan"], capture_output=True,
                              text=True, check=True, timeout=30).stdout.split()[0]
        client = procs.start_veil_client(tmp_path, link)
        assert client.socks is not None
        for _ in range(REQUESTS):
            thread = threading.Thread(target=destination.serve_one, daemon=True)
            thread.start()
            assert _socks_get(client.socks, destination.port).endswith(b"ok")
            thread.join(CAPTURE_TIMEOUT_S)
        procs.stop(client.proc)
        log = client.log_text()
        assert "Traceback" not in log and "Exception in callback" not in log, log
    finally:
        if client is not None:
            procs.stop(client.proc)
        procs.stop(server.proc)
        destination.sock.close()

