"""The PostgreSQL user store: one database shared by a fleet of servers.

Imported only when a ``postgresql://`` URL is opened (``veil.store.open_store``), so a server
on SQLite never loads psycopg.

The DSN usually carries a password: it never appears in an error message or a log line.
Errors name the server as ``user@host:port/dbname``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from veil.errors import StoreError
from veil.store._sql import SCHEMA_VERSION, Cursor, SqlUserStore, T, TrojanHash, panel_tables
from veil.store.base import SecretBox

__all__ = ["PostgresUserStore"]

_CREATE = (
    """CREATE TABLE IF NOT EXISTS users (
        name         TEXT PRIMARY KEY,
        secret       BYTEA NOT NULL,
        key_id       BYTEA NOT NULL UNIQUE,
        created_at   DOUBLE PRECISION NOT NULL,
        revoked_at   DOUBLE PRECISION,
        trojan_hash  TEXT NOT NULL UNIQUE,
        limit_bytes  BIGINT,
        limit_period TEXT NOT NULL DEFAULT 'month',
        expires_at   DOUBLE PRECISION,
        last_seen    DOUBLE PRECISION
    )""",
    """CREATE TABLE IF NOT EXISTS usage (
        name  TEXT NOT NULL,
        hour  BIGINT NOT NULL,
        up    BIGINT NOT NULL DEFAULT 0,
        down  BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (name, hour)
    )""",
    "CREATE INDEX IF NOT EXISTS usage_hour ON usage (hour)",
    "CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
# pg_advisory_xact_lock key for creating and migrating the schema ("veil" in ASCII): servers
# starting at once queue on it, because concurrent CREATE TABLE IF NOT EXISTS can still fail.
_SCHEMA_LOCK = 0x7665696C
# A server that does not answer within this long is reported down instead of hanging startup
# or an authentication.
CONNECT_TIMEOUT_S = 10


class _PgCursor:
    """A psycopg cursor that takes the shared queries' ``?`` placeholders."""

    def __init__(self, cur: psycopg.Cursor[Any]) -> None:
        self._cur = cur

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> object:
        # The shared SQL contains no literal '?' or '%', so the translation is exact.
        return self._cur.execute(sql.replace("?", "%s"), params)

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount


class PostgresUserStore(SqlUserStore):
    """The user store in a PostgreSQL database; any number of servers may share it."""

    def __init__(self, dsn: str, *, trojan_hash: TrojanHash, box: SecretBox) -> None:
        super().__init__(trojan_hash=trojan_hash, box=box)
        self._dsn = dsn
        try:
            info = conninfo_to_dict(dsn)
        except psycopg.Error:
            # The parser's message may quote the DSN, password included.
            raise StoreError("the PostgreSQL URL is malformed", code="bad_url") from None
        self._password = str(info.get("password") or "")
        user = f"{info['user']}@" if info.get("user") else ""
        host = info.get("host") or info.get("hostaddr") or "localhost"
        self._where = f"{user}{host}:{info.get('port') or 5432}/{info.get('dbname') or ''}"
        self._conn: psycopg.Connection[Any] | None = None
        try:
            self._run("create or upgrade the schema", self._migrate)
        except BaseException:
            self.close()
            raise

    def _migrate(self, cur: Cursor) -> None:
        cur.execute(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
        # "relation already exists, skipping" notices are noise on every start.
        cur.execute("SET LOCAL client_min_messages = warning")
        for statement in (*_CREATE, *panel_tables("DOUBLE PRECISION")):
            cur.execute(statement)
        cur.execute("SELECT value FROM meta WHERE key = 'schema_version'")
        row = cur.fetchone()
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise StoreError(f"the user store at {self._where} was made by a newer veil "
                             f"(schema {version}; this veil knows {SCHEMA_VERSION})",
                             code="schema_too_new")
        if version < SCHEMA_VERSION:
            cur.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (str(SCHEMA_VERSION),))
        self._check_store_key(cur)

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            self._conn = psycopg.connect(self._dsn, autocommit=False,
                                         connect_timeout=CONNECT_TIMEOUT_S,
                                         application_name="veil")
        except psycopg.Error as exc:
            raise self._error("connect", exc) from None
        return self._conn

    def _transact(self, what: str, work: Callable[[Cursor], T], *, write: bool) -> T:
        # Reads and writes are both transactions here; ``write`` matters to SQLite's locks.
        del write
        for attempt in (1, 2):
            conn = self._connect()
            try:
                with conn.cursor() as cur:
                    result = work(_PgCursor(cur))
            except psycopg.Error as exc:
                self._rollback(conn)
                if attempt == 1 and (conn.broken or conn.closed):
                    # The server restarted or dropped us: nothing was committed, so doing
                    # the whole transaction again on a new connection is safe.
                    self._conn = None
                    continue
                raise self._error(what, exc) from None
            except BaseException:
                self._rollback(conn)
                raise
            try:
                conn.commit()
            except psycopg.Error as exc:
                # Not retried: the commit may have reached the server before the connection
                # broke, and doing an increment twice is worse than reporting it.
                self._rollback(conn)
                raise self._error(what, exc, committing=True) from None
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _rollback(self, conn: psycopg.Connection[Any]) -> None:
        if conn.broken or conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.close()
            self._conn = None
            return
        with contextlib.suppress(psycopg.Error):
            conn.rollback()

    def _error(self, what: str, exc: psycopg.Error, *, committing: bool = False) -> StoreError:
        # psycopg's messages do not quote the DSN today; scrub the password anyway, because
        # a future libpq message that did would put it into logs.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if self._password:
            reason = reason.replace(self._password, "***")
        if isinstance(exc, psycopg.OperationalError):
            code = "unavailable"
            if committing:
                reason += " (the connection broke while committing: the change may or may " \
                          "not have been saved)"
        else:
            code = "store_error"
        return StoreError(f"user store {self._where}: cannot {what}: {reason}", code=code)

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
