"""How the client reads the end of a connection before the server's first frames: a website's
answer (the cover's HTTP/2 greeting, then its close) is a refused key; nothing at all is the
path cut. Found by the floors smoke run: with uvloop 0.19 the greeting and the close came in
separate reads, and a wrong key was reported as "TLS handshake cut" (and counted toward
blocking the way) instead of "refused the key"."""

from __future__ import annotations

import asyncio

from tests.unit.test_driver_turns import RecordingTransport
from veil.net.client_session import _ClientDriver
from veil.protocol.failover import Failure
from veil.protocol.frames import COVER_H2_GREETING
from veil.protocol.session import Session


def ended(first: bytes, exc: Exception | None) -> tuple[bool, Failure | None]:
    async def main() -> tuple[bool, Failure | None]:
        driver = _ClientDriver(Session(client=True, now=asyncio.get_running_loop().time()))
        driver.connection_made(RecordingTransport())
        if first:
            driver.data_received(first)
        driver.connection_lost(exc)
        return await driver.accepted, driver.path_failure
    return asyncio.run(main())


def test_the_covers_greeting_then_a_close_is_a_refusal() -> None:
    assert ended(COVER_H2_GREETING, None) == (False, None)


def test_a_close_with_nothing_said_is_the_path() -> None:
    assert ended(b"", None) == (False, Failure.CUT)
    assert ended(b"", ConnectionResetError()) == (False, Failure.RESET)
