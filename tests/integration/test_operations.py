"""Running under systemd: readiness and reload notifications (sd_notify), SIGHUP reloads the
certificate and users without dropping sessions, SIGTERM stops cleanly; the unit files pass
systemd's own checker."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support import procs
from tests.support.procs import VEIL, TcpEcho
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "packaging" / "systemd").glob("*.service"))


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket that collects what the service says.
    (The real systemd cannot run here as PID 1; the protocol on the socket is the real one.)"""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))

    def next(self, timeout: float = 15.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def close(self) -> None:
        self.sock.close()


def served_certificate_and_alpn(port: int) -> tuple[int, str | None]:
    """The serial of the certificate served, and the protocol chosen for a browser's ALPN."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
        alpn = tls.selected_alpn_protocol()
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number, alpn


def test_notify_reload_and_stop(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path)
    # A port named up front: the first key names it, and READY must report it. Taken
    # meanwhile, veil exits at once and notify.next() times out: a failure, not a hang.
    port = procs.unused_port()
    echo = TcpEcho()
    log = tmp_path / "server.log"
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path)}
    with open(log, "wb") as err:
        server = subprocess.Popen(
            [*VEIL, "-v", "serve", "--self-signed", "--state", str(tmp_path / "state"), "--listen",
             f"127.0.0.1:{port}", "--allow-private"],
            stdout=subprocess.PIPE, stderr=err, env=env)
    client = None
    try:
        ready = notify.next()
        assert ready["READY"] == "1" and str(port) in ready["STATUS"]
        socket.create_connection(("127.0.0.1", port)).close()  # ready means listening
        assert server.stdout is not None
        key = server.stdout.readline().decode().strip()
        spec = f"0:127.0.0.1:{echo.port}"
        client = procs.start_veil_client(tmp_path, key, socks=False, forwards=[spec])
        forward = client.forwards[spec]
        session = socket.create_connection(("127.0.0.1", forward), timeout=5)
        session.sendall(b"before")
        assert session.recv(16) == b"before"

        # A renewed certificate (same key, new serial) is served after SIGHUP.
        cert_path = tmp_path / "state" / "cert.pem"
        old = x509.load_pem_x509_certificate(cert_path.read_bytes())
        assert served_certificate_and_alpn(port) == (old.serial_number, "h2")
        from veil.manage.state import self_signed_certificate

        key_pem = (tmp_path / "state" / "key.pem").read_bytes()
        private = serialization.load_pem_private_key(key_pem, password=None)
        renewed = self_signed_certificate(private, "127.0.0.1")  # type: ignore[arg-type]
        cert_path.write_bytes(renewed.public_bytes(serialization.Encoding.PEM))
        server.send_signal(signal.SIGHUP)
        assert notify.next()["RELOADING"] == "1"
        assert notify.next()["READY"] == "1"
        # ...with the same ALPN: h2 is still offered after the reload.
        assert served_certificate_and_alpn(port) == (renewed.serial_number, "h2")
        # The session opened before the reload carries on.
        session.sendall(b"after")
        assert session.recv(16) == b"after"
        session.close()
        assert "reloaded the certificate" in log.read_text()

        server.send_signal(signal.SIGTERM)
        assert notify.next()["STOPPING"] == "1"
        assert server.wait(timeout=10) == 0
    finally:
        if client is not None:
            procs.stop(client.proc)
        procs.stop(server)
        notify.close()
        echo.close()


def test_a_failed_reload_keeps_serving(tmp_path: Path) -> None:
    server = procs.start_veil_server(tmp_path)
    try:
        served = served_certificate_and_alpn(server.port)
        (server.state / "key.pem").write_text("not a key")  # never replaced: keys pin it
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload failed" in server.log.read_text(), 10,
                   lambda: f"'reload failed' in the log: {server.log.read_text()[-2000:]}")
        assert served_certificate_and_alpn(server.port) == served
        assert server.proc.poll() is None
    finally:
        procs.stop(server.proc)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian's systemd package)")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_files_pass_systemd_analyze(tmp_path: Path, unit: Path) -> None:
    veil = shutil.which("veil")
    assert veil is not None
    text = unit.read_text()
    assert "Type=notify" in text and "ExecReload=/bin/kill -HUP $MAINPID" in text
    copy = tmp_path / unit.name
    copy.write_text(text.replace("/usr/local/bin/veil", veil))
    checked = subprocess.run(["systemd-analyze", "verify", str(copy)],
                             capture_output=True, text=True, timeout=60)
    problems = [line for line in checked.stderr.splitlines() if unit.name in line]
    assert checked.returncode == 0 and problems == [], checked.stderr


def test_under_systemd_the_first_key_stays_out_of_the_journal(tmp_path: Path) -> None:
    # Without -v, as under systemd, nothing logs the port: it is named up front (taken
    # meanwhile, veil exits at once and wait_port says so).
    port = procs.unused_port()
    env = {**os.environ, "INVOCATION_ID": "0123456789abcdef0123456789abcdef"}
    with open(tmp_path / "out", "wb") as stdout, open(tmp_path / "err", "wb") as stderr:
        proc = subprocess.Popen([*VEIL, "serve", "--self-signed",
                                 "--state", str(tmp_path / "state"),
                                 "--listen", f"127.0.0.1:{port}", "--allow-private"],
                                stdout=stdout, stderr=stderr, env=env)
    try:
        procs.wait_port(port, proc=proc)
    finally:
        procs.stop(proc)
    out, err = (tmp_path / "out").read_bytes(), (tmp_path / "err").read_bytes()
    assert b"veil://" not in out + err
    assert b"veil user show default --state" in err
    shown = subprocess.run([*VEIL, "user", "show", "default", "--state", str(tmp_path / "state")],
                           capture_output=True, text=True, timeout=30, check=True)
    assert shown.stdout.startswith("veil://")


def test_unit_files_grant_only_the_capabilities_they_need() -> None:
    plain, tun = (REPO / "packaging/systemd/veil.service").read_text(), \
        (REPO / "packaging/systemd/veil-tun.service").read_text()
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n" in plain
    settings = [line for line in plain.splitlines() if not line.startswith("#")]
    assert not any("CAP_NET_ADMIN" in line for line in settings)
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_ADMIN\n" in tun
    for text in (plain, tun):
        assert "ProtectSystem=strict" in text and "NoNewPrivileges=yes" in text


def test_a_damaged_self_signed_certificate_is_remade_for_the_same_key(tmp_path: Path) -> None:
    from veil.manage.state import init_state, load_state
    from veil.protocol.address import Address

    state, _ = init_state(tmp_path, listen=Address("127.0.0.1", 443))
    state.cert_path.write_text("damaged")
    again = load_state(tmp_path)
    assert again.pin == state.pin  # every access key still matches
    x509.load_pem_x509_certificate(again.cert_path.read_bytes())
