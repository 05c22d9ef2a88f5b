"""An echo target and a SOCKS5 CONNECT through a client's inbound, for tests that check
streams end to end (byte-exact round trips through a tunnel)."""

from __future__ import annotations

import asyncio

from veil.protocol.address import Address

#: How long one round trip through a tunnel may take before the test fails.
ROUND_TRIP_TIMEOUT_S = 30.0


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A start_server callback: every byte back, then close on the client's FIN (or reset)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()  # Python 3.11.2 does not close it for us


async def echo_target() -> asyncio.Server:
    """An echo server on a loopback port (:func:`echo`)."""
    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def through_socks(socks: Address, target: int, payload: bytes) -> bytes:
    """``payload`` to 127.0.0.1:``target`` through the SOCKS5 inbound at ``socks``, then a
    FIN; what came back until the target closed."""
    reader, writer = await asyncio.open_connection(socks.host, socks.port)
    try:
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target.to_bytes(2, "big"))
        reply = await reader.readexactly(10)
        assert reply[:2] == b"\x05\x00", reply
        writer.write(payload)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(-1), ROUND_TRIP_TIMEOUT_S)
    finally:
        writer.close()
