"""``veil serve`` says at start-up what a censor sees when its keys name an IP address.

Keys for a server reached by IP make clients send no server name: nDPI flags such a
ClientHello ("Missing SNI"), rare for real websites. The start-up log says so once, with the
remedies; a server with a DNS name says nothing of it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from veil.config import ServerOptions
from veil.manage.state import init_state
from veil.protocol.address import Address
from veil.server.service import VeilServer


def start_up_log(tmp_path: Path, public: str, caplog: pytest.LogCaptureFixture) -> list[str]:
    """The veil.server records of starting and stopping a real server on loopback."""
    state, _ = init_state(tmp_path / "state", listen=Address("127.0.0.1", 0), public=public)

    async def run() -> None:
        server = VeilServer(state, ServerOptions(listen=Address("127.0.0.1", 0)))
        try:
            await server.start()
        finally:
            await server.stop()

    with caplog.at_level(logging.INFO, logger="veil.server"):
        asyncio.run(run())
    messages = [r.getMessage() for r in caplog.records if r.name == "veil.server"]
    assert any(m.startswith("listening on") for m in messages), messages
    return [r.getMessage() for r in caplog.records
            if r.name == "veil.server" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("public", ["203.0.113.7:443", "[2001:db8::7]:443"])
def test_an_ip_public_address_warns_that_keys_send_no_sni(
        tmp_path: Path, public: str, caplog: pytest.LogCaptureFixture) -> None:
    warnings = start_up_log(tmp_path, public, caplog)
    (warning,) = [w for w in warnings if "SNI" in w]
    host = public.rsplit(":", 1)[0].strip("[]")
    assert host in warning
    assert "Missing SNI" in warning and "--public" in warning and "#18" in warning


def test_a_named_public_address_does_not_warn(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    assert [w for w in start_up_log(tmp_path, "vpn.example.org:443", caplog)
            if "SNI" in w] == []
