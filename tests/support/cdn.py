"""A real nginx set up as a CDN in front of veil: its own certificate (from a test CA the
client trusts through a CA file), request buffering on, a 100 s read timeout, HTTP/1.1 and
WebSocket upgrade headers towards veil's port over https; optionally h2 towards clients (as a
CDN speaks to browsers). Its access log (``Cdn.requests()``) says which HTTP each request
came in."""

from __future__ import annotations

import contextlib
import datetime
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import procs

CDN_NAME = "cdn.test"

CDN_CONF = procs.NGINX_MAIN + """http {{
    log_format cdn '$server_protocol $request_method $status';
    access_log {prefix}/access.log cdn;
""" + procs.NGINX_TEMP_PATHS + """\
    map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
    # A CDN keeps its connections to an origin open for the next request (Cloudflare does).
    upstream origin {{
        server {origin};
        keepalive 16;
    }}
    server {{
        listen {listen} ssl{http2};
        server_name {name};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {prefix}/cdn-cert.pem;
        ssl_certificate_key {prefix}/cdn-key.pem;
        keepalive_requests {keepalive_requests};
        location / {{
            proxy_pass https://origin;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_request_buffering on;
            proxy_read_timeout {read_timeout}s;
            proxy_send_timeout {read_timeout}s;
        }}
    }}
}}
"""


@dataclass
class Cdn:
    port: int
    ca_file: Path
    prefix: Path

    def requests(self) -> list[str]:
        """``PROTOCOL METHOD STATUS`` per request the CDN has finished (``HTTP/2.0 POST 200``)."""
        log = self.prefix / "access.log"
        return log.read_text().splitlines() if log.exists() else []


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca_and_leaf(directory: Path, name: str) -> Path:
    """A CA (ca.pem) and a leaf for ``name`` it signed (cdn-cert.pem, cdn-key.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "veil test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "cdn-cert.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (directory / "cdn-key.pem").write_bytes(_pem_key(key))
    return directory / "ca.pem"


@contextlib.contextmanager
def cdn_nginx(origin_port: int, name: str = CDN_NAME, read_timeout: int = 100,
              http2: bool = False, keepalive_requests: int = 1000) -> Iterator[Cdn]:
    """nginx as a CDN on a loopback port, in front of https://127.0.0.1:``origin_port``,
    with a certificate for ``name`` (``localhost`` for a client that resolves the name),
    cutting a request silent for ``read_timeout`` seconds (Cloudflare's 100 s), offering h2
    in ALPN when ``http2`` (``listen ... ssl http2``), and closing a client connection (h2:
    GOAWAY) after ``keepalive_requests`` requests (nginx's default 1,000)."""
    prefix = Path(tempfile.mkdtemp(prefix="veil-cdn-"))
    try:
        ca_file = make_ca_and_leaf(prefix, name)
        for attempt in range(procs.NGINX_BIND_ATTEMPTS):
            port = procs.unused_port()
            (prefix / "nginx.conf").write_text(CDN_CONF.format(
                prefix=prefix, listen=f"127.0.0.1:{port}", name=name,
                origin=f"127.0.0.1:{origin_port}", read_timeout=read_timeout,
                http2=" http2" if http2 else "", keepalive_requests=keepalive_requests))
            proc = subprocess.Popen([procs.NGINX, "-p", str(prefix), "-c",
                                     str(prefix / "nginx.conf")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                procs.wait_port(port, proc=proc)
                break
            except RuntimeError:
                procs.stop(proc)
                if attempt == procs.NGINX_BIND_ATTEMPTS - 1:
                    raise
        try:
            yield Cdn(port, ca_file, prefix)
        finally:
            procs.stop(proc)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
