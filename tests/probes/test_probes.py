"""A prober learns nothing: veil answers every probe exactly as its cover site does.

For each probe of the published active-probing repertoire (silence, random bytes of many
lengths, HTTP requests, wrong keys, a replayed authentication), the bytes and the way the
connection ends are compared between veil and the cover site reached directly:

- veil with the built-in cover vs the built-in cover served on its own TLS port (no gate);
- veil's answers before TLS vs a real nginx's TLS port (the web server veil imitates);
- veil with ``--cover http://nginx`` vs that nginx's own TLS port.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.loopserver import ThreadedServer
from tests.support.prober import (
    Outcome,
    peer_certificate,
    probe_raw,
    probe_tls,
    random_payloads,
)
from veil.protocol.seeded import SiteSeed

pytestmark = pytest.mark.slow

HTTP_PROBES = [
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"GET /nonexistent HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    b"HEAD / HTTP/1.0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\r\n",  # incomplete: the server waits
    b"\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
]
# Bytes that look like TLS but are not a valid ClientHello: OpenSSL answers some with an
# alert, and veil must send exactly the alert nginx sends (the event loop's own TLS drops it).
BROKEN_TLS_PROBES = [
    b"\x16\x03\x01\x00\x05hello",
    b"\x16\x03\x01\x02\x00" + bytes(range(256)) * 2,
    b"\x16\x03\x03\x00\x30" + b"\x01\x00\x00\x2c" + bytes(44),
    b"\x16\x03\x01\xff\xff" + bytes(100),
    b"\x80\x2e\x01\x00\x02" + bytes(43),
    b"\x15\x03\x03\x00\x02\x02\x28",
    b"\x17\x03\x03\x00\x10" + bytes(16),
]


class StandaloneCover(ThreadedServer):
    """The built-in cover site on its own TLS port: what veil's gate must be invisible in."""

    def __init__(self, context: ssl.SSLContext, seed: SiteSeed | None) -> None:
        from veil.cover.adapters import CoverProtocol
        from veil.cover.site import CoverSite

        site = CoverSite.builtin(seed)  # the install's own site, drawn from its state
        super().__init__(lambda: CoverProtocol(site), context)


@pytest.fixture(scope="module")
def builtin_veil(module_dir: Path) -> Iterator[procs.VeilServer]:
    # --trojan: the Trojan probes need a way in that knows the password (off by default);
    # the cover is the same either way.
    server = procs.start_veil_server(module_dir / "builtin", "--trojan")
    try:
        yield server
    finally:
        procs.stop(server.proc)


@pytest.fixture(scope="module")
def reference_cover(builtin_veil: procs.VeilServer) -> Iterator[StandaloneCover]:
    from veil.manage.state import load_state, server_ssl_context

    state = load_state(builtin_veil.state)
    cover = StandaloneCover(server_ssl_context(state), state.site_seed)
    try:
        yield cover
    finally:
        cover.close()


@pytest.fixture(scope="module")
def nginx_covered_veil(module_dir: Path, nginx: procs.Nginx) -> Iterator[procs.VeilServer]:
    server = procs.start_veil_server(module_dir / "nginx-cover", "--trojan", "--cover",
                                     f"http://127.0.0.1:{nginx.http_port}")
    try:
        yield server
    finally:
        procs.stop(server.proc)


def compare(payloads: list[bytes], veil: Callable[[bytes], Outcome],
            reference: Callable[[bytes], Outcome]) -> list[str]:
    """Run every probe against both targets in parallel; describe each difference."""
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        mine = list(pool.map(veil, payloads))
        theirs = list(pool.map(reference, payloads))
    differences = []
    for payload, a, b in zip(payloads, mine, theirs, strict=True):
        if a.normalised() != b.normalised():
            differences.append(f"probe {payload[:24]!r}... ({len(payload)} bytes): "
                               f"veil {a.close} {a.data[:60]!r} vs cover {b.close} {b.data[:60]!r}")
    return differences


def valid_auth_bytes(key_uri: str, port: int) -> bytes:
    """Authenticate for real once (a positive control) and return the bytes that did it."""
    from veil.protocol.accesskey import AccessKey
    from veil.protocol.auth import Credential, build_auth
    from veil.protocol.frames import FrameType, frame

    key = AccessKey.parse(key_uri)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw) as tls:
        binding = tls.get_channel_binding("tls-unique")
        assert binding is not None
        import time

        message = build_auth(Credential.from_secret(key.secret), binding, time.time())
        message += frame(FrameType.PADDING, 0, bytes(40))
        tls.sendall(message)
        first = tls.recv(1)
    assert first == bytes([FrameType.PADDING]), "the real key must open a tunnel"
    return message


def test_tls_probes_see_only_the_builtin_cover(builtin_veil: procs.VeilServer,
                                               reference_cover: StandaloneCover) -> None:
    replayed = valid_auth_bytes(builtin_veil.key, builtin_veil.port)
    wrong_key = os.urandom(64) + bytes(48)
    payloads = [*HTTP_PROBES, *random_payloads(seed=1), replayed, wrong_key]
    differences = compare(payloads, lambda p: probe_tls(builtin_veil.port, p),
                          lambda p: probe_tls(reference_cover.port, p))
    assert differences == []
    # The probes really reached a website, not a silent hole.
    assert probe_tls(builtin_veil.port, HTTP_PROBES[0]).data.startswith(b"HTTP/1.1 200 OK")


def test_silence_after_tls_is_treated_alike(builtin_veil: procs.VeilServer,
                                            reference_cover: StandaloneCover) -> None:
    assert probe_tls(builtin_veil.port, b"", wait=2) == probe_tls(reference_cover.port, b"",
                                                                  wait=2)


def test_plain_probes_before_tls_match_nginx(builtin_veil: procs.VeilServer,
                                             nginx: procs.Nginx) -> None:
    payloads = [*HTTP_PROBES, *BROKEN_TLS_PROBES, *random_payloads(seed=2)]
    differences = compare(payloads, lambda p: probe_raw(builtin_veil.port, p),
                          lambda p: probe_raw(nginx.https_port, p))
    assert differences == []
    answer = probe_raw(builtin_veil.port, HTTP_PROBES[0]).data
    assert b"The plain HTTP request was sent to HTTPS port" in answer
    alert = probe_raw(builtin_veil.port, BROKEN_TLS_PROBES[0]).data
    assert alert.startswith(b"\x15\x03"), "a broken ClientHello gets a TLS alert, as from nginx"


def test_revoked_key_gets_the_cover(builtin_veil: procs.VeilServer,
                                    reference_cover: StandaloneCover) -> None:
    key = builtin_veil.add_user("probe-revoked")
    valid_auth_bytes(key, builtin_veil.port)  # works while active
    builtin_veil.revoke("probe-revoked")
    with pytest.raises(AssertionError, match="tunnel"):
        valid_auth_bytes(key, builtin_veil.port)


def test_with_nginx_as_cover_probes_see_nginx(nginx_covered_veil: procs.VeilServer,
                                              nginx: procs.Nginx) -> None:
    replayed = valid_auth_bytes(nginx_covered_veil.key, nginx_covered_veil.port)
    payloads = [*HTTP_PROBES, *random_payloads(seed=3), replayed]
    differences = compare(payloads, lambda p: probe_tls(nginx_covered_veil.port, p),
                          lambda p: probe_tls(nginx.https_port, p))
    assert differences == []
    differences = compare([*HTTP_PROBES, *BROKEN_TLS_PROBES, *random_payloads(seed=4)],
                          lambda p: probe_raw(nginx_covered_veil.port, p),
                          lambda p: probe_raw(nginx.https_port, p))
    assert differences == []


def test_https_cover_shows_its_own_certificate_for_other_names(
        module_dir: Path, nginx: procs.Nginx) -> None:
    server = procs.start_veil_server(module_dir / "https-cover", "--public", "vpn.example.org",
                                     "--cover", f"https://127.0.0.1:{nginx.https_port}")
    try:
        nginx_cert = peer_certificate(nginx.https_port, "other.example")
        assert peer_certificate(server.port, "other.example") == nginx_cert
        assert peer_certificate(server.port, "vpn.example.org") != nginx_cert
        differences = compare([*HTTP_PROBES, *random_payloads(seed=5, count=5)],
                              lambda p: probe_raw(server.port, p),
                              lambda p: probe_raw(nginx.https_port, p))
        assert differences == []
    finally:
        procs.stop(server.proc)


# ------------------------------------------------------------------ Trojan-shaped probes
def trojan_password(server: procs.VeilServer, name: str) -> str:
    import subprocess

    from veil.protocol.trojan import TrojanLink

    out = subprocess.run([*procs.VEIL, "user", "show", name, "--state", str(server.state),
                          "--format", "trojan"], capture_output=True, text=True, check=True,
                         timeout=30)
    return TrojanLink.parse(out.stdout).password


def trojan_request(password: str, host: str = "example.com", port: int = 80) -> bytes:
    from veil.protocol.address import Address
    from veil.protocol.trojan import Command, build_request, password_hash

    return build_request(password_hash(password), Command.CONNECT, Address(host, port))


def trojan_probes(valid_password: str, seed: int) -> list[bytes]:
    """What a prober who knows Trojan but not a password can send."""
    import random

    from veil.protocol.trojan import password_hash

    rng = random.Random(seed)
    http = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
    valid_hex = password_hash(valid_password).encode()
    probes = [
        trojan_request("wrong password") + http,
        trojan_request("") + http,
        trojan_request("wrong password"),
        valid_hex.upper() + trojan_request(valid_password)[56:] + http,  # case matters
        valid_hex + b"\r\n\x02\x03\x0bexample.com\x00\x50\r\n" + http,  # BIND
        valid_hex + b"\r\n\x01\x09\x7f\x00\x00\x01\x00\x50\r\n" + http,  # bad address type
        valid_hex + b"\n\n\x01\x01\x7f\x00\x00\x01\x00\x50\r\n",
    ]
    for length in (0, 1, 2, 10, 100, 1000):
        probes.append(bytes(rng.choice(b"0123456789abcdef") for _ in range(56)) + b"\r\n"
                      + rng.randbytes(length))
    return probes


def test_trojan_probes_see_only_the_builtin_cover(builtin_veil: procs.VeilServer,
                                                  reference_cover: StandaloneCover) -> None:
    password = trojan_password(builtin_veil, "default")
    differences = compare(trojan_probes(password, seed=6),
                          lambda p: probe_tls(builtin_veil.port, p),
                          lambda p: probe_tls(reference_cover.port, p))
    assert differences == []


def test_trojan_probes_with_nginx_as_cover_see_nginx(nginx_covered_veil: procs.VeilServer,
                                                     nginx: procs.Nginx) -> None:
    password = trojan_password(nginx_covered_veil, "default")
    differences = compare(trojan_probes(password, seed=7),
                          lambda p: probe_tls(nginx_covered_veil.port, p),
                          lambda p: probe_tls(nginx.https_port, p))
    assert differences == []


def test_revoked_trojan_password_gets_the_cover(builtin_veil: procs.VeilServer,
                                                reference_cover: StandaloneCover,
                                                nginx: procs.Nginx) -> None:
    builtin_veil.add_user("trojan-revoked")
    password = trojan_password(builtin_veil, "trojan-revoked")
    request = trojan_request(password, "127.0.0.1", nginx.http_port) + (
        b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    served = probe_tls(builtin_veil.port, request)
    assert b"hello from nginx" in served.data, "the real password must be relayed"
    builtin_veil.revoke("trojan-revoked")
    assert compare([request], lambda p: probe_tls(builtin_veil.port, p),
                   lambda p: probe_tls(reference_cover.port, p)) == []


@pytest.mark.parametrize("delay", [0.0, 0.2])
def test_a_late_authenticator_still_opens_the_tunnel_after_the_greeting(
        builtin_veil: procs.VeilServer, delay: float) -> None:
    """With ALPN h2 the gate greets a client that is silent for 10 ms as nginx would
    (HTTP/2 SETTINGS); a veil client whose first bytes come later still gets its session,
    after exactly that greeting (the client skips it: net/client_session.py)."""
    import time

    from veil.protocol.accesskey import AccessKey
    from veil.protocol.auth import Credential, build_auth
    from veil.protocol.frames import COVER_H2_GREETING, FrameType

    key = AccessKey.parse(builtin_veil.key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", builtin_veil.port), timeout=5) as raw, \
            context.wrap_socket(raw) as tls:
        assert tls.selected_alpn_protocol() == "h2"
        binding = tls.get_channel_binding("tls-unique")
        assert binding is not None
        time.sleep(delay)  # the scenario: a client silent past the gate's 10 ms
        tls.sendall(build_auth(Credential.from_secret(key.secret), binding, time.time()))
        expected = (COVER_H2_GREETING if delay else b"") + bytes([FrameType.PADDING])
        got = b""
        while len(got) < len(expected):
            chunk = tls.recv(len(expected) - len(got))
            assert chunk
            got += chunk
    assert got == expected
