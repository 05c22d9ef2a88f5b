"""The cover site against a real nginx 1.22 serving the same files, byte for byte.

A throwaway nginx (temp prefix, ``daemon off; master_process off``, killed by its PID) serves
the built-in site on a plain port and on a TLS port; veil's :class:`CoverProtocol` serves
it on the same kinds of ports from an asyncio loop in a background thread. Every probe is
sent to both and the answers must be equal after blanking the ``Date`` header: same bytes,
same close (FIN / RST / still open) and the same reaction to a byte sent after the FIN
(RST after a plain close, nothing during a lingering close).

nginx's timeouts are shortened in its config (client_header_timeout 2s, keepalive_timeout
3s, lingering_timeout 1s) and the cover gets exactly the same values.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import random
import re
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from tests.support import procs
from tests.support.biotls import bio_handshake
from tests.support.strangers import OneSubscription
from veil.cover.adapters import CoverProtocol
from veil.cover.generate import SiteSeed, generate_site, write_site
from veil.cover.http1 import CoverMode
from veil.cover.nginx import http_date
from veil.cover.site import CoverSite, SiteFile

NGINX = "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(
    not os.path.exists(NGINX), reason="needs nginx 1.22 at /usr/sbin/nginx (apt-get install nginx)"
)

# One install's generated site, written to a directory nginx serves: both serve identical
# files. An install whose site has the pages the probes name (installs differ in which).
TEST_SEED = next(seed for seed in (SiteSeed(bytes([i]) * 32, 1_760_000_000) for i in range(256))
                 if {"about.html", "style.css", "robots.txt"} <= generate_site(seed).keys())
SITE_FILES = generate_site(TEST_SEED)
ROBOTS_ETAG = SiteFile(SITE_FILES["robots.txt"].body, b"text/plain",
                       SITE_FILES["robots.txt"].mtime).etag.decode()
INDEX_DATE = http_date(SITE_FILES["index.html"].mtime).decode()
INDEX_DATE_PLUS_1 = http_date(SITE_FILES["index.html"].mtime + 1).decode()

HEADER_TIMEOUT = 2.0
KEEPALIVE_TIMEOUT = 3.0

LINGERING_TIMEOUT = 1.0
TIMEOUTS = {
    "header_timeout": HEADER_TIMEOUT,
    "keepalive_timeout": KEEPALIVE_TIMEOUT,
    "lingering_timeout": LINGERING_TIMEOUT,
}
# How long a probe waits for the server to close before calling the connection "open".
OPEN_WAIT = 0.6

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
error_log {d}/error.log info;
pid {d}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{http};
        listen 127.0.0.1:{https} ssl;
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        root {d}/html;
        client_header_timeout 2s;
        keepalive_timeout 3s;
        lingering_timeout 1s;
    }}
}}
"""


def _make_cert(directory: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


@dataclass
class Servers:
    nginx_http: int
    nginx_https: int
    cover_http: int
    cover_https: int
    cover_gate: int
    cover_plain_on_tls: int


def _wait_port(port: int, proc: subprocess.Popen[bytes], directory: Path) -> None:
    try:
        procs.wait_port(port, timeout=10, proc=proc)
    except RuntimeError as exc:
        raise RuntimeError("nginx exited: " + (directory / "error.log").read_text()) from exc


class _Gate(asyncio.Protocol):
    """A stand-in for veil's gate: reads the first bytes, then hands over to the cover."""

    def __init__(self, site: CoverSite, live: set[asyncio.BaseTransport],
                 mode: CoverMode | None) -> None:
        self._site = site
        self._live = live
        self._mode = mode
        self._started = 0.0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance here
        self._transport = cast(asyncio.Transport, transport)
        self._live.add(transport)
        self._started = asyncio.get_running_loop().time()

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        mode = self._mode
        if mode is None:
            mode = CoverMode.HTTP
        CoverProtocol.take_over(self._transport, data, self._site, mode=mode,
                                started_at=self._started, **TIMEOUTS)


class _Tracked(CoverProtocol):
    live: set[asyncio.BaseTransport]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.live.add(transport)
        super().connection_made(transport)


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def servers(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """nginx and the cover, the cover on asyncio's own loop and on uvloop (veil's default)."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        new_loop = asyncio.new_event_loop
    d = tmp_path_factory.mktemp("nginx")
    write_site(SITE_FILES, d / "html")
    _make_cert(d)
    # nginx is told its ports (see procs.unused_port: taken meanwhile, it exits and
    # _wait_port says so); the cover listens on ports the system picks.
    nginx_http, nginx_https = procs.unused_port(), procs.unused_port()
    (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, http=nginx_http, https=nginx_https))
    proc = subprocess.Popen([NGINX, "-p", str(d), "-c", str(d / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loop = new_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    live: set[asyncio.BaseTransport] = set()
    site = CoverSite.builtin(TEST_SEED)
    # Every comparison runs with a responder in place (as on a veil server, whose
    # subscriptions answer through one): what it does not answer must stay nginx's.
    site.responder = OneSubscription()
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(d / "cert.pem", d / "key.pem")

    def cover() -> CoverProtocol:
        p = _Tracked(site, **TIMEOUTS)
        p.live = live
        return p

    async def start() -> list[asyncio.Server]:
        return [
            await loop.create_server(cover, "127.0.0.1", 0),
            await loop.create_server(cover, "127.0.0.1", 0, ssl=sctx),
            await loop.create_server(lambda: _Gate(site, live, None), "127.0.0.1", 0),
            await loop.create_server(
                lambda: _Gate(site, live, CoverMode.PLAIN_ON_TLS_PORT), "127.0.0.1", 0),
        ]

    async def stop(srvs: list[asyncio.Server]) -> None:
        for s in srvs:
            s.close()
        for t in list(live):
            # Python 3.11.2's SSL transport (Debian 12's) raises from abort() once its
            # connection is gone (fixed in 3.11.3): abort only what is still open.
            if not t.is_closing():
                t.abort()
        await asyncio.sleep(0.05)
        for s in srvs:
            await s.wait_closed()

    thread.start()
    try:
        srvs = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        try:
            _wait_port(nginx_http, proc, d)
            _wait_port(nginx_https, proc, d)
            yield Servers(nginx_http, nginx_https,
                          *(srv.sockets[0].getsockname()[1] for srv in srvs))
        finally:
            asyncio.run_coroutine_threadsafe(stop(srvs), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        proc.kill()  # only the nginx we started, by its PID
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


# -- probes ----------------------------------------------------------------------------------

_DATE = re.compile(rb"Date: [^\r]*\r\n")
_CLIENT_TLS = ssl.create_default_context()
_CLIENT_TLS.check_hostname = False
_CLIENT_TLS.verify_mode = ssl.CERT_NONE

Outcome = tuple[bytes, str, str, str]


def _poke(s: socket.socket) -> str:
    """After the server's FIN: does sending draw RST (closed) or not (lingering)?"""
    try:
        # The probe itself: a closed peer answers the first send with RST, which the next
        # send reports; the pause lets that answer cross loopback (there is no event for it).
        s.send(b"x")
        time.sleep(0.05)
        s.send(b"y")
        time.sleep(0.05)
        s.recv(16)
    except (ConnectionResetError, BrokenPipeError):
        return "RST"
    return "no RST"


def probe_plain(data: bytes, port: int) -> Outcome:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(data)
        s.settimeout(OPEN_WAIT)
        out = b""
        close = "open"
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    close = "FIN"
                    break
                out += chunk
        except ConnectionResetError:
            close = "RST"
        except TimeoutError:
            close = "open"
        after = _poke(s) if close == "FIN" else ""
    return _DATE.sub(b"Date: -\r\n", out), "", close, after


def probe_tls(data: bytes, port: int, wait: float = OPEN_WAIT) -> Outcome:
    """TLS through memory BIOs, so that close_notify and the TCP close are told apart."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(5)
        tls, incoming, outgoing = bio_handshake(s, _CLIENT_TLS)
        s.sendall(outgoing.read())
        tls.write(data)
        s.sendall(outgoing.read())
        out = b""
        notify = ""
        close = "open"
        s.settimeout(wait)
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    close = "FIN"
                    break
                incoming.write(chunk)
                while True:
                    try:
                        plain = tls.read(65536)
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLZeroReturnError:
                        notify = "close_notify"
                        break
                    if not plain:
                        notify = "close_notify"
                        break
                    out += plain
        except ConnectionResetError:
            close = "RST"
        except TimeoutError:
            close = "open"
        after = _poke(s) if close == "FIN" else ""
    return _DATE.sub(b"Date: -\r\n", out), notify, close, after


def _compare(pairs: list[tuple[str, Callable[[], Outcome], Callable[[], Outcome]]]) -> None:
    with ThreadPoolExecutor(max_workers=32) as pool:
        futures = [(name, pool.submit(a), pool.submit(b)) for name, a, b in pairs]
        results = [(name, fa.result(), fb.result()) for name, fa, fb in futures]
    diffs = [(name, a, b) for name, a, b in results if a != b]
    message = "\n".join(f"{name}:\n  nginx {a!r}\n  cover {b!r}" for name, a, b in diffs[:5])
    assert not diffs, f"{len(diffs)} of {len(results)} probes differ:\n{message}"


REQ = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
NAMED_PROBES: dict[str, bytes] = {
    "get_root": REQ,
    "get_about": b"GET /about.html HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "get_css": b"GET /style.css HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    "get_robots_http10": b"GET /robots.txt HTTP/1.0\r\n\r\n",
    "http10_keepalive": b"GET /robots.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "http09": b"GET /robots.txt\r\n",
    "head_root": b"HEAD / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "not_found": b"GET /nope HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "favicon": b"GET /favicon.ico HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "post_root": b"POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n\r\nabc",
    "put_root": b"PUT / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "trace": b"TRACE / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "no_host": b"GET / HTTP/1.1\r\n\r\n",
    "ims_equal": b"GET / HTTP/1.1\r\nHost: a\r\n"
                 b"If-Modified-Since: %s\r\n\r\n" % INDEX_DATE.encode(),
    "ims_other": b"GET / HTTP/1.1\r\nHost: a\r\n"
                 b"If-Modified-Since: %s\r\n\r\n" % INDEX_DATE_PLUS_1.encode(),
    "inm": b"GET /robots.txt HTTP/1.1\r\nHost: a\r\nIf-None-Match: %s\r\n\r\n"
           % ROBOTS_ETAG.encode(),
    "if_match_fail": b'GET /robots.txt HTTP/1.1\r\nHost: a\r\nIf-Match: "x"\r\n\r\n',
    "range": b"GET /robots.txt HTTP/1.1\r\nHost: a\r\nRange: bytes=0-3\r\n\r\n",
    "range_416": b"GET /robots.txt HTTP/1.1\r\nHost: a\r\nRange: bytes=99-\r\n\r\n",
    "expect": b"GET /robots.txt HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
    "keepalive_pair": REQ + b"GET /about.html HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "keepalive_then_close": REQ + b"GET /robots.txt HTTP/1.1\r\nHost: a\r\n"
                                  b"Connection: close\r\n\r\n",
    "request_line_10k": b"GET /" + b"a" * 10240 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
    "request_line_8191": b"GET /" + b"a" * (8191 - 16) + b" HTTP/1.1\r\nHost: a\r\n\r\n",
    "header_10k": b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"b" * 10240 + b"\r\n\r\n",
    "headers_40k": b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Pad: " + b"c" * 7000 + b"\r\n" * 1
                   + (b"X-Pad: " + b"c" * 7000 + b"\r\n") * 5 + b"\r\n",
    "empty_lines_first": b"\r\n\r\n" + REQ,
    "lf_only": b"GET / HTTP/1.1\nHost: a\n\n",
    "version_2": b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    "bad_percent": b"GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n",
    "dotdot": b"GET /../about.html HTTP/1.1\r\nHost: a\r\n\r\n",
    "decoded": b"GET /%61bout.html?x=1 HTTP/1.1\r\nHost: a\r\n\r\n",
    "absolute_uri": b"GET http://example.com/about.html HTTP/1.1\r\nHost: a\r\n\r\n",
    "dup_host": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "space_in_header": b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: 1\r\n\r\n",
    "chrome_404": b"GET /x HTTP/1.1\r\nHost: a\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)"
                  b" AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36\r\n\r\n",
    "te_gzip": b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    "too_large_body": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000000\r\n\r\n",
    "partial_line": b"GET /index.html HTT",
    "partial_headers": b"GET / HTTP/1.1\r\nHost: a\r\n",
    "tls_client_hello_like": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "ssh_banner": b"SSH-2.0-OpenSSH_9.2\r\n",
    "socks5": b"\x05\x01\x00",
    "lowercase_method": b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
}


def random_probes(count: int, seed: int) -> dict[str, bytes]:
    """Random bytes of many lengths, some starting like a method, some with CR/LF in them."""
    rng = random.Random(seed)
    lengths = [1, 2, 3, 7, 8, 9, 11, 12, 13, 15, 16, 17, 21, 22, 23, 32, 33, 34, 40, 41, 42,
               48, 49, 50, 221, 500, 1023, 1024, 1025, 2000]
    out: dict[str, bytes] = {}
    for i in range(count):
        n = lengths[i] if i < len(lengths) else rng.randint(1, 2000)
        data = bytearray(rng.randbytes(n))
        kind = i % 4
        if kind == 1:  # starts with a method-like token
            prefix = rng.choice([b"GET ", b"POST /", b"HEAD /", b"GET /", b"ABC", b"X-"])
            data[: len(prefix)] = prefix
        elif kind == 2:  # CR/LF sprinkled in
            for _ in range(max(1, n // 20)):
                data[rng.randrange(n)] = rng.choice(b"\r\n")
        elif kind == 3:  # printable ASCII only, as an HTTP-ish prober would send
            data = bytearray(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ /:.-\r\n")
                             for _ in range(n))
        out[f"random{i}_len{n}_kind{kind}"] = bytes(data[:n])
    return out


@pytest.mark.parametrize(("probe", "nginx_side", "cover_side", "count", "seed"), [
    pytest.param(probe_plain, "nginx_http", "cover_http", 80, 20240601, id="plain_http"),
    # Through a gate that hands over the first bytes it read.
    pytest.param(probe_plain, "nginx_http", "cover_gate", 40, 7, id="through_gate_take_over"),
    pytest.param(probe_tls, "nginx_https", "cover_https", 40, 99, id="tls"),
])
def test_probes_answer_as_nginx_does(servers: Servers, probe: Callable[[bytes, int], Outcome],
                                     nginx_side: str, cover_side: str, count: int,
                                     seed: int) -> None:
    """The named probes and ``count`` random ones (from ``seed``), sent to nginx and to the
    cover on the same kind of port: the same answers, closes and timing."""
    nginx_port, cover_port = getattr(servers, nginx_side), getattr(servers, cover_side)
    probes = {**NAMED_PROBES, **random_probes(count, seed=seed)}
    _compare([
        (name, lambda d=data: probe(d, nginx_port), lambda d=data: probe(d, cover_port))
        for name, data in probes.items()
    ])


def test_plain_http_on_tls_port(servers: Servers) -> None:
    probes = {name: data for name, data in {**NAMED_PROBES, **random_probes(60, seed=3)}.items()
              if data[0] != 0x16 and data[0] < 0x80}
    assert len(probes) > 50
    _compare([
        (name, lambda d=data: probe_plain(d, servers.nginx_https),
         lambda d=data: probe_plain(d, servers.cover_plain_on_tls))
        for name, data in probes.items()
    ])


def test_tls_timeouts(servers: Servers) -> None:
    """Silence and a stalled request over TLS: when the close comes, with or without
    close_notify (nginx omits it when a started request times out)."""
    probes = {"silence": b"", "stalled_request": b"GET /", "keepalive": REQ}
    _compare([
        (name, lambda d=data: probe_tls(d, servers.nginx_https, wait=4.0),
         lambda d=data: probe_tls(d, servers.cover_https, wait=4.0))
        for name, data in probes.items()
    ])


# -- timing: when does the server close, and how --------------------------------------------

Event = tuple[str, float]


def timeline(port: int, sends: list[tuple[float, bytes]], total: float) -> list[Event]:
    """Send at the given times; record data, FIN, RST and failed sends with their times."""
    events: list[Event] = []
    pending = list(sends)
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.monotonic()
        s.setblocking(False)
        fin = False
        while time.monotonic() - t0 < total:
            now = time.monotonic() - t0
            while pending and pending[0][0] <= now:
                try:
                    s.send(pending.pop(0)[1])
                except OSError:
                    events.append(("send failed", now))
            readable, _, _ = select.select([s], [], [], 0.02)
            if not readable:
                continue
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                events.append(("RST", time.monotonic() - t0))
                break
            if chunk:
                events.append((f"data {len(chunk)}", time.monotonic() - t0))
            elif not fin:
                fin = True
                events.append(("FIN", time.monotonic() - t0))
                if not pending:
                    break
            else:
                time.sleep(0.02)  # after the FIN the socket stays readable: pace the sends
    return events


ROBOTS = b"GET /robots.txt HTTP/1.1\r\nHost: x\r\n\r\n"
SCENARIOS: dict[str, list[tuple[float, bytes]]] = {
    "silence": [],
    "partial_request": [(0.0, b"GET /")],
    "dribble_does_not_reset_timer": [(0.0, b"GE"), (1.5, b"T /"), (2.5, b" HTTP/1.0\r\n\r\n")],
    "keepalive_timeout": [(0.0, ROBOTS)],
    "keepalive_then_partial": [(0.0, ROBOTS), (1.0, b"GET /")],
    "garbage_then_linger": [(0.0, b"\x00junk"), (0.5, b"a"), (1.0, b"b"), (3.0, b"c"),
                            (3.2, b"d")],
    "close_then_rst": [(0.0, b"GET /robots.txt HTTP/1.0\r\n\r\n"), (0.5, b"a"), (0.7, b"b")],
    "body_never_sent": [(0.0, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n"),
                        (2.0, b"q"), (2.2, b"q")],
}


def _same_timeline(a: list[Event], b: list[Event]) -> bool:
    return [k for k, _ in a] == [k for k, _ in b] and all(
        abs(ta - tb) < 0.4 for (_, ta), (_, tb) in zip(a, b, strict=True))


def test_close_timing(servers: Servers) -> None:
    with ThreadPoolExecutor(max_workers=2 * len(SCENARIOS)) as pool:
        jobs = [(name, pool.submit(timeline, servers.nginx_http, sends, 4.5),
                 pool.submit(timeline, servers.cover_http, sends, 4.5))
                for name, sends in SCENARIOS.items()]
        results = [(name, a.result(), b.result()) for name, a, b in jobs]
    diffs = [(n, a, b) for n, a, b in results if not _same_timeline(a, b)]
    assert not diffs, "\n".join(f"{n}:\n  nginx {a}\n  cover {b}" for n, a, b in diffs)
    silence = dict((n, a) for n, a, _ in results)["silence"]
    assert silence[0][0] == "FIN" and abs(silence[0][1] - HEADER_TIMEOUT) < 0.4
