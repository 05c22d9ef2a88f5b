"""The SQLite user store: one file in the state directory, in WAL mode.

WAL lets the CLI write while the server reads, from separate processes; every write is one
short transaction, so a killed process loses nothing that was committed.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from veil.errors import StoreError
from veil.store.base import User, UserStore, check_name

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name        TEXT PRIMARY KEY,
    secret      BLOB NOT NULL,
    key_id      BLOB NOT NULL UNIQUE,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
"""
# Another process holding the write lock (a CLI command, the server) finishes in
# milliseconds; waiting up to 5 s rides out a busy disk without failing the command.
BUSY_TIMEOUT_S = 5.0


class SqliteUserStore(UserStore):
    def __init__(self, path: Path | str) -> None:
        try:
            self._db = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open user store {path}: {exc}") from exc

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
            self._db.execute("INSERT INTO users VALUES (?, ?, ?, ?, NULL)",
                             (name, secret, key_id, now))
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"user {name!r} already exists", code="exists") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"cannot add user: {exc}") from exc
        return User(name, secret, key_id, now)

    def get_user(self, name: str) -> User | None:
        return self._one("SELECT * FROM users WHERE name = ?", (name,))

    def find_by_key_id(self, key_id: bytes) -> User | None:
        return self._one("SELECT * FROM users WHERE key_id = ?", (key_id,))

    def list_users(self) -> list[User]:
        try:
            rows = self._db.execute("SELECT * FROM users ORDER BY created_at").fetchall()
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
