"""The SQLite user store: one file in the state directory, in WAL mode.

WAL lets the CLI write while the server reads, from separate processes; every method is one
short transaction, so a killed process loses nothing that a method returned from.
(``synchronous=NORMAL`` in WAL mode: a commit survives the process being killed, and only a
power loss or kernel crash can lose the last commits, never corrupt the file.)
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from veil.errors import StoreError
from veil.store._sql import (
    PANEL_TABLE_NAMES,
    SCHEMA_VERSION,
    Cursor,
    SqlUserStore,
    T,
    TrojanHash,
    panel_tables,
)
from veil.store.base import SecretBox

__all__ = ["SCHEMA_VERSION", "SqliteUserStore", "TrojanHash"]

_CREATE = (
    """CREATE TABLE IF NOT EXISTS users (
        name         TEXT PRIMARY KEY,
        secret       BLOB NOT NULL,       -- SecretBox.seal(secret, key_id)
        key_id       BLOB NOT NULL UNIQUE,
        created_at   REAL NOT NULL,
        revoked_at   REAL,
        trojan_hash  TEXT,                -- SecretBox.index(hex SHA-224 of the password)
        limit_bytes  INTEGER,
        limit_period TEXT NOT NULL DEFAULT 'month',
        expires_at   REAL,
        last_seen    REAL
    )""",
    """CREATE TABLE IF NOT EXISTS usage (
        name  TEXT NOT NULL,
        hour  INTEGER NOT NULL,           -- unix seconds at the start of the hour (UTC)
        up    INTEGER NOT NULL DEFAULT 0,
        down  INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (name, hour)
    )""",
    "CREATE INDEX IF NOT EXISTS usage_hour ON usage (hour)",
    "CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
# Columns older files lack (schema 1 lacks trojan_hash too), added in place.
_ADDED_COLUMNS = (
    ("trojan_hash", "TEXT"),
    ("limit_bytes", "INTEGER"),
    ("limit_period", "TEXT NOT NULL DEFAULT 'month'"),
    ("expires_at", "REAL"),
    ("last_seen", "REAL"),
)
# Another process holding the write lock (a CLI command, a server flushing usage) finishes in
# milliseconds; waiting up to 5 s rides out a busy disk without failing the command.
BUSY_TIMEOUT_S = 5.0

# SQLite's primary result codes (the low byte of an extended code) -> (code, what to do).
_ERRORS = {
    sqlite3.SQLITE_FULL: ("disk_full", "the disk is full; free some space and retry"),
    sqlite3.SQLITE_BUSY: ("busy", f"another process held the write lock for over "
                                  f"{BUSY_TIMEOUT_S:g} s"),
    sqlite3.SQLITE_LOCKED: ("busy", "the database is locked"),
    sqlite3.SQLITE_READONLY: ("read_only", "the file or its directory is not writable"),
    sqlite3.SQLITE_CANTOPEN: ("cannot_open", "the file or its directory is not accessible"),
    sqlite3.SQLITE_PERM: ("read_only", "permission denied"),
    sqlite3.SQLITE_IOERR: ("io_error", "the disk reported an I/O error"),
    sqlite3.SQLITE_CORRUPT: ("corrupt", "the file is damaged; restore it from a backup"),
    sqlite3.SQLITE_NOTADB: ("corrupt", "the file is not a veil user store"),
}


def _owner_only(path: Path) -> None:
    """Create ``path`` 0600 if it is missing; take group and other bits off a file of ours
    (an older veil's, made under a 0755 directory and a 022 umask).

    An existing file is never opened here: closing any descriptor of a file drops every POSIX
    lock this process holds on it, and SQLite's locks of another connection of this process
    (the server's, while the admin panel opens its own) would go with it. chmod by path
    touches no lock.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass  # another process made it a moment ago
        except OSError as exc:
            raise StoreError(f"user store {path}: cannot open it: {exc.strerror}",
                             code="cannot_open") from exc
        return
    except OSError:
        return  # sqlite3.connect below says what is wrong
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)


class SqliteUserStore(SqlUserStore):
    """The user store in one SQLite file; several processes may open it at once."""

    def __init__(self, path: Path | str, *, trojan_hash: TrojanHash, box: SecretBox) -> None:
        super().__init__(trojan_hash=trojan_hash, box=box)
        self._path = Path(path)
        # The file holds sealed keys and every user's usage: owner-only whatever the directory's
        # mode or the umask (SQLite gives its -wal and -shm files the database file's mode).
        if str(path) != ":memory:":
            _owner_only(self._path)
        try:
            # check_same_thread=False: callers hop threads with asyncio.to_thread (SqlUserStore
            # lets one call in at a time); isolation_level=None: this class issues BEGIN and
            # COMMIT itself.
            self._db = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S,
                                       isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error("open it", exc) from exc
        try:
            self._configure()
            self._migrate()
            self._run("check the store key", self._check_store_key)
        except BaseException:
            self._db.close()
            raise

    def _configure(self) -> None:
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Freed space is zeroed: the plaintext secrets of an older file, and nothing
            # else, must not outlive their migration in unused pages.
            self._db.execute("PRAGMA secure_delete=ON")
        except sqlite3.Error as exc:
            raise self._error("open it", exc) from exc

    def _migrate(self) -> None:
        """Bring the file to SCHEMA_VERSION in one transaction; a no-op when it is there.

        Safe with several processes: the version is read again under the write lock, so
        only one of them migrates; the others find version 3. Secrets are sealed only if the
        database has no store key check yet (the check and the sealed secrets are written in
        the same transaction), so a secret is never sealed twice.
        """
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise self._error("open it", exc) from exc
        if version == SCHEMA_VERSION and self._has_panel_tables():
            return
        self._run("upgrade its schema", self._upgrade)
        # Push the sealed pages into the main file and empty the WAL, so the old plaintext
        # is gone from disk now rather than at the next automatic checkpoint. Best effort:
        # a reader in another process may delay it.
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _has_panel_tables(self) -> bool:
        try:
            found = self._db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN (?, ?, ?)",
                PANEL_TABLE_NAMES).fetchone()
        except sqlite3.Error as exc:
            raise self._error("open it", exc) from exc
        return bool(found[0] == len(PANEL_TABLE_NAMES))

    def _upgrade(self, cur: Cursor) -> None:
        cur.execute("PRAGMA user_version")
        version = cur.fetchone()[0]
        if version == SCHEMA_VERSION:
            # another process migrated while this one waited for the lock, or a file of this
            # schema from before the panel's tables (added without a new version)
            for statement in panel_tables("REAL"):
                cur.execute(statement)
            return
        if version > SCHEMA_VERSION:
            raise StoreError(f"the user store {self._path} was made by a newer veil "
                             f"(schema {version}; this veil knows {SCHEMA_VERSION})",
                             code="schema_too_new")
        for statement in (*_CREATE, *panel_tables("REAL")):
            cur.execute(statement)
        cur.execute("PRAGMA table_info(users)")
        columns = {row[1] for row in cur.fetchall()}
        for column, declaration in _ADDED_COLUMNS:
            if column not in columns:
                cur.execute(f"ALTER TABLE users ADD COLUMN {column} {declaration}")
        if not self._check_store_key(cur):
            self._seal_plaintext_secrets(cur)
        cur.execute("CREATE UNIQUE INDEX IF NOT EXISTS users_trojan_hash ON users (trojan_hash)")
        cur.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _transact(self, what: str, work: Callable[[Cursor], T], *, write: bool) -> T:
        db = self._db
        try:
            # IMMEDIATE takes the write lock up front (waiting up to the busy timeout), so
            # a write transaction never fails half-way because another process wrote first.
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = work(db.cursor())
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._error(what, exc) from exc
        return result

    def _error(self, what: str, exc: sqlite3.Error) -> StoreError:
        primary = getattr(exc, "sqlite_errorcode", -1) & 0xFF
        code, advice = _ERRORS.get(primary, ("store_error", ""))
        detail = f"{exc}: {advice}" if advice else str(exc)
        return StoreError(f"user store {self._path}: cannot {what}: {detail}", code=code)

    def _close(self) -> None:
        self._db.close()
