"""A server renamed with ``--public`` presents a certificate for its new name, made for the
same key: the keys handed out before the rename (they pin the key, not the certificate)
keep working, and the new ones name the server the certificate names."""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from tests.support import procs
from veil.protocol.accesskey import AccessKey, spki_pin
from veil.protocol.address import Address


def served_certificate(port: int) -> x509.Certificate:
    """The certificate the server presents to a client that sends no SNI (a key by IP)."""
    return x509.load_pem_x509_certificate(
        ssl.get_server_certificate(("127.0.0.1", port)).encode())


def names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """(the subjectAltName entries, the CN) of ``cert``."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    entries = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    entries += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return entries, [str(a.value) for a in cert.subject.get_attributes_for_oid(
        NameOID.COMMON_NAME)]


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def test_a_rename_reissues_the_certificate_for_the_new_name_with_the_same_key(
        tmp_path: Path) -> None:
    first = procs.start_veil_server(tmp_path)
    port, state, old_key = first.port, first.state, first.key
    try:
        before = served_certificate(port)
    finally:
        procs.stop(first.proc)
    assert names(before) == (["127.0.0.1"], ["127.0.0.1"])

    renamed = procs.start_veil_server(tmp_path, "--public", f"localhost:{port}", port=port)
    try:
        after = served_certificate(port)
        print(f"before: {names(before)}; after: {names(after)}")
        assert names(after) == (["localhost"], ["localhost"])
        assert spki(after) == spki(before)  # the same key: every pin holds
        assert AccessKey.parse(old_key).pin == spki_pin(after)
        # The key handed out before the rename still connects (by address, no SNI) ...
        procs.stop(procs.start_veil_client(tmp_path, old_key).proc)
        # ... and a new one names the new name, which the certificate now names too.
        new_key = AccessKey.parse(renamed.add_user("bob"))
        assert new_key.sni == "localhost" and new_key.pin == AccessKey.parse(old_key).pin
        # (dialled at 127.0.0.1, where the server listens: "localhost" may resolve to ::1)
        dialled = dataclasses.replace(new_key, server=Address("127.0.0.1", port))
        procs.stop(procs.start_veil_client(tmp_path, dialled.to_uri()).proc)
    finally:
        procs.stop(renamed.proc)
    assert (state / "cert.pem").read_bytes() == after.public_bytes(serialization.Encoding.PEM)

    back = procs.start_veil_server(tmp_path, "--public", f"127.0.0.1:{port}", port=port)
    try:
        assert names(served_certificate(port)) == (["127.0.0.1"], ["127.0.0.1"])
    finally:
        procs.stop(back.proc)


def test_a_restart_under_the_same_name_keeps_the_certificate(tmp_path: Path) -> None:
    first = procs.start_veil_server(tmp_path)
    port = first.port
    procs.stop(first.proc)
    cert = (first.state / "cert.pem").read_bytes()
    again = procs.start_veil_server(tmp_path, "--public", f"127.0.0.1:{port}", port=port)
    procs.stop(again.proc)
    assert (first.state / "cert.pem").read_bytes() == cert
