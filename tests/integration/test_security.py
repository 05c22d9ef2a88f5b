"""The client trusts only the pinned server key; the CLI fails with one clear line."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.procs import VeilServer
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow


class InterceptingProxy:
    """A TLS man in the middle with its own certificate for the server's name.

    It completes the handshake with the client and records every plaintext byte the client
    sends afterwards. A client that checks the pinned key must send it nothing.
    """

    def __init__(self, workdir: Path) -> None:
        cert, key = procs.make_cert(workdir, "localhost")
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.received = b""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    tls.settimeout(3)
                    while data := tls.recv(65536):
                        self.received += data
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self.sock.close()


def test_a_tls_interceptor_gets_no_credential(tmp_path: Path, veil_server: VeilServer) -> None:
    from veil.protocol.accesskey import AccessKey
    from veil.protocol.address import Address

    mitm = InterceptingProxy(tmp_path)
    good = AccessKey.parse(veil_server.key)
    diverted = AccessKey(Address("127.0.0.1", mitm.port), good.secret, good.pin, "localhost")
    client = procs.start_veil_client(tmp_path, diverted.to_uri(), wait=False)
    try:
        wait_until(lambda: "pinned key" in client.log_text(), 10,
                   lambda: f"the client to refuse the certificate: {client.log_text()}")
        assert mitm.connections >= 1
        assert mitm.received == b""
        assert good.secret.hex() not in client.log_text()
    finally:
        procs.stop(client.proc)
        mitm.close()


@pytest.mark.parametrize("argv, message", [
    (["connect", "veil://nonsense"], "invalid access key"),
    (["connect", "https://example.com"], "starts with veil://"),
    (["connect", "veil://AAAA@127.0.0.1:1?pin=AAAA"], "wrong secret length"),
    (["connect", "KEY", "--forward", "nope"], "forward"),
    # An open proxy into the tunnel for the whole network, unless --allow-lan says so.
    (["connect", "KEY", "--socks", "0.0.0.0:1080"], "--socks-auth"),
    (["connect", "KEY", "--http", "0.0.0.0:8118"], "--http-auth"),
    (["connect", "KEY", "--forward", "0.0.0.0:2222:example.org:22"], "--allow-lan"),
    (["connect", "KEY", "--http-auth", "nopassword"], "USER:PASSWORD"),
    (["serve", "--listen", "127.0.0.1"], "host:port"),
    (["user", "list", "--state", "/nonexistent/veil-state"], "not an initialised"),
])
def test_bad_input_gives_one_line_and_nonzero_exit(argv: list[str], message: str) -> None:
    if "KEY" in argv:
        from veil.protocol.accesskey import AccessKey
        from veil.protocol.address import Address

        argv[argv.index("KEY")] = AccessKey(Address("127.0.0.1", 1), os.urandom(32),
                                            os.urandom(32)).to_uri()
    out = subprocess.run([*procs.VEIL, *argv], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert message.lower() in out.stderr.lower(), out.stderr
    # One error line (argparse prints the command's usage above it for usage errors).
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message.lower() in errors[0].lower(), out.stderr


def test_help_explains_every_command() -> None:
    for argv in ([], ["serve"], ["user"], ["user", "add"], ["connect"]):
        out = subprocess.run([*procs.VEIL, *argv, "--help"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0
        assert "usage: veil" in out.stdout


def test_user_add_on_a_fresh_dir_needs_public(tmp_path: Path) -> None:
    state = tmp_path / "fresh"
    out = subprocess.run([*procs.VEIL, "user", "add", "bob", "--state", str(state)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "--public" in out.stderr
    out = subprocess.run([*procs.VEIL, "user", "add", "bob", "--state", str(state),
                          "--public", "vpn.example.org:443"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("veil://") and "vpn.example.org:443" in out.stdout
    assert "sni=vpn.example.org" in out.stdout


def test_server_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    server = procs.start_veil_server(tmp_path)
    assert procs.stop(server.proc) == 0


def send_hello(port: int) -> bytes:
    """Send "hello" to a local forward: what comes back first (b"" for a close or reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(10)
        s.sendall(b"hello")
        try:
            return s.recv(100)
        except ConnectionResetError:
            return b""


def test_private_destinations_are_refused_by_default(tmp_path: Path) -> None:
    """Without --allow-private the server relays nothing to its own loopback: the stream is
    reset at once (no hang), the session survives, and the target sees no connection."""
    echo = procs.TcpEcho()
    strict = procs.start_veil_server(tmp_path / "strict", allow_private=False)
    server, key, log = strict.proc, strict.key, strict.log
    try:
        spec = f"0:127.0.0.1:{echo.port}"
        client = procs.start_veil_client(tmp_path, key, socks=False,
                                         forwards=[spec, f"0:localhost:{echo.port}"])
        fwd = client.forwards[spec]
        try:
            for _ in range(3):
                started = time.monotonic()
                assert send_hello(fwd) == b""
                assert time.monotonic() - started < 5
            assert echo.accepted == 0
            assert "refused destination (private or loopback address)" in log.read_text()
            assert "session ended" not in log.read_text()  # one refused stream, not the session
        finally:
            procs.stop(client.proc)
    finally:
        procs.stop(server)
        echo.close()


def test_refused_ports_are_refused_even_with_allow_private(tmp_path: Path) -> None:
    """--refuse-ports (SMTP's 25 by default) refuses a TCP port on every address, before
    any lookup: the stream is reset at once, the target sees no connection, the same
    session still reaches another port, and the log says which option refused it."""
    refused, allowed = procs.TcpEcho(), procs.TcpEcho()
    started = procs.start_veil_server(tmp_path / "srv", "--refuse-ports", f"25,{refused.port}")
    try:
        specs = [f"0:127.0.0.1:{refused.port}", f"0:127.0.0.1:{allowed.port}"]
        client = procs.start_veil_client(tmp_path, started.key, socks=False, forwards=specs)
        try:
            assert send_hello(client.forwards[specs[1]]) == b"hello"
            assert send_hello(client.forwards[specs[0]]) == b""
            assert refused.accepted == 0 and allowed.accepted == 1
            assert f"refused TCP port {refused.port} (--refuse-ports)" in started.log.read_text()
        finally:
            procs.stop(client.proc)
    finally:
        procs.stop(started.proc)
        refused.close()
        allowed.close()
