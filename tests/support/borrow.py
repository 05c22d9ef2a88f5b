"""A borrowed identity's pieces for tests: the target site (a real nginx with TLS 1.3, h2 and a
certificate from a test CA), a browser-shaped TLS 1.3 client on veil's own stack, and the
naive borrowed server the lab must catch (the positive control).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import random
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.support import procs
from tests.support.relay import RecordingRelay
from tests.support.wait import wait_until_async
from veil.lab import borrowed
from veil.lab.flow import Flow
from veil.protocol.address import Address
from veil.server import clienthello
from veil.server.gate import _peek_client_hello
from veil.transport.tls import start_tls_server
from veil.transport.tls13 import HandshakeComplete, TlsClient

#: The name the target's certificate is for (and the SNI its visitors send).
TARGET_NAME = "www.example.test"
#: The session id the naive server takes for "one of mine" (it has no authenticator).
NAIVE_MARK = b"naive-borrowed-mark-32-bytes...."
#: How long a test waits for a handshake on loopback, under CI's load.
HANDSHAKE_WAIT_S = 10.0


@dataclass
class Target:
    """The borrowed site: nginx on loopback, its CA and its certificate."""

    proc: subprocess.Popen[bytes]
    port: int
    ca_pem: bytes
    cert_der: bytes
    prefix: Path


def _rsa_chain(prefix: Path, name: str) -> tuple[bytes, bytes]:
    """A test CA and a leaf for ``name`` signed by it, written for nginx; (CA PEM, leaf DER).

    RSA, so that every handshake's CertificateVerify has one size (an ECDSA signature's DER
    varies by a byte or two between handshakes: the lab tolerates it, but exact is clearer)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "veil test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (prefix / "cert.pem").write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    (prefix / "key.pem").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca.public_bytes(pem), leaf.public_bytes(serialization.Encoding.DER)


@contextlib.contextmanager
def target_nginx(header_timeout: int = 60) -> Iterator[Target]:
    """nginx 1.22 serving ``TARGET_NAME`` over TLS 1.3 with h2, as a site to borrow
    (``header_timeout``: its client_header_timeout, which also bounds its wait for a
    ClientHello)."""
    prefix = Path(tempfile.mkdtemp(prefix="veil-target-"))
    root = prefix / "www"
    root.mkdir()
    (root / "index.html").write_text("<html><body>the borrowed site</body></html>\n")
    try:
        ca_pem, cert_der = _rsa_chain(prefix, TARGET_NAME)
        for attempt in range(procs.NGINX_BIND_ATTEMPTS):
            http_port, https_port = procs.unused_port(), procs.unused_port()
            (prefix / "nginx.conf").write_text(procs.NGINX_CONF.format(
                prefix=prefix, root=root, http_port=http_port, https_port=https_port,
                header_timeout=header_timeout, keepalive_timeout=75, http2=" http2"))
            proc = subprocess.Popen([procs.NGINX, "-p", str(prefix), "-c",
                                     str(prefix / "nginx.conf")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                procs.wait_port(https_port, proc=proc)
                break
            except RuntimeError:
                procs.stop(proc)
                if attempt == procs.NGINX_BIND_ATTEMPTS - 1:
                    raise
        try:
            yield Target(proc, https_port, ca_pem, cert_der, prefix)
        finally:
            procs.stop(proc)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


class MarkedRandom(random.Random):
    """A ClientHello's randomness with a fixed session id (the second value drawn), so the
    naive server can tell 'its' clients."""

    def __init__(self, mark: bytes) -> None:
        super().__init__()
        self._mark = mark
        self._draws = 0

    def randbytes(self, n: int) -> bytes:
        self._draws += 1
        if self._draws == 2 and n == len(self._mark):
            return self._mark
        return super().randbytes(n)


async def tls13_handshake(port: int, *, host: str = TARGET_NAME,
                          client: TlsClient | None = None,
                          ) -> tuple[TlsClient, asyncio.StreamReader, asyncio.StreamWriter]:
    """A Chrome-shaped TLS 1.3 handshake (veil's own client) to ``port``; the caller closes
    the writer."""
    tls = client or TlsClient(host)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        tls.connect()
        writer.write(tls.data_to_send())
        async with asyncio.timeout(HANDSHAKE_WAIT_S):
            while True:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("closed during the handshake")
                tls.receive_data(data)
                writer.write(tls.data_to_send())
                while (event := tls.next_event()) is not None:
                    if isinstance(event, HandshakeComplete):
                        return tls, reader, writer
    except BaseException:
        writer.close()
        raise


class NaiveBorrowedServer:
    """The positive control: relays strangers to the target untouched, but serves 'its own'
    clients (a ClientHello whose session id is ``NAIVE_MARK``) with its own OpenSSL handshake
    and certificate, and keeps no memory of hellos it accepted (a replay is accepted)."""

    def __init__(self, target_port: int, cert_dir: Path) -> None:
        self.target_port = target_port
        cert, key = procs.make_cert(cert_dir, TARGET_NAME)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.set_alpn_protocols(["h2", "http/1.1"])
        self.accepted = 0
        self.port = 0
        self._listener: socket.socket | None = None
        self._serve: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._transports: list[asyncio.BaseTransport] = []

    async def start(self) -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._serve = asyncio.get_running_loop().create_task(self._accept())

    async def close(self) -> None:
        if self._serve is not None:
            self._serve.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._serve
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        for transport in self._transports:
            transport.abort()
        if self._listener is not None:
            self._listener.close()

    async def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            task = loop.create_task(self._handle(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, sock: socket.socket) -> None:
        try:
            record = await _peek_client_hello(sock, HANDSHAKE_WAIT_S)
            if _session_id(record) == NAIVE_MARK:
                self.accepted += 1
                transport = await start_tls_server(sock, self.context, asyncio.Protocol,
                                                   HANDSHAKE_WAIT_S)
                self._transports.append(transport)
                return
            await self._relay(sock)
        except asyncio.CancelledError:
            sock.close()
            raise
        except (OSError, TimeoutError, ConnectionError):
            sock.close()

    async def _relay(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._transports += [writer.transport, up_writer.transport]
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        writer.close()
        up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
        if writer.can_write_eof():
            writer.write_eof()


def _session_id(record: bytes) -> bytes | None:
    """The legacy_session_id of a ClientHello record."""
    start = clienthello.RECORD_HEADER + 4 + 2 + 32
    if len(record) <= start:
        return None
    return record[start + 1:start + 1 + record[start]]


def post_records(flow: Flow) -> int:
    shape = borrowed.flow_shape(flow)
    return len(shape.post_handshake or ()) if shape is not None else 0


async def recorded_handshake(port: int, client: TlsClient,
                             post: int = borrowed.POST_HANDSHAKE_RECORDS,
                             then: Callable[[TlsClient], bytes] | None = None) -> Flow:
    """One Chrome-shaped handshake to ``port`` through a recording relay, kept open until
    ``post`` records came after the client's Finished (nginx: two tickets, its SETTINGS);
    ``then`` gives what the client sends after its Finished."""
    relay = RecordingRelay(Address("127.0.0.1", port), 0.0)
    await relay.start()
    try:
        tls, _reader, writer = await tls13_handshake(relay.port, client=client)
        try:
            if then is not None:
                writer.write(tls.send(then(tls)))
            flow = relay.flows[0]
            await wait_until_async(lambda: post_records(flow) >= post, HANDSHAKE_WAIT_S,
                                   lambda: f"{post} post-handshake records: "
                                           f"{borrowed.flow_shape(flow)}")
        finally:
            writer.close()
    finally:
        await relay.close()
    return flow
