"""A bulk stream striped over a pool of 3 real TLS sessions (veil.protocol.stripe): a 16 MB
download through a real server arrives byte-exact while one connection's reader is paused,
and a session lost mid-stream resets the striped stream (nothing is resent) while the
tunnel goes on serving."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.support import procs
from veil.net.client_session import ClientTunnel
from veil.net.driver import SessionDriver
from veil.net.stripe import StripeGroup
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address

pytestmark = pytest.mark.slow

SIZE = 16 * 1024 * 1024
PAYLOAD = random.Random(20).randbytes(SIZE)  # fixed: the same bytes every run
POOL = 3
#: Generous bounds for a loaded CI machine: a 16 MB download takes ~1-3 s here.
TIMEOUT = 60.0
#: How long one connection's reader stays paused.
STALL_S = 1.0


async def _source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(PAYLOAD)
        await writer.drain()
        writer.write_eof()
        await reader.read()
    except OSError:
        pass
    finally:
        writer.close()


@asynccontextmanager
async def _tunnel(tmp_path: Path) -> AsyncIterator[tuple[ClientTunnel, StripeGroup, int]]:
    server = procs.start_veil_server(tmp_path)
    source = await asyncio.start_server(_source, "127.0.0.1", 0)
    tunnel = ClientTunnel(AccessKey.parse(server.key), pool_size=POOL, stripe=True)
    try:
        tunnel.start()
        async with asyncio.timeout(TIMEOUT):
            while not any(len(g.members) == POOL for g in tunnel.stripe_groups.values()):
                await asyncio.sleep(0.02)
        (group,) = tunnel.stripe_groups.values()
        yield tunnel, group, source.sockets[0].getsockname()[1]
    finally:
        await tunnel.close()
        source.close()
        await source.wait_closed()
        procs.stop(server.proc)


def _count_bytes(drivers: list[SessionDriver]) -> dict[SessionDriver, int]:
    """Bytes each session receives from now on (its driver's data_received, wrapped)."""
    counts = dict.fromkeys(drivers, 0)
    for driver in drivers:
        original = driver.data_received

        def counted(data: bytes | memoryview, driver: SessionDriver = driver,
                    original: Callable[[bytes | memoryview], None] = original) -> None:
            counts[driver] += len(data)
            original(data)

        driver.data_received = counted  # type: ignore[method-assign]
    return counts


async def _download(tunnel: ClientTunnel, port: int,
                    on_progress: Callable[[int], None]) -> bytes:
    """Open a stream to the source through the tunnel and read it to its end (or a reset)."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, theirs)
    received = bytearray()
    try:
        tunnel.open_tcp(Address("127.0.0.1", port), transport)
        async with asyncio.timeout(TIMEOUT):
            while True:
                try:
                    data = await loop.sock_recv(ours, 1 << 20)
                except ConnectionResetError:
                    break
                if not data:
                    break
                received += data
                on_progress(len(received))
    finally:
        ours.close()
        transport.close()
    return bytes(received)


def _home(group: StripeGroup) -> SessionDriver:
    (home,) = [d for d in group.members.values() if d.handlers]
    return home


def test_a_striped_download_completes_byte_exact_with_one_connection_stalled(
        tmp_path: Path) -> None:
    async def main() -> None:
        async with _tunnel(tmp_path) as (tunnel, group, port):
            drivers = list(group.members.values())
            counts = _count_bytes(drivers)
            stalled: list[SessionDriver] = []
            loop = asyncio.get_running_loop()

            def progress(done: int) -> None:
                if stalled or done < 4 * 1024 * 1024:
                    return
                # Mid-download: pause one connection that is not the stream's home, as a
                # connection in loss recovery stops delivering; resume it later.
                victim = next(d for d in drivers if d is not _home(group))
                assert victim.transport is not None
                victim.transport.pause_reading()
                stalled.append(victim)
                loop.call_later(STALL_S, victim.transport.resume_reading)

            data = await _download(tunnel, port, progress)
            assert len(data) == SIZE
            assert data == PAYLOAD
            assert stalled
            carried = sorted(counts.values())
            print(f"\nbytes each session received: {carried}")
            # Striped: more than one connection carried a real share of the stream.
            assert carried[-2] > SIZE // 16

    asyncio.run(main())


def test_a_session_lost_mid_stream_resets_the_striped_stream(tmp_path: Path) -> None:
    async def main() -> None:
        async with _tunnel(tmp_path) as (tunnel, group, port):
            drivers = list(group.members.values())
            cut: list[SessionDriver] = []

            def progress(done: int) -> None:
                if cut or done < 4 * 1024 * 1024:
                    return
                victim = next(d for d in drivers if d is not _home(group))
                assert victim.transport is not None
                victim.transport.abort()  # the connection dies with chunks on it
                cut.append(victim)

            data = await _download(tunnel, port, progress)
            assert cut
            # The stream ended early (a reset: its bytes on the lost connection are gone),
            # and what did arrive is the stream's beginning, in order.
            assert len(data) < SIZE
            assert data == PAYLOAD[: len(data)]
            # The tunnel goes on: a new download over the sessions left completes.
            again = await _download(tunnel, port, lambda _done: None)
            assert again == PAYLOAD

    asyncio.run(main())
