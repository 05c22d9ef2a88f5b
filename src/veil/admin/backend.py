"""The admin panel's connection to the user store, owned by one worker thread.

The store is synchronous and may wait: SQLite up to its busy timeout while ``veil user ...``
holds the write lock, PostgreSQL a network round trip. The server's event loop carries every
tunnel, so the panel never calls the store on it: each request hands a function to this
backend's single thread, which also opened the connection (SQLite connections belong to the
thread that made them). One thread means store calls from the panel never overlap, as the
store's contract asks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from veil.manage.users import UserManager

if TYPE_CHECKING:
    from veil.manage.state import ServerState

T = TypeVar("T")

# Settings read on every authenticated request (the password hash, to end sessions opened
# under an old password) are cached this long: `veil admin passwd` takes effect within it.
SETTINGS_CACHE_S = 1.0


class Backend:
    """Runs functions of a :class:`UserManager` (and its store) on the store's own thread."""

    def __init__(self, state: ServerState, clock: Callable[[], float] = time.time) -> None:
        self._state = state
        self._clock = clock
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="veil-admin-store")
        self._users: UserManager | None = None
        self._settings: dict[str, tuple[float, str | None]] = {}

    async def open(self) -> None:
        store = await self._in_thread(self._state.open_store)
        self._users = UserManager(self._state, store, clock=self._clock)

    async def close(self) -> None:
        if self._users is not None:
            await self._in_thread(self._users.store.close)
            self._users = None
        self._executor.shutdown(wait=False)

    async def call(self, fn: Callable[[UserManager], T]) -> T:
        """``fn(users)`` on the store's thread."""
        users = self._users
        if users is None:
            raise RuntimeError("the admin backend is not open")
        return await self._in_thread(lambda: fn(users))

    async def setting(self, key: str) -> str | None:
        """A store setting, cached for :data:`SETTINGS_CACHE_S`."""
        now = time.monotonic()
        cached = self._settings.get(key)
        if cached is not None and now - cached[0] < SETTINGS_CACHE_S:
            return cached[1]
        value = await self.call(lambda users: users.store.get_setting(key))
        self._settings[key] = (now, value)
        return value

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
