"""The CDN carrier (transport/cdn) through a real nginx set up as a CDN (tests/support/cdn.py):
both variants carry 1 MiB each way byte-exact, 20 at once, and close cleanly on both sides;
a request on the secret path without the right token or shape gets the cover's 404."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from h2.settings import SettingCodes

from tests.support import procs
from tests.support.cdn import CDN_NAME, Cdn, cdn_nginx
from tests.support.wait import wait_until_async
from veil.cover.backends import BuiltinCover
from veil.errors import TransportError
from veil.server.gate import Gate
from veil.transport.cdn import wire
from veil.transport.cdn.client import PacketUpClient, open_carrier
from veil.transport.cdn.h2client import CHROME_SETTINGS, H2Stream
from veil.transport.cdn.server import CarrierServer

TIMEOUT = 30.0
MIB = 1024 * 1024
VARIANTS = ["websocket", "packet-up"]
#: (variant, the CDN offers h2): a browser's CDN speaks h2, and packet-up then rides it; a
#: WebSocket stays on HTTP/1.1 whatever the CDN offers.
WAYS = [("websocket", False), ("packet-up", False), ("websocket", True), ("packet-up", True)]
WAY_IDS = ["websocket", "packet-up", "websocket-h2cdn", "packet-up-h2"]


def expected_http(variant: str, cdn_h2: bool) -> str:
    return "h2" if variant == "packet-up" and cdn_h2 else "http/1.1"


def assert_cdn_spoke(cdn: Cdn, http: str) -> None:
    """The CDN's own log: every request came in the HTTP the client should have got."""
    protocols = {line.split()[0] for line in cdn.requests()}
    assert protocols == {"HTTP/2.0" if http == "h2" else "HTTP/1.1"}, cdn.requests()

pytestmark = pytest.mark.skipif(not Path(procs.NGINX).exists(), reason="needs nginx 1.22")


class Peer(asyncio.Protocol):
    """One end of a carrier: sends ``blob`` when connected, keeps what it receives."""

    def __init__(self, blob: bytes = b"") -> None:
        self.blob = blob
        self.data = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.blob:
            self.transport.write(self.blob)

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


@dataclass
class Origin:
    port: int
    secret: str
    carriers: CarrierServer
    peers: list[Peer]


@asynccontextmanager
async def origin(listener: socket.socket, secret: str, make_blob: Callable[[], bytes],
                 directory: Path) -> AsyncIterator[Origin]:
    """veil's port in-process: the gate, the built-in cover, and the carrier's claim."""
    cert, key = procs.make_cert(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    peers: list[Peer] = []

    def make_peer() -> Peer:
        peers.append(peer := Peer(make_blob()))
        return peer

    carriers = CarrierServer([secret], make_peer)
    cover = BuiltinCover(claim=carriers)
    gate = Gate(ssl_context=context, cover=cover, ways_in=[])
    task = asyncio.get_running_loop().create_task(gate.serve(listener))
    try:
        yield Origin(listener.getsockname()[1], secret, carriers, peers)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gate.close()
        carriers.close()
        cover.close()
        await asyncio.sleep(0.05)  # aborted transports finish closing


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def carry(cdn_port: int, ca_file: Path, secret: str, variant: str, up: bytes,
                server: Origin, down_len: int, cdn_h2: bool = False) -> Peer:
    """One carrier: ``up`` goes up, ``down_len`` bytes come down; closed by the client."""
    client = Peer(up)
    stream = await open_carrier(f"https://{CDN_NAME}:{cdn_port}{secret}", lambda: client,
                                variant=variant, ca_file=str(ca_file),
                                connect_to=("127.0.0.1", cdn_port))
    try:
        assert stream.get_extra_info("http") == expected_http(variant, cdn_h2)
        await wait_until_async(lambda: len(client.data) >= down_len, TIMEOUT,
                               lambda: f"{down_len} bytes down, got {len(client.data)}")
    finally:
        stream.close()
    assert await asyncio.wait_for(client.lost, TIMEOUT) is None
    return client


@pytest.mark.parametrize(("variant", "cdn_h2"), WAYS, ids=WAY_IDS)
def test_one_mib_each_way_byte_exact(variant: str, cdn_h2: bool, tmp_path: Path) -> None:
    listener = listening()
    secret = wire.new_secret_path()
    down = os.urandom(MIB)
    up = os.urandom(MIB)
    with listener, cdn_nginx(listener.getsockname()[1], http2=cdn_h2) as cdn:
        async def main() -> None:
            async with origin(listener, secret, lambda: down, tmp_path) as server:
                client = await carry(cdn.port, cdn.ca_file, secret, variant, up, server, MIB,
                                     cdn_h2)
                assert bytes(client.data) == down
                (peer,) = server.peers
                assert await asyncio.wait_for(peer.lost, TIMEOUT) is None  # a clean close
                assert peer.eof
                assert bytes(peer.data) == up
                assert server.carriers.opened[variant] == 1
                print(f"{variant}: {server.carriers.out_of_order} packets out of order")
                assert not server.carriers.sessions and not server.carriers.websockets
        asyncio.run(main())
        assert_cdn_spoke(cdn, expected_http(variant, cdn_h2))


@pytest.mark.parametrize(("variant", "cdn_h2"), WAYS, ids=WAY_IDS)
def test_twenty_carriers_at_once(variant: str, cdn_h2: bool, tmp_path: Path) -> None:
    listener = listening()
    secret = wire.new_secret_path()
    size = 64 * 1024
    with listener, cdn_nginx(listener.getsockname()[1], http2=cdn_h2) as cdn:
        async def main() -> None:
            blobs = [os.urandom(size) for _ in range(20)]
            async with origin(listener, secret, lambda: b"", tmp_path) as server:
                # each client sends its blob; the server's peers must hold them all
                clients = [Peer(b) for b in blobs]
                streams = await asyncio.gather(*(
                    open_carrier(f"https://{CDN_NAME}:{cdn.port}{secret}",
                                 (lambda c=c: c), variant=variant, ca_file=str(cdn.ca_file),
                                 connect_to=("127.0.0.1", cdn.port)) for c in clients))
                try:
                    await wait_until_async(
                        lambda: sorted(bytes(p.data) for p in server.peers) == sorted(blobs),
                        TIMEOUT, lambda: "every blob at the server")
                finally:
                    for stream in streams:
                        stream.close()
                for client in clients:
                    assert await asyncio.wait_for(client.lost, TIMEOUT) is None
                for peer in server.peers:
                    assert await asyncio.wait_for(peer.lost, TIMEOUT) is None
                assert server.carriers.opened[variant] == 20
                assert {s.get_extra_info("http") for s in streams} == {
                    expected_http(variant, cdn_h2)}
        asyncio.run(main())
        assert_cdn_spoke(cdn, expected_http(variant, cdn_h2))


def _raw_request(port: int, request: bytes) -> bytes:
    """The origin's whole answer to one request over TLS (it closes or we stop at 5 s)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", port), 5) as raw, \
            context.wrap_socket(raw) as tls:
        tls.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4 + int(
                re.search(rb"Content-Length: (\d+)", answer).group(1)):  # type: ignore[union-attr]
            chunk = tls.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def _undated(answer: bytes) -> bytes:
    return re.sub(rb"Date: [^\r]*\r\n", b"Date: X\r\n", answer)


def test_the_wrong_token_or_shape_gets_the_covers_404(tmp_path: Path) -> None:
    listener = listening()
    secret = wire.new_secret_path()
    wrong = wire.new_secret_path()
    with listener, cdn_nginx(listener.getsockname()[1]) as cdn:
        async def main() -> None:
            async with origin(listener, secret, lambda: b"", tmp_path) as server:
                ws = (b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Version: 13\r\n"
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      b"Connection: close\r\n\r\n")
                probes = {
                    "random path": b"GET /" + wire.new_token().encode() + b"/ HTTP/1.1\r\n" + ws,
                    "wrong token, WebSocket": b"GET " + wrong.encode() + b" HTTP/1.1\r\n" + ws,
                    "right token, plain GET": b"GET " + secret.encode()
                    + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    "right token, unknown session POST": b"POST " + secret.encode()
                    + wire.new_token().encode() + b"/0 HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Length: 3\r\nConnection: close\r\n\r\nabc",
                    "right token, WebSocket version 8": b"GET " + secret.encode()
                    + b" HTTP/1.1\r\n" + ws.replace(b"Version: 13", b"Version: 8"),
                }
                answers = {name: _undated(await asyncio.to_thread(
                    _raw_request, server.port, probe)) for name, probe in probes.items()}
                reference = answers.pop("random path")
                assert reference.startswith(b"HTTP/1.1 404 Not Found\r\n")
                for name, answer in answers.items():
                    assert answer == reference, name
                assert server.carriers.opened == {"websocket": 0, "packet-up": 0}
                # and through the CDN the client learns it is not a carrier
                for variant in VARIANTS:
                    with pytest.raises(TransportError, match="404"):
                        await open_carrier(f"https://{CDN_NAME}:{cdn.port}{wrong}", Peer,
                                           variant=variant, ca_file=str(cdn.ca_file),
                                           connect_to=("127.0.0.1", cdn.port))
        asyncio.run(main())


def test_packet_up_over_h2_moves_its_posts_to_a_new_connection_after_goaway(
        tmp_path: Path) -> None:
    """nginx sends GOAWAY after keepalive_requests requests (1,000; 5 here): the GET stays on
    its connection and the POSTs go on over a new h2 connection, byte-exact."""
    listener = listening()
    secret = wire.new_secret_path()
    down = os.urandom(MIB)
    up = os.urandom(MIB)  # 16 POSTs of 64 KiB: three GOAWAYs
    with listener, cdn_nginx(listener.getsockname()[1], http2=True,
                             keepalive_requests=5) as cdn:
        async def main() -> None:
            async with origin(listener, secret, lambda: down, tmp_path) as server:
                client = await carry(cdn.port, cdn.ca_file, secret, "packet-up", up, server,
                                     MIB, cdn_h2=True)
                assert bytes(client.data) == down
                (peer,) = server.peers
                assert await asyncio.wait_for(peer.lost, TIMEOUT) is None
                assert bytes(peer.data) == up
        asyncio.run(main())
        assert_cdn_spoke(cdn, "h2")
        assert sum(line.endswith("POST 200") for line in cdn.requests()) == 16


class PausedPeer(Peer):
    """A client that does not read until told to (its protocol paused reading)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]


def test_a_paused_reader_stops_the_h2_downlink_by_flow_control(tmp_path: Path) -> None:
    """Over h2 the client holds the GET's DATA unacknowledged while its protocol has paused
    reading, so the CDN stops at the stream's window (6 MiB, Chrome's) and the client holds
    no more than that; resumed, everything arrives byte-exact."""
    listener = listening()
    secret = wire.new_secret_path()
    down = os.urandom(16 * MIB)
    with listener, cdn_nginx(listener.getsockname()[1], http2=True) as cdn:
        async def main() -> None:
            async with origin(listener, secret, lambda: down, tmp_path):
                client = PausedPeer()
                stream = await open_carrier(f"https://{CDN_NAME}:{cdn.port}{secret}",
                                            lambda: client, variant="packet-up",
                                            ca_file=str(cdn.ca_file),
                                            connect_to=("127.0.0.1", cdn.port))
                try:
                    assert isinstance(stream, PacketUpClient)
                    assert isinstance(stream.down, H2Stream)
                    window = CHROME_SETTINGS[SettingCodes.INITIAL_WINDOW_SIZE]
                    held = stream.down.held_bytes
                    # (what came before the protocol paused was acknowledged already)
                    await wait_until_async(lambda: held() >= window // 2, TIMEOUT,
                                           lambda: f"{held()} bytes held")
                    await asyncio.sleep(0.5)  # nothing more may come
                    before = held()
                    await asyncio.sleep(0.5)
                    assert held() == before <= window
                    stream.resume_reading()
                    await wait_until_async(lambda: len(client.data) >= len(down), TIMEOUT,
                                           lambda: f"{len(client.data)} bytes down")
                    assert bytes(client.data) == down
                finally:
                    stream.close()
                assert await asyncio.wait_for(client.lost, TIMEOUT) is None
        asyncio.run(main())
