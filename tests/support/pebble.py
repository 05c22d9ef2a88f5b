"""A real ACME CA for tests: Debian's ``pebble`` (Let's Encrypt's test CA) with real
validation, resolving names through a small DNS server the test runs on loopback.

Pebble validates TLS-ALPN-01 by connecting to the address its resolver gives for the name, on
the ``tlsPort`` of its config (the veil server's port here, 443 in the wild). Nothing is
switched off: no PEBBLE_VA_ALWAYS_VALID. PEBBLE_VA_NOSLEEP=1 only skips the random wait
(up to 15 s) Pebble puts before each validation to imitate a busy CA.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from tests.support import procs
from tests.support.cdn import make_ca_and_leaf

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
# Tries at starting Pebble on ports that turn out taken (procs.unused_port) before giving up.
PEBBLE_BIND_ATTEMPTS = 3
# The lifetime of the certificates Pebble issues: Let's Encrypt's 90 days, not Pebble's default
# of 5 years (which a censor's certificate check flags: public CAs issue at most 398 days).
CERTIFICATE_VALIDITY_S = 90 * 24 * 3600
# A DNS query fits one datagram (RFC 1035: 512 bytes without EDNS; Go's resolver asks with
# EDNS 1232).
DNS_DATAGRAM = 4096


class NameServer:
    """Answers A queries for the names in ``addresses`` (name -> IPv4) on 127.0.0.1, UDP;
    any other question gets an empty NOERROR answer (no AAAA, no CAA: nothing forbids issuing),
    and unknown names NXDOMAIN."""

    def __init__(self, addresses: dict[str, str]) -> None:
        self.addresses = addresses
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self._closing = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(DNS_DATAGRAM)
            except OSError:
                return
            if self._closing:
                return
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:  # a malformed datagram: ignored, as resolvers do
                continue
            answer = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text(omit_final_dot=True).lower()
            if name not in self.addresses:
                answer.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.A:
                answer.answer.append(dns.rrset.from_text(question.name, 1, "IN", "A",
                                                         self.addresses[name]))
            with contextlib.suppress(OSError):
                self.sock.sendto(answer.to_wire(), peer)

    def close(self) -> None:
        # A socket closed under a thread's recvfrom does not wake it: a datagram does.
        self._closing = True
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"", ("127.0.0.1", self.port))
        self._thread.join(timeout=5)
        self.sock.close()


@dataclass
class Pebble:
    proc: subprocess.Popen[bytes]
    #: The ACME directory URL.
    directory: str
    #: The CA that signed Pebble's own HTTPS certificate (--acme-ca-bundle).
    ca_bundle: Path
    management_port: int
    log: Path

    def issuing_root(self) -> bytes:
        """The root Pebble signs its chains up to (PEM), made anew at each Pebble start."""
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        url = f"https://localhost:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=context, timeout=10) as answer:
            return bytes(answer.read())


@contextlib.contextmanager
def pebble(workdir: Path, tls_port: int, dns_port: int, *,
           nonce_reject_percent: int = 0) -> Iterator[Pebble]:
    """A running Pebble whose TLS-ALPN-01 validations dial ``tls_port`` of the address the
    name server on ``dns_port`` gives."""
    workdir.mkdir(parents=True, exist_ok=True)
    ca_bundle = make_ca_and_leaf(workdir, "localhost")
    # Every order is validated (no authorization reused from an earlier one: Pebble reuses
    # half by default), so each test's outcome is its own validation's.
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_AUTHZREUSE": "0",
           "PEBBLE_WFE_NONCEREJECT": str(nonce_reject_percent)}
    for attempt in range(PEBBLE_BIND_ATTEMPTS):
        port, management = procs.unused_port(), procs.unused_port()
        config = workdir / "pebble-config.json"
        config.write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{port}",
            "managementListenAddress": f"127.0.0.1:{management}",
            "certificate": str(workdir / "cdn-cert.pem"),
            "privateKey": str(workdir / "cdn-key.pem"),
            "httpPort": procs.unused_port(), "tlsPort": tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
            "certificateValidityPeriod": CERTIFICATE_VALIDITY_S}}))
        log = procs.new_log(workdir, "pebble")
        with open(log, "wb") as out:
            proc = subprocess.Popen([PEBBLE, "-config", str(config),
                                     "-dnsserver", f"127.0.0.1:{dns_port}"],
                                    stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            procs.wait_port(port, proc=proc)
            procs.wait_port(management, proc=proc)
        except RuntimeError:
            procs.stop(proc)
            if attempt + 1 == PEBBLE_BIND_ATTEMPTS:
                raise RuntimeError(f"pebble did not start: {log.read_text()[-2000:]}") from None
            continue
        try:
            yield Pebble(proc, f"https://localhost:{port}/dir", ca_bundle, management, log)
        finally:
            procs.stop(proc)
        return
