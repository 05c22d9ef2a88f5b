"""The CDN way in, end to end: ``veil serve --via https://CDN/SECRET/`` (and ``wss://``) behind
a real nginx set up as a CDN (tests/support/cdn.py: its own certificate, request buffering on,
HTTP/1.1 to the origin); a client whose key's direct way is refused moves to the CDN way by
itself, and requests through its SOCKS5 inbound arrive byte-exact, 100 streams at once. The
server is authenticated by the key's Noise key, not by the CDN's certificate: a key with
another server's Noise key never gets a session."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.support import procs
from tests.support.cdn import Cdn, cdn_nginx
from tests.support.socks_echo import echo_target, through_socks
from tests.support.wait import wait_until_async
from veil.client.socks5 import Socks5Inbound
from veil.config import ServerOptions
from veil.manage.state import init_state
from veil.net.client_session import ClientTunnel
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.endpoint import parse_endpoint
from veil.protocol.failover import FailoverConfig
from veil.protocol.noise import generate_static_keypair
from veil.protocol.session import SessionConfig
from veil.server import service
from veil.server.service import VeilServer
from veil.store.base import Usage
from veil.transport.cdn import wire

T = TypeVar("T")
TIMEOUT = 30.0
STREAMS = 100
#: Idle past the 2 s the CDN's idle-timeout test gives nginx.
IDLE_S = 3.5
BODY = 64 * 1024
pytestmark = pytest.mark.skipif(not Path(procs.NGINX).exists(), reason="needs nginx 1.22")


def refused_port() -> int:
    return procs.unused_port()  # nothing listens there: the direct way is "blocked"


async def with_cdn_server(tmp: Path, scheme: str,
                          body: Callable[[AccessKey, Address], Awaitable[T]],
                          cdn_read_timeout: int = 100, http2: bool = False,
                          cdn_log: list[str] | None = None,
                          servers: list[VeilServer] | None = None) -> T:
    """``body`` with a key whose extra way in is ``scheme``://nginx-as-CDN/SECRET/ (h2 to
    clients when ``http2``); the CDN's access log lines go into ``cdn_log``."""
    port = procs.unused_port()
    secret = wire.new_secret_path()
    with cdn_nginx(port, name="localhost", read_timeout=cdn_read_timeout, http2=http2) as cdn:
        try:
            return await _with_server(tmp, scheme, body, port, secret, cdn, servers=servers)
        finally:
            if cdn_log is not None:
                cdn_log += cdn.requests()


async def _with_server(tmp: Path, scheme: str, body: Callable[[AccessKey, Address], Awaitable[T]],
                       port: int, secret: str, cdn: Cdn, via_port: int | None = None,
                       shaping: bool = True, servers: list[VeilServer] | None = None) -> T:
    """veil's server on ``port`` behind ``cdn``, announcing the CDN way in on ``via_port``
    (the CDN's own unless something sits in front of it)."""
    os.environ["SSL_CERT_FILE"] = str(cdn.ca_file)  # the CDN's CA, as the web PKI's
    try:
        via = parse_endpoint(f"{scheme}://localhost:{via_port or cdn.port}{secret}")
        listen = Address("127.0.0.1", port)
        state = init_state(tmp / "state", listen=listen)[0]
        server = VeilServer(state, ServerOptions(listen=listen, allow_private=True,
                                                 via=(via,), shaping=shaping))
        await server.start()
        if servers is not None:
            servers.append(server)
        try:
            key = AccessKey.parse(server.users.access_key(server.users.add("alice")))
            assert key.noise_key is not None and key.via == (via,)
            target = await echo_target()
            try:
                return await body(key, Address("127.0.0.1",
                                               target.sockets[0].getsockname()[1]))
            finally:
                target.close()
        finally:
            await server.stop()
    finally:
        del os.environ["SSL_CERT_FILE"]


async def tunnel_through(key: AccessKey, use: Callable[[Address], Awaitable[T]],
                         session_config: SessionConfig | None = None) -> T:
    """A client whose direct way is refused: it must move to the CDN way by itself."""
    blocked = dataclasses.replace(key, server=Address("127.0.0.1", refused_port()))
    tunnel = ClientTunnel(blocked, failover=FailoverConfig(), session_config=session_config)
    socks = Socks5Inbound(tunnel, Address("127.0.0.1", 0))
    await socks.start()
    tunnel.start()
    try:
        assert await tunnel.wait_ready(TIMEOUT), tunnel.last_error
        return await use(socks.address)
    finally:
        await socks.close()
        await tunnel.close()


@pytest.mark.parametrize(("scheme", "http2"), [("https", False), ("wss", False),
                                              ("https", True), ("wss", True)],
                         ids=["https", "wss", "https-h2", "wss-h2cdn"])
def test_a_blocked_direct_way_moves_to_the_cdn_and_100_streams_arrive_byte_exact(
        scheme: str, http2: bool, tmp_path: Path) -> None:
    """Through a CDN that speaks h2 to clients, packet-up rides h2 (its log says HTTP/2.0 for
    every request) and a WebSocket stays on HTTP/1.1."""
    servers: list[VeilServer] = []

    async def body(key: AccessKey, target: Address) -> None:
        async def use(socks: Address) -> None:
            payloads = [os.urandom(BODY) for _ in range(STREAMS)]
            answers = await asyncio.wait_for(asyncio.gather(
                *(through_socks(socks, target.port, p) for p in payloads)), TIMEOUT)
            assert answers == payloads
        await tunnel_through(key, use)
        # The session's bytes are alice's usage, as on the TLS port.
        await wait_until_async(lambda: servers[0].live.user_bytes.get(
            "alice", Usage()).total >= 2 * STREAMS * BODY, TIMEOUT,
            lambda: f"alice's usage: {servers[0].live.user_bytes}")
        # And the session counts as a handshake accepted on the CDN way in (the metric).
        assert servers[0].gate.stats.accepted.get("cdn", 0) >= 1, servers[0].gate.stats

    cdn_log: list[str] = []
    asyncio.run(with_cdn_server(tmp_path, scheme, body, http2=http2, cdn_log=cdn_log,
                                servers=servers))
    protocols = {line.split()[0] for line in cdn_log}
    assert protocols == {"HTTP/2.0" if http2 and scheme == "https" else "HTTP/1.1"}, cdn_log


def test_a_key_naming_another_servers_noise_key_gets_no_session(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The CDN's certificate is valid either way: only the Noise key tells veil's server."""
    async def body(key: AccessKey, target: Address) -> None:
        impostor = dataclasses.replace(key, noise_key=generate_static_keypair().public)
        blocked = dataclasses.replace(impostor, server=Address("127.0.0.1", refused_port()))
        tunnel = ClientTunnel(blocked, failover=FailoverConfig())
        tunnel.start()
        try:
            assert not await tunnel.wait_ready(5.0)
            await wait_until_async(lambda: "closed during the Noise handshake" in caplog.text,
                                   TIMEOUT, lambda: f"the CDN way's failure: {caplog.text}")
        finally:
            await tunnel.close()

    asyncio.run(with_cdn_server(tmp_path, "https", body))


@pytest.mark.parametrize("scheme", ["https", "wss"])
def test_an_idle_stream_outlives_the_cdns_idle_timeout(
        scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CDN cuts a request silent for its timeout (100 s at Cloudflare; 2 s here): the server
    pings a CDN session with a stream open before that (scaled the same), so an idle login
    lives on. Positive control: without the pings the CDN cuts it."""
    async def body(key: AccessKey, target: Address) -> None:
        async def use(socks: Address) -> None:
            reader, writer = await asyncio.open_connection(socks.host, socks.port)
            try:
                writer.write(b"\x05\x01\x00")
                assert await reader.readexactly(2) == b"\x05\x00"
                writer.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target.port.to_bytes(2, "big"))
                assert (await reader.readexactly(10))[:2] == b"\x05\x00"
                for _ in range(2):
                    await asyncio.sleep(IDLE_S)  # idle past the CDN's timeout
                    writer.write(b"still there?")
                    got = await asyncio.wait_for(reader.readexactly(12), TIMEOUT)
                    assert got == b"still there?"
            finally:
                writer.close()
        await tunnel_through(key, use)

    monkeypatch.setattr(service, "CDN_IDLE_PING_S", 1.0)
    asyncio.run(with_cdn_server(tmp_path, scheme, body, cdn_read_timeout=2))
    # The control: no idle pings, and the same idle stream is cut with its carrier.
    monkeypatch.setattr(service, "CDN_IDLE_PING_S", None)
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError, TimeoutError)):
        asyncio.run(with_cdn_server(tmp_path / "control", scheme, body, cdn_read_timeout=2))
