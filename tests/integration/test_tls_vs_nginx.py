"""Below HTTP: veil's gate against a real nginx 1.22.1 on the same certificate, TLS only.

What a prober reads in one or two connections before it ever sends a request: the versions
and cipher suites chosen, the ServerHello's extensions, the session tickets (how many, their
lifetime and length), whether a ticket or a session id resumes, and how a ClientHello is
answered however it is framed or mangled - split across records or TCP segments, coalesced
with what follows, in a wrong record version, without a common version, cipher or group,
with duplicate extensions, or followed by a record with a bad MAC. Each answer is reduced to
its shape (:mod:`tests.support.tlsprobe`): the records' types and lengths, alerts as level
and description, the close (FIN, RST, open) and its timing class.

nginx runs with ``procs.nginx``'s configuration (Debian's ``ssl_protocols`` and
``ssl_prefer_server_ciphers on``, everything else nginx's default: ``ssl_session_cache
none``, ``ssl_session_tickets on``, ``ssl_session_timeout 5m``, ``ssl_ciphers
HIGH:!aNULL:!MD5``, ``ssl_ecdh_curve auto``); veil's gate with ``server_ssl_context``, as
``veil serve`` builds it.
"""

from __future__ import annotations

import os
import ssl
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest

from tests.support import procs
from tests.support.tlsprobe import (
    ALERT,
    APPLICATION_DATA,
    CHANGE_CIPHER_SPEC,
    EXT_EARLY_DATA,
    EXT_KEY_SHARE,
    EXT_PRE_SHARED_KEY,
    EXT_PSK_KEY_EXCHANGE_MODES,
    EXT_SERVER_NAME,
    EXT_SUPPORTED_GROUPS,
    EXT_SUPPORTED_VERSIONS,
    HEADER_TIMEOUT,
    Answer,
    Hello,
    Pair,
    after_handshake,
    answer,
    client_context,
    handshake,
    nginx_and_gate,
    openssl_hello,
    records,
)
from veil.cover.generate import SiteSeed

pytestmark = pytest.mark.skipif(not os.path.exists(procs.NGINX),
                                reason="needs nginx 1.22 (apt-get install nginx)")

SEED = SiteSeed(b"\x07" * 32, 1_760_000_000)
TLS12 = ssl.TLSVersion.TLSv1_2
# nginx's ssl_session_timeout default (5 minutes): the lifetime its tickets announce.
NGINX_SESSION_TIMEOUT = 300


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with nginx_and_gate(SEED) as servers:
        yield servers


def _both(pair: Pair, probe: Callable[[int], Any]) -> tuple[Any, Any]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        nginx, veil = pool.submit(probe, pair.nginx), pool.submit(probe, pair.veil)
        return nginx.result(), veil.result()


# ------------------------------------------------------------------ handshakes and tickets
def _summary(port: int, context: ssl.SSLContext) -> tuple[object, ...]:
    h = handshake(port, context)
    return (h.version, h.cipher, h.alpn, h.server_hello_extensions, h.encrypted_extensions,
            len(h.tickets),
            [(t.age_add_present, t.nonce_length, t.extensions) for t in h.tickets],
            len(h.tls12_ticket_hints), h.session is not None and len(h.session.id))


@pytest.mark.parametrize("offer", [
    pytest.param({}, id="tls1.2-and-1.3"),
    pytest.param({"maximum": TLS12}, id="tls1.2-only"),
    pytest.param({"maximum": TLS12, "alpn": []}, id="tls1.2-no-alpn"),
    pytest.param({"alpn": ["http/1.1"]}, id="tls1.3-http1.1"),
])
def test_full_handshake_as_nginx(pair: Pair, offer: dict[str, Any]) -> None:
    """Version, cipher suite, ALPN, the ServerHello's extensions in order (nginx
    acknowledges the SNI), how many tickets follow (TLS 1.3: two, each with age_add, an
    8-byte nonce and no early_data extension; TLS 1.2: one NewSessionTicket)."""
    nginx, veil = _both(pair, lambda port: _summary(port, client_context(**offer)))
    assert veil == nginx


def test_tls13_tickets_have_no_early_data(pair: Pair) -> None:
    for port in (pair.nginx, pair.veil):
        tickets = handshake(port, client_context()).tickets
        assert len(tickets) == 2
        assert all(EXT_EARLY_DATA not in t.extensions and t.age_add_present for t in tickets)


@pytest.mark.parametrize("maximum", [None, TLS12], ids=["tls1.3", "tls1.2"])
def test_ticket_lifetime_as_nginx(pair: Pair, maximum: ssl.TLSVersion | None) -> None:
    """The lifetime is the SSL_CTX's session timeout: nginx's ssl_session_timeout (300 s),
    not OpenSSL's default 7,200 s (set through libssl: veil.manage.libssl)."""
    def lifetimes(port: int) -> list[int]:
        h = handshake(port, client_context(maximum=maximum))
        return [t.lifetime for t in h.tickets] + h.tls12_ticket_hints

    nginx, veil = _both(pair, lifetimes)
    assert nginx and set(nginx) == {NGINX_SESSION_TIMEOUT}
    assert veil == nginx


def test_ticket_length_as_nginx(pair: Pair) -> None:
    """The ticket is the encrypted session, which holds the SSL_CTX's session id context:
    nginx's 20-byte digest of "HTTP" and its certificate makes tickets of 240 bytes, CPython's
    own 7-byte context 208."""
    nginx, veil = _both(pair, lambda port: [t.ticket_length for t in
                                            handshake(port, client_context()).tickets])
    assert veil == nginx


# ------------------------------------------------------------------ resumption
def _resumes(port: int, context: ssl.SSLContext,
             other: int | None = None) -> tuple[bool, tuple[int, ...]]:
    """Resume on ``port`` with a session from ``other`` (by default the same server): was it
    resumed, and the resuming ServerHello's extensions (TLS 1.3: pre_shared_key with a
    key_share is PSK-DHE)."""
    first = handshake(other if other is not None else port, context)
    again = handshake(port, context, session=first.session)
    return again.reused, again.server_hello_extensions


@pytest.mark.parametrize("maximum", [None, TLS12], ids=["tls1.3", "tls1.2"])
def test_ticket_resumes_as_on_nginx(pair: Pair, maximum: ssl.TLSVersion | None) -> None:
    """A ticket from the same server resumes (TLS 1.3: PSK with a fresh key share, as
    OpenSSL's client offers only psk_dhe_ke); one from the other server does not."""
    nginx, veil = _both(pair, lambda port: _resumes(port, client_context(maximum=maximum)))
    assert veil == nginx
    assert nginx[0]
    context = client_context(maximum=maximum)
    crossed = (_resumes(pair.nginx, context, other=pair.veil),
               _resumes(pair.veil, context, other=pair.nginx))
    assert crossed[0] == crossed[1] and not crossed[0][0]


def test_tls12_session_id_without_ticket_as_nginx(pair: Pair) -> None:
    """nginx's default ssl_session_cache none announces a session id but stores no session
    (SSL_SESS_CACHE_NO_INTERNAL_STORE), so a TLS 1.2 session id never resumes; OpenSSL's
    internal cache, the default, would resume it."""
    def resumes(port: int) -> tuple[bool, tuple[int, ...]]:
        context = client_context(maximum=TLS12)
        context.options |= ssl.OP_NO_TICKET
        return _resumes(port, context)

    nginx, veil = _both(pair, resumes)
    assert not nginx[0]
    assert veil == nginx


def _psk_hello(port: int) -> Hello:
    """A ClientHello resuming a TLS 1.3 session from ``port``."""
    context = client_context()
    return openssl_hello(context, session=handshake(port, context).session)


def _garbled_ticket(hello: Hello) -> Hello:
    psk = bytearray(hello.extension(EXT_PRE_SHARED_KEY) or b"")
    psk[10] ^= 0xFF  # inside the first identity (the ticket), past its two length fields
    return hello.with_extension(EXT_PRE_SHARED_KEY, bytes(psk))


def _garbled_binder(hello: Hello) -> Hello:
    psk = bytearray(hello.extension(EXT_PRE_SHARED_KEY) or b"")
    psk[-1] ^= 0xFF
    return hello.with_extension(EXT_PRE_SHARED_KEY, bytes(psk))


def _psk_ke_only(hello: Hello) -> Hello:
    return hello.with_extension(EXT_PSK_KEY_EXCHANGE_MODES, b"\x01\x00")


@pytest.mark.parametrize("mangle", [_garbled_ticket, _garbled_binder, _psk_ke_only],
                         ids=["garbage-ticket", "bad-binder", "psk-without-dhe-only"])
def test_broken_psk_as_nginx(pair: Pair, mangle: Callable[[Hello], Hello]) -> None:
    """A ticket the server cannot decrypt is ignored (a full handshake); a good ticket with
    a wrong binder is refused with an alert; an offer of PSK without (EC)DHE only (psk_ke; its
    binder no longer matches, which a server that ignores the PSK never checks). Each server
    gets its own ticket, mangled."""
    nginx, veil = _both(pair, lambda port: answer(port, [(0, records(
        mangle(_psk_hello(port)).message()))]))
    assert veil == nginx


# ------------------------------------------------------------------ ClientHellos, however framed
HELLO = openssl_hello()
MESSAGE = HELLO.message()


def _hello_with(**changes: Any) -> bytes:
    return replace(HELLO, **changes).message()


def _u16_list(values: list[int], outer: int = 2) -> bytes:
    body = struct.pack(f"!{len(values)}H", *values)
    return len(body).to_bytes(outer, "big") + body


def _sni(name: str) -> bytes:
    entry = b"\x00" + struct.pack("!H", len(name)) + name.encode()
    return struct.pack("!H", len(entry)) + entry


def _dribble(data: bytes, size: int, pause: float) -> list[tuple[float, bytes]]:
    return [(i / size * pause, data[i : i + size]) for i in range(0, len(data), size)]


TLS10_ONLY = records(_hello_with(legacy_version=0x0301, extensions=tuple(
    (k, d) for k, d in HELLO.extensions if k != EXT_SUPPORTED_VERSIONS)))
TLS11_VERSIONS = records(HELLO.with_extension(
    EXT_SUPPORTED_VERSIONS, b"\x04\x03\x02\x03\x01").message())
TLS12_NO_SV = records(HELLO.with_extension(EXT_SUPPORTED_VERSIONS, None).message())

PROBES: dict[str, list[tuple[float, bytes]]] = {
    "one_record": [(0, records(MESSAGE))],
    "record_version_0301": [(0, records(MESSAGE, version=b"\x03\x01"))],
    "record_version_0303": [(0, records(MESSAGE, version=b"\x03\x03"))],
    "record_version_0300": [(0, records(MESSAGE, version=b"\x03\x00"))],
    "record_version_0304": [(0, records(MESSAGE, version=b"\x03\x04"))],
    "record_version_0000": [(0, records(MESSAGE, version=b"\x00\x00"))],
    "record_version_0400": [(0, records(MESSAGE, version=b"\x04\x00"))],
    "split_two_records": [(0, records(MESSAGE, [100]))],
    "split_at_header": [(0, records(MESSAGE, [3]))],
    "split_many_records": [(0, records(MESSAGE, [16] * 40))],
    "one_byte_records": [(0, records(MESSAGE, [1] * len(MESSAGE)))],
    "tcp_dribble_20ms": _dribble(records(MESSAGE), 16, 0.02),
    "tcp_header_then_pause": [(0, records(MESSAGE)[:3]), (0.3, records(MESSAGE)[3:])],
    "records_dribbled": _dribble(records(MESSAGE, [50] * 10), 7, 0.01),
    "coalesced_with_ccs": [(0, records(MESSAGE) + records(b"\x01",
                                                          content_type=CHANGE_CIPHER_SPEC))],
    "coalesced_with_appdata": [(0, records(MESSAGE) + records(
        b"GET / HTTP/1.1\r\n\r\n", content_type=APPLICATION_DATA, version=b"\x03\x03"))],
    "coalesced_with_junk": [(0, records(MESSAGE) + b"\x00" * 40)],
    "coalesced_with_second_hello": [(0, records(MESSAGE) * 2)],
    "trailing_bytes_in_record": [(0, records(MESSAGE + b"\x00" * 64))],
    "trailing_bytes_in_message": [(0, records(
        bytes([1]) + (len(MESSAGE) - 4 + 8).to_bytes(3, "big") + MESSAGE[4:] + b"\x00" * 8))],
    "record_longer_than_sent": [(0, records(MESSAGE)[:3] + struct.pack("!H", len(MESSAGE) + 100)
                                 + MESSAGE)],
    "record_overflow": [(0, b"\x16\x03\x01\x48\x01" + MESSAGE + b"\x00" * (0x4801 - len(MESSAGE)))],
    "empty_handshake_record": [(0, b"\x16\x03\x01\x00\x00")],
    "empty_record_then_hello": [(0, b"\x16\x03\x01\x00\x00" + records(MESSAGE))],
    "ccs_before_hello": [(0, records(b"\x01", content_type=CHANGE_CIPHER_SPEC)
                          + records(MESSAGE))],
    "alert_before_hello": [(0, records(b"\x01\x00", content_type=ALERT) + records(MESSAGE))],
    "two_byte_handshake_record": [(0, records(b"\x01\x00"))],
    "unknown_type_after_hello": [(0, records(MESSAGE) + records(b"\x00" * 8, content_type=0x30))],
    "unknown_type_in_hello_record": [(0, bytes([0x16, 3, 1]) + struct.pack("!H", 4)
                                      + b"\x63\x00\x00\x00")],
    "sslv2_hello": [(0, bytes.fromhex("802e0100020015000000100700c00500800300800100800600400"
                                      "4008002008000000000000000000000000000000000"))],
    "tls10_only": [(0, TLS10_ONLY)],
    "tls11_and_below_versions": [(0, TLS11_VERSIONS)],
    "tls12_without_supported_versions": [(0, TLS12_NO_SV)],
    "no_common_cipher": [(0, records(_hello_with(ciphers=(0x0005, 0x000A, 0x1304))))],
    "only_tls13_ciphers": [(0, records(_hello_with(ciphers=(0x1301,))))],
    "tls12_chacha_first": [(0, records(_hello_with(
        ciphers=(0xCCA9, 0xC02B, 0xC02C, 0xC009), extensions=tuple(
            (k, d) for k, d in HELLO.extensions if k != EXT_SUPPORTED_VERSIONS))))],
    "only_chacha": [(0, records(_hello_with(ciphers=(0x1303, 0xCCA9))))],
    "tls12_cbc_only": [(0, records(_hello_with(ciphers=(0xC009, 0xC00A), extensions=tuple(
        (k, d) for k, d in HELLO.extensions if k != EXT_SUPPORTED_VERSIONS))))],
    "empty_key_share_hrr": [(0, records(HELLO.with_extension(EXT_KEY_SHARE, b"\x00\x00")
                                        .message()))],
    "key_share_p256_only_hrr": [(0, records(
        HELLO.with_extension(EXT_KEY_SHARE, b"\x00\x00")
        .with_extension(EXT_SUPPORTED_GROUPS, _u16_list([0x0017])).message()))],
    "no_common_group": [(0, records(
        HELLO.with_extension(EXT_KEY_SHARE, b"\x00\x00")
        .with_extension(EXT_SUPPORTED_GROUPS, _u16_list([0x1234])).message()))],
    "no_supported_groups": [(0, records(
        HELLO.with_extension(EXT_SUPPORTED_GROUPS, None).message()))],
    "sni_other_name": [(0, records(HELLO.with_extension(EXT_SERVER_NAME,
                                                        _sni("example.org")).message()))],
    "sni_ip_literal": [(0, records(HELLO.with_extension(EXT_SERVER_NAME,
                                                        _sni("127.0.0.1")).message()))],
    "no_sni": [(0, records(HELLO.with_extension(EXT_SERVER_NAME, None).message()))],
    "duplicate_extension": [(0, records(_hello_with(
        extensions=(HELLO.extensions[0], *HELLO.extensions))))],
    "compression_deflate_only": [(0, records(_hello_with(compression=b"\x01")))],
    "session_id_33_bytes": [(0, records(_hello_with(session_id=b"\x01" * 33)))],
    "truncated_hello_then_silence": [(0, records(MESSAGE)[:60])],
}


def test_client_hellos_answered_as_nginx(pair: Pair) -> None:
    """Every framing and mangling above draws the same records, alerts, close and timing
    class from both servers."""
    def run(sends: list[tuple[float, bytes]], port: int) -> Answer:
        return answer(port, sends, wait=HEADER_TIMEOUT + 1.0)

    with ThreadPoolExecutor(max_workers=16) as pool:
        jobs = [(name, pool.submit(run, sends, pair.nginx), pool.submit(run, sends, pair.veil))
                for name, sends in PROBES.items()]
        results = [(name, a.result(), b.result()) for name, a, b in jobs]
    diffs = [f"{name}:\n  nginx {a}\n  veil  {b}" for name, a, b in results if a != b]
    assert not diffs, f"{len(diffs)} of {len(results)} differ:\n" + "\n".join(diffs)


# ------------------------------------------------------------------ after the handshake
def _flip_mac(record: bytes) -> bytes:
    out = bytearray(record)
    out[-3] ^= 0x01  # inside the AEAD tag
    return bytes(out)


@pytest.mark.parametrize("maximum", [None, TLS12], ids=["tls1.3", "tls1.2"])
@pytest.mark.parametrize("mangle", [
    pytest.param(_flip_mac, id="bad-mac"),
    pytest.param(lambda r: b"\x30" + r[1:], id="unknown-content-type"),
    pytest.param(lambda r: r[:1] + b"\x03\x01" + r[3:], id="record-version-0301"),
    pytest.param(lambda r: r[:1] + b"\x02\x00" + r[3:], id="record-version-0200"),
    pytest.param(lambda r: r[:3] + b"\x48\x01" + r[5:] + bytes(0x4801 - len(r) + 5),
                 id="record-overflow"),
])
def test_first_record_after_handshake_as_nginx(pair: Pair, maximum: ssl.TLSVersion | None,
                                              mangle: Callable[[bytes], bytes]) -> None:
    """The client's first application record, mangled: the same alert (encrypted in TLS 1.3,
    so its record's length) and the same close, at once."""
    nginx, veil = _both(pair, lambda port: after_handshake(
        port, client_context(maximum=maximum), b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        mangle))
    assert veil == nginx
