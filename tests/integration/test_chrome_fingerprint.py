"""veil's ClientHello against a real browser's: Debian's ``chromium``, captured on this machine.

Chromium runs headless against a plain TCP listener that records the first bytes it receives
(its ClientHello) and closes; veil's client is captured the same way. They must have equal JA4
and the same cipher suites, extensions, groups, signature algorithms, ALPN and extension
bodies: only random values, GREASE values, key shares, the ECH GREASE payload and the
(shuffled) extension order may differ. A HelloRetryRequest is compared too, through a relay
to ``openssl s_server -groups P-256`` that records what the client sends.

This test fails when Chromium is upgraded and changes its ClientHello — by design: then
``src/veil/transport/tls13/profile.py`` needs the new release's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.wait import wait_until
from tests.unit.tls13_support import ParsedHello, ja4, parse_client_hello
from veil.transport.browser_tls import open_browser_tls_connection
from veil.transport.tls import TlsHandshakeError
from veil.transport.tls13.wire import ExtensionType, is_grease

pytestmark = pytest.mark.slow

E = ExtensionType
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NAME = "veil.test"  # mapped to 127.0.0.1 by --host-resolver-rules
CAPTURE_TIMEOUT = 30.0


def need_chromium() -> str:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (scripts/install-deps installs it)")
    return CHROMIUM


# ---------------------------------------------------------------------- capturing
class Recorder:
    """A loopback listener; each accepted connection's client bytes are recorded. Without an
    upstream it closes once a whole ClientHello arrived; with one it relays both ways."""

    def __init__(self, upstream: int | None = None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.upstream = upstream
        self.streams: list[bytearray] = []
        self.done: list[bytearray] = []  # streams with a whole hello (or ended), in order
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            record = bytearray()
            self.streams.append(record)
            thread = threading.Thread(target=self._serve, args=(conn, record), daemon=True)
            thread.start()

    def _serve(self, conn: socket.socket, record: bytearray) -> None:
        conn.settimeout(CAPTURE_TIMEOUT)
        if self.upstream is None:
            with contextlib.suppress(OSError):
                while not _has_hello(record):
                    data = conn.recv(65536)
                    if not data:
                        break
                    record += data
            self.done.append(record)
            with contextlib.suppress(OSError):
                conn.close()
            return
        # Connect upstream only once the client has spoken: s_server serves one connection at
        # a time, and a connection a browser opens and leaves silent (a preconnect) would hold
        # it while the connection that does the handshake waits in its backlog.
        try:
            first = conn.recv(65536)
        except OSError:
            first = b""
        if not first:
            self.done.append(record)
            return
        record += first
        up = socket.create_connection(("127.0.0.1", self.upstream))
        self._conns.append(up)
        up.sendall(first)

        def downstream() -> None:
            with contextlib.suppress(OSError):
                while data := up.recv(65536):
                    conn.sendall(data)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)

        threading.Thread(target=downstream, daemon=True).start()
        marked = False
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                record += data
                up.sendall(data)
                if len(record) > 4096 and not marked:
                    marked = True
                    self.done.append(record)
        if not marked:
            self.done.append(record)

    def wait(self, timeout: float = CAPTURE_TIMEOUT, hellos: int = 1) -> bytes:
        """The first connection's bytes that carried something (browsers also open
        connections that they close unused). With ``hellos=2`` (an upstream that sends a
        HelloRetryRequest): the first connection that has sent two whole ClientHellos,
        waited for by content, not by time or by the connection's end (a loaded CI machine
        can take seconds, and a browser may keep the connection open)."""
        if hellos > 1:
            ready = wait_until(
                lambda: [s for s in list(self.streams) if _client_hellos(s) >= hellos],
                timeout, lambda: f"a connection that sent {hellos} ClientHellos (seen: "
                f"{[(len(s), _client_hellos(s)) for s in self.streams]} as (bytes, hellos))",
                poll=0.02)
            return bytes(ready[0])
        done = wait_until(lambda: [s for s in self.done if s], timeout,
                          "a connection with data", poll=0.02)
        if self.upstream is not None:
            # The rest of the flight (records after the upstream's answer) has no end marker
            # to wait for: the recording keeps growing for this long.
            time.sleep(0.5)
        return bytes(done[0])

    def close(self) -> None:
        self.sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()


def _client_hellos(data: bytearray) -> int:
    """Whole ClientHello messages in the handshake records at the start of ``data``
    (change_cipher_spec records between them are skipped)."""
    body, pos, count = b"", 0, 0
    while pos + 5 <= len(data) and data[pos] in (20, 22):
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if pos + 5 + length > len(data):
            break
        if data[pos] == 22:
            body += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        while len(body) >= 4 and len(body) >= 4 + int.from_bytes(body[1:4], "big"):
            count += body[0] == 1
            body = body[4 + int.from_bytes(body[1:4], "big"):]
    return count


def _has_hello(data: bytearray) -> bool:
    body = b""
    pos = 0
    while pos + 5 <= len(data):
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if pos + 5 + length > len(data):
            return False
        body += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(body) >= 4 and len(body) >= 4 + int.from_bytes(body[1:4], "big"):
            return True
    return False


@contextlib.contextmanager
def recorder(upstream: int | None = None) -> Iterator[Recorder]:
    rec = Recorder(upstream)
    try:
        yield rec
    finally:
        rec.close()


def capture_chromium(rec: Recorder, host: str, hellos: int = 1) -> bytes:
    """Run headless Chromium against the recorder; return its first connection's bytes."""
    chromium = need_chromium()
    profile = tempfile.mkdtemp(prefix="veil-chromium-")
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            f"--host-resolver-rules=MAP {NAME} 127.0.0.1", f"https://{host}:{rec.port}/"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        return rec.wait(hellos=hellos)
    finally:
        # Chromium's own process group (start_new_session): its renderer and network
        # children go with it, and nothing else.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def capture_veil(rec: Recorder, host: str, hellos: int = 1) -> bytes:
    async def main() -> None:
        with contextlib.suppress(TlsHandshakeError, TimeoutError, OSError):
            transport = await open_browser_tls_connection(
                "127.0.0.1", rec.port, asyncio.Protocol, server_hostname=host,
                handshake_timeout=CAPTURE_TIMEOUT)  # generous: CI's two cores are busy
            await asyncio.sleep(0.3)  # the scenario: a client that stays a moment, then goes
            transport.close()

    asyncio.run(main())
    return rec.wait(hellos=hellos)


# ---------------------------------------------------------------------- comparing
def normalized(values: list[int]) -> list[int | str]:
    return ["GREASE" if is_grease(v) else v for v in values]


def ech_shape(body: bytes) -> tuple[bytes, int, int]:
    """(outer type + suite, enc length, payload length) of an ECH extension."""
    enc_len = int.from_bytes(body[6:8], "big")
    payload_len = int.from_bytes(body[8 + enc_len : 10 + enc_len], "big")
    assert len(body) == 10 + enc_len + payload_len
    return body[:5], enc_len, payload_len


# Extensions whose body is the same on every connection of the same browser.
FIXED_BODIES = (E.SERVER_NAME, E.EXTENDED_MASTER_SECRET, E.RENEGOTIATION_INFO,
                E.EC_POINT_FORMATS, E.SESSION_TICKET, E.ALPN, E.STATUS_REQUEST,
                E.SIGNED_CERTIFICATE_TIMESTAMP, E.PSK_KEY_EXCHANGE_MODES,
                E.COMPRESS_CERTIFICATE, E.APPLICATION_SETTINGS, E.APPLICATION_SETTINGS_OLD,
                E.TRUST_ANCHORS)


def differences(chrome: ParsedHello, veil: ParsedHello) -> list[str]:
    """Everything that tells the two hellos apart, beyond what may differ."""
    out = []

    def check(what: str, a: object, b: object) -> None:
        if a != b:
            out.append(f"{what}: chromium {a!r} != veil {b!r}")

    check("JA4", ja4(chrome), ja4(veil))
    check("record version", chrome.record_version, veil.record_version)
    check("legacy version", chrome.legacy_version, veil.legacy_version)
    check("session id length", len(chrome.session_id), len(veil.session_id))
    check("cipher suites", normalized(chrome.cipher_suites), normalized(veil.cipher_suites))
    check("compression", chrome.compression, veil.compression)
    check("extension set", sorted(map(str, normalized(chrome.extension_types))),
          sorted(map(str, normalized(veil.extension_types))))
    check("first extension", normalized(chrome.extension_types[:1]),
          normalized(veil.extension_types[:1]))
    check("last extension", normalized(chrome.extension_types[-1:]),
          normalized(veil.extension_types[-1:]))
    grease_bodies = [[b for t, b in h.extensions if is_grease(t)] for h in (chrome, veil)]
    check("GREASE extension bodies", *grease_bodies)
    check("supported groups", normalized(chrome.supported_groups),
          normalized(veil.supported_groups))
    check("supported versions", normalized(chrome.supported_versions),
          normalized(veil.supported_versions))
    check("key share groups and sizes",
          [(normalized([g])[0], len(k)) for g, k in chrome.key_shares],
          [(normalized([g])[0], len(k)) for g, k in veil.key_shares])
    check("signature algorithms", normalized(chrome.signature_algorithms),
          normalized(veil.signature_algorithms))
    check("ALPN", chrome.alpn, veil.alpn)
    for ext_type in FIXED_BODIES:
        check(f"extension {ext_type:#06x} body", chrome.ext(ext_type), veil.ext(ext_type))
    chrome_ech, veil_ech = chrome.ext(E.ENCRYPTED_CLIENT_HELLO), veil.ext(E.ENCRYPTED_CLIENT_HELLO)
    check("ECH present", chrome_ech is None, veil_ech is None)
    if chrome_ech and veil_ech:
        check("ECH outer type, suite and enc length", ech_shape(chrome_ech)[:2],
              ech_shape(veil_ech)[:2])
        payload_lens = (144, 176, 208, 240)
        check("ECH payload length in Chrome's set", ech_shape(chrome_ech)[2] in payload_lens,
              ech_shape(veil_ech)[2] in payload_lens)
    # Whatever is left: the hello lengths, once the ECH payload (random length) is set aside.
    check("hello length without the ECH payload",
          _length(chrome) - (ech_shape(chrome_ech)[2] if chrome_ech else 0),
          _length(veil) - (ech_shape(veil_ech)[2] if veil_ech else 0))
    return out


def _length(hello: ParsedHello) -> int:
    return sum(4 + len(b) for _, b in hello.extensions)


# ---------------------------------------------------------------------- the tests
@pytest.mark.parametrize("host", [NAME, "127.0.0.1"], ids=["sni", "ip-literal"])
def test_veil_hello_matches_chromium(host: str) -> None:
    need_chromium()
    with recorder() as rec:
        chrome, _ = parse_client_hello(capture_chromium(rec, host))
    with recorder() as rec:
        veil, _ = parse_client_hello(capture_veil(rec, host))
    assert chrome.server_name == (NAME if host == NAME else None)
    assert veil.server_name == chrome.server_name
    assert differences(chrome, veil) == []
    assert ja4(veil) == ja4(chrome)
    try:  # the censor lab's own JA4, where the lab has it
        from veil.lab.fingerprint import ja4 as lab_ja4
        from veil.lab.tls import parse_client_hello as lab_parse
    except ImportError:
        return
    with recorder() as rec:
        raw = capture_veil(rec, host)
    lab_hello = lab_parse(raw[9:])  # the handshake body: no record or message header
    if lab_hello is not None:
        assert str(lab_ja4(lab_hello)) == ja4(chrome)


def test_extension_order_is_shuffled_like_chromium() -> None:
    """Chromium shuffles its extensions per connection, between a GREASE extension that is
    always first and one that is always last; so does veil."""
    orders = set()
    for _ in range(3):
        with recorder() as rec:
            hello, _ = parse_client_hello(capture_veil(rec, NAME))
        orders.add(tuple(normalized(hello.extension_types)))
    assert len(orders) == 3
    for order in orders:
        assert order[0] == "GREASE" and order[-1] == "GREASE"


@contextlib.contextmanager
def p256_only_tls_server(cert: Path, key: Path) -> Iterator[int]:
    """A TLS server (Python's OpenSSL) whose only group is P-256, so a client offering
    X25519 first gets a HelloRetryRequest; each connection in a thread of its own, so a
    connection a browser opens and leaves idle holds nothing up (``openssl s_server``
    serves one at a time, which made this test time out inside the whole suite)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_ecdh_curve("prime256v1")  # OpenSSL 3: the groups list, TLS 1.3 included
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    conns: list[socket.socket] = []

    def handshake(conn: socket.socket) -> None:
        conn.settimeout(CAPTURE_TIMEOUT)
        with contextlib.suppress(OSError, ssl.SSLError), \
                context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conns.append(conn)
            threading.Thread(target=handshake, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.close()


def test_hello_retry_matches_chromium(tmp_path: Path) -> None:
    """A server that only has P-256 makes both ask again; the second flights must agree
    (change_cipher_spec placement, second hello, record versions)."""
    need_chromium()
    cert, key = procs.make_cert(tmp_path)
    flights = {}
    for who, capture in (("chromium", capture_chromium), ("veil", capture_veil)):
        with p256_only_tls_server(cert, key) as port, recorder(upstream=port) as rec:
            flights[who] = capture(rec, NAME, hellos=2)
    shapes = {}
    for who, data in flights.items():
        first, used = parse_client_hello(data)
        rest = data[used:]
        ccs = rest.startswith(b"\x14\x03\x03\x00\x01\x01")
        rest = rest[6:] if ccs else rest
        second, used2 = parse_client_hello(rest)
        if who == "veil":  # then its Finished, encrypted (Chromium rejects the certificate)
            assert rest[used2 : used2 + 3] == b"\x17\x03\x03"
        shapes[who] = {
            "ccs before the second hello": ccs,
            "second hello record version": second.record_version,
            "second hello key shares": [(normalized([g])[0], len(k))
                                        for g, k in second.key_shares],
            "same random and session id": (first.random, first.session_id) == (
                second.random, second.session_id),
            "same extension order": [t for t in second.extension_types if t != E.COOKIE]
            == first.extension_types,
            "same ECH": first.ext(E.ENCRYPTED_CLIENT_HELLO)
            == second.ext(E.ENCRYPTED_CLIENT_HELLO),
            "differences": differences(first, second),
        }
    assert shapes["veil"] == shapes["chromium"]
