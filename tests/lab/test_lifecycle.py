"""A connection's whole life, veil's beside a browser's: Chromium and a real nginx, on one script.

Two real pairs run on loopback, each through the same recording relay (tests/support/relay.py)
that notes every read's time, direction and bytes and each side's FIN as a lab ``Flow``:

* **the reference**: Debian's Chromium, headless, driven by Playwright (the DevTools
  protocol), loads a static site from nginx 1.22.1 (``listen ... ssl http2``, nginx's
  defaults but ``keepalive_timeout``) through the relay;
* **veil**: the same Chromium, with veil's SOCKS5 inbound as its proxy, loads the same site
  from the same nginx through the tunnel; the relay sits between veil's client and server.

The script is a short life with the shape of a long one: a page load, a pause shorter than
nginx's keepalive_timeout, a second load, an idle well past it, a last load, and an idle past
every close. nginx's 75 s keepalive_timeout is scaled down to ``KEEPALIVE_S`` and every veil
timer with it (``SCALE``: both sides' idle closes and keepalive intervals; not the keepalive
timeouts, which act only on a dead peer), so these ~20 s of script stand for minutes at real
timeouts. Chromium's own timers cannot be scaled: at real timeouts a pause of more than 10 s
would add its PING before reuse to the second load.

``veil.lab.lifecycle`` turns each connection into a summary (its moments of activity, what
crossed while idle, who closed it, when after the last activity, with which records) and
lists where veil's differs from the reference's. The positive control is the pre-#15
heartbeat build (a session pinging at a fixed period and never closing, as test_idle.py makes
it): listed as different. Where veil matches (connections on demand, the idle close and its
records) is asserted, and ``test_veil_lives_like_chromium_and_nginx`` asserts that nothing
differs at all. Only the site's connections go through veil (``SiteOnlyTunnel``): Chromium's
own requests to other hosts never reach the reference's relay either.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab.test_idle import fetch, http_target
from tests.support import procs
from tests.support.relay import RecordingRelay
from veil.client.socks5 import Socks5Inbound
from veil.config import ServerOptions
from veil.cover.generate import SiteSeed, generate_site, write_site
from veil.lab import lifecycle
from veil.lab.flow import Direction, Flow
from veil.manage.state import init_state
from veil.net.client_session import ClientTunnel
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.frames import FrameType, frame
from veil.protocol.session import (
    DEFAULT_IDLE_CLOSE,
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_REUSE_LIMIT,
    NGINX_KEEPALIVE_TIMEOUT,
    SessionConfig,
)
from veil.server import service
from veil.server.service import VeilServer

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium"),
    pytest.mark.skipif(not os.path.exists(procs.NGINX), reason="needs nginx 1.22"),
]

#: nginx's keepalive_timeout here (whole seconds: nginx's syntax), for its 75 s.
KEEPALIVE_S = 3
SCALE = KEEPALIVE_S / NGINX_KEEPALIVE_TIMEOUT
#: The relay's delay each way: a 100 ms round trip, long against loopback's.
ONE_WAY_S = 0.05
RTT_S = 2 * ONE_WAY_S
#: Records this close belong to one moment (a request and its answer, a ping and its ACK).
MOMENT_GAP_S = 3 * RTT_S
#: The server's moment this soon after the client's last record is a late answer (the box
#: is loaded: CI saw one come 0.3 s late); the site's idle close comes KEEPALIVE_S after.
ANSWER_WINDOW_S = 10 * RTT_S
#: The script: a pause under the keepalive, an idle well past it (veil's idle close comes
#: after the inner connection's own keepalive: 3 + 70 * SCALE = 5.8 s), and a last idle
#: past every close.
SHORT_PAUSE_S = KEEPALIVE_S / 3
LONG_IDLE_S = 2.5 * KEEPALIVE_S
LAST_IDLE_S = 2.7 * KEEPALIVE_S
#: A connection opened this long after a page load (or the tunnel's start) is that load's.
DEMAND_WINDOW_S = 2.0
#: Any single page load, and any other single wait.
STEP_TIMEOUT_S = 15.0
#: The pre-#15 client pinged every 15 s: scaled, every 0.6 s; its control runs this long.
HEARTBEAT_S = 15.0 * SCALE
HEARTBEAT_RUN_S = 2.5 * KEEPALIVE_S
#: Chromium's flags beyond Playwright's own: a self-signed nginx accepted outright (a cert
#: error would add an aborted connection per load), no QUIC.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-quic", "--ignore-certificate-errors"]


@dataclass
class Life:
    flows: list[Flow]
    demands: list[float]
    """When the user acted: page loads (and, for veil, the tunnel's start)."""
    tunnelled: list[Address] = dataclasses.field(default_factory=list)
    """veil only: where the streams the tunnel opened went."""
    kept_out: list[Address] = dataclasses.field(default_factory=list)
    """veil only: Chromium's own connections to other hosts, refused at the SOCKS port."""


class SiteOnlyTunnel(ClientTunnel):
    """veil's tunnel, for the site's connections only (a user's rules sending one site
    through veil). Chromium opens connections of its own to other hosts whatever Playwright's
    flags (Debian's Chromium 156: accounts.google.com, retried ~1, ~4 and ~13 s after start,
    and update.googleapis.com). In the reference they go to those hosts (and fail: no
    network), never to the relay; through a SOCKS proxy they would cross the tunnel: moments
    and, past the reuse limit, a session no page load asked for, which the reference cannot
    show. Here they are refused (SOCKS "not allowed", as fast as the reference's failure)."""

    def __init__(self, key: AccessKey, site: Address, life: Life,
                 session_config: SessionConfig) -> None:
        super().__init__(key, session_config=session_config)
        self.site = site
        self.life = life

    def refusal(self, dest: Address, network: str = "tcp") -> str | None:
        if network == "tcp" and dest == self.site:
            return None
        self.life.kept_out.append(dest)
        return "not the site"

    def open_tcp(self, dest: Address, local: asyncio.Transport, early_data: bytes = b"") -> None:
        self.life.tunnelled.append(dest)
        super().open_tcp(dest, local, early_data)


async def browse(url: str, proxy: Address | None, demands: list[float],
                 started: Callable[[], Awaitable[None]] | None = None) -> None:
    """The script, in Chromium: load, short pause, load, long idle, load, last idle.
    ``started`` runs once Chromium is up, before the first load: Chromium takes seconds to
    start on a busy machine, longer than the scaled reuse limit of a tunnel started before."""
    from playwright.async_api import async_playwright

    args = list(CHROMIUM_ARGS)
    if proxy is not None:
        args += [f"--proxy-server=socks5://{proxy.host}:{proxy.port}",
                 "--proxy-bypass-list=<-loopback>"]  # Chromium bypasses loopback otherwise
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = await browser.new_page()
            if started is not None:
                await started()
            for pause in (SHORT_PAUSE_S, LONG_IDLE_S, LAST_IDLE_S):
                demands.append(time.monotonic())
                await page.goto(url, timeout=STEP_TIMEOUT_S * 1000)
                await asyncio.sleep(pause)
        finally:
            await browser.close()


def site_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="veil-lifecycle-site-"))
    write_site(generate_site(SiteSeed(b"\x01" * 32, 1_760_000_000)), root)
    return root


async def chromium_with_nginx(nginx_port: int) -> Life:
    relay = RecordingRelay(Address("127.0.0.1", nginx_port), ONE_WAY_S)
    await relay.start()
    demands: list[float] = []
    try:
        await browse(f"https://127.0.0.1:{relay.port}/", None, demands)
    finally:
        await relay.close()
    return Life(relay.flows, demands)


def scaled_client_config() -> SessionConfig:
    """The client's idle timers scaled with nginx's. Its keepalive interval is not: it is
    Chromium's own (a PING with a write after 10 s of silence), and Chromium's runs unscaled
    here, so both are compared on the same real seconds."""
    low, high = DEFAULT_IDLE_CLOSE
    assert DEFAULT_KEEPALIVE_INTERVAL >= LONG_IDLE_S  # the script stays within Chromium's 10 s
    return SessionConfig(idle_close=(low * SCALE, high * SCALE),
                         reuse_limit=DEFAULT_REUSE_LIMIT * SCALE)


async def with_veil_server(tmp: Path, idle_close: float,
                           body: Callable[[AccessKey], Awaitable[Life]]) -> Life:
    port = procs.unused_port()
    state = init_state(tmp / "state", listen=Address("127.0.0.1", port))[0]
    server = VeilServer(state, ServerOptions(listen=Address("127.0.0.1", port),
                                             allow_private=True, idle_close=idle_close))
    key = AccessKey.parse(server.users.access_key(server.users.add("alice")))
    await server.start()
    try:
        return await body(key)
    finally:
        await server.stop()


async def chromium_through_veil(tmp: Path, nginx_port: int) -> Life:
    async def run(key: AccessKey) -> Life:
        relay = RecordingRelay(key.server, ONE_WAY_S)
        await relay.start()
        life = Life(relay.flows, [])
        demands = life.demands
        tunnel = SiteOnlyTunnel(dataclasses.replace(key, server=Address("127.0.0.1", relay.port)),
                                Address("127.0.0.1", nginx_port), life, scaled_client_config())
        socks = Socks5Inbound(tunnel, Address("127.0.0.1", 0))
        await socks.start()

        async def start_veil() -> None:
            demands.append(time.monotonic())  # the user starts veil: its first connection
            tunnel.start()                    # checks the key
            assert await tunnel.wait_ready(STEP_TIMEOUT_S)

        try:
            await browse(f"https://127.0.0.1:{nginx_port}/", socks.address, demands, start_veil)
        finally:
            await socks.close()
            await tunnel.close()
            await relay.close()
        return life
    return await with_veil_server(tmp, float(KEEPALIVE_S), run)


async def heartbeat_build(tmp: Path) -> Life:
    """The pre-#15 build: a session kept up by a PING every HEARTBEAT_S, never closed."""
    async def run(key: AccessKey) -> Life:
        relay = RecordingRelay(key.server, ONE_WAY_S)
        await relay.start()
        tunnel = ClientTunnel(dataclasses.replace(key, server=Address("127.0.0.1", relay.port)),
                              session_config=SessionConfig(idle_close=None))
        demands = [time.monotonic()]
        driver = await asyncio.wait_for(tunnel.connect_once(), STEP_TIMEOUT_S)
        try:
            transport = driver.transport
            assert transport is not None
            deadline = time.monotonic() + HEARTBEAT_RUN_S
            counter = 0
            while time.monotonic() < deadline:
                await asyncio.sleep(HEARTBEAT_S)
                counter += 1
                transport.write(frame(FrameType.PING, 0, counter.to_bytes(8, "big")))
            return Life(list(relay.flows), demands)
        finally:
            driver.close()
            await relay.close()
    return await with_veil_server(tmp, 3600.0, run)


async def veil_server_closes(tmp: Path) -> Life:
    """veil with the roles of nginx and Chromium: a client that leaves the idle close to the
    server (as Chromium leaves it to nginx), one request, then idle past the server's close."""
    async def run(key: AccessKey) -> Life:
        relay = RecordingRelay(key.server, ONE_WAY_S)
        await relay.start()
        target = await http_target()
        config = dataclasses.replace(scaled_client_config(), idle_close=None)
        tunnel = ClientTunnel(dataclasses.replace(key, server=Address("127.0.0.1", relay.port)),
                              session_config=config)
        socks = Socks5Inbound(tunnel, Address("127.0.0.1", 0))
        await socks.start()
        demands = [time.monotonic()]
        tunnel.start()
        try:
            assert await tunnel.wait_ready(STEP_TIMEOUT_S)
            demands.append(time.monotonic())
            await fetch(socks.address, target.sockets[0].getsockname()[1])
            await asyncio.sleep(2 * KEEPALIVE_S)
        finally:
            await socks.close()
            await tunnel.close()
            target.close()
            await relay.close()
        return Life(relay.flows, demands)
    return await with_veil_server(tmp, float(KEEPALIVE_S), run)


async def veil_builds(tmp: Path) -> tuple[Life, Life]:
    """The heartbeat control and the server-closes run, side by side (they share nothing)."""
    heartbeat, server_closes = await asyncio.gather(heartbeat_build(tmp / "heartbeat"),
                                                    veil_server_closes(tmp / "server-closes"))
    return heartbeat, server_closes


@dataclass
class Lives:
    reference: Life
    veil: Life
    heartbeat: Life
    server_closes: Life


@pytest.fixture(scope="module")
def lives(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lives]:
    root = site_root()
    # The server never pings (its idle close, scaled, is an option of with_veil_server).
    assert service.SERVER_SESSION_CONFIG.keepalive_interval is None
    try:
        with procs.nginx(root, http2=True, keepalive_timeout=KEEPALIVE_S) as nginx:
            reference = asyncio.run(chromium_with_nginx(nginx.https_port))
            veil = asyncio.run(chromium_through_veil(tmp_path_factory.mktemp("veil"),
                                                     nginx.https_port))
        heartbeat, server_closes = asyncio.run(veil_builds(tmp_path_factory.mktemp("builds")))
        yield Lives(reference, veil, heartbeat, server_closes)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def summaries(life: Life) -> list[lifecycle.Lifecycle]:
    return [lifecycle.summarize(flow, moment_gap=MOMENT_GAP_S, answer_window=ANSWER_WINDOW_S)
            for flow in life.flows]


def all_differences(reference: Life, candidate: Life) -> list[lifecycle.Difference]:
    found = lifecycle.connection_differences(reference.flows, candidate.flows,
                                             candidate.demands, demand_window=DEMAND_WINDOW_S)
    for theirs, ours in zip(summaries(reference), summaries(candidate), strict=False):
        found += lifecycle.differences(theirs, ours)
    return found


def report(name: str, life: Life) -> None:
    origin = life.demands[0] if life.demands else 0.0
    print(f"{name} demands at " + ", ".join(f"{d - origin:.2f}" for d in life.demands) + " s")
    for index, (flow, summary) in enumerate(zip(life.flows, summaries(life), strict=True)):
        moments = " ".join(f"{m.opener.value}@{m.start - origin:.2f}" for m in summary.moments)
        print(f"{name} connection {index} at {flow.start - origin:.2f} s: {summary.describe()}"
              f" [{moments}]")


def test_chromium_and_nginx_live_as_measured(lives: Lives) -> None:
    """The reference itself: one connection per load after an idle close, nothing while
    idle, nginx's close at keepalive_timeout with GOAWAY and close_notify, Chromium's FIN."""
    report("chromium+nginx", lives.reference)
    found = summaries(lives.reference)
    assert len(found) == 2, "a connection for the first two loads, another for the last"
    for summary in found:
        assert summary.closer is Direction.SERVER
        assert summary.close_after_idle is not None
        assert abs(summary.close_after_idle - KEEPALIVE_S) < lifecycle.CLOSE_TIME_TOLERANCE
        assert summary.closing == ((Direction.SERVER, 34), (Direction.SERVER, 19))
        assert summary.idle_moments == 0
        assert summary.server_first == 0
    assert lifecycle.connection_differences(lives.reference.flows, lives.reference.flows,
                                            lives.reference.demands,
                                            demand_window=DEMAND_WINDOW_S) == []


def test_the_heartbeat_build_is_listed_as_different(lives: Lives) -> None:
    report("heartbeat build", lives.heartbeat)
    (flow,) = lives.heartbeat.flows
    found = lifecycle.differences(summaries(lives.reference)[0],
                                  lifecycle.summarize(flow, moment_gap=MOMENT_GAP_S,
                                                      answer_window=ANSWER_WINDOW_S))
    print("\n".join(map(str, found)))
    assert {"closer", "idle-records"} <= {d.label for d in found}


def test_when_veils_server_closes_it_closes_as_nginx_and_the_client_answers_as_chromium(
        lives: Lives) -> None:
    """The close a censor sees when the server ends an idle session: one GOAWAY-sized record,
    close_notify and FIN, KEEPALIVE_S after the last activity; the client's FIN alone."""
    report("veil, the server closing", lives.server_closes)
    (flow,) = lives.server_closes.flows
    summary = lifecycle.summarize(flow, moment_gap=MOMENT_GAP_S,
                                  answer_window=ANSWER_WINDOW_S)
    found = lifecycle.differences(summaries(lives.reference)[-1], summary)
    print("\n".join(map(str, found)))
    assert found == []
    assert summary.closing == ((Direction.SERVER, 34), (Direction.SERVER, 19))


def test_veils_idle_sessions_end_as_nginx_ends_chromiums(lives: Lives) -> None:
    """Each of veil's sessions in the script is closed by the server, KEEPALIVE_S after its
    last activity, with nginx's records; the client leaves the close to it (its reuse limit
    and backstop close, scaled, come later)."""
    report("veil", lives.veil)
    for summary in summaries(lives.veil):
        assert summary.closer is Direction.SERVER, summary.describe()
        assert summary.closing == ((Direction.SERVER, 34), (Direction.SERVER, 19))
        assert summary.close_after_idle is not None
        assert abs(summary.close_after_idle - KEEPALIVE_S) < lifecycle.CLOSE_TIME_TOLERANCE


def test_only_the_sites_connections_cross_the_tunnel(lives: Lives) -> None:
    """What the reference's relay sees is the site's connections only; so must veil's tunnel
    carry (SiteOnlyTunnel), or Chromium's own requests elsewhere make moments and sessions
    with no page load behind them that the reference cannot show."""
    print("kept out of the tunnel:", sorted({str(dest) for dest in lives.veil.kept_out}))
    assert lives.veil.tunnelled, "the site's connections went through veil"
    assert {str(dest) for dest in lives.veil.tunnelled} == {str(lives.veil.tunnelled[0])}
    assert lives.veil.tunnelled[0].host == "127.0.0.1"


def test_veil_opens_connections_only_on_demand(lives: Lives) -> None:
    report("veil", lives.veil)
    found = all_differences(lives.reference, lives.veil)
    print("\n".join(map(str, found)))
    assert [d for d in found if d.label in ("no-demand", "connections")] == []


def test_veil_sends_nothing_while_idle_as_chromium_and_nginx(lives: Lives) -> None:
    """No PING crosses while the user is idle, though Chromium keeps its connection to the
    site (a stream) open: veil pings only with a write after 10 s of silence, as Chromium."""
    report("veil", lives.veil)
    found = all_differences(lives.reference, lives.veil)
    print("\n".join(map(str, found)))
    assert [d for d in found if d.label == "idle-records"] == []
    assert all(summary.idle_moments == 0 for summary in summaries(lives.veil))


def test_veil_lives_like_chromium_and_nginx(lives: Lives) -> None:
    """Nothing tells veil's connections from Chromium's to nginx: as many, each on demand,
    every moment opened by the client, nothing while idle, closed by the server as nginx
    closes (when, and with which records). The site's own idle close does not cross when it
    happens: the server holds it until the client next speaks (net.driver.TcpRelay)."""
    found = all_differences(lives.reference, lives.veil)
    print("\n".join(map(str, found)))
    assert found == []


