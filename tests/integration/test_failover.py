"""A client with two ways in moves to the second when a censor blocks the first, and back.

A real veil server listens on two loopback ports; a test censor (tests/support/blocker.py)
stands in front of the first, which the key names as its address (the preferred way); the
second is the key's ``via``. Requests go through a TCP forward of the real client to an echo
server. The censor resets, blackholes or cuts the first way: requests must keep succeeding
through the second within a stated bound, and when the censor heals, the client must come
back to the first. Negative control: a slow, lossy but working first way moves nothing
(and a client with a too-short handshake timeout on the same path does move: the test sees
a switch when there is one).

Timers are shortened so each test stays well under 20 s: keepalive 0.5 s + 1 s, handshake
timeout 1.5 s, probes from 0.5 s up to 2 s. The bounds follow from them: a reset or cut way
is left after two failures (one backoff step, <= 0.4 s, apart); a blackholed one after a
keepalive timeout (<= 0.75 + 1 s) and one handshake timeout (1.5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.blocker import SLOW_ONE_WAY_S, SLOW_STALL_S, Blocker
from tests.support.socks_echo import echo as echo_handler
from veil.client.forward import TcpForward
from veil.config import ServerOptions
from veil.manage.state import init_state
from veil.net.client_session import ClientTunnel
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.endpoint import tls_endpoint
from veil.protocol.failover import FailoverConfig
from veil.protocol.session import SessionConfig
from veil.server.service import VeilServer

LOOPBACK = "127.0.0.1"
#: Shortened timers (see the module's docstring).
FAST_SESSIONS = SessionConfig(keepalive_interval=0.5, keepalive_timeout=1.0)
FAST_FAILOVER = FailoverConfig(probe_initial=0.5, probe_max=2.0)
FAST_HANDSHAKE_S = 1.5
#: One request's budget: a round trip through the tunnel takes milliseconds on loopback.
REQUEST_TIMEOUT_S = 3.0
#: From the block to the first request that succeeds again, per block.
BOUNDS_S = {"reset": 3.0, "cut": 3.0, "blackhole": 8.0}
#: From the censor healing to new sessions on the first way again (probes: <= 0.75 s, then
#: <= 1.5, then <= 3 s apart).
BACK_WITHIN_S = 8.0
PAYLOAD = b"veil failover " * 100
#: Requests over the slow path, each on a new session, and the server's idle close that
#: makes it new.
SLOW_REQUESTS = 6
SERVER_IDLE_CLOSE_S = 0.3
#: The positive control's handshake timeout: less than the 150 ms round trip TLS needs.
NAIVE_HANDSHAKE_S = 0.1


@dataclass
class Rig:
    server: VeilServer
    blocker: Blocker
    key: AccessKey
    echo_port: int


@contextlib.asynccontextmanager
async def rig(tmp: Path, server_idle_close: float = 75.0) -> AsyncIterator[Rig]:
    any_port = Address(LOOPBACK, 0)
    state = init_state(tmp / "state", listen=Address(LOOPBACK, 443))[0]
    server = VeilServer(state, ServerOptions(listen=any_port, also_listen=(any_port,),
                                             allow_private=True, idle_close=server_idle_close))
    user = server.users.add("alice")
    await server.start()
    echo = await asyncio.start_server(echo_handler, LOOPBACK, 0)
    first, second = server.addresses
    blocker = Blocker(first)
    await blocker.start()
    key = AccessKey(blocker.address, user.secret, state.pin, None, "alice",
                    (tls_endpoint(second),))
    try:
        yield Rig(server, blocker, key, echo.sockets[0].getsockname()[1])
    finally:
        await blocker.close()
        echo.close()
        await server.stop()


@contextlib.asynccontextmanager
async def client(rig: Rig, **tunnel_options: object) -> AsyncIterator[tuple[ClientTunnel,
                                                                             TcpForward]]:
    options: dict[str, object] = {"session_config": FAST_SESSIONS, "failover": FAST_FAILOVER,
                                  "handshake_timeout": FAST_HANDSHAKE_S}
    options.update(tunnel_options)
    tunnel = ClientTunnel(rig.key, **options)  # type: ignore[arg-type]
    forward = TcpForward(tunnel, Address(LOOPBACK, 0), Address(LOOPBACK, rig.echo_port))
    await forward.start()
    tunnel.start()
    try:
        yield tunnel, forward
    finally:
        await forward.close()
        await tunnel.close()


async def request(forward: TcpForward) -> bool:
    """One echo through the tunnel; False when it fails or takes too long."""
    writer = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(forward.address.host,
                                                           forward.address.port)
            writer.write(PAYLOAD)
            return await reader.readexactly(len(PAYLOAD)) == PAYLOAD
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        if writer is not None:
            writer.transport.abort()


async def until(condition: object, forward: TcpForward, timeout: float) -> float:
    """Send requests until ``condition()`` holds after a successful one; the time it took."""
    assert callable(condition)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await request(forward) and condition():
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


@pytest.mark.parametrize("block", ["reset", "cut", "blackhole"])
def test_the_client_moves_to_the_second_way_and_back(
        block: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="veil.client")

    async def main() -> tuple[float, float]:
        async with rig(tmp_path) as r, client(r) as (tunnel, forward):
            assert await request(forward)
            assert tunnel.chooser.current == 0 and r.blocker.relayed == 1

            r.blocker.set_mode(block)
            moved = await until(lambda: tunnel.chooser.current == 1, forward, BOUNDS_S[block])
            # Requests keep succeeding through the second way.
            for _ in range(3):
                assert await request(forward)

            relayed = r.blocker.relayed
            r.blocker.set_mode("pass")
            back = await until(lambda: tunnel.chooser.current == 0, forward, BACK_WITHIN_S)
            # New streams go the first way again, on a new session through the censor.
            assert await request(forward)
            assert r.blocker.relayed > relayed
            return moved, back

    moved, back = asyncio.run(main())
    print(f"{block}: working again after {moved:.2f} s, back on the first way {back:.2f} s "
          "after the censor healed")
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("direct path 127.0.0.1:") and " blocked (" in line
               and "); using 127.0.0.1:" in line for line in lines), lines
    assert any(line.startswith("direct path 127.0.0.1:") and " works again; using it" in line
               for line in lines), lines


def test_a_slow_lossy_working_path_is_not_left(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """150 ms RTT with a lost segment's delay on 1% of reads, each request on a new session
    (so each pays TCP and TLS over it): the real handshake timeout lets every one through.
    The positive control: a client whose handshake timeout is shorter than the path's three
    round trips does leave it, so a switch would be seen."""
    caplog.set_level(logging.WARNING, logger="veil.client")

    async def main() -> tuple[int, int, int]:
        # The server closes a session idle for SERVER_IDLE_CLOSE_S, as nginx closes a
        # keepalive connection: the client opens the next request's session anew.
        async with rig(tmp_path, server_idle_close=SERVER_IDLE_CLOSE_S) as r:
            r.blocker.set_mode("slow")
            started = time.monotonic()
            async with client(r, session_config=SessionConfig(),
                              handshake_timeout=None) as (tunnel, forward):
                results = []
                for _ in range(SLOW_REQUESTS):
                    results.append(await request(forward))
                    # Past the server's idle close and its CLOSE's way back (even stalled).
                    await asyncio.sleep(SERVER_IDLE_CLOSE_S + SLOW_ONE_WAY_S + SLOW_STALL_S
                                        + 0.1)
                kept = tunnel.chooser.current
            sessions = r.blocker.relayed
            print(f"slow path: {time.monotonic() - started:.1f} s for {SLOW_REQUESTS} requests")
            async with client(r, handshake_timeout=NAIVE_HANDSHAKE_S) as (naive, forward):
                await until(lambda: naive.chooser.current == 1, forward, 5.0)
            return results.count(True), kept, sessions

    succeeded, kept, sessions = asyncio.run(main())
    assert succeeded == SLOW_REQUESTS
    assert kept == 0
    assert sessions == SLOW_REQUESTS  # each request paid a new handshake over the slow path
    blocked = [r.getMessage() for r in caplog.records
               if r.name == "veil.client" and "blocked" in r.getMessage()]
    assert len(blocked) == 1 and "no TLS answer in time" in blocked[0]  # the control's only


def test_veil_serve_listens_on_every_listen_and_keys_name_each_via(tmp_path: Path) -> None:
    """The CLI end to end: two --listen ports, a --via naming the second; `veil user show`
    hands out a key with both, a client reaches the server by each, and a start without
    --via takes it out of the keys again."""
    import json
    import subprocess

    from tests.support import procs

    second = procs.unused_port()
    via = f"tls://127.0.0.1:{second}"
    server = procs.start_veil_server(tmp_path, "--listen", f"127.0.0.1:{second}", "--via", via)

    def shown() -> dict[str, object]:
        out = subprocess.run([*procs.VEIL, "user", "show", "default", "--json", "--state",
                              str(server.state)], capture_output=True, check=True, timeout=30)
        loaded: dict[str, object] = json.loads(out.stdout)
        return loaded

    try:
        assert f"listening on 127.0.0.1:{server.port}, 127.0.0.1:{second}" in server.log_text()
        first = shown()
        assert first["ways_in"] == [f"tls://127.0.0.1:{server.port}", via]
        key = AccessKey.parse(str(first["key"]))
        assert [str(way) for way in key.ways()] == [f"127.0.0.1:{server.port}",
                                                     f"127.0.0.1:{second}"]

        async def reach_each() -> list[bool]:
            tunnel = ClientTunnel(key)
            results = []
            for way in (0, 1):
                driver = await tunnel.connect_once(way)
                results.append(await asyncio.wait_for(driver.accepted, REQUEST_TIMEOUT_S))
                driver.close()
                await asyncio.wait_for(driver.closed, REQUEST_TIMEOUT_S)
            return results

        assert asyncio.run(reach_each()) == [True, True]
    finally:
        procs.stop(server.proc)
    again = procs.start_veil_server(tmp_path, port=server.port)
    try:
        assert shown()["ways_in"] == [f"tls://127.0.0.1:{server.port}"]
    finally:
        procs.stop(again.proc)


#: How long the client is watched with every way refused, and the attempts it may make then:
#: its backoff (0.25 s doubling, each wait x0.5-1.5) allows ~6 in 2 s; 20 leaves room for
#: a late timer, while a client that retries at once makes thousands (one per ~0.5 ms).
ALL_REFUSED_WATCH_S = 2.0
ALL_REFUSED_MAX_ATTEMPTS = 20


def test_with_every_way_refused_the_client_backs_off_instead_of_spinning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A censor that resets every connection to port 443 blocks a CDN on 443 too: both ways
    refuse at once. Rotating between them without a pause would burn a core and flood the
    log (found in tests/netns/test_blocking.py's lab)."""
    caplog.set_level(logging.INFO, logger="veil.client")

    async def main() -> int:
        async with rig(tmp_path) as r:
            nothing = [await asyncio.start_server(echo_handler, LOOPBACK, 0) for _ in range(2)]
            ports = [server.sockets[0].getsockname()[1] for server in nothing]
            for server in nothing:  # closed: both ports now refuse
                server.close()
                await server.wait_closed()
            key = AccessKey(Address(LOOPBACK, ports[0]), r.key.secret, r.key.pin, None,
                            "alice", (tls_endpoint(Address(LOOPBACK, ports[1])),))
            tunnel = ClientTunnel(key, failover=FAST_FAILOVER,
                                  handshake_timeout=FAST_HANDSHAKE_S)
            tunnel.start()
            try:
                await asyncio.sleep(ALL_REFUSED_WATCH_S)
            finally:
                await tunnel.close()
            return tunnel.chooser.blocked(0) + tunnel.chooser.blocked(1)

    assert asyncio.run(main()) == 2
    attempts = [r.getMessage() for r in caplog.records
                if "connection refused" in r.getMessage()]
    assert 2 <= len(attempts) <= ALL_REFUSED_MAX_ATTEMPTS, (len(attempts), attempts[:5])
