"""Start and stop the real programs tests use: veil itself, nginx, echo servers.

Every process is started by the test, remembered by PID, and killed in a ``finally`` (by
the fixtures), never by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.wait import wait_until

VEIL = [sys.executable, "-m", "veil"]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def unused_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port nothing was bound to a moment ago, for a program that must be told its
    port before it starts: nginx, PostgreSQL, openssl s_server and other third-party
    programs, a key made before its server runs, a server restarted where its clients
    expect it.

    The port is free only when this returns: another process may take it before the program
    binds it. It is picked below the system's ephemeral range, where port-0 binds and
    outgoing connections never land (CI saw a server's port taken by one of the thousands
    of connections the other test worker makes), so only another caller of this function
    could take it: one in thousands of ports. A program that then fails to bind exits at
    once, so callers retry with a new port (:func:`nginx`,
    :func:`start_veil_server_on_a_stated_port`) or fail loudly, never hang.
    Programs that can listen on port 0 and report the port they got (veil serve and its
    admin panel, veil connect's proxies and forwards) do that instead (:func:`bound_port`).
    """
    low, _ = _ephemeral_range()
    for _ in range(100):
        port = _random.randrange(max(1024, low - _BELOW_EPHEMERAL), low)
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, kind) as s:  # that range is full: any free port
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_random = random.SystemRandom()
#: How many ports below the ephemeral range :func:`unused_port` picks from.
_BELOW_EPHEMERAL = 12_000


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0,
              proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts TCP connections on ``host:port`` (and ``proc``, if given,
    is still running)."""
    def accepting() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), 0.2):
                return True
        except OSError:
            return False

    wait_until(accepting, timeout, f"something listening on {host}:{port}")


def bound_port(log: Path, label: str, proc: subprocess.Popen[bytes],
               timeout: float = 15.0) -> int:
    """The port in the first ``<label> HOST:PORT`` line of ``log``: how a program started on
    port 0 says which port it got (``listening on`` and ``admin panel on`` for veil serve,
    ``SOCKS5 proxy on``, ``HTTP proxy on`` and ``TCP forward to DEST on`` for veil connect).
    Fails if ``proc`` exits first."""
    pattern = re.compile(re.escape(label) + r" (?:[a-z]+://)?\[?[0-9a-fA-F.:]+?\]?:(\d+)\b")

    def reported() -> int:
        if found := pattern.search(log.read_text(errors="replace")):
            return int(found.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before reporting {label!r}: "
                               f"{log.read_text(errors='replace')[-2000:]}")
        return 0

    return wait_until(reported, timeout, lambda: f"{label!r} in {log}")


def new_log(workdir: Path, stem: str) -> Path:
    """A log file name not used yet in ``workdir`` (several programs share a directory)."""
    for n in itertools.count(1):
        path = workdir / f"{stem}-{n}.log"
        if not path.exists():
            path.touch()
            return path
    raise AssertionError("unreachable")


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """SIGTERM the process we started, SIGKILL it if it lingers; return its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    return proc.returncode


# What a running server logs (at DEBUG: tests run it with -v) when a reload found the users
# changed (server/live.py): the sign that a change made with the CLI is in force there.
USER_DIRECTORY_LINE = "user directory: "
# A server reloads users every 0.5 s; this leaves room for a loaded machine.
USER_CHANGE_TIMEOUT_S = 10.0


@dataclass
class VeilServer:
    proc: subprocess.Popen[bytes]
    port: int
    state: Path
    key: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def add_user(self, name: str) -> str:
        """``veil user add``; returns the key once this server accepts it."""
        return self._change_users("add", name)

    def revoke(self, name: str) -> None:
        """``veil user revoke``; returns once this server refuses the user."""
        self._change_users("revoke", name)

    def _change_users(self, *command: str) -> str:
        # Counted before the command: a reload that logs while it runs is not missed. Each
        # line is a change this server saw, and the tests make one change at a time.
        before = self.log_text().count(USER_DIRECTORY_LINE)
        out = subprocess.run([*VEIL, "user", *command, "--state", str(self.state)],
                             capture_output=True, text=True, check=True, timeout=30)

        def reloaded() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            return self.log_text().count(USER_DIRECTORY_LINE) > before

        wait_until(reloaded, USER_CHANGE_TIMEOUT_S,
                   lambda: f"the server to reload its users: {self.log_text()[-2000:]}")
        return out.stdout.strip()


def certificate_choice(extra: Sequence[str]) -> list[str]:
    """``--self-signed`` unless the options choose the certificate otherwise: a first start
    on an IP address must say what strangers are shown (veil serve refuses to pick the
    self-signed certificate by itself)."""
    chosen = ("--self-signed", "--acme-directory", "--borrow", "--cert")
    return [] if any(option in extra for option in chosen) else ["--self-signed"]


def start_veil_server(workdir: Path, *extra: str, port: int | None = None,
                      allow_private: bool = True, start_timeout: float = 15.0) -> VeilServer:
    """Start ``veil serve`` on loopback: on ``port`` if given (a restart on the port clients
    know), else on a port the system picks, read back from the server's log.
    ``allow_private`` lets it relay to loopback, where the tests' echo servers are;
    ``start_timeout`` is how long it may take to say it listens (``--workers`` start
    several interpreters)."""
    workdir.mkdir(parents=True, exist_ok=True)
    state = workdir / "state"
    log = new_log(workdir, "server")
    with open(log, "wb") as err:
        proc = subprocess.Popen([*VEIL, "-v", "serve", "--state", str(state), "--listen",
                                 f"127.0.0.1:{port or 0}",
                                 *(["--allow-private"] if allow_private else []),
                                 *certificate_choice(extra), *extra],
                                stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    try:
        # "listening on" is logged once the socket listens: connections from here on queue.
        bound = bound_port(log, "listening on", proc, start_timeout)
        # A first run prints the first user's key before it listens; later runs print nothing.
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        key = proc.stdout.readline().decode().strip() if ready else ""
        if port is None:
            key = _publish_port(state, key, bound)
    except BaseException:
        stop(proc)
        raise
    return VeilServer(proc, bound, state, key, log)


def start_veil_server_on_a_stated_port(workdir: Path, *extra: str,
                                       allow_private: bool = True) -> VeilServer:
    """Start ``veil serve`` told its port in ``--listen`` (as an operator does), for tests of
    what a server says about its port; port 0 would leave it nothing to compare.
    The port comes from :func:`unused_port`, so another process may take it first: a start
    that fails to bind writes no state, and is tried again on another port."""
    for attempt in range(5):
        try:
            return start_veil_server(workdir, *extra, port=unused_port(),
                                     allow_private=allow_private)
        except RuntimeError as error:
            if "Address already in use" not in str(error) or attempt == 4:
                raise
    raise AssertionError("unreachable")


def _publish_port(state: Path, key: str, port: int) -> str:
    """Keys name the address clients dial, recorded at the first run from ``--listen``: a
    first run on port 0 recorded port 0. Record the port the server got instead (what an
    operator does with ``--public``), so that ``veil user add`` hands out working keys, and
    fix the first key the same way."""
    from veil.protocol.accesskey import AccessKey
    from veil.protocol.address import Address

    config_path = state / "config.json"
    config = json.loads(config_path.read_text())
    host, _, recorded = config["public"].rpartition(":")
    if recorded == "0":
        config["public"] = f"{host}:{port}"
        config_path.write_text(json.dumps(config, indent=2))
    if not key.startswith("veil://"):
        return key
    parsed = AccessKey.parse(key)
    if parsed.server.port != 0:
        return key
    return dataclasses.replace(parsed, server=Address(parsed.server.host, port)).to_uri()


@dataclass
class VeilClient:
    proc: subprocess.Popen[bytes]
    socks: int | None
    http: int | None
    log: Path
    #: The local port of each ``--forward`` spec, by the spec as given (read from the log).
    forwards: dict[str, int] = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_veil_client(workdir: Path, key: str, *, socks: bool = True, http: bool = False,
                      forwards: list[str] | None = None, extra: tuple[str, ...] = (),
                      wait: bool = True, env: dict[str, str] | None = None) -> VeilClient:
    """Start ``veil connect``; its proxies listen on ports the system picks, read back from its
    log, and so do ``forwards`` given LPORT 0 (``0:127.0.0.1:7``): the client's ``forwards``
    holds each spec's port. With ``wait`` (the default), return once it is connected to the
    server."""
    args = [*VEIL, "-v", "connect", key]
    if socks:
        args += ["--socks", "127.0.0.1:0"]
    if http:
        args += ["--http", "127.0.0.1:0"]
    for spec in forwards or []:
        args += ["--forward", spec]
    log = new_log(workdir, "client")
    with open(log, "wb") as err:
        proc = subprocess.Popen([*args, *extra], stdout=subprocess.DEVNULL, stderr=err,
                                env=env)
    try:
        # The proxies are listening when the client names them, connected to the server or not.
        socks_port = bound_port(log, "SOCKS5 proxy on", proc) if socks else None
        http_port = bound_port(log, "HTTP proxy on", proc) if http else None
        client = VeilClient(proc, socks_port, http_port, log)
        # Forwards listen (and say so) before the proxies are named.
        for spec in forwards or []:
            client.forwards[spec] = bound_port(log, _forward_label(spec), proc)
        if wait:
            wait_connected(client)
    except BaseException:
        stop(proc)
        raise
    return client


def _forward_label(text: str) -> str:
    """What precedes the bound address in the line veil connect logs for forward ``text``
    (client/forward.py). Two forwards to one destination would share it: tests have none."""
    from veil.config import parse_forward_spec

    spec = parse_forward_spec(text)
    return f"{'UDP' if spec.udp else 'TCP'} forward to {spec.dest} on"


def wait_connected(client: VeilClient, timeout: float = 15.0) -> None:
    """Wait until the client's log says it reached the server; fail if it exits first."""
    def connected() -> bool:
        if "connected to" in client.log_text():
            return True
        if client.proc.poll() is not None:
            raise RuntimeError(f"client exited: {client.log_text()}")
        return False

    wait_until(connected, timeout, lambda: f"the client to connect: {client.log_text()}")


# ------------------------------------------------------------------ nginx
@dataclass
class Nginx:
    proc: subprocess.Popen[bytes]
    http_port: int
    https_port: int
    root: Path
    prefix: Path


#: The top of every nginx.conf the tests write: one foreground process, everything under
#: the test's own prefix directory (nothing of the system's nginx is touched).
NGINX_MAIN = """
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
"""
#: The http block's temporary paths, under the same prefix.
NGINX_TEMP_PATHS = """    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
"""

NGINX_CONF = NGINX_MAIN + """http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log off;
""" + NGINX_TEMP_PATHS + """\
    sendfile on;
    keepalive_timeout {keepalive_timeout}s;
    client_header_timeout {header_timeout}s;
    server {{
        listen 127.0.0.1:{http_port};
        listen 127.0.0.1:{https_port} ssl{http2};
        # As Debian's /etc/nginx/nginx.conf sets them (nginx 1.22's built-in default has no
        # TLS 1.3), so that nginx here is the nginx people run.
        ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;
        ssl_prefer_server_ciphers on;
        ssl_certificate {prefix}/cert.pem;
        ssl_certificate_key {prefix}/key.pem;
        root {root};
        index index.html;
    }}
}}
"""


def make_cert(directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from veil.manage.state import self_signed_certificate

    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed_certificate(key, name)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# Tries at starting nginx on ports that turn out taken (see unused_port) before giving up.
NGINX_BIND_ATTEMPTS = 3


@contextlib.contextmanager
def nginx(root: Path | None = None, header_timeout: int = 60, *, http2: bool = False,
          keepalive_timeout: int = 75) -> Iterator[Nginx]:
    """A throwaway nginx on two loopback ports (plain, TLS); ``http2`` adds ``http2`` to the
    TLS listener (``listen ... ssl http2``, nginx 1.22's syntax), as sites serving browsers
    have it."""
    prefix = Path(tempfile.mkdtemp(prefix="veil-nginx-"))
    if root is None:
        root = prefix / "www"
        root.mkdir()
        (root / "index.html").write_text("<html><body>hello from nginx</body></html>\n")
        (root / "1k.bin").write_bytes(os.urandom(1024))
        (root / "big.bin").write_bytes(os.urandom(8 * 1024 * 1024))
    make_cert(prefix)
    try:
        # nginx takes its ports from its config: if another process took one between
        # unused_port() and nginx's bind, nginx exits at once, and a second pair is tried.
        for attempt in range(NGINX_BIND_ATTEMPTS):
            http_port, https_port = unused_port(), unused_port()
            (prefix / "nginx.conf").write_text(NGINX_CONF.format(
                prefix=prefix, root=root, http_port=http_port, https_port=https_port,
                header_timeout=header_timeout, keepalive_timeout=keepalive_timeout,
                http2=" http2" if http2 else ""))
            proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_port(http_port, proc=proc)
                wait_port(https_port, proc=proc)
                break
            except RuntimeError:
                stop(proc)
                if attempt == NGINX_BIND_ATTEMPTS - 1:
                    raise
        try:
            yield Nginx(proc, http_port, https_port, root, prefix)
        finally:
            stop(proc)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


# ------------------------------------------------------------------ echo servers
class TcpEcho:
    """A threaded TCP echo server that counts the connections it accepted."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_WR)
                    return
                conn.sendall(data)

    def close(self) -> None:
        self._stop = True
        self.sock.close()


class UdpEcho:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
                self.sock.sendto(data, addr)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
