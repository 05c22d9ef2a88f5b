"""The ClientHello veil builds from its Chrome profile, and the JA4 used to compare it.

The comparison with a real Chromium is tests/integration/test_chrome_fingerprint.py; these run
without one (the reference JA4 below was taken from Chromium 156's captured hello).
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from tests.unit.tls13_support import (
    ParsedHello,
    ja4,
    ja4_cipher_hash,
    ja4_extension_hash,
    parse_client_hello,
)
from veil.transport.tls13.hello import new_hello, retry_hello, sni_for
from veil.transport.tls13.profile import CHROME
from veil.transport.tls13.wire import ExtensionType, NamedGroup, is_grease

E = ExtensionType
# Chromium 156 (Debian 12), captured by tests/integration/test_chrome_fingerprint.py.
CHROME_JA4_SNI = "t13d1517h2_8daaf6152771_cb7bf5808d99"
CHROME_JA4_IP = "t13i1516h2_8daaf6152771_cb7bf5808d99"


def hello_for(host: str | None, seed: int | None = None) -> ParsedHello:
    rng = random.Random(seed) if seed is not None else None
    _, message = new_hello(CHROME, host, rng)
    parsed, _ = parse_client_hello(b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message)
    return parsed


def test_ja4_of_the_specification_examples() -> None:
    ciphers = [0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC013,
               0xC014, 0x009C, 0x009D, 0x002F, 0x0035]
    assert ja4_cipher_hash(ciphers) == "8daaf6152771"
    exts = [0x001B, 0x0000, 0x0033, 0x0010, 0x4469, 0x0017, 0x002D, 0x000D, 0x0005, 0x0023,
            0x0012, 0x002B, 0xFF01, 0x000B, 0x000A, 0x0015]
    sigalgs = [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]
    assert ja4_extension_hash(exts, sigalgs=sigalgs) == "e5627efa2ab1"
    assert ja4_extension_hash(exts, sigalgs=[]) == "6d807ffa2a79"


@pytest.mark.parametrize("host,expected", [("veil.test", CHROME_JA4_SNI),
                                           ("192.0.2.1", CHROME_JA4_IP),
                                           ("[2001:db8::1]", CHROME_JA4_IP)])
def test_ja4_is_chromes(host: str, expected: str) -> None:
    assert ja4(hello_for(host)) == expected


def test_sni_is_the_name_and_none_for_ip_literals() -> None:
    assert hello_for("Veil.Test.").server_name == "veil.test"
    assert hello_for("10.0.0.1").server_name is None
    assert sni_for(None) is None and sni_for("::1") is None


def test_grease_everywhere_chrome_puts_it() -> None:
    hello = hello_for("veil.test")
    assert is_grease(hello.cipher_suites[0])
    types = hello.extension_types
    assert is_grease(types[0]) and is_grease(types[-1]) and types[0] != types[-1]
    assert hello.ext(types[0]) == b"" and hello.ext(types[-1]) == b"\x00"
    assert is_grease(hello.supported_groups[0]) and is_grease(hello.supported_versions[0])
    shares = hello.key_shares
    assert shares[0] == (hello.supported_groups[0], b"\x00")  # the same GREASE group
    assert [(g, len(k)) for g, k in shares[1:]] == [(NamedGroup.X25519MLKEM768, 1216),
                                                    (NamedGroup.X25519, 32)]


def test_every_connection_differs_in_random_values_and_order() -> None:
    hellos = [hello_for("veil.test") for _ in range(8)]
    assert len({h.random for h in hellos}) == 8
    assert len({h.session_id for h in hellos}) == 8 and len(hellos[0].session_id) == 32
    assert len({tuple(h.extension_types[1:-1]) for h in hellos}) > 1
    assert len({sorted(h.extension_types[1:-1]).__repr__() for h in hellos}) == 1


def test_seeded_rng_reproduces_the_hello_except_key_shares() -> None:
    a, b = hello_for("veil.test", seed=5), hello_for("veil.test", seed=5)
    assert (a.random, a.extension_types) == (b.random, b.extension_types)
    assert a.key_shares != b.key_shares  # keys come from the OS, never from a seed


def test_padding_applies_to_hellos_of_256_to_511_bytes() -> None:
    # Without the ML-KEM share the hello is ~600 bytes; without ECH and with fewer suites it
    # falls in BoringSSL's padding window and is padded to exactly 512 bytes.
    small = dataclasses.replace(
        CHROME, key_share_groups=(-1, NamedGroup.X25519), ech_grease=None,
        cipher_suites=CHROME.cipher_suites[:4])
    _, message = new_hello(small, "veil.test")
    parsed, _ = parse_client_hello(b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message)
    assert E.PADDING in parsed.extension_types
    assert len(message) == 512
    assert parsed.extension_types[-1] == E.PADDING  # after the last GREASE, as BoringSSL
    assert E.PADDING not in hello_for("veil.test").extension_types


def test_second_hello_after_retry() -> None:
    ctx, first_message = new_hello(CHROME, "veil.test")
    first, _ = parse_client_hello(b"\x16\x03\x01" + len(first_message).to_bytes(2, "big")
                                  + first_message)
    second_message = retry_hello(ctx, NamedGroup.SECP384R1, b"cookie")
    second, _ = parse_client_hello(b"\x16\x03\x03" + len(second_message).to_bytes(2, "big")
                                   + second_message)
    assert second.random == first.random and second.session_id == first.session_id
    assert [t for t in second.extension_types if t != E.COOKIE] == first.extension_types
    assert [(g, len(k)) for g, k in second.key_shares] == [(NamedGroup.SECP384R1, 97)]
    assert second.ext(E.ENCRYPTED_CLIENT_HELLO) == first.ext(E.ENCRYPTED_CLIENT_HELLO)
