"""The live-user bookkeeping's lifetime: stopping never counts a byte twice or closes the
store under a call in flight.

The user store is the real SQLite store in a temporary file; the connection's transport is a
stand-in that only reports byte counts (the bookkeeping reads nothing else from it here).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from veil.server.live import Live
from veil.store.base import SecretBox, Usage
from veil.store.sqlite import SqliteUserStore

BOX = SecretBox(bytes(range(32)))


def trojan_hash(secret: bytes) -> str:
    return hashlib.sha224(secret).hexdigest()


class CountingTransport(asyncio.BaseTransport):
    def __init__(self, up: int, down: int) -> None:
        super().__init__()
        self.counts = (up, down)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"byte_counts": self.counts, "peername": ("192.0.2.1", 40000)}.get(name, default)

    def is_closing(self) -> bool:
        return False


class SlowWriteStore(SqliteUserStore):
    """Holds the first usage write, once armed, until released."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, trojan_hash=trojan_hash, box=BOX)
        self.armed = False
        self.inside, self.release = threading.Event(), threading.Event()

    def add_usage(self, deltas: Mapping[str, Usage], now: float) -> None:
        if self.armed and deltas:
            self.armed = False
            self.inside.set()
            self.release.wait(10)
        super().add_usage(deltas, now)


def test_stopping_during_a_usage_write_counts_each_byte_once(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    stores: list[SlowWriteStore] = []

    def open_store() -> SlowWriteStore:
        stores.append(SlowWriteStore(path))
        return stores[-1]

    async def scenario() -> None:
        live = Live(open_store, trojan_hash=trojan_hash, interval=0.05)
        await live.start()
        store = stores[0]
        user = store.add_user("alice", os.urandom(32), os.urandom(16), 1000.0)
        live.register(user, "tls", CountingTransport(0, 0), close=lambda _reason: None)
        conn = next(iter(live.connections.values()))
        transport = conn._transport
        assert isinstance(transport, CountingTransport)
        transport.counts = (100, 200)
        store.armed = True
        assert await asyncio.to_thread(store.inside.wait, 10), "no usage write started"
        # The periodic tick is inside its usage write now; stop while it is.
        stopping = asyncio.ensure_future(live.stop())
        await asyncio.sleep(0.2)  # an absence is checked: time enough for stop() to end
        assert not stopping.done(), "stop() did not wait for the tick in flight"
        store.release.set()
        await asyncio.wait_for(stopping, 10)

    asyncio.run(scenario())
    check = SqliteUserStore(path, trojan_hash=trojan_hash, box=BOX)
    try:
        assert check.usage_by_user(None) == {"alice": Usage(100, 200)}
    finally:
        check.close()


def test_a_changed_user_directory_is_logged_once_by_counts_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = SqliteUserStore(tmp_path / "users.db", trojan_hash=trojan_hash, box=BOX)

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("user dir")]

    async def scenario() -> None:
        # A long interval: the test ticks by hand, so each tick is one it asked for.
        live = Live(lambda: store, trojan_hash=trojan_hash, interval=3600)
        await live.start()
        assert lines() == []  # nobody before, nobody now: nothing changed
        user = store.add_user("alice", os.urandom(32), os.urandom(16), 1000.0)
        await live.tick()
        assert lines() == ["user directory: 1 users, 0 refused"]  # no name: counts only
        live.register(user, "tls", CountingTransport(100, 200), close=lambda _reason: None)
        await live.tick()  # usage and last-seen moved; the users did not
        assert len(lines()) == 1
        store.revoke("alice", 2000.0)
        await live.tick()
        assert lines()[1:] == ["user directory: 1 users, 1 refused"]
        await live.stop()

    with caplog.at_level(logging.DEBUG, logger="veil.server"):
        asyncio.run(scenario())


class PeerTransport(CountingTransport):
    def __init__(self, address: str) -> None:
        super().__init__(0, 0)
        self.address = address

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return (self.address, 40000)
        return super().get_extra_info(name, default)


def test_a_device_limit_counts_client_addresses_not_connections(tmp_path: Path) -> None:
    """--max-devices-per-user 2: any number of connections from two addresses; a third
    address is refused until one of the two has none left; a CDN's edge is not counted."""
    store = SqliteUserStore(tmp_path / "users.db", trojan_hash=trojan_hash, box=BOX)

    async def scenario() -> None:
        live = Live(lambda: store, trojan_hash=trojan_hash, interval=3600,
                    max_devices_per_user=2)
        await live.start()
        user = store.add_user("alice", os.urandom(32), os.urandom(16), 1000.0)
        await live.tick()
        first = [live.register(user, "veil", PeerTransport("192.0.2.1"), close=lambda _r: None)
                 for _ in range(3)]
        assert live.refusal(user, "192.0.2.2") is None
        live.register(user, "trojan", PeerTransport("192.0.2.2"), close=lambda _r: None)
        assert live.refusal(user, "192.0.2.1") is None  # a known device: more connections
        assert live.refusal(user, "198.51.100.7") == "too_many_devices"
        assert live.refusal(user) is None  # the address unknown (a CDN): not counted
        live.register(user, "cdn", PeerTransport("203.0.113.9"), close=lambda _r: None)
        assert live.refusal(user, "198.51.100.7") == "too_many_devices"
        for conn in first[:2]:
            live.unregister(conn)
        assert live.refusal(user, "198.51.100.7") == "too_many_devices"  # one is still there
        live.unregister(first[2])
        assert live.refusal(user, "198.51.100.7") is None
        await live.stop()

    asyncio.run(scenario())


class LimitedTransport(PeerTransport):
    """A transport the server can hold to token buckets (as its TLS transport is)."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.read: Any = None

    def set_rate_limits(self, read: Any, write: Any) -> None:
        self.read = read


def test_workers_split_a_users_rate_by_their_sessions(tmp_path: Path) -> None:
    """--workers with --max-user-rate: a user with sessions on two workers gets the rate in
    all, split by sessions (3 here, 1 there: 3/4 and 1/4); alone on one worker, all of it;
    each worker's tick follows where the sessions are."""
    from veil.server.shared import SharedUsers

    store = SqliteUserStore(tmp_path / "users.db", trojan_hash=trojan_hash, box=BOX)
    table = SharedUsers.create(workers=2, devices=0)

    async def scenario() -> None:
        lives = [Live(lambda: store, trojan_hash=trojan_hash, interval=3600,
                      user_rate=1_000_000) for _ in range(2)]
        for index, live in enumerate(lives):
            live.shared = SharedUsers(table, index)
            await live.start()
        user = store.add_user("alice", os.urandom(32), os.urandom(16), 1000.0)
        for live in lives:
            await live.tick()
        here = [LimitedTransport("192.0.2.1") for _ in range(3)]
        conns = [lives[0].register(user, "veil", t, close=lambda _r: None) for t in here]
        assert here[0].read.rate == 1_000_000  # alone on worker 0: the whole rate
        there = LimitedTransport("192.0.2.1")
        lives[1].register(user, "veil", there, close=lambda _r: None)
        assert there.read.rate == 250_000  # at once, from the shared counts
        await lives[0].tick()  # worker 0 learns of worker 1's session at its tick
        assert here[0].read.rate == 750_000
        for conn in conns:
            lives[0].unregister(conn)
        await lives[1].tick()
        assert there.read.rate == 1_000_000
        for live in lives:
            await live.stop()
            assert live.shared is not None
            live.shared.close()

    try:
        asyncio.run(scenario())
    finally:
        os.close(table)
