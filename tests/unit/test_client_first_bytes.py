"""How the client tells an accepted session from a cover site's answer by the server's first
bytes, including the cover's HTTP/2 greeting that may come first (server/gate.py)."""

from __future__ import annotations

import asyncio

import pytest

from veil.cover.http2 import SERVER_PREFACE
from veil.net.client_session import _ClientDriver
from veil.protocol.frames import COVER_H2_GREETING, FrameType, pack_header
from veil.protocol.session import Session


class NullTransport(asyncio.Transport):
    def write(self, data: object) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool:
        return False


def padding(length: int) -> bytes:
    return bytes(pack_header(FrameType.PADDING, 0, length)) + bytes(length)


def verdict(*pieces: bytes) -> bool | None:
    async def run() -> bool | None:
        session = Session(client=True, now=0.0)
        driver = _ClientDriver(session)
        driver.connection_made(NullTransport())
        for piece in pieces:
            driver.data_received(piece)
        return driver.accepted.result() if driver.accepted.done() else None
    return asyncio.run(run())


def test_the_greeting_is_the_covers() -> None:
    assert COVER_H2_GREETING == SERVER_PREFACE


@pytest.mark.parametrize("split", [1, 7, 39, 40, 41, 47, 48])
def test_an_accepted_session_is_recognised_after_the_greeting_in_any_split(split: int) -> None:
    data = COVER_H2_GREETING + padding(100)
    assert verdict(data[:split], data[split:]) is True
    assert verdict(padding(100)[:3], padding(100)[3:]) is True


def test_cover_answers_are_refusals() -> None:
    assert verdict(b"HTTP/1.1 400 Bad Request\r\n") is False
    # nginx's HTTP/2 greeting then a GOAWAY: not a session.
    goaway = bytes.fromhex("000008070000000000000000000000000001")
    assert verdict(COVER_H2_GREETING + goaway) is False
    assert verdict(padding(4000)) is False  # outside the server's first-padding range
    assert verdict(COVER_H2_GREETING[:20]) is None  # not enough to tell yet
