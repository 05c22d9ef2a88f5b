"""Site-to-site (docs/site-to-site.md) in network namespaces::

    [hostA] 10.0.31.2 -- [gwA] -- r1 [router] rs -- [server] veil serve --tun
    [hostB] 10.0.32.2 -- [gwB] -- r2 /
         (br0)  +------ [gwB2] -- r4 /      (site B standby gateway)
    [roam]  10.0.13.2 -------- r3 /

gwA and gwB run ``veil connect KEY --tun --site`` with the keys of sites ``site-a``
(10.0.31.0/24) and ``site-b`` (10.0.32.0/24). The router routes both LANs too, so a packet
that went around the tunnel would arrive, and the captures on r1 and r2 would see it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from tests.netns.test_tun import _require
from tests.netns.topology import SERVER_IP, SERVER_PORT, UDP_ECHO, VEIL, Packet, Proc, Topology
from tests.support.wait import wait_until
from veil.manage.state import load_state
from veil.manage.users import UserManager

pytestmark = [pytest.mark.netns, pytest.mark.slow]

HOST_A = "10.0.31.2"
HOST_B = "10.0.32.2"
GW_A = "10.0.11.2"
GW_B = "10.0.12.2"
GW_B_LAN = "10.0.32.1"
GW_B2_LAN = "10.0.32.3"
SITE_A = "10.0.31.0/24"
SITE_B = "10.0.32.0/24"
HTTP_PORT = 8080
ECHO_PORT = 7777
BIG = 16 * 1024 * 1024


class SiteTopology(Topology):
    """The TUN tests' small Internet with a host behind client2 too (guest2, hostB) and a
    third client (the roaming user)."""

    def __init__(self) -> None:
        super().__init__(clients=4, guest=True)
        self.ns["guest2"] = self.ns["router"].removesuffix("router") + "guest2"

    def _start_internet(self) -> None:
        pass  # the offices talk to each other: no web, DNS or iperf3 server "out there"

    def _build(self) -> None:
        super()._build()
        # LAN B is a bridge (in hostB's namespace) with both of site B's gateways on it.
        self.ip("guest2", "link", "add", "br0", "type", "bridge")
        self.ip("guest2", "link", "set", "br0", "up")
        for gw, port, address in (("client2", "g0", GW_B_LAN), ("client4", "g1", GW_B2_LAN)):
            self._veth(gw, "cg", "guest2", port)
            self._addr(gw, "cg", f"{address}/24")
            self.ip("guest2", "link", "set", port, "master", "br0")
        self._addr("guest2", "br0", f"{HOST_B}/24")
        self.ip("guest2", "route", "add", "default", "via", GW_B_LAN)
        self.ip("router", "route", "add", SITE_B, "via", GW_B)

    def veil_user(self, *args: str) -> str:
        return self.exec("server", *VEIL, "user", *args, "--state",
                         str(self.dir / "server-state")).stdout.strip()


@pytest.fixture(scope="module")
def topo() -> Iterator[SiteTopology]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces (CI runs as root)")
    _require()
    with SiteTopology() as topology:
        yield topology


@pytest.fixture(scope="module")
def sites(topo: SiteTopology) -> Iterator[dict[str, str]]:
    """The server, the two sites' users and the roaming user, the hosts' servers; keys by
    user name."""
    server, _ = topo.start_server()
    # In this process (what `veil user add` does, without three Python start-ups), and the
    # server has them before a gateway dials.
    state = load_state(topo.dir / "server-state")
    store = state.open_store()
    try:
        users = UserManager(state, store)
        keys = {name: users.access_key(users.add(name, sites=sites)) for name, sites in (
            ("site-a", (SITE_A,)), ("site-b", (SITE_B,)), ("roam", ()))}
        assert users.confirm().describe() is None
    finally:
        store.close()
    www = topo.dir / "lan-www"
    www.mkdir()
    (www / "big.bin").write_bytes(os.urandom(BIG))
    for role, host in (("guest1", HOST_A), ("guest2", HOST_B)):
        topo.start(role, f"http-{role}", [sys.executable, "-m", "http.server", "--bind", host,
                                          "--directory", str(www), str(HTTP_PORT)])
        topo.start(role, f"echo-{role}", [sys.executable, "-c", UDP_ECHO, str(ECHO_PORT)])
        topo.wait_tcp(role, HTTP_PORT)
    yield keys
    topo.stop(server)


@pytest.fixture(scope="module")
def gateways(topo: SiteTopology, sites: dict[str, str]) -> Iterator[dict[str, Proc]]:
    """gwA and gwB, up for the whole module (a test that stops one says so)."""
    procs = {"a": gateway(topo, sites["site-a"], "client1", wait=SITE_B),
             "b": gateway(topo, sites["site-b"], "client2", wait=SITE_A)}
    yield procs
    for proc in procs.values():
        topo.stop(proc)


def gateway(topo: SiteTopology, key: str, role: str, wait: str = SITE_A) -> Proc:
    proc = topo.start(role, f"{role}-gw", [*VEIL, "-v", "connect", key, "--tun", "--site"])
    topo.wait_log(proc, "site gateway, routes")
    topo.wait_log(proc, wait)  # the other site's subnet, announced by the server
    return proc


def ping(topo: SiteTopology, role: str, host: str, wait: float = 2) -> bool:
    return topo.exec(role, "ping", "-c", "1", "-W", str(wait), host,
                     check=False).returncode == 0


def udp_echo(topo: SiteTopology, role: str, host: str) -> bool:
    code = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.settimeout(1)\n"
            "for _ in range(3):\n"
            f"    s.sendto(b'x' * 3000, ('{host}', {ECHO_PORT}))\n"
            "    try:\n"
            "        assert len(s.recv(65535)) == 3000; break\n"
            "    except TimeoutError: pass\n"
            "else: raise SystemExit(1)")
    return topo.exec(role, "python3", "-c", code, check=False).returncode == 0


def fetch_sha256(topo: SiteTopology, role: str, host: str, timeout: float = 30) -> str:
    out = topo.exec(role, "sh", "-c", f"curl -sS -m {timeout} http://{host}:{HTTP_PORT}/big.bin"
                    " | sha256sum", timeout=timeout + 5)
    return out.stdout.split()[0]


def leaks(packets: list[Packet], gateway_ip: str) -> list[Packet]:
    """Every IP packet that is not the gateway's TLS connection to the server."""
    return [p for p in packets if p.kind not in ("arp", "link-local") and not (
        (p.src, p.dst, p.dport) == (gateway_ip, SERVER_IP, SERVER_PORT)
        or (p.src, p.dst, p.sport) == (SERVER_IP, gateway_ip, SERVER_PORT))]


def test_two_offices_reach_each_other_by_lan_address_and_only_tls_leaves(
        topo: SiteTopology, gateways: dict[str, Proc]) -> None:
    captures = {GW_A: topo.capture("router", "r1"), GW_B: topo.capture("router", "r2")}
    # The gateways route the other site only: their default routes are untouched.
    routes = topo.ip("client1", "route", "show")
    assert "default via 10.0.11.1" in routes and f"{SITE_B} dev veil0" in routes
    for role, other in (("guest1", HOST_B), ("guest2", HOST_A)):
        assert ping(topo, role, other), f"{role} -> {other}"
        assert udp_echo(topo, role, other), f"{role} -> {other} UDP"
    expected = hashlib.sha256((topo.dir / "lan-www" / "big.bin").read_bytes()).hexdigest()
    assert fetch_sha256(topo, "guest1", HOST_B) == expected
    assert fetch_sha256(topo, "guest2", HOST_A) == expected
    # No NAT: each host saw the other's LAN address.
    logs = {p.name: p.text() for p in topo.procs}
    assert f"{HOST_A} - - " in logs["http-guest2"]
    assert f"{HOST_B} - - " in logs["http-guest1"]
    for gateway_ip, capture in captures.items():
        seen = capture.packets()
        assert any(p.dport == SERVER_PORT for p in seen)
        assert leaks(seen, gateway_ip) == []


def test_a_roaming_user_reaches_a_site_only_when_allowed(
        topo: SiteTopology, sites: dict[str, str], gateways: dict[str, Proc]) -> None:
    roam = topo.start("client3", "roam", [*VEIL, "-v", "connect", sites["roam"], "--tun"])
    try:
        topo.wait_log(roam, "TUN veil0 up")
        assert not ping(topo, "client3", HOST_A, wait=1)
        topo.veil_user("limit", "roam", "--reach", "site-a")  # returns once the server has it
        assert ping(topo, "client3", HOST_A)
        assert not ping(topo, "client3", HOST_B, wait=1)  # site-b was not given
        topo.veil_user("limit", "roam", "--reach", "none")
        assert not ping(topo, "client3", HOST_A, wait=1)
    finally:
        topo.stop(roam)


def veil0_packets(topo: SiteTopology, role: str) -> int:
    """Packets veil wrote to a gateway's TUN device: what came out of the tunnel (the kernel
    counts them as received on the device). ``ip netns exec`` mounts the namespace's own
    /sys."""
    return int(topo.exec(role, "cat", "/sys/class/net/veil0/statistics/rx_packets").stdout)


def test_a_standby_gateway_takes_over_when_the_active_one_drops(
        topo: SiteTopology, sites: dict[str, str], gateways: dict[str, Proc]) -> None:
    # The newest session of a site carries its traffic: gwB2's device now delivers site A's
    # packets to LAN B (hostB answers through gwB, its default route: the server takes a
    # site's packets from any of its sessions).
    gw_b2 = gateway(topo, sites["site-b"], "client4", wait=SITE_A)
    try:
        before = veil0_packets(topo, "client4")
        assert ping(topo, "guest1", HOST_B)
        assert veil0_packets(topo, "client4") > before
        # The active gateway drops (the process dies; its kernel closes the connection):
        # the standby's session carries the site again, at once.
        topo.stop(gw_b2, signal.SIGKILL)
        started = time.monotonic()
        wait_until(lambda: ping(topo, "guest1", HOST_B, wait=1), 5,
                   "site B reachable through the standby gateway")
        print(f"standby took over within {time.monotonic() - started:.2f} s")
    finally:
        topo.stop(gw_b2)
        topo.exec("client4", *VEIL, "connect", sites["site-b"], "--tun-cleanup", check=False)


def test_revoking_a_site_cuts_it_at_once_and_its_lan_does_not_leak(
        topo: SiteTopology, sites: dict[str, str], gateways: dict[str, Proc]) -> None:
    """Last in the module: it revokes site B and stops both gateways."""
    gw_a, gw_b = gateways["a"], gateways["b"]
    capture = topo.capture("router", "r2")
    try:
        assert ping(topo, "guest1", HOST_B)
        # Revoked in the store from here (what `veil user revoke` does, without its Python
        # start-up), then timed until hostB stops answering: the server loads the change
        # within its 0.5 s look at the store and closes gwB's session at once.
        state = load_state(topo.dir / "server-state")
        store = state.open_store()
        try:
            UserManager(state, store).revoke("site-b")
        finally:
            store.close()
        revoked = time.monotonic()
        wait_until(lambda: not ping(topo, "guest1", HOST_B, wait=0.3), 5,
                   "site B cut after its revocation")
        took = time.monotonic() - revoked
        # While gwB's tunnel is down its LAN's packets for site A go nowhere (not around).
        assert not ping(topo, "guest2", HOST_A, wait=1)
        assert gw_b.alive()  # still trying, traffic blocked
        print(f"revocation: site B cut {took:.2f} s after the store had it")
        # A crash takes the device and its routes: the kill switch's table stays and
        # keeps the LAN's packets for site A from the default route.
        topo.stop(gw_b, signal.SIGKILL)
        assert f"{SITE_A} dev veil0" not in topo.ip("client2", "route", "show")
        assert not ping(topo, "guest2", HOST_A, wait=1)
        # Started again (and refused: site B is revoked), the gateway blocks what the crashed
        # run had learnt at once, without a word from the server.
        gw_b = topo.start("client2", "client2-gw-again", [*VEIL, "-v", "connect",
                                                          sites["site-b"], "--tun", "--site"])
        topo.wait_log(gw_b, f"site gateway: {SITE_A} blocked")
        assert not ping(topo, "guest2", HOST_A, wait=1)
    finally:
        topo.stop(gw_b)
        topo.veil_user("restore", "site-b")
    assert leaks(capture.packets(), GW_B) == []
    topo.exec("client2", *VEIL, "connect", sites["site-b"], "--tun-cleanup")
    assert "veil" not in topo.exec("client2", "nft", "list", "ruleset").stdout
    assert topo.exec("client2", "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
    # A clean exit leaves nothing: gwA's table and routes go with it.
    topo.stop(gw_a)
    assert "veil" not in topo.exec("client1", "nft", "list", "ruleset").stdout
    assert "veil0" not in topo.ip("client1", "link", "show")
    # ... and with nothing of veil's left, the packets held back above would leave (the
    # control: a crashed gateway forwards, as veil had turned forwarding on).
    topo.exec("client2", "sysctl", "-qw", "net.ipv4.ip_forward=1")
    try:
        assert ping(topo, "guest2", HOST_A)
    finally:
        topo.exec("client2", "sysctl", "-qw", "net.ipv4.ip_forward=0")
