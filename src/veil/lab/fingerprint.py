"""TLS ClientHello fingerprints (JA3, JA4) and how far a client is from a mainstream browser.

Written from the public specifications:

- JA3 (Salesforce, 2017): ``SSLVersion,Ciphers,Extensions,EllipticCurves,PointFormats``,
  decimal values joined by ``-`` in the order sent, GREASE values (RFC 8701) removed; the
  fingerprint is the MD5 of that string.
- JA4 (FoxIO, ``technical_details/JA4.md``): ``a_b_c`` where ``a`` is protocol (``t`` for
  TCP), version (highest supported_versions entry, else legacy version), ``d``/``i`` for
  SNI present or not, two-digit cipher and extension counts (GREASE removed, capped at 99)
  and the first and last characters of the first ALPN value (``00`` without ALPN; the
  first and last hex digits when either character is not alphanumeric); ``b`` is the first
  12 hex digits of SHA-256 of the sorted cipher list (4-digit hex, comma-separated); ``c``
  the same of the sorted extension list without SNI (0000) and ALPN (0010), then ``_`` and
  the signature algorithms in the order sent (no ``_`` when there are none).

The October 2022 blocking wave caught TLS proxies whose ClientHellos did not look like a
browser's (net4people/bbs #129), so the detector flags every ClientHello that does not match
a mainstream browser family: it measures whether a client blends in with browsers. curl,
Python and other OpenSSL clients are flagged too, by design; a real censor weighs this
signal with others (an SNI that names a website, where the flow goes, probing).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from veil.lab.flow import Flow
from veil.lab.tls import (
    EXT_ALPN,
    EXT_SERVER_NAME,
    ClientHello,
    is_grease,
    read_handshake,
)
from veil.lab.verdict import Verdict

NAME = "clienthello-fingerprint"
SOURCE = "JA3 (Salesforce 2017); JA4 (FoxIO JA4.md); net4people/bbs #129"

TLS_VERSIONS = {0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10", 0x0300: "s3",
                0x0200: "s2", 0x0100: "s1"}
EMPTY_HASH = "000000000000"


def _clean(values: tuple[int, ...]) -> list[int]:
    return [v for v in values if not is_grease(v)]


def ja3_string(hello: ClientHello) -> str:
    fields = [
        [hello.legacy_version],
        _clean(hello.ciphers),
        _clean(hello.extension_types),
        _clean(hello.supported_groups),
        list(hello.ec_point_formats),
    ]
    return ",".join("-".join(str(v) for v in f) for f in fields)


def ja3(hello: ClientHello) -> str:
    return hashlib.md5(ja3_string(hello).encode(), usedforsecurity=False).hexdigest()


def _alpn_code(hello: ClientHello) -> str:
    values = hello.alpn
    if not values or not values[0]:
        return "00"
    first = values[0]
    if first[0].isascii() and first[0].isalnum() and first[-1].isascii() and first[-1].isalnum():
        return first[0] + first[-1]
    hexed = first.encode("latin-1").hex()
    return hexed[0] + hexed[-1]


def _hash12(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Ja4:
    a: str
    ciphers: tuple[str, ...]
    """Sorted 4-digit hex cipher suites (GREASE removed)."""
    extensions: tuple[str, ...]
    """Sorted 4-digit hex extensions, without GREASE, SNI and ALPN."""
    signature_algorithms: tuple[str, ...]

    @property
    def b(self) -> str:
        return _hash12(",".join(self.ciphers)) if self.ciphers else EMPTY_HASH

    @property
    def c(self) -> str:
        if not self.extensions:
            return EMPTY_HASH
        text = ",".join(self.extensions)
        if self.signature_algorithms:
            text += "_" + ",".join(self.signature_algorithms)
        return _hash12(text)

    def __str__(self) -> str:
        return f"{self.a}_{self.b}_{self.c}"

    @property
    def raw(self) -> str:
        """JA4_r: the sorted lists in clear instead of their hashes."""
        tail = ",".join(self.extensions)
        if self.signature_algorithms:
            tail += "_" + ",".join(self.signature_algorithms)
        return f"{self.a}_{','.join(self.ciphers)}_{tail}"


def ja4(hello: ClientHello, transport: str = "t") -> Ja4:
    ciphers = _clean(hello.ciphers)
    extensions = _clean(hello.extension_types)
    version = TLS_VERSIONS.get(hello.highest_version, "00")
    sni = "d" if EXT_SERVER_NAME in extensions else "i"
    a = (f"{transport}{version}{sni}{min(len(ciphers), 99):02d}{min(len(extensions), 99):02d}"
         f"{_alpn_code(hello)}")
    return Ja4(
        a,
        tuple(sorted(f"{c:04x}" for c in ciphers)),
        tuple(sorted(f"{e:04x}" for e in extensions if e not in (EXT_SERVER_NAME, EXT_ALPN))),
        tuple(f"{s:04x}" for s in _clean(hello.signature_algorithms)),
    )


# ------------------------------------------------------------------ browsers
@dataclass(frozen=True)
class Browser:
    """A mainstream browser family. Its releases change their extension sets (JA4 ``c``
    and the extension count) but not their cipher list, so version, SNI, cipher count, ALPN
    and ``b`` name the family."""

    name: str
    version_sni_ciphers: str  # e.g. "t13d15": JA4 a's first six characters
    extension_counts: range
    alpn: str
    b: str
    known: dict[str, str]
    """Whole JA4 strings seen from released versions -> which version."""
    ciphers: tuple[str, ...]
    extensions: tuple[str, ...]


# JA4 values and raw lists published with the JA4 specification's examples and test data
# and in public fingerprint databases (see docs/lab.md); extend with --browsers FILE later.
BROWSERS = (
    Browser(
        "Chrome", "t13d15", range(15, 19), "h2", "8daaf6152771",
        {"t13d1516h2_8daaf6152771_e5627efa2ab1": "Chrome (JA4 test data, no ECH)",
         "t13d1516h2_8daaf6152771_9b887d9acb53": "Chrome resuming a session (JA4 test data)",
         "t13d1516h2_8daaf6152771_b186095e22b6": "Chrome (JA4 specification example)",
         "t13d1516h2_8daaf6152771_d8a2da3f94cd": "Chrome 143 (X25519MLKEM768, ECH)",
         "t13d1517h2_8daaf6152771_cb7bf5808d99": "Chromium 156 (Debian 12, tests/lab)"},
        ("002f", "0035", "009c", "009d", "1301", "1302", "1303", "c013", "c014", "c02b",
         "c02c", "c02f", "c030", "cca8", "cca9"),
        ("0005", "000a", "000b", "000d", "0012", "0017", "001b", "0023", "002b", "002d",
         "0033", "44cd", "fe0d", "ff01"),
    ),
    Browser(
        "Firefox", "t13d17", range(13, 19), "h2", "5b57614c22b0",
        {"t13d1715h2_5b57614c22b0_3d5424432f57": "Firefox 105",
         "t13d1715h2_5b57614c22b0_5c2c66f702b0": "Firefox with ECH"},
        ("002f", "0035", "009c", "009d", "1301", "1302", "1303", "c009", "c00a", "c013",
         "c014", "c02b", "c02c", "c02f", "c030", "cca8", "cca9"),
        ("0005", "000a", "000b", "000d", "0015", "0017", "001c", "0022", "0023", "002b",
         "002d", "0033", "ff01"),
    ),
)


def _jaccard(a: tuple[str, ...], b: tuple[str, ...]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def nearest_browser(fp: Ja4) -> tuple[Browser, float]:
    """The browser family whose cipher and extension sets are closest (mean Jaccard)."""
    scored = [(b, (_jaccard(fp.ciphers, b.ciphers) + _jaccard(fp.extensions, b.extensions)) / 2)
              for b in BROWSERS]
    return max(scored, key=lambda item: item[1])


def _with_sni(a: str) -> str:
    """JA4 ``a`` as it would read with an SNI: browsers omit SNI for IP addresses (RFC 6066
    3 forbids literal addresses), which turns ``d`` into ``i`` and drops one extension; the
    ``b`` and ``c`` parts do not change (SNI is not in ``c``)."""
    if a[3] != "i" or not a[6:8].isdigit():
        return a
    return f"{a[:3]}d{a[4:6]}{min(int(a[6:8]) + 1, 99):02d}{a[8:]}"


def browser_match(fp: Ja4) -> tuple[Browser, str] | None:
    """(family, how) when the fingerprint is a known browser's or shaped exactly like one."""
    a = _with_sni(fp.a)
    text = f"{a}_{fp.b}_{fp.c}"
    no_sni = " (no SNI: a connection to an IP address)" if a != fp.a else ""
    for browser in BROWSERS:
        if text in browser.known:
            return browser, f"known {browser.known[text]}{no_sni}"
        if (a.startswith(browser.version_sni_ciphers) and a[8:] == browser.alpn
                and int(a[6:8]) in browser.extension_counts and fp.b == browser.b):
            return browser, (f"{browser.name}'s cipher list, version, SNI and ALPN "
                             f"(extension set {fp.c} not in the table){no_sni}")
    return None


def judge_hello(hello: ClientHello) -> Verdict:
    fp = ja4(hello)
    details: dict[str, object] = {
        "ja4": str(fp), "ja4_r": fp.raw, "ja3": ja3(hello), "ja3_string": ja3_string(hello),
        "sni": hello.server_name, "alpn": list(hello.alpn)}
    match = browser_match(fp)
    if match is not None:
        browser, how = match
        details["browser"] = browser.name
        return Verdict(NAME, False, (f"JA4 {fp}: {how}", f"JA3 {details['ja3']}"),
                       details=details)
    near, score = nearest_browser(fp)
    details["nearest_browser"] = near.name
    details["similarity"] = round(score, 2)
    evidence = [
        f"JA4 {fp} matches no mainstream browser",
        f"nearest: {near.name} (JA4 {near.version_sni_ciphers}..{near.alpn}_{near.b}_...; "
        f"cipher/extension similarity {score:.2f})",
    ]
    if fp.b != near.b:
        evidence.append(f"cipher suites differ from {near.name}'s: "
                        f"{len(set(fp.ciphers) - set(near.ciphers))} extra, "
                        f"{len(set(near.ciphers) - set(fp.ciphers))} missing")
    if fp.a[8:] != near.alpn:
        evidence.append(f"ALPN {list(hello.alpn) or 'absent'} (browsers offer h2 first)")
    evidence.append(f"JA3 {details['ja3']}")
    return Verdict(NAME, True, tuple(evidence), ("non-browser-clienthello",), details=details)


def detect(flow: Flow) -> Verdict:
    handshake = read_handshake(flow)
    if handshake is None or handshake.client_hello is None:
        return Verdict.not_applicable(NAME, "no TLS ClientHello")
    return judge_hello(handshake.client_hello)
