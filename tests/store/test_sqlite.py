"""What only the SQLite store has: files from older veils, and a process killed mid-write."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.store.conftest import BOX, STORE_KEY, trojan_hash
from tests.support.wait import wait_until
from veil.errors import StoreError
from veil.store.base import SecretBox, Usage, User
from veil.store.sqlite import SCHEMA_VERSION, SqliteUserStore

SRC = Path(__file__).resolve().parents[2] / "src"


def open_sqlite(path: Path) -> SqliteUserStore:
    return SqliteUserStore(path, trojan_hash=trojan_hash, box=BOX)


def old_store(path: Path, version: int, users: list[tuple[str, bytes, bytes, float | None]]
              ) -> None:
    """A users.db as veil wrote it before schema 3: plaintext secrets (and in version 2,
    plain hex Trojan hashes)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE users (name TEXT PRIMARY KEY, secret BLOB NOT NULL, "
               "key_id BLOB NOT NULL UNIQUE, created_at REAL NOT NULL, revoked_at REAL)")
    if version >= 2:
        db.execute("ALTER TABLE users ADD COLUMN trojan_hash TEXT")
        db.execute("CREATE UNIQUE INDEX users_trojan_hash ON users (trojan_hash)")
    for i, (name, secret, key_id, revoked_at) in enumerate(users):
        db.execute("INSERT INTO users (name, secret, key_id, created_at, revoked_at) "
                   "VALUES (?, ?, ?, ?, ?)", (name, secret, key_id, 1000.0 + i, revoked_at))
        if version >= 2:
            db.execute("UPDATE users SET trojan_hash = ? WHERE name = ?",
                       (trojan_hash(secret), name))
    db.execute(f"PRAGMA user_version={version}")
    db.close()


def raw(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


def users_of() -> list[tuple[str, bytes, bytes, float | None]]:
    return [("alice", os.urandom(32), os.urandom(16), None),
            ("bob", os.urandom(32), os.urandom(16), 1500.0)]


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_file_is_migrated_in_place(tmp_path: Path, version: int) -> None:
    path = tmp_path / "users.db"
    old = users_of()
    old_store(path, version, old)
    expected = [User(name, secret, key_id, 1000.0 + i, revoked_at)
                for i, (name, secret, key_id, revoked_at) in enumerate(old)]
    store = open_sqlite(path)
    try:
        assert store.list_users() == expected
        for user in expected:
            assert store.find_by_key_id(user.key_id) == user
            assert store.find_by_trojan_hash(trojan_hash(user.secret)) == user
        store.add_usage({"alice": Usage(1, 2)}, 5000.0)
        store.set_limit("alice", 10)
    finally:
        store.close()
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    check.close()
    contents = raw(path)
    assert b"alice" in contents
    for _, secret, _, _ in old:
        assert secret not in contents  # sealed, and the plaintext pages were overwritten
        assert trojan_hash(secret).encode() not in contents
    # Opening again is a no-op: nothing is sealed twice.
    again = open_sqlite(path)
    try:
        assert again.get_user("bob") == expected[1]
        assert again.get_user("alice").limit_bytes == 10  # type: ignore[union-attr]
        assert again.usage_by_user(None) == {"alice": Usage(1, 2)}
    finally:
        again.close()


def test_processes_opening_an_old_file_at_once_migrate_it_once(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    old = users_of()
    old_store(path, 2, old)
    barrier = threading.Barrier(4)
    results: list[object] = []

    def opener() -> None:
        barrier.wait()
        try:
            store = open_sqlite(path)
            results.append(store.get_user("alice"))
            store.close()
        except BaseException as exc:  # reported by the main thread
            results.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [User("alice", old[0][1], old[0][2], 1000.0)] * 4


def test_a_wrong_store_key_does_not_touch_an_old_file(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    old = users_of()
    old_store(path, 2, old)
    open_sqlite(path).close()
    with pytest.raises(StoreError) as err:
        SqliteUserStore(path, trojan_hash=trojan_hash, box=SecretBox(os.urandom(32)))
    assert err.value.code == "bad_store_key"
    store = open_sqlite(path)
    assert store.get_user("alice") == User("alice", old[0][1], old[0][2], 1000.0)
    store.close()


def test_a_file_from_a_newer_veil_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    open_sqlite(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError) as err:
        open_sqlite(path)
    assert err.value.code == "schema_too_new"


def test_a_file_that_is_not_a_store_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    path.write_bytes(b"this is not an SQLite database, it is a text file" * 100)
    with pytest.raises(StoreError) as err:
        open_sqlite(path)
    assert err.value.code == "corrupt"
    assert str(path) in str(err.value)


def test_an_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as err:
        open_sqlite(tmp_path / "missing-dir" / "users.db")
    assert err.value.code == "cannot_open"


def test_the_file_is_owner_only_whatever_the_directory_and_umask(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    old = os.umask(0o022)
    try:
        store = open_sqlite(tmp_path / "users.db")
        store.add_user("alice", os.urandom(32), os.urandom(8), 1.0)
        for name in ("users.db", "users.db-wal", "users.db-shm"):
            if (tmp_path / name).exists():
                assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
        store.close()
        # A file an older veil left readable by everyone is made owner-only when opened.
        (tmp_path / "users.db").chmod(0o644)
        open_sqlite(tmp_path / "users.db").close()
        assert (tmp_path / "users.db").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_a_full_disk_is_a_store_error_and_loses_nothing_committed(tmp_path: Path) -> None:
    store = open_sqlite(tmp_path / "users.db")
    try:
        store.add_user("alice", os.urandom(32), os.urandom(16), 1.0)
        # The database may not grow: to SQLite exactly what a full disk is (SQLITE_FULL).
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count={pages}")
        with pytest.raises(StoreError) as err:
            for i in range(1000):
                store.add_user(f"user{i}", os.urandom(32), os.urandom(16), 2.0)
        assert err.value.code == "disk_full"
        assert "full" in str(err.value)
        failed = f"user{i}"
        assert store.get_user(failed) is None  # the failed call left nothing behind
        assert store.get_user("alice") is not None
        names = {u.name for u in store.list_users()}
        assert names == {"alice"} | {f"user{j}" for j in range(i)}
    finally:
        store.close()


# A writer that reports each add_usage after it returned (i.e. after its commit).
_WRITER = """
import sys
from veil.store.base import SecretBox, Usage
from veil.store.sqlite import SqliteUserStore
box = SecretBox(bytes.fromhex(sys.argv[2]))
store = SqliteUserStore(sys.argv[1], trojan_hash=lambda secret: "", box=box)
i = 0
while True:
    # A new hour (1_000_000_800 starts one) every 50 calls: inserts and in-place
    # increments both get interrupted.
    store.add_usage({"alice": Usage(1, 0), "bob": Usage(0, 2)}, 1_000_000_800 + i * 72)
    i += 1
    print(i, flush=True)
"""


def test_kill_9_while_adding_usage_loses_no_returned_call(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    store = open_sqlite(path)
    store.add_user("alice", os.urandom(32), os.urandom(16), 1.0)
    store.add_user("bob", os.urandom(32), os.urandom(16), 1.0)
    store.close()
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), STORE_KEY.hex()],
                              stdout=subprocess.PIPE, env=env)
    try:
        assert writer.stdout is not None
        stdout = writer.stdout
        # Each line is a call that returned; readline() blocks until the next one.
        wait_until(lambda: int(stdout.readline() or 0) >= 300, 30,
                   "300 returned calls (the writer is too slow or died)", poll=0)
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        returned = max([300, *map(int, writer.stdout.read().split())])
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        if writer.stdout is not None:
            writer.stdout.close()
    assert writer.returncode == -signal.SIGKILL
    store = open_sqlite(path)
    try:
        assert store.get_user("alice") is not None
        usage = store.usage_by_user(None)
        # Every call that returned is counted; at most one more (committed, then killed
        # before it could print), never half of one (alice's and bob's move together).
        assert returned <= usage["alice"].up <= returned + 1
        assert usage["bob"].down == 2 * usage["alice"].up
        assert len(store.usage_series("alice", 0)) == (usage["alice"].up + 49) // 50
        check = sqlite3.connect(path)
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        check.close()
    finally:
        store.close()


def test_a_schema_3_file_from_before_the_panels_tables_gets_them(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    open_sqlite(path).close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE session_ends")
        db.execute("DROP TABLE servers")
    db.close()
    store = open_sqlite(path)
    try:
        store.beat("a", 1.0, "{}")
        assert [s.id for s in store.servers()] == ["a"] and store.session_ends() == []
    finally:
        store.close()
