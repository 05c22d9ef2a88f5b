"""TLS-level probes for comparing veil's gate with nginx: what a prober reads in one or two
connections below HTTP - the records a server sends back to a ClientHello however it is
framed or mangled, its alerts, its session tickets, and whether it resumes.

A probe's answer is reduced to its *shape*: the sequence of records (content type, length;
alerts in clear as level and description; handshake messages in clear by type and length),
how the connection ended (FIN, RST, still open) and its timing class (at once or after a
wait). Random values (the server random, key shares, ticket bytes) differ between any two
connections of one server, but their lengths and positions do not.

ClientHellos are OpenSSL's own (captured from :mod:`ssl` through memory BIOs), taken apart
into fields (:class:`Hello`) so a test can change one thing and send the rest as a real
client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from tests.support import procs
from tests.support.biotls import bio_handshake
from tests.support.strangers import NoUsers, never_accept
from veil.cover.backends import BuiltinCover
from veil.cover.generate import SiteSeed, generate_site, write_site
from veil.manage.state import server_ssl_context
from veil.server.gate import Authenticator, Gate, VeilWayIn

HANDSHAKE, ALERT, CHANGE_CIPHER_SPEC, APPLICATION_DATA = 22, 21, 20, 23
CLIENT_HELLO, SERVER_HELLO, NEW_SESSION_TICKET, ENCRYPTED_EXTENSIONS = 1, 2, 4, 8
SERVER_KEY_EXCHANGE = 12
# An ECDSA signature (DER) varies in length for P-256, differing between any two handshakes
# of one server: the messages that carry one (TLS 1.2's ServerKeyExchange, TLS 1.3's
# CertificateVerify in its record: 4 + 2 + 2 + signature + 1 + 16) are shown without their
# length, and the test certificates are P-256: a DER signature is 6 bytes plus r and s of
# 33 bytes (top bit set), 32, or fewer (leading zero bytes: 1 in 256 each, and a 69-byte
# signature did turn up in CI), so anything from 64 to 72 bytes.
ECDSA_SIGNED = "ecdsa-signed"
TLS13_CERTIFICATE_VERIFY = range(4 + 2 + 2 + 64 + 1 + 16, 4 + 2 + 2 + 72 + 1 + 16 + 1)
# ServerHello.random of a HelloRetryRequest (RFC 8446 4.1.3).
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")

EXT_SERVER_NAME, EXT_SUPPORTED_GROUPS, EXT_SUPPORTED_VERSIONS = 0, 10, 43
EXT_PRE_SHARED_KEY, EXT_EARLY_DATA, EXT_KEY_SHARE = 41, 42, 51
EXT_PSK_KEY_EXCHANGE_MODES = 45

# How long a probe waits for more from the server before calling the connection open: the
# servers answer a ClientHello within milliseconds on loopback.
OPEN_WAIT = 0.8
# A close or an answer later than this after the last byte sent is "late" (a timeout's), one
# earlier is "at once": nginx's own timeouts here are seconds, loopback jitter is
# milliseconds on a quiet machine and a few hundred on two busy shared cores.
AT_ONCE = 0.4
# After a handshake, how long to read what a server sends on its own (tickets, an h2
# preface) before the next probe step: both send it within milliseconds on loopback.
SETTLE = 0.3
# The comparison fixture's header timeout (nginx's client_header_timeout), short so a
# handshake left unfinished ends within a test.
HEADER_TIMEOUT = 2


# ------------------------------------------------------------------ ClientHellos
@dataclass(frozen=True)
class Hello:
    """A ClientHello's fields, as sent; :meth:`message` puts them back together."""

    legacy_version: int
    random: bytes
    session_id: bytes
    ciphers: tuple[int, ...]
    compression: bytes
    extensions: tuple[tuple[int, bytes], ...]

    @classmethod
    def parse(cls, message: bytes) -> Hello:
        assert message[0] == CLIENT_HELLO
        body = message[4 : 4 + int.from_bytes(message[1:4], "big")]
        version, rnd = struct.unpack_from("!H", body)[0], body[2:34]
        p = 34
        sid = body[p + 1 : p + 1 + body[p]]
        p += 1 + body[p]
        n = struct.unpack_from("!H", body, p)[0]
        ciphers = struct.unpack_from(f"!{n // 2}H", body, p + 2)
        p += 2 + n
        comp = body[p + 1 : p + 1 + body[p]]
        p += 1 + body[p]
        end = p + 2 + struct.unpack_from("!H", body, p)[0]
        p += 2
        exts = []
        while p < end:
            kind, size = struct.unpack_from("!HH", body, p)
            exts.append((kind, body[p + 4 : p + 4 + size]))
            p += 4 + size
        return cls(version, rnd, sid, ciphers, comp, tuple(exts))

    def message(self) -> bytes:
        exts = b"".join(struct.pack("!HH", k, len(d)) + d for k, d in self.extensions)
        body = (struct.pack("!H", self.legacy_version) + self.random
                + bytes([len(self.session_id)]) + self.session_id
                + struct.pack("!H", 2 * len(self.ciphers))
                + struct.pack(f"!{len(self.ciphers)}H", *self.ciphers)
                + bytes([len(self.compression)]) + self.compression
                + struct.pack("!H", len(exts)) + exts)
        return bytes([CLIENT_HELLO]) + len(body).to_bytes(3, "big") + body

    def extension(self, kind: int) -> bytes | None:
        return next((d for k, d in self.extensions if k == kind), None)

    def with_extension(self, kind: int, data: bytes | None) -> Hello:
        """The extension ``kind`` replaced (in place), added (before pre_shared_key, which
        must stay last) or, with None, removed."""
        exts = [(k, d) for k, d in self.extensions if k != kind or data is not None]
        if data is not None:
            if any(k == kind for k, _ in exts):
                exts = [(k, data if k == kind else d) for k, d in exts]
            else:
                at = next((i for i, (k, _) in enumerate(exts) if k == EXT_PRE_SHARED_KEY),
                          len(exts))
                exts.insert(at, (kind, data))
        return replace(self, extensions=tuple(exts))


def client_context(*, maximum: ssl.TLSVersion | None = None,
                   minimum: ssl.TLSVersion | None = None,
                   alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        context.maximum_version = maximum
    if minimum is not None:
        context.minimum_version = minimum
    context.set_alpn_protocols(alpn if alpn is not None else ["h2", "http/1.1"])
    return context


def openssl_hello(context: ssl.SSLContext | None = None, sni: str | None = "localhost",
                  session: ssl.SSLSession | None = None) -> Hello:
    """The ClientHello OpenSSL sends with ``context`` (by default: TLS 1.2 and 1.3, ALPN
    h2 and http/1.1, SNI localhost, as a browser's offers)."""
    tls = (context or client_context()).wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(),
                                                 server_hostname=sni, session=session)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    data = out.read()
    assert data[0] == HANDSHAKE
    return Hello.parse(data[5 : 5 + struct.unpack_from("!H", data, 3)[0]])


def records(message: bytes, sizes: list[int] | None = None, *,
            version: bytes = b"\x03\x01", content_type: int = HANDSHAKE) -> bytes:
    """``message`` in TLS records of the given fragment sizes (the last takes the rest)."""
    out, p = b"", 0
    for size in [*(sizes or []), len(message)]:
        chunk = message[p : p + size]
        if not chunk:
            break
        out += bytes([content_type]) + version + struct.pack("!H", len(chunk)) + chunk
        p += len(chunk)
    return out


# ------------------------------------------------------------------ answers
@dataclass(frozen=True)
class Answer:
    """What a prober reads: the records' shape, the close, and when things happened."""

    shape: tuple[tuple[Any, ...], ...]
    close: str  # FIN, RST or open
    timing: str  # "at once" or "late": when the last thing the server did came


def shape(data: bytes) -> tuple[tuple[Any, ...], ...]:
    """Records in clear to their meaning, encrypted ones to (type, length); a partial record
    at the end as ("partial", bytes). A ServerHello shows as SH or HRR with the extension
    types it carries, its cipher suite and the version it chose."""
    out: list[tuple[Any, ...]] = []
    p = 0
    encrypted = False
    while p + 5 <= len(data):
        kind, size = data[p], struct.unpack_from("!H", data, p + 3)[0]
        body = data[p + 5 : p + 5 + size]
        if len(body) < size:
            break
        version = data[p + 1 : p + 3].hex()
        if kind == ALERT and not encrypted and size == 2:
            out.append(("alert", version, body[0], body[1]))
        elif kind == HANDSHAKE and not encrypted and body[:1] == bytes([SERVER_HELLO]):
            out.append(("hello", version, *_server_hello(body)))
            # After a TLS 1.3 ServerHello (not an HRR) everything but CCS is encrypted.
            encrypted = out[-1][2] == "SH" and out[-1][-1] == 0x0304
        elif kind == HANDSHAKE and not encrypted:
            out.append(("handshake", version, tuple(_messages(body))))
        elif kind == CHANGE_CIPHER_SPEC:
            out.append(("ccs", version, size))
        elif encrypted and kind == APPLICATION_DATA and size in TLS13_CERTIFICATE_VERIFY:
            out.append(("record", kind, version, ECDSA_SIGNED))
        else:
            out.append(("record", kind, version, size))
        p += 5 + size
    if p < len(data):
        out.append(("partial", len(data) - p))
    return tuple(out)


def _messages(body: bytes) -> Iterator[tuple[int, int | str]]:
    p = 0
    while p + 4 <= len(body):
        size = int.from_bytes(body[p + 1 : p + 4], "big")
        yield body[p], ECDSA_SIGNED if body[p] == SERVER_KEY_EXCHANGE else size
        p += 4 + size


def _server_hello(body: bytes) -> tuple[Any, ...]:
    msg = body[4 : 4 + int.from_bytes(body[1:4], "big")]
    rnd = msg[2:34]
    p = 34
    sid_len = msg[p]
    p += 1 + sid_len
    suite = struct.unpack_from("!H", msg, p)[0]
    p += 3
    exts: list[int] = []
    chosen = struct.unpack_from("!H", msg)[0]
    if p + 2 <= len(msg):
        end = p + 2 + struct.unpack_from("!H", msg, p)[0]
        p += 2
        while p + 4 <= end:
            kind, size = struct.unpack_from("!HH", msg, p)
            exts.append(kind)
            if kind == EXT_SUPPORTED_VERSIONS:
                chosen = struct.unpack_from("!H", msg, p + 4)[0]
            p += 4 + size
    others = [(kind, size) for kind, size in _messages(body)][1:]
    return ("HRR" if rnd == HRR_RANDOM else "SH", 4 + len(msg), sid_len, hex(suite),
            tuple(exts), tuple(others), chosen)


def send_and_watch(port: int, sends: list[tuple[float, bytes]], *,
                   wait: float = OPEN_WAIT) -> tuple[bytes, str, float]:
    """Send each chunk at its time (seconds from connecting) on a fresh connection; read until
    the server closes or has been quiet for ``wait`` after the last send. (bytes read, the
    close, seconds from the last send to the server's last act: its last bytes or close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _send_and_watch(s, sends, wait)


def _send_and_watch(s: socket.socket, sends: list[tuple[float, bytes]],
                    wait: float) -> tuple[bytes, str, float]:
    data = b""
    t0 = time.monotonic()
    last_send = t0
    last_act = t0
    pending = list(sends)
    close = "open"
    while True:
        now = time.monotonic()
        while pending and t0 + pending[0][0] <= now:
            try:
                s.sendall(pending.pop(0)[1])
            except OSError:
                close = "RST"
                pending.clear()
            last_send = time.monotonic()
        if close != "open":
            break
        quiet_since = max(last_send, last_act)
        if not pending and now - quiet_since > wait:
            break
        timeout = min(0.02, wait) if pending else wait - (now - quiet_since)
        readable, _, _ = select.select([s], [], [], max(timeout, 0.0))
        if not readable:
            continue
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            close = "RST"
            last_act = time.monotonic()
            break
        last_act = time.monotonic()
        if not chunk:
            close = "FIN"
            break
        data += chunk
    return data, close, max(last_act - last_send, 0.0)


def answer(port: int, sends: list[tuple[float, bytes]], *, wait: float = OPEN_WAIT) -> Answer:
    """The shape of what ``sends`` draw from the server on a fresh connection."""
    return _answer(*send_and_watch(port, sends, wait=wait))


def _watch(s: socket.socket, sends: list[tuple[float, bytes]], wait: float) -> Answer:
    return _answer(*_send_and_watch(s, sends, wait))


def _answer(data: bytes, close: str, after: float) -> Answer:
    timing = "-" if close == "open" else "at once" if after < AT_ONCE else "late"
    return Answer(shape(data), close, timing)


def after_handshake(port: int, context: ssl.SSLContext, request: bytes,
                    mangle: Callable[[bytes], bytes], *, wait: float = OPEN_WAIT) -> Answer:
    """A complete handshake, then ``request`` as one application record changed by
    ``mangle``: what the server sends after it (what it sent on its own before it - tickets,
    an h2 preface - is read first and left out) and how it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        tls, _incoming, outgoing = bio_handshake(s, context)
        s.sendall(outgoing.read())
        s.settimeout(SETTLE)
        with contextlib.suppress(TimeoutError):
            while s.recv(65536):
                pass
        tls.write(request)
        mangled = mangle(outgoing.read())
        s.setblocking(True)
        return _watch(s, [(0, mangled)], wait)


# ------------------------------------------------------------------ full handshakes
@dataclass
class Ticket:
    lifetime: int
    age_add_present: bool
    nonce_length: int
    ticket_length: int
    extensions: tuple[int, ...]


@dataclass
class Handshake:
    """A completed client handshake: what was chosen and the tickets that came after it."""

    version: str | None
    cipher: str | None
    alpn: str | None
    reused: bool
    tickets: list[Ticket] = field(default_factory=list)
    tls12_ticket_hints: list[int] = field(default_factory=list)
    server_hello_extensions: tuple[int, ...] = ()
    encrypted_extensions: tuple[int, ...] = ()
    session: ssl.SSLSession | None = None


def handshake(port: int, context: ssl.SSLContext, *, session: ssl.SSLSession | None = None,
              sni: str | None = "localhost", linger: float = 0.3) -> Handshake:
    """A full handshake through memory BIOs, then ``linger`` seconds of reading for the
    session tickets a server sends after it. The context's message callback (set here,
    on a context of the caller's) records every handshake message in clear."""
    seen: list[tuple[str, int, bytes]] = []

    def observe(_conn: Any, direction: str, _version: Any, content_type: Any,
                msg_type: Any, data: bytes) -> None:
        if content_type == ssl._TLSContentType.HANDSHAKE:  # type: ignore[attr-defined]
            seen.append((direction, int(msg_type), bytes(data)))

    context._msg_callback = observe  # type: ignore[attr-defined]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        tls, incoming, outgoing = bio_handshake(s, context, sni, session)
        s.sendall(outgoing.read())
        s.settimeout(linger)
        with contextlib.suppress(TimeoutError):
            while chunk := s.recv(65536):
                incoming.write(chunk)
                with contextlib.suppress(ssl.SSLWantReadError):
                    tls.read(65536)
    context._msg_callback = None  # type: ignore[attr-defined]
    out = Handshake(tls.version(), (tls.cipher() or (None,))[0],
                    tls.selected_alpn_protocol(), tls.session_reused, session=tls.session)
    for direction, kind, data in seen:
        if direction != "read":
            continue
        body = data[4:]
        if kind == SERVER_HELLO:
            out.server_hello_extensions = tuple(_server_hello(data)[4])
        elif kind == ENCRYPTED_EXTENSIONS:
            out.encrypted_extensions = tuple(_extension_types(body, 0))
        elif kind == NEW_SESSION_TICKET and tls.version() == "TLSv1.3":
            out.tickets.append(_ticket13(body))
        elif kind == NEW_SESSION_TICKET:
            out.tls12_ticket_hints.append(struct.unpack_from("!I", body)[0])
    return out


def _extension_types(body: bytes, p: int) -> list[int]:
    """The types of the extension block (two-byte length, then the extensions) at ``p``."""
    end = p + 2 + struct.unpack_from("!H", body, p)[0]
    p += 2
    exts = []
    while p + 4 <= end:
        kind, size = struct.unpack_from("!HH", body, p)
        exts.append(kind)
        p += 4 + size
    return exts


def _ticket13(body: bytes) -> Ticket:
    lifetime, age_add = struct.unpack_from("!II", body)
    p = 8
    nonce = body[p]
    p += 1 + nonce
    ticket = struct.unpack_from("!H", body, p)[0]
    p += 2 + ticket
    exts = _extension_types(body, p)
    # age_add is random: "present" means the field is there, which a TLS 1.3 ticket's
    # always is; zero would be a server that does not obfuscate ticket ages.
    return Ticket(lifetime, age_add != 0, nonce, ticket, tuple(exts))


# ------------------------------------------------------------------ the two servers
@dataclass
class Pair:
    nginx: int
    veil: int






@contextlib.contextmanager
def nginx_and_gate(seed: SiteSeed) -> Iterator[Pair]:
    """A real nginx 1.22 (``procs.nginx``, ``listen ... ssl http2``, Debian's ssl_protocols)
    and veil's real gate with ``veil serve``'s TLS settings (:func:`server_ssl_context` with
    the built-in cover's ALPN), on the same certificate and key."""
    root = Path(tempfile.mkdtemp(prefix="veil-tls-site-"))
    write_site(generate_site(seed), root)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    listener = socket.socket()
    task: asyncio.Task[None] | None = None
    gate: Gate | None = None
    try:
        with procs.nginx(root, header_timeout=HEADER_TIMEOUT, http2=True) as nginx:
            state = cast(Any, SimpleNamespace(cert_path=nginx.prefix / "cert.pem",
                                              key_path=nginx.prefix / "key.pem"))
            cover = BuiltinCover(seed, header_timeout=HEADER_TIMEOUT)
            users = cast(Any, NoUsers())
            gate = Gate(ssl_context=server_ssl_context(state, cover.alpn_protocols),
                        cover=cover, ways_in=(VeilWayIn(Authenticator(users), never_accept),),
                        handshake_timeout=HEADER_TIMEOUT)
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            listener.setblocking(False)

            async def start(g: Gate = gate) -> asyncio.Task[None]:
                return asyncio.get_running_loop().create_task(g.serve(listener))

            task = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
            yield Pair(nginx.https_port, listener.getsockname()[1])
    finally:
        async def stop() -> None:
            if task is not None:
                task.cancel()
            if gate is not None:
                gate.close()
            await asyncio.sleep(0.05)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        listener.close()
        shutil.rmtree(root, ignore_errors=True)
