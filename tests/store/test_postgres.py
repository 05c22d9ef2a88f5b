"""What only the PostgreSQL store has: a server that drops connections, DSNs that carry
passwords, a fleet of servers creating the schema at once."""

from __future__ import annotations

import threading
import uuid

import pytest

from tests.store.conftest import BOX, trojan_hash
from tests.support.postgres import PostgresServer
from tests.support.procs import unused_port
from veil.errors import StoreError
from veil.store import open_store
from veil.store.base import Usage, UserStore
from veil.store.postgres import PostgresUserStore


def fresh(pg: PostgresServer) -> str:
    return pg.create_database(f"t{uuid.uuid4().hex}")


def open_pg(url: str) -> UserStore:
    return open_store(url, trojan_hash=trojan_hash, box=BOX)


def everything_said(err: pytest.ExceptionInfo[StoreError]) -> str:
    """Every message a logged traceback would show: the error's and each chained one's (the
    traceback's source lines are left out: this test's own source quotes passwords)."""
    said: list[str] = []
    exc: BaseException | None = err.value
    while exc is not None:
        said += [repr(exc), *map(str, exc.args)]
        exc = exc.__cause__ or exc.__context__
    return "\n".join(said)


def drop_connections(pg: PostgresServer, url: str) -> int:
    """What a PostgreSQL restart does to the store's connection: the server ends it."""
    dbname = url.rsplit("/", 1)[1]
    with pg.admin() as admin:
        row = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = %s AND pid <> pg_backend_pid()",
                            (dbname,)).fetchone()
    assert row is not None
    assert isinstance(row[0], int)
    return row[0]


@pytest.mark.smoke
def test_open_store_picks_postgres_for_both_url_schemes(pg: PostgresServer) -> None:
    url = fresh(pg)
    for scheme_url in (url, url.replace("postgresql://", "postgres://", 1)):
        store = open_pg(scheme_url)
        assert isinstance(store, PostgresUserStore)
        store.close()


def test_a_dropped_connection_is_reopened_once(pg: PostgresServer) -> None:
    url = fresh(pg)
    store = open_pg(url)
    try:
        store.add_user("alice", b"s" * 32, b"k" * 16, 1.0)
        assert drop_connections(pg, url) == 1
        assert store.get_user("alice") is not None  # a read on a new connection
        assert drop_connections(pg, url) == 1
        store.add_usage({"alice": Usage(1, 2)}, 1.0)  # a write: done once, not twice
        assert store.usage_by_user(None) == {"alice": Usage(1, 2)}
    finally:
        store.close()


@pytest.mark.smoke
def test_a_restarted_server_is_reconnected_to(pg: PostgresServer) -> None:
    url = fresh(pg)
    store = open_pg(url)
    try:
        store.add_user("alice", b"s" * 32, b"k" * 16, 1.0)
        pg.restart()
        assert store.get_user("alice") is not None
        pg.restart()
        store.add_usage({"alice": Usage(3, 4)}, 1.0)
        assert store.usage_by_user(None) == {"alice": Usage(3, 4)}
    finally:
        store.close()


def test_an_unreachable_server_is_a_store_error_without_the_password(pg: PostgresServer
                                                                     ) -> None:
    port = unused_port()  # nothing listens there
    url = pg.url("users").replace(f":{pg.port}/", f":{port}/")
    with pytest.raises(StoreError) as err:
        open_pg(url)
    assert err.value.code == "unavailable"
    assert f"veil@127.0.0.1:{port}/users" in str(err.value)
    assert pg.password not in everything_said(err)


def test_a_wrong_password_is_not_repeated_in_the_error(pg: PostgresServer) -> None:
    wrong = "Wrong-Password-4e2b1c"
    url = pg.url(fresh(pg).rsplit("/", 1)[1]).replace(pg.password, wrong)
    with pytest.raises(StoreError) as err:
        open_pg(url)
    assert err.value.code == "unavailable"
    assert "password" in str(err.value)  # the reason is there...
    said = everything_said(err)
    assert wrong not in said  # ...the password is not
    assert pg.password not in said


def test_an_error_after_the_server_went_away_does_not_leak_the_password(
        pg: PostgresServer) -> None:
    url = fresh(pg)
    store = open_pg(url)
    try:
        dbname = url.rsplit("/", 1)[1]
        drop_connections(pg, url)
        with pg.admin() as admin:
            admin.execute(f'DROP DATABASE "{dbname}"')
        with pytest.raises(StoreError) as err:
            store.get_user("alice")
        assert err.value.code == "unavailable"
        assert pg.password not in everything_said(err)
    finally:
        store.close()


def test_servers_starting_at_once_create_the_schema_once(pg: PostgresServer) -> None:
    url = fresh(pg)
    barrier = threading.Barrier(6)
    results: list[object] = []

    def server() -> None:
        barrier.wait()
        try:
            store = open_pg(url)
            results.append(store.get_setting("x"))
            store.close()
        except BaseException as exc:  # reported by the main thread
            results.append(exc)

    threads = [threading.Thread(target=server) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [None] * 6


def test_a_database_from_a_newer_veil_is_refused(pg: PostgresServer) -> None:
    url = fresh(pg)
    open_pg(url).close()
    with pg.admin(url.rsplit("/", 1)[1]) as admin:
        admin.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError) as err:
        open_pg(url)
    assert err.value.code == "schema_too_new"


def test_a_malformed_url_is_refused_without_quoting_it(pg: PostgresServer) -> None:
    with pytest.raises(StoreError) as err:
        open_pg("postgresql://veil:Secret-99@127.0.0.1:notaport/users?bogus=1")
    assert "Secret-99" not in everything_said(err)
