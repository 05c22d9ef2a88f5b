"""A tunnel that dials pinned addresses (what ``veil connect --tun`` gives it): each way in is
reached at the IP resolved once at start, whatever the name resolves to later, and a CDN way
still sends the CDN's name in SNI and Host. Real veil server, real nginx as the CDN.

The names here resolve nowhere (``.invalid``, ``cdn.test``): only the pins can reach them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.cdn import CDN_NAME, cdn_nginx
from tests.support.socks_echo import echo_target, through_socks
from veil.client.socks5 import Socks5Inbound
from veil.config import ServerOptions
from veil.manage.state import init_state
from veil.net.client_session import ClientTunnel
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.endpoint import parse_endpoint
from veil.server.service import VeilServer
from veil.transport.cdn import wire

pytestmark = pytest.mark.skipif(not Path(procs.NGINX).exists(), reason="needs nginx 1.22")

# A session over either way on loopback takes well under a second; the rest is for a loaded
# 2-core box (and, for the CDN case, the refused direct way's two failures first).
READY_S = 30.0
DIRECT_NAME = "veil-direct.invalid"
# A loopback address nothing listens on: a way pinned there is refused.
NOWHERE = "127.0.0.2"


async def _through(key: AccessKey, pinned: dict[str, str], target: int) -> int:
    """Open a tunnel with ``pinned``, echo a payload through it; the way it ended up on."""
    tunnel = ClientTunnel(key, pinned=pinned)
    socks = Socks5Inbound(tunnel, Address("127.0.0.1", 0))
    await socks.start()
    tunnel.start()
    try:
        assert await tunnel.wait_ready(READY_S), tunnel.last_error
        payload = os.urandom(4096)
        assert await through_socks(socks.address, target, payload) == payload
        return tunnel.chooser.current
    finally:
        await socks.close()
        await tunnel.close()


def test_ways_are_dialled_at_their_pinned_addresses(tmp_path: Path) -> None:
    async def main() -> None:
        port = procs.unused_port()
        secret = wire.new_secret_path()
        with cdn_nginx(port) as cdn:
            os.environ["SSL_CERT_FILE"] = str(cdn.ca_file)
            try:
                via = parse_endpoint(f"https://{CDN_NAME}:{cdn.port}{secret}")
                listen = Address("127.0.0.1", port)
                state = init_state(tmp_path / "state", listen=listen)[0]
                server = VeilServer(state, ServerOptions(listen=listen, allow_private=True,
                                                         via=(via,)))
                await server.start()
                target = await echo_target()
                try:
                    key = AccessKey.parse(server.users.access_key(server.users.add("alice")))
                    named = dataclasses.replace(key, server=Address(DIRECT_NAME, port))
                    echo = target.sockets[0].getsockname()[1]
                    # The direct way's name resolves nowhere: its pin is what reaches it.
                    assert await _through(named, {DIRECT_NAME: "127.0.0.1",
                                                  CDN_NAME: "127.0.0.1"}, echo) == 0
                    # Pinned where nothing listens, the direct way is refused and the client
                    # moves to the CDN way, dialled at its pin with cdn.test in SNI (the
                    # CDN's certificate is for that name only) and Host.
                    assert await _through(named, {DIRECT_NAME: NOWHERE,
                                                  CDN_NAME: "127.0.0.1"}, echo) == 1
                    # A way whose name has no pin is not used at all.
                    lone = ClientTunnel(named, pinned={CDN_NAME: "127.0.0.1"})
                    assert lone.ways == (via,)
                finally:
                    target.close()
                    await target.wait_closed()
                    await server.stop()
            finally:
                del os.environ["SSL_CERT_FILE"]

    asyncio.run(main())
