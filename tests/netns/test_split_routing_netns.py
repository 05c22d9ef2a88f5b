"""Split routing (``veil connect --rules``) with real resolvers, in network namespaces.

::

    [client] c0 ---- r1 [router] rd ---- d0 [domestic]  nginx "home", dnsmasq (--log-queries)
     veil connect        |  capture on r1           198.51.100.2
     --rules --socks     rs
     --http              |
                        s0 [server] si ---- f0 [foreign]   nginx "abroad", the server's dnsmasq
                        veil serve          203.0.113.2
                        10.0.2.2:443

The client's resolver (/etc/netns/NAME/resolv.conf, which ``ip netns exec`` mounts over
/etc/resolv.conf) is the domestic dnsmasq. The client has routes to the domestic network and
to the veil server only: the foreign network is reachable through the veil server alone (the
server does not forward packets; only its tunnel relays). The domestic resolver also answers
for the foreign name, with an address on the domestic network: a client that asked it would
be seen in its log, and would connect to the wrong place.

The capture on the router's interface towards the client is what a censor on the client's
network sees: the domestic fetch in clear to the domestic server, the foreign one as nothing
but the TLS connection to the veil server.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns.topology import NGINX_CONF, UDP_ECHO, VEIL, Packet, Proc, Topology

pytestmark = [pytest.mark.netns, pytest.mark.slow]

CLIENT_IP = "10.0.11.2"
ROUTER_CLIENT_SIDE = "10.0.11.1"
DOMESTIC_IP = "198.51.100.2"
SERVER_IP = "10.0.2.2"
SERVER_PORT = 443
FOREIGN_IP = "203.0.113.2"
SERVER_FOREIGN_SIDE = "203.0.113.1"
DOMESTIC_NAME = "shop.home.test"
FOREIGN_NAME = "news.abroad.test"
BLOCKED_NAME = "ads.home.test"
#: A domestic site that no domain rule names (the domain list lacks it): the server's resolver
#: gives its domestic address, which the IP-CIDR rule sends direct; the domestic resolver must
#: never hear of it (it would answer LIE_IP).
UNLISTED_NAME = "bank.unlisted.test"
#: What the domestic resolver answers for the foreign name: an address on the domestic network,
#: so a leak would also fetch the wrong page.
LIE_IP = "198.51.100.66"
#: UDP echo servers on the foreign host: one where QUIC would go, one for anything else.
QUIC_PORT = 443
ECHO_PORT = 7777
SOCKS_PORT = 1080
HTTP_PORT = 8118
#: curl's whole-transfer limit. A direct fetch is answered in milliseconds; a tunnelled one
#: needs the tunnel's TLS handshake first (a second or two on a loaded CI machine).
FETCH_TIMEOUT_S = 15
#: With the server stopped, a direct fetch must finish within this: it never needed the
#: tunnel, whose wait would be 15 s (READY_TIMEOUT).
DIRECT_AT_ONCE_S = 3.0

RULES = f"""# the domestic domain direct, an ad domain blocked, the rest tunnelled
DOMAIN-SUFFIX,{BLOCKED_NAME},BLOCK
DOMAIN-SUFFIX,home.test,DIRECT
QUIC,BLOCK
IP-CIDR,198.51.100.0/24,DIRECT
MATCH,TUNNEL
"""


class SplitLab(Topology):
    """The five namespaces above; :meth:`close` (Topology's) deletes them and kills what was
    started here, by PID."""

    def __init__(self) -> None:
        super().__init__(clients=1)
        tag = secrets.token_hex(3)
        self.ns = {role: f"veil-r-{tag}-{role}"
                   for role in ("client", "router", "domestic", "server", "foreign")}
        self.resolvers: dict[str, Proc] = {}

    def initial_resolv_conf(self, role: str) -> str:
        if role == "server":
            return f"nameserver {FOREIGN_IP}\n"
        return f"nameserver {DOMESTIC_IP}\n"

    def _build(self) -> None:
        for role, name in self.ns.items():
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
            self.created.append(name)
            self.ip(role, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / name
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(self.initial_resolv_conf(role))
        self._veth("client", "c0", "router", "r1")
        self._addr("client", "c0", f"{CLIENT_IP}/24")
        self._addr("router", "r1", f"{ROUTER_CLIENT_SIDE}/24")
        self._veth("router", "rd", "domestic", "d0")
        self._addr("router", "rd", "198.51.100.1/24")
        self._addr("domestic", "d0", f"{DOMESTIC_IP}/24")
        self._veth("router", "rs", "server", "s0")
        self._addr("router", "rs", "10.0.2.1/24")
        self._addr("server", "s0", f"{SERVER_IP}/24")
        self._veth("server", "si", "foreign", "f0")
        self._addr("server", "si", f"{SERVER_FOREIGN_SIDE}/24")
        self._addr("foreign", "f0", f"{FOREIGN_IP}/24")
        # The client: the domestic network and the veil server, nothing else.
        self.ip("client", "route", "add", "198.51.100.0/24", "via", ROUTER_CLIENT_SIDE)
        self.ip("client", "route", "add", "10.0.2.0/24", "via", ROUTER_CLIENT_SIDE)
        self.ip("domestic", "route", "add", "default", "via", "198.51.100.1")
        self.ip("server", "route", "add", "10.0.11.0/24", "via", "10.0.2.1")
        self.ip("foreign", "route", "add", "default", "via", SERVER_FOREIGN_SIDE)
        self.exec("router", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self._site("domestic", DOMESTIC_IP, "hello from home",
                   [f"--address=/home.test/{DOMESTIC_IP}",
                    f"--address=/abroad.test/{LIE_IP}",
                    f"--address=/unlisted.test/{LIE_IP}"])
        self._site("foreign", FOREIGN_IP, "hello from abroad",
                   [f"--address=/abroad.test/{FOREIGN_IP}",
                    f"--address=/unlisted.test/{DOMESTIC_IP}"])
        for port in (QUIC_PORT, ECHO_PORT):
            self.start("foreign", f"udp-echo-{port}", [sys.executable, "-c", UDP_ECHO, str(port)])

    def _site(self, role: str, ip: str, page: str, answers: list[str]) -> None:
        """nginx on ``ip``:80 serving ``page``, and dnsmasq on ``ip``:53 logging each query."""
        prefix = self.dir / role
        www = prefix / "www"
        www.mkdir(parents=True)
        (www / "index.html").write_text(page + "\n")
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, root=www))
        self.start(role, f"{role}-nginx", [shutil.which("nginx") or "/usr/sbin/nginx", "-p",
                                           str(prefix), "-c", str(conf)])
        resolver = self.start(role, f"{role}-dnsmasq", [
            shutil.which("dnsmasq") or "/usr/sbin/dnsmasq", "--keep-in-foreground",
            "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--user=root",
            f"--pid-file={prefix}/dnsmasq.pid", f"--listen-address={ip}", "--bind-interfaces",
            "--log-queries", "--log-facility=-", *answers])
        self.resolvers[role] = resolver
        self.wait_log(resolver, "started, version")
        self.wait_tcp(role, 80)

    def queries(self, role: str) -> str:
        """The names ``role``'s dnsmasq was asked, one ``query[TYPE] NAME from IP`` a line."""
        return "\n".join(line for line in self.resolvers[role].text().splitlines()
                         if "query[" in line)

    def start_veil_server(self) -> tuple[Proc, str]:
        proc = self.start("server", "veil-server", [
            *VEIL, "-v", "serve", "--self-signed", "--state", str(self.dir / "server-state"),
            "--listen", f"{SERVER_IP}:{SERVER_PORT}"], stdout=True)
        assert proc.popen.stdout is not None
        key = proc.popen.stdout.readline().decode().strip()
        self.wait_tcp("server", SERVER_PORT)
        return proc, key

    def start_veil_client(self, key: str, rules: Path) -> Proc:
        proc = self.start("client", "veil-client", [
            *VEIL, "-v", "connect", key, "--rules", str(rules),
            "--socks", f"127.0.0.1:{SOCKS_PORT}", "--http", f"127.0.0.1:{HTTP_PORT}"])
        self.wait_log(proc, "SOCKS5 proxy on")
        self.wait_log(proc, "HTTP proxy on")
        return proc


@dataclass
class Lab:
    topo: SplitLab
    server: Proc
    client: Proc


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces (CI runs as root)")
    for program in ("tcpdump", "nginx", "dnsmasq", "curl"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed (scripts/install-deps installs it)")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    _require()
    with SplitLab() as topo:
        rules = topo.dir / "rules.txt"
        rules.write_text(RULES)
        server, key = topo.start_veil_server()
        assert key.startswith("veil://")
        client = topo.start_veil_client(key, rules)
        yield Lab(topo, server, client)


PROXIES = {
    "socks5": ["--socks5-hostname", f"127.0.0.1:{SOCKS_PORT}"],
    "http": ["-x", f"http://127.0.0.1:{HTTP_PORT}"],
}


def fetch(topo: SplitLab, proxy: str, name: str,
          timeout: float = FETCH_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """curl ``http://NAME/`` in the client's namespace through ``proxy``; the output ends with
    the HTTP status (000: no answer)."""
    return topo.exec("client", "curl", "-sS", "-m", str(timeout), "-w", "\n%{http_code}",
                     *PROXIES[proxy], f"http://{name}/", check=False, timeout=timeout + 5)


def flows(packets: list[Packet]) -> set[tuple[str, str, int]]:
    """The (client side, far side, far port) of every IP packet the capture saw."""
    seen = set()
    for p in packets:
        if p.kind != "ip":
            continue
        if p.src == CLIENT_IP:
            seen.add((p.src, p.dst, p.dport))
        else:
            seen.add((p.dst, p.src, p.sport))
    return seen


@pytest.mark.parametrize("proxy", list(PROXIES))
def test_domestic_direct_foreign_tunnelled_blocked_refused(lab: Lab, proxy: str) -> None:
    topo = lab.topo
    # The domestic name: resolved by the domestic resolver, fetched from the client itself.
    capture = topo.capture("router", "r1")
    page = fetch(topo, proxy, DOMESTIC_NAME)
    seen = flows(capture.packets())
    assert page.stdout == "hello from home\n\n200", page.stderr
    assert (CLIENT_IP, DOMESTIC_IP, 80) in seen, seen
    assert (CLIENT_IP, DOMESTIC_IP, 53) in seen, seen
    assert f"query[A] {DOMESTIC_NAME} from {CLIENT_IP}" in topo.queries("domestic")

    # The foreign name: on the wire only the TLS connection to the veil server, and the
    # domestic resolver never hears of it; the server's resolver does.
    capture = topo.capture("router", "r1")
    page = fetch(topo, proxy, FOREIGN_NAME)
    seen = flows(capture.packets())
    assert page.stdout == "hello from abroad\n\n200", page.stderr
    assert seen == {(CLIENT_IP, SERVER_IP, SERVER_PORT)}, seen
    assert FOREIGN_NAME not in topo.queries("domestic")
    assert f"query[A] {FOREIGN_NAME} from {SERVER_FOREIGN_SIDE}" in topo.queries("foreign")

    # The blocked name: refused by the proxy, never resolved, nothing on the wire for it.
    capture = topo.capture("router", "r1")
    page = fetch(topo, proxy, BLOCKED_NAME)
    seen = flows(capture.packets())
    if proxy == "socks5":
        # curl names the SOCKS5 reply code: 2, connection not allowed by ruleset.
        assert page.returncode == 97 and "(2)" in page.stderr, page
    else:
        assert page.stdout.endswith("\n403") and "blocked by rule" in page.stdout, page
    assert not seen - {(CLIENT_IP, SERVER_IP, SERVER_PORT)}, seen
    assert BLOCKED_NAME not in topo.queries("domestic")


@pytest.mark.parametrize("proxy", list(PROXIES))
def test_a_name_no_domain_rule_names_is_resolved_by_the_server_and_goes_direct(
        lab: Lab, proxy: str) -> None:
    """The issue's "a name that no domain rule matches is resolved through the tunnel, never
    by the domestic resolver": the server's resolver answers with a domestic address, the
    IP-CIDR DIRECT rule matches it, and the client fetches from there itself."""
    topo = lab.topo
    capture = topo.capture("router", "r1")
    page = fetch(topo, proxy, UNLISTED_NAME)
    seen = flows(capture.packets())
    assert page.stdout == "hello from home\n\n200", page.stderr
    assert (CLIENT_IP, DOMESTIC_IP, 80) in seen, seen
    assert (CLIENT_IP, LIE_IP, 80) not in seen, seen
    assert UNLISTED_NAME not in topo.queries("domestic")
    assert f"query[A] {UNLISTED_NAME} from {SERVER_FOREIGN_SIDE}" in topo.queries("foreign")


#: How long a datagram is given to come back before it counts as dropped: the others on the
#: same association are answered in milliseconds.
DROPPED_WAIT_S = 2.0

#: SOCKS5 UDP ASSOCIATE from the client's namespace: sends each case's datagram through the
#: relay, one at a time, and prints the reply to each (hex) or null.
UDP_THROUGH_SOCKS = """
import json, socket, struct, sys
port, wait, cases = int(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
ctrl = socket.create_connection(("127.0.0.1", port), timeout=10)
ctrl.sendall(b"\\x05\\x01\\x00")
assert ctrl.recv(2) == b"\\x05\\x00"
ctrl.sendall(b"\\x05\\x03\\x00\\x01" + bytes(6))
reply = b""
while len(reply) < 10:
    reply += ctrl.recv(10 - len(reply))
assert reply[1] == 0, reply
relay = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(wait)
answers = {}
for label, host, dport, payload in cases:
    try:
        target = b"\\x01" + socket.inet_aton(host)
    except OSError:
        target = b"\\x03" + bytes([len(host)]) + host.encode()
    udp.sendto(b"\\x00\\x00\\x00" + target + struct.pack("!H", dport)
               + bytes.fromhex(payload), relay)
    try:
        answers[label] = udp.recvfrom(65535)[0].hex()
    except TimeoutError:
        answers[label] = None
print(json.dumps(answers))
"""


def dns_query(name: str) -> bytes:
    """A DNS question for ``name``'s A record (id 0x5eed, recursion desired)."""
    labels = b"".join(bytes((len(part),)) + part.encode() for part in name.split("."))
    return bytes.fromhex("5eed01000001000000000000") + labels + b"\x00\x00\x01\x00\x01"


def test_socks5_udp_dns_direct_and_quic_dropped(lab: Lab) -> None:
    """One association: a DNS query to the domestic resolver goes direct, a datagram to the
    foreign host's port 7777 through the tunnel, and QUIC (UDP to 443) is dropped by
    ``QUIC,BLOCK`` whichever way it would have gone: it never reaches the wire."""
    topo = lab.topo
    cases = [("dns", DOMESTIC_IP, 53, dns_query(DOMESTIC_NAME).hex()),
             ("echo", FOREIGN_NAME, ECHO_PORT, b"tunnelled".hex()),
             ("quic abroad", FOREIGN_NAME, QUIC_PORT, b"quic initial".hex()),
             ("quic at home", DOMESTIC_IP, QUIC_PORT, b"quic initial".hex())]
    capture = topo.capture("router", "r1")
    out = topo.exec("client", sys.executable, "-c", UDP_THROUGH_SOCKS, str(SOCKS_PORT),
                    str(DROPPED_WAIT_S), json.dumps(cases), check=False, timeout=60)
    packets = capture.packets()
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    assert answers["dns"] is not None, answers
    assert socket.inet_aton(DOMESTIC_IP) in bytes.fromhex(answers["dns"])  # the A record
    assert bytes.fromhex(answers["echo"]).endswith(b"tunnelled"), answers
    assert answers["quic abroad"] is None and answers["quic at home"] is None, answers
    udp = {(p.src, p.dst, p.sport, p.dport) for p in packets if p.kind == "ip" and p.proto == 17}
    assert any(dst == DOMESTIC_IP and dport == 53 for _, dst, _, dport in udp), udp
    assert not any(QUIC_PORT in (sport, dport) for *_, sport, dport in udp), udp
    assert FOREIGN_NAME not in topo.queries("domestic")


def test_the_foreign_site_is_reachable_only_through_the_tunnel(lab: Lab) -> None:
    """The positive control of the topology: without veil the client cannot reach it."""
    out = lab.topo.exec("client", "curl", "-sS", "-m", "3", f"http://{FOREIGN_IP}/",
                        check=False, timeout=10)
    assert out.returncode != 0 and "hello from abroad" not in out.stdout, out


def test_with_the_server_stopped_direct_still_works_at_once(lab: Lab) -> None:
    """Last in this module: it stops the veil server."""
    topo = lab.topo
    topo.stop(lab.server)
    for proxy in PROXIES:
        started = time.monotonic()
        page = fetch(topo, proxy, DOMESTIC_NAME)
        took = time.monotonic() - started
        assert page.stdout == "hello from home\n\n200", page.stderr
        assert took < DIRECT_AT_ONCE_S, took
        # The tunnelled name fails, as it always has (here curl gives up first).
        page = fetch(topo, proxy, FOREIGN_NAME, timeout=DIRECT_AT_ONCE_S)
        assert "hello from abroad" not in page.stdout, page
    assert FOREIGN_NAME not in topo.queries("domestic")
