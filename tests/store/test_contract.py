"""The UserStore contract, run against every back end (SQLite and PostgreSQL).

Each test starts from an empty database; ``backend.open()`` gives a second store on the same
database, as another process or server would have.
"""

from __future__ import annotations

import calendar
import itertools
import os
import threading
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.store.conftest import Backend, trojan_hash
from veil.errors import StoreError
from veil.store._sql import Cursor, SqlUserStore
from veil.store.base import HOUR_S, SecretBox, Usage, User, UserStore, hour_bucket

# Fixed clock: half an hour before a month ends (UTC), so periods can be crossed on purpose.
JAN_31_2330 = float(calendar.timegm((2026, 1, 31, 23, 30, 0)))
FEB_1_0030 = JAN_31_2330 + HOUR_S
NOW = JAN_31_2330


def credential() -> tuple[bytes, bytes]:
    return os.urandom(32), os.urandom(16)


def add(store: UserStore, name: str, now: float = NOW, **limits: object) -> User:
    secret, key_id = credential()
    return store.add_user(name, secret, key_id, now, **limits)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- users
def test_added_user_is_found_by_name_key_id_and_trojan_hash(store: UserStore) -> None:
    secret, key_id = credential()
    added = store.add_user("alice", secret, key_id, NOW)
    assert added == User("alice", secret, key_id, NOW)
    assert store.get_user("alice") == added
    assert store.find_by_key_id(key_id) == added
    # The caller looks up the raw hex SHA-224 from the wire; the store indexes it itself.
    assert store.find_by_trojan_hash(trojan_hash(secret)) == added
    assert store.get_user("bob") is None
    assert store.find_by_key_id(os.urandom(16)) is None
    assert store.find_by_trojan_hash(trojan_hash(os.urandom(32))) is None


def test_list_users_oldest_first_with_revoked(store: UserStore) -> None:
    add(store, "carol", NOW + 2)
    add(store, "alice", NOW)
    add(store, "bob", NOW + 1)
    store.revoke("bob", NOW + 3)
    assert [u.name for u in store.list_users()] == ["alice", "bob", "carol"]
    assert [u.active for u in store.list_users()] == [True, False, True]


def test_add_user_with_limit_and_expiry(store: UserStore) -> None:
    user = add(store, "alice", limit_bytes=10**12, limit_period="total", expires_at=NOW + 99)
    assert (user.limit_bytes, user.limit_period, user.expires_at) == (10**12, "total", NOW + 99)
    assert store.get_user("alice") == user


def test_duplicate_name_is_refused_and_changes_nothing(store: UserStore) -> None:
    first = add(store, "alice")
    secret, key_id = credential()
    with pytest.raises(StoreError) as err:
        store.add_user("alice", secret, key_id, NOW + 1)
    assert err.value.code == "exists"
    assert store.get_user("alice") == first
    assert store.find_by_key_id(key_id) is None
    assert len(store.list_users()) == 1


def test_duplicate_key_id_is_refused(store: UserStore) -> None:
    alice = add(store, "alice")
    with pytest.raises(StoreError) as err:
        store.add_user("bob", os.urandom(32), alice.key_id, NOW)
    assert err.value.code == "duplicate_key"
    assert store.get_user("bob") is None


@pytest.mark.parametrize("name", ["", "-alice", "a b", "a/b", "é", "x" * 65, "a;DROP", "alice\n",
                                  "alice\r", "\nalice"])
def test_bad_names_are_refused(store: UserStore, name: str) -> None:
    with pytest.raises(StoreError) as err:
        add(store, name)
    assert err.value.code == "bad_name"
    assert store.list_users() == []


def test_revoke(store: UserStore) -> None:
    alice = add(store, "alice")
    revoked = store.revoke("alice", NOW + 5)
    assert revoked.revoked_at == NOW + 5
    assert not revoked.active
    # Revoked users are still found: the server must tell "revoked" from "unknown".
    assert store.find_by_key_id(alice.key_id) == revoked
    assert store.find_by_trojan_hash(trojan_hash(alice.secret)) == revoked
    with pytest.raises(StoreError) as err:
        store.revoke("alice", NOW + 6)
    assert err.value.code == "already_revoked"
    assert store.get_user("alice") == revoked  # the first revocation time stays


def test_unknown_user_is_not_found_by_every_edit(store: UserStore) -> None:
    secret, key_id = credential()
    edits: list[Callable[[], object]] = [lambda: store.revoke("ghost", NOW),
             lambda: store.rotate("ghost", secret, key_id, NOW),
             lambda: store.set_limit("ghost", 1),
             lambda: store.set_expiry("ghost", NOW)]
    for edit in edits:
        with pytest.raises(StoreError) as err:
            edit()
        assert err.value.code == "not_found"
    assert store.list_users() == []


def test_rotate_replaces_the_credential(store: UserStore) -> None:
    old = add(store, "alice", limit_bytes=5)
    secret, key_id = credential()
    new = store.rotate("alice", secret, key_id, NOW + 1)
    assert (new.secret, new.key_id) == (secret, key_id)
    assert (new.created_at, new.limit_bytes) == (old.created_at, 5)
    assert store.find_by_key_id(old.key_id) is None
    assert store.find_by_trojan_hash(trojan_hash(old.secret)) is None
    assert store.find_by_key_id(key_id) == new
    assert store.find_by_trojan_hash(trojan_hash(secret)) == new
    assert store.get_user("alice") == new


def test_rotating_a_revoked_user_is_refused(store: UserStore) -> None:
    # Its new key could not work: a rotation that printed one was a dead end (#19).
    old = add(store, "alice")
    revoked = store.revoke("alice", NOW)
    secret, key_id = credential()
    with pytest.raises(StoreError) as err:
        store.rotate("alice", secret, key_id, NOW + 1)
    assert err.value.code == "already_revoked"
    assert store.find_by_key_id(key_id) is None
    assert store.find_by_key_id(old.key_id) == revoked


def test_a_revoked_user_can_be_restored(store: UserStore) -> None:
    alice = add(store, "alice")
    with pytest.raises(StoreError) as err:
        store.restore("alice")
    assert err.value.code == "not_revoked"
    store.revoke("alice", NOW)
    restored = store.restore("alice")
    assert restored.active and restored.key_id == alice.key_id
    assert store.get_user("alice") == restored


def test_a_revoked_user_can_be_deleted_and_the_name_used_again(store: UserStore) -> None:
    add(store, "alice")
    store.add_usage({"alice": Usage(5, 7)}, NOW)
    with pytest.raises(StoreError) as err:
        store.delete("alice")
    assert err.value.code == "not_revoked"
    store.revoke("alice", NOW)
    store.delete("alice")
    assert store.get_user("alice") is None and store.usage_by_user(None) == {}
    with pytest.raises(StoreError) as err:
        store.delete("alice")
    assert err.value.code == "not_found"
    assert add(store, "alice").active


def test_settings_with_a_prefix(store: UserStore) -> None:
    store.set_setting("server.a_1", "x")
    store.set_setting("server.b%", "y")
    store.set_setting("serverless", "z")
    assert store.settings_with_prefix("server.") == {"server.a_1": "x", "server.b%": "y"}


def test_set_and_remove_limit_and_expiry(store: UserStore) -> None:
    add(store, "alice")
    assert store.set_limit("alice", 1000, "total").limit_bytes == 1000
    assert store.get_user("alice").limit_period == "total"  # type: ignore[union-attr]
    assert store.set_limit("alice", 0).limit_period == "month"
    assert store.get_user("alice").limit_bytes == 0  # type: ignore[union-attr]
    assert store.set_limit("alice", None).limit_bytes is None
    assert store.set_expiry("alice", NOW + 60).expires_at == NOW + 60
    assert store.get_user("alice").expires_at == NOW + 60  # type: ignore[union-attr]
    assert store.set_expiry("alice", None).expires_at is None
    assert store.get_user("alice") == User("alice", *_credential_of(store, "alice"), NOW)


def _credential_of(store: UserStore, name: str) -> tuple[bytes, bytes]:
    user = store.get_user(name)
    assert user is not None
    return user.secret, user.key_id


@pytest.mark.parametrize(("limit", "period"),
                         [(-1, "month"), (2**63, "total"), (10, "week"), (10, "")])
def test_bad_limits_are_refused(store: UserStore, limit: int, period: str) -> None:
    add(store, "alice", limit_bytes=7)
    with pytest.raises(StoreError) as err:
        store.set_limit("alice", limit, period)  # type: ignore[arg-type]
    assert err.value.code == "bad_limit"
    assert store.get_user("alice").limit_bytes == 7  # type: ignore[union-attr]
    with pytest.raises(StoreError):
        add(store, "bob", limit_bytes=limit, limit_period=period)
    assert store.get_user("bob") is None


def test_status(store: UserStore) -> None:
    add(store, "alice", limit_bytes=100, expires_at=NOW + 10)
    store.add_usage({"alice": Usage(up=60, down=39)}, NOW)
    alice = store.get_user("alice")
    assert alice is not None
    assert alice.status(NOW, store.period_usage(alice, NOW).total) == "active"
    store.add_usage({"alice": Usage(down=1)}, NOW)
    assert alice.status(NOW, store.period_usage(alice, NOW).total) == "over_limit"
    assert alice.status(NOW + 10, 0) == "expired"
    revoked = store.revoke("alice", NOW)
    assert revoked.status(NOW + 10, 1000) == "revoked"  # revocation outranks the rest


# ---------------------------------------------------------------------- usage
def test_usage_buckets_add_up_within_an_hour(store: UserStore) -> None:
    add(store, "alice")
    add(store, "bob")
    hour = hour_bucket(NOW)
    store.add_usage({"alice": Usage(10, 100), "bob": Usage(1, 2)}, hour + 5)
    store.add_usage({"alice": Usage(20, 200)}, hour + HOUR_S - 1)
    store.add_usage({"alice": Usage(3, 4)}, hour + HOUR_S)  # the next hour: another bucket
    assert store.usage_series("alice", 0) == [(hour, Usage(30, 300)),
                                              (hour + HOUR_S, Usage(3, 4))]
    assert store.usage_series("bob", 0) == [(hour, Usage(1, 2))]
    assert store.usage_by_user(None) == {"alice": Usage(33, 304), "bob": Usage(1, 2)}
    # Buckets starting at or after ``since``: a bucket that began earlier is left out.
    assert store.usage_by_user(hour + 1) == {"alice": Usage(3, 4)}
    assert store.usage_by_user(hour + HOUR_S) == {"alice": Usage(3, 4)}
    assert store.usage_series("alice", hour + 1) == [(hour + HOUR_S, Usage(3, 4))]
    assert store.usage_by_user(hour + 2 * HOUR_S) == {}


def test_usage_of_unknown_users_is_ignored(store: UserStore) -> None:
    add(store, "alice")
    store.add_usage({"ghost": Usage(5, 5), "alice": Usage(1, 1)}, NOW)
    store.add_usage({}, NOW)
    assert store.usage_by_user(None) == {"alice": Usage(1, 1)}
    assert store.usage_series("ghost", 0) == []


@pytest.mark.parametrize("usage", [Usage(5, -1), Usage(-1, 5), Usage(2**63, 0)])
def test_impossible_usage_is_refused(store: UserStore, usage: Usage) -> None:
    add(store, "alice")
    add(store, "bob")
    with pytest.raises(StoreError) as err:
        store.add_usage({"alice": Usage(1, 1), "bob": usage}, NOW)
    assert err.value.code == "bad_usage"
    assert store.usage_by_user(None) == {}  # nothing of the batch was added


def test_period_usage_month_vs_total_across_a_month_boundary(store: UserStore) -> None:
    monthly = add(store, "monthly", limit_bytes=1000, limit_period="month")
    total = add(store, "total", limit_bytes=1000, limit_period="total")
    store.add_usage({"monthly": Usage(100, 0), "total": Usage(100, 0)}, JAN_31_2330)
    assert store.period_usage(monthly, JAN_31_2330) == Usage(100, 0)
    store.add_usage({"monthly": Usage(0, 7), "total": Usage(0, 7)}, FEB_1_0030)
    assert store.period_usage(monthly, FEB_1_0030) == Usage(0, 7)  # January no longer counts
    assert store.period_usage(total, FEB_1_0030) == Usage(100, 7)
    assert store.period_usage(add(store, "idle"), FEB_1_0030) == Usage()


def test_last_seen(store: UserStore) -> None:
    add(store, "alice")
    add(store, "bob")
    assert store.get_user("alice").last_seen is None  # type: ignore[union-attr]
    store.add_usage({"alice": Usage(1, 0)}, NOW + 7)
    assert store.get_user("alice").last_seen == NOW + 7  # type: ignore[union-attr]
    assert store.get_user("bob").last_seen is None  # type: ignore[union-attr]
    # A zero delta still says the user was there; an older flush does not move it back.
    store.add_usage({"alice": Usage()}, NOW + 9)
    store.add_usage({"alice": Usage(1, 0)}, NOW + 8)
    alice = store.get_user("alice")
    assert alice is not None
    assert alice.last_seen == NOW + 9
    assert store.usage_by_user(None) == {"alice": Usage(2, 0)}


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(adds=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4),
                               st.integers(0, 2**40), st.integers(0, 2**40)), max_size=12),
       since_hours=st.integers(-1, 5))
def test_usage_matches_a_model(store: UserStore, adds: list[tuple[int, int, int, int]],
                               since_hours: int) -> None:
    # The store outlives the examples: each example gets its own users.
    names = [f"u{next(_EXAMPLE)}" for _ in range(3)]
    for name in names:
        add(store, name)
    base = hour_bucket(NOW)
    model: dict[str, list[int]] = {}
    for who, hours, up, down in adds:
        store.add_usage({names[who]: Usage(up, down)}, base + hours * HOUR_S + 17)
        if hours >= since_hours and up + down > 0:
            totals = model.setdefault(names[who], [0, 0])
            totals[0] += up
            totals[1] += down
    got = store.usage_by_user(base + since_hours * HOUR_S)
    assert {n: u for n, u in got.items() if n in names} == {
        n: Usage(*t) for n, t in model.items()}


_EXAMPLE = itertools.count()


# ---------------------------------------------------------------------- settings
def test_settings(store: UserStore) -> None:
    assert store.get_setting("admin_password") is None
    store.set_setting("admin_password", "hash-1")
    store.set_setting("theme", "dark")
    assert store.get_setting("admin_password") == "hash-1"
    store.set_setting("admin_password", "hash-2")
    assert store.get_setting("admin_password") == "hash-2"
    store.set_setting("admin_password", None)
    assert store.get_setting("admin_password") is None
    store.set_setting("admin_password", None)  # deleting what is not there is fine
    assert store.get_setting("theme") == "dark"


# ---------------------------------------------------------------------- at rest
def test_no_credential_is_in_the_database_in_the_clear(backend: Backend,
                                                       store: UserStore) -> None:
    alice = add(store, "alice")
    bob = add(store, "bob")
    secret, key_id = credential()
    store.rotate("bob", secret, key_id, NOW)
    store.set_setting("canary", "setting-canary")
    raw = backend.raw_contents()
    # The dump is the real thing: what is meant to be readable is there.
    assert b"alice" in raw
    assert b"setting-canary" in raw
    for user_secret in (alice.secret, bob.secret, secret):
        assert user_secret not in raw
        assert user_secret.hex().encode() not in raw
        # Nor the Trojan hash a prober could test the server with.
        assert trojan_hash(user_secret).encode() not in raw


def test_a_wrong_store_key_is_refused_on_open(backend: Backend, store: UserStore) -> None:
    add(store, "alice")
    with pytest.raises(StoreError) as err:
        backend.open(SecretBox(os.urandom(32)))
    assert err.value.code == "bad_store_key"
    assert "store.key" in str(err.value)


def test_a_wrong_store_key_is_refused_even_without_users(backend: Backend,
                                                         store: UserStore) -> None:
    with pytest.raises(StoreError) as err:
        backend.open(SecretBox(os.urandom(32)))
    assert err.value.code == "bad_store_key"


# ---------------------------------------------------------------------- sharing
def test_two_stores_on_one_database_see_each_others_writes(backend: Backend,
                                                           store: UserStore) -> None:
    other = backend.open()
    alice = add(store, "alice")
    assert other.get_user("alice") == alice
    revoked = other.revoke("alice", NOW + 1)
    assert store.get_user("alice") == revoked
    other.add_usage({"alice": Usage(5, 6)}, NOW)
    store.add_usage({"alice": Usage(1, 1)}, NOW)
    assert store.usage_by_user(None) == other.usage_by_user(None) == {"alice": Usage(6, 7)}
    store.set_setting("k", "v")
    assert other.get_setting("k") == "v"


def test_everything_survives_closing_and_reopening(backend: Backend, store: UserStore) -> None:
    alice = add(store, "alice", limit_bytes=9, expires_at=NOW + 1)
    store.add_usage({"alice": Usage(3, 4)}, NOW)
    store.set_setting("k", "v")
    store.close()
    again = backend.open()
    assert again.get_user("alice") == User(
        alice.name, alice.secret, alice.key_id, NOW, limit_bytes=9, expires_at=NOW + 1,
        last_seen=NOW)
    assert again.usage_by_user(None) == {"alice": Usage(3, 4)}
    assert again.get_setting("k") == "v"


def test_concurrent_usage_from_two_stores_adds_up_exactly(backend: Backend,
                                                          store: UserStore) -> None:
    add(store, "alice")
    add(store, "bob")
    rounds = 200
    errors: list[BaseException] = []

    def server(instance: UserStore) -> None:
        try:
            for i in range(rounds):
                instance.add_usage({"alice": Usage(1, 2), "bob": Usage(0, 1)}, NOW + i)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=server, args=(backend.open(),)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert store.usage_by_user(None) == {"alice": Usage(2 * rounds, 4 * rounds),
                                         "bob": Usage(0, 2 * rounds)}
    assert store.get_user("alice").last_seen == NOW + rounds - 1  # type: ignore[union-attr]


# ---------------------------------------------------------------------- closing
def test_close_waits_for_the_call_in_flight_and_later_calls_are_store_errors(
        backend: Backend) -> None:
    """A server stopping closes its store while a refresh may still run in a worker thread
    (cancelling the task does not stop the thread). Closing under a running query crashed
    the process (SQLite dereferenced the freed connection: a segfault in CI), so close()
    must wait for the call to finish, and every later call must be a clean StoreError."""
    store = backend.open()
    assert isinstance(store, SqlUserStore)
    add(store, "alice")
    inside, release = threading.Event(), threading.Event()

    def slow_read(cur: Cursor) -> int:
        cur.execute("SELECT count(*) FROM users")
        (count,) = cur.fetchone()
        inside.set()
        release.wait(10)
        cur.execute("SELECT count(*) FROM users")
        return int(count) + int(cur.fetchone()[0])

    results: list[object] = []
    reader = threading.Thread(target=lambda: results.append(
        store._run("read slowly", slow_read, write=False)))
    reader.start()
    assert inside.wait(10)
    closer = threading.Thread(target=store.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive(), "close() returned while a query was still running"
    release.set()
    reader.join(10)
    closer.join(10)
    assert not closer.is_alive()
    assert results == [2]
    with pytest.raises(StoreError) as caught:
        store.list_users()
    assert caught.value.code == "closed"
    store.close()  # a second close is harmless


# ---------------------------------------------------------------------- the panel's actions
def test_reset_usage_forgets_the_period_and_keeps_what_came_before(store: UserStore) -> None:
    add(store, "alice")
    add(store, "bob")
    store.add_usage({"alice": Usage(5, 6), "bob": Usage(1, 1)}, JAN_31_2330)
    store.add_usage({"alice": Usage(7, 8)}, FEB_1_0030)
    store.reset_usage("alice", FEB_1_0030 - 1800)  # February's first hour on
    assert store.usage_by_user(None) == {"alice": Usage(5, 6), "bob": Usage(1, 1)}
    store.reset_usage("alice", None)
    assert store.usage_by_user(None) == {"bob": Usage(1, 1)}
    with pytest.raises(StoreError) as caught:
        store.reset_usage("nobody", None)
    assert caught.value.code == "not_found"


def test_sessions_to_end_reach_another_store_and_the_latest_wins(backend: Backend,
                                                                  store: UserStore) -> None:
    from veil.store.base import SESSION_END_KEEP_S, SessionEnd

    add(store, "alice")
    other = backend.open()
    store.end_sessions(SessionEnd("alice", NOW), NOW)
    store.end_sessions(SessionEnd("alice", NOW + 5), NOW + 5)  # the same row, moved on
    store.end_sessions(SessionEnd("alice", NOW + 6, "host 127.0.0.1:443", 7), NOW + 6)
    ends = sorted(other.session_ends(), key=lambda e: e.session)
    assert ends == [SessionEnd("alice", NOW + 5), SessionEnd("alice", NOW + 6,
                                                             "host 127.0.0.1:443", 7)]
    assert ends[0].applies("any", 3, NOW + 5) and not ends[0].applies("any", 3, NOW + 5.5)
    assert ends[1].applies("host 127.0.0.1:443", 7, NOW) and not ends[1].applies("x", 7, NOW)
    # Rows older than the keep time go when the next one is written.
    add(store, "bob")
    store.end_sessions(SessionEnd("bob", NOW + SESSION_END_KEEP_S + 10),
                       NOW + SESSION_END_KEEP_S + 10)
    assert [e.name for e in other.session_ends()] == ["bob"]
    with pytest.raises(StoreError) as caught:
        store.end_sessions(SessionEnd("nobody", NOW), NOW)
    assert caught.value.code == "not_found"


def test_heartbeats_of_a_fleet_are_kept_per_server(backend: Backend, store: UserStore) -> None:
    from veil.store.base import SERVER_KEEP_S, ServerBeat

    other = backend.open()
    store.beat("b", NOW, '{"n": 1}')
    other.beat("a", NOW + 1, '{"n": 2}')
    store.beat("b", NOW + 2, '{"n": 3}')
    assert other.servers() == [ServerBeat("a", NOW + 1, '{"n": 2}'),
                               ServerBeat("b", NOW + 2, '{"n": 3}')]
    store.beat("b", NOW + 2 + SERVER_KEEP_S, "{}")  # a is gone for longer than the keep time
    assert [s.id for s in other.servers()] == ["b"]


def test_a_setting_is_claimed_once_across_stores(backend: Backend, store: UserStore) -> None:
    other = backend.open()
    assert store.claim_setting("alert:x", "1") is True
    assert other.claim_setting("alert:x", "2") is False
    assert other.get_setting("alert:x") == "1"


# ---------------------------------------------------------------------- site-to-site
def test_sites_and_reach_are_stored_read_back_and_reach_another_store(
        backend: Backend, store: UserStore) -> None:
    add(store, "office-sh")
    add(store, "alice")
    site = store.set_networks("office-sh", "site", ("192.168.10.0/24", "fd10::/64"))
    assert site.sites == ("192.168.10.0/24", "fd10::/64")
    store.set_networks("alice", "reach", ("office-sh", "10.9.0.0/16"))
    other = backend.open()
    by_name = {u.name: u for u in other.list_users()}
    assert by_name["office-sh"].sites == ("192.168.10.0/24", "fd10::/64")
    assert by_name["alice"].reach == ("10.9.0.0/16", "office-sh")
    assert other.find_by_key_id(by_name["alice"].key_id) == by_name["alice"]
    # Replaced, not added to; an empty list makes an ordinary user again.
    assert store.set_networks("office-sh", "site", ("192.168.11.0/24",)).sites == (
        "192.168.11.0/24",)
    assert store.set_networks("office-sh", "site", ()).sites == ()
    store.revoke("alice", NOW)
    store.delete("alice")
    add(store, "alice")
    assert store.get_user("alice").reach == ()  # type: ignore[union-attr]


def test_overlapping_site_subnets_are_refused(store: UserStore) -> None:
    add(store, "office-sh")
    add(store, "office-bj")
    store.set_networks("office-sh", "site", ("192.168.10.0/24",))
    with pytest.raises(StoreError) as caught:
        store.set_networks("office-bj", "site", ("192.168.0.0/16",))
    assert caught.value.code == "overlap"
    assert "office-sh" in str(caught.value)
    with pytest.raises(StoreError) as caught:
        store.set_networks("office-bj", "site", ("10.1.0.0/16", "10.1.2.0/24"))
    assert caught.value.code == "overlap"
    assert store.get_user("office-bj").sites == ()  # type: ignore[union-attr]
    # The same site may change its own subnets to overlapping ones of its own past.
    assert store.set_networks("office-sh", "site", ("192.168.0.0/16",)).sites == (
        "192.168.0.0/16",)
    for bad in ("192.168.10.5/24", "not-a-net", "300.1.1.0/24"):
        with pytest.raises(StoreError) as caught:
            store.set_networks("office-bj", "site", (bad,))
        assert caught.value.code == "bad_network"
