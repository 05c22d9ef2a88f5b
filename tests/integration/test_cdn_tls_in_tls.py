"""The client->CDN leg must not look like TLS inside TLS (issue #16, item 1): a recording relay
(what a censor's capture gives) sits between veil's client and nginx-as-CDN, the user opens
real TLS connections to an HTTPS server through the tunnel, and the lab's TLS-in-TLS detector
(lab/tlsintls.py, Xue et al. 2024) judges every recorded client->CDN connection, for
packet-up over h2 and over HTTP/1.1 and for the WebSocket.

Positive control: the same carrier without veil's session shaping on either end (a naive
tunnel that relays the inner handshake record by record) is flagged where one connection
carries both directions (h2, WebSocket). packet-up over HTTP/1.1 splits the directions over
connections (the GET's carries only the server's bytes, each POST's only the client's and a
small 200), so the detector's pattern cannot form there, shaped or not: only veil's pass is
asserted for it."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from tests.integration.test_cdn_way_in import _with_server, tunnel_through
from tests.support import procs
from tests.support.cdn import cdn_nginx
from tests.support.relay import RecordingRelay
from veil.lab import tlsintls
from veil.lab.fingerprint import ja4
from veil.lab.flow import Chunk, Direction, Endpoint, Flow
from veil.lab.tls import read_handshake
from veil.lab.verdict import Verdict
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.session import SessionConfig
from veil.protocol.shaping import NO_SHAPING
from veil.transport.cdn import wire
from veil.transport.cdn.client import CHROME_HTTP1
from veil.transport.tls13 import CHROME, ClientHelloSpec, TlsClient

TIMEOUT = 30.0
#: The relay's delay each way: a censor's vantage a few milliseconds from the client.
ONE_WAY_S = 0.005
#: Inner HTTPS fetches per run, one after another (each a new inner TLS handshake).
FETCHES = 3
#: The inner server's answer: a small web page.
PAGE = b"x" * 3000
WAYS = [("https", True), ("https", False), ("wss", False)]
WAY_IDS = ["packet-up-h2", "packet-up-http1", "websocket"]
#: Runs of the naive carrier, of which one must be caught (see the control below).
CONTROL_RUNS = 3
#: Where a naive carrier must be caught: one connection carries both directions.
BOTH_DIRECTIONS_ON_ONE_CONNECTION = {"packet-up-h2", "websocket"}

pytestmark = pytest.mark.skipif(not Path(procs.NGINX).exists(), reason="needs nginx 1.22")


async def https_server(directory: Path) -> asyncio.Server:
    """An HTTPS server (TLS 1.3, a self-signed EC certificate): reads a request head, answers
    with PAGE, closes."""
    cert, key = procs.make_cert(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(PAGE) + PAGE)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()
    return await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)


async def fetch_through_socks(socks: Address, target: int) -> bytes:
    """A user's HTTPS fetch through veil's SOCKS5 inbound: the TLS handshake rides the tunnel."""
    reader, writer = await asyncio.open_connection(socks.host, socks.port)
    try:
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target.to_bytes(2, "big"))
        assert (await reader.readexactly(10))[:2] == b"\x05\x00"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        await writer.start_tls(context, server_hostname="localhost")
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        return await reader.readexactly(len(PAGE))
    finally:
        writer.close()


async def capture(tmp: Path, scheme: str, http2: bool, shaping: bool) -> list[Flow]:
    """The client->CDN connections of one tunnel that made FETCHES inner HTTPS fetches."""
    port = procs.unused_port()
    secret = wire.new_secret_path()
    with cdn_nginx(port, name="localhost", http2=http2) as cdn:
        relay = RecordingRelay(Address("127.0.0.1", cdn.port), ONE_WAY_S)
        await relay.start()
        try:
            web = await https_server(tmp)
            try:
                async def body(key: AccessKey, _echo: Address) -> None:
                    async def use(socks: Address) -> None:
                        for _ in range(FETCHES):
                            page = await asyncio.wait_for(fetch_through_socks(
                                socks, web.sockets[0].getsockname()[1]), TIMEOUT)
                            assert page == PAGE
                    config = None if shaping else SessionConfig(shaping=NO_SHAPING)
                    await tunnel_through(key, use, session_config=config)
                await _with_server(tmp, scheme, body, port, secret, cdn,
                                   via_port=relay.port, shaping=shaping)
            finally:
                web.close()
                await web.wait_closed()
        finally:
            await relay.close()
        protocols = {line.split()[0] for line in cdn.requests()}
        assert protocols == {"HTTP/2.0" if http2 and scheme == "https" else "HTTP/1.1"}
        return relay.flows


def expected_ja4(spec: ClientHelloSpec) -> str:
    """The JA4 of ``spec``'s ClientHello, as veil's direct way sends it (CHROME)."""
    tls = TlsClient("localhost", spec=spec)
    tls.connect()
    flow = Flow("tcp", Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2), 0.0,
                chunks=[Chunk(Direction.CLIENT, 0.0, tls.data_to_send())])
    handshake = read_handshake(flow)
    assert handshake is not None and handshake.client_hello is not None
    return str(ja4(handshake.client_hello))


def client_ja4s(flows: list[Flow]) -> set[str]:
    found = set()
    for flow in flows:
        handshake = read_handshake(flow)
        assert handshake is not None and handshake.client_hello is not None
        found.add(str(ja4(handshake.client_hello)))
    return found


def verdicts(flows: list[Flow]) -> list[Verdict]:
    assert flows, "no client->CDN connection recorded"
    return [tlsintls.detect(flow) for flow in flows]


def show(found: list[Verdict]) -> str:
    return "\n".join(f"{v.flagged} {v.evidence} {v.details.get('bursts', '')}" for v in found)


@pytest.mark.parametrize(("scheme", "http2"), WAYS, ids=WAY_IDS)
def test_no_inner_tls_handshake_shows_on_the_client_cdn_leg(
        scheme: str, http2: bool, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    way = request.node.callspec.id
    flows = asyncio.run(capture(tmp_path, scheme, http2, shaping=True))
    # packet-up sends the direct way's ClientHello (Chrome's, ALPN h2): the same JA4;
    # a WebSocket Chrome's for a WebSocket (ALPN http/1.1 only).
    assert client_ja4s(flows) == {expected_ja4(CHROME if scheme == "https" else CHROME_HTTP1)}
    found = verdicts(flows)
    print(show(found))
    assert not any(v.flagged for v in found), show(found)
    if way not in BOTH_DIRECTIONS_ON_ONE_CONNECTION:
        return
    # The positive control: the same carrier with no shaping on either end. On a loaded
    # 2-core box its records now and then coalesce into bursts the detector does not match
    # (one run in ~8 in CI), as a real path's can: caught in one of up to CONTROL_RUNS runs
    # shows the detector sees the naive carrier; veil's pass above holds on every run.
    tried = []
    for attempt in range(CONTROL_RUNS):
        (tmp_path / f"naive{attempt}").mkdir()
        naive = verdicts(asyncio.run(capture(tmp_path / f"naive{attempt}", scheme, http2,
                                             shaping=False)))
        print(show(naive))
        tried.append(show(naive))
        if any(v.flagged for v in naive):
            break
    else:
        raise AssertionError(f"the naive carrier was never flagged: {tried}")
