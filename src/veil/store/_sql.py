"""What the SQLite and PostgreSQL stores share: the schema's meaning and every query.

The queries are written once, in the SQL both databases speak (``INSERT ... ON CONFLICT``,
``CASE``, ``?`` placeholders, which the PostgreSQL store turns into ``%s``), so the two back
ends cannot drift apart. Each back end supplies only :meth:`SqlUserStore._run`: run a piece of
work in one transaction and turn its database's errors into :class:`StoreError`.
"""

from __future__ import annotations

import abc
import dataclasses
import ipaddress
import itertools
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar, cast

from veil.errors import StoreError
from veil.store.base import (
    SERVER_KEEP_S,
    SESSION_END_KEEP_S,
    LimitPeriod,
    NetworkKind,
    SecretBox,
    ServerBeat,
    SessionEnd,
    Usage,
    User,
    UserStore,
    check_name,
    hour_bucket,
)

#: Version 1: users. 2: + trojan_hash (plain hex SHA-224). 3: secrets sealed with the store
#: key, trojan_hash keyed (SecretBox.index), limits, expiry, last_seen, usage, settings, meta.
SCHEMA_VERSION = 3

#: Computes a user's Trojan password hash (hex SHA-224) from the user's secret. Injected:
#: the derivation is protocol knowledge, which the store layer does not import.
TrojanHash = Callable[[bytes], str]

_SELECT_USER = ("SELECT name, secret, key_id, created_at, revoked_at, "
                "limit_bytes, limit_period, expires_at, last_seen FROM users")

# The store key check: a known plaintext sealed with the store key when the database is
# created. Opening the database with another key fails at once with a clear error, instead of
# on the first user looked up (or never, for a store that has no users yet).
_KEY_CHECK_NAME = "store_key_check"
_KEY_CHECK_PLAIN = b"veil store key check"
_KEY_CHECK_AD = b"meta"

T = TypeVar("T")

#: Tables added after schema 3 without a new version (an older veil sharing the store ignores
#: them, so a fleet can be upgraded one server at a time): created on every open, in both
#: back ends. ``until`` (not ``before``, an SQL keyword) is the SessionEnd's ``before``. ``{time}``
#: is the back end's type for unix seconds (PostgreSQL's REAL is 4 bytes: minutes off).
PANEL_TABLES = (
    """CREATE TABLE IF NOT EXISTS session_ends (
        name    TEXT NOT NULL,
        server  TEXT NOT NULL DEFAULT '',  -- '' = on every server
        session INTEGER NOT NULL DEFAULT 0,  -- 0 = every session of the user
        until   {time} NOT NULL,           -- sessions started at or before this end
        PRIMARY KEY (name, server, session)
    )""",
    """CREATE TABLE IF NOT EXISTS servers (
        id      TEXT PRIMARY KEY,
        seen_at {time} NOT NULL,
        info    TEXT NOT NULL                -- JSON: veil.manage.fleet.heartbeat_info
    )""",
    # Site-to-site (docs/site-to-site.md): a site's subnets, and what a user may reach.
    """CREATE TABLE IF NOT EXISTS user_networks (
        name  TEXT NOT NULL,
        kind  TEXT NOT NULL,                 -- 'site' (a CIDR) or 'reach' (a CIDR or a site)
        value TEXT NOT NULL,
        PRIMARY KEY (name, kind, value)
    )""",
)
PANEL_TABLE_NAMES = ("session_ends", "servers", "user_networks")
#: A user's networks of each kind: a handful of office subnets is the use; more is a mistake
#: (and every one is a route and a lookup on each gateway).
MAX_NETWORKS = 64
# The meta row whose lock serialises edits of sites: two overlapping sites added at once by
# two processes must not both pass the overlap check (PostgreSQL reads committed rows only).
_SITES_LOCK = "sites_lock"


def panel_tables(time_type: str) -> tuple[str, ...]:
    return tuple(statement.replace("{time}", time_type) for statement in PANEL_TABLES)


# Byte counts are 64-bit signed integers in both databases (SQLite INTEGER, BIGINT): a larger
# value would fail in the driver with an error that is not a StoreError (SQLite's
# OverflowError) or read differently in each. 8 EiB is no real limit.
MAX_BYTES = 2**63 - 1


class Cursor(Protocol):
    """The part of a DB-API cursor the shared queries use (sqlite3's, or psycopg's adapted)."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> object: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    @property
    def rowcount(self) -> int: ...


def check_limit(limit_bytes: int | None, limit_period: str) -> LimitPeriod:
    if limit_bytes is not None and (not isinstance(limit_bytes, int)
                                    or not 0 <= limit_bytes <= MAX_BYTES):
        raise StoreError(f"a traffic limit must be a number of bytes from 0 to {MAX_BYTES}, "
                         f"not {limit_bytes!r}", code="bad_limit")
    if limit_period not in ("month", "total"):
        raise StoreError(f"a limit period is 'month' or 'total', not {limit_period!r}",
                         code="bad_limit")
    return cast(LimitPeriod, limit_period)


def check_networks(kind: str, values: tuple[str, ...]) -> tuple[str, ...]:
    """``values`` in the form they are stored (a CIDR as ``ipaddress`` writes it), sorted and
    once each; StoreError(code="bad_network") for what a site or a reach cannot be."""
    if kind not in ("site", "reach"):
        raise StoreError(f"a network kind is 'site' or 'reach', not {kind!r}",
                         code="bad_network")
    if len(values) > MAX_NETWORKS:
        raise StoreError(f"at most {MAX_NETWORKS} {kind} networks per user",
                         code="bad_network")
    out: set[str] = set()
    for value in values:
        try:
            net = ipaddress.ip_network(value)
        except ValueError:
            if kind == "site" or "/" in value:
                raise StoreError(f"{value!r} is not a subnet (e.g. 192.168.10.0/24, with no "
                                 "host bits set)", code="bad_network") from None
            out.add(check_name(value))  # a reach by site name
            continue
        out.add(str(net))
    nets = sorted((ipaddress.ip_network(v) for v in out if "/" in v),
                  key=lambda n: (n.version, n))
    if kind == "site":
        for a, b in itertools.pairwise(nets):
            if a.version == b.version and a.overlaps(b):  # sorted: neighbours overlap first
                raise StoreError(f"site subnets {a} and {b} overlap", code="overlap")
    return tuple(sorted(out))


def _with_networks(users: list[User], rows: Sequence[Sequence[Any]]) -> list[User]:
    """``users`` with their rows of ``user_networks`` (name, kind, value) filled in."""
    found: dict[tuple[str, str], list[str]] = {}
    for name, kind, value in rows:
        found.setdefault((str(name), str(kind)), []).append(str(value))
    return [dataclasses.replace(user, sites=tuple(sorted(found.get((user.name, "site"), ()))),
                                reach=tuple(sorted(found.get((user.name, "reach"), ()))))
            if (user.name, "site") in found or (user.name, "reach") in found else user
            for user in users]


class SqlUserStore(UserStore):
    """The :class:`UserStore` methods, on top of one primitive per back end (:meth:`_run`)."""

    def __init__(self, *, trojan_hash: TrojanHash, box: SecretBox) -> None:
        self._trojan_hash = trojan_hash
        self._box = box
        # One call at a time, and close() only between calls: callers hop threads
        # (asyncio.to_thread), and a task cancelled mid-call leaves its thread running, so
        # a server stopping could close the connection under a query still in flight
        # (SQLite's C library then dereferences freed memory: a segfault, seen in CI).
        self._serial = threading.Lock()
        self._closed = False

    def _run(self, what: str, work: Callable[[Cursor], T], *, write: bool = True) -> T:
        """Run ``work`` in one transaction and commit it; roll back if it raises.

        ``what`` completes "cannot ..." in error messages. Database errors become
        StoreError; StoreErrors raised by ``work`` pass through unchanged.
        """
        with self._serial:
            if self._closed:
                raise StoreError(f"user store: cannot {what}: the store was closed",
                                 code="closed")
            return self._transact(what, work, write=write)

    def close(self) -> None:
        """Close the connection, after the call in flight (if any) has finished."""
        with self._serial:
            if not self._closed:
                self._closed = True
                self._close()

    @abc.abstractmethod
    def _transact(self, what: str, work: Callable[[Cursor], T], *, write: bool) -> T:
        """:meth:`_run`'s work, called with the store to itself."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Close the connection (called once, with the store to itself)."""

    # ------------------------------------------------------------------ schema helpers
    def _check_store_key(self, cur: Cursor) -> bool:
        """Verify the store key against the database's key check, or write the check if the
        database has none yet. Returns whether there was one (the secrets are sealed)."""
        cur.execute("SELECT value FROM meta WHERE key = ?", (_KEY_CHECK_NAME,))
        row = cur.fetchone()
        if row is None:
            sealed = self._box.seal(_KEY_CHECK_PLAIN, _KEY_CHECK_AD)
            cur.execute("INSERT INTO meta (key, value) VALUES (?, ?)",
                        (_KEY_CHECK_NAME, sealed.hex()))
            return False
        try:
            sealed = bytes.fromhex(row[0])
        except ValueError as exc:
            raise StoreError("the store key check in the database is damaged",
                             code="bad_store_key") from exc
        if self._box.open(sealed, _KEY_CHECK_AD) != _KEY_CHECK_PLAIN:
            raise StoreError("the store key check in the database is damaged",
                             code="bad_store_key")
        return True

    def _seal_plaintext_secrets(self, cur: Cursor) -> None:
        """Seal every secret and key every Trojan hash: the step from schema 1 or 2 to 3,
        for a database whose secrets are all still in the clear."""
        cur.execute("SELECT name, secret, key_id FROM users")
        for name, secret, key_id in cur.fetchall():
            plain = bytes(secret)
            cur.execute("UPDATE users SET secret = ?, trojan_hash = ? WHERE name = ?",
                        (self._box.seal(plain, bytes(key_id)), self._index(plain), name))

    def _index(self, secret: bytes) -> str:
        return self._box.index(self._trojan_hash(secret))

    def _user(self, row: Sequence[Any] | None) -> User | None:
        if row is None:
            return None
        (name, sealed, key_id, created_at, revoked_at,
         limit_bytes, limit_period, expires_at, last_seen) = row
        key_id = bytes(key_id)
        return User(
            name=name, secret=self._box.open(bytes(sealed), key_id), key_id=key_id,
            created_at=float(created_at),
            revoked_at=None if revoked_at is None else float(revoked_at),
            limit_bytes=None if limit_bytes is None else int(limit_bytes),
            limit_period=check_limit(None, limit_period),
            expires_at=None if expires_at is None else float(expires_at),
            last_seen=None if last_seen is None else float(last_seen))

    def _select_one(self, cur: Cursor, where: Literal["name", "key_id", "trojan_hash"],
                    arg: object) -> User | None:
        cur.execute(f"{_SELECT_USER} WHERE {where} = ?", (arg,))
        user = self._user(cur.fetchone())
        if user is None:
            return None
        cur.execute("SELECT name, kind, value FROM user_networks WHERE name = ?", (user.name,))
        return _with_networks([user], cur.fetchall())[0]

    def _existing(self, cur: Cursor, name: str) -> User:
        user = self._select_one(cur, "name", name)
        if user is None:
            raise StoreError(f"no user named {name!r}", code="not_found")
        return user

    # ------------------------------------------------------------------ users
    def add_user(self, name: str, secret: bytes, key_id: bytes, now: float, *,
                 limit_bytes: int | None = None, limit_period: LimitPeriod = "month",
                 expires_at: float | None = None) -> User:
        check_name(name)
        period = check_limit(limit_bytes, limit_period)
        user = User(name, secret, key_id, float(now), limit_bytes=limit_bytes,
                    limit_period=period,
                    expires_at=None if expires_at is None else float(expires_at))
        row = (name, self._box.seal(secret, key_id), key_id, user.created_at,
               self._index(secret), limit_bytes, period, user.expires_at)

        def work(cur: Cursor) -> User:
            # DO NOTHING on any unique column, then say which one: an IntegrityError would
            # abort a PostgreSQL transaction and reads differently in each database.
            cur.execute("INSERT INTO users (name, secret, key_id, created_at, trojan_hash, "
                        "limit_bytes, limit_period, expires_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", row)
            if cur.rowcount == 1:
                return user
            if self._select_one(cur, "name", name) is not None:
                raise StoreError(f"user {name!r} already exists", code="exists")
            raise StoreError("another user already has this key id or secret",
                             code="duplicate_key")

        return self._run(f"add user {name!r}", work)

    def get_user(self, name: str) -> User | None:
        return self._run("read a user",
                         lambda cur: self._select_one(cur, "name", name), write=False)

    def find_by_key_id(self, key_id: bytes) -> User | None:
        return self._run("look up a key id",
                         lambda cur: self._select_one(cur, "key_id", key_id), write=False)

    def find_by_trojan_hash(self, password_hash: str) -> User | None:
        index = self._box.index(password_hash)
        return self._run("look up a Trojan password",
                         lambda cur: self._select_one(cur, "trojan_hash", index), write=False)

    def list_users(self) -> list[User]:
        def work(cur: Cursor) -> list[User]:
            cur.execute(f"{_SELECT_USER} ORDER BY created_at, name")
            users = [u for u in map(self._user, cur.fetchall()) if u is not None]
            cur.execute("SELECT name, kind, value FROM user_networks")
            return _with_networks(users, cur.fetchall())

        return self._run("list users", work, write=False)

    def revoke(self, name: str, now: float) -> User:
        def work(cur: Cursor) -> User:
            cur.execute("UPDATE users SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                        (float(now), name))
            updated = cur.rowcount == 1
            user = self._existing(cur, name)
            if not updated:
                raise StoreError(f"user {name!r} is already revoked", code="already_revoked")
            return user

        return self._run(f"revoke {name!r}", work)

    def restore(self, name: str) -> User:
        def work(cur: Cursor) -> User:
            cur.execute("UPDATE users SET revoked_at = NULL WHERE name = ? "
                        "AND revoked_at IS NOT NULL", (name,))
            updated = cur.rowcount == 1
            user = self._existing(cur, name)
            if not updated:
                raise StoreError(f"user {name!r} is not revoked", code="not_revoked")
            return user

        return self._run(f"restore {name!r}", work)

    def delete(self, name: str) -> None:
        def work(cur: Cursor) -> None:
            if self._existing(cur, name).revoked_at is None:
                raise StoreError(f"user {name!r} is not revoked: revoke it first (its "
                                 "sessions end), then delete it", code="not_revoked")
            cur.execute("DELETE FROM usage WHERE name = ?", (name,))
            cur.execute("DELETE FROM user_networks WHERE name = ?", (name,))
            cur.execute("DELETE FROM users WHERE name = ? AND revoked_at IS NOT NULL",
                        (name,))

        self._run(f"delete {name!r}", work)

    def rotate(self, name: str, secret: bytes, key_id: bytes, now: float) -> User:
        # ``now`` is part of the interface for back ends that keep a history; this schema
        # keeps only the current credential (created_at stays the user's creation time).
        del now
        row = (self._box.seal(secret, key_id), key_id, self._index(secret), name)

        def work(cur: Cursor) -> User:
            cur.execute("UPDATE users SET secret = ?, key_id = ?, trojan_hash = ? "
                        "WHERE name = ? AND revoked_at IS NULL", row)
            updated = cur.rowcount == 1
            user = self._existing(cur, name)
            if not updated:
                raise StoreError(f"user {name!r} is revoked: a new key would not work "
                                 "(restore it first)", code="already_revoked")
            return user

        return self._run(f"rotate {name!r}'s key", work)

    def set_limit(self, name: str, limit_bytes: int | None,
                  limit_period: LimitPeriod = "month") -> User:
        period = check_limit(limit_bytes, limit_period)

        def work(cur: Cursor) -> User:
            cur.execute("UPDATE users SET limit_bytes = ?, limit_period = ? WHERE name = ?",
                        (limit_bytes, period, name))
            return self._existing(cur, name)

        return self._run(f"set {name!r}'s limit", work)

    def set_expiry(self, name: str, expires_at: float | None) -> User:
        expiry = None if expires_at is None else float(expires_at)

        def work(cur: Cursor) -> User:
            cur.execute("UPDATE users SET expires_at = ? WHERE name = ?", (expiry, name))
            return self._existing(cur, name)

        return self._run(f"set {name!r}'s expiry", work)

    def set_networks(self, name: str, kind: NetworkKind, values: tuple[str, ...]) -> User:
        checked = check_networks(kind, values)

        def work(cur: Cursor) -> User:
            self._existing(cur, name)
            if kind == "site":
                cur.execute("INSERT INTO meta (key, value) VALUES (?, '') ON CONFLICT (key) "
                            "DO UPDATE SET value = excluded.value", (_SITES_LOCK,))
                cur.execute("SELECT name, value FROM user_networks WHERE kind = 'site' "
                            "AND name <> ?", (name,))
                for other, value in cur.fetchall():
                    theirs = ipaddress.ip_network(value)
                    for mine in map(ipaddress.ip_network, checked):
                        if mine.version == theirs.version and mine.overlaps(theirs):
                            raise StoreError(f"site subnet {mine} overlaps {theirs} of site "
                                             f"{other!r}", code="overlap")
            cur.execute("DELETE FROM user_networks WHERE name = ? AND kind = ?", (name, kind))
            for value in checked:
                cur.execute("INSERT INTO user_networks (name, kind, value) VALUES (?, ?, ?)",
                            (name, kind, value))
            return self._existing(cur, name)

        return self._run(f"set {name!r}'s {kind} networks", work)

    # ------------------------------------------------------------------ usage
    def add_usage(self, deltas: Mapping[str, Usage], now: float) -> None:
        for name, usage in deltas.items():
            if not (0 <= usage.up <= MAX_BYTES and 0 <= usage.down <= MAX_BYTES):
                raise StoreError(f"impossible usage for {name!r}: {usage}", code="bad_usage")
        if not deltas:
            return
        hour, seen = hour_bucket(now), float(now)

        def work(cur: Cursor) -> None:
            # Sorted: servers adding for the same users lock their rows in the same order,
            # so two PostgreSQL transactions cannot deadlock.
            for name in sorted(deltas):
                usage = deltas[name]
                # last_seen never moves back: servers' clocks and flushes interleave.
                cur.execute("UPDATE users SET last_seen = CASE WHEN last_seen IS NULL "
                            "OR last_seen < ? THEN ? ELSE last_seen END WHERE name = ?",
                            (seen, seen, name))
                if cur.rowcount == 0 or usage.total == 0:
                    continue  # unknown (deleted meanwhile), or only seen
                # The increment happens in the database, under its row lock: never a
                # read-modify-write in Python, which would lose another server's bytes.
                cur.execute("INSERT INTO usage (name, hour, up, down) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT (name, hour) DO UPDATE SET "
                            "up = usage.up + excluded.up, down = usage.down + excluded.down",
                            (name, hour, usage.up, usage.down))

        self._run("add usage", work)

    def usage_by_user(self, since: float | None) -> dict[str, Usage]:
        def work(cur: Cursor) -> dict[str, Usage]:
            if since is None:
                cur.execute("SELECT name, SUM(up), SUM(down) FROM usage GROUP BY name")
            else:
                # Buckets start on whole seconds: "at or after since" is ">= ceil(since)",
                # which keeps the comparison in integers (and on the hour index).
                cur.execute("SELECT name, SUM(up), SUM(down) FROM usage WHERE hour >= ? "
                            "GROUP BY name", (math.ceil(since),))
            return {name: Usage(int(up), int(down)) for name, up, down in cur.fetchall()}

        return self._run("read usage", work, write=False)

    def usage_series(self, name: str, since: float) -> list[tuple[int, Usage]]:
        def work(cur: Cursor) -> list[tuple[int, Usage]]:
            cur.execute("SELECT hour, up, down FROM usage WHERE name = ? AND hour >= ? "
                        "ORDER BY hour", (name, math.ceil(since)))
            return [(int(hour), Usage(int(up), int(down))) for hour, up, down in cur.fetchall()]

        return self._run(f"read {name!r}'s usage", work, write=False)

    def reset_usage(self, name: str, since: float | None) -> None:
        def work(cur: Cursor) -> None:
            self._existing(cur, name)
            if since is None:
                cur.execute("DELETE FROM usage WHERE name = ?", (name,))
            else:
                cur.execute("DELETE FROM usage WHERE name = ? AND hour >= ?",
                            (name, math.ceil(since)))

        self._run(f"reset {name!r}'s usage", work)

    # ------------------------------------------------------------------ ending sessions
    def end_sessions(self, end: SessionEnd, now: float) -> None:
        def work(cur: Cursor) -> None:
            self._existing(cur, end.name)
            cur.execute("DELETE FROM session_ends WHERE until < ?",
                        (now - SESSION_END_KEEP_S,))
            cur.execute("INSERT INTO session_ends (name, server, session, until) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT (name, server, session) "
                        "DO UPDATE SET until = excluded.until",
                        (end.name, end.server, end.session, float(end.before)))

        self._run(f"end {end.name!r}'s sessions", work)

    def session_ends(self) -> list[SessionEnd]:
        def work(cur: Cursor) -> list[SessionEnd]:
            cur.execute("SELECT name, server, session, until FROM session_ends")
            return [SessionEnd(str(name), float(until), str(server), int(session))
                    for name, server, session, until in cur.fetchall()]

        return self._run("read the sessions to end", work, write=False)

    # ------------------------------------------------------------------ fleet
    def beat(self, server: str, now: float, info: str) -> None:
        def work(cur: Cursor) -> None:
            cur.execute("DELETE FROM servers WHERE seen_at < ?", (now - SERVER_KEEP_S,))
            cur.execute("INSERT INTO servers (id, seen_at, info) VALUES (?, ?, ?) "
                        "ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at, "
                        "info = excluded.info", (server, float(now), info))

        self._run("write this server's heartbeat", work)

    def servers(self) -> list[ServerBeat]:
        def work(cur: Cursor) -> list[ServerBeat]:
            cur.execute("SELECT id, seen_at, info FROM servers ORDER BY id")
            return [ServerBeat(str(i), float(seen), str(info))
                    for i, seen, info in cur.fetchall()]

        return self._run("read the fleet's heartbeats", work, write=False)

    def claim_setting(self, key: str, value: str) -> bool:
        def work(cur: Cursor) -> bool:
            cur.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                        "ON CONFLICT (key) DO NOTHING", (key, value))
            return cur.rowcount == 1

        return self._run(f"claim setting {key!r}", work)

    # ------------------------------------------------------------------ settings
    def get_setting(self, key: str) -> str | None:
        def work(cur: Cursor) -> str | None:
            cur.execute("SELECT value FROM settings WHERE key = ?", (key,))
            row = cur.fetchone()
            return None if row is None else str(row[0])

        return self._run(f"read setting {key!r}", work, write=False)

    def set_setting(self, key: str, value: str | None) -> None:
        def work(cur: Cursor) -> None:
            if value is None:
                cur.execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                cur.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                            (key, value))

        self._run(f"write setting {key!r}", work)

    def settings_with_prefix(self, prefix: str) -> dict[str, str]:
        def work(cur: Cursor) -> dict[str, str]:
            # Filtered here, not by LIKE ("_" and "%" would be wildcards there) nor by a
            # range (collations differ): the table holds a few rows per server.
            cur.execute("SELECT key, value FROM settings")
            return {str(k): str(v) for k, v in cur.fetchall() if str(k).startswith(prefix)}

        return self._run(f"read settings {prefix}*", work, write=False)
