"""Who may use the admin panel: the admin password, browser sessions, CSRF tokens, the login
rate limit and the API token for scripts.

* The password is stored as an Argon2id PHC string (``$argon2id$v=19$m=...,t=...,p=...$salt$
  hash``: parameters, salt and hash in one setting), so a leaked store costs an attacker
  64 MiB of memory per guess. Verifying takes ~0.2 s of CPU: the app runs it in a thread, a
  few at a time (:data:`MAX_CONCURRENT_VERIFICATIONS`).
* Sessions live in memory only (a restart logs everybody out). The cookie carries a random
  id; the table is keyed by the id's SHA-256, so lookups do not compare secrets byte by byte.
  Each session has its own CSRF token, required on every state change made with the cookie.
* The API token is random; only its SHA-256 is stored, so the store never holds it.

Nothing here logs, and nothing here does I/O: the app reads settings and passes them in.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import re
import secrets
import threading
from dataclasses import dataclass

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

#: Settings in the user store (``UserStore.get_setting``): names, not secrets.
PASSWORD_SETTING = "admin.password"  # noqa: S105
TOKEN_SETTING = "admin.api_token_sha256"  # noqa: S105

# RFC 9106, section 4, second recommended option (for when 2 GiB per guess is too much):
# Argon2id, t=3, p=4, m=64 MiB, 128-bit salt, 256-bit tag.
ARGON2_MEMORY_KIB = 64 * 1024
ARGON2_ITERATIONS = 3
ARGON2_LANES = 4
SALT_SIZE = 16
HASH_SIZE = 32
#: Short passwords fall to guessing however slow the hash is.
MIN_PASSWORD_LENGTH = 10
# A PHC string longer than this is not one we wrote: refuse it before parsing.
MAX_ENCODED_LENGTH = 256
# Parameters read back from the store are bounded, so a tampered setting cannot make one
# login allocate gigabytes.
MAX_MEMORY_KIB = 1024 * 1024
MAX_ITERATIONS = 16
_PHC = re.compile(r"^\$argon2id\$v=19\$m=(\d+),t=(\d+),p=(\d+)\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$")

#: Argon2 verifications running at once: each holds its memory cost, so logins from many
#: addresses cannot exhaust the server's memory or CPU. One: cryptography 50.x (which the
#: bounds allow, and which pyOpenSSL 26, under acme, holds the lock at) deadlocks or raises
#: MemoryError when two Argon2 derivations run at once in one process (measured: two
#: threads hang 30 s and more; four raise at once; 51.0.1 runs them), so every Argon2 call
#: here also takes :data:`_ARGON2_LOCK`.
MAX_CONCURRENT_VERIFICATIONS = 1
_ARGON2_LOCK = threading.Lock()

# Sessions: idle for an hour or open for twelve, they end. The table is bounded; when full,
# the least recently created session goes (an admin panel has a handful of users).
SESSION_IDLE_S = 3600.0
SESSION_MAX_AGE_S = 12 * 3600.0
MAX_SESSIONS = 64
SESSION_ID_BYTES = 32

# Login: this many failures from one address within the window, then 429 until the oldest
# failure leaves it. Addresses tracked are bounded (expired ones are dropped first).
LOGIN_MAX_FAILURES = 5
LOGIN_WINDOW_S = 60.0
MAX_TRACKED_ADDRESSES = 10_000

API_TOKEN_PREFIX = "veil_admin_"  # noqa: S105 - lets secret scanners recognise a leaked token
API_TOKEN_BYTES = 32


# ------------------------------------------------------------------ password
def hash_password(password: str, *, memory_kib: int = ARGON2_MEMORY_KIB,
                  iterations: int = ARGON2_ITERATIONS, lanes: int = ARGON2_LANES) -> str:
    """The PHC string to store for ``password`` (a new random salt each time)."""
    kdf = Argon2id(salt=os.urandom(SALT_SIZE), length=HASH_SIZE, iterations=iterations,
                   lanes=lanes, memory_cost=memory_kib)
    with _ARGON2_LOCK:
        return kdf.derive_phc_encoded(password.encode())


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches the stored PHC string; False for anything malformed or
    with parameters out of bounds. CPU- and memory-heavy: call it off the event loop."""
    match = _PHC.match(encoded) if len(encoded) <= MAX_ENCODED_LENGTH else None
    if match is None:
        return False
    memory, iterations, _lanes = (int(g) for g in match.groups())
    if memory > MAX_MEMORY_KIB or iterations > MAX_ITERATIONS:
        return False
    try:
        with _ARGON2_LOCK:
            Argon2id.verify_phc_encoded(password.encode(), encoded)
    except (InvalidKey, ValueError):
        return False
    return True


def password_tag(encoded: str | None) -> str:
    """A short fingerprint of the stored hash: a session opened under one password ends
    when the password changes."""
    return hashlib.sha256((encoded or "").encode()).hexdigest()[:16]


# ------------------------------------------------------------------ API token
def new_api_token() -> tuple[str, str]:
    """(token to show once, SHA-256 hex to store)."""
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(API_TOKEN_BYTES)
    return token, token_digest(token)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, stored_digest: str | None) -> bool:
    """Whether a presented token is the one whose digest is stored (constant time)."""
    if not stored_digest:
        return False
    return hmac.compare_digest(token_digest(token), stored_digest)


# ------------------------------------------------------------------ sessions
@dataclass(slots=True)
class AdminSession:
    csrf: str
    created_at: float
    last_used: float
    password_tag: str


class Sessions:
    """Logged-in browsers, by the SHA-256 of their cookie's session id."""

    def __init__(self, *, idle_s: float = SESSION_IDLE_S, max_age_s: float = SESSION_MAX_AGE_S,
                 max_sessions: int = MAX_SESSIONS) -> None:
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self.max_sessions = max_sessions
        self._by_digest: dict[str, AdminSession] = {}

    def __len__(self) -> int:
        return len(self._by_digest)

    def create(self, now: float, tag: str) -> tuple[str, AdminSession]:
        """A new session: (id for the cookie, session)."""
        self._expire(now)
        while len(self._by_digest) >= self.max_sessions:
            del self._by_digest[next(iter(self._by_digest))]
        session_id = secrets.token_urlsafe(SESSION_ID_BYTES)
        session = AdminSession(new_csrf_token(), now, now, tag)
        self._by_digest[_digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str, now: float, tag: str) -> AdminSession | None:
        """The live session with this id, or None (unknown, expired, or opened under another
        password, which ends it)."""
        key = _digest(session_id)
        session = self._by_digest.get(key)
        if session is None:
            return None
        if (now - session.last_used > self.idle_s or now - session.created_at > self.max_age_s
                or not hmac.compare_digest(session.password_tag, tag)):
            del self._by_digest[key]
            return None
        session.last_used = now
        return session

    def drop(self, session_id: str) -> None:
        self._by_digest.pop(_digest(session_id), None)

    def _expire(self, now: float) -> None:
        for key, s in list(self._by_digest.items()):
            if now - s.last_used > self.idle_s or now - s.created_at > self.max_age_s:
                del self._by_digest[key]


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def new_csrf_token() -> str:
    return secrets.token_urlsafe(SESSION_ID_BYTES)


CSRF_TOKEN_LENGTH = len(new_csrf_token())


def tokens_equal(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def csrf_ok(given: str | None, session: AdminSession) -> bool:
    return tokens_equal(given, session.csrf)


# ------------------------------------------------------------------ login rate limit
class LoginLimiter:
    """Counts failed logins per client address in a sliding window."""

    def __init__(self, *, max_failures: int = LOGIN_MAX_FAILURES,
                 window_s: float = LOGIN_WINDOW_S,
                 max_addresses: int = MAX_TRACKED_ADDRESSES) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._failures: dict[str, collections.deque[float]] = {}

    def retry_after(self, address: str, now: float) -> float | None:
        """Seconds ``address`` must wait before trying again, or None if it may try now."""
        failures = self._failures.get(address)
        if failures is None:
            return None
        while failures and now - failures[0] >= self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return None
        if len(failures) < self.max_failures:
            return None
        return failures[0] + self.window_s - now

    def attempt(self, address: str, now: float) -> float | None:
        """Check and count in one step: the seconds to wait (nothing counted), or None after
        counting this attempt as a failure until :meth:`succeeded` says otherwise. Parallel
        attempts therefore cannot all pass the check before any of them fails."""
        wait = self.retry_after(address, now)
        if wait is None:
            self.failed(address, now)
        return wait

    def failed(self, address: str, now: float) -> None:
        if address not in self._failures and len(self._failures) >= self.max_addresses:
            for other in list(self._failures):
                self.retry_after(other, now)  # drops addresses whose failures expired
            while len(self._failures) >= self.max_addresses:
                del self._failures[next(iter(self._failures))]
        self._failures.setdefault(address, collections.deque()).append(now)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
