"""Which running servers have loaded a change (veil.manage.presence), on a real SQLite store
and a clock the test moves."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from veil.manage import presence
from veil.store.base import SecretBox
from veil.store.sqlite import SqliteUserStore

NOW = 1_800_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteUserStore]:
    opened = SqliteUserStore(tmp_path / "users.db",
                             trojan_hash=lambda s: hashlib.sha224(s).hexdigest(),
                             box=SecretBox(bytes(32)))
    yield opened
    opened.close()


def confirm(store: SqliteUserStore, token: int) -> presence.Confirmation:
    return presence.wait_confirmed(store, token, timeout=0.3, clock=lambda: NOW,
                                   sleep=lambda _: None)


def test_tokens_only_grow(store: SqliteUserStore) -> None:
    first = presence.note_change(store)
    store.set_setting(presence.CHANGE_SETTING, str(first + 10**12))  # a clock ahead, elsewhere
    assert presence.note_change(store) == first + 10**12 + 1


def test_no_running_server_is_said_at_once(store: SqliteUserStore) -> None:
    token = presence.note_change(store)
    presence.write_presence(store, "crashed", token - 1, NOW - presence.LIVE_WINDOW_S - 1)
    result = confirm(store, token)
    assert (result.confirmed, result.running) == (0, 0)
    assert "no running server" in (result.describe() or "")


def test_every_running_server_must_have_loaded_the_change(store: SqliteUserStore) -> None:
    token = presence.note_change(store)
    presence.write_presence(store, "a", token, NOW)
    presence.write_presence(store, "b", token - 1, NOW - 1)
    late = confirm(store, token)
    assert (late.confirmed, late.running) == (1, 2) and not late.complete
    assert "1 of 2 running servers did not confirm" in (late.describe() or "")
    presence.write_presence(store, "b", token + 5, NOW)  # a later change includes this one
    assert confirm(store, token).describe() is None
    presence.forget_presence(store, "a")
    presence.forget_presence(store, "b")
    assert presence.running_servers(store, NOW) == []
