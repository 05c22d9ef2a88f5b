"""Borrowed identity: does a server that relays strangers to a real site answer its own
clients, and replayers, with that site's handshake?

A server in REALITY's manner relays every stranger's TLS connection to a real website (the
*target*) and completes the handshake itself only for its own clients. It is found out where
its own handshake differs from the target's answer to the same ClientHello:

- *Passively* (a censor compares flows to one address): the ServerHello's fields and
  extension order, the number and sizes of the encrypted records of the server's first flight
  (its certificate's size shows through), and the records the server sends right after the
  client's Finished: OpenSSL sends two NewSessionTickets of one size there, and an HTTP/2
  server its SETTINGS. REALITY sent none of the tickets, and was found by exactly that
  (the "Aparecium" tool, 2025: XTLS/Xray-core #4778, net4people/bbs #481).
- *Actively* (a prober replays a recorded ClientHello of a client): a server that accepts a
  replayed hello answers with its own handshake, not the target's; a replayer that cannot
  finish it sees records that do not advance.

The lab only sees bytes: :func:`flow_shape` reads a recorded connection, :func:`answer_shape`
the bytes a prober got back; :func:`differences` names what differs from a reference (the
target's own answer to the same or an equivalent ClientHello). :func:`replay_hello` is the
prober's side: send a recorded ClientHello and read the first flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import struct
import time
from dataclasses import dataclass, field

from veil.lab.flow import Direction, Flow
from veil.lab.tls import (
    ALERT,
    APPLICATION_DATA,
    CHANGE_CIPHER_SPEC,
    HANDSHAKE,
    HS_SERVER_HELLO,
    RECORD_HEADER,
    Record,
    split_records,
)
from veil.lab.verdict import Verdict

NAME = "borrowed-identity"
SOURCE = "Aparecium (XTLS/Xray-core #4778, net4people/bbs #481, 2025); REALITY's replay tells"

# The records after the client's Finished that are compared: OpenSSL's two NewSessionTickets
# and an HTTP/2 server's SETTINGS, all sent before the server reads a request, so the same
# for every client; past them come answers to what the client asked, which differ by design.
POST_HANDSHAKE_RECORDS = 3
# How far one record's size may differ between two handshakes of the same server to the same
# ClientHello: nginx's tickets hold its session state encrypted in AES-CBC, whose length
# crosses a 16-byte block boundary from one connection to the next (measured: 282 or 298
# bytes, nginx 1.22 / OpenSSL 3.0), and an ECDSA signature's DER varies by a byte or two. A
# server of its own shows other certificates (hundreds of bytes) and other record counts.
RECORD_JITTER = 16
# RFC 8446 4.1.3: a ServerHello with this random is a HelloRetryRequest.
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
EXT_KEY_SHARE = 51
EXT_SUPPORTED_VERSIONS = 43
# A replay prober's wait for the first flight, and the quiet after which it is over: a server
# sends its flight in one go and then waits for the client's Finished, which never comes (a
# second of quiet: a loaded machine may pause between the records of one flight, never that
# long).
REPLAY_CONNECT_TIMEOUT = 5.0
REPLAY_FIRST_BYTE_WAIT = 5.0
REPLAY_QUIET = 1.0
# ... and a server that trickles bytes to keep it reading is given up on after this long.
REPLAY_TOTAL_WAIT = 10.0
# A first flight is a few KiB (a certificate chain); more than this is not a handshake.
REPLAY_READ_LIMIT = 256 * 1024


@dataclass(frozen=True)
class ServerHelloShape:
    """What a ServerHello shows in clear, less its random values."""

    legacy_version: int
    session_id_len: int
    cipher: int
    compression: int
    extensions: tuple[tuple[int, int], ...]
    """(type, body length) in the order sent: a key share's length names its group."""
    group: int | None
    version: int | None
    hello_retry: bool


@dataclass(frozen=True)
class HandshakeShape:
    """A server's side of a TLS handshake as a passive observer sizes it."""

    server_hello: ServerHelloShape | None
    change_cipher_spec: int
    """change_cipher_spec records before the first encrypted one (middlebox compatibility)."""
    flight: tuple[int, ...]
    """The body lengths of the encrypted records of the server's first flight."""
    post_handshake: tuple[int, ...] | None
    """The body lengths of the first :data:`POST_HANDSHAKE_RECORDS` records after the client's
    Finished; None where the client never sent one (a prober)."""
    alert: bool = False
    """The server sent a clear alert (a refused hello)."""
    answer_delay: float | None = field(default=None, compare=False)
    """Seconds from the client's hello to the server's first byte (recorded connections):
    reported, not judged (loopback and a loaded machine jitter by more than a nearby
    target's round trip, which is all a server of its own would save)."""


def parse_server_hello(body: bytes) -> ServerHelloShape | None:
    """A ServerHello handshake body (without its 4-byte header), or None if malformed."""
    try:
        (legacy_version,) = struct.unpack_from("!H", body, 0)
        random = body[2:34]
        sid_len = body[34]
        pos = 35 + sid_len
        cipher, compression = struct.unpack_from("!HB", body, pos)
        pos += 3
        extensions: list[tuple[int, int]] = []
        group = version = None
        if pos < len(body):
            (total,) = struct.unpack_from("!H", body, pos)
            pos += 2
            end = pos + total
            if end != len(body):
                return None
            while pos + 4 <= end:
                ext_type, ext_len = struct.unpack_from("!HH", body, pos)
                data = body[pos + 4:pos + 4 + ext_len]
                if len(data) != ext_len:
                    return None
                extensions.append((ext_type, ext_len))
                if ext_type == EXT_KEY_SHARE and ext_len >= 2:
                    (group,) = struct.unpack_from("!H", data, 0)
                elif ext_type == EXT_SUPPORTED_VERSIONS and ext_len == 2:
                    (version,) = struct.unpack_from("!H", data, 0)
                pos += 4 + ext_len
    except (IndexError, struct.error):
        return None
    return ServerHelloShape(legacy_version, sid_len, cipher, compression, tuple(extensions),
                            group, version, random == HRR_RANDOM)


def _shape(server: list[Record], finished_order: int | None) -> HandshakeShape:
    hello: ServerHelloShape | None = None
    ccs = 0
    alert = False
    flight: list[int] = []
    post: list[int] = []
    for record in server:
        if record.content_type == HANDSHAKE and hello is None:
            body = record.body
            if len(body) >= 4 and body[0] == HS_SERVER_HELLO:
                hello = parse_server_hello(body[4:4 + int.from_bytes(body[1:4], "big")])
        elif record.content_type == CHANGE_CIPHER_SPEC and not flight:
            ccs += 1
        elif record.content_type == ALERT and not flight:
            alert = True
        elif record.content_type == APPLICATION_DATA:
            if finished_order is None or record.order < finished_order:
                flight.append(record.length)
            elif len(post) < POST_HANDSHAKE_RECORDS:
                post.append(record.length)
    return HandshakeShape(hello, ccs, tuple(flight),
                          None if finished_order is None else tuple(post), alert)


def flow_shape(flow: Flow) -> HandshakeShape | None:
    """The server's handshake in a recorded TLS connection; None if it is not TLS.

    The client's Finished is its first encrypted record: the server's encrypted records before
    it are the first flight, those after it the post-handshake records.
    """
    client, _ = split_records(flow, Direction.CLIENT)
    if not client or client[0].content_type != HANDSHAKE:
        return None
    server, _ = split_records(flow, Direction.SERVER)
    finished = next((r.order for r in client if r.content_type == APPLICATION_DATA), None)
    shape = _shape(server, finished)
    delay = (server[0].time - client[0].time) if server else None
    return dataclasses.replace(shape, answer_delay=delay)


def answer_shape(data: bytes) -> HandshakeShape:
    """The handshake in the bytes a server sent back to a ClientHello that was never finished
    (a prober's): no post-handshake records."""
    records: list[Record] = []
    pos = 0
    while pos + RECORD_HEADER <= len(data):
        content_type, version, length = struct.unpack_from("!BHH", data, pos)
        end = pos + RECORD_HEADER + length
        if end > len(data):
            break
        records.append(Record(Direction.SERVER, content_type, version, length, 0, 0.0,
                              data[pos + RECORD_HEADER:end]))
        pos = end
    return _shape(records, None)


def differences(reference: HandshakeShape, candidate: HandshakeShape) -> list[str]:
    """What a censor sees differ between the reference's handshake and the candidate's."""
    found: list[str] = []
    ref_hello, hello = reference.server_hello, candidate.server_hello
    if (ref_hello is None) != (hello is None):
        found.append("one answered with a ServerHello, the other did not")
    elif ref_hello is not None and hello is not None and ref_hello != hello:
        for name in ("legacy_version", "session_id_len", "cipher", "compression", "extensions",
                     "group", "version", "hello_retry"):
            mine, theirs = getattr(hello, name), getattr(ref_hello, name)
            if mine != theirs:
                found.append(f"ServerHello {name}: {_show(mine)} (reference {_show(theirs)})")
    if reference.alert != candidate.alert:
        found.append(f"clear alert: {candidate.alert} (reference {reference.alert})")
    if reference.change_cipher_spec != candidate.change_cipher_spec:
        found.append(f"change_cipher_spec records: {candidate.change_cipher_spec} "
                     f"(reference {reference.change_cipher_spec})")
    if not _alike(reference.flight, candidate.flight):
        found.append(f"first flight's encrypted records: {list(candidate.flight)} "
                     f"(reference {list(reference.flight)})")
    if (reference.post_handshake is not None and candidate.post_handshake is not None
            and not _alike(reference.post_handshake, candidate.post_handshake)):
        found.append(f"records after the client's Finished: {list(candidate.post_handshake)} "
                     f"(reference {list(reference.post_handshake)})")
    return found


def _alike(reference: tuple[int, ...], candidate: tuple[int, ...]) -> bool:
    """As many records, each within :data:`RECORD_JITTER` of the reference's."""
    return len(reference) == len(candidate) and all(
        abs(a - b) <= RECORD_JITTER for a, b in zip(reference, candidate, strict=True))


def _show(value: object) -> str:
    if isinstance(value, int):
        return f"0x{value:04x}"
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{t}:{n}" for t, n in value) + "]"
    return str(value)


def judge(reference: HandshakeShape, candidate: HandshakeShape, what: str) -> Verdict:
    """Flag the candidate when it differs from the reference; ``what`` says which comparison
    (``passive``: a client's connection; ``replay``: a replayed ClientHello)."""
    found = differences(reference, candidate)
    return Verdict(NAME, bool(found), tuple(found) or (f"{what}: same as the target's",),
                   (f"borrowed-{what}",) if found else (),
                   details={"flight": list(candidate.flight),
                            "reference_flight": list(reference.flight),
                            "answer_delay": candidate.answer_delay,
                            "reference_answer_delay": reference.answer_delay,
                            "post_handshake": list(candidate.post_handshake or ()),
                            "reference_post_handshake": list(reference.post_handshake or ())})


def replay_hello(host: str, port: int, hello_records: bytes) -> bytes:
    """Send a recorded ClientHello (its records, as captured) on a fresh connection and return
    what the server sent until it went quiet, waiting for a Finished that never comes."""
    with socket.create_connection((host, port), timeout=REPLAY_CONNECT_TIMEOUT) as sock:
        sock.sendall(hello_records)
        out = bytearray()
        sock.settimeout(REPLAY_FIRST_BYTE_WAIT)
        deadline = time.monotonic() + REPLAY_TOTAL_WAIT
        while len(out) < REPLAY_READ_LIMIT and time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                break
            if not data:
                break
            out += data
            # Read on until the flight is over: quiet for a while, once a whole ServerHello
            # and more are in.
            sock.settimeout(REPLAY_QUIET)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    return bytes(out)


def client_hello_records(flow: Flow) -> bytes:
    """The client's ClientHello records of a recorded connection, as sent (for a replay)."""
    client, _ = split_records(flow, Direction.CLIENT)
    out = bytearray()
    for record in client:
        if record.content_type != HANDSHAKE:
            break
        out += struct.pack("!BHH", record.content_type, record.version, record.length)
        out += record.body
    return bytes(out)


def judge_name(server_host: str, name: str) -> Verdict:
    """Does ``name`` (the SNI a borrowed identity's clients send) resolve to the server?

    No code can make it so: a censor that resolves the SNI of a connection and finds other
    addresses sees a server that is not the site it names. Reported so an operator can choose
    a site whose addresses are at least near the server's (docs/operations.md)."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        return Verdict("sni-dns", True, (f"{name} does not resolve: {exc}",),
                       ("sni-unresolvable",), details={"name": name, "addresses": []})
    addresses = sorted({str(info[4][0]) for info in infos})
    if server_host in addresses:
        return Verdict("sni-dns", False, (f"{name} resolves to {server_host}",),
                       details={"name": name, "addresses": addresses})
    return Verdict("sni-dns", True, (f"{name} resolves to {', '.join(addresses)}, not to the "
                                     f"server {server_host}",),
                   ("sni-dns-mismatch",), details={"name": name, "addresses": addresses})
