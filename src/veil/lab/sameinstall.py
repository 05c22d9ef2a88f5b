"""Same-install fingerprint: do two hosts serve the same default site?

A scanner that knows one default install fetches a few paths from every host and compares:
scans once listed default Shadowsocks and Trojan pages this way, and a veil build with one
shipped site would be listed the same way (same title, page digests, ETags). What two
unrelated nginx sites may share is not a tell: the Server header, nginx's error pages, the
absence of a file, a common robots.txt text, a certificate lifetime that CAs and ``openssl
req`` use, or the certificate's host name (both hosts are the same address in the lab).

:func:`scan` records what a stranger sees; :func:`compare` lists what two scans share that
unrelated sites would not.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.client
import re
import ssl
from dataclasses import dataclass, field
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from veil.lab.verdict import Verdict

NAME = "same-install"
SOURCE = "scans for default pages of proxy software (Shadowsocks, Trojan panels)"

# A scanner's patience per request (a slow host is skipped, not waited for).
TIMEOUT = 10.0
# Pages linked from / that are fetched too: a scanner looks at a few, not the whole site.
MAX_LINKED = 4
# At most this much of a body is read: a small static page is far less; a larger one is
# digested by its first megabyte.
MAX_BODY = 1 << 20
# A path no site has, for the 404 page.
MISSING = "/veil-lab-no-such-page-4f1c"
# Lifetimes (days) real certificates share: openssl req's default and `-days` habits,
# ACME's 90 days (Let's Encrypt's ends one second early), the CA/B Forum's 397/398, 825.
COMMON_LIFETIME_DAYS = frozenset({30, 90, 180, 365, 366, 397, 398, 730, 825, 3650})
# openssl req's default subject, accepted by pressing Enter: shared by unrelated hosts.
OPENSSL_DEFAULT_SUBJECT = "C=AU,ST=Some-State,O=Internet Widgits Pty Ltd"

_HREF = re.compile(rb'href="(/[^"/?#][^"?#]*)"')
_TITLE = re.compile(rb"<title>(.*?)</title>", re.S | re.I)


@dataclass(frozen=True)
class Fetched:
    status: int
    etag: str | None
    last_modified: str | None
    digest: str


@dataclass
class InstallView:
    """What a scanner saw of one host."""

    title: str | None = None
    links: tuple[str, ...] = ()
    pages: dict[str, Fetched] = field(default_factory=dict)
    certificate: dict[str, str] = field(default_factory=dict)


def scan(host: str, port: int, *, tls: bool = True, server_name: str | None = None
         ) -> InstallView:
    """Fetch /, up to :data:`MAX_LINKED` pages it links to, /robots.txt, /favicon.ico and a
    missing page, over HTTP/1.1 (TLS unverified, as scanners do), and the certificate."""
    view = InstallView()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    def get(path: str) -> tuple[Fetched, bytes]:
        conn: http.client.HTTPConnection
        if tls:
            conn = http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        try:
            conn.request("GET", path, headers={"Host": server_name or host,
                                               "User-Agent": "Mozilla/5.0"})
            resp = conn.getresponse()
            body = resp.read(MAX_BODY)
            if tls and not view.certificate and conn.sock is not None:
                der = cast(ssl.SSLSocket, conn.sock).getpeercert(binary_form=True)
                if der:
                    view.certificate = certificate_features(der, host)
            return Fetched(resp.status, resp.getheader("ETag"), resp.getheader("Last-Modified"),
                           hashlib.sha256(body).hexdigest()), body
        finally:
            conn.close()

    root, body = get("/")
    view.pages["/"] = root
    if match := _TITLE.search(body):
        view.title = match.group(1).decode("utf-8", "replace").strip()
    links = []
    for href in _HREF.findall(body):
        path = href.decode("utf-8", "replace")
        if path not in links and not path.endswith((".css", ".ico")):
            links.append(path)
    view.links = tuple(sorted(links))
    for path in [*links[:MAX_LINKED], "/robots.txt", "/favicon.ico", MISSING]:
        with contextlib.suppress(OSError, http.client.HTTPException):
            view.pages[path] = get(path)[0]
    return view


def split_target(target: str) -> tuple[str, int, bool]:
    """(host, port, tls) of ``HOST:PORT`` (TLS), ``https://HOST[:PORT]`` or
    ``http://HOST[:PORT]``; a ValueError names what was expected."""
    tls = True
    rest = target
    for scheme, default_port, over_tls in (("https://", 443, True), ("http://", 80, False)):
        if target.lower().startswith(scheme):
            rest, tls = target[len(scheme):].rstrip("/"), over_tls
            if not rest.rpartition(":")[2].isdigit() or rest.endswith("]"):
                rest = f"{rest}:{default_port}"
            break
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host or "/" in rest:
        raise ValueError(f"expected HOST:PORT or https://HOST[:PORT], got {target!r}")
    return host.strip("[]"), int(port), tls


def certificate_features(der: bytes, host: str) -> dict[str, str]:
    """What a certificate shows that is not the host's own name."""
    cert = x509.load_der_x509_certificate(der)
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        key_type = f"RSA-{key.key_size}"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key_type = key.curve.name
    else:
        key_type = type(key).__name__
    subject = ",".join(a.rfc4514_string() for a in cert.subject
                       if a.oid != x509.oid.NameOID.COMMON_NAME)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return {"key": key_type, "subject": subject,
            "self_signed": str(cert.issuer == cert.subject),
            "lifetime_s": str(int(lifetime.total_seconds())),
            "extensions": ",".join(sorted(e.oid.dotted_string for e in cert.extensions)),
            "host": host}


def _common_lifetime(seconds: int) -> bool:
    day = int(datetime.timedelta(days=1).total_seconds())
    return any(abs(seconds - days * day) <= 1 for days in COMMON_LIFETIME_DAYS)


def compare(a: InstallView, b: InstallView) -> Verdict:
    """Flagged when ``a`` and ``b`` share what unrelated sites would not: the same title,
    the same set of linked pages, a page (robots.txt aside) with the same bytes, ETag or
    Last-Modified, or a certificate pattern (subject, lifetime) no common issuer uses.

    ``details`` holds both scans (``a``, ``b``, as :func:`side_by_side` lays them out) and
    the shared items, in words (``shared``) and as the side-by-side row names
    (``shared_items``)."""
    shared: list[tuple[str, str]] = []  # (row name, evidence)
    if a.title is not None and a.title == b.title:
        shared.append(("title", f"title {a.title!r}"))
    if a.links and a.links == b.links:
        shared.append(("links", f"the same pages linked from /: {', '.join(a.links)}"))
    for path in sorted(a.pages.keys() & b.pages.keys()):
        pa, pb = a.pages[path], b.pages[path]
        if pa.status != 200 or pb.status != 200:
            continue  # nginx's own error pages, and absent files, are every nginx's
        if pa.etag and pa.etag == pb.etag:
            shared.append((f"{path} etag", f"{path}: ETag {pa.etag}"))
        if pa.last_modified and pa.last_modified == pb.last_modified:
            shared.append((f"{path} last_modified", f"{path}: Last-Modified {pa.last_modified}"))
        if pa.digest == pb.digest and path != "/robots.txt":
            shared.append((f"{path} sha256", f"{path}: the same bytes"))
    ca, cb = a.certificate, b.certificate
    if ca and cb:
        if ca["subject"] and ca["subject"] == cb["subject"] and \
                ca["subject"] != OPENSSL_DEFAULT_SUBJECT:
            shared.append(("certificate subject", f"certificate subject {ca['subject']}"))
        if ca["lifetime_s"] == cb["lifetime_s"] and not _common_lifetime(int(ca["lifetime_s"])):
            shared.append(("certificate lifetime_s",
                           f"certificate lifetime {ca['lifetime_s']} s, which no common issuer "
                           "uses"))
    texts = [text for _, text in shared]
    evidence = tuple(texts) if texts else ("nothing shared that unrelated sites would not",)
    return Verdict(NAME, bool(shared), evidence, ("same-install",) if shared else (),
                   details={"a": _summary(a), "b": _summary(b), "shared": texts,
                            "shared_items": [item for item, _ in shared]})


@dataclass(frozen=True)
class SideBySide:
    """One row of two scans side by side: what each host showed, and whether it is a tell
    (``shared``), the same but common to unrelated nginx sites (``same``) or different."""

    item: str
    a: str
    b: str
    status: str  # "shared", "same" or "differs"


def side_by_side(details: dict[str, Any]) -> list[SideBySide]:
    """The rows of a :func:`compare` verdict's ``details``: title, links, each page's status,
    ETag, Last-Modified and digest, each certificate feature (the host name aside: in the lab
    both hosts are one address)."""
    a, b = details.get("a") or {}, details.get("b") or {}
    tells = set(details.get("shared_items", ()))
    cells: list[tuple[str, object, object]] = [
        ("title", a.get("title"), b.get("title")),
        ("links", ", ".join(a.get("links", ())), ", ".join(b.get("links", ())))]
    pages_a, pages_b = a.get("pages", {}), b.get("pages", {})
    for path in sorted(pages_a.keys() | pages_b.keys()):
        pa, pb = pages_a.get(path, {}), pages_b.get(path, {})
        for field_name in ("status", "etag", "last_modified", "sha256"):
            cells.append((f"{path} {field_name}", pa.get(field_name), pb.get(field_name)))
    cert_a, cert_b = a.get("certificate", {}), b.get("certificate", {})
    for name in sorted((cert_a.keys() | cert_b.keys()) - {"host"}):
        cells.append((f"certificate {name}", cert_a.get(name), cert_b.get(name)))
    rows = []
    for item, va, vb in cells:
        text_a, text_b = ("-" if v is None or v == "" else str(v) for v in (va, vb))
        status = "shared" if item in tells else "same" if text_a == text_b else "differs"
        rows.append(SideBySide(item, text_a, text_b, status))
    return rows


def _summary(view: InstallView) -> dict[str, object]:
    return {"title": view.title, "links": list(view.links),
            "pages": {p: {"status": f.status, "etag": f.etag, "last_modified": f.last_modified,
                          "sha256": f.digest[:16]} for p, f in view.pages.items()},
            "certificate": view.certificate}
