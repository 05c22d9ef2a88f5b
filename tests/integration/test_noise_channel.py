"""veil's channel over the CDN carrier (net/noise_channel.py), through a real nginx set up as
a CDN: the server answers only a client that knows its static key and holds a valid
authenticator bound to this very handshake; then plaintext flows both ways, sealed."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.integration.test_cdn_carrier import Peer, listening
from tests.support import procs
from tests.support.cdn import CDN_NAME, cdn_nginx
from tests.support.wait import wait_until_async
from veil.cover.backends import BuiltinCover
from veil.errors import AuthError, TransportError
from veil.net.noise_channel import NoiseClientChannel, NoiseServerChannel, SealedTransport
from veil.protocol.noise import generate_static_keypair
from veil.server.gate import Gate
from veil.transport.cdn import wire
from veil.transport.cdn.client import open_carrier
from veil.transport.cdn.server import CarrierServer

TIMEOUT = 30.0
GOOD_AUTH = b"a valid authenticator for "
pytestmark = pytest.mark.skipif(not Path(procs.NGINX).exists(), reason="needs nginx 1.22")


@asynccontextmanager
async def origin(listener: socket.socket, tmp: Path, secret: str, static_private: bytes,
                 sessions: list[tuple[bytes, Peer]]) -> AsyncIterator[None]:
    """veil's port in-process: gate, cover, carrier, and the Noise server channel, whose
    authenticator accepts GOOD_AUTH + the client's ephemeral key, and echoes."""
    cert, key = procs.make_cert(tmp)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def on_request(payload: bytes, binding: bytes) -> Callable[[SealedTransport], None] | str:
        if payload != GOOD_AUTH + binding:
            return "replayed"

        def accept(sealed: SealedTransport) -> None:
            peer = Peer(b"welcome")
            sessions.append((binding, peer))
            sealed.set_protocol(peer)
            peer.connection_made(sealed)
            sealed.release()
        return accept

    carriers = CarrierServer([secret], lambda: NoiseServerChannel(static_private, on_request))
    cover = BuiltinCover(claim=carriers)
    gate = Gate(ssl_context=context, cover=cover, ways_in=[])
    task = asyncio.get_running_loop().create_task(gate.serve(listener))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gate.close()
        carriers.close()
        cover.close()
        await asyncio.sleep(0.05)


async def dial(cdn_port: int, ca_file: Path, secret: str, server_public: bytes,
               auth: Callable[[bytes], bytes], variant: str = "websocket",
               ) -> tuple[SealedTransport, Peer]:
    channel = NoiseClientChannel(server_public, auth)
    await open_carrier(f"https://{CDN_NAME}:{cdn_port}{secret}", lambda: channel,
                       variant=variant, ca_file=str(ca_file),
                       connect_to=("127.0.0.1", cdn_port))
    sealed = await asyncio.wait_for(channel.ready, TIMEOUT)
    peer = Peer()
    sealed.set_protocol(peer)
    peer.connection_made(sealed)
    sealed.release()
    return sealed, peer


@pytest.mark.parametrize("variant", ["websocket", "packet-up"])
def test_a_key_holder_gets_a_sealed_channel_and_strangers_get_nothing(
        variant: str, tmp_path: Path) -> None:
    server_key = generate_static_keypair()
    other_key = generate_static_keypair()
    secret = wire.new_secret_path()
    blob = os.urandom(300_000)
    listener = listening()
    with listener, cdn_nginx(listener.getsockname()[1]) as cdn:
        async def main() -> None:
            sessions: list[tuple[bytes, Peer]] = []
            async with origin(listener, tmp_path, secret, server_key.private, sessions):
                # The key holder: its authenticator is bound to its own ephemeral key.
                sealed, client = await dial(cdn.port, cdn.ca_file, secret, server_key.public,
                                            lambda binding: GOOD_AUTH + binding, variant)
                # A full-device tunnel's IP stream asks for more write buffering, as it does
                # on TLS; the carrier's bounds are fixed, and stay (it asked, and went on).
                limits = sealed.get_write_buffer_limits()
                sealed.set_write_buffer_limits(high=4 * 1024 * 1024)
                assert sealed.get_write_buffer_limits() == limits
                sealed.write(blob)
                await wait_until_async(lambda: sessions and len(sessions[0][1].data)
                                       >= len(blob), TIMEOUT, "the blob up")
                (_, server_peer), = sessions
                assert bytes(server_peer.data) == blob
                await wait_until_async(lambda: bytes(client.data) == b"welcome", TIMEOUT,
                                       "the server's welcome down")
                sealed.close()
                await asyncio.wait_for(client.lost, TIMEOUT)
                await asyncio.wait_for(server_peer.lost, TIMEOUT)
                # A client that does not know the server's key: the server cannot read its
                # first message and cuts the carrier; the client learns nothing else.
                with pytest.raises(TransportError):
                    await dial(cdn.port, cdn.ca_file, secret, other_key.public,
                               lambda binding: GOOD_AUTH + binding, variant)
                # The right key but an authenticator the server refuses (a replay, say): the
                # answer, sealed, says so.
                with pytest.raises(AuthError, match=r"refused the key \(replayed"):
                    await dial(cdn.port, cdn.ca_file, secret, server_key.public,
                               lambda binding: GOOD_AUTH + bytes(len(binding)), variant)
                assert len(sessions) == 1
        asyncio.run(main())
