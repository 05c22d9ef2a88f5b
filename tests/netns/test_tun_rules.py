"""Split routing in TUN mode (``veil connect KEY --tun --rules FILE``) in network namespaces.

The topology of tests/netns/topology.py, plus a "domestic" resolver (dnsmasq on the router, the
client's LAN resolver, logging every query it gets) and two more addresses on the Internet host:
``DIRECT_NET_IP`` (in a DIRECT CIDR) and ``DOMESTIC_IP`` (what the domestic resolver answers for
``DOMESTIC_NAME``, in no CIDR rule: it goes direct only because its name did). A capture on the
router's interface towards the client shows what leaves outside the tunnel.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.topology import (
    INTERNET_IP,
    LAN_RESOLVER,
    SERVER_IP,
    SERVER_PORT,
    VEIL,
    WEB_NAME,
    Packet,
    Topology,
)
from tests.support.wait import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

CLIENT_IP = "10.0.11.2"
DIRECT_NET_IP = "198.51.100.2"
DOMESTIC_IP = "203.0.113.4"
BLOCKED_IP = "203.0.113.3"
DOMESTIC_NAME = "shop.domestic.test"
BLOCKED_NAME = "ads.blocked.test"
#: A UDP port no rule names (topology's UDP echo holds 7777 on every address).
OTHER_UDP_PORT = 4443
RULES = f"""\
IP-CIDR,198.51.100.0/24,DIRECT
IP-CIDR,{BLOCKED_IP}/32,BLOCK
DOMAIN-SUFFIX,domestic.test,DIRECT
DOMAIN-SUFFIX,blocked.test,BLOCK
MATCH,TUNNEL
"""


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces (CI runs as root)")
    for program in ("nft", "tcpdump", "nginx", "dnsmasq", "curl", "ip"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed (scripts/install-deps installs it)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun in this kernel")
    with Topology(clients=1) as topology:
        # Two more addresses on the Internet host (nginx listens on all of them).
        topology.ip("internet", "addr", "add", f"{DIRECT_NET_IP}/24", "dev", "i0")
        topology.ip("server", "addr", "add", "198.51.100.1/24", "dev", "si")
        for ip in (DOMESTIC_IP, BLOCKED_IP):
            topology.ip("internet", "addr", "add", f"{ip}/32", "dev", "i0")
        yield topology


@pytest.fixture(scope="module")
def domestic_log(topo: Topology) -> Path:
    """dnsmasq on the client's LAN resolver address, logging every query (the domestic
    resolver: a name it sees is a name the censor's resolver saw)."""
    log = topo.dir / "domestic-dns.log"
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    topo.start("router", "dnsmasq-domestic", [
        dnsmasq, "--keep-in-foreground", "--no-daemon", "--no-resolv", "--no-hosts",
        "--conf-file=/dev/null", f"--pid-file={topo.dir}/dnsmasq-domestic.pid", "--user=root",
        f"--listen-address={LAN_RESOLVER}", "--bind-interfaces", "--log-queries",
        f"--log-facility={log}", f"--address=/domestic.test/{DOMESTIC_IP}",
        # A wrong answer for the foreign name: if it were ever asked here, curl would fail.
        f"--address=/{WEB_NAME}/192.0.2.99"])
    return log


@pytest.fixture(scope="module")
def key(topo: Topology) -> Iterator[str]:
    proc, key = topo.start_server()
    yield key
    topo.stop(proc)


def curl(topo: Topology, url: str, timeout: float = 5) -> subprocess.CompletedProcess[str]:
    return topo.exec("client1", "curl", "-sS", "-m", str(timeout), url, check=False,
                     timeout=timeout + 5)


def outside(packets: list[Packet]) -> list[Packet]:
    """IP packets that are not the TLS connection to the server."""
    return [p for p in packets if p.kind == "ip" and not (
        (p.src, p.dst, p.dport) == (CLIENT_IP, SERVER_IP, SERVER_PORT)
        or (p.src, p.dst, p.sport) == (SERVER_IP, CLIENT_IP, SERVER_PORT))]


#: A DNS query for a tunnelled name sent straight to the domestic resolver by some process:
#: prints "refused" when the kill switch rejects it (ICMP admin-prohibited: ECONNREFUSED or
#: EPERM on a connected UDP socket), "answered" if it got through.
LEAK_QUERY = """
import socket, struct
q = struct.pack('>HHHHHH', 0x1234, 0x0100, 1, 0, 0, 0)
q += b''.join(bytes([len(p)]) + p.encode() for p in '{name}'.split('.')) + b'\\0'
q += struct.pack('>HH', 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect(('{resolver}', 53))
try:
    s.send(q)
    s.recv(512)
    print('answered')
except (ConnectionRefusedError, PermissionError, TimeoutError) as exc:
    print('refused', type(exc).__name__)
"""


def test_rules_in_tun_mode_route_direct_tunnel_and_block(
        topo: Topology, key: str, domestic_log: Path) -> None:
    rules = topo.dir / "rules.txt"
    rules.write_text(RULES)
    before = topo.snapshot("client1")
    capture = topo.capture("router", "r1")
    client = topo.start_client(key, "client1", "--rules", str(rules))
    try:
        assert "nameserver 127.0.77.53" in topo.resolv_conf("client1")
        # A DIRECT CIDR: reached outside the tunnel.
        page = curl(topo, f"http://{DIRECT_NET_IP}/")
        assert "hello from the internet" in page.stdout, page.stderr
        # A name no rule matches: resolved through the tunnel (the server's resolver answers
        # 203.0.113.2; the domestic one would answer 192.0.2.99), fetched through it.
        page = curl(topo, f"http://{WEB_NAME}/")
        assert "hello from the internet" in page.stdout, page.stderr
        # A DIRECT name: resolved by the domestic resolver, its address routed direct.
        page = curl(topo, f"http://{DOMESTIC_NAME}/")
        assert "hello from the internet" in page.stdout, page.stderr
        routes = topo.ip("client1", "route", "show", "proto", "118")
        assert f"{DOMESTIC_IP} via {LAN_RESOLVER}" in routes
        assert "198.51.100.0/24 via" in routes
        # Blocked by name (NXDOMAIN from the client itself) and by address (rejected).
        blocked = curl(topo, f"http://{BLOCKED_NAME}/")
        assert blocked.returncode == 6, blocked.stderr  # could not resolve host
        blocked = curl(topo, f"http://{BLOCKED_IP}/", timeout=3)
        assert blocked.returncode == 7, blocked.stderr  # refused at once, not a timeout
        # Another process asking the domestic resolver itself is refused by the kill
        # switch: only veil's resolver's (marked) queries may reach it.
        leak = topo.exec("client1", "python3", "-c", LEAK_QUERY.format(
            resolver=LAN_RESOLVER, name=WEB_NAME), check=False)
        assert leak.returncode == 0 and "refused" in leak.stdout, (leak.stdout, leak.stderr)
    finally:
        assert topo.stop(client) == 0
        packets = capture.packets()
    asked = domestic_log.read_text()
    assert DOMESTIC_NAME in asked
    assert WEB_NAME not in asked and BLOCKED_NAME not in asked
    seen = outside(packets)
    # Outside the tunnel: the client's own packets to the DIRECT CIDR and to the DIRECT
    # name's address, DNS to the domestic resolver, and nothing else.
    flows = {(p.dst, p.dport) for p in seen if p.src == CLIENT_IP}
    assert (DIRECT_NET_IP, 80) in flows
    assert (DOMESTIC_IP, 80) in flows
    assert flows <= {(DIRECT_NET_IP, 80), (DOMESTIC_IP, 80), (LAN_RESOLVER, 53)}, flows
    assert all(INTERNET_IP not in (p.src, p.dst) for p in seen)
    assert all(BLOCKED_IP not in (p.src, p.dst) for p in seen)
    assert topo.snapshot("client1") == before


def test_a_crash_leaves_split_routes_that_cleanup_removes(
        topo: Topology, key: str, domestic_log: Path) -> None:
    rules = topo.dir / "rules-crash.txt"
    rules.write_text(RULES)
    before = topo.snapshot("client1")
    client = topo.start_client(key, "client1", "--rules", str(rules))
    page = curl(topo, f"http://{DOMESTIC_NAME}/")
    assert "hello from the internet" in page.stdout, page.stderr
    topo.stop(client, signal.SIGKILL)
    routes = topo.ip("client1", "route", "show", "proto", "118")
    assert "198.51.100.0/24" in routes and DOMESTIC_IP in routes
    out = topo.exec("client1", *VEIL, "connect", key, "--tun-cleanup")
    assert "restored" in out.stdout
    assert topo.ip("client1", "route", "show", "proto", "118").strip() == ""
    assert topo.snapshot("client1") == before


#: One datagram to each HOST:PORT on a connected UDP socket: prints "answered", "refused"
#: or "silent" per destination. Refused locally, the send itself fails (EPERM: netfilter
#: refused it) and the ICMP port-unreachable the kill switch sends back is queued on the
#: socket (ECONNREFUSED); from farther away only the ICMP error comes, and late.
UDP_PROBE = """
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(':', 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.connect((host, int(port)))
        s.send(b'ping')
        s.recv(64)
        print(target, 'answered')
    except (ConnectionRefusedError, PermissionError):
        print(target, 'refused')
    except TimeoutError:
        print(target, 'silent')
    finally:
        s.close()
"""


#: A UDP echo on each HOST:PORT given, each socket bound to its address: the answer then
#: comes from the address asked (topology's UDP_ECHO, bound to ::, answers from the
#: interface's first address, which a connected socket asking DIRECT_NET_IP would not take).
UDP_ECHOES = """
import select, socket, sys
socks = []
for target in sys.argv[1:]:
    host, port = target.rsplit(':', 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    socks.append(s)
while True:
    for s in select.select(socks, [], [])[0]:
        data, addr = s.recvfrom(2048)
        s.sendto(data, addr)
"""


def udp_probe(topo: Topology, role: str, *targets: str) -> dict[str, str]:
    out = topo.exec(role, "python3", "-c", UDP_PROBE, *targets, timeout=20)
    return dict(line.split() for line in out.stdout.splitlines())


def test_quic_block_refuses_udp_443_through_the_tunnel_and_direct_and_nothing_else(
        topo: Topology, key: str, domestic_log: Path) -> None:
    """``QUIC,BLOCK`` in TUN mode: the kill switch refuses UDP to port 443 at once (ICMP
    port-unreachable: a browser falls back to TCP), whether it would go through the tunnel
    (INTERNET_IP) or direct (DIRECT_NET_IP); UDP to another port, the client's own TLS to
    the server on TCP 443, and its resolver still work."""
    quic = [f"{INTERNET_IP}:443", f"{DIRECT_NET_IP}:443"]
    other = [f"{INTERNET_IP}:{OTHER_UDP_PORT}", f"{DIRECT_NET_IP}:{OTHER_UDP_PORT}"]
    echo = topo.start("internet", "udpechoes", [sys.executable, "-c", UDP_ECHOES, *quic, *other])
    rules = topo.dir / "rules-quic.txt"
    rules.write_text("QUIC,BLOCK\n" + RULES)
    client = None
    try:
        # The control: without veil (from the router), every echo answers.
        wait_until(lambda: set(udp_probe(topo, "router", *quic, *other).values())
                   == {"answered"}, 15, "the UDP echoes answering the router")
        client = topo.start_client(key, "client1", "--rules", str(rules))
        seen = udp_probe(topo, "client1", *quic, *other)
        assert seen == {**dict.fromkeys(quic, "refused"), **dict.fromkeys(other, "answered")}
        # TCP, the tunnel (its TLS is TCP 443) and names resolved through it still work.
        page = curl(topo, f"http://{WEB_NAME}/")
        assert "hello from the internet" in page.stdout, page.stderr
        assert "udp dport 443 ct state new reject" in topo.exec(
            "client1", "nft", "list", "chain", "inet", "veil-killswitch", "port_blocks").stdout
    finally:
        if client is not None:
            assert topo.stop(client) == 0
        topo.stop(echo)


def test_rules_routes_cannot_apply_are_refused_before_anything_changes(
        topo: Topology, key: str) -> None:
    rules = topo.dir / "rules-port.txt"
    rules.write_text("DST-PORT,22,DIRECT\n")
    before = topo.snapshot("client1")
    out = topo.exec("client1", *VEIL, "connect", key, "--tun", "--rules", str(rules),
                    check=False)
    assert out.returncode == 2 and "port or network" in out.stderr, out.stderr
    assert topo.snapshot("client1") == before


def test_the_cn_preset_adds_thousands_of_routes_and_a_clean_exit_removes_them(
        topo: Topology, key: str, domestic_log: Path) -> None:
    before = topo.snapshot("client1")
    client = topo.start_client(key, "client1", "--rules", "cn")
    try:
        routes = topo.ip("client1", "route", "show", "proto", "118").splitlines()
        assert len(routes) > 5000, len(routes)
        assert any(line.startswith("1.0.1.0/24 via 10.0.11.1") for line in routes)
        # Still a tunnel: a name no rule matches is resolved and fetched through it.
        page = curl(topo, f"http://{WEB_NAME}/")
        assert "hello from the internet" in page.stdout, page.stderr
    finally:
        assert topo.stop(client) == 0
    assert topo.snapshot("client1") == before
