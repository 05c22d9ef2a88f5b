"""RESOLVE streams on the server (veil.server.outbound): a name's addresses under the
destination policy, or a RESET; the session lives on either way."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from tests.unit.test_driver_turns import RecordingTransport
from veil.net.driver import SessionDriver
from veil.protocol.address import Address
from veil.protocol.events import DataReceived, Event, StreamEnded, StreamReset
from veil.protocol.frames import ResetCode, StreamKind
from veil.protocol.resolve import decode_answer
from veil.protocol.session import Session, SessionConfig
from veil.protocol.shaping import NO_SHAPING
from veil.server.live import OutboundSlots
from veil.server.outbound import Outbound
from veil.server.policy import DestinationPolicy

QUIET = SessionConfig(keepalive_interval=None, idle_close=None, shaping=NO_SHAPING)
#: An answer from the server's thread pool takes milliseconds; past this the test fails.
ANSWER_WAIT_S = 5.0


async def ask(policy: DestinationPolicy, names: list[str]) -> tuple[list[Event], Outbound]:
    """Open a RESOLVE stream per name (OPEN and FIN, as the client does) to a server session
    driven by the real Outbound; return what the client receives once every stream ended."""
    loop = asyncio.get_running_loop()
    client = Session(client=True, now=loop.time(), config=QUIET)
    server = Session(client=False, now=loop.time(), config=QUIET)
    outbound = Outbound(policy, OutboundSlots(total=10, per_user=4))
    driver = SessionDriver(server, on_stream_opened=lambda event: outbound.resolve(driver,
                                                                                 event))
    tunnel = RecordingTransport()
    driver.connection_made(tunnel)
    for name in names:
        client.send_eof(client.open_stream(StreamKind.RESOLVE, Address(name, 0)))
    driver.data_received(client.data_to_send())
    events: list[Event] = []
    try:
        async with asyncio.timeout(ANSWER_WAIT_S):
            while sum(isinstance(e, StreamEnded | StreamReset) for e in events) < len(names):
                await asyncio.sleep(0.01)
                events += client.receive_data(bytes(tunnel.written), loop.time())
                tunnel.written.clear()
    finally:
        outbound.close()
    assert not server.closed and not client.closed
    assert server.stream_count == 0  # every RESOLVE stream is gone on the server
    return events, outbound


def test_the_server_answers_with_the_addresses_its_policy_allows() -> None:
    async def main() -> None:
        events, _ = await ask(DestinationPolicy(allow_private=True), ["localhost", "192.0.2.9"])
        answers = {e.stream_id: decode_answer(e.data) for e in events
                   if isinstance(e, DataReceived)}
        assert ipaddress.ip_address("127.0.0.1") in answers[1]
        assert answers[3] == (ipaddress.ip_address("192.0.2.9"),)
        assert {e.stream_id for e in events if isinstance(e, StreamEnded)} == {1, 3}

    asyncio.run(main())


def test_private_addresses_are_refused_as_for_connects_and_the_session_lives() -> None:
    async def main() -> None:
        events, _ = await ask(DestinationPolicy(allow_private=False),
                              ["127.0.0.1", "localhost", "192.0.2.9"])
        resets = {e.stream_id: e.code for e in events if isinstance(e, StreamReset)}
        assert resets == {1: ResetCode.REFUSED_DESTINATION, 3: ResetCode.REFUSED_DESTINATION}
        assert not any(isinstance(e, DataReceived) and e.stream_id in resets for e in events)
        # The other stream on the same session is answered.
        assert [decode_answer(e.data) for e in events if isinstance(e, DataReceived)] == [
            (ipaddress.ip_address("192.0.2.9"),)]

    asyncio.run(main())


def test_a_refused_tcp_port_is_refused_before_any_lookup_and_udp_is_not() -> None:
    import socket

    from veil.server.policy import RefusedPort, resolve

    policy = DestinationPolicy(allow_private=True, refused_tcp_ports=frozenset({25}))

    async def main() -> None:
        with pytest.raises(RefusedPort):
            # A name that cannot resolve: the port is refused before it is looked up.
            await resolve("does-not-exist.invalid", 25, policy)
        assert await resolve("127.0.0.1", 26, policy) == [(socket.AF_INET, "127.0.0.1")]
        assert await resolve("127.0.0.1", 25, policy, socket.SOCK_DGRAM) == [
            (socket.AF_INET, "127.0.0.1")]

    asyncio.run(main())
