"""End to end with the real `veil serve` and `veil connect` processes, curl and nginx."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.procs import Nginx, TcpEcho, VeilClient, VeilServer
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", str(timeout), *args],
                          capture_output=True, timeout=timeout + 5)


def test_serve_prints_a_key_and_user_add_prints_one_line(veil_server: VeilServer) -> None:
    assert veil_server.key.startswith("veil://")
    out = subprocess.run([*procs.VEIL, "user", "add", "alice", "--state", str(veil_server.state)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("veil://")


@pytest.mark.smoke
def test_socks5_hostname_to_nginx_over_http_and_https(veil_client: VeilClient,
                                                       nginx: Nginx) -> None:
    socks = f"127.0.0.1:{veil_client.socks}"
    index = (nginx.root / "index.html").read_bytes()
    # "localhost" is resolved by the server, not here: the client leaks no DNS.
    r = curl("--socks5-hostname", socks, f"http://localhost:{nginx.http_port}/")
    assert r.returncode == 0, r.stderr
    assert r.stdout == index
    r = curl("-k", "--socks5-hostname", socks, f"https://localhost:{nginx.https_port}/")
    assert r.returncode == 0, r.stderr
    assert r.stdout == index


@pytest.mark.smoke
def test_http_proxy_plain_and_connect(veil_client: VeilClient, nginx: Nginx) -> None:
    proxy = f"http://127.0.0.1:{veil_client.http}"
    index = (nginx.root / "index.html").read_bytes()
    r = curl("-x", proxy, f"http://127.0.0.1:{nginx.http_port}/")
    assert r.returncode == 0, r.stderr
    assert r.stdout == index
    r = curl("-k", "-x", proxy, f"https://127.0.0.1:{nginx.https_port}/")
    assert r.returncode == 0, r.stderr
    assert r.stdout == index


@pytest.mark.smoke
def test_http_proxy_with_a_password_refuses_requests_without_it(
        module_dir, veil_server: VeilServer, nginx: Nginx) -> None:
    client = procs.start_veil_client(module_dir, veil_server.key, socks=False, http=True,
                                     extra=("--http-auth", "alice:s3cret"))
    try:
        url = f"http://127.0.0.1:{nginx.http_port}/"
        proxy = f"http://127.0.0.1:{client.http}"
        refused = curl("-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x", proxy, url)
        assert refused.stdout == b"407", refused
        wrong = curl("-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x", proxy,
                     "--proxy-user", "alice:wrong", url)
        assert wrong.stdout == b"407", wrong
        good = curl("-x", proxy, "--proxy-user", "alice:s3cret", url)
        assert good.returncode == 0 and good.stdout == (nginx.root / "index.html").read_bytes()
        assert "s3cret" not in client.log_text()
    finally:
        procs.stop(client.proc)


def test_large_download_is_byte_exact(veil_client: VeilClient, nginx: Nginx) -> None:
    r = curl("--socks5-hostname", f"127.0.0.1:{veil_client.socks}",
             f"http://127.0.0.1:{nginx.http_port}/big.bin")
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).digest() == hashlib.sha256(
        (nginx.root / "big.bin").read_bytes()).digest()


def socks5_udp_associate(socks_port: int) -> tuple[socket.socket, tuple[str, int]]:
    ctrl = socket.create_connection(("127.0.0.1", socks_port), timeout=10)
    ctrl.sendall(b"\x05\x01\x00")
    assert ctrl.recv(2) == b"\x05\x00"
    ctrl.sendall(b"\x05\x03\x00\x01" + bytes(4) + bytes(2))
    reply = ctrl.recv(10)
    assert reply[:2] == b"\x05\x00", reply
    relay = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])
    return ctrl, relay


@pytest.mark.smoke
def test_udp_through_socks5_associate(veil_client: VeilClient,
                                      udp_echo: procs.UdpEcho) -> None:
    assert veil_client.socks is not None
    ctrl, relay = socks5_udp_associate(veil_client.socks)
    with ctrl, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(
            "!H", udp_echo.port)
        for size in (1, 100, 1400, 8000):
            payload = os.urandom(size)
            udp.sendto(header + payload, relay)
            data, _ = udp.recvfrom(65536)
            assert data == header + payload


def test_udp_forward(veil_client: VeilClient) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        for i in range(5):
            payload = os.urandom(50 + i * 300)
            udp.sendto(payload, ("127.0.0.1", veil_client.forwards["udp"]))
            assert udp.recvfrom(65536)[0] == payload


def sockets_of(pid: int) -> set[int]:
    """The inodes of the sockets process ``pid`` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed since the listing
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:["):-1]))
    return inodes


def bound_to(port: int, table: str) -> set[int]:
    """The inodes of the sockets bound to local ``port`` in /proc/net/``table`` (for TCP,
    the listening ones)."""
    inodes = set()
    for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
        fields = line.split()  # sl local_address rem_address st ... uid timeout inode
        listening = table == "udp" or fields[3] == "0A"
        if int(fields[1].rpartition(":")[2], 16) == port and listening:
            inodes.add(int(fields[9]))
    return inodes


def test_each_forward_logs_the_port_it_bound(veil_client: VeilClient, tcp_echo: TcpEcho,
                                             udp_echo: procs.UdpEcho) -> None:
    """Both forwards were given LPORT 0: the port each one logs is a socket the client
    holds (and the forward tests here reach the echo servers through it)."""
    log = veil_client.log_text()
    for kind, dest, table in (("TCP", tcp_echo.port, "tcp"), ("UDP", udp_echo.port, "udp")):
        port = veil_client.forwards[table]
        assert f"{kind} forward to 127.0.0.1:{dest} on 127.0.0.1:{port}" in log
        assert bound_to(port, table) & sockets_of(veil_client.proc.pid), (kind, port)


def echo_roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # half-close: the echo still answers
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_100_concurrent_streams_byte_exact(veil_client: VeilClient) -> None:
    payloads = [os.urandom(50_000 + i * 997) for i in range(100)]
    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        results = list(pool.map(lambda p: echo_roundtrip(veil_client.forwards["tcp"], p),
                                payloads))
    assert results == payloads


def test_a_slow_reader_does_not_stall_a_fast_one(veil_client: VeilClient, nginx: Nginx) -> None:
    """One stream whose reader never reads holds its window; another still runs at speed."""
    socks = ("127.0.0.1", veil_client.socks)
    slow = socket.create_connection(socks, timeout=10)
    with slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(b"\x05\x01\x00")
        slow.recv(2)
        slow.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                     + struct.pack("!H", nginx.http_port))
        slow.recv(10)
        for _ in range(4):  # ask for 32 MB and never read it
            slow.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        # Part of the scenario, not a wait for an event: give nginx time to fill the slow
        # stream's window, so the fast transfers below run next to a stream that is stuck.
        time.sleep(0.5)
        started = time.monotonic()
        for _ in range(3):
            r = curl("--socks5-hostname", f"127.0.0.1:{veil_client.socks}",
                     f"http://127.0.0.1:{nginx.http_port}/big.bin", timeout=20)
            assert r.returncode == 0, r.stderr
            assert len(r.stdout) == 8 * 1024 * 1024
        assert time.monotonic() - started < 20


@pytest.mark.smoke
def test_wrong_key_relays_nothing(module_dir, veil_server: VeilServer) -> None:
    from veil.protocol.accesskey import AccessKey

    echo = TcpEcho()
    good = AccessKey.parse(veil_server.key)
    forged = AccessKey(good.server, os.urandom(32), good.pin, good.sni, "mallory").to_uri()
    spec = f"0:127.0.0.1:{echo.port}"
    client = procs.start_veil_client(module_dir, forged, socks=False, forwards=[spec],
                                     wait=False)
    port = client.forwards[spec]  # logged once it listens
    try:
        wait_until(lambda: "refused the key" in client.log_text(), 10,
                   lambda: f"the server to refuse the key: {client.log_text()}")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(3)
            try:
                s.sendall(b"hello")
                data = s.recv(100)
            except OSError:
                data = b""
        assert data == b""
        assert echo.accepted == 0
    finally:
        procs.stop(client.proc)
        echo.close()


def test_revoked_user_gets_the_cover_site(module_dir, veil_server: VeilServer) -> None:
    echo = TcpEcho()
    key = veil_server.add_user("leaver")
    spec = f"0:127.0.0.1:{echo.port}"
    client = procs.start_veil_client(module_dir, key, socks=False, forwards=[spec])
    try:
        assert echo_roundtrip(client.forwards[spec], b"before") == b"before"
        veil_server.revoke("leaver")
        procs.stop(client.proc)
        accepted = echo.accepted
        client = procs.start_veil_client(module_dir, key, socks=False, forwards=[spec],
                                         wait=False)
        port = client.forwards[spec]  # logged once it listens
        wait_until(lambda: "refused the key" in client.log_text(), 10,
                   lambda: f"the server to refuse the key: {client.log_text()}")
        try:
            got = echo_roundtrip(port, b"after")
        except OSError:
            got = b""
        assert got == b""
        assert echo.accepted == accepted
    finally:
        procs.stop(client.proc)
        echo.close()


def test_no_secret_in_any_log(veil_server: VeilServer, veil_client: VeilClient,
                              nginx: Nginx) -> None:
    r = curl("--socks5-hostname", f"127.0.0.1:{veil_client.socks}",
             f"http://localhost:{nginx.http_port}/")
    assert r.returncode == 0
    secret = veil_server.key.split("://", 1)[1].split("@", 1)[0]
    logs = veil_server.log.read_text() + veil_client.log_text()
    assert "session started" in logs  # the logs are real, and verbose (-v)
    assert secret not in logs
    assert "localhost" not in veil_server.log.read_text()  # nor where users went


def test_forward_keeps_data_and_eof_sent_before_the_tunnel_is_up(tmp_path,
                                                                 tcp_echo: TcpEcho) -> None:
    """`printf x | nc` while the server is still down: bytes and FIN arrive long before the
    session exists; once the server is up they are delivered and the answer comes back."""
    server_port = procs.unused_port()
    state = tmp_path / "state"  # where start_veil_server will find it
    key = subprocess.run([*procs.VEIL, "user", "add", "early", "--state", str(state),
                          "--public", f"127.0.0.1:{server_port}"], capture_output=True,
                         text=True, check=True, timeout=30).stdout.strip()
    spec = f"0:127.0.0.1:{tcp_echo.port}"
    client = procs.start_veil_client(tmp_path, key, socks=False, forwards=[spec], wait=False)
    port = client.forwards[spec]  # logged once it listens
    server = None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"early bird")
            s.shutdown(socket.SHUT_WR)  # the bytes and the FIN are in; the server is not up yet
            server = procs.start_veil_server(tmp_path, port=server_port)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        assert b"".join(chunks) == b"early bird"
    finally:
        procs.stop(client.proc)
        if server is not None:
            procs.stop(server.proc)
