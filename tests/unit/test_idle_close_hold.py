"""A destination's own idle close waits for the client's next bytes (#15, item 2).

A site closes an idle connection by itself (nginx: a GOAWAY record, close_notify, FIN).
Crossing the tunnel when it happens, that close is a moment veil's server opens, which a
website never does (tests/lab/test_lifecycle.py measures it against Chromium and nginx). The
server holds it until the client next speaks, and a session whose streams are all such closes
is idle since their last real byte. Real output after a silence is never held.

The server's session runs in a real SessionDriver with a real TcpRelay on a real socket to a
"destination" the test drives; the client is a sans-IO Session fed what the server wrote.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from tests.unit.test_driver_turns import RecordingTransport
from veil.net import driver as driver_module
from veil.net.driver import SessionDriver, TcpRelay
from veil.protocol.address import Address
from veil.protocol.events import DataReceived, Event, SessionClosed, StreamEnded, StreamOpened
from veil.protocol.frames import StreamKind
from veil.protocol.idleclose import CloseShape, idle_close_shape
from veil.protocol.session import IDLE_CLOSE_REASON, Session, SessionConfig
from veil.protocol.shaping import NO_SHAPING

DEST = Address("site.example", 443)
#: An HTTP/2 GOAWAY in a TLS 1.3 record (34 bytes of body), then close_notify (19).
GOAWAY = bytes.fromhex("1703030022") + bytes(34)
CLOSE_NOTIFY = bytes.fromhex("1703030013") + bytes(19)
SILENCE_S = 0.2  # HOLD_AFTER_SILENCE_S, shortened for the test
QUIET = SessionConfig(keepalive_interval=None, idle_close=None, shaping=NO_SHAPING)


# ------------------------------------------------------------------ the shape, sans-IO
@pytest.mark.parametrize(("data", "shape"), [
    (GOAWAY + CLOSE_NOTIFY, CloseShape.YES),
    (CLOSE_NOTIFY, CloseShape.YES),
    (bytes.fromhex("150303001a") + bytes(26), CloseShape.YES),  # TLS 1.2's alert, AES-GCM
    (GOAWAY, CloseShape.MAYBE),  # its close_notify may come in the next read
    (GOAWAY + CLOSE_NOTIFY[:3], CloseShape.MAYBE),
    (CLOSE_NOTIFY[:10], CloseShape.MAYBE),
    (b"done\n", CloseShape.NO),  # ssh host 'sleep 300; echo done'
    (GOAWAY + GOAWAY, CloseShape.NO),  # two frames of output, not a close
    (CLOSE_NOTIFY + CLOSE_NOTIFY, CloseShape.NO),
    (bytes.fromhex("1703030100") + bytes(256), CloseShape.NO),  # a response's record
    (bytes.fromhex("1603030013") + bytes(19), CloseShape.NO),  # a handshake record
    (bytes.fromhex("1703010013") + bytes(19), CloseShape.NO),  # not TLS 1.2/1.3's version
    (b"", CloseShape.NO),
])
def test_the_shape_of_an_idle_close(data: bytes, shape: CloseShape) -> None:
    assert idle_close_shape(data) is shape


# ------------------------------------------------------------------ the driver
class Bench:
    """A server SessionDriver whose every stream is relayed (holding idle closes) to one
    socket the test holds as the destination; the client is sans-IO."""

    def __init__(self, loop: asyncio.AbstractEventLoop, server_config: SessionConfig) -> None:
        self.loop = loop
        self.client = Session(client=True, now=loop.time(), config=QUIET)
        self.server = Session(client=False, now=loop.time(), config=server_config)
        self.tunnel = RecordingTransport()
        self.driver = SessionDriver(self.server, on_stream_opened=self._opened)
        self.driver.connection_made(self.tunnel)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.destination: socket.socket | None = None
        self.relay: TcpRelay | None = None
        self.seen = 0  # how much of tunnel.written the client has parsed

    def _opened(self, event: StreamOpened) -> None:
        relay = TcpRelay(self.driver, event.stream_id, hold_idle_close=True)
        self.driver.attach(event.stream_id, relay)
        self.relay = relay
        outbound = socket.create_connection(self.listener.getsockname())
        self.destination, _ = self.listener.accept()
        # Blocking reads in the loop's thread: what they wait for was written at once (an
        # asyncio transport sends straight away when its buffer is empty); never hang.
        self.destination.settimeout(5)
        self.loop.create_task(self.loop.connect_accepted_socket(lambda: relay, outbound))

    async def open(self) -> int:
        stream_id = self.client.open_stream(StreamKind.TCP, DEST)
        self.client_speaks()
        for _ in range(100):
            if self.relay is not None and self.relay.transport is not None:
                break
            await asyncio.sleep(0.01)
        assert self.destination is not None
        return stream_id

    def client_speaks(self, data: bytes = b"", stream_id: int | None = None) -> None:
        if stream_id is not None:
            self.client.send_data(stream_id, data)
        self.driver.data_received(self.client.data_to_send(self.loop.time()))

    def client_events(self) -> list[Event]:
        fresh = bytes(self.tunnel.written[self.seen:])
        self.seen = len(self.tunnel.written)
        return self.client.receive_data(fresh, self.loop.time())

    def close(self) -> None:
        if self.destination is not None:
            self.destination.close()
        self.listener.close()
        if self.relay is not None and self.relay.transport is not None:
            self.relay.transport.abort()


def run(server_config: SessionConfig, body: Callable[[Bench], Awaitable[None]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver_module, "HOLD_AFTER_SILENCE_S", SILENCE_S)

    async def main() -> None:
        bench = Bench(asyncio.get_running_loop(), server_config)
        try:
            await body(bench)
        finally:
            bench.close()
            await asyncio.sleep(0.01)

    asyncio.run(main())


def data_of(events: list[Event]) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived))


def ended(events: list[Event]) -> bool:
    return any(isinstance(e, StreamEnded) for e in events)


async def answered(bench: Bench, stream_id: int) -> None:
    """The client asks, the destination answers: the stream's last activity."""
    bench.client_speaks(b"GET", stream_id)
    assert bench.destination is not None
    bench.destination.recv(100)
    bench.destination.sendall(b"answer")
    await asyncio.sleep(0.05)
    assert data_of(bench.client_events()) == b"answer"


async def quiet_stream(bench: Bench) -> int:
    """A stream that was asked and answered, then silent long enough for a close to be held."""
    stream_id = await bench.open()
    await answered(bench, stream_id)
    await asyncio.sleep(SILENCE_S * 2)
    return stream_id


def test_an_idle_close_waits_for_the_client_and_goes_with_its_next_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(bench: Bench) -> None:
        stream_id = await quiet_stream(bench)
        assert bench.destination is not None
        bench.destination.sendall(GOAWAY + CLOSE_NOTIFY)
        bench.destination.shutdown(socket.SHUT_WR)
        await asyncio.sleep(driver_module.CLOSE_FIN_WAIT_S * 2)
        assert bench.client_events() == [], "the site's idle close crossed when it happened"
        # The client speaks (here on the stream itself, as a browser reusing the
        # connection does): the close goes out with the answer, bytes and FIN.
        bench.client_speaks(b"GET again", stream_id)
        await asyncio.sleep(0.05)
        events = bench.client_events()
        assert data_of(events) == GOAWAY + CLOSE_NOTIFY
        assert ended(events)

    run(QUIET, body, monkeypatch)


def test_a_session_whose_streams_all_closed_idle_ends_as_idle_without_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    idle_close = 0.6
    config = SessionConfig(keepalive_interval=None, idle_close=(idle_close, idle_close),
                           shaping=NO_SHAPING)

    async def body(bench: Bench) -> None:
        stream_id = await bench.open()
        await answered(bench, stream_id)
        last_activity = bench.loop.time()
        await asyncio.sleep(SILENCE_S * 2)
        assert bench.destination is not None
        bench.destination.sendall(CLOSE_NOTIFY)
        bench.destination.shutdown(socket.SHUT_WR)
        while not bench.server.closed and bench.loop.time() < last_activity + 5:
            await asyncio.sleep(0.02)
        closed_at = bench.loop.time()
        # Idle since the stream's last real byte, not since the site's close came.
        assert closed_at - last_activity == pytest.approx(idle_close, abs=0.2)
        events = bench.client_events()
        assert data_of(events) == b"", "the held close went out before the session's"
        (closed,) = [e for e in events if isinstance(e, SessionClosed)]
        assert closed.reason == IDLE_CLOSE_REASON

    run(config, body, monkeypatch)


def test_output_after_a_silence_is_never_held(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(bench: Bench) -> None:
        await quiet_stream(bench)
        assert bench.destination is not None
        bench.destination.sendall(b"done\n")  # ssh host 'sleep 300; echo done'
        bench.destination.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0.05)
        events = bench.client_events()
        assert data_of(events) == b"done\n" and ended(events)

    run(QUIET, body, monkeypatch)


def test_a_close_shaped_write_without_its_fin_goes_out_after_the_fin_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(bench: Bench) -> None:
        await quiet_stream(bench)
        assert bench.destination is not None
        bench.destination.sendall(CLOSE_NOTIFY)  # 2 bytes of output, say, and no FIN
        await asyncio.sleep(driver_module.CLOSE_FIN_WAIT_S + 0.15)
        events = bench.client_events()
        assert data_of(events) == CLOSE_NOTIFY and not ended(events)

    run(QUIET, body, monkeypatch)


def test_a_close_right_after_an_answer_crosses_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(bench: Bench) -> None:
        stream_id = await bench.open()
        await answered(bench, stream_id)
        assert bench.destination is not None
        bench.destination.sendall(CLOSE_NOTIFY)  # "Connection: close" after the answer
        bench.destination.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0.05)
        events = bench.client_events()
        assert data_of(events) == CLOSE_NOTIFY and ended(events)

    run(QUIET, body, monkeypatch)
