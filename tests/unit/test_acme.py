"""The pieces of ACME that need no CA: which names get one by default, the TLS-ALPN-01
challenge certificate (RFC 8737), and the gate's reading of a ClientHello's ALPN."""

from __future__ import annotations

import datetime
import hashlib
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from veil.config import ServerOptions
from veil.manage.acme import (
    ID_PE_ACME_IDENTIFIER,
    LETS_ENCRYPT_DIRECTORY,
    RETRY_AFTER_MAX_S,
    challenge_certificate,
    public_ca_may_issue,
    retry_after_seconds,
)
from veil.manage.state import init_state
from veil.protocol.address import Address
from veil.server import clienthello
from veil.server.acme import acme_directory_for


@pytest.mark.parametrize(("name", "may"), [
    ("vpn.example-shop.de", True), ("www.veil-acme.org", True), ("localhost", False),
    ("vpn.example.org", False), ("box.local", False), ("a.test", False), ("nodot", False),
    ("203.0.113.7", False), ("2001:db8::7", False), ("router.home.arpa", False)])
def test_the_default_ca_is_asked_only_about_public_names(name: str, may: bool) -> None:
    assert public_ca_may_issue(name) is may


def test_the_default_is_acme_for_a_public_name_and_self_signed_only_when_asked(
        tmp_path: Path) -> None:
    listen = Address("127.0.0.1", 443)
    named, _ = init_state(tmp_path / "a", listen=listen, public="vpn.example-shop.de:443")
    by_ip, _ = init_state(tmp_path / "b", listen=listen, public="203.0.113.7:443")
    options = ServerOptions(listen=listen)
    assert acme_directory_for(options, named) == LETS_ENCRYPT_DIRECTORY
    assert acme_directory_for(options, by_ip) is None
    assert acme_directory_for(ServerOptions(listen=listen, self_signed=True), named) is None
    own = ServerOptions(listen=listen, acme_directory="https://ca.internal/dir")
    assert acme_directory_for(own, named) == "https://ca.internal/dir"


def test_a_challenge_certificate_carries_the_key_authorizations_digest() -> None:
    digest = hashlib.sha256(b"token.thumbprint").digest()
    cert_pem, _key = challenge_certificate("vpn.example-shop.de", digest)
    cert = x509.load_pem_x509_certificate(cert_pem)
    ext = cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
    assert ext.critical
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    assert ext.value.value == b"\x04\x20" + digest  # an OCTET STRING of the digest
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["vpn.example-shop.de"]


def client_hello(alpn: list[str] | None, sni: str = "vpn.example-shop.de") -> bytes:
    """OpenSSL's ClientHello record offering ``alpn``."""
    context = ssl.create_default_context()
    if alpn:
        context.set_alpn_protocols(alpn)
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_the_alpn_offer_and_the_name_are_read_from_a_client_hello() -> None:
    record = client_hello(["acme-tls/1"])
    assert clienthello.alpn_protocols(record) == (b"acme-tls/1",)
    assert clienthello.server_name(record) == "vpn.example-shop.de"
    assert clienthello.alpn_protocols(client_hello(["h2", "http/1.1"])) == (b"h2", b"http/1.1")
    assert clienthello.alpn_protocols(client_hello(None)) == ()
    assert clienthello.alpn_protocols(record[:60]) == ()  # cut short: nothing, no error


NOW = datetime.datetime(2026, 12, 7, 12, 0, tzinfo=datetime.UTC)


@pytest.mark.parametrize(("header", "seconds"), [
    ("120", 120.0), (" 7 ", 7.0),                                     # delta-seconds
    ("Mon, 07 Dec 2026 12:05:00 GMT", 300.0),                         # an HTTP date
    ("Mon, 07 Dec 2026 11:00:00 GMT", 0.0),                           # already past
    ("Mon, 07 Dec 2027 12:00:00 GMT", RETRY_AFTER_MAX_S),             # a year: capped
    ("99999999999", RETRY_AFTER_MAX_S),
    ("soon", None), ("", None), (None, None), ("-5", None)])
def test_a_retry_after_header_is_read_as_seconds_from_now(header: str | None,
                                                          seconds: float | None) -> None:
    assert retry_after_seconds(header, NOW) == seconds
