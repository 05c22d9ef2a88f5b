"""A stream wanted while the tunnel's sessions take no new one gets a new session, at once.

A session takes no new stream once it has been idle nearly as long as the server's idle
close (the reuse limit: an OPEN sent then could cross the server's CLOSE); where the server
holds its destinations' idle closes (FEATURE_HOLDS_IDLE_CLOSES), streams open but quiet that
long count as idle too. Two faults, on real sockets (a veil server, the client's tunnel, a
TCP forward to an echo server, and a relay that delays every read like a 100 ms path):

* while the next session came up, every stream waiting for it spun ``wait_ready``: the
  tunnel's "ready" event stayed set for the session it no longer used, so each waiter woke,
  found nothing and yielded, thousands of times a handshake, a core busy for as long as the
  handshake took (on a slow path, seconds);
* a session with quiet streams open lives on (nothing closes it while its destination says
  nothing), so its slot waited on it and opened no other: a stream wanted beside it waited
  for the inbound's timeout and failed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.relay import RecordingRelay
from tests.support.socks_echo import echo as echo_handler
from veil.client.forward import TcpForward
from veil.config import ServerOptions
from veil.manage.state import init_state
from veil.net.client_session import ClientTunnel
from veil.net.driver import SessionDriver
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.endpoint import tls_endpoint
from veil.protocol.failover import FailoverConfig, Failure
from veil.protocol.session import SessionConfig
from veil.server import outbound
from veil.server.service import VeilServer

LOOPBACK = "127.0.0.1"
ANY_PORT = Address(LOOPBACK, 0)
#: The relay's delay each way: a handshake of a few round trips then takes ~0.3 s, long
#: enough for a spinning waiter to show.
ONE_WAY_S = 0.05
#: The client's reuse limit here (70 s shipped), and how far past it the test waits.
REUSE_S = 0.4
PAST_REUSE_S = REUSE_S + 0.3
#: The server's idle close: far away, so nothing closes a session during a test.
SERVER_IDLE_CLOSE_S = 60.0
#: One request's budget (its failure, not a wait); what a new session may cost is far less.
REQUEST_TIMEOUT_S = 10.0
#: How often a waiter may look for a session while one comes up: on each session added or
#: gone, a few times; spinning, it looked thousands of times.
MAX_PICKS = 20


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    async def __aenter__(self) -> Bench:
        state = init_state(self.tmp / "state", listen=Address(LOOPBACK, 443))[0]
        self.server = VeilServer(state, ServerOptions(listen=ANY_PORT, allow_private=True,
                                                      idle_close=SERVER_IDLE_CLOSE_S))
        user = self.server.users.add("alice")
        await self.server.start()
        self.echo = await asyncio.start_server(echo_handler, LOOPBACK, 0)
        self.relay = RecordingRelay(self.server.address, ONE_WAY_S)
        await self.relay.start()
        key = AccessKey(Address(LOOPBACK, self.relay.port), user.secret, state.pin, None,
                        "alice")
        self.tunnel = ClientTunnel(key, session_config=SessionConfig(reuse_limit=REUSE_S))
        self.picks = 0
        pick = self.tunnel._pick

        def counted_pick() -> SessionDriver | None:
            self.picks += 1
            return pick()

        self.tunnel._pick = counted_pick  # type: ignore[method-assign]
        self.forward = TcpForward(self.tunnel, ANY_PORT,
                                  Address(LOOPBACK, self.echo.sockets[0].getsockname()[1]))
        await self.forward.start()
        self.tunnel.start()
        assert await self.tunnel.wait_ready(REQUEST_TIMEOUT_S)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.forward.close()
        await self.tunnel.close()
        await self.relay.close()
        self.echo.close()
        await self.server.stop()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(LOOPBACK, self.forward.address.port)


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     data: bytes) -> bool:
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            writer.write(data)
            return await reader.readexactly(len(data)) == data
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False


def test_a_stream_after_the_reuse_limit_waits_for_the_new_session_without_spinning(
        tmp_path: Path) -> None:
    async def main() -> None:
        async with Bench(tmp_path) as bench:
            await asyncio.sleep(PAST_REUSE_S)  # the session, idle, takes no new stream
            bench.picks = 0
            reader, writer = await bench.connect()
            try:
                assert await round_trip(reader, writer, b"hello")
            finally:
                writer.transport.abort()
            assert len(bench.relay.flows) == 2, "the request opened one new session"
            assert bench.picks <= MAX_PICKS, f"looked for a session {bench.picks} times"

    asyncio.run(main())


def test_a_stream_after_the_way_in_changed_waits_for_the_new_session_without_spinning(
        tmp_path: Path) -> None:
    """The way in use changes under a session with a stream open: it keeps that stream, takes
    no new one, and the next stream waits for a session on the new way (a handshake through
    the delaying relay) without looking for one in a loop."""
    async def main() -> None:
        state = init_state(tmp_path / "state", listen=Address(LOOPBACK, 443))[0]
        server = VeilServer(state, ServerOptions(listen=ANY_PORT, also_listen=(ANY_PORT,),
                                                 allow_private=True,
                                                 idle_close=SERVER_IDLE_CLOSE_S))
        user = server.users.add("alice")
        await server.start()
        echo = await asyncio.start_server(echo_handler, LOOPBACK, 0)
        first, second = server.addresses
        relay = RecordingRelay(second, ONE_WAY_S)
        await relay.start()
        key = AccessKey(first, user.secret, state.pin, None, "alice",
                        (tls_endpoint(Address(LOOPBACK, relay.port)),))
        tunnel = ClientTunnel(key)
        forward = TcpForward(tunnel, ANY_PORT, Address(LOOPBACK, echo.sockets[0].getsockname()[1]))
        await forward.start()
        tunnel.start()
        picks = 0
        pick = tunnel._pick

        def counted_pick() -> SessionDriver | None:
            nonlocal picks
            picks += 1
            return pick()

        tunnel._pick = counted_pick  # type: ignore[method-assign]
        writers: list[asyncio.StreamWriter] = []
        try:
            reader, writer = await asyncio.open_connection(LOOPBACK, forward.address.port)
            writers.append(writer)
            assert await round_trip(reader, writer, b"first")  # open on the first way
            for _ in range(FailoverConfig().block_after):
                tunnel._failed(0, Failure.RESET)  # as a censor's resets would
            assert tunnel.chooser.current == 1
            picks = 0
            reader, writer = await asyncio.open_connection(LOOPBACK, forward.address.port)
            writers.append(writer)
            assert await round_trip(reader, writer, b"second way")
            assert len(relay.flows) == 1, "the new stream went on a session on the second way"
            assert picks <= MAX_PICKS, f"looked for a session {picks} times"
        finally:
            for writer in writers:
                writer.transport.abort()
            await forward.close()
            await tunnel.close()
            await relay.close()
            echo.close()
            await server.stop()

    asyncio.run(main())


def test_a_stream_beside_quiet_streams_opens_a_new_session_and_they_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbound, "HOLD_IDLE_CLOSES", True)

    async def main() -> None:
        async with Bench(tmp_path) as bench:
            quiet_reader, quiet_writer = await bench.connect()
            try:
                assert await round_trip(quiet_reader, quiet_writer, b"first")
                await asyncio.sleep(PAST_REUSE_S)  # open, but quiet past the reuse limit
                reader, writer = await bench.connect()
                try:
                    assert await round_trip(reader, writer, b"beside")
                finally:
                    writer.transport.abort()
                assert len(bench.relay.flows) == 2, "the new stream went on a new session"
                # The quiet stream stays on its session, which still carries it.
                assert await round_trip(quiet_reader, quiet_writer, b"again")
                assert len(bench.relay.flows) == 2
            finally:
                quiet_writer.transport.abort()

    asyncio.run(main())


def test_the_server_says_whether_it_holds_idle_closes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def told(tmp: Path) -> bool:
        async with Bench(tmp) as bench:
            (driver,) = bench.tunnel._drivers
            assert await asyncio.wait_for(driver.accepted, REQUEST_TIMEOUT_S)
            return driver.session.peer_holds_idle_closes  # its first frame said

    for hold in (True, False):
        monkeypatch.setattr(outbound, "HOLD_IDLE_CLOSES", hold)
        assert asyncio.run(told(tmp_path / str(hold))) is hold

