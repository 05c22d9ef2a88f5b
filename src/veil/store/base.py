"""The user store interface: who may use the server, with which credential, within which limits,
and how much each user has used.

Two back ends implement it (``sqlite.py``, the default, one file in the state directory;
``postgres.py``, one database shared by a fleet of servers) and the same contract tests run
against both (tests/store/).

Secrets at rest: the store never writes a user's secret in the clear. It seals it with
AES-256-GCM under a *store key* that lives outside the database (``DIR/store.key``), and it
indexes Trojan password hashes by an HMAC under the same key. A leaked database alone therefore
yields no credential: nobody can connect as a user or confirm that a server is a veil server.
(Past traffic is protected independently of the store: TLS 1.3 key exchange is ephemeral and
the credential is only used to authenticate, never to derive traffic keys.)

Usage is counted in hourly buckets per user. Servers add deltas (``add_usage``) with atomic
increments, so several servers against one database add up; a period's usage is the sum of its
buckets.
"""

from __future__ import annotations

import abc
import calendar
import datetime
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.errors import StoreError

# fullmatch, not match with ^...$: "$" also matches before a final newline ("alice\n").
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")

#: A limit applies to the calendar month (UTC) or to all time.
LimitPeriod = Literal["month", "total"]
#: What a user's networks are (the ``user_networks`` table): its site's subnets, or what it
#: may reach.
NetworkKind = Literal["site", "reach"]
HOUR_S = 3600


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise StoreError(
            f"invalid user name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-'",
            code="bad_name")
    return name


def hour_bucket(now: float) -> int:
    """The start (unix seconds) of the hour ``now`` falls in: the key of a usage bucket."""
    return int(now) - int(now) % HOUR_S


def period_start(period: LimitPeriod, now: float) -> float | None:
    """Start of the period a limit counts over: the first of this month (UTC), or None (all
    time)."""
    if period == "total":
        return None
    day = datetime.datetime.fromtimestamp(now, datetime.UTC)
    return float(calendar.timegm((day.year, day.month, 1, 0, 0, 0)))


@dataclass(frozen=True, slots=True)
class User:
    name: str
    secret: bytes
    key_id: bytes
    created_at: float
    revoked_at: float | None = None
    #: Bytes (up + down) allowed per ``limit_period``; None = unlimited.
    limit_bytes: int | None = None
    limit_period: LimitPeriod = "month"
    expires_at: float | None = None
    #: When a server last added usage for this user (None = never connected).
    last_seen: float | None = None
    #: A site's subnets (CIDRs, docs/site-to-site.md): the user is an office's gateway and
    #: the server routes these to its session. Empty: an ordinary user.
    sites: tuple[str, ...] = ()
    #: What the user may reach among the sites' subnets: CIDRs and site names. Empty: a
    #: site reaches every other site, an ordinary user none.
    reach: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        """Not revoked (expiry and limits need a clock and usage: see :meth:`status`)."""
        return self.revoked_at is None

    def status(self, now: float, used: int) -> str:
        """"active", "revoked", "expired" or "over_limit" given ``used`` bytes this period."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        if self.limit_bytes is not None and used >= self.limit_bytes:
            return "over_limit"
        return "active"


@dataclass(frozen=True, slots=True)
class Usage:
    up: int = 0  # client -> server
    down: int = 0  # server -> client

    @property
    def total(self) -> int:
        return self.up + self.down


#: A row of ``session_ends`` is kept this long: every server that can reach the store acts on it
#: within a second, so a day is for one cut off from the store meanwhile.
SESSION_END_KEEP_S = 86400.0
#: A server that has not beaten for this long leaves the fleet's table (a week: long enough
#: that an outage shows as "last seen 3 days ago", not as a server that never existed).
SERVER_KEEP_S = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """An admin's "end the sessions": ``name``'s sessions that started at or before
    ``before`` end, on every server (``server`` "") or on the one whose id it is, every one
    (``session`` 0) or the one with that id there."""

    name: str
    before: float
    server: str = ""
    session: int = 0

    def applies(self, server: str, session: int, started_at: float) -> bool:
        return (started_at <= self.before and self.server in ("", server)
                and self.session in (0, session))


@dataclass(frozen=True, slots=True)
class ServerBeat:
    """A server's last heartbeat in a shared store: its id, when, and what it said (JSON)."""

    id: str
    seen_at: float
    info: str


class SecretBox:
    """Seals secrets and keys indexes with the store key (32 bytes, kept out of the database)."""

    KEY_SIZE = 32
    _NONCE = 12

    def __init__(self, key: bytes) -> None:
        if len(key) != self.KEY_SIZE:
            raise StoreError(f"store key must be {self.KEY_SIZE} bytes", code="bad_store_key")
        self._aead = AESGCM(key)
        self._index_key = hmac.digest(key, b"veil store index", "sha256")

    def seal(self, secret: bytes, key_id: bytes) -> bytes:
        """nonce || AES-GCM(secret), bound to the user's key id (rows cannot be swapped)."""
        nonce = os.urandom(self._NONCE)
        return nonce + self._aead.encrypt(nonce, secret, key_id)

    def open(self, sealed: bytes, key_id: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:self._NONCE], sealed[self._NONCE:], key_id)
        except (InvalidTag, ValueError) as exc:
            raise StoreError("cannot decrypt a user's secret: wrong store key "
                             "(store.key does not belong to this database)",
                             code="bad_store_key") from exc

    def index(self, value: str) -> str:
        """A keyed hash to look a Trojan password hash up by, without storing it."""
        return hmac.new(self._index_key, value.encode(), hashlib.sha256).hexdigest()


class UserStore(abc.ABC):
    """Users, their credentials, limits and usage. Implementations must be safe to use from
    several processes at once (the CLI edits the store while servers run) and from one thread
    at a time per instance. Every write is one transaction: a killed process loses nothing that
    a method returned from."""

    # ------------------------------------------------------------------ users
    @abc.abstractmethod
    def add_user(self, name: str, secret: bytes, key_id: bytes, now: float, *,
                 limit_bytes: int | None = None, limit_period: LimitPeriod = "month",
                 expires_at: float | None = None) -> User:
        """Create a user; StoreError(code="exists") if the name is taken."""

    @abc.abstractmethod
    def get_user(self, name: str) -> User | None: ...

    @abc.abstractmethod
    def find_by_key_id(self, key_id: bytes) -> User | None:
        """The user a client's key id names, revoked or not; None if unknown."""

    @abc.abstractmethod
    def find_by_trojan_hash(self, password_hash: str) -> User | None:
        """The user whose Trojan password has this hex SHA-224, revoked or not; None if
        unknown. The password is derived from the secret (``veil.protocol.trojan``), so the
        store computes the hash itself when a user is added or rotated."""

    @abc.abstractmethod
    def list_users(self) -> list[User]:
        """Every user, revoked ones included, oldest first."""

    @abc.abstractmethod
    def revoke(self, name: str, now: float) -> User:
        """Revoke a user; StoreError code "not_found" or "already_revoked"."""

    @abc.abstractmethod
    def restore(self, name: str) -> User:
        """Undo a revocation; StoreError code "not_found" or "not_revoked"."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove a revoked user and its usage, so the name can be used again; StoreError
        code "not_found" or "not_revoked" (an active user is revoked first: its sessions
        end before its usage is gone)."""

    @abc.abstractmethod
    def rotate(self, name: str, secret: bytes, key_id: bytes, now: float) -> User:
        """Give a user a new credential; the old one stops working. StoreError code
        "not_found", or "already_revoked" (its new key could not work: restore it first)."""

    @abc.abstractmethod
    def set_limit(self, name: str, limit_bytes: int | None,
                  limit_period: LimitPeriod = "month") -> User:
        """Set (or with None remove) a user's traffic limit. StoreError(code="not_found")."""

    @abc.abstractmethod
    def set_expiry(self, name: str, expires_at: float | None) -> User:
        """Set (or with None remove) when a user's access ends. StoreError(code="not_found")."""

    @abc.abstractmethod
    def set_networks(self, name: str, kind: NetworkKind, values: tuple[str, ...]) -> User:
        """Replace a user's site subnets (``kind`` "site": CIDRs, refused with
        StoreError(code="overlap") when one overlaps another user's, checked in the same
        transaction) or what it may reach ("reach": CIDRs and site names)."""

    # ------------------------------------------------------------------ usage
    @abc.abstractmethod
    def add_usage(self, deltas: Mapping[str, Usage], now: float) -> None:
        """Add each user's bytes to the bucket of the hour ``now`` is in, and set their
        ``last_seen`` to ``now``; one transaction, atomic increments (several servers may add
        at once). Unknown names are ignored (the user was deleted meanwhile)."""

    @abc.abstractmethod
    def usage_by_user(self, since: float | None) -> dict[str, Usage]:
        """Each user's usage in buckets starting at or after ``since`` (None = all time).
        Users without usage are absent."""

    @abc.abstractmethod
    def usage_series(self, name: str, since: float) -> list[tuple[int, Usage]]:
        """One user's hourly buckets from ``since`` on, oldest first: (hour start, usage)."""

    def period_usage(self, user: User, now: float) -> Usage:
        """What counts against ``user``'s limit now."""
        since = period_start(user.limit_period, now)
        return self.usage_by_user(since).get(user.name, Usage())

    @abc.abstractmethod
    def reset_usage(self, name: str, since: float | None) -> None:
        """Forget ``name``'s usage in buckets from ``since`` on (None: all of it): the admin's
        "reset usage". StoreError(code="not_found")."""

    # ------------------------------------------------------------------ ending sessions
    @abc.abstractmethod
    def end_sessions(self, end: SessionEnd, now: float) -> None:
        """Ask every server to end the sessions ``end`` names (they read
        :meth:`session_ends` every tick). StoreError(code="not_found")."""

    @abc.abstractmethod
    def session_ends(self) -> list[SessionEnd]:
        """The sessions asked to end within the last :data:`SESSION_END_KEEP_S`."""

    # ------------------------------------------------------------------ fleet
    @abc.abstractmethod
    def beat(self, server: str, now: float, info: str) -> None:
        """Record server ``server``'s heartbeat (``info``: JSON it says about itself)."""

    @abc.abstractmethod
    def servers(self) -> list[ServerBeat]:
        """Every server's last heartbeat (within :data:`SERVER_KEEP_S`), by id."""

    # ------------------------------------------------------------------ settings
    @abc.abstractmethod
    def get_setting(self, key: str) -> str | None:
        """A server-wide setting (e.g. the admin password hash); None if unset."""

    @abc.abstractmethod
    def set_setting(self, key: str, value: str | None) -> None:
        """Set a server-wide setting; None deletes it."""

    @abc.abstractmethod
    def settings_with_prefix(self, prefix: str) -> dict[str, str]:
        """Every setting whose key starts with ``prefix``, by key."""

    @abc.abstractmethod
    def claim_setting(self, key: str, value: str) -> bool:
        """Set ``key`` only if it is unset; True for the one caller (of every process on the
        store) that set it: how a fleet's servers agree which one sends an alert."""

    @abc.abstractmethod
    def close(self) -> None: ...
