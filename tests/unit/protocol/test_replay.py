"""The replay filter: replays caught while their timestamp is acceptable, entries forgotten once
it is not, and its bounds refusing only the key that floods, never everyone."""

from __future__ import annotations

import os

from veil.protocol.auth import ACCEPT_WINDOW, Credential, ReplayFilter, build_auth, verify_auth

SECRET = bytes(range(32))
BINDING = b"b" * 12
NOW = 1_800_000_000.0


def key(i: int) -> bytes:
    return i.to_bytes(8, "big")


def test_a_replay_is_caught_as_long_as_its_timestamp_is_acceptable() -> None:
    cred = Credential.from_secret(SECRET)
    replay = ReplayFilter()
    msg = build_auth(cred, BINDING, NOW - ACCEPT_WINDOW + 1)  # a client's clock 2 min slow
    assert verify_auth(msg, cred, BINDING, NOW, replay) is None
    for later in (NOW, NOW + 1):
        assert verify_auth(msg, cred, BINDING, later, replay) == "replay"
    # From now on the timestamp is stale: refused before the filter, which may forget it.
    assert verify_auth(msg, cred, BINDING, NOW + 2, replay) == "stale"

    early = build_auth(cred, BINDING, NOW + ACCEPT_WINDOW)  # a client's clock 2 min fast
    assert verify_auth(early, cred, BINDING, NOW, replay) is None
    assert verify_auth(early, cred, BINDING, NOW + 2 * ACCEPT_WINDOW, replay) == "replay"


def test_entries_are_forgotten_once_their_timestamps_are_stale() -> None:
    f = ReplayFilter(window=10)
    for t in range(15, 36):  # clocks up to 10 s off either way, at 25
        assert f.check_and_add(key(1), os.urandom(16), t, 25) is None
    assert len(f) == 21
    # At 45, timestamps below 35 are stale: the buckets [10, 20) and [20, 30) go; [30, 40)
    # stays, with the five stale ones it holds next to 35.
    assert f.check_and_add(key(1), os.urandom(16), 45, 45) is None
    assert len(f) == 6 + 1
    nonce = os.urandom(16)
    assert f.check_and_add(key(1), nonce, 46, 46) is None
    assert f.check_and_add(key(1), nonce, 46, 55) == "replay"


def test_one_key_flooding_handshakes_is_refused_and_the_others_are_not() -> None:
    f = ReplayFilter(window=10, max_entries=100, max_entries_per_key=5)
    for _ in range(5):
        assert f.check_and_add(key(1), os.urandom(16), 0, 0) is None
    assert f.check_and_add(key(1), os.urandom(16), 0, 1) == "too_many_handshakes"
    assert f.check_and_add(key(2), os.urandom(16), 0, 1) is None
    # Once its entries are stale, the key is welcome again.
    assert f.check_and_add(key(1), os.urandom(16), 25, 25) is None


def test_a_full_filter_refuses_nobody_and_stays_at_its_bound() -> None:
    f = ReplayFilter(window=10, max_entries=20, max_entries_per_key=5)
    recorded = [(key(i), os.urandom(16)) for i in range(4) for _ in range(5)]
    for key_id, nonce in recorded:
        assert f.check_and_add(key_id, nonce, 0, 0) is None
    assert len(f) == 20
    # Full: a new key's handshakes are accepted (not remembered), ...
    for _ in range(3):
        assert f.check_and_add(key(9), os.urandom(16), 0, 1) is None
    assert len(f) == 20 and f.unrecorded == 3
    # ... what is remembered is still caught, and a flooding key is still refused.
    assert all(f.check_and_add(k, n, 0, 2) == "replay" for k, n in recorded)
    assert f.check_and_add(key(0), os.urandom(16), 0, 2) == "too_many_handshakes"


def test_the_filter_grows_past_its_first_table_and_still_finds_everything() -> None:
    f = ReplayFilter(max_entries_per_key=100_000)
    nonces = [os.urandom(16) for _ in range(5000)]
    for nonce in nonces:
        assert f.check_and_add(key(1), nonce, NOW, NOW) is None
    assert len(f) == 5000
    assert all(f.check_and_add(key(1), nonce, NOW, NOW) == "replay" for nonce in nonces)
    assert f.check_and_add(key(2), nonces[0], NOW, NOW) is None  # the key is part of it
