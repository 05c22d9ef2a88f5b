"""Which running servers have seen a change to the users: so that ``veil user add`` returns
once the key it prints works, on every server of the store (a fleet shares one PostgreSQL).

Two kinds of settings in the user store (``UserStore.get_setting``) carry it:

- ``users.changed``: a token (an integer, nanoseconds since the epoch, never smaller than the
  one before) that an edit writes *after* its change is committed;
- ``server.<id>``: each running server's presence, ``{"seen": TOKEN, "at": SECONDS, "host":
  ..., "pid": ...}``, written after each reload of its users that read ``users.changed``
  *before* the users (so a server that saw a token has loaded every change made before it),
  whenever the token it saw changed and at least every :data:`HEARTBEAT_S`.

A server whose presence is older than :data:`LIVE_WINDOW_S` is not running (a crash leaves
its entry behind; a clean stop removes it). Names and addresses of users never appear here.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from veil.errors import StoreError
from veil.store.base import UserStore

CHANGE_SETTING = "users.changed"
SERVER_PREFIX = "server."
#: A running server writes its presence at least this often (it reloads users every 0.5 s;
#: a write each time would be a database write per server per half second for nothing).
HEARTBEAT_S = 5.0
#: A presence older than this belongs to a server that stopped without saying so (killed,
#: crashed, its host gone): three heartbeats missed.
LIVE_WINDOW_S = 3 * HEARTBEAT_S
#: How long an edit waits for the running servers to confirm: they reload every 0.5 s, so
#: this leaves a loaded machine (or a slow database) twenty reloads.
CONFIRM_TIMEOUT_S = 10.0
#: How often the edit looks whether they have.
CONFIRM_POLL_S = 0.1


@dataclass(frozen=True)
class Presence:
    """One running server's last word: the change token it has loaded, and when it said so."""

    server_id: str
    seen: int
    at: float
    host: str = ""
    pid: int = 0

    def to_json(self) -> str:
        return json.dumps({"seen": self.seen, "at": self.at, "host": self.host,
                           "pid": self.pid})

    @classmethod
    def parse(cls, server_id: str, text: str) -> Presence | None:
        try:
            data = json.loads(text)
            return cls(server_id, int(data["seen"]), float(data["at"]), str(data.get("host", "")),
                       int(data.get("pid", 0)))
        except (ValueError, KeyError, TypeError):
            return None  # another version's format: not a server this one can wait for


def new_server_id() -> str:
    return uuid.uuid4().hex[:16]


def read_token(store: UserStore) -> int:
    text = store.get_setting(CHANGE_SETTING)
    try:
        return int(text) if text is not None else 0
    except ValueError:
        return 0


def note_change(store: UserStore) -> int:
    """Say that the users changed (call after the change is committed); the new token."""
    token = max(read_token(store) + 1, time.time_ns())
    store.set_setting(CHANGE_SETTING, str(token))
    return token


def write_presence(store: UserStore, server_id: str, seen: int, now: float) -> None:
    store.set_setting(SERVER_PREFIX + server_id,
                      Presence(server_id, seen, now, socket.gethostname(), os.getpid()).to_json())


def forget_presence(store: UserStore, server_id: str) -> None:
    store.set_setting(SERVER_PREFIX + server_id, None)


def running_servers(store: UserStore, now: float) -> list[Presence]:
    """The servers whose presence is recent enough to be running."""
    found = []
    for key, text in store.settings_with_prefix(SERVER_PREFIX).items():
        presence = Presence.parse(key[len(SERVER_PREFIX):], text)
        if presence is not None and now - presence.at <= LIVE_WINDOW_S:
            found.append(presence)
    return found


@dataclass(frozen=True)
class Confirmation:
    """How many running servers confirmed a change, out of how many."""

    confirmed: int
    running: int

    @property
    def complete(self) -> bool:
        return self.running > 0 and self.confirmed == self.running

    def describe(self) -> str | None:
        """What the operator should know, or None when every running server has it."""
        if self.complete:
            return None
        if not self.running:
            return ("no running server uses this user store: the change takes effect when "
                    "one starts")
        return (f"{self.running - self.confirmed} of {self.running} running servers did not "
                f"confirm the change within {CONFIRM_TIMEOUT_S:g} s: there it takes effect "
                "at their next reload of the users")


def wait_confirmed(store: UserStore, token: int, *, timeout: float = CONFIRM_TIMEOUT_S,
                   clock: Callable[[], float] = time.time,
                   sleep: Callable[[float], None] = time.sleep) -> Confirmation:
    """Wait until every running server has loaded the change ``token`` names (or later)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            servers = running_servers(store, clock())
        except StoreError:
            servers = []
        confirmed = sum(1 for s in servers if s.seen >= token)
        if (servers and confirmed == len(servers)) or not servers \
                or time.monotonic() >= deadline:
            return Confirmation(confirmed, len(servers))
        sleep(CONFIRM_POLL_S)
