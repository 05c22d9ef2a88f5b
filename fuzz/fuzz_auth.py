"""The gate's ways in: ``VeilWayIn`` (with its ``Authenticator``) and ``TrojanWayIn``, judging
the first decrypted bytes of a TLS connection against a directory made by
``veil.server.live.build_directory``.

Input: ``flags | bytes``. flags bit 0: the TLS transport has no channel binding; bits 1-2
move the server's clock (0, +100 s, +200 s, -200 s from the time valid seeds were made).

Users: one active, one revoked, one expired and one over its limit. The oracle recomputes what
may be accepted on its own (HMAC over the binding, the clock window, the Trojan password hash)
and checks every verdict against it:

* veil: ``Accept`` only for a message whose tag is the active user's for this connection's
  binding, within the clock window; the session then starts with exactly the bytes after it;
* Trojan: ``Accept`` only for a complete request opening with the active user's password hash
  (its payload exactly the bytes after the request), ``Wait`` only once that hash is in and
  the request is not complete; everything else is ``Reject`` (and the gate serves the cover);
* neither writes to nor closes the transport, and neither raises.
"""

from __future__ import annotations

import asyncio
import hmac
import struct
import sys
from typing import Any

import harness

from veil.protocol.address import Address
from veil.protocol.auth import (
    ACCEPT_WINDOW,
    AUTH_SIZE,
    TAG_SIZE,
    Credential,
    build_auth,
)
from veil.protocol.trojan import (
    Command,
    TrojanRequest,
    build_request,
    parse_request,
    password_hash_for_secret,
)
from veil.server.gate import Accept, Authenticator, Reject, VeilWayIn, Wait
from veil.server.live import build_directory
from veil.server.trojan import TrojanWayIn
from veil.store.base import Usage, User

MODULES = ("veil.server.gate", "veil.server.trojan", "veil.protocol.auth",
           "veil.protocol.trojan", "veil.protocol.address", "veil.server.live")

NOW = 1_800_000_000.0
BINDING = bytes(range(12))  # tls-unique of TLS 1.3 is the client's Finished (12+ bytes)
_CLOCK_SHIFTS = (0.0, 100.0, 200.0, -200.0)


def _user(name: str, fill: int, **kwargs: Any) -> tuple[User, bytes]:
    secret = bytes([fill]) * 32
    return User(name, secret, Credential.from_secret(secret).key_id, 1.0, **kwargs), secret


ACTIVE, ACTIVE_SECRET = _user("active", 1)
REVOKED, REVOKED_SECRET = _user("revoked", 2, revoked_at=5.0)
EXPIRED, EXPIRED_SECRET = _user("expired", 3, expires_at=10.0)
OVER, OVER_SECRET = _user("over", 4, limit_bytes=1000)
DIRECTORY = build_directory([ACTIVE, REVOKED, EXPIRED, OVER],
                            {"month": {"over": Usage(600, 600)}}, NOW, password_hash_for_secret)
ACTIVE_CREDENTIAL = Credential.from_secret(ACTIVE_SECRET)
ACTIVE_HASH = password_hash_for_secret(ACTIVE_SECRET).encode()
_LABEL = b"veil-auth-v1"
_TIMESTAMP = struct.Struct("!Q")


class GateTransport(asyncio.Transport):
    """A TLS transport as the gate holds it: a ways in may read its extra info, nothing more."""

    def __init__(self, binding: bytes | None) -> None:
        super().__init__()
        self._binding = binding

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._binding if name == "tls_unique" else default

    def write(self, data: Any) -> None:
        raise AssertionError("a way in wrote to the transport")

    def close(self) -> None:
        raise AssertionError("a way in closed the transport")

    def abort(self) -> None:
        raise AssertionError("a way in aborted the transport")


def _veil_may_accept(data: bytes, binding: bytes | None, now: float) -> bool:
    """The oracle for veil: recomputed here, not with veil.protocol.auth.verify_auth."""
    if binding is None or len(data) < AUTH_SIZE:
        return False
    message = data[:AUTH_SIZE]
    header, tag = message[: AUTH_SIZE - TAG_SIZE], message[AUTH_SIZE - TAG_SIZE :]
    if header[:8] != ACTIVE_CREDENTIAL.key_id:
        return False
    expected = hmac.new(ACTIVE_CREDENTIAL.auth_key, _LABEL + header + binding, "sha256").digest()
    (timestamp,) = _TIMESTAMP.unpack(header[8:16])
    return hmac.compare_digest(tag, expected) and abs(now - timestamp) <= ACCEPT_WINDOW


def test_one_input(data: bytes) -> None:
    if not data:
        return
    flags, body = data[0], data[1:]
    binding = None if flags & 1 else BINDING
    now = NOW + _CLOCK_SHIFTS[(flags >> 1) & 3]
    transport = GateTransport(binding)
    taken: list[tuple[str, object, bytes]] = []

    veil = VeilWayIn(Authenticator(DIRECTORY, clock=lambda: now),
                     lambda t, user, rest: taken.append(("veil", user, rest)))
    verdict = veil.check(body, transport)
    if isinstance(verdict, Accept):
        assert _veil_may_accept(body, binding, now), "veil accepted without the credential"
        assert verdict.user == ACTIVE
        verdict.take_over(transport)
        assert taken == [("veil", ACTIVE, body[AUTH_SIZE:])]
    else:
        assert isinstance(verdict, Reject), f"veil: {verdict!r}"
        assert not _veil_may_accept(body, binding, now), "veil rejected a valid authenticator"

    trojan = TrojanWayIn(DIRECTORY, lambda t, user, req, rest: taken.append(("trojan", req, rest)))
    verdict = trojan.check(body, transport)
    holds_password = body[:56] == ACTIVE_HASH and body[56:58] == b"\r\n"
    parsed = parse_request(body)
    if isinstance(verdict, Accept):
        assert holds_password, "trojan accepted without the password"
        assert isinstance(parsed, TrojanRequest) and verdict.user == ACTIVE
        verdict.take_over(transport)
        assert taken[-1] == ("trojan", parsed, body[parsed.size :])
    elif isinstance(verdict, Wait):
        assert holds_password, "trojan held a connection back without the password"
        assert not isinstance(parsed, TrojanRequest)
    else:
        assert isinstance(verdict, Reject), f"trojan: {verdict!r}"
        assert not (holds_password and isinstance(parsed, TrojanRequest)), \
            "trojan rejected the active user's complete request"


# ------------------------------------------------------------------ seeds
def seeds() -> dict[str, bytes]:
    def auth(secret: bytes, at: float = NOW, nonce: bytes = bytes(16)) -> bytes:
        return build_auth(Credential.from_secret(secret), BINDING, at, nonce)

    def trojan(secret: bytes, command: Command = Command.CONNECT,
               dest: Address | None = None) -> bytes:
        return build_request(password_hash_for_secret(secret), command,
                             dest or Address("example.com", 443))

    valid = auth(ACTIVE_SECRET)
    request = trojan(ACTIVE_SECRET)
    return {
        "veil-valid": b"\x00" + valid,
        "veil-valid-with-frames": b"\x00" + valid + b"\x01\x00\x00\x08\x00\x00\x00\x01",
        "veil-valid-no-binding": b"\x01" + valid,
        "veil-valid-clock-ahead": b"\x02" + valid,
        "veil-stale": b"\x04" + valid,
        "veil-revoked": b"\x00" + auth(REVOKED_SECRET),
        "veil-expired": b"\x00" + auth(EXPIRED_SECRET),
        "veil-over-limit": b"\x00" + auth(OVER_SECRET),
        "veil-unknown": b"\x00" + auth(bytes([9]) * 32),
        "veil-short": b"\x00" + valid[:63],
        "veil-flipped-tag": b"\x00" + valid[:-1] + bytes([valid[-1] ^ 1]),
        "trojan-connect": b"\x00" + request + b"GET / HTTP/1.1\r\n\r\n",
        "trojan-connect-ipv6": b"\x00" + trojan(ACTIVE_SECRET, dest=Address("2001:db8::1", 80)),
        "trojan-udp": b"\x00" + trojan(ACTIVE_SECRET, Command.UDP_ASSOCIATE,
                                       Address("0.0.0.0", 0)) + b"\x01\x08\x08\x08\x08\x00\x35",
        "trojan-partial": b"\x00" + request[:70],
        "trojan-hash-only": b"\x00" + request[:58],
        "trojan-revoked": b"\x00" + trojan(REVOKED_SECRET),
        "trojan-over-limit": b"\x00" + trojan(OVER_SECRET),
        "trojan-unknown": b"\x00" + build_request("ab" * 28, Command.CONNECT,
                                                  Address("example.com", 80)),
        "trojan-bad-command": b"\x00" + request[:58] + b"\x02" + request[59:],
        "http": b"\x00GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        "empty": b"\x00",
    }


if __name__ == "__main__":
    harness.main(test_one_input, MODULES)
    sys.exit(0)
