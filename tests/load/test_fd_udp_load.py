"""Descriptors and UDP under one user's load (issue #14), against real `veil serve` processes.

1. With a low descriptor limit (RLIMIT_NOFILE 1,000, set on the server process only), one
   session opens 1,000 streams: the server refuses those past its budget with
   TOO_MANY_STREAMS and keeps its reserve, so a stranger still gets the cover website
   (before: "accept failed: Too many open files" and the stranger got nothing).
2. One UDP stream sends 20,000 datagrams, each to a name never seen before: the server's
   threads and memory stay bounded and a real client's round trip stays short (before: one
   task per datagram, queued on the loop's default executor).

Figures are printed (pytest -s); the bounds asserted are generous (two shared cores).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.load.test_load import client_roundtrip
from tests.support import procs
from tests.support.wait import wait_until
from veil.net.client_session import ClientTunnel
from veil.net.driver import DatagramStreamHandler, SessionDriver
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.frames import ResetCode, StreamKind

pytestmark = pytest.mark.slow

LOW_NOFILE = 1000
STREAMS = 1000
DATAGRAMS = 20_000
# A flood's worst case: the resolver's threads (policy.RESOLVER_THREADS), the loop's
# default executor and a few (a literal: the test also measures servers without the bound).
MAX_FLOOD_THREADS = 16 + 12
# Memory a flood may add: its datagrams are dropped or sent at once, never kept.
FLOOD_RSS_MIB = 40.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Stream:
    """One TCP stream that sends a byte and waits for its echo or a reset."""

    def __init__(self, driver: SessionDriver, stream_id: int) -> None:
        self.driver, self.stream_id = driver, stream_id
        self.outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_data(self, data: bytes) -> None:
        self.driver.session.consume(self.stream_id, len(data))
        if not self.outcome.done():
            self.outcome.set_result("echoed")

    def on_eof(self) -> None:
        if not self.outcome.done():
            self.outcome.set_result("eof")

    def on_reset(self, code: ResetCode) -> None:
        if not self.outcome.done():
            self.outcome.set_result(code.name)

    def on_writable(self) -> None: ...
    def on_datagram(self, address: Address, payload: bytes) -> None: ...
    def pause_source(self) -> None: ...
    def resume_source(self) -> None: ...


def stranger_gets_the_site(port: int) -> bytes:
    """What a browser without a key sees: TLS, GET /, the website's first response line."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        return tls.recv(4096).split(b"\r\n", 1)[0]


def test_one_users_streams_leave_descriptors_for_strangers(
        tmp_path: Path, echo_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The limit is the server process's alone (prlimit sets it before exec); the server
    # lifts its soft limit to the hard one at start, so both are set.
    monkeypatch.setattr(procs, "VEIL", ["prlimit", f"--nofile={LOW_NOFILE}:{LOW_NOFILE}",
                                        *procs.VEIL])
    server = procs.start_veil_server(tmp_path)
    try:
        key = AccessKey.parse(server.key)

        async def flood() -> tuple[dict[str, int], int, bytes]:
            tunnel = ClientTunnel(key, tls_stack="openssl")
            driver = await tunnel.connect_once()
            try:
                streams = []
                for _ in range(STREAMS):
                    stream_id = driver.session.open_stream(StreamKind.TCP,
                                                           Address("127.0.0.1", echo_port))
                    stream = Stream(driver, stream_id)
                    driver.attach(stream_id, stream)
                    driver.session.send_data(stream_id, b"x")
                    streams.append(stream)
                driver.flush()
                outcomes = await asyncio.wait_for(
                    asyncio.gather(*(s.outcome for s in streams)), 60)
                held = fds(server.proc.pid)
                # Every stream that got through is still open: the stranger comes now.
                page = await asyncio.get_running_loop().run_in_executor(
                    None, stranger_gets_the_site, server.port)
                counts: dict[str, int] = {}
                for outcome in outcomes:
                    counts[outcome] = counts.get(outcome, 0) + 1
                return counts, held, page
            finally:
                driver.close()
                await asyncio.sleep(0.2)

        idle = fds(server.proc.pid)
        counts, held, status_line = asyncio.run(flood())
        print(f"\nfd bound: {counts}, server fds {held} of {LOW_NOFILE}, "
              f"stranger: {status_line!r}")
        assert status_line == b"HTTP/1.1 200 OK"
        assert counts.get("TOO_MANY_STREAMS", 0) > 0
        assert counts.get("echoed", 0) >= LOW_NOFILE // 2
        assert "Too many open files" not in server.log_text()
        # Every slot came back with its socket: the same user gets as many streams again.
        wait_until(lambda: fds(server.proc.pid) <= idle + 2, 20, "the server's sockets closed")
        again, _, _ = asyncio.run(flood())
        assert again.get("echoed") == counts.get("echoed"), again
    finally:
        procs.stop(server.proc)


class Replies(DatagramStreamHandler):
    def __init__(self) -> None:
        self.count = 0

    def on_data(self, data: bytes) -> None: ...
    def on_eof(self) -> None: ...
    def on_reset(self, code: ResetCode) -> None: ...

    def on_datagram(self, address: Address, payload: bytes) -> None:
        self.count += 1


def test_a_flood_of_datagrams_to_unique_names_stays_bounded(
        tmp_path: Path, echo_port: int) -> None:
    server = procs.start_veil_server(tmp_path / "server")
    spec = f"0:127.0.0.1:{echo_port}"
    (tmp_path / "client").mkdir()
    client = procs.start_veil_client(tmp_path / "client", server.key, socks=False,
                                     forwards=[spec])
    try:
        forward_port = client.forwards[spec]
        client_roundtrip(forward_port)  # warm up
        time.sleep(1.0)
        pid = server.proc.pid
        idle_rss, idle_threads = rss_mib(pid), threads(pid)
        key = AccessKey.parse(server.key)
        peak = {"rss": idle_rss, "threads": idle_threads}

        def sample() -> None:
            peak["rss"] = max(peak["rss"], rss_mib(pid))
            peak["threads"] = max(peak["threads"], threads(pid))

        async def flood() -> list[float]:
            tunnel = ClientTunnel(key, tls_stack="openssl")
            driver = await tunnel.connect_once()
            loop = asyncio.get_running_loop()
            latencies = []
            try:
                stream_id = driver.session.open_stream(StreamKind.UDP, Address("0.0.0.0", 0))
                driver.attach(stream_id, Replies())
                payload = os.urandom(512)
                for i in range(DATAGRAMS):
                    driver.session.send_datagram(stream_id, Address(f"n{i}.flood.invalid", 53),
                                                 payload)
                    if i % 200 == 199:
                        driver.flush()
                        await asyncio.sleep(0)
                    if i % 2000 == 1999:
                        sample()
                        latencies.append(await loop.run_in_executor(
                            None, client_roundtrip, forward_port))
                driver.flush()
                for _ in range(10):  # the server works through what arrived
                    await asyncio.sleep(0.3)
                    sample()
                latencies.append(await loop.run_in_executor(None, client_roundtrip,
                                                            forward_port))
                return latencies
            finally:
                driver.close()
                await asyncio.sleep(0.2)

        latencies = asyncio.run(flood())
        print(f"\nudp flood: {DATAGRAMS} datagrams to unique names; server rss "
              f"{idle_rss:.1f} -> peak {peak['rss']:.1f} MiB, threads {idle_threads} -> "
              f"peak {peak['threads']}, client round trip max {max(latencies) * 1000:.0f} ms")
        assert peak["threads"] <= idle_threads + MAX_FLOOD_THREADS
        assert peak["rss"] - idle_rss < FLOOD_RSS_MIB
    finally:
        procs.stop(client.proc)
        procs.stop(server.proc)
