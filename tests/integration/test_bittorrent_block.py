"""``veil serve --block-bittorrent``: BitTorrent's handshake, tracker requests and DHT are refused
on veil streams and on the Trojan way in, before the torrent's infohash reaches anyone; other
traffic on the same session passes. Without the flag the same bytes pass (the control)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.toyserver import ToyServer
from veil.protocol.address import Address
from veil.protocol.trojan import Command, TrojanLink, build_request, password_hash

pytestmark = pytest.mark.slow

INFOHASH = bytes(range(100, 120))
HANDSHAKE = b"\x13BitTorrent protocol" + bytes(8) + INFOHASH + b"-qB4650-" + os.urandom(12)
DHT_PING = b"d1:ad2:id20:" + bytes(20) + b"e1:q4:ping1:t2:aa1:y1:qe"


class Recorder(ToyServer):
    """A TCP server that keeps every byte each connection sent (and echoes it)."""

    def __init__(self) -> None:
        self.received = bytearray()
        super().__init__(self._record)
        self.port = int(self.address.rsplit(":", 1)[1])

    def _record(self, conn: socket.socket) -> None:
        while data := conn.recv(65536):
            self.received += data
            conn.sendall(data)


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.close()


@pytest.fixture(scope="module")
def blocking(module_dir: Path, recorder: Recorder,
             udp_echo: procs.UdpEcho) -> Iterator[tuple[procs.VeilServer, procs.VeilClient]]:
    server = procs.start_veil_server(module_dir / "blocking", "--trojan", "--block-bittorrent")
    try:
        client = procs.start_veil_client(
            module_dir / "blocking", server.key, socks=False,
            forwards=[f"0:127.0.0.1:{recorder.port}",
                      f"127.0.0.1:0:127.0.0.1:{udp_echo.port}/udp"])
        try:
            yield server, client
        finally:
            procs.stop(client.proc)
    finally:
        procs.stop(server.proc)


def _exchange(port: int, *writes: bytes) -> bytes:
    """Send ``writes`` (a pause between them, so each is its own read) and read to the end."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(5)
        with contextlib.suppress(OSError):
            for data in writes:
                s.sendall(data)
                time.sleep(0.2)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                got += chunk
    return got


def _forward(client: procs.VeilClient, spec_start: str) -> int:
    return next(port for spec, port in client.forwards.items() if spec.startswith(spec_start))


def test_a_peer_handshake_is_refused_before_its_infohash_and_other_streams_pass(
        blocking: tuple[procs.VeilServer, procs.VeilClient], recorder: Recorder) -> None:
    server, client = blocking
    port = _forward(client, "0:")
    assert _exchange(port, b"GET / HTTP/1.1\r\n\r\n") == b"GET / HTTP/1.1\r\n\r\n"
    recorder.received.clear()
    assert _exchange(port, HANDSHAKE) == b""
    # Split where a careless sniffer would have let the first part (and the hash) through.
    # The first 7 bytes pass (and come back from the echo): they name no torrent.
    assert _exchange(port, HANDSHAKE[:7], HANDSHAKE[7:]) in (b"", HANDSHAKE[:7])
    assert _exchange(port, b"GET /announce?info_hash=%01%02&peer_id=x HTTP/1.1\r\n\r\n") == b""
    time.sleep(0.3)
    assert INFOHASH not in recorder.received and b"info_hash" not in recorder.received
    assert bytes(recorder.received) in (b"", HANDSHAKE[:7])
    assert "refused BitTorrent (--block-bittorrent)" in server.log.read_text()
    assert "session ended" not in server.log.read_text()  # streams refused, not the session


def test_dht_datagrams_are_dropped_and_others_pass(
        blocking: tuple[procs.VeilServer, procs.VeilClient]) -> None:
    _server, client = blocking
    port = _forward(client, "127.0.0.1:0:")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(DHT_PING, ("127.0.0.1", port))
        s.sendto(b"an ordinary datagram", ("127.0.0.1", port))
        assert s.recv(2048) == b"an ordinary datagram"  # the DHT ping never came back
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(2048)


def test_the_trojan_way_in_refuses_it_too(
        blocking: tuple[procs.VeilServer, procs.VeilClient], recorder: Recorder) -> None:
    from tests.integration.test_trojan import read_until_closed, show, trojan_tls

    server, _client = blocking
    link = TrojanLink.parse(show(server, "trojan"))
    request = build_request(password_hash(link.password), Command.CONNECT,
                            Address("127.0.0.1", recorder.port))
    recorder.received.clear()
    for writes in ([request + HANDSHAKE], [request, HANDSHAKE]):
        with trojan_tls(server.port) as tls:
            for data in writes:
                tls.sendall(data)
                time.sleep(0.2)
            assert read_until_closed(tls) == b""
    with trojan_tls(server.port) as tls:
        tls.sendall(request + b"hello")
        assert tls.recv(100) == b"hello"
    time.sleep(0.3)
    assert bytes(recorder.received) == b"hello"


def test_without_the_flag_the_same_bytes_pass(tmp_path: Path, recorder: Recorder) -> None:
    server = procs.start_veil_server(tmp_path)
    try:
        client = procs.start_veil_client(tmp_path, server.key, socks=False,
                                         forwards=[f"0:127.0.0.1:{recorder.port}"])
        try:
            assert _exchange(_forward(client, "0:"), HANDSHAKE) == HANDSHAKE
        finally:
            procs.stop(client.proc)
    finally:
        procs.stop(server.proc)
