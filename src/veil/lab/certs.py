"""Server certificates as a censor would score them.

A passive observer sees the certificate only in TLS 1.2 and older handshakes; with TLS 1.3
it is encrypted, and a censor fetches it actively (``veil lab probe`` does, with the SNI
the client used). The oddities scored are those that tell a proxy's certificate from a
public website's (net4people/bbs #129: the October 2022 wave; Frolov et al. 2020 on
probing): self-signed, a name that does not match the SNI, a validity that is expired, not
yet started, or longer than the 398 days public CAs may issue since September 2020 (CA/B
Forum Baseline Requirements 6.3.2), no subjectAltName at all, and the random host names of
Tor link certificates. An issuer that is not a public root is reported but not flagged
alone: private CAs are common, and a censor cannot see the chain in TLS 1.3 anyway.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from veil.lab.flow import Flow
from veil.lab.tls import read_handshake
from veil.lab.tornames import tor_certificate_names
from veil.lab.verdict import Verdict

NAME = "certificate"
SOURCE = "CA/B Forum BR 6.3.2 (398 days); net4people/bbs #129; Frolov et al. NDSS 2020"

MAX_PUBLIC_VALIDITY = datetime.timedelta(days=398)
SYSTEM_ROOTS = Path("/etc/ssl/certs/ca-certificates.crt")


def _common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else None
    return value if isinstance(value, str) else None


def names(der: bytes) -> tuple[str | None, str | None]:
    """(subject CN, issuer CN) of a DER certificate; (None, None) if it does not parse."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None, None
    return _common_name(cert.subject), _common_name(cert.issuer)


@functools.cache
def _public_root_subjects() -> frozenset[bytes]:
    try:
        with warnings.catch_warnings():
            # Some distribution roots have a non-positive serial number; only their names
            # are used here.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            roots = x509.load_pem_x509_certificates(SYSTEM_ROOTS.read_bytes())
    except (OSError, ValueError):
        return frozenset()
    return frozenset(r.subject.public_bytes() for r in roots)


def _hostname_matches(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


def _names_in(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    dns = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    ips = [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    return dns, ips


def score_certificate(der: bytes, server_name: str | None,
                      now: datetime.datetime | None = None) -> tuple[list[str], list[str]]:
    """(findings a censor acts on, other observations) for a leaf certificate."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return ["the certificate does not parse"], []
    now = now or datetime.datetime.now(datetime.UTC)
    bad: list[str] = []
    notes: list[str] = []
    subject_cn, issuer_cn = _common_name(cert.subject), _common_name(cert.issuer)
    if cert.issuer == cert.subject:
        try:
            cert.verify_directly_issued_by(cert)
            bad.append(f"self-signed ({subject_cn or cert.subject.rfc4514_string()!s})")
        except (ValueError, TypeError, InvalidSignature):
            notes.append("issuer equals subject but the signature is not its own")
    dns, ips = _names_in(cert)
    if not dns and not ips:
        bad.append("no subjectAltName (browsers ignore the CN since 2017)")
    if server_name:
        try:
            ip = ipaddress.ip_address(server_name)
        except ValueError:
            ip = None
        candidates = dns or ([subject_cn] if subject_cn else [])
        matched = (str(ip) in ips) if ip else any(_hostname_matches(p, server_name)
                                                  for p in candidates)
        if not matched:
            bad.append(f"name mismatch: {server_name!r} not in {dns or [subject_cn]}")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        bad.append(f"not valid before {start:%Y-%m-%d}")
    if now > end:
        bad.append(f"expired on {end:%Y-%m-%d}")
    if end - start > MAX_PUBLIC_VALIDITY:
        bad.append(f"validity of {(end - start).days} days (public CAs issue at most 398)")
    notes.append(f"valid {start:%Y-%m-%d} to {end:%Y-%m-%d} ({(end - start).days} days)")
    bad += tor_certificate_names(subject_cn, issuer_cn)
    roots = _public_root_subjects()
    if roots and cert.issuer.public_bytes() not in roots and cert.issuer != cert.subject:
        notes.append(f"issuer {issuer_cn or cert.issuer.rfc4514_string()!r} is not a "
                     "public root (an intermediate or a private CA)")
    return bad, notes


def judge_certificate(der: bytes, server_name: str | None) -> Verdict:
    bad, notes = score_certificate(der, server_name)
    labels = tuple(b.split(" ", 1)[0].rstrip(":(") for b in bad)
    return Verdict(NAME, bool(bad), tuple(bad + notes), labels,
                   details={"server_name": server_name})


def detect(flow: Flow) -> Verdict:
    handshake = read_handshake(flow)
    if handshake is None:
        return Verdict.not_applicable(NAME, "no TLS handshake")
    if not handshake.certificates:
        why = ("the certificate is encrypted (TLS 1.3): `veil lab probe` fetches it"
               if handshake.server_hello and handshake.server_hello.version >= 0x0304
               else "no certificate in the capture")
        return Verdict.not_applicable(NAME, why)
    sni = handshake.client_hello.server_name if handshake.client_hello else None
    return judge_certificate(handshake.certificates[0], sni)
