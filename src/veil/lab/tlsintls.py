"""Encapsulated TLS handshakes: a TLS tunnel whose first records betray an inner handshake.

Source: Diwen Xue et al., "Fingerprinting Obfuscated Proxy Traffic with Encapsulated TLS
Handshakes", USENIX Security 2024. A proxy that relays a browser's HTTPS inside its own TLS
connection forwards the inner handshake message by message, so the outer records show its
sizes and directions: a client record of about ClientHello size, then a larger server burst
(the inner ServerHello, certificate and Finished), then a small client record (the inner
client Finished), then the inner application data. The paper trains classifiers on these
features; this detector is the rule that their features encode, written out:

1. parse the outer connection's records; skip the outer handshake (up to the client's
   Finished, the first encrypted client record);
2. group the application-data records into bursts (consecutive records in one direction);
3. flag the flow if, among its first ``MAX_BURSTS`` bursts, a client burst whose payload is
   ClientHello-sized (``INNER_HELLO``) is followed by a server burst of at least
   ``INNER_SERVER_FLIGHT`` bytes and then by a client burst that opens with a
   Finished-sized record (``INNER_FINISHED``).

Record payload sizes are the ciphertext lengths less the AEAD overhead (17 bytes in TLS 1.3:
tag and content type; 24 in TLS 1.2 GCM: explicit nonce and tag). The tunnel's own framing
is not subtracted (a censor does not know it), so the ranges are wide enough for a few
dozen bytes of it. Padding the first flights to sizes unrelated to the inner handshake (XTLS
Vision, NaiveProxy) or multiplexing streams defeats this rule, as the paper reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.lab.flow import Direction, Flow
from veil.lab.tls import (
    APPLICATION_DATA,
    CHANGE_CIPHER_SPEC,
    HANDSHAKE,
    Record,
    flow_records,
    read_handshake,
)
from veil.lab.verdict import Verdict

NAME = "tls-in-tls"
SOURCE = "Xue et al., USENIX Security 2024"

# An inner ClientHello: OpenSSL's ~250-520 bytes, Chrome's 517 (padded) to ~1,800 with a
# post-quantum key share; plus the tunnel's framing.
INNER_HELLO = range(180, 2201)
# The inner server flight: ServerHello (~90-130) + encrypted extensions, certificate (an
# EC self-signed certificate is ~400 bytes), CertificateVerify and Finished.
INNER_SERVER_FLIGHT = 400
# The inner client Finished: TLS 1.3 ChangeCipherSpec (6) + Finished record (58) = 64 bytes;
# TLS 1.2 ClientKeyExchange + ChangeCipherSpec + Finished ~ 130; plus framing.
INNER_FINISHED = range(30, 221)
MAX_BURSTS = 16
#: Records in the inner ClientHello's burst: the ClientHello, and the few small records a
#: tunnel writes before it for the same connection (its open request, a SOCKS exchange's
#: framing: a naive CDN carrier measured 56+32+40 before its 551-byte ClientHello). With 3
#: the rule matched such a carrier only when a server record happened to split that burst.
MAX_HELLO_RECORDS = 4
AEAD_OVERHEAD = {0x0304: 17, 0x0303: 24}


@dataclass(frozen=True)
class Burst:
    direction: Direction
    sizes: tuple[int, ...]
    """Estimated plaintext size of each record in the burst."""

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def describe(self) -> str:
        who = "client" if self.direction is Direction.CLIENT else "server"
        sizes = "+".join(str(s) for s in self.sizes[:6]) + ("+..." if len(self.sizes) > 6 else "")
        return f"{who} {self.total} B ({sizes})"


def _after_outer_handshake(records: list[Record], version: int) -> list[Record]:
    """The application-data records that follow the client's Finished."""
    client_ccs_seen = False
    for i, record in enumerate(records):
        if record.direction is not Direction.CLIENT:
            continue
        if version >= 0x0304 and record.content_type == APPLICATION_DATA:
            start = i + 1  # this one is the client's Finished
            break
        if record.content_type == CHANGE_CIPHER_SPEC:
            client_ccs_seen = True
        elif client_ccs_seen and record.content_type == HANDSHAKE:
            start = i + 1  # TLS 1.2: the encrypted Finished
            break
    else:
        return []
    return [r for r in records[start:] if r.content_type == APPLICATION_DATA]


def bursts(records: list[Record], overhead: int) -> list[Burst]:
    out: list[Burst] = []
    current: list[int] = []
    direction: Direction | None = None
    for record in records:
        if record.direction is not direction and current:
            assert direction is not None
            out.append(Burst(direction, tuple(current)))
            current = []
        direction = record.direction
        current.append(max(record.length - overhead, 0))
    if current and direction is not None:
        out.append(Burst(direction, tuple(current)))
    return out


def find_inner_handshake(seq: list[Burst]) -> tuple[Burst, Burst, Burst] | None:
    window = seq[:MAX_BURSTS]
    for i in range(len(window) - 2):
        hello, flight, finished = window[i], window[i + 1], window[i + 2]
        if (hello.direction is Direction.CLIENT and len(hello.sizes) <= MAX_HELLO_RECORDS
                and hello.total in INNER_HELLO
                and flight.direction is Direction.SERVER
                and flight.total >= INNER_SERVER_FLIGHT
                and finished.direction is Direction.CLIENT
                and finished.sizes[0] in INNER_FINISHED):
            return hello, flight, finished
    return None


def detect(flow: Flow) -> Verdict:
    handshake = read_handshake(flow)
    if handshake is None or handshake.server_hello is None:
        return Verdict.not_applicable(NAME, "no outer TLS handshake")
    version = handshake.server_hello.version
    records = _after_outer_handshake(flow_records(flow), version)
    seq = bursts(records, AEAD_OVERHEAD.get(version, 24))
    details = {"bursts": [[b.direction.value, list(b.sizes[:8])] for b in seq[:MAX_BURSTS]]}
    if not seq:
        return Verdict(NAME, False, ("no application data after the outer handshake",),
                       details=details)
    found = find_inner_handshake(seq)
    if found is None:
        return Verdict(NAME, False, (
            "no ClientHello-sized client burst followed by a server flight and a "
            "Finished-sized client record in the first "
            f"{min(len(seq), MAX_BURSTS)} bursts",), details=details)
    hello, flight, finished = found
    return Verdict(NAME, True, (
        f"inner ClientHello: {hello.describe()}",
        f"inner server flight: {flight.describe()}",
        f"inner client Finished: client record of {finished.sizes[0]} B",
    ), ("encapsulated-tls-handshake",), details=details)
