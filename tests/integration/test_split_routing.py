"""Split routing end to end: a real `veil serve`, a real `veil connect --rules`, loopback.

Who reached a destination is read from the kernel, not guessed: the destination servers here
look up which process holds the socket that connected to them (/proc/net and /proc/PID/fd), so
"direct" means the client's own socket arrived (the server saw no stream) and "tunnel" means
the server's did.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from tests.support import procs
from tests.support.wait import wait_until
from veil.client.http_proxy import HttpProxyInbound
from veil.client.routing import RoutingDialer
from veil.client.rulefiles import load_rules
from veil.client.socks5 import Socks5Inbound
from veil.net.client_session import ClientTunnel
from veil.net.direct import DirectDialer
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.frames import FEATURE_RESOLVE

pytestmark = pytest.mark.slow

#: Each socket operation of these tests gives up after this long: a stream or datagram that is
#: not answered by then is taken as refused or dropped.
IO_TIMEOUT_S = 10.0
#: How long a blocked datagram is given to (wrongly) come back before it counts as dropped; the
#: allowed ones on the same association answer within milliseconds on loopback.
DROPPED_WAIT_S = 1.0
BLOCKED_IP = "127.0.0.3"


def sockets_of(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:["):-1]))
    return inodes


def owner_of_port(port: int, kind: str, pids: dict[str, int]) -> str:
    """Which of ``pids`` holds the ``kind`` (tcp/udp) socket with local port ``port``."""
    inodes = set()
    for table in (kind, kind + "6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(int(fields[9]))
    for name, pid in pids.items():
        if inodes & sockets_of(pid):
            return name
    return "unknown"


class WhoAmI:
    """A TCP and a UDP server on one port that answer every peer with who it is
    (``server``/``client``, by process)."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.port))
        self.seen: list[str] = []
        self._threads = [threading.Thread(target=self._serve_tcp, daemon=True),
                         threading.Thread(target=self._serve_udp, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, peer = self.tcp.accept()
            except OSError:
                return
            with conn:
                who = owner_of_port(peer[1], "tcp", self.pids)
                self.seen.append(who)
                with contextlib.suppress(OSError):
                    conn.sendall(who.encode())

    def _serve_udp(self) -> None:
        while True:
            try:
                data, peer = self.udp.recvfrom(65536)
            except OSError:
                return
            who = owner_of_port(peer[1], "udp", self.pids)
            self.seen.append(who)
            self.udp.sendto(data + b" " + who.encode(), peer)

    def close(self) -> None:
        self.tcp.close()
        self.udp.close()
        for thread in self._threads:
            thread.join(IO_TIMEOUT_S)


@pytest.fixture(scope="module")
def whoami() -> Iterator[WhoAmI]:
    server = WhoAmI()
    try:
        yield server
    finally:
        server.close()


def rules_file(directory: Path) -> Path:
    path = directory / "rules.txt"
    path.write_text(f"""# split routing test rules
DOMAIN,blocked.test,BLOCK
IP-CIDR,{BLOCKED_IP}/32,BLOCK
IP-CIDR,127.0.0.1/32,DIRECT
GEOIP,PRIVATE,DIRECT
MATCH,TUNNEL
""")
    return path


@pytest.fixture(scope="module")
def routed_client(module_dir: Path, veil_server: procs.VeilServer,
                  whoami: WhoAmI) -> Iterator[procs.VeilClient]:
    client = procs.start_veil_client(module_dir, veil_server.key, http=True,
                                     extra=("--rules", str(rules_file(module_dir))))
    whoami.pids.update(server=veil_server.proc.pid, client=client.proc.pid)
    try:
        yield client
    finally:
        procs.stop(client.proc)


def socks_connect(port: int, host: str, dest_port: int) -> tuple[socket.socket, bytes]:
    """A SOCKS5 CONNECT (by name or IPv4); the socket and the reply's first two bytes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
    try:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        try:
            target = b"\x01" + socket.inet_aton(host)
        except OSError:
            target = b"\x03" + bytes((len(host),)) + host.encode()
        sock.sendall(b"\x05\x01\x00" + target + struct.pack("!H", dest_port))
        reply = recv_exactly(sock, 10)
    except BaseException:
        sock.close()
        raise
    return sock, reply[:2]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_socks5_tcp_direct_tunnel_and_block(routed_client: procs.VeilClient,
                                            whoami: WhoAmI) -> None:
    assert routed_client.socks is not None
    # An IP a DIRECT rule names: the client's own socket reaches it, the server sees nothing.
    sock, reply = socks_connect(routed_client.socks, "127.0.0.1", whoami.port)
    with sock:
        assert reply == b"\x05\x00"
        assert read_all(sock) == b"client"
    # A name no domain rule matches, while IP rules could decide it: the server resolves it
    # (127.0.0.1: the test server allows private addresses) and the IP-CIDR DIRECT rule sends
    # it direct, to that address. (That this host's resolver never sees the name:
    # test_a_name_without_a_domain_rule_is_resolved_by_the_server.)
    sock, reply = socks_connect(routed_client.socks, "localhost", whoami.port)
    with sock:
        assert reply == b"\x05\x00"
        assert read_all(sock) == b"client"
    for host in ("blocked.test", BLOCKED_IP):
        sock, reply = socks_connect(routed_client.socks, host, whoami.port)
        with sock:
            assert reply == b"\x05\x02", host  # connection not allowed by ruleset
            assert read_all(sock) == b""


def http_proxy(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S) as sock:
        sock.sendall(request)
        return read_all(sock)


def test_http_proxy_direct_tunnel_and_block(routed_client: procs.VeilClient,
                                            whoami: WhoAmI) -> None:
    assert routed_client.http is not None
    port = whoami.port
    answer = http_proxy(routed_client.http, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n"
                        f"Host: 127.0.0.1:{port}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nclient")
    # A name: resolved by the server, then decided by its address (direct: see the SOCKS5 test).
    answer = http_proxy(routed_client.http, f"CONNECT localhost:{port} HTTP/1.1\r\n"
                        f"Host: localhost:{port}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nclient")
    # A plain request is routed the same way (the whoami answers before reading it).
    answer = http_proxy(routed_client.http, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\n"
                        f"Host: 127.0.0.1:{port}\r\n\r\n".encode())
    assert answer == b"client"
    answer = http_proxy(routed_client.http, f"GET http://localhost:{port}/ HTTP/1.1\r\n"
                        f"Host: localhost:{port}\r\n\r\n".encode())
    assert answer == b"client"
    for request in (b"CONNECT blocked.test:443 HTTP/1.1\r\nHost: blocked.test:443\r\n\r\n",
                    b"GET http://blocked.test/ HTTP/1.1\r\nHost: blocked.test\r\n\r\n"):
        answer = http_proxy(routed_client.http, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403 Forbidden"), answer
        assert body.count(b"\n") == 1 and b"blocked by rule" in body
        assert b"DOMAIN,blocked.test,BLOCK" in body


def socks_udp(port: int) -> tuple[socket.socket, tuple[str, int]]:
    ctrl = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
    try:
        ctrl.sendall(b"\x05\x01\x00")
        assert ctrl.recv(2) == b"\x05\x00"
        ctrl.sendall(b"\x05\x03\x00\x01" + bytes(6))
        reply = recv_exactly(ctrl, 10)
        assert reply[:2] == b"\x05\x00", reply
    except BaseException:
        ctrl.close()
        raise
    return ctrl, (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])


def udp_header(host: str, port: int) -> bytes:
    try:
        target = b"\x01" + socket.inet_aton(host)
    except OSError:
        target = b"\x03" + bytes((len(host),)) + host.encode()
    return b"\x00\x00\x00" + target + struct.pack("!H", port)


def test_socks5_udp_direct_tunnel_and_block(routed_client: procs.VeilClient,
                                            whoami: WhoAmI) -> None:
    assert routed_client.socks is not None
    ctrl, relay = socks_udp(routed_client.socks)
    with ctrl, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(IO_TIMEOUT_S)

        def ask(host: str, payload: bytes) -> bytes:
            udp.sendto(udp_header(host, whoami.port) + payload, relay)
            data, _ = udp.recvfrom(65536)
            return data[len(udp_header("127.0.0.1", whoami.port)):]

        # One association, three routes: direct, tunnel, and dropped by a block rule.
        assert ask("127.0.0.1", b"one") == b"one client"
        udp.sendto(udp_header(BLOCKED_IP, whoami.port) + b"blocked", relay)
        udp.sendto(udp_header("localhost", whoami.port) + b"two", relay)
        data, _ = udp.recvfrom(65536)
        assert data.endswith(b"two server"), data
        udp.settimeout(DROPPED_WAIT_S)
        with pytest.raises(TimeoutError):
            udp.recvfrom(65536)
        assert b"blocked" not in b" ".join(w.encode() for w in whoami.seen)


def test_hit_counters_are_logged_at_exit(module_dir: Path, veil_server: procs.VeilServer,
                                         whoami: WhoAmI) -> None:
    client = procs.start_veil_client(module_dir, veil_server.key,
                                     extra=("--rules", str(rules_file(module_dir))))
    try:
        assert client.socks is not None
        for host in ("blocked.test", "blocked.test", "127.0.0.1"):
            sock, _ = socks_connect(client.socks, host, whoami.port)
            with sock:
                read_all(sock)
    finally:
        procs.stop(client.proc)
    log = client.log_text()
    assert "split routing: 5 rules from" in log
    assert "DOMAIN,blocked.test,BLOCK: 2 hits" in log
    assert "IP-CIDR,127.0.0.1/32,DIRECT: 1 hit" in log
    assert "MATCH,TUNNEL: 0 hits" in log
    assert "names asked of the server's resolver: 0 (no answer, so tunnelled: 0)" in log


def test_explain_prints_the_rule_and_does_not_connect(module_dir: Path) -> None:
    rules = rules_file(module_dir)
    out = subprocess.run([*procs.VEIL, "connect", "veil://not-even-parsed", "--rules", str(rules),
                          "--explain", "BLOCKED.test.", "--explain", "127.0.0.1:80",
                          "--explain", "example.org"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("BLOCKED.test.:443 -> block:") and f"{rules}:2" in lines[0]
    assert lines[1].startswith("127.0.0.1:80 -> direct:") and "ip_cidr 127.0.0.1/32" in lines[1]
    # A name no domain rule decides, with IP rules that could: decided once the server
    # resolves it (explain does not connect, so it cannot resolve).
    assert lines[2].startswith("example.org:443 -> decided after the server resolves it")
    assert "IP-CIDR,127.0.0.1/32,DIRECT" in lines[2] and "else tunnel (" in lines[2]
    assert "MATCH,TUNNEL" in lines[2]


def test_bad_rules_are_told_before_connecting(module_dir: Path) -> None:
    bad = module_dir / "bad.txt"
    bad.write_text("DOMAIN,a.org,DIRECT\nDOMAIN-SUFFIX,b.org,SOMETIMES\n")
    out = subprocess.run([*procs.VEIL, "connect", "veil://x@127.0.0.1:9", "--rules", str(bad),
                          "--explain", "a.org"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"{bad}:2: action 'SOMETIMES'" in out.stderr, out.stderr


def test_the_cn_preset_with_the_packaged_data(module_dir: Path) -> None:
    """``--rules cn``: China's domains and networks direct, other names decided by the
    address the server resolves them to, other addresses tunnelled, private ranges direct;
    --explain says how old the data is and credits DB-IP."""
    # A name the domain list lacks is decided by the address the server resolves it to
    # (mainland China's networks direct, the rest tunnelled).
    later = "decided after the server resolves it"
    hosts = {"www.baidu.com": "direct", "www.google.com": later, "fonts.gstatic.com": later,
             "114.114.114.114:53": "direct", "8.8.8.8:53": "tunnel",
             "192.168.1.1:80": "direct"}
    argv = [*procs.VEIL, "connect", "veil://x@127.0.0.1:9", "--rules", "cn"]
    for host in hosts:
        argv += ["--explain", host]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for line, (host, action) in zip(lines, hosts.items(), strict=False):
        assert line.startswith(f"{host.partition(':')[0]}:") and f" -> {action}" in line, line
    assert any("data of 20" in line and "DB-IP" in line for line in lines[len(hosts):]), lines


# -- the local resolver never sees a tunnelled name ----------------------------------------------

class ResolverSpy:
    """Records the names this process asks its resolver about (socket.getaddrinfo)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        real = socket.getaddrinfo

        def spying(host: object, *args: object, **kwargs: object) -> object:
            if isinstance(host, bytes):
                host = host.decode()
            if isinstance(host, str):
                try:
                    socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
                except OSError:
                    self.names.append(host)
            return real(host, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(socket, "getaddrinfo", spying)


async def fetch_through(rules_text: str, directory: Path, key: str, port: int) -> bytes:
    """Run a SOCKS5 inbound in this process, routed by ``rules_text``, and fetch the whoami
    at ``localhost:port`` through it."""
    path = directory / "spy-rules.txt"
    path.write_text(rules_text)
    tunnel = ClientTunnel(AccessKey.parse(key), tls_stack="openssl")
    direct = DirectDialer()
    inbound = Socks5Inbound(RoutingDialer(load_rules([str(path)]), tunnel, direct),
                            Address("127.0.0.1", 0))
    await inbound.start()
    tunnel.start()
    try:
        def exchange() -> bytes:
            sock, reply = socks_connect(inbound.address.port, "localhost", port)
            with sock:
                assert reply == b"\x05\x00"
                return read_all(sock)

        return await asyncio.to_thread(exchange)
    finally:
        await inbound.close()
        direct.close()
        await tunnel.close()


def test_a_name_without_a_domain_rule_is_resolved_by_the_server(
        module_dir: Path, veil_server: procs.VeilServer, whoami: WhoAmI,
        monkeypatch: pytest.MonkeyPatch) -> None:
    whoami.pids.update(server=veil_server.proc.pid, client=os.getpid())
    spy = ResolverSpy(monkeypatch)
    # An IP rule that localhost's address matches: the server resolves the name (through the
    # tunnel), its address 127.0.0.1 is sent direct, and this host's resolver is never asked.
    answer = asyncio.run(fetch_through("IP-CIDR,127.0.0.1/32,DIRECT\nMATCH,TUNNEL\n",
                                       module_dir, veil_server.key, whoami.port))
    assert answer == b"client"
    assert "localhost" not in spy.names
    # An IP rule its address does not match: resolved by the server all the same, and then
    # tunnelled as a name (the server connects, as before).
    answer = asyncio.run(fetch_through("IP-CIDR,127.0.0.2/32,DIRECT\nMATCH,TUNNEL\n",
                                       module_dir, veil_server.key, whoami.port))
    assert answer == b"server"
    assert "localhost" not in spy.names
    # The positive control: a DIRECT domain rule does resolve here, and the spy sees it.
    answer = asyncio.run(fetch_through("DOMAIN,localhost,DIRECT\nMATCH,TUNNEL\n", module_dir,
                                       veil_server.key, whoami.port))
    assert answer == b"client"
    assert "localhost" in spy.names
    wait_until(lambda: whoami.seen[-3:] == ["client", "server", "client"], IO_TIMEOUT_S,
               lambda: f"the whoami to see all three: {whoami.seen}")


def test_the_tunnel_resolves_only_on_a_server_that_announced_it(
        veil_server: procs.VeilServer) -> None:
    """ClientTunnel.resolve asks the real server; on a session whose server announced no
    FEATURE_RESOLVE (every server before it, which would close the whole session on an OPEN
    of an unknown kind) it sends nothing and answers None, so the name is tunnelled."""

    async def main() -> None:
        tunnel = ClientTunnel(AccessKey.parse(veil_server.key), tls_stack="openssl")
        tunnel.start()
        try:
            answer = await tunnel.resolve("localhost", IO_TIMEOUT_S)
            assert answer is not None and ipaddress.ip_address("127.0.0.1") in answer
            driver = tunnel._pick()
            assert driver is not None and driver.session.peer_features & FEATURE_RESOLVE
            driver.session.peer_features = 0  # what an older server's padding says
            sent_before = driver.session._next_stream_id
            assert await tunnel.resolve("localhost", IO_TIMEOUT_S) is None
            assert driver.session._next_stream_id == sent_before  # no stream was opened
            assert not driver.session.closed
        finally:
            await tunnel.close()

    asyncio.run(main())


# -- direct destinations do not wait for the tunnel ----------------------------------------------

#: How long the inbounds of the next test wait for a tunnel that cannot come (the real default,
#: READY_TIMEOUT, is 15 s); one known to be down fails sooner (listener.FAIL_FAST_S).
TUNNEL_WAIT_S = 2.0
#: A direct stream must be answered well before TUNNEL_WAIT_S: it never needed the tunnel.
DIRECT_AT_ONCE_S = 1.0


def dead_server_key(key: str) -> str:
    """``key`` with its server moved to a loopback port where nothing listens (a stopped
    server: every connection is refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    parsed = AccessKey.parse(key)
    return dataclasses.replace(parsed, server=Address("127.0.0.1", dead_port)).to_uri()


async def with_a_dead_server(directory: Path, key: str, port: int) -> dict[str, object]:
    """SOCKS5 and HTTP inbounds routed by rules (127.0.0.1 direct, the rest tunnelled) in front
    of a tunnel whose server is down; what each stream got, and how long it took."""
    path = directory / "dead-server-rules.txt"
    path.write_text("IP-CIDR,127.0.0.1/32,DIRECT\nMATCH,TUNNEL\n")
    tunnel = ClientTunnel(AccessKey.parse(dead_server_key(key)), tls_stack="openssl")
    direct = DirectDialer()
    dialer = RoutingDialer(load_rules([str(path)]), tunnel, direct)
    socks = Socks5Inbound(dialer, Address("127.0.0.1", 0), ready_timeout=TUNNEL_WAIT_S)
    http = HttpProxyInbound(dialer, Address("127.0.0.1", 0), ready_timeout=TUNNEL_WAIT_S)
    await socks.start()
    await http.start()
    tunnel.start()
    try:
        def exchanges() -> dict[str, object]:
            seen: dict[str, object] = {}
            for host in ("127.0.0.1", "localhost"):
                started = time.monotonic()
                sock, reply = socks_connect(socks.address.port, host, port)
                with sock:
                    seen[f"socks {host}"] = (reply, read_all(sock), time.monotonic() - started)
                started = time.monotonic()
                answer = http_proxy(http.address.port, f"CONNECT {host}:{port} HTTP/1.1\r\n"
                                    f"Host: {host}:{port}\r\n\r\n".encode())
                seen[f"http {host}"] = (answer, time.monotonic() - started)
            return seen

        return await asyncio.to_thread(exchanges)
    finally:
        await socks.close()
        await http.close()
        direct.close()
        await tunnel.close()


def test_direct_destinations_do_not_wait_for_a_stopped_server(
        module_dir: Path, veil_server: procs.VeilServer, whoami: WhoAmI) -> None:
    whoami.pids.update(client=os.getpid())
    seen = asyncio.run(with_a_dead_server(module_dir, veil_server.key, whoami.port))
    reply, body, took = cast(tuple[bytes, bytes, float], seen["socks 127.0.0.1"])
    assert (reply, body) == (b"\x05\x00", b"client") and took < DIRECT_AT_ONCE_S, seen
    answer, took = cast(tuple[bytes, float], seen["http 127.0.0.1"])
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nclient"), seen
    assert took < DIRECT_AT_ONCE_S, seen
    # A tunnelled destination fails, saying why: the server is down ("network unreachable";
    # a 502 whose body is the reason), within the inbound's wait for the tunnel.
    reply, body, took = cast(tuple[bytes, bytes, float], seen["socks localhost"])
    assert (reply, body) == (b"\x05\x03", b"") and took <= TUNNEL_WAIT_S + 1, seen
    answer, took = cast(tuple[bytes, float], seen["http localhost"])
    assert answer.startswith(b"HTTP/1.1 502") and b"cannot reach" in answer, seen
    assert took <= TUNNEL_WAIT_S + 1, seen
