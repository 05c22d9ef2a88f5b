"""JA3 and JA4 against published vectors, and the browser comparison."""

from __future__ import annotations

import pytest

from tests.lab import synth
from veil.lab import fingerprint
from veil.lab.flow import Direction
from veil.lab.tls import parse_client_hello, read_handshake


def hello_of(record: bytes):  # type: ignore[no-untyped-def]
    flow = synth.tcp_flow([(Direction.CLIENT, record)])
    handshake = read_handshake(flow)
    assert handshake is not None and handshake.client_hello is not None
    return handshake.client_hello


# Chrome 143 as a public fingerprinting service reported it: the JA4, JA4_ro lists and JA3
# string. The ClientHello here is rebuilt from those lists, with GREASE values added in the
# places Chrome puts them, which every fingerprint must ignore.
CHROME_143 = synth.hello_from_lists(
    [0x4A4A, 0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC013,
     0xC014, 0x009C, 0x009D, 0x002F, 0x0035],
    [0x0A0A, 0x002D, 0x0033, 0x0010, 0xFE0D, 0x0017, 0x44CD, 0x0000, 0x000B, 0x000A, 0x002B,
     0xFF01, 0x0023, 0x0012, 0x0005, 0x000D, 0x001B, 0x5A5A],
    "h2", [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601],
    groups=[0x2A2A, 0x11EC, 0x001D, 0x0017, 0x0018])


def test_chrome_143_ja4_and_ja3() -> None:
    hello = hello_of(CHROME_143)
    fp = fingerprint.ja4(hello)
    assert str(fp) == "t13d1516h2_8daaf6152771_d8a2da3f94cd"
    assert fp.raw == (
        "t13d1516h2_002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,"
        "cca9_0005,000a,000b,000d,0012,0017,001b,0023,002b,002d,0033,44cd,fe0d,ff01_0403,0804,"
        "0401,0503,0805,0501,0806,0601")
    assert fingerprint.ja3_string(hello) == (
        "771,4865-4866-4867-49195-49199-49196-49200-52393-52392-49171-49172-156-157-47-53,"
        "45-51-16-65037-23-17613-0-11-10-43-65281-35-18-5-13-27,4588-29-23-24,0")
    assert fingerprint.ja3(hello) == "98487aa16281980e7d1120d399efb6a4"


# The JA4 reference implementation's test data (FoxIO ja4 repository, pcap vectors).
JA4_VECTORS = [
    pytest.param(
        [0x1301, 0x1303, 0x1302, 0xC02B, 0xC02F, 0xCCA9, 0xCCA8, 0xC02C, 0xC030, 0xC00A,
         0xC009, 0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035],
        [0x0000, 0x0017, 0xFF01, 0x000A, 0x000B, 0x0023, 0x0010, 0x0005, 0x0022, 0x0033,
         0x002B, 0x000D, 0x002D, 0x001C, 0x0015],
        "h2", [0x0403, 0x0503, 0x0603, 0x0804, 0x0805, 0x0806, 0x0401, 0x0501, 0x0601, 0x0203,
               0x0201],
        "t13d1715h2_5b57614c22b0_3d5424432f57", id="firefox"),
    pytest.param(
        [0xC030, 0xC02C, 0xC028, 0xC024, 0xC014, 0xC00A, 0x009F, 0x006B, 0x0039, 0xCCA9,
         0xCCA8, 0xCCAA, 0xFF85, 0x00C4, 0x0088, 0x0081, 0x009D, 0x003D, 0x0035, 0x00C0,
         0x0084, 0xC02F, 0xC02B, 0xC027, 0xC023, 0xC013, 0xC009, 0x009E, 0x0067, 0x0033,
         0x00BE, 0x0045, 0x009C, 0x003C, 0x002F, 0x00BA, 0x0041, 0xC011, 0xC007, 0x0005,
         0x0004, 0xC012, 0xC008, 0x0016, 0x000A, 0x00FF],
        [0x0000, 0x000B, 0x000A, 0x000D, 0x0010],
        "h2", [0x0601, 0x0603, 0xEFEF, 0x0501, 0x0503, 0x0401, 0x0403, 0xEEEE, 0xEDED, 0x0301,
               0x0303, 0x0201, 0x0203],
        "t12d4605h2_85626a9a5f7f_aaf95bb78ec9", id="tls12-46-ciphers"),
    pytest.param(
        [0xAAAA, 0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8,
         0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035],
        [0x6A6A, 0x000D, 0x0000, 0x000A, 0x0005, 0x000B, 0x002B, 0x001B, 0xFF01, 0x0033,
         0x4469, 0x002D, 0x0023, 0x0017, 0x0012, 0x0010, 0x0A0A, 0x0015],
        "h2", [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601],
        "t13d1516h2_8daaf6152771_e5627efa2ab1", id="chrome-grease"),
    pytest.param(
        [0xC02C, 0xC02B, 0xC030, 0xC02F, 0xC024, 0xC023, 0xC028, 0xC027, 0xC00A, 0xC009,
         0xC014, 0xC013, 0x009D, 0x009C, 0x003D, 0x003C, 0x0035, 0x002F, 0x000A],
        [0x0000, 0x0005, 0x000A, 0x000B, 0x000D, 0x0023, 0x0017, 0xFF01],
        None, [0x0804, 0x0805, 0x0806, 0x0401, 0x0501, 0x0201, 0x0403, 0x0503, 0x0203, 0x0202,
               0x0601, 0x0603],
        "t12d190800_d83cc789557e_7af1ed941c26", id="tls12-no-alpn"),
]


@pytest.mark.parametrize(("ciphers", "extensions", "alpn", "sigalgs", "expected"), JA4_VECTORS)
def test_ja4_reference_vectors(ciphers: list[int], extensions: list[int], alpn: str | None,
                               sigalgs: list[int], expected: str) -> None:
    hello = hello_of(synth.hello_from_lists(ciphers, extensions, alpn, sigalgs))
    if 0x002B not in extensions:
        assert hello.highest_version == 0x0303
    assert str(fingerprint.ja4(hello)) == expected


def test_ja4_specification_hashes() -> None:
    fp = fingerprint.Ja4(
        "t13d1516h2",
        ("002f", "0035", "009c", "009d", "1301", "1302", "1303", "c013", "c014", "c02b",
         "c02c", "c02f", "c030", "cca8", "cca9"),
        ("0005", "000a", "000b", "000d", "0012", "0015", "0017", "001b", "0023", "002b",
         "002d", "0033", "4469", "ff01"),
        ("0403", "0804", "0401", "0503", "0805", "0501", "0806", "0601"))
    assert (fp.b, fp.c) == ("8daaf6152771", "e5627efa2ab1")
    without_sigalgs = fingerprint.Ja4(fp.a, fp.ciphers, fp.extensions, ())
    assert without_sigalgs.c == "6d807ffa2a79"
    assert fingerprint.Ja4("t13i0000h2", (), (), ()).b == "000000000000"


def test_alpn_codes() -> None:
    def code(alpn: list[str]) -> str:
        hello = parse_client_hello(synth.client_hello_body(
            [0x1301], [(0x0010, synth.ext_alpn(alpn))] if alpn else []))
        assert hello is not None
        return fingerprint.ja4(hello).a[-2:]

    assert code(["http/1.1"]) == "h1"
    assert code(["h2", "http/1.1"]) == "h2"
    assert code([]) == "00"
    assert code(["\x00xy!"]) == "01"  # non-alphanumeric ends: first and last hex digit


def test_browsers_pass_and_openssl_is_flagged() -> None:
    assert not fingerprint.judge_hello(hello_of(CHROME_143)).flagged
    firefox = synth.hello_from_lists(*JA4_VECTORS[0].values[:4])  # type: ignore[arg-type]
    verdict = fingerprint.judge_hello(hello_of(firefox))
    assert not verdict.flagged and verdict.details["browser"] == "Firefox"

    openssl = fingerprint.judge_hello(hello_of(synth.openssl_client_hello(alpn=["http/1.1"])))
    assert openssl.flagged
    assert openssl.labels == ("non-browser-clienthello",)
    assert "matches no mainstream browser" in openssl.evidence[0]
    assert openssl.details["nearest_browser"] in ("Chrome", "Firefox")
    assert any("ALPN ['http/1.1']" in e for e in openssl.evidence)


def test_browsers_send_no_sni_to_an_ip_address() -> None:
    """Chrome connecting to an IP literal: no SNI extension, JA4 'i' and one extension less."""
    no_sni = synth.hello_from_lists(
        [0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC013, 0xC014,
         0x009C, 0x009D, 0x002F, 0x0035],
        [0x002D, 0x0033, 0x0010, 0xFE0D, 0x0017, 0x44CD, 0x000B, 0x000A, 0x002B, 0xFF01,
         0x0023, 0x0012, 0x0005, 0x000D, 0x001B],
        "h2", [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601],
        groups=[0x11EC, 0x001D, 0x0017, 0x0018])
    verdict = fingerprint.judge_hello(hello_of(no_sni))
    assert verdict.details["ja4"] == "t13i1515h2_8daaf6152771_d8a2da3f94cd"
    assert not verdict.flagged
    assert "known Chrome 143" in verdict.evidence[0] and "no SNI" in verdict.evidence[0]


def test_a_new_chrome_extension_set_is_still_chrome() -> None:
    """Chrome changes its extensions between versions; its cipher list names the family."""
    new = synth.hello_from_lists(
        [0x1A1A, 0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8,
         0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035],
        [0x002D, 0x0033, 0x0010, 0xFE0D, 0x0017, 0x11EC, 0x0000, 0x000B, 0x000A, 0x002B,
         0xFF01, 0x0023, 0x0012, 0x0005, 0x000D, 0x001B],
        "h2", [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601])
    verdict = fingerprint.judge_hello(hello_of(new))
    assert not verdict.flagged
    assert "Chrome's cipher list" in verdict.evidence[0]


def test_no_clienthello_is_not_applicable() -> None:
    flow = synth.tcp_flow([(Direction.CLIENT, b"GET / HTTP/1.1\r\n\r\n")])
    verdict = fingerprint.detect(flow)
    assert not verdict.applicable and not verdict.flagged
