"""The SQLite user store: one file in the state directory, in WAL mode.

WAL lets the CLI write while the server reads, from separate processes; every write is one
short transaction, so a killed process loses nothing that was committed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from veil.errors import StoreError
from veil.store.base import User, UserStore, check_name

# Version 1: users. Version 2: + trojan_hash (indexed), backfilled from each user's secret.
SCHEMA_VERSION = 2
_CREATE_V1 = """
CREATE TABLE IF NOT EXISTS users (
    name        TEXT PRIMARY KEY,
    secret      BLOB NOT NULL,
    key_id      BLOB NOT NULL UNIQUE,
    created_at  REAL NOT NULL,
    revoked_at  REAL
)
"""
# Another process holding the write lock (a CLI command, the server) finishes in
# milliseconds; waiting up to 5 s rides out a busy disk without failing the command.
BUSY_TIMEOUT_S = 5.0

#: Computes a user's Trojan password hash (hex SHA-224) from the user's secret. Injected:
#: the derivation is protocol knowledge, which the store layer does not import.
TrojanHash = Callable[[bytes], str]


class SqliteUserStore(UserStore):
    def __init__(self, path: Path | str, *, trojan_hash: TrojanHash) -> None:
        self._trojan_hash = trojan_hash
        try:
            self._db = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open user store {path}: {exc}") from exc

    def _migrate(self) -> None:
        """Bring the file to SCHEMA_VERSION in one transaction; a no-op when it is there.

        Safe with several processes: the version is read again under the write lock, and
        every step is idempotent (an older veil may have reset ``user_version`` to 1).
        """
        db = self._db
        if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"the user store was made by a newer veil (schema {version})",
                                 code="schema_too_new")
            db.execute(_CREATE_V1)
            columns = {row[1] for row in db.execute("PRAGMA table_info(users)")}
            if "trojan_hash" not in columns:
                db.execute("ALTER TABLE users ADD COLUMN trojan_hash TEXT")
            missing = db.execute("SELECT name, secret FROM users WHERE trojan_hash IS NULL")
            for name, secret in missing.fetchall():
                db.execute("UPDATE users SET trojan_hash = ? WHERE name = ?",
                           (self._trojan_hash(bytes(secret)), name))
            db.execute("CREATE UNIQUE INDEX IF NOT EXISTS users_trojan_hash "
                       "ON users (trojan_hash)")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _row(self, row: tuple[str, bytes, bytes, float, float | None] | None) -> User | None:
        if row is None:
            return None
        name, secret, key_id, created_at, revoked_at = row
        return User(name, bytes(secret), bytes(key_id), float(created_at),
                    None if revoked_at is None else float(revoked_at))

    def _one(self, sql: str, args: tuple[object, ...]) -> User | None:
        try:
            return self._row(self._db.execute(sql, args).fetchone())
        except sqlite3.Error as exc:
            raise StoreError(f"user store query failed: {exc}") from exc

    def add_user(self, name: str, secret: bytes, key_id: bytes, now: float) -> User:
        check_name(name)
        try:
            self._db.execute(
                "INSERT INTO users (name, secret, key_id, created_at, revoked_at, trojan_hash) "
                "VALUES (?, ?, ?, ?, NULL, ?)",
                (name, secret, key_id, now, self._trojan_hash(secret)))
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"user {name!r} already exists", code="exists") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"cannot add user: {exc}") from exc
        return User(name, secret, key_id, now)

    def get_user(self, name: str) -> User | None:
        return self._one("SELECT name, secret, key_id, created_at, revoked_at FROM users "
                         "WHERE name = ?", (name,))

    def find_by_key_id(self, key_id: bytes) -> User | None:
        return self._one("SELECT name, secret, key_id, created_at, revoked_at FROM users "
                         "WHERE key_id = ?", (key_id,))

    def find_by_trojan_hash(self, password_hash: str) -> User | None:
        return self._one("SELECT name, secret, key_id, created_at, revoked_at FROM users "
                         "WHERE trojan_hash = ?", (password_hash,))

    def list_users(self) -> list[User]:
        try:
            rows = self._db.execute(
                "SELECT name, secret, key_id, created_at, revoked_at FROM users "
                "ORDER BY created_at").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"user store query failed: {exc}") from exc
        return [u for u in map(self._row, rows) if u is not None]

    def revoke(self, name: str, now: float) -> User:
        try:
            cur = self._db.execute(
                "UPDATE users SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (now, name))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot revoke: {exc}") from exc
        user = self.get_user(name)
        if user is None:
            raise StoreError(f"no user named {name!r}", code="not_found")
        if cur.rowcount == 0:
            raise StoreError(f"user {name!r} is already revoked", code="already_revoked")
        return user

    def close(self) -> None:
        self._db.close()
