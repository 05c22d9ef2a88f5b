"""Load, bounded in count and time, on loopback: the server stays responsive to a real client
under a slowloris flood, 10,000 streams over 100 sessions and a probe storm, and its
descriptors and memory go back to their idle level afterwards.

The load generator runs in this process on the real client code (ClientTunnel sessions with
their own streams); the server is a real `veil serve` process, the echo server a separate
asyncio process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.wait import wait_until
from veil.net.client_session import ClientTunnel
from veil.net.driver import SessionDriver
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.frames import ResetCode, StreamKind

pytestmark = pytest.mark.slow

SLOWLORIS = 1000
SESSIONS, STREAMS_PER_SESSION = 100, 100
PROBES_PER_S, PROBE_SECONDS = 200, 5
# A real client's round trip under load: generous (2 shared cores run the server, the
# echo server and this load generator), but far below the 60 s a starved server would take.
RESPONSIVE_S = 5.0
# The server returns memory once a load has been over for a tick or two (0.5 s each); memory
# is what is measured, so there is no other sign to wait for.
QUIET_S = 2.0
# Longer than the server's TRIM_MIN_INTERVAL_S (10 s) between two trims.
TRIM_WAIT_S = 15.0


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    key: AccessKey

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("load")
    started = procs.start_veil_server(workdir, "--max-sessions-per-user", "1000")
    try:
        yield Server(started.proc, started.port, AccessKey.parse(started.key))
    finally:
        procs.stop(started.proc)


class Collector:
    """A stream handler that keeps what arrives (returning flow-control credit)."""

    def __init__(self, driver: SessionDriver, stream_id: int, expected: int) -> None:
        self.driver, self.stream_id, self.expected = driver, stream_id, expected
        self.received = bytearray()
        self.done = asyncio.get_running_loop().create_future()

    def on_data(self, data: bytes) -> None:
        self.received += data
        self.driver.session.consume(self.stream_id, len(data))
        if len(self.received) >= self.expected and not self.done.done():
            self.done.set_result(bytes(self.received))

    def on_eof(self) -> None:
        if not self.done.done():
            self.done.set_result(bytes(self.received))

    def on_reset(self, code: ResetCode) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"stream reset: {code.name}"))

    def on_writable(self) -> None: ...
    def on_datagram(self, address: Address, payload: bytes) -> None: ...
    def pause_source(self) -> None: ...
    def resume_source(self) -> None: ...


async def roundtrip(driver: SessionDriver, echo_port: int, payload: bytes) -> bytes:
    session = driver.session
    stream_id = session.open_stream(StreamKind.TCP, Address("127.0.0.1", echo_port))
    collector = Collector(driver, stream_id, len(payload))
    driver.attach(stream_id, collector)
    session.send_data(stream_id, payload)
    driver.flush()
    try:
        return await collector.done
    finally:
        if not session.closed and session.stream_count:
            session.reset(stream_id)
            driver.detach(stream_id)
            driver.flush()


def client_roundtrip(forward_port: int) -> float:
    """A new connection through a real `veil connect` (a new stream) and a 4 KiB echo, as a
    user's browser would see it; from a thread, so the load generator's loop is not timed."""
    start = time.monotonic()
    payload = os.urandom(4096)
    with socket.create_connection(("127.0.0.1", forward_port), timeout=RESPONSIVE_S) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            assert chunk, "the tunnel closed"
            got += chunk
    assert got == payload
    elapsed = time.monotonic() - start
    assert elapsed < RESPONSIVE_S
    return elapsed


def settle(server: Server, idle_fds: int, timeout: float = 20.0) -> int:
    """Wait until the server is back to its idle descriptors (give or take two), at most
    ``timeout``; return its count either way: the report records it, the test asserts it."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: server.fds() <= idle_fds + 2, timeout,
                   "the server's descriptors back to idle", poll=0.2)
    return server.fds()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def forward_port(server: Server, echo_port: int,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real client, connected before the load starts, forwarding a port to the echo."""
    spec = f"0:127.0.0.1:{echo_port}"
    client = procs.start_veil_client(tmp_path_factory.mktemp("client"),
                                     server.key.to_uri(), socks=False, forwards=[spec])
    try:
        yield client.forwards[spec]
    finally:
        procs.stop(client.proc)


def test_load(server: Server, echo_port: int, forward_port: int) -> None:
    client_roundtrip(forward_port)  # warm up: lazy imports, first store read
    # A baseline, not a wait for one event: the warm-up's connections close and the
    # server's first refresh runs before idle descriptors and memory are measured.
    time.sleep(1.5)
    idle_fds, idle_rss = server.fds(), server.rss_mib()
    report: dict[str, object] = {"idle_fds": idle_fds, "idle_rss_mib": round(idle_rss, 1)}

    # 1. Slowloris: half silent TCP connections, half TLS connections that say nothing after
    # the handshake. Both hold a descriptor until the cover's 60 s timeout; a real client
    # still gets through.
    silent: list[socket.socket] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        for i in range(SLOWLORIS):
            sock = socket.create_connection(("127.0.0.1", server.port))
            silent.append(context.wrap_socket(sock) if i % 2 else sock)
        wait_until(lambda: server.fds() >= idle_fds + SLOWLORIS * 0.9, 10,
                   lambda: f"the server to hold the silent connections ({server.fds()} fds)")
        report["slowloris_fds"] = server.fds()
        assert server.fds() >= idle_fds + SLOWLORIS * 0.9  # they are really held
        report["slowloris_roundtrip_s"] = round(client_roundtrip(forward_port), 3)
    finally:
        for sock in silent:
            sock.close()
    report["after_slowloris_fds"] = settle(server, idle_fds)
    report["after_slowloris_rss_mib"] = round(server.rss_mib(), 1)

    # 2. 10,000 concurrent streams over 100 sessions, each echoing 1 KiB, all byte-exact.
    async def many_streams() -> tuple[int, float]:
        tunnels = [ClientTunnel(server.key, tls_stack="openssl") for _ in range(SESSIONS)]
        drivers = await asyncio.gather(*(t.connect_once() for t in tunnels))
        try:
            payloads = [os.urandom(1024) for _ in range(SESSIONS * STREAMS_PER_SESSION)]
            jobs = [roundtrip(drivers[i % SESSIONS], echo_port, payload)
                    for i, payload in enumerate(payloads)]
            during = asyncio.get_running_loop().run_in_executor(None, client_roundtrip,
                                                                forward_port)
            results = await asyncio.wait_for(asyncio.gather(*jobs), 60)
            assert results == payloads
            return len(results), await during
        finally:
            for driver in drivers:
                driver.close()
            # Let the closes reach the wire before asyncio.run() tears the loop down
            # (settle() then waits for the server's side).
            await asyncio.sleep(0.2)

    streams, during_s = run(many_streams())
    report.update(streams=streams, streams_roundtrip_s=round(during_s, 3))
    report["after_streams_fds"] = settle(server, idle_fds)
    time.sleep(QUIET_S)
    report["after_streams_rss_mib"] = round(server.rss_mib(), 1)

    # 3. A probe storm: 200 new connections a second, each an HTTP request, random bytes or
    # a broken TLS hello, answered by the cover; a real client keeps working meanwhile.
    async def probe_storm() -> tuple[int, list[float]]:
        answered = 0

        async def probe(kind: int) -> None:
            nonlocal answered
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            payload = (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(random.randint(1, 600)),
                       b"\x16\x03\x01\x00\x05hello")[kind % 3]
            writer.write(payload)
            try:
                if await asyncio.wait_for(reader.read(1), 5):
                    answered += 1
            except (TimeoutError, ConnectionError):
                pass
            writer.close()

        tasks, latencies = [], []
        for tick in range(PROBES_PER_S * PROBE_SECONDS // 10):
            tasks += [asyncio.ensure_future(probe(tick * 10 + j)) for j in range(10)]
            if tick % 20 == 0:
                latencies.append(await asyncio.get_running_loop().run_in_executor(
                    None, client_roundtrip, forward_port))
            await asyncio.sleep(10 / PROBES_PER_S)  # pacing: PROBES_PER_S new connections
        await asyncio.gather(*tasks)
        return answered, latencies

    answered, latencies = run(probe_storm())
    report.update(probes=PROBES_PER_S * PROBE_SECONDS, probes_answered=answered,
                  storm_roundtrip_max_s=round(max(latencies), 3))
    # Random bytes may be silently waited on (as nginx waits); HTTP and TLS get answers.
    assert answered >= PROBES_PER_S * PROBE_SECONDS * 2 // 3 - 5

    after_fds = settle(server, idle_fds)
    time.sleep(QUIET_S)
    # The server trims at most every TRIM_MIN_INTERVAL_S (10 s): on a loaded machine the
    # previous trim may have come late, so give the next one that long before judging.
    first_rss = server.rss_mib()
    with contextlib.suppress(AssertionError):
        first_rss = wait_until(lambda: (rss := server.rss_mib()) < idle_rss + 64 and rss,
                               TRIM_WAIT_S, "the server to give memory back")
    # The same streams again: memory that a leak holds would grow by as much again.
    run(many_streams())
    settle(server, idle_fds)
    time.sleep(QUIET_S)
    report.update(after_fds=after_fds, after_rss_mib=round(first_rss, 1),
                  after_second_streams_rss_mib=round(server.rss_mib(), 1))
    print("\nload report:", report)
    assert after_fds <= idle_fds + 2 and server.fds() <= idle_fds + 2
    # Freed memory partly stays in CPython's and glibc's arenas (fragmentation) even after
    # the server's collection and trim; what must not happen is growth with each load.
    assert server.rss_mib() < first_rss + 16
    assert first_rss < idle_rss + 64
    assert server.proc.poll() is None


# HTTP/2 frames a stranger sends to the cover site (RFC 9113 §3.4, §6.5, §6.7).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
H2_PING = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"pingpong"
FLOOD_BYTES = 64 << 20
FLOOD_SECONDS = 8.0
# What the flood may cost the server: its reads stop once its answers go unread, so this is
# the socket buffers' and one read's worth of answers, not the 64 MiB sent (nginx: ~3 MiB).
FLOOD_RSS_MIB = 24.0


def test_an_h2_ping_flood_that_reads_nothing_is_bounded(server: Server,
                                                         forward_port: int) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    client_roundtrip(forward_port)
    before = server.rss_mib()
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    # A small receive buffer, never read: the server's answers pile up on its side.
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.selected_alpn_protocol() == "h2"
        tls.sendall(H2_PREFACE)
        chunk = memoryview(H2_PING * ((1 << 20) // len(H2_PING)))
        sent, pos, deadline = 0, 0, time.monotonic() + FLOOD_SECONDS
        tls.settimeout(0.5)
        while sent < FLOOD_BYTES and time.monotonic() < deadline:
            try:
                # send, not sendall: a timed-out write is retried with the same bytes, so
                # the frames stay whole (a torn frame would end the flood for another reason)
                n = tls.send(chunk[pos:])
            except (TimeoutError, ssl.SSLWantWriteError):
                continue  # the server has stopped reading: keep pushing until the deadline
            except OSError:
                break  # the server closed the connection, as nginx does
            sent += n
            pos = (pos + n) % len(chunk)
        during = server.rss_mib()
        rtt = client_roundtrip(forward_port)
    print(f"\nh2 PING flood: {sent >> 20} MiB of PINGs accepted in {FLOOD_SECONDS:.0f} s; "
          f"server RSS {before:.0f} -> {during:.0f} MiB; a user's round trip {rtt * 1000:.0f} ms")
    assert during - before < FLOOD_RSS_MIB
