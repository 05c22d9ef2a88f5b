"""The HTTP/2 cover against a real nginx 1.22 with ``listen ... ssl http2``, frame by frame.

A throwaway nginx (``procs.nginx(http2=True)``, killed by its PID) serves the built-in site;
veil's real :class:`~veil.server.gate.Gate` (TLS by ``transport/tls.py``, the veil and Trojan
ways in, the built-in cover) serves it from a loop in a background thread, with the same TLS
settings as ``veil serve`` (``server_ssl_context`` with the cover's ALPN list). Every probe is
sent to both over TLS with ALPN ``h2,http/1.1`` and the answers must be equal:

* the TLS records (each ``SSL_read`` returns one record), each as its list of frames: type,
  flags, stream, and the payload - SETTINGS values in order, GOAWAY codes and stream ids,
  DATA bytes, and header blocks as the list of their HPACK representations, byte for byte,
  with only the ``date`` value blanked;
* how the connection ends: FIN or RST or still open, close_notify or not, and whether a byte
  sent after the FIN draws RST (a plain close) or not (a lingering close).

nginx's timeouts are shortened (client_header_timeout 2s, keepalive_timeout 3s) and the
cover gets the same values.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import select
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

hpack = pytest.importorskip("hpack")

from tests.support import procs  # noqa: E402
from tests.support.biotls import bio_handshake  # noqa: E402
from tests.support.strangers import NoUsers, OneSubscription, never_accept  # noqa: E402
from veil.cover.backends import BuiltinCover, UrlCover  # noqa: E402
from veil.cover.generate import SiteSeed, generate_site, write_site  # noqa: E402
from veil.cover.http2 import CLIENT_PREFACE, SERVER_PREFACE  # noqa: E402
from veil.cover.nginx import http_date  # noqa: E402
from veil.cover.site import SiteFile  # noqa: E402
from veil.manage.state import server_ssl_context  # noqa: E402
from veil.server.gate import GREETING_GRACE_S, Authenticator, Gate, VeilWayIn  # noqa: E402
from veil.server.trojan import TrojanWayIn  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.exists(procs.NGINX),
                                reason="needs nginx 1.22 (apt-get install nginx)")

# One install's generated site, written to a directory nginx serves: both serve identical
# files. An install whose site has the pages the probes name (installs differ in which).
TEST_SEED = next(seed for seed in (SiteSeed(bytes([i]) * 32, 1_760_000_000) for i in range(256))
                 if {"about.html", "style.css", "robots.txt"} <= generate_site(seed).keys())
SITE_FILES = generate_site(TEST_SEED)
ROBOTS_ETAG = SiteFile(SITE_FILES["robots.txt"].body, b"text/plain",
                       SITE_FILES["robots.txt"].mtime).etag.decode()
INDEX_DATE = http_date(SITE_FILES["index.html"].mtime).decode()
INDEX_DATE_PLUS_1 = http_date(SITE_FILES["index.html"].mtime + 1).decode()

HEADER_TIMEOUT = 2
KEEPALIVE_TIMEOUT = 3
# How long a probe waits for more from the server before calling the connection "open".
OPEN_WAIT = 0.6
# Timing probes: how long to watch, and how far apart the two servers' events may be.
WATCH = 4.5
SLACK = 0.4

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = range(9)
CONTINUATION = 9


# ---------------------------------------------------------------------- servers


@dataclass
class Servers:
    nginx: int
    veil: int
    url_cover_veil: int
    veil_without_trojan: int  # the built-in cover behind veil's way in alone


def _site_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="veil-h2-site-"))
    write_site(SITE_FILES, root)
    return root




@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def servers(request: pytest.FixtureRequest) -> Iterator[Servers]:
    """nginx, and veil's gate on asyncio's own loop and on uvloop (veil's default)."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        new_loop = asyncio.new_event_loop
    root = _site_root()
    certs = Path(tempfile.mkdtemp(prefix="veil-h2-cert-"))
    cert, key = procs.make_cert(certs)
    state = cast(Any, SimpleNamespace(cert_path=cert, key_path=key))
    loop = new_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cover = BuiltinCover(TEST_SEED, header_timeout=HEADER_TIMEOUT,
                         keepalive_timeout=KEEPALIVE_TIMEOUT)
    cover.site.responder = OneSubscription()  # what it does not answer must stay nginx's
    users = cast(Any, NoUsers())
    ways_in = (VeilWayIn(Authenticator(users), never_accept), TrojanWayIn(users, never_accept))
    url_cover = UrlCover("http://127.0.0.1:9")
    gates = [Gate(ssl_context=server_ssl_context(state, c.alpn_protocols), cover=c,
                  ways_in=w) for c, w in ((cover, ways_in), (url_cover, ways_in),
                                          (cover, ways_in[:1]))]
    listeners: list[socket.socket] = []
    tasks = []
    for gate in gates:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        listeners.append(sock)

        async def start(g: Gate = gate, s: socket.socket = sock) -> asyncio.Task[None]:
            return asyncio.get_running_loop().create_task(g.serve(s))

        tasks.append(asyncio.run_coroutine_threadsafe(start(), loop).result(5))
    try:
        with procs.nginx(root, header_timeout=HEADER_TIMEOUT, http2=True,
                         keepalive_timeout=KEEPALIVE_TIMEOUT) as nginx:
            yield Servers(nginx.https_port, *(sock.getsockname()[1] for sock in listeners))
    finally:
        async def stop() -> None:
            for task in tasks:
                task.cancel()
            for gate in gates:
                gate.close()
            await asyncio.sleep(0.05)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        for sock in listeners:
            sock.close()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(certs, ignore_errors=True)


# ---------------------------------------------------------------------- the client
def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + sid.to_bytes(4, "big") \
        + payload


SETTINGS_EMPTY = frame(SETTINGS, 0, 0)


class Client:
    """Builds request frames with one HPACK encoder per connection, as a client does."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()

    def headers(self, sid: int, fields: list[tuple[str, str]], *, end_stream: bool = True,
                flags: int = 0x4) -> bytes:
        return frame(HEADERS, flags | (1 if end_stream else 0), sid,
                     self.encoder.encode(fields))

    def block(self, fields: list[tuple[str, str]]) -> bytes:
        return cast(bytes, self.encoder.encode(fields))


def get(path: str = "/", method: str = "GET",
        extra: tuple[tuple[str, str], ...] = ()) -> list[tuple[str, str]]:
    return [(":method", method), (":path", path), (":scheme", "https"),
            (":authority", "localhost"), *extra]


CHROME_UA = ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like "
                           "Gecko) Chrome/120.0.0.0 Safari/537.36")
_CLIENT_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
_CLIENT_TLS.check_hostname = False
_CLIENT_TLS.verify_mode = ssl.CERT_NONE
_CLIENT_TLS.set_alpn_protocols(["h2", "http/1.1"])

Sends = list[tuple[float, bytes]]
# Markers in a probe's sends: half-close the TCP connection; send TLS close_notify.
HALF_CLOSE = b""
CLOSE_NOTIFY = b"\0close_notify\0"


@dataclass
class Outcome:
    alpn: str | None
    records: list[list[tuple[Any, ...]]] = field(default_factory=list)
    close: str = "open"
    notify: str = ""
    after: str = ""
    times: list[tuple[str, float]] = field(default_factory=list)

    def same_as(self, other: Outcome, timed: bool) -> bool:
        if (self.alpn, self.records, self.close, self.notify, self.after) != (
                other.alpn, other.records, other.close, other.notify, other.after):
            return False
        if not timed:
            return True
        return [k for k, _ in self.times] == [k for k, _ in other.times] and all(
            abs(a - b) < SLACK for (_, a), (_, b) in zip(self.times, other.times, strict=True))


def _representations(block: bytes, decoder: Any) -> tuple[Any, ...]:
    """The HPACK representations of a header block, raw, with the date value blanked."""
    fields = decoder.decode(block, raw=True)
    out: list[Any] = []
    p = 0
    i = 0
    while p < len(block):
        start = p
        first = block[p]
        if first & 0x80:
            p = _int_end(block, p)
        elif first & 0xE0 == 0x20:
            p = _int_end(block, p)
            out.append(block[start:p])
            continue
        else:
            index, p = _int(block, p, 6 if first & 0x40 else 4)
            for _ in range(2 if index == 0 else 1):
                length, p = _int(block, p, 7)
                p += length
        name = fields[i][0]
        out.append(b"<date>" if name == b"date" else block[start:p])
        i += 1
    return (tuple(out), tuple((n, b"-" if n == b"date" else v) for n, v in fields))


def _int(data: bytes, p: int, bits: int) -> tuple[int, int]:
    limit = (1 << bits) - 1
    value = data[p] & limit
    p += 1
    if value < limit:
        return value, p
    shift = 0
    while True:
        byte = data[p]
        p += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, p


def _int_end(data: bytes, p: int) -> int:
    return _int(data, p, 7 if data[p] & 0x80 else 5)[1]


def _frames(record: bytes, decoder: Any, partial: bytearray) -> list[tuple[Any, ...]]:
    partial += record
    out: list[tuple[Any, ...]] = []
    while len(partial) >= 9:
        length = int.from_bytes(partial[:3], "big")
        if len(partial) < 9 + length:
            break
        kind, flags = partial[3], partial[4]
        sid = int.from_bytes(partial[5:9], "big")
        payload = bytes(partial[9:9 + length])
        del partial[:9 + length]
        body: Any = payload
        if kind == HEADERS:
            body = _representations(payload, decoder)
        elif kind == SETTINGS:
            body = [(int.from_bytes(payload[i:i + 2], "big"),
                     int.from_bytes(payload[i + 2:i + 6], "big"))
                    for i in range(0, len(payload), 6)]
        out.append((kind, flags, sid, body))
    return out


def probe(port: int, sends: Sends, *, wait: float = OPEN_WAIT, coalesce: bool = True,
          alpn: list[str] | None = None) -> Outcome:
    """Connect, send each chunk at its time (a chunk at 0 goes with the client's Finished,
    as browsers send their preface), record every TLS record and the close."""
    context = _CLIENT_TLS
    if alpn is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(5)
        tls, incoming, outgoing = bio_handshake(s, context)
        pending = list(sends)
        if pending and pending[0][0] == 0 and coalesce:
            tls.write(pending.pop(0)[1])
        s.sendall(outgoing.read())
        t0 = time.monotonic()
        outcome = Outcome(tls.selected_alpn_protocol())
        decoder = hpack.Decoder()
        decoder.max_header_list_size = 1 << 30
        partial = bytearray()
        last = (pending[-1][0] if pending else 0) + wait
        s.setblocking(False)
        while time.monotonic() - t0 < last:
            now = time.monotonic() - t0
            while pending and pending[0][0] <= now:
                chunk = pending.pop(0)[1]
                with contextlib.suppress(OSError, ssl.SSLError):
                    if chunk == HALF_CLOSE:
                        s.shutdown(socket.SHUT_WR)
                        continue
                    if chunk == CLOSE_NOTIFY:
                        with contextlib.suppress(ssl.SSLWantReadError):
                            tls.unwrap()
                    else:
                        tls.write(chunk)
                    s.sendall(outgoing.read())
            readable, _, _ = select.select([s], [], [], 0.01)
            if not readable:
                continue
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                outcome.close = "RST"
                outcome.times.append(("RST", now))
                break
            if not chunk:
                outcome.close = "FIN"
                outcome.times.append(("FIN", now))
                break
            incoming.write(chunk)
            while True:
                try:
                    record = tls.read(1 << 20)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    outcome.notify = "close_notify"
                    break
                if not record:
                    break
                frames = _frames(record, decoder, partial)
                outcome.records.append(frames)
                outcome.times.append((f"record {[f[0] for f in frames]}", now))
        if outcome.close == "FIN":
            outcome.after = _poke(s)
    return outcome


def _poke(s: socket.socket) -> str:
    """After the server's FIN: does sending draw RST (closed) or not (lingering)?"""
    s.setblocking(True)
    try:
        # The probe itself: a closed peer answers the first send with RST, which the next
        # send reports; the pause lets that answer cross loopback (there is no event for it).
        s.send(b"x")
        time.sleep(0.05)
        s.send(b"y")
        time.sleep(0.05)
        s.send(b"z")
    except (ConnectionResetError, BrokenPipeError):
        return "RST"
    return "no RST"


# ---------------------------------------------------------------------- probes
P = CLIENT_PREFACE + SETTINGS_EMPTY

ProbeFactory = Callable[[Client], Sends]
PROBES: dict[str, ProbeFactory] = {
    "get_root": lambda c: [(0, P + c.headers(1, get()))],
    "get_missing": lambda c: [(0, P + c.headers(1, get("/missing")))],
    "get_missing_chrome": lambda c: [(0, P + c.headers(1, get("/x", extra=(CHROME_UA,))))],
    "head": lambda c: [(0, P + c.headers(1, get(method="HEAD")))],
    "head_missing": lambda c: [(0, P + c.headers(1, get("/x", method="HEAD")))],
    "post": lambda c: [(0, P + c.headers(1, get(method="POST")))],
    "post_body": lambda c: [(0, P + c.headers(1, get(method="POST", extra=(
        ("content-length", "3"),)), end_stream=False) + frame(DATA, 1, 1, b"abc"))],
    "get_body": lambda c: [(0, P + c.headers(1, get(extra=(("content-length", "3"),)),
                                             end_stream=False) + frame(DATA, 1, 1, b"abc"))],
    "body_never_sent": lambda c: [(0, P + c.headers(1, get(method="POST"), end_stream=False))],
    "put": lambda c: [(0, P + c.headers(1, get(method="PUT")))],
    "trace": lambda c: [(0, P + c.headers(1, get(method="TRACE")))],
    "two_streams": lambda c: [(0, P + c.headers(1, get()) + c.headers(3, get("/robots.txt")))],
    "concurrent_streams": lambda c: [(0, P + b"".join(
        c.headers(sid, get(path)) for sid, path in zip(
            range(1, 40, 2), ["/", "/x", "/style.css", "/robots.txt", "/about.html"] * 4,
            strict=False)))],
    "second_request_later": lambda c: [(0, P + c.headers(1, get())),
                                       (0.2, c.headers(3, get("/robots.txt")))],
    "no_client_settings": lambda c: [(0, CLIENT_PREFACE + c.headers(1, get()))],
    "huge_header": lambda c: [(0, P + c.headers(1, get(extra=(("x-pad", "a" * 20000),))))],
    "header_8000": lambda c: [(0, P + c.headers(1, get(extra=(("x-pad", "a" * 8000),))))],
    "headers_40k": lambda c: [(0, P + c.headers(1, get(extra=tuple(
        (f"x-pad{i}", "a" * 7000) for i in range(6)))))],
    "http1_request": lambda c: [(0, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")],
    "garbage_after_preface": lambda c: [(0, CLIENT_PREFACE + b"\x00" * 30)],
    "garbage_instead_of_preface": lambda c: [(0, os.urandom(40))],
    "wrong_preface_tail": lambda c: [(0, CLIENT_PREFACE[:16] + b"XXXXXXXX")],
    "settings_bad_length": lambda c: [(0, CLIENT_PREFACE + frame(SETTINGS, 0, 0, b"\0\0\0"))],
    "settings_small_frame_size": lambda c: [(0, CLIENT_PREFACE + frame(
        SETTINGS, 0, 0, bytes.fromhex("000500001000")))],
    "settings_table_size": lambda c: [(0, CLIENT_PREFACE + frame(SETTINGS, 0, 0, bytes.fromhex(
        "000100010000000200000000")) + c.headers(1, get()))],
    "window_update_zero": lambda c: [(0, P + frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\0"))],
    "small_window": lambda c: [(0, CLIENT_PREFACE + frame(SETTINGS, 0, 0, bytes.fromhex(
        "000400000100")) + c.headers(1, get()))],
    "small_window_then_update": lambda c: [
        (0, CLIENT_PREFACE + frame(SETTINGS, 0, 0, bytes.fromhex("000400000100"))
         + c.headers(1, get())),
        (0.2, frame(WINDOW_UPDATE, 0, 1, (100000).to_bytes(4, "big")))],
    "uppercase_header": lambda c: [(0, P + c.headers(1, get(extra=(("X-Up", "1"),))))],
    "even_stream": lambda c: [(0, P + c.headers(2, get()))],
    "no_path": lambda c: [(0, P + c.headers(1, [(":method", "GET"), (":scheme", "https"),
                                                (":authority", "a")]))],
    "no_authority": lambda c: [(0, P + c.headers(1, [(":method", "GET"), (":path", "/"),
                                                     (":scheme", "https")]))],
    "host_header": lambda c: [(0, P + c.headers(1, [(":method", "GET"), (":path", "/"),
                                                    (":scheme", "https"), ("host", "a")]))],
    "path_without_slash": lambda c: [(0, P + c.headers(1, get("index.html")))],
    "path_dotdot": lambda c: [(0, P + c.headers(1, get("/../robots.txt")))],
    "path_query": lambda c: [(0, P + c.headers(1, get("/robots.txt?a=1")))],
    "lowercase_method": lambda c: [(0, P + c.headers(1, get(method="get")))],
    "connection_header": lambda c: [(0, P + c.headers(1, get(extra=(("connection", "close"),))))],
    "if_modified_since": lambda c: [(0, P + c.headers(1, get(extra=(
        ("if-modified-since", INDEX_DATE),))))],
    "range": lambda c: [(0, P + c.headers(1, get("/robots.txt", extra=(
        ("range", "bytes=0-3"),))))],
    "ping": lambda c: [(0, P + frame(PING, 0, 0, b"12345678"))],
    "goaway_from_client": lambda c: [(0, P + frame(GOAWAY, 0, 0, bytes(8)))],
    "rst_from_client": lambda c: [(0, P + frame(RST_STREAM, 0, 1, bytes(4)))],
    "priority": lambda c: [(0, P + frame(PRIORITY, 0, 1, bytes.fromhex("0000000010"))
                            + c.headers(1, get()))],
    "headers_with_priority": lambda c: [(0, P + frame(
        HEADERS, 0x25, 1, bytes.fromhex("00000000ff") + c.block(get())))],
    "continuation": lambda c: (lambda b: [(0, P + frame(HEADERS, 0, 1, b[:10])
                                           + frame(CONTINUATION, 4, 1, b[10:]))])(
        c.block(get())),
    "data_on_idle_stream": lambda c: [(0, P + frame(DATA, 1, 1, b"abc"))],
    "unknown_frame_type": lambda c: [(0, P + frame(0x20, 0, 0, b"xyz") + c.headers(1, get()))],
    "push_promise": lambda c: [(0, P + frame(PUSH_PROMISE, 4, 1, bytes(4)))],
    "settings_ack_from_client": lambda c: [(0, P + frame(SETTINGS, 1, 0))],
    "settings_ack_with_payload": lambda c: [(0, P + frame(SETTINGS, 1, 0, bytes(6)))],
    "settings_on_stream": lambda c: [(0, P + frame(SETTINGS, 0, 1))],
    "settings_huge_window": lambda c: [(0, CLIENT_PREFACE + frame(
        SETTINGS, 0, 0, bytes.fromhex("000480000000")))],
    "settings_push_2": lambda c: [(0, CLIENT_PREFACE + frame(
        SETTINGS, 0, 0, bytes.fromhex("000200000002")))],
    "settings_frame_size_too_big": lambda c: [(0, CLIENT_PREFACE + frame(
        SETTINGS, 0, 0, bytes.fromhex("000501000000")))],
    "settings_unknown_id": lambda c: [(0, CLIENT_PREFACE + frame(
        SETTINGS, 0, 0, bytes.fromhex("00ff00000001")) + c.headers(1, get()))],
    "ping_short": lambda c: [(0, P + frame(PING, 0, 0, b"1234"))],
    "ping_on_stream": lambda c: [(0, P + frame(PING, 0, 1, bytes(8)))],
    "ping_ack_from_client": lambda c: [(0, P + frame(PING, 1, 0, bytes(8)))],
    "pings": lambda c: [(0, P + b"".join(frame(PING, 0, 0, bytes([i]) * 8) for i in range(20)))],
    "window_update_short": lambda c: [(0, P + frame(WINDOW_UPDATE, 0, 0, b"\0\0\1"))],
    "window_update_overflow": lambda c: [(0, P + frame(WINDOW_UPDATE, 0, 0,
                                                       (0x7FFFFFFF).to_bytes(4, "big")))],
    "window_update_idle_stream": lambda c: [(0, P + frame(WINDOW_UPDATE, 0, 7, b"\0\0\1\0"))],
    "window_update_zero_stream": lambda c: [(0, P + frame(WINDOW_UPDATE, 0, 7, b"\0\0\0\0"))],
    "rst_on_stream_0": lambda c: [(0, P + frame(RST_STREAM, 0, 0, bytes(4)))],
    "rst_short": lambda c: [(0, P + frame(RST_STREAM, 0, 1, bytes(3)))],
    "priority_short": lambda c: [(0, P + frame(PRIORITY, 0, 1, bytes(4)))],
    "priority_on_stream_0": lambda c: [(0, P + frame(PRIORITY, 0, 0, bytes(5)))],
    "priority_self_dependency": lambda c: [(0, P + frame(PRIORITY, 0, 1,
                                                         bytes.fromhex("0000000110")))],
    "goaway_on_stream": lambda c: [(0, P + frame(GOAWAY, 0, 1, bytes(8)))],
    "goaway_short": lambda c: [(0, P + frame(GOAWAY, 0, 0, bytes(4)))],
    "continuation_alone": lambda c: [(0, P + frame(CONTINUATION, 4, 1, c.block(get())))],
    "continuation_interrupted": lambda c: (lambda b: [(0, P + frame(HEADERS, 0, 1, b[:10])
                                                       + frame(PING, 0, 0, bytes(8))
                                                       + frame(CONTINUATION, 4, 1, b[10:]))])(
        c.block(get())),
    "headers_stream_reused": lambda c: [(0, P + c.headers(3, get()) + c.headers(1, get()))],
    "headers_stream_0": lambda c: [(0, P + c.headers(0, get()))],
    "headers_padded": lambda c: [(0, P + frame(HEADERS, 0xD, 1, b"\x04" + c.block(get())
                                               + bytes(4)))],
    "headers_overpadded": lambda c: [(0, P + frame(HEADERS, 0xD, 1, b"\xff" + c.block(get())))],
    "hpack_garbage": lambda c: [(0, P + frame(HEADERS, 5, 1, b"\xff\xff\xff\xff\x7f"))],
    "hpack_bad_index": lambda c: [(0, P + frame(HEADERS, 5, 1, b"\xbf\x7f"))],
    "header_value_cr": lambda c: [(0, P + c.headers(1, get(extra=(("x-a", "b\rc"),))))],
    "header_underscore": lambda c: [(0, P + c.headers(1, get(extra=(("x_a", "b"),))))],
    "header_at_sign": lambda c: [(0, P + c.headers(1, get(extra=(("x@a", "b"),))))],
    "duplicate_method": lambda c: [(0, P + c.headers(1, [(":method", "GET"), *get()]))],
    "unknown_pseudo": lambda c: [(0, P + c.headers(1, get(extra=((":foo", "b"),))))],
    "pseudo_after_regular": lambda c: [(0, P + c.headers(1, [
        (":method", "GET"), (":path", "/"), ("x-a", "b"), (":scheme", "https"),
        (":authority", "a")]))],
    "authority_and_host": lambda c: [(0, P + c.headers(1, get(extra=(("host", "b"),))))],
    "bad_authority": lambda c: [(0, P + c.headers(1, [(":method", "GET"), (":path", "/"),
                                                      (":scheme", "https"),
                                                      (":authority", "a/b")]))],
    "bad_content_length": lambda c: [(0, P + c.headers(1, get(extra=(
        ("content-length", "x"),))))],
    "huge_content_length": lambda c: [(0, P + c.headers(1, get(method="POST", extra=(
        ("content-length", "5000000"),)), end_stream=False))],
    "bad_scheme": lambda c: [(0, P + c.headers(1, [(":method", "GET"), (":path", "/"),
                                                   (":scheme", "ht tp"), (":authority", "a")]))],
    "empty_path": lambda c: [(0, P + c.headers(1, get("")))],
    "path_with_space": lambda c: [(0, P + c.headers(1, get("/a b")))],
    "path_percent_zero": lambda c: [(0, P + c.headers(1, get("/%00")))],
    "path_encoded": lambda c: [(0, P + c.headers(1, get("/%61bout.html")))],
    "path_asterisk": lambda c: [(0, P + c.headers(1, get("*", method="OPTIONS")))],
    "connect_method": lambda c: [(0, P + c.headers(1, [(":method", "CONNECT"),
                                                       (":authority", "a:443")]))],
    "expect_continue": lambda c: [(0, P + c.headers(1, get("/robots.txt", extra=(
        ("expect", "100-continue"),))))],
    "if_match_fails": lambda c: [(0, P + c.headers(1, get("/robots.txt", extra=(
        ("if-match", '"x"'),))))],
    "if_none_match": lambda c: [(0, P + c.headers(1, get("/robots.txt", extra=(
        ("if-none-match", ROBOTS_ETAG),))))],
    "range_416": lambda c: [(0, P + c.headers(1, get("/robots.txt", extra=(
        ("range", "bytes=99-"),))))],
    "headers_empty": lambda c: [(0, P + frame(HEADERS, 5, 1))],
    "headers_self_dependency": lambda c: [(0, P + frame(
        HEADERS, 0x25, 1, bytes.fromhex("00000001ff") + c.block(get())))],
    "headers_padding_fills_frame": lambda c: [(0, P + frame(HEADERS, 0xD, 1, b"\x04" + bytes(4)))],
    "window_update_zero_open_stream": lambda c: [(0, CLIENT_PREFACE + frame(
        SETTINGS, 0, 0, bytes.fromhex("000400000100")) + c.headers(1, get())
        + frame(WINDOW_UPDATE, 0, 1, bytes(4)))],
    "te_trailers": lambda c: [(0, P + c.headers(1, get(extra=(("te", "trailers"),))))],
    "cookies": lambda c: [(0, P + c.headers(1, get(extra=(("cookie", "a=1"), ("cookie", "b=2")))))],
    "data_on_stream_0": lambda c: [(0, P + frame(DATA, 0, 0, b"abc"))],
    "big_data_frame_idle": lambda c: [(0, P + frame(DATA, 0, 1, bytes(100000)))],
    "data_after_response": lambda c: [(0, P + c.headers(1, get(), end_stream=False)),
                                      (0.2, frame(DATA, 1, 1, b"abc"))],
    "streams_over_limit": lambda c: [(0, CLIENT_PREFACE + frame(
        SETTINGS, 0, 0, bytes.fromhex("000400000000")) + b"".join(
        c.headers(sid, get("/robots.txt")) for sid in range(1, 262, 2)))],
    "ping_ack_and_other_flags": lambda c: [(0, P + frame(PING, 0x21, 0, bytes(8)))],
    "settings_ack_and_other_flags": lambda c: [(0, P + frame(SETTINGS, 0x3, 0))],
    "data_padded_empty": lambda c: [(0, P + frame(DATA, 0x8, 0))],
    "data_padded_empty_stream": lambda c: [(0, P + frame(DATA, 0x8, 1))],
    "data_overpadded": lambda c: [(0, P + frame(DATA, 0x8, 1, b"\x05abcd"))],
    "headers_truncated_block": lambda c: [(0, P + frame(HEADERS, 5, 1, b"\x82\x44\x05/a"))],
    "many_sequential": lambda c: [(0, P)] + [
        (0.01 * i, c.headers(2 * i + 1, get("/robots.txt"))) for i in range(1, 30)],
    "http2_then_http1": lambda c: [(0, P + c.headers(1, get())),
                                   (0.2, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")],
}

# Multipart answers: their boundary is a counter of the server's (nginx: one per process,
# ngx_next_temp_number), so both servers must see these in the same order: one at a time.
MULTIPART: dict[str, ProbeFactory] = {
    "multi_range": lambda c: [(0, P + c.headers(1, get("/robots.txt", extra=(
        ("range", "bytes=0-1,4-5"),))))],
    "multi_range_5": lambda c: [(0, P + c.headers(1, get("/index.html", extra=(
        ("range", "bytes=0-1,4-5,8-9,12-13,100-"),))))],
    "multi_range_overlap": lambda c: [(0, P + c.headers(1, get("/index.html", extra=(
        ("range", "bytes=0-999,500-"),))))],
}

# Probes that watch the clock: the idle and header timeouts, and their GOAWAY.
TIMED: dict[str, ProbeFactory] = {
    "idle_after_settings": lambda c: [(0, P)],
    "idle_after_preface": lambda c: [(0, CLIENT_PREFACE)],
    "partial_preface": lambda c: [(0, CLIENT_PREFACE[:10])],
    "partial_frame": lambda c: [(0, P + b"\0\0")],
    "keepalive_after_get": lambda c: [(0, P + c.headers(1, get("/robots.txt")))],
    "ping_does_not_reset": lambda c: [(0, P), (1.0, frame(PING, 0, 0, bytes(8)))],
    "get_later_then_keepalive": lambda c: [(0, P), (1.0, c.headers(1, get("/robots.txt")))],
    "half_close_after_settings": lambda c: [(0, P), (0.5, HALF_CLOSE)],
    "half_close_mid_frame": lambda c: [(0, P + b"\0\0\5"), (0.5, HALF_CLOSE)],
    "half_close_after_get": lambda c: [(0, P + c.headers(1, get())), (0.5, HALF_CLOSE)],
    "linger_after_error": lambda c: [(0, CLIENT_PREFACE + b"\0" * 30)] + [
        (t, frame(PING, 0, 0, bytes(8))) for t in (0.5, 1.0, 1.5)],
}


def _compare(servers: Servers, probes: dict[str, ProbeFactory], *, timed: bool = False,
             coalesce: bool = True, wait: float | None = None, workers: int = 16) -> None:
    if wait is None:
        wait = WATCH if timed else OPEN_WAIT
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = [(name, pool.submit(probe, servers.nginx, make(Client()), wait=wait,
                                   coalesce=coalesce),
                 pool.submit(probe, servers.veil, make(Client()), wait=wait,
                             coalesce=coalesce))
                for name, make in probes.items()]
        results = [(name, a.result(), b.result()) for name, a, b in jobs]
    diffs = [(name, a, b) for name, a, b in results if not a.same_as(b, timed)]
    message = "\n".join(f"{name}:\n  nginx {a}\n  veil  {b}" for name, a, b in diffs[:4])
    assert not diffs, f"{len(diffs)} of {len(results)} probes differ:\n{message}"


def test_probes(servers: Servers) -> None:
    _compare(servers, PROBES)
    _compare(servers, MULTIPART, workers=1)


def random_probes(count: int, seed: int) -> dict[str, ProbeFactory]:
    """Frames with random types, flags, stream ids and payloads after a valid preface, some
    around a valid request: what a fuzzing prober sends."""
    rng = random.Random(seed)
    out: dict[str, ProbeFactory] = {}
    for i in range(count):
        frames = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice([*range(10), 0x0A, 0xFF])
            length = rng.choice([0, 1, 4, 5, 6, 8, 9, 12, rng.randint(0, 300)])
            sid = rng.choice([0, 1, 2, 3, 5, 0x7FFFFFFF, rng.randint(0, 1 << 31)])
            frames.append(frame(kind, rng.randrange(256), sid & 0xFFFFFFFF,
                                rng.randbytes(length)))
        with_request = i % 3 == 0

        def make(c: Client, frames: list[bytes] = frames, with_request: bool = with_request
                 ) -> Sends:
            request = c.headers(1, get()) if with_request else b""
            return [(0, P + b"".join(frames) + request)]

        out[f"random{i}"] = make
    return out


def test_random_frames(servers: Servers) -> None:
    _compare(servers, random_probes(120, seed=7))


def test_timeouts(servers: Servers) -> None:
    _compare(servers, TIMED, timed=True)


def test_server_preface_values(servers: Servers) -> None:
    """The SETTINGS and WINDOW_UPDATE nginx opens with, checked against the real one."""
    outcome = probe(servers.nginx, [(0, P)])
    first = outcome.records[0]
    assert first[:2] == [(SETTINGS, 0, 0, [(3, 128), (4, 65536), (5, 16777215)]),
                         (WINDOW_UPDATE, 0, 0, (2147418112).to_bytes(4, "big"))]
    assert _frames(SERVER_PREFACE, None, bytearray()) == first[:2]


def test_silent_client_gets_preface_at_once(servers: Servers) -> None:
    """nginx writes its SETTINGS as soon as the handshake is done; veil's gate sends the same
    greeting when the client has said nothing GREETING_GRACE_S (10 ms) after it."""
    _compare(servers, {
        "silent": lambda c: [],
        # the request 50 ms after the Finished: both have written their SETTINGS by then, in
        # a record of its own (sent at once, nginx may or may not have flushed it first)
        "request_after_finished": lambda c: [(0.05, P + c.headers(1, get()))],
    }, timed=True, coalesce=False)


def _gets(c: Client, first: int, count: int) -> bytes:
    return b"".join(c.headers(sid, get("/robots.txt"))
                    for sid in range(first, first + 2 * count, 2))


def test_stream_limits(servers: Servers) -> None:
    """nginx's limits on streams, frame by frame: 256 new streams per read (2 x
    http2_max_concurrent_streams), the rest refused, 129 refusals then GOAWAY(NO_ERROR); the
    1000th request (keepalive_requests) answered behind a GOAWAY naming it, later HEADERS
    skipped, then a lingering close once the answers are out."""
    _compare(servers, {
        # one read: 256 answered, 129 REFUSED_STREAM, then GOAWAY(NO_ERROR, 771)
        "burst_1100": lambda c: [(0, P + _gets(c, 1, 1100))],
        "burst_300": lambda c: [(0, P + _gets(c, 1, 300))],
    }, wait=0.8)
    # Reads of 80 requests, far enough apart to stay separate reads even on a busy machine
    # (alone: run with the bursts, a stalled server could join four of them in one read and
    # refuse some): the 1000th is answered behind the GOAWAY, the 40 after it in its read
    # are skipped unanswered.
    _compare(servers, {
        "past_keepalive_requests": lambda c: [(0, P)] + [
            (0.15 * (i + 1), _gets(c, 1 + 160 * i, 80)) for i in range(13)],
    }, wait=0.8)


def _ping_flood_without_reading(port: int, limit: float) -> tuple[int, float, str]:
    """Send PINGs and never read: (bytes the server took, seconds, how it ended)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(5)
        tls, _, outgoing = bio_handshake(s, _CLIENT_TLS)
        tls.write(P)
        s.sendall(outgoing.read())
        pings = frame(PING, 0, 0, bytes(8)) * 960  # one 16 KiB record
        s.setblocking(False)
        sent, pending, started = 0, b"", time.monotonic()
        while time.monotonic() - started < limit:
            if not pending:
                tls.write(pings)
                pending = outgoing.read()
            try:
                n = s.send(pending)
            except BlockingIOError:
                select.select([], [s], [], 0.05)
                continue
            except OSError as exc:
                return sent, time.monotonic() - started, type(exc).__name__
            pending = pending[n:]
            sent += n
        return sent, time.monotonic() - started, "still open"


def test_ping_flood_without_reading_is_reset(servers: Servers) -> None:
    """A client that sends PINGs and reads nothing: nginx resets the connection once 10,001
    frames wait unsent ("http2 flood detected"), within a few MiB; so does veil, instead of
    holding them or pausing until the header timeout."""
    results = {name: _ping_flood_without_reading(port, 5.0)
               for name, port in (("nginx", servers.nginx), ("veil", servers.veil))}
    print({name: f"{sent / 2**20:.1f} MiB in {secs:.2f} s, {end}"
           for name, (sent, secs, end) in results.items()})
    for _name, (sent, secs, end) in results.items():
        assert end in ("ConnectionResetError", "BrokenPipeError")  # RST, or a send after it
        assert secs < 1.0  # not the 2 s header timeout
        assert sent < 32 * 2**20


def _settings_delay(port: int) -> float:
    """A silent h2 client: seconds from the last packet of the server's handshake flight (its
    session tickets, sent on the client's Finished) to the packet with its SETTINGS."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(5)
        tls, incoming, outgoing = bio_handshake(s, _CLIENT_TLS)
        s.sendall(outgoing.read())  # the Finished; nothing after it
        last_flight = time.monotonic()
        while True:
            chunk = s.recv(65536)
            arrived = time.monotonic()
            assert chunk, "closed before the SETTINGS"
            incoming.write(chunk)
            try:
                plain = tls.read(65536)
            except ssl.SSLWantReadError:
                last_flight = arrived  # tickets: still the handshake's flight
                continue
            assert plain.startswith(SERVER_PREFACE[:9])
            return arrived - last_flight


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """Real ``veil serve`` processes (uvloop, the built-in cover): as installed, and with
    ``--trojan``."""
    workdir = tmp_path_factory.mktemp("served")
    started: list[procs.VeilServer] = []
    try:
        for name, extra in (("default", ()), ("trojan", ("--trojan",))):
            started.append(procs.start_veil_server(workdir / name, *extra))
        yield {"veil serve": started[0].port, "veil serve --trojan": started[1].port}
    finally:
        for server in started:
            procs.stop(server.proc)


def _median_settings_delays_ms(ports: dict[str, int], rounds: int = 15) -> dict[str, float]:
    delays = {name: sorted(_settings_delay(port) for _ in range(rounds))
              for name, port in ports.items()}
    medians = {name: values[len(values) // 2] * 1000 for name, values in delays.items()}
    print({name: f"median {ms:.2f} ms" for name, ms in medians.items()})
    return medians


def test_settings_follow_the_handshake_at_once(servers: Servers,
                                               served: dict[str, int]) -> None:
    """nginx writes its SETTINGS right behind its handshake flight, before it reads anything
    (~0.02 ms on loopback). So does a default ``veil serve`` (and its gate on either loop):
    veil's own clients skip the greeting. ``veil serve --trojan`` waits
    gate.GREETING_GRACE_S (10 ms) for Trojan clients (they take h2 and send their request
    0.5-2 ms after their Finished): the documented price of --trojan (docs/operations.md)."""
    medians = _median_settings_delays_ms({
        "nginx": servers.nginx, "gate without Trojan": servers.veil_without_trojan,
        "gate with Trojan": servers.veil, **served})
    assert medians["gate without Trojan"] < 3.0
    assert medians["veil serve"] < 3.0
    assert medians["gate with Trojan"] >= GREETING_GRACE_S * 1000
    assert medians["veil serve --trojan"] >= GREETING_GRACE_S * 1000


def test_close_notify_from_client(servers: Servers) -> None:
    """nginx closes at once on the client's close_notify, without sending its own."""
    _compare(servers, {
        "close_notify_after_settings": lambda c: [(0, P), (0.5, CLOSE_NOTIFY)],
        "close_notify_after_get": lambda c: [(0, P + c.headers(1, get())), (0.5, CLOSE_NOTIFY)],
    }, timed=True)


# ---------------------------------------------------------------------- ALPN
@pytest.mark.parametrize(("offer", "chosen"), [(["h2", "http/1.1"], "h2"),
                                               (["http/1.1"], "http/1.1"),
                                               (["http/1.1", "h2"], "h2")])
def test_alpn_as_nginx(servers: Servers, offer: list[str], chosen: str) -> None:
    """veil's server picks what nginx with http2 picks (the server's preference)."""
    assert probe(servers.nginx, [], wait=0.1, alpn=offer).alpn == chosen
    assert probe(servers.veil, [], wait=0.1, alpn=offer).alpn == chosen


def test_alpn_http11_only_for_url_cover(servers: Servers) -> None:
    """A URL cover relays to an HTTP/1.1 server: its gate never agrees to h2."""
    assert probe(servers.url_cover_veil, [], wait=0.1).alpn == "http/1.1"


def test_http11_still_served_after_http11_alpn(servers: Servers) -> None:
    request = b"GET /robots.txt HTTP/1.1\r\nHost: a\r\n\r\n"
    out = probe(servers.veil, [(0, request)], alpn=["http/1.1"])
    assert out.alpn == "http/1.1"
    assert out.close == "open"


def test_chrome_shaped_client_gets_h2(servers: Servers) -> None:
    """veil's own client (Chrome's ClientHello, ALPN h2,http/1.1) negotiates h2 with veil's
    server as with nginx, and the cover then answers it over HTTP/2."""
    from veil.transport.browser_tls import open_browser_tls_connection

    class Collect(asyncio.Protocol):
        def __init__(self) -> None:
            self.data = bytearray()
            self.got = asyncio.Event()

        def data_received(self, data: bytes) -> None:
            self.data += data
            if len(self.data) >= len(SERVER_PREFACE) + 9:
                self.got.set()

    async def main(port: int) -> tuple[str, bytes]:
        app = Collect()
        transport = await open_browser_tls_connection("127.0.0.1", port, lambda: app,
                                                      server_hostname="localhost",
                                                      handshake_timeout=5)
        transport.write(P)
        await asyncio.wait_for(app.got.wait(), 5)
        alpn = transport.get_extra_info("alpn_protocol")
        transport.close()
        return alpn, bytes(app.data)

    for port in (servers.nginx, servers.veil):
        alpn, data = asyncio.run(main(port))
        assert alpn == "h2"
        assert data.startswith(SERVER_PREFACE + frame(SETTINGS, 1, 0))
