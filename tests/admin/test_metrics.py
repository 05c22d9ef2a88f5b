"""``/metrics`` of a real server: a real veil client's traffic, a probe, the naming rules, and
the token required when the listener is not loopback-only."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.admin.conftest import Client, Harness, bearer, plain_http_probe
from tests.admin.openapi import Spec
from tests.support import procs
from tests.support.wait import wait_until, wait_until_async
from veil.admin.app import make_admin_app
from veil.admin.metrics import certificate_not_after
from veil.manage.state import init_state
from veil.net.client_session import ClientTunnel
from veil.net.direct import MAX_RESOLVING_PER_FLOW
from veil.net.driver import DatagramStreamHandler
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.frames import FrameType, ResetCode, StreamKind, frame
from veil.protocol.session import UNPRODUCTIVE_FRAME_BURST
from veil.server.status import BoundCounts, ConnectionStatus, GateCounts, ServerStatus
from veil.store.base import Usage

Samples = list[tuple[str, dict[str, str], float]]


def scrape(client: Client, headers: dict[str, str] | None = None) -> Samples:
    reply = client.get("/metrics", headers=headers)
    assert reply.status == 200, reply.text
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return [(s.name, s.labels, s.value)
            for family in text_string_to_metric_families(reply.text) for s in family.samples]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and labels.items() <= lab.items())


def test_metric_names_follow_prometheus_conventions(harness: Harness) -> None:
    reply = harness.client().get("/metrics")
    families = list(text_string_to_metric_families(reply.text))
    veil = [f for f in families if f.name.startswith("veil_")]
    names = {f.name for f in veil}
    assert {"veil_build_info", "veil_start_time_seconds", "veil_sessions_active",
            "veil_streams_active", "veil_user_bytes", "veil_handshakes_accepted",
            "veil_cover_connections", "veil_tls_handshake_failures", "veil_probes",
            "veil_users", "veil_certificate_expiry_timestamp_seconds",
            "veil_gate_connections_dropped", "veil_replay_filter_unrecorded",
            "veil_sessions_closed_for_flood", "veil_outbound_refused",
            "veil_resolver_failures", "veil_udp_datagrams_dropped",
            "veil_tun_packets_dropped"} <= names
    for family in veil:
        assert re.fullmatch(r"veil_[a-z0-9_]+", family.name), family.name
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample.name
            else:
                assert not sample.name.endswith("_total"), sample.name
            # Base units only: no milliseconds, kilobytes, minutes...
            assert not re.search(r"_(milli|micro|kilo|mega)|_(ms|kb|mb|minutes|hours)(_|$)",
                                 sample.name), sample.name
    samples = scrape(harness.client())
    assert total(samples, "veil_build_info", version=_version()) == 1
    assert total(samples, "veil_start_time_seconds") == pytest.approx(harness.server.started_at)
    assert total(samples, "veil_certificate_expiry_timestamp_seconds") == pytest.approx(
        certificate_not_after(harness.state.cert_path))
    # Users come from the server's snapshot of the store, refreshed twice a second.
    wait_until(lambda: total(scrape(harness.client()), "veil_users", status="active") >= 1,
               10, "an active user in veil_users", poll=0.1)


def _version() -> str:
    from veil import __version__

    return __version__


@pytest.mark.smoke
def test_a_tunnel_counts_bytes_per_user_and_sessions(harness: Harness, module_dir: Path,
                                                     tcp_echo: procs.TcpEcho) -> None:
    admin = harness.client()
    before = scrape(admin)
    assert total(before, "veil_sessions_active") == 0
    spec = f"0:127.0.0.1:{tcp_echo.port}"
    client = procs.start_veil_client(module_dir, harness.first_key, socks=False, forwards=[spec])
    port = client.forwards[spec]
    try:
        payload = b"x" * 100_000
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += sock.recv(65536)

            def counted() -> bool:
                s = scrape(admin)
                return (total(s, "veil_user_bytes_total", user="alice", direction="up")
                        >= len(payload)
                        and total(s, "veil_user_bytes_total", user="alice", direction="down")
                        >= len(payload))

            wait_until(counted, 10, "alice's bytes in both directions", poll=0.1)
            during = scrape(admin)
            assert total(during, "veil_sessions_active") == 1
            assert total(during, "veil_sessions_active", way_in="veil") == 1
            assert total(during, "veil_streams_active") >= 1
            assert total(during, "veil_handshakes_accepted_total", way_in="veil") >= 1
            sessions = Spec().check("/api/sessions", "get",
                                    admin.get("/api/sessions", headers=bearer(harness.token)))
            [session] = sessions["sessions"]
            assert session["user"] == "alice" and session["way_in"] == "veil"
            assert session["bytes_up"] >= len(payload)
            assert session["streams"] >= 1
    finally:
        procs.stop(client.proc)
    wait_until(lambda: total(scrape(admin), "veil_sessions_active") == 0, 10,
               "no active session", poll=0.1)
    # Counted bytes survive the session: counters never go down.
    after = scrape(admin)
    assert total(after, "veil_user_bytes_total", user="alice") >= 2 * len(payload)


def test_a_probe_counts_as_a_cover_connection(harness: Harness) -> None:
    admin = harness.client()
    before = scrape(admin)
    answer = plain_http_probe(harness.server.address.port)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request")  # nginx's answer, from the cover
    after = scrape(admin)
    assert (total(after, "veil_cover_connections_total", reason="plain_text")
            == total(before, "veil_cover_connections_total", reason="plain_text") + 1)
    assert total(after, "veil_probes_total") == total(before, "veil_probes_total") + 1
    assert total(after, "veil_handshakes_accepted_total") == total(
        before, "veil_handshakes_accepted_total")


class _IgnoreReplies(DatagramStreamHandler):
    def on_data(self, data: bytes) -> None: ...
    def on_eof(self) -> None: ...
    def on_reset(self, code: ResetCode) -> None: ...
    def on_datagram(self, address: Address, payload: bytes) -> None: ...


# Datagrams to as many new names at once: far past the names one UDP association resolves at
# a time (MAX_RESOLVING_PER_FLOW), so most are dropped, and counted.
UDP_FLOOD = 20 * MAX_RESOLVING_PER_FLOW


def test_a_udp_flood_past_its_bound_shows_in_the_drop_counter(harness: Harness) -> None:
    """A key holder's datagrams to more new names at once than an association may resolve
    are dropped, and veil_udp_datagrams_dropped_total{way_in="veil",reason="resolving"} says
    how many; no other bound's counter moves."""
    admin = harness.client()
    before = scrape(admin)

    async def flood() -> None:
        driver = await ClientTunnel(AccessKey.parse(harness.first_key),
                                    tls_stack="openssl").connect_once()
        try:
            stream_id = driver.session.open_stream(StreamKind.UDP, Address("0.0.0.0", 0))
            driver.attach(stream_id, _IgnoreReplies())
            for i in range(UDP_FLOOD):
                driver.session.send_datagram(stream_id, Address(f"n{i}.flood.invalid", 53),
                                             b"x" * 64)
            driver.flush()
            await asyncio.sleep(0.5)  # the server reads them all before the session closes
        finally:
            driver.close()

    asyncio.run(flood())

    def dropped(samples: Samples) -> float:
        return total(samples, "veil_udp_datagrams_dropped_total", way_in="veil",
                     reason="resolving")

    wait_until(lambda: dropped(scrape(admin)) - dropped(before)
               >= UDP_FLOOD - 2 * MAX_RESOLVING_PER_FLOW, 10, "the datagrams dropped counted",
               poll=0.1)
    after = scrape(admin)
    for name in ("veil_gate_connections_dropped_total", "veil_replay_filter_unrecorded_total",
                 "veil_sessions_closed_for_flood_total", "veil_outbound_refused_total",
                 "veil_tun_packets_dropped_total"):
        assert total(after, name) == total(before, name), name
    assert total(after, "veil_udp_datagrams_dropped_total", way_in="trojan") == 0


def test_a_ping_flood_shows_in_the_flood_counter(harness: Harness) -> None:
    """A key holder's PINGs past the allowance close its session, and
    veil_sessions_closed_for_flood_total counts it."""
    admin = harness.client()
    before = total(scrape(admin), "veil_sessions_closed_for_flood_total")

    async def flood() -> str:
        driver = await ClientTunnel(AccessKey.parse(harness.first_key),
                                    tls_stack="openssl").connect_once()
        assert driver.transport is not None
        driver.transport.write(frame(FrameType.PING, 0, bytes(8))
                               * (2 * UNPRODUCTIVE_FRAME_BURST))
        why = await asyncio.wait_for(driver.closed, 10)
        # `closed` resolves at the server's CLOSE; the socket closes when its FIN follows.
        # Wait for that, so no transport outlives this loop (pytest reports it as a leak).
        await wait_until_async(lambda: driver.transport is None, 10, "the server's FIN",
                               poll=0.05)
        return why

    why = asyncio.run(flood())
    assert why == "closed by the peer: PROTOCOL_ERROR: PING flood"  # what the client logs
    wait_until(lambda: total(scrape(admin), "veil_sessions_closed_for_flood_total")
               == before + 1, 10, "the flood counted", poll=0.1)


def test_metrics_need_the_token_unless_open(harness: Harness) -> None:
    async def start() -> web.AppRunner:
        runner = web.AppRunner(make_admin_app(harness.server, metrics_open=False))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = harness.run(start())
    try:
        client = Client(int(runner.addresses[0][1]))
        reply = client.get("/metrics")
        assert reply.status == 401
        assert reply.headers["WWW-Authenticate"] == "Bearer"
        assert reply.json()["error"] == "unauthorized"
        assert b"veil_" not in reply.body
        assert client.get("/metrics", headers=bearer("veil_admin_guess")).status == 401
        assert total(scrape(client, bearer(harness.token)), "veil_build_info") == 1
    finally:
        harness.run(runner.cleanup())
    # The loopback panel of the same server serves them without credentials.
    assert harness.client().get("/metrics").status == 200


@pytest.mark.parametrize("host, status", [
    ("localhost", 200), ("127.0.0.1:9", 200), ("[::1]:9", 200), ("LOCALHOST:1", 200),
    ("rebound.example", 421), ("rebound.example:8080", 421), ("127.0.0.1.nip.io", 421)])
def test_open_metrics_answer_only_loopback_names(harness: Harness, host: str,
                                                 status: int) -> None:
    # DNS rebinding: a page on rebound.example whose name now points at 127.0.0.1 reads the
    # open /metrics (user names, byte counts) only if the panel ignores Host.
    reply = harness.client().get("/metrics", headers={"Host": host})
    assert reply.status == status, reply.body[:200]
    if status != 200:
        assert b"veil_" not in reply.body
    # With the token, Host does not matter: the token is not ambient.
    assert harness.client().get("/metrics", headers={"Host": host,
                                                     **bearer(harness.token)}).status == 200


class StandInServer:
    """A stand-in for a server (no VeilServer, no listener, no tunnel): it answers
    ``status()`` (veil.server.status.StatusSource) with the snapshot it was given, to show
    that the panel needs nothing else of a server."""

    def __init__(self, status: ServerStatus) -> None:
        self._status = status

    def status(self) -> ServerStatus:
        return self._status


def _families(text: str) -> Samples:
    return [(s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def test_metrics_of_a_stand_in_status_source(tmp_path: Path) -> None:
    state = init_state(tmp_path / "state", listen=Address("127.0.0.1", 443))[0]

    def conn(conn_id: int, user: str, way_in: str, streams: int) -> ConnectionStatus:
        return ConnectionStatus(id=conn_id, user=user, way_in=way_in, peer="192.0.2.1:5000",
                                started_at=1_700_000_000.0, bytes_up=10, bytes_down=20,
                                streams=streams)

    source = StandInServer(ServerStatus(
        state=state, started_at=1_700_000_000.0, listen="127.0.0.1:443",
        ways_in=("veil", "trojan"),
        connections=(conn(1, "alice", "veil", 3), conn(2, "bob", "veil", 1),
                     conn(3, "bob", "trojan", 0)),
        user_bytes={"alice": Usage(100, 2000), "bob": Usage(5, 7)},
        users={"active": 2, "revoked": 1}, store_refresh_failures=4,
        gate=GateCounts(accepted={"veil": 9, "trojan": 1}, cover_plain=2, cover_foreign_sni=1,
                        silent=5, rejected={"replay": 3, "silent": 1}, tls_failed=6),
        bounds=BoundCounts(pending_dropped=11, replay_unrecorded=12, sessions_flooding=22,
                           outbound_refused_user=13,
                           outbound_refused_server=14, resolver_refused=15,
                           resolver_timed_out=16,
                           udp_dropped={"veil": {"resolving": 17, "queue_full": 18},
                                        "trojan": {"send_buffer_full": 19}},
                           tun_dropped=20, tun_spoofed=21, tun_filtered=22)))

    async def scrape_app() -> str:
        client = TestClient(TestServer(make_admin_app(source, metrics_open=True)))
        await client.start_server()
        try:
            reply = await client.get("/metrics")
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return await reply.text()
        finally:
            await client.close()

    samples = _families(asyncio.run(scrape_app()))
    veil = sorted((n, sorted(lab.items()), v) for n, lab, v in samples if n.startswith("veil_"))
    not_after = certificate_not_after(state.cert_path)
    assert not_after is not None
    assert veil == sorted([
        ("veil_build_info", [("version", _version())], 1.0),
        ("veil_start_time_seconds", [], 1_700_000_000.0),
        ("veil_sessions_active", [("way_in", "trojan")], 1.0),
        ("veil_sessions_active", [("way_in", "veil")], 2.0),
        ("veil_streams_active", [], 4.0),
        ("veil_user_bytes_total", [("direction", "up"), ("user", "alice")], 100.0),
        ("veil_user_bytes_total", [("direction", "down"), ("user", "alice")], 2000.0),
        ("veil_user_bytes_total", [("direction", "up"), ("user", "bob")], 5.0),
        ("veil_user_bytes_total", [("direction", "down"), ("user", "bob")], 7.0),
        ("veil_handshakes_accepted_total", [("way_in", "trojan")], 1.0),
        ("veil_handshakes_accepted_total", [("way_in", "veil")], 9.0),
        ("veil_cover_connections_total", [("reason", "foreign_sni")], 1.0),
        ("veil_cover_connections_total", [("reason", "plain_text")], 2.0),
        ("veil_cover_connections_total", [("reason", "replay")], 3.0),
        # A way in's "silent" adds to the gate's own.
        ("veil_cover_connections_total", [("reason", "silent")], 6.0),
        ("veil_tls_handshake_failures_total", [], 6.0),
        ("veil_probes_total", [], 2 + 1 + 3 + 6 + 6.0),
        ("veil_users", [("status", "active")], 2.0),
        ("veil_users", [("status", "expired")], 0.0),
        ("veil_users", [("status", "over_limit")], 0.0),
        ("veil_users", [("status", "revoked")], 1.0),
        ("veil_store_refresh_failures_total", [], 4.0),
        ("veil_gate_connections_dropped_total", [], 11.0),
        ("veil_replay_filter_unrecorded_total", [], 12.0),
        ("veil_sessions_closed_for_flood_total", [], 22.0),
        ("veil_outbound_refused_total", [("bound", "user")], 13.0),
        ("veil_outbound_refused_total", [("bound", "server")], 14.0),
        ("veil_resolver_failures_total", [("reason", "busy")], 15.0),
        ("veil_resolver_failures_total", [("reason", "timeout")], 16.0),
        ("veil_udp_datagrams_dropped_total", [("reason", "resolving"), ("way_in", "veil")],
         17.0),
        ("veil_udp_datagrams_dropped_total", [("reason", "queue_full"), ("way_in", "veil")],
         18.0),
        ("veil_udp_datagrams_dropped_total",
         [("reason", "send_buffer_full"), ("way_in", "trojan")], 19.0),
        ("veil_tun_packets_dropped_total", [("reason", "congested")], 20.0),
        ("veil_tun_packets_dropped_total", [("reason", "spoofed")], 21.0),
        ("veil_tun_packets_dropped_total", [("reason", "not_allowed")], 22.0),
        ("veil_certificate_expiry_timestamp_seconds", [], not_after),
    ])
